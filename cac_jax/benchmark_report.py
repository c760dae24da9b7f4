"""`cac-jax bench`'s outputs: bench.json, bench.md (tables, ratios, the load warning) and the box
plot bench.png, from the result dict `cac_jax.benchmark.run_bench` returns."""

from __future__ import annotations

import json
import pathlib

from data_pipeline.atomic import atomic_write_text


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def load_warning(res: dict) -> list[str]:
    """A warning line when other processes loaded the machine during the run (shared CPUs)."""
    m = res["machine"]
    load = max(m["load_average_at_start"][0], m["load_average_at_end"][0])
    peaks = (res["matmul_peak_gflops_before"], res["matmul_peak_gflops_after"])
    if res["settings"]["local"] or (load <= 1.5 * m["logical_cores"]
                                    and max(peaks) <= 1.5 * min(peaks)):
        return []
    return [f"**Warning: the machine was shared during this run (load average up to {load:.1f} on "
            f"{m['logical_cores']} cores; matmul peak {peaks[0]:.0f} then {peaks[1]:.0f} GFLOP/s): "
            "absolute times are inflated and the ratios are only indicative.**"]


def markdown(res: dict) -> str:
    """bench.json as a markdown report."""
    m, s = res["machine"], res["settings"]
    lines = [
        "# cac-jax bench: inference time per sample and training step",
        "",
        f"Protocol: {res['protocol']}. Models: {', '.join(s['models'])}"
        f"{' (tiny :local configs)' if s['local'] else ''}, untrained, dtype {s['dtype']}.",
        f"Machine: {m['cpu_model']}, {m['logical_cores']} logical / {m['physical_cores']} physical "
        f"cores, AVX-512 {'yes' if m['avx512'] else 'no'}, accelerator {m['accelerator'] or 'none'}"
        f", {m['threads']} threads; JAX {m['jax']}"
        + (f", PyTorch {m['torch']}" if "torch" in m else "")
        + f"; load average {m['load_average_at_start'][0]:.1f} at start, "
          f"{m['load_average_at_end'][0]:.1f} at end.",
        f"float32 matmul peak (JAX, {res['matmul_n']}^3): {res['matmul_peak_gflops_before']:.0f} GFLOP/s "
        f"before, {res['matmul_peak_gflops_after']:.0f} after the timing rounds.",
        *load_warning(res),
        f"Preprocessing (`model_inputs`, whole {res['preprocessing']['study_shape_zyx']} study): "
        f"{res['preprocessing']['per_study_s']:.3f} s per study, not included below.",
        "",
        "## Inference, seconds per sample",
        "",
        "| framework | model | params (M) | median s | IQR s | s / slice | n | compile s | "
        "warm-up s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for fw, models in res["results"].items():
        for name, r in models.items():
            label = f"{fw} (best: {r['variant']})" if fw in ("jax", "torch") else fw
            lines.append(
                f"| {label} | {name} | {r['params'] / 1e6:.2f} | {r['median_s']:.3f} | "
                f"{r['iqr_s']:.3f} | {r['per_slice_median_s']:.4f} | {r['n']} | "
                f"{r['compile_s']:.1f} | {r['warmup_s']:.2f} |")
    lines += ["", "Wilcoxon rank-sum p between models (scipy.stats.ranksums):", ""]
    for fw, pairs in res["wilcoxon_p"].items():
        lines.append(f"- {fw}: " + ", ".join(f"{k} p = {v:.3g}" for k, v in pairs.items()))
    lines += ["", "Ratios (time of the UNet over time of the ConvLSTM; JAX speed-up = PyTorch "
                  "time / JAX time):", ""]
    for key, value in res["ratios"].items():
        lines.append(f"- {key}: " + json.dumps({k: (round(v, 3) if isinstance(v, float) else {
            kk: round(vv, 3) for kk, vv in v.items()}) for k, v in value.items()}))
    if res.get("compile_errors"):
        lines += ["", "Left out (failed to build or compile):", ""]
        for fw, errs in res["compile_errors"].items():
            for name, err in errs.items():
                lines.append(f"- {fw} {name}: {err}")
    if "train_step" in res:
        lines += ["", f"## Training step (focal loss + Adam), batch {s['train_batch']}", "",
                  "| framework | model | step s | forward s | step / forward | peak memory GiB "
                  "(source) | RSS growth GiB |",
                  "|---|---|---:|---:|---:|---|---:|"]
        for fw, models in res["train_step"].items():
            for name, r in models.items():
                label = f"{fw} (best: {r['variant']})" if fw in ("jax", "torch") else fw
                lines.append(
                    f"| {label} | {name} | {r['step_s']:.3f} | {r['forward_s']:.3f} | "
                    f"{r['step_over_forward']:.2f} | {_gib(r['peak_memory_bytes'])} "
                    f"({r['peak_memory_source']}) | {_gib(r['rss_increase_bytes'])} |")
    return "\n".join(lines) + "\n"


def box_plot(res: dict, path: pathlib.Path) -> None:
    """Box plot of the per-sample times, one box per framework and model (PNG, atomic)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from data_pipeline.atomic import atomic_path

    labels, data = [], []
    for fw, models in res["results"].items():
        if fw in ("jax", "torch"):  # the best variant is already shown under its own name
            continue
        for name, r in models.items():
            labels.append(f"{fw}\n{name}")
            data.append(r["times_s"])
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(labels)), 4.5))
    ax.boxplot(data)
    ax.set_xticks(range(1, len(labels) + 1), labels, fontsize=7)
    ax.set_ylabel(f"seconds per {res['settings']['slices']}-slice sample")
    ax.set_yscale("log")
    ax.set_title(f"{res['settings']['samples']} samples at {res['settings']['size']} px, "
                 f"{res['machine']['threads']} threads ({res['machine']['cpu_model'][:40]})",
                 fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def write_outputs(res: dict, out_dir: pathlib.Path) -> dict[str, pathlib.Path]:
    """Write DIR/bench.json, bench.md and bench.png atomically; returns their paths."""

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "bench.json", "md": out_dir / "bench.md",
             "png": out_dir / "bench.png"}
    atomic_write_text(paths["json"], json.dumps(res, indent=2) + "\n")
    atomic_write_text(paths["md"], markdown(res))
    box_plot(res, paths["png"])
    return paths
