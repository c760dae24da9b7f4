"""The report: `report.md`, `metrics.json` and the PNG figures (concordance heatmaps like the
paper's Figures 2 and 3, Bland-Altman plots)."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cac_jax.evaluation.inputs import Case
from cac_jax.evaluation.statistics import BlandAltmanResult, bland_altman_log
from cac_jax.scoring import CATEGORY_NAMES, CATEGORY_NAMES_5
from data_pipeline.atomic import atomic_path, atomic_write_text


def _mpl():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_concordance(path: str | os.PathLike,
                     panels: Sequence[tuple[str, np.ndarray]],
                     names: Sequence[str]) -> None:
    """Heatmaps like the paper's Figures 2 and 3: rows reference, columns prediction.

    Each cell shows its count and row percentage; the colour is the row percentage, so
    categories of different sizes read alike. Written atomically as PNG.
    """
    plt = _mpl()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.4 * len(panels), 4.2), squeeze=False)
    for ax, (title, counts) in zip(axes[0], panels):
        counts = np.asarray(counts)
        totals = counts.sum(axis=1, keepdims=True)
        percent = np.divide(100.0 * counts, totals, out=np.zeros(counts.shape),
                            where=totals > 0)
        ax.imshow(percent, cmap="Blues", vmin=0, vmax=100)
        for i in range(counts.shape[0]):
            for j in range(counts.shape[1]):
                colour = "white" if percent[i, j] > 60 else "black"
                label = f"{counts[i, j]}\n({percent[i, j]:.0f}%)" if totals[i, 0] else "0"
                ax.text(j, i, label, ha="center", va="center", fontsize=9, color=colour)
        ax.set_xticks(range(len(names)), names)
        ax.set_yticks(range(len(names)), names)
        ax.set_xlabel("prediction (CAC category)")
        ax.set_ylabel("reference (CAC category)")
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


def plot_bland_altman(path: str | os.PathLike,
                      panels: Sequence[tuple[str, np.ndarray, np.ndarray, BlandAltmanResult]]
                      ) -> None:
    """Bland-Altman plots on log(Agatston + 1): difference against mean, bias and 95% limits."""
    plt = _mpl()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.0 * len(panels), 4.0), squeeze=False)
    for ax, (title, reference, predicted, result) in zip(axes[0], panels):
        ref_log = np.log1p(np.asarray(reference, dtype=np.float64))
        pred_log = np.log1p(np.asarray(predicted, dtype=np.float64))
        ax.scatter((ref_log + pred_log) / 2, pred_log - ref_log, s=12, alpha=0.7)
        if result.bias is not None:
            ax.axhline(result.bias, color="tab:red", label=f"bias {result.bias:.2f}")
            for limit in result.loa95:
                ax.axhline(limit, color="tab:red", linestyle="--", linewidth=0.8)
            ax.legend(loc="best", fontsize=8,
                      title=f"95% LoA {result.loa95[0]:.2f} to {result.loa95[1]:.2f}",
                      title_fontsize=8)
        ax.axhline(0.0, color="grey", linewidth=0.5)
        ax.set_xlabel("mean of log(Agatston + 1)")
        ax.set_ylabel("prediction - reference, log(Agatston + 1)")
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


# ----------------------------------------------------------------------------- report


def _fmt(value: float | None, digits: int = 3) -> str:
    # round(...) + 0.0 turns -0.0 into 0.0, so a tiny negative does not print as "-0.000".
    return "n/a" if value is None else f"{round(value, digits) + 0.0:.{digits}f}"


def format_p(value: float | None) -> str:
    """A p-value as papers print it: 3 decimals, or "<0.001"."""
    if value is None:
        return "n/a"
    return "<0.001" if value < 0.001 else f"{value:.3f}"


def _fmt_ci(values: list[float] | None, digits: int = 3) -> str:
    return "n/a" if values is None else f"{_fmt(values[0], digits)} to {_fmt(values[1], digits)}"


def _matrix_table(block: dict[str, Any], names: Sequence[str]) -> list[str]:
    lines = ["| reference \\ prediction | " + " | ".join(names) + " | sensitivity |",
             "|---" * (len(names) + 2) + "|"]
    for i, name in enumerate(names):
        percent = block["concordance_row_percent"][i]
        cells = [f"{count} ({percent[j]:.0f}%)" if percent is not None else str(count)
                 for j, count in enumerate(block["concordance"][i])]
        sensitivity = block["sensitivity"][name]
        lines.append(f"| **{name}** | " + " | ".join(cells)
                     + f" | {_fmt(None if sensitivity is None else 100 * sensitivity, 0)}"
                     + ("%" if sensitivity is not None else "") + " |")
    return lines


def _group_section(title: str, block: dict[str, Any], figures: dict[str, str],
                   labels: tuple[str, str]) -> list[str]:
    blocks = [(labels[0], block)]
    if "model_2" in block:
        blocks.append((labels[1], block["model_2"]))
    lines = [f"## {title}", "", f"n = {block['n']} cases.", "",
             "| model | kappa (linear) | 95% CI (asymptotic) | 95% CI (bootstrap) | exact "
             "agreement "
             "| ICC(2,1) Agatston (95% CI) | ICC(2,1) volume | Bland-Altman bias, log(A+1) "
             "(95% LoA) |",
             "|---|---|---|---|---|---|---|---|"]
    for label, b in blocks:
        ba = b["bland_altman_log"]
        lines.append(
            f"| {label} | {_fmt(b['kappa_linear'])} | {_fmt_ci(b['kappa_linear_ci95'])} | "
            f"{_fmt_ci(b.get('kappa_linear_bootstrap_ci95'))} | "
            f"{_fmt(None if b['exact_agreement'] is None else 100 * b['exact_agreement'], 1)}% | "
            f"{_fmt(b['icc_agatston'])} ({_fmt_ci(b['icc_agatston_ci95'])}) | "
            f"{_fmt(b['icc_volume'])} | {_fmt(ba['bias'])} ({_fmt_ci(ba['loa95'])}) |")
    if "z_test" in block:
        z = block["z_test"]
        lines += ["", f"Difference of kappas ({labels[0]} - {labels[1]}): "
                      f"{_fmt(z['difference'])}, z = {_fmt(z['z'], 2)}, "
                      f"p = {format_p(z['p'])}. Assumption: {z['assumption']}."]
        if z["null_reason"]:
            lines.append(f"(Not computed: {z['null_reason']}.)")
        paired = block.get("z_test_paired_bootstrap")
        if paired:
            lines += ["", f"Paired bootstrap ({paired['n_resamples']} resamples, "
                          f"{paired['resampling']}, "
                          f"{paired['n_defined']} with both kappas defined): difference 95% CI "
                          f"{_fmt_ci(paired['difference_ci95'])}, z = {_fmt(paired['z'], 2)}, "
                          f"p = {format_p(paired['p'])}. {paired['assumption']}."]
    for label, b in blocks:
        lines += ["", f"Concordance, {label} (rows reference, columns prediction; count and "
                      "row percentage):", ""]
        lines += _matrix_table(b, CATEGORY_NAMES)
        if "five_class" in b:
            five = b["five_class"]
            exact = five["exact_agreement"]
            lines += ["", f"Five categories, {label}: kappa {_fmt(five['kappa_linear'])} "
                          f"(95% CI {_fmt_ci(five['kappa_linear_ci95'])}), exact agreement "
                          f"{_fmt(None if exact is None else 100 * exact, 1)}%.", ""]
            lines += _matrix_table(five, CATEGORY_NAMES_5)
    for label, b in blocks:
        for note in b["kappa_linear_notes"]:
            lines += ["", f"Note for {label}: {note}."]
        if b["null_reasons"]:
            lines += ["", f"Not computed for {label}: "
                          + "; ".join(f"{k}: {v}" for k, v in b["null_reasons"].items()) + "."]
    lines.append("")
    for caption, name in figures.items():
        lines += [f"![{caption}]({name})", ""]
    return lines


def _model_labels(inputs: dict[str, Any]) -> tuple[str, str]:
    """How the report and figures name the two models: by their results file's folder."""

    def label(number: int, path: str | None) -> str:
        if not path:
            return f"model {number}"
        # `cac-jax infer --out convlstm` writes convlstm/results.csv: the folder names the model.
        name = Path(path).stem if Path(path).stem != "results" else \
            Path(path).resolve().parent.name
        return f"model {number} ({name or Path(path).name})"

    return label(1, inputs["pred"]), label(2, inputs["pred2"])


def render_report(metrics: dict[str, Any], figures: dict[str, dict[str, str]]) -> str:
    """The markdown report: method, every table, figures, and every row left out."""
    inputs = metrics["inputs"]
    labels = _model_labels(inputs)
    lines = ["# Agreement with the reference", "",
             f"Predictions: `{inputs['pred']}`" + (f" and `{inputs['pred2']}`"
                                                  if inputs["pred2"] else "")
             + f"; reference: `{inputs['ref']}`; each prediction is compared with "
               f"{metrics['matching']}.", "",
             "Method: linearly weighted Cohen's kappa over the four CAC categories (0, 1-100, "
             "101-400, >400; reference categories "
             f"{metrics['reference_category']}); 95% CI {metrics['kappa_ci_method']}"
             + (f"; the bootstrap CI is the 2.5-97.5 percentile of kappa "
                f"({metrics['bootstrap_resampling']})" if inputs["n_bootstrap"] else "")
             + ". ICC(2,1): two-way random effects, absolute agreement, single measure (Shrout & "
               "Fleiss 1979), 95% CI by McGraw & Wong (1996). Bland-Altman on log(Agatston + 1), "
               "prediction minus reference, limits bias +- 1.96 SD.", ""]
    lines += _group_section("All cases", metrics, figures["all"], labels)
    for name, block in metrics.get("by_protocol", {}).items():
        lines += _group_section(f"Protocol {name}", block,
                                figures.get("by_protocol", {}).get(name, {}), labels)
    if metrics["warnings"]:
        lines += ["## Warnings", ""] + [f"- {w}" for w in metrics["warnings"]] + [""]
    lines += ["## Rows left out", ""]
    if metrics["excluded"]:
        lines += [f"{metrics['n_excluded']} row(s) were not used:", "",
                  "| scan_id | file | reason |", "|---|---|---|"]
        for entry in metrics["excluded"]:
            reason = entry["reason"].replace("|", "\\|")
            lines.append(f"| {entry['scan_id']} | {entry['source']} | {reason} |")
    else:
        lines.append("None: every prediction and reference row was used.")
    return "\n".join(lines) + "\n"


def protocol_suffixes(names: Sequence[str]) -> dict[str, str]:
    """A distinct file-name suffix per protocol: the name in a safe alphabet (protocol names come
    from the CSVs), numbered where two names come out the same ("ct ac", "ct_ac"). The figures
    of all cases have none, so no protocol (not even one named "all") can overwrite them."""
    suffixes: dict[str, str] = {}
    for name in names:
        base = "_" + re.sub(r"[^A-Za-z0-9_-]", "_", name)
        suffix, n = base, 1
        while suffix in suffixes.values():
            n += 1
            suffix = f"{base}_{n}"
        suffixes[name] = suffix
    return suffixes


def _figures_for(cases: Sequence[Case], block: dict[str, Any], out_dir: Path, suffix: str,
                 labels: tuple[str, str], five_class: bool) -> dict[str, str]:
    two = "model_2" in block
    figures: dict[str, str] = {}
    panels = [(f"{labels[0]}: kappa {_fmt(block['kappa_linear'], 2)}", block["concordance"])]
    if two:
        panels.append((f"{labels[1]}: kappa {_fmt(block['model_2']['kappa_linear'], 2)}",
                       block["model_2"]["concordance"]))
    name = f"concordance{suffix}.png"
    plot_concordance(out_dir / name, panels, CATEGORY_NAMES)
    figures["concordance matrix"] = name
    if five_class:
        panels5 = [(labels[0], block["five_class"]["concordance"])]
        if two:
            panels5.append((labels[1], block["model_2"]["five_class"]["concordance"]))
        name = f"concordance_5class{suffix}.png"
        plot_concordance(out_dir / name, panels5, CATEGORY_NAMES_5)
        figures["concordance matrix, five categories"] = name
    reference = np.array([c.reference_agatston for c in cases])
    ba_panels = [(labels[0], reference, np.array([c.agatston for c in cases]),
                  bland_altman_log(reference, [c.agatston for c in cases]))]
    if two:
        ba_panels.append((labels[1], reference, np.array([c.agatston_2 for c in cases]),
                          bland_altman_log(reference, [c.agatston_2 for c in cases])))
    name = f"bland_altman{suffix}.png"
    plot_bland_altman(out_dir / name, ba_panels)
    figures["Bland-Altman, log(Agatston + 1)"] = name
    return figures


def write_outputs(metrics: dict[str, Any], cases: Sequence[Case], out_dir: str | os.PathLike
                  ) -> None:
    """Writes the PNG figures, `report.md` and `metrics.json` (strict JSON) into `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    inputs = metrics["inputs"]
    labels = _model_labels(inputs)
    figures: dict[str, Any] = {
        "all": _figures_for(cases, metrics, out_dir, "", labels, inputs["five_class"]),
        "by_protocol": {}}
    by_protocol = metrics.get("by_protocol", {})
    for name, suffix in protocol_suffixes(list(by_protocol)).items():
        group = [c for c in cases if c.protocol == name]
        figures["by_protocol"][name] = _figures_for(group, by_protocol[name], out_dir, suffix,
                                                    labels, inputs["five_class"])
    # allow_nan=False: a NaN anywhere is a bug here, never a silent non-standard token.
    text = json.dumps(metrics, indent=2, allow_nan=False)
    atomic_write_text(out_dir / "report.md", render_report(metrics, figures))
    atomic_write_text(out_dir / "metrics.json", text + "\n")
