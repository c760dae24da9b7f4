"""The study: `cac-jax study --config configs/study.py --out DIR` (docs/study.md).

Stages, each through the command a user would run and each resumable (a stage whose settings
stamp matches what it would do now is reused; a training run continues from its checkpoints):
1. cohorts (`cac-jax synth`): for every training site a training cohort and a held-out test
   cohort (other seeds: other patients), and a cohort of a site never trained on;
2. the dataset (`cac-jax ingest`) of the training cohorts, split by patient into train and
   validation (the test patients are never ingested);
3. training (`cac-jax train`) of every model in `config.trainings`, to convergence: the step
   budget is an upper bound, early stopping on the validation metric ends each run;
4. inference (`cac-jax infer`) of every system (a heart model + a calcium model) on the test and
   unseen-site cohorts, and the naive 130 HU threshold inside the true heart;
5. the paper's evaluation (`cac-jax evaluate`): linearly weighted kappa with 95% CI per protocol,
   concordance, the ConvLSTM vs UNet z-test, CTAC predictions against the gated reference of the
   same patients, and the heart-frame ablation;
6. the timing study (`cac-jax bench`);
7. DIR/report.md and DIR/summary.json: the results beside the paper's;
8. the trained models without optimizer state (`cac-jax export`) in DIR/reference/NAME/, each with
   a MODEL.md card (training data, recipe, steps, the study's results).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from cac_jax import demo
from cac_jax import stages as stage_stamps
from data_pipeline.atomic import atomic_write_text
from data_pipeline.errors import InputError

PROTOCOLS = ("cac", "ctac")
COHORTS = ("test", "unseen")
# The paper's linearly weighted kappas (ConvLSTM / UNet) on its held-out patients.
PAPER = {"cac": {"convlstm": 0.84, "unet": 0.86}, "ctac": {"convlstm": 0.64, "unet": 0.67}}
STAGES = ("cohorts", "dataset", "train", "infer", "evaluate", "bench", "report", "export")


def _say(message: str) -> None:
    print(message, flush=True)


def _site_seed(config, index: int, purpose: int) -> int:
    """Cohort seeds: one per (site, purpose), far apart so patient seeds never meet."""
    return int(config.seed) + 10_000 * purpose + 100 * index


def anatomies(config) -> tuple[str, ...]:
    """The study's anatomy variants (data_pipeline.phantom), the first under the plain cohort
    names; configs written before the key had one `anatomy`, or none (the classic one)."""
    from data_pipeline.phantom.cohort import DEFAULT_ANATOMY

    if config.get("anatomies"):
        return tuple(config.anatomies)
    return (config.get("anatomy", DEFAULT_ANATOMY),)


def cohort_names(config, stem: str) -> list[str]:
    """The cohorts of `stem` ("train_SITE", "test_SITE" or "unseen") in every anatomy:
    `stem` for the first, `stem_ANATOMY` for the others."""
    return [stem, *(f"{stem}_{a}" for a in anatomies(config)[1:])]


def make_cohorts(out: Path, config, stamps) -> dict[str, Path]:
    """Synthesises every cohort; returns name -> manifest."""
    from data_pipeline.phantom.cohort import (
        DEFAULT_ANATOMY,
        DEFAULT_CTAC_IMAGING,
        generator_identity,
    )

    ctac = config.get("ctac_imaging", DEFAULT_CTAC_IMAGING)  # configs before the key: classic

    # Each anatomy variant's cohorts (data_pipeline.phantom); the stamp's generator is
    # GENERATOR_VERSION for the classic anatomy, as it always was, and the variant's own identity
    # otherwise, so a cohort of one is never reused as the other's.
    jobs = {}
    for anatomy, suffix in zip(anatomies(config), cohort_names(config, "")):
        for i, site in enumerate(config.train_sites):
            jobs[f"train_{site}{suffix}"] = (site, config.train_patients_per_site,
                                             _site_seed(config, i, 0), anatomy)
            jobs[f"test_{site}{suffix}"] = (site, config.test_patients_per_site,
                                            _site_seed(config, i, 1), anatomy)
        jobs[f"unseen{suffix}"] = (config.unseen_site, config.unseen_patients,
                                   _site_seed(config, 0, 2), anatomy)
    _say(f"[1/8] synthetic cohorts at {config.size} px ({' and '.join(anatomies(config))} "
         f"anatomy): training sites {', '.join(config.train_sites)} "
         f"({config.train_patients_per_site} + {config.test_patients_per_site} test patients "
         f"each), unseen site {config.unseen_site!r} ({config.unseen_patients} patients)")
    manifests = {}
    for name, (site, patients, seed, anatomy) in jobs.items():
        folder = out / "cohorts" / name
        wanted = {"site": site, "patients": patients, "seed": seed, "size": config.size,
                  "generator": generator_identity(anatomy, ctac)}

        def synth(folder=folder, site=site, patients=patients, seed=seed, name=name,
                  anatomy=anatomy):
            if folder.exists():
                shutil.rmtree(folder)  # made by this study with other settings
            demo._cli("synth", "--out", str(folder), "--patients", str(patients), "--size",
                      str(config.size), "--seed", str(seed), "--site", site, "--workers",
                      str(config.synth_workers),
                      *(() if anatomy == DEFAULT_ANATOMY else ("--anatomy", anatomy)),
                      *(() if ctac == DEFAULT_CTAC_IMAGING else ("--ctac-imaging", ctac)),
                      stage=f"synth {name}")

        stage_stamps._stage(stamps, f"cohort_{name}", wanted, [folder / "manifest.csv"], synth)
        manifests[name] = folder / "manifest.csv"
    return manifests


def _training_manifest(out: Path, config, manifests: dict[str, Path]) -> Path:
    """One manifest of the training sites' cohorts with a split column: validation_fraction of
    each site's patients (a fixed draw) in validation, the rest in train."""
    import numpy as np

    from data_pipeline.manifest import read_manifest, write_manifest

    rows = []
    for i, site in enumerate(config.train_sites):
        for j, name in enumerate(cohort_names(config, f"train_{site}")):
            site_rows = read_manifest(manifests[name])
            patients = sorted({r.patient_id for r in site_rows})
            rng = np.random.default_rng([int(config.seed), i, j] if j else [int(config.seed), i])
            count = max(1, round(float(config.validation_fraction) * len(patients)))
            validation = set(rng.permutation(patients)[:count].tolist())
            rows += [dataclasses.replace(r, split="validation" if r.patient_id in validation
                                         else "train") for r in site_rows]
    path = out / "dataset" / "manifest.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_manifest(path, rows)
    return path


def build_dataset(out: Path, config, manifests, stamps) -> Path:
    _say("[2/8] TFDS dataset of the training sites (train / validation by patient)")
    data_dir = out / "tfds"
    manifest = _training_manifest(out, config, manifests)
    wanted = {"cohorts": {k: json.loads((out / f".stamps/cohort_{k}.json").read_text())
                          for k in manifests if k.startswith("train_")},
              "validation_fraction": float(config.validation_fraction), "seed": config.seed}
    built = sorted((data_dir / "cac_ct").glob("*/dataset_info.json"))
    stage_stamps._stage(stamps, "ingest", wanted,
                built[-1:] or [data_dir / "cac_ct" / "dataset_info.json"],
                lambda: demo._cli("ingest", "--manifest", str(manifest), "--data-dir",
                                  str(data_dir), "--seed", str(config.seed), "--overwrite",
                                  "--workers", str(config.synth_workers), stage="ingest"))
    return data_dir


def _config_file(spec: str) -> tuple[str, str]:
    """(absolute path with its ':arg', the relative spec) of a config in configs/."""
    path, sep, arg = spec.partition(":")
    return stage_stamps._config_path(path) + (f":{arg}" if sep else ""), spec


def _finished(workdir: Path) -> bool:
    """Whether a training run ended by itself (its step budget or early stopping), not by a
    SIGTERM or a time box: only then is it reused; otherwise `cac-jax train` continues it."""
    path = workdir / "summary.json"
    if not path.exists():
        return False
    summary = json.loads(path.read_text())
    return not (summary.get("preempted") or summary.get("timed_out"))


def training_stamp(out: Path, config, name: str) -> tuple[str, list[str], dict]:
    """(config file, `--config.` overrides, the stamp) of training `name` in study folder `out`:
    a finished workdir is reused only while its stamp equals this one."""
    spec = config.trainings[name]
    overrides = [f"data.data_dir={out / 'tfds'}", "data.name=cac_ct",
                 f"seed={config.seed}", *spec.overrides]
    config_path, relative = _config_file(spec.config)
    wanted = {"config": relative, "overrides": list(overrides),
              "defaults": stage_stamps._config_defaults(relative.partition(":")[0]),
              "dataset": json.loads((out / ".stamps/ingest.json").read_text())}
    # A training that starts from another model (`train.init_from`, relative to the checkout
    # like configs/): the command gets the resolved path; the stamp keeps the path as written and
    # a hash of the model's files, so a finished run is reused only while its start is the same.
    for i, item in enumerate(overrides):
        key, _, value = item.partition("=")
        if key == "train.init_from" and value:
            path = Path(value) if Path(value).is_absolute() else Path(
                stage_stamps._config_path(value))
            overrides[i] = f"{key}={path}"
            wanted["init_from"] = {"path": value, "sha256": _model_fingerprint(path, name)}
    return config_path, overrides, wanted


def _model_fingerprint(path: Path, name: str) -> str:
    """SHA-256 over every file of the model folder `path` (names and bytes): a finished training
    that started from it is reused only while the model is the same."""
    if "://" in str(path) or not path.is_dir():
        raise InputError(path, f"training {name} starts from this model (train.init_from), which "
                               f"is not a folder here; the reference models lie in a checkout of "
                               f"cac-jax, under models/synthetic/")
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(path)).encode() + b"\0" + _fingerprint_bytes(file))
    return digest.hexdigest()


def _fingerprint_bytes(file: Path) -> bytes:
    """A model file's bytes for the fingerprint; a step's `meta` without its digests
    (`variables_sha256`, `train_state_sha256`: checksums of arrays the fingerprint covers
    anyway), so adding a digest to a model does not make a finished training that started from
    it train again.
    Only that entry's own bytes are left out (as `json.dumps` writes it); every other byte
    counts."""
    data = file.read_bytes()
    if file.name != "metadata" or file.parent.name != "meta":
        return data
    try:
        meta = json.loads(data)
    except ValueError:
        return data
    if not isinstance(meta, dict):
        return data
    for key in ("variables_sha256", "train_state_sha256"):
        digest = meta.get(key)
        if isinstance(digest, str):
            entry = ", " + json.dumps({key: digest})[1:-1]  # ', "variables_sha256": "…"'
            data = data.replace(entry.encode(), b"", 1)
    return data


def continue_keys() -> tuple[str, ...]:
    """Settings a finished or interrupted training may be continued under instead of trained
    again: its length and its stop rule. (Imported here: `cac-jax evaluate` loads this module
    without JAX.)"""
    from cac_jax.config_defaults import STOP_KEYS

    return ("train.steps", *STOP_KEYS)


def train_models(out: Path, config, stamps, only: set[str] | None = None) -> None:
    names = [n for n in config.trainings if only is None or n in only]
    _say(f"[3/8] training {', '.join(names)} (to convergence: early stopping on validation)")
    for name in names:
        workdir = out / "models" / name
        config_path, overrides, wanted = training_stamp(out, config, name)
        same = stamps.same(f"train_{name}", wanted)
        # Trained with other settings: start again, unless only its length or its stop rule
        # changed; then `cac-jax train` continues it from its last checkpoint.
        if (not same and workdir.exists()
                and not stamps.continues(f"train_{name}", wanted, continue_keys())):
            shutil.rmtree(workdir)
        if same and _finished(workdir):
            _say(f"      reusing {name} ({workdir})")
            continue
        # Stamped before it starts, so a killed run is continued (from its last checkpoint)
        # only with the same settings.
        stamps.mark(f"train_{name}", wanted)
        _say(f"      {name}:")
        args = ["train", "--config", config_path, "--workdir", str(workdir)]
        args += [f"--config.{item}" for item in overrides]
        demo._cli(*args, stage=f"train {name}")


def _ablations(config) -> dict[str, tuple[str, str]]:
    """The z-tested ablations, `ablation_NAME` -> (system, its variant)."""
    return {f"ablation_{name}": tuple(pair) for name, pair in config.ablations.items()}


def _systems(config, only: set[str] | None = None) -> dict[str, tuple[str, str]]:
    systems = {name: tuple(pair) for name, pair in config.systems.items()}
    if only is not None:
        systems = {k: v for k, v in systems.items() if set(v) <= only}
    return systems


def _unseen_manifest(out: Path, config, manifests: dict[str, Path]) -> Path:
    """The unseen site's manifest: its cohort's, or with several anatomies the pooled one that
    `score_cohorts` writes."""
    if len(cohort_names(config, "unseen")) > 1:
        return out / "eval" / "unseen_manifest.csv"
    return manifests.get("unseen", out / "cohorts" / "unseen" / "manifest.csv")


def score_cohorts(out: Path, config, manifests, stamps, systems) -> dict[str, Path]:
    _say(f"[4/8] scoring the test patients and the unseen site with {', '.join(systems)} "
         "(cac-jax infer), and the naive threshold")
    from data_pipeline.manifest import read_manifest, write_manifest

    cohorts = {}
    test_rows = [r for site in config.train_sites for name in cohort_names(config, f"test_{site}")
                 for r in read_manifest(manifests[name])]
    path = out / "eval" / "test_manifest.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_manifest(path, [dataclasses.replace(r, split="test") for r in test_rows])
    cohorts["test"] = path
    unseen = cohort_names(config, "unseen")
    cohorts["unseen"] = _unseen_manifest(out, config, manifests)
    if len(unseen) > 1:   # the unseen site in every anatomy, as one cohort
        write_manifest(cohorts["unseen"], [r for name in unseen
                                           for r in read_manifest(manifests[name])])
    combined = demo._combined_manifest(out, cohorts)
    min_heart = ([] if config.get("min_heart_ml") is None
                 else ["--min-heart-ml", str(config.min_heart_ml)])
    for system, (heart, calcium) in systems.items():
        folder = out / "infer" / system
        wanted = {"manifest": {k: str(v) for k, v in cohorts.items()},
                  "heart": json.loads((out / f".stamps/train_{heart}.json").read_text()),
                  "calcium": json.loads((out / f".stamps/train_{calcium}.json").read_text())}
        outputs = [out / "infer" / f"{cohort}_{system}" / "results.csv" for cohort in cohorts]

        def run(folder=folder, heart=heart, calcium=calcium, system=system):
            demo._cli("infer", "--heart-checkpoint", str(out / "models" / heart),
                      "--calcium-checkpoint", str(out / "models" / calcium),
                      "--manifest", str(combined), "--out", str(folder), "--save-previews",
                      "--overwrite", *min_heart, stage=f"infer {system}")
            demo.split_results(folder / "results.csv", {
                cohort: (manifest, out / "infer" / f"{cohort}_{system}" / "results.csv")
                for cohort, manifest in cohorts.items()})

        stage_stamps._stage(stamps, f"infer_{system}", wanted, outputs, run)
    for cohort, manifest in cohorts.items():
        naive = out / "infer" / f"{cohort}_naive" / "results.csv"
        stage_stamps._stage(stamps, f"naive_{cohort}", {"manifest": str(manifest)}, [naive],
                    lambda manifest=manifest, naive=naive: demo.naive_results(manifest, naive))
    return cohorts


def evaluate(out: Path, config, cohorts: dict[str, Path], systems, stamps=None) -> dict:
    _say("[5/8] agreement with the truth (cac-jax evaluate): kappa with CI, concordance, z-tests")
    runs = {}
    for cohort, manifest in cohorts.items():
        ref = ["--ref", str(manifest), "--by", "protocol", "--bootstrap", "1000"]
        results = {m: str(out / "infer" / f"{cohort}_{m}" / "results.csv")
                   for m in (*systems, "naive")}
        for model, pred in results.items():
            runs[(cohort, model)] = (f"{cohort}_{model}", ["--pred", pred, *ref])
        pairs = {"comparison": tuple(config.compare), **_ablations(config)}
        for key, (a, b) in pairs.items():
            if a in systems and b in systems:
                runs[(cohort, key)] = (f"{cohort}_{a}_vs_{b}",
                                       ["--pred", results[a], "--pred2", results[b], *ref])
        a, b = config.compare
        if a in systems and b in systems:
            # The paper's CTAC design: CTAC predictions against the same patients' gated reference.
            runs[(cohort, "ctac_vs_gated")] = (f"{cohort}_ctac_vs_gated",
                                               ["--pred", results[a], "--pred2", results[b],
                                                *ref, "--ref-protocol", "cac"])
    metrics = {}
    for key, (folder, args) in runs.items():
        target = out / "eval" / folder
        metrics[key] = stage_stamps._evaluation(
            stamps, f"evaluate_{folder}", args, target,
            lambda args=args, target=target, folder=folder: demo._cli(
                "evaluate", *args, "--out", str(target), stage=f"evaluate {folder}"))
    return metrics


def bench(out: Path, config, stamps) -> Path:
    _say(f"[6/8] timing study (cac-jax bench: {config.bench_samples} samples of 16 slices at "
         f"{config.bench_size} px)")
    folder = out / "bench"
    wanted = {"models": config.bench_models, "samples": config.bench_samples,
              "size": config.bench_size, "local": config.bench_local}
    args = ["bench", "--models", config.bench_models, "--samples", str(config.bench_samples),
            "--slices", "16", "--size", str(config.bench_size), "--out", str(folder)]
    if config.bench_local:
        args.append("--local")
    stage_stamps._stage(stamps, "bench", wanted, [folder / "bench.json"],
                lambda: demo._cli(*args, stage="bench"))
    return folder


def _cell(block: dict, protocol: str) -> dict:
    return ((block or {}).get("by_protocol") or {}).get(protocol) or {}


def summarise(config, metrics: dict, systems) -> dict:
    """summary.json: cohort -> model -> protocol -> kappa, CI, exact agreement, n; the z-tests."""
    summary: dict = {"paper": PAPER}
    for cohort in COHORTS:
        block = {}
        for model in (*systems, "naive"):
            block[model] = {p: {k: _cell(metrics.get((cohort, model)), p).get(k)
                                for k in ("kappa_linear", "kappa_linear_ci95",
                                          "exact_agreement", "n")} for p in PROTOCOLS}
        for key in ("comparison", *_ablations(config)):
            found = metrics.get((cohort, key))
            if found is not None:
                block[key] = {p: _cell(found, p).get("z_test") for p in PROTOCOLS}
        # The paper's CTAC design: each compared system's CTAC predictions against the same
        # patients' gated reference (the CTAC rows above are against each CTAC scan's own truth).
        found = _cell(metrics.get((cohort, "ctac_vs_gated")), "ctac")
        if found:
            a, b = config.compare
            block["ctac_vs_gated"] = {
                a: {"kappa_linear": found.get("kappa_linear"),
                    "kappa_linear_ci95": found.get("kappa_linear_ci95"), "n": found.get("n")},
                b: {"kappa_linear": found.get("kappa_linear_2"),
                    "kappa_linear_ci95": found.get("kappa_linear_2_ci95"), "n": found.get("n")}}
        summary[cohort] = block
    return summary


# The study's targets (docs/study.md): the ConvLSTM's kappa on the held-out patients per protocol,
# its margin over the naive threshold, the unseen site's shortfall, and ConvLSTM vs UNet.
TARGET_KAPPA = {"cac": 0.85, "ctac": 0.65}
TARGET_MARGIN = 0.2
TARGET_UNSEEN_GAP = 0.1
TARGET_ALPHA = 0.05


def targets(summary: dict, system: str = "convlstm", other: str = "unet") -> list[dict]:
    """Each target with the measured value and whether it is met (None: not measured)."""
    rows = []

    def kappa(cohort, model, protocol):
        value = (((summary.get(cohort) or {}).get(model) or {}).get(protocol) or {})
        value = value.get("kappa_linear")
        return None if value is None or (isinstance(value, float) and math.isnan(value)) \
            else float(value)

    for p in PROTOCOLS:
        test, naive, unseen = (kappa("test", system, p), kappa("test", "naive", p),
                               kappa("unseen", system, p))
        rows.append({"target": f"{system} {p.upper()} kappa >= {TARGET_KAPPA[p]}",
                     "value": test, "met": None if test is None else test >= TARGET_KAPPA[p]})
        margin = None if test is None or naive is None else test - naive
        rows.append({"target": f"{system} {p.upper()} kappa >= naive + {TARGET_MARGIN}",
                     "value": margin, "met": None if margin is None else margin >= TARGET_MARGIN})
        gap = None if test is None or unseen is None else test - unseen
        rows.append({"target": f"{system} {p.upper()} unseen site within {TARGET_UNSEEN_GAP} "
                               "of the held-out patients",
                     "value": gap, "met": None if gap is None else gap <= TARGET_UNSEEN_GAP})
        if p == "ctac":
            paper = (((summary.get("test") or {}).get("ctac_vs_gated") or {}).get(system) or {})
            value = paper.get("kappa_linear")
            value = None if value is None or math.isnan(float(value)) else float(value)
            rows.append({"target": f"{system} CTAC kappa against the same patients' gated "
                                   f"reference (the paper's design) >= {TARGET_KAPPA[p]}",
                         "value": value, "met": None if value is None
                         else value >= TARGET_KAPPA[p]})
        z = ((summary.get("test") or {}).get("comparison") or {}).get(p) or {}
        p_value, diff = z.get("p"), z.get("difference")
        met = None if p_value is None or diff is None else (p_value >= TARGET_ALPHA or diff > 0)
        rows.append({"target": f"{system} vs {other} {p.upper()}: no significant difference "
                               f"(p >= {TARGET_ALPHA}) or {system} better",
                     "value": p_value, "met": met})
    return rows


def _fmt(value, pattern="{:.2f}") -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) \
        else pattern.format(value)


def write_report(out: Path, config, summary: dict, seconds: dict, systems) -> Path:
    lines = ["# The study", "",
             f"Cohort at {config.size} px ({' and '.join(anatomies(config))} anatomy); "
             f"training sites {', '.join(config.train_sites)}; "
             f"unseen site {config.unseen_site}. Linearly weighted kappa of the four CAC "
             "categories (95% CI), against the reference categories of the same patients.", ""]
    for cohort in COHORTS:
        lines += [f"## {'Held-out patients of the training sites' if cohort == 'test' else 'Unseen site'}",
                  "", "| model | gated CAC kappa | CTAC kappa | n (CAC / CTAC) | paper CAC / CTAC |",
                  "| --- | --- | --- | --- | --- |"]
        for model in (*systems, "naive"):
            row = summary[cohort][model]
            cells = []
            for p in PROTOCOLS:
                ci = row[p]["kappa_linear_ci95"] or [None, None]
                cells.append(f"{_fmt(row[p]['kappa_linear'])} ({_fmt(ci[0])}-{_fmt(ci[1])})")
            paper = (f"{PAPER['cac'][model]:.2f} / {PAPER['ctac'][model]:.2f}"
                     if model in PAPER["cac"] else "")
            lines.append(f"| {model} | {cells[0]} | {cells[1]} | {row['cac']['n']} / "
                         f"{row['ctac']['n']} | {paper} |")
        for key in ("comparison", *_ablations(config)):
            if key in summary[cohort]:
                tests = summary[cohort][key]
                text = "; ".join(f"{p}: {json.dumps(tests[p])}" for p in PROTOCOLS)
                lines += ["", f"z-test ({key}): {text}"]
        lines.append("")
    if summary.get("targets"):
        lines += ["## Targets", "", "| target | measured | met |", "| --- | --- | --- |"]
        for row in summary["targets"]:
            met = {True: "yes", False: "**no**", None: "not measured"}[row["met"]]
            lines.append(f"| {row['target']} | {_fmt(row['value'], '{:.3f}')} | {met} |")
        lines += ["", "Measured values: the kappa; the margin over the naive threshold; the "
                  "held-out kappa minus the unseen site's; the z-test's p.", ""]
    lines += ["## Concordance (the paper's Figure 2)", "",
              "Rows: reference category; columns: predicted. `*_vs_*`: the two systems side by "
              "side; `ctac_vs_gated`: CTAC predictions against the same patients' gated "
              "reference.", ""]
    for cohort in COHORTS:
        for folder in sorted((out / "eval").glob(f"{cohort}_*")):
            for png in sorted(folder.glob("concordance_*.png")):
                lines.append(f"![{folder.name} {png.stem}]({png.relative_to(out).as_posix()})")
    lines += ["", "## Stage times", "",
              *(f"- {k}: {v / 60:.1f} min" for k, v in seconds.items()), ""]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path


def run(out: Path, config, *, only: set[str] | None = None,
        stages: Sequence[str] = STAGES) -> dict | None:
    """Runs the study's `stages` into `out`; returns summary.json's content (None without the
    report stage). `only` limits training and inference to these trainings."""
    out.mkdir(parents=True, exist_ok=True)
    stamps = stage_stamps._Stamps(out)
    seconds: dict[str, float] = {}
    manifests = make_cohorts(out, config, stamps) if "cohorts" in stages else {}
    if not manifests:
        manifests = {p.parent.name: p for p in (out / "cohorts").glob("*/manifest.csv")}
    if "dataset" in stages:
        t0 = time.perf_counter()
        build_dataset(out, config, manifests, stamps)
        seconds["dataset"] = time.perf_counter() - t0
    if "train" in stages:
        t0 = time.perf_counter()
        train_models(out, config, stamps, only)
        seconds["train"] = time.perf_counter() - t0
    trained = {p.stem.removeprefix("train_") for p in stamps.folder.glob("train_*.json")
               if (out / "models" / p.stem.removeprefix("train_") / "summary.json").exists()}
    systems = _systems(config, trained if only is None else trained & only)
    if not systems and any(s in stages for s in ("infer", "evaluate", "report")):
        raise InputError(out / "models", "no system has both of its models trained yet; run "
                                         "the train stage first")
    cohorts = {}
    if "infer" in stages:
        t0 = time.perf_counter()
        cohorts = score_cohorts(out, config, manifests, stamps, systems)
        seconds["infer"] = time.perf_counter() - t0
    cohorts = cohorts or {"test": out / "eval" / "test_manifest.csv",
                          "unseen": _unseen_manifest(out, config, manifests)}
    metrics = {}
    if "evaluate" in stages or "report" in stages:
        t0 = time.perf_counter()
        metrics = evaluate(out, config, cohorts, systems, stamps)
        seconds["evaluate"] = time.perf_counter() - t0
    if "bench" in stages:
        t0 = time.perf_counter()
        bench(out, config, stamps)
        seconds["bench"] = time.perf_counter() - t0
    if "report" not in stages:
        return None
    _say("[7/8] report")
    summary = summarise(config, metrics, systems)
    summary["targets"] = targets(summary, *config.compare)
    summary["seconds"] = seconds
    summary["config"] = json.loads(config.to_json())
    report = write_report(out, config, summary, seconds, systems)
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    for cohort in COHORTS:
        for model in (*systems, "naive"):
            cells = ", ".join(f"{p.upper()} kappa {_fmt(summary[cohort][model][p]['kappa_linear'])}"
                              for p in PROTOCOLS)
            _say(f"      {cohort:6s} {model:15s} {cells}")
    _say(f"report: {report}")
    if "export" in stages:
        export_models(out, config, summary, systems)
    return summary


def _parameter_count(step_dir: Path) -> int:
    import jax
    import numpy as np

    from cac_jax.checkpoints import load_trained

    params = load_trained(step_dir).variables["params"]
    return int(sum(np.size(leaf) for leaf in jax.tree.leaves(params)))


def model_card(name: str, config, summary: dict, systems, step_dir: Path,
               training: dict) -> str:
    """MODEL.md of an exported model: what it is, what it was trained on, how, and the study's
    results of every system it belongs to."""
    saved = json.loads((step_dir / "config" / "metadata").read_text())
    train, data, model = saved["train"], saved["data"], saved["model"]
    task, arch = saved["task"], model["arch"]
    if task == "calcium" and data.get("calcium_frame") == "heart":
        inputs = (f"a {data['frame_size']} px window at {data['frame_spacing_mm']} mm centred on "
                  f"the heart (trained on {data['crop_size']} px crops of it; "
                  "docs/heart_frame.md)")
    else:
        inputs = f"whole slices resampled to {data['image_size']} px"
    classes = ("heart silhouette, 2 classes" if task == "heart" else
               "3 classes: background, coronary calcium, other calcium")
    patients = config.train_patients_per_site * len(config.train_sites) * len(anatomies(config))
    lines = [
        f"# {name}: the study's {task} model ({arch})", "",
        "**Trained on synthetic phantoms only (cac-jax's CT cohort generator); not for clinical "
        "use.** A research reference: it shows what the recipe reaches on the generator's "
        "scans and gives a starting point for training on real data.", "",
        "## Model", "",
        f"- Task: {task} ({classes}); architecture {arch}; "
        f"{_parameter_count(step_dir):,} parameters.",
        f"- Input: 3 adjacent slices, {inputs}.",
        f"- Files: `config.json` and `checkpoints/{step_dir.name}/` (variables, config, meta, "
        "metrics); no optimizer state.", "",
        "## Training data", "",
        f"- Generator: `cac-jax synth` (data_pipeline.phantom, generator version "
        f"{_generator_version(config)}), {config.size} px scans, gated CAC and CTAC protocols of every "
        f"patient.",
        f"- Sites: {', '.join(config.train_sites)} ({config.train_patients_per_site} patients each"
        f"{_per_anatomy(config)}, {patients} in all; {config.validation_fraction:.0%} of them, "
        "by patient, for validation). The study's test patients (other seeds) and its unseen site "
        f"({config.unseen_site}) were never trained on.", "",
        "## Recipe", "",
        f"- `cac-jax train --config {training['config']}` with "
        + ", ".join(f"`{o}`" for o in training["overrides"] if not o.startswith("data.data_dir")),
        f"- Batch {train['batch_size']}, Adam at {train.get('learning_rate')}, focal loss "
        f"(alpha {train.get('focal_alpha')}, gamma {train.get('focal_gamma')}), the plateau "
        f"schedule and early stopping on "
        f"`{train.get('early_stop_metric') or training['best_metric']}` (patience "
        f"{train.get('early_stop_patience')} evaluations every {train.get('eval_every')} steps).",
        f"- Trained {training['steps']} steps ({training['wall_time_s'] / 60:.0f} min in its "
        f"last run; {_how_it_ended(training)}); this checkpoint is step {step_dir.name}, "
        f"validation {training['best_metric']} = {training['best_value']:.3f}.",
        *_init_line(training), "",
        "## The study's results", "",
        "Linearly weighted kappa of the four CAC categories (95% CI) against the reference "
        "categories of the same patients (docs/study.md): each scan against its own truth, and "
        "the CTAC predictions against the same patients' gated reference (the paper's design):",
        ""]

    def cell(block: dict) -> str:
        ci = block.get("kappa_linear_ci95") or [None, None]
        return f"{_fmt(block.get('kappa_linear'))} ({_fmt(ci[0])}-{_fmt(ci[1])}), n={block.get('n')}"

    for system, pair in systems.items():
        if name not in pair:
            continue
        lines += [f"System `{system}` ({pair[0]} + {pair[1]}):", "",
                  "| patients | gated CAC | CTAC (own truth) | CTAC against gated | "
                  "naive 130 HU (CAC / CTAC) |",
                  "| --- | --- | --- | --- | --- |"]
        for cohort in COHORTS:
            row, naive = summary[cohort][system], summary[cohort]["naive"]
            paper = (summary[cohort].get("ctac_vs_gated") or {}).get(system)
            label = "held-out, training sites" if cohort == "test" else \
                f"unseen site {config.unseen_site}"
            lines.append(f"| {label} | {cell(row['cac'])} | {cell(row['ctac'])} | "
                         f"{cell(paper) if paper else 'n/a'} | "
                         f"{_fmt(naive['cac']['kappa_linear'])} / "
                         f"{_fmt(naive['ctac']['kappa_linear'])} |")
        lines.append("")
    lines += ["These patients come from the generator the models were trained on. On another "
              "generator's scans they score lower: docs/study.md, \"Another generator's scans: "
              "the foreign probe\".", "",
              "## Use", "",
              "```bash",
              "cac-jax infer --heart-checkpoint models/synthetic/heart_" + arch
              + " --calcium-checkpoint models/synthetic/calcium_" + arch
              + " --input STUDY_DIR --out results",
              "```", ""]
    return "\n".join(lines)


def _how_it_ended(training: dict) -> str:
    if training.get("stopped_early"):
        return "ended by early stopping"
    if training.get("preempted") or training.get("timed_out"):
        return ("stopped before convergence (SIGTERM or a time box; the study's command "
                "continues it)")
    return "its step budget reached"


def _per_anatomy(config) -> str:
    names = anatomies(config)
    return "" if len(names) == 1 else f" in each of the {' and '.join(names)} anatomies"


def _generator_version(config=None):
    """The generator's identity for the model card: GENERATOR_VERSION, or the variant's identity
    (e.g. "2+grooved1", "2+calibrated1") when the study's config names an anatomy variant or a
    CTAC imaging model; several anatomies joined by " and "."""
    from data_pipeline.phantom.cohort import (
        DEFAULT_ANATOMY,
        DEFAULT_CTAC_IMAGING,
        generator_identity,
    )

    names = anatomies(config) if config is not None else (DEFAULT_ANATOMY,)
    ctac = config.get("ctac_imaging", DEFAULT_CTAC_IMAGING) if config is not None else None
    if len(names) == 1:
        return generator_identity(names[0], ctac)
    return " and ".join(str(generator_identity(a, ctac)) for a in names)


def _init_line(training: dict) -> list[str]:
    """The card's line on the model a fine-tuned training started from (`train.init_from`)."""
    start = training.get("initialised_from")
    if not start:
        return []
    given = [o.partition("=")[2] for o in training["overrides"]
             if o.startswith("train.init_from=")]
    return [f"- Fine-tuned: it started from the parameters of `{given[0] if given else start['path']}`"
            f" (that model's step {start['step']}), not from a random initialisation."]


def export_models(out: Path, config, summary: dict, systems) -> dict[str, Path]:
    """Every model of `systems`, without optimizer state, in OUT/reference/NAME with MODEL.md."""
    from cac_jax.checkpoints import export_parameters

    _say("[8/8] reference models (cac-jax export) with their cards")
    names = sorted({n for pair in systems.values() for n in pair})
    folders = {}
    for name in names:
        folder = out / "reference" / name
        step_dir = export_parameters(out / "models" / name, folder, overwrite=True)
        training = json.loads((out / "models" / name / "summary.json").read_text())
        training.update({"config": config.trainings[name].config,
                         "overrides": list(config.trainings[name].overrides)})
        atomic_write_text(folder / "MODEL.md",
                          model_card(name, config, summary, systems, step_dir, training))
        folders[name] = folder
        _say(f"      {name}: {folder}")
    return folders


def _csv(text: str) -> set[str]:
    return {item.strip() for item in text.split(",") if item.strip()}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cac-jax study", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="configs/study.py", metavar="FILE[:ARG]",
                        help="study config (default configs/study.py; ':gpu' for the GPU "
                             "variant, ':local' for a tiny check)")
    parser.add_argument("--out", required=True, metavar="DIR", help="study folder (resumable)")
    parser.add_argument("--only", type=_csv, default=None, metavar="NAMES",
                        help="train and score only these trainings (comma-separated names of "
                             "config.trainings), e.g. heart_convlstm,calcium_convlstm")
    parser.add_argument("--stages", type=_csv, default=set(STAGES), metavar="STAGES",
                        help=f"comma-separated subset of {','.join(STAGES)} (default: all)")


def run_from_args(args) -> int:
    from cac_jax.config_defaults import load_config_file

    unknown = sorted(set(args.stages) - set(STAGES))
    if unknown:
        raise InputError(None, f"unknown stage(s) {', '.join(unknown)}; expected some of "
                               f"{', '.join(STAGES)}")
    path = args.config.rpartition(":")[0] if args.config.count(":") and \
        args.config.rpartition(":")[0].endswith(".py") else args.config
    if not Path(path).is_file():
        raise InputError(path, "no such study config file")
    try:
        config = load_config_file(args.config)
    except ValueError as err:
        raise InputError(path, str(err)) from None
    if args.only is not None:
        unknown = sorted(args.only - set(config.trainings))
        if unknown:
            raise InputError(path, f"--only names no training {', '.join(unknown)}; the config "
                                   f"has {', '.join(config.trainings)}")
    try:
        run(Path(args.out), config, only=args.only,
            stages=[s for s in STAGES if s in args.stages])
    except demo.DemoError as err:
        raise InputError(args.out, str(err)) from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
