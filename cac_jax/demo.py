"""The whole system on synthetic patients: `make demo` (or `python -m cac_jax.demo --out DIR`).

What a person who clones the project sees it do, with no data of their own, each stage through the
same command a user would run (`cac-jax synth | ingest | train | infer | evaluate | bench`):
1. generate a paired cohort (gated CAC + ungated CTAC scans of the same patients, all four CAC
   categories) and a smaller cohort from a second "site" (another acquisition preset, never
   trained on: the paper's external validation);
2. build the TFDS dataset (patient splits 80/10/10, balanced categories in validation and test);
3. train the heart and calcium models of the ConvLSTM-attention network at half the configs' widths
   and of the UNet width-matched to it (UNet-64 does not fit the time on 2 CPU cores: its
   training step is ~10x the ConvLSTM's);
4. score the held-out test patients and the second site with `cac-jax infer` (previews on), and
   with the naive 130 HU threshold inside the true heart (`cac_jax.baselines`) for contrast;
5. measure agreement with the truth as the paper does (`cac-jax evaluate`: linearly weighted
   kappa with CI, concordance matrices, ConvLSTM vs UNet z-test; gated and CTAC; test and site 2);
6. a short timing study (`cac-jax bench`);
7. write DIR/report.md (tables, figures, sizes and times, a plain verdict), the same as one
   self-contained page DIR/report.html, and DIR/summary.json.

A second run reuses every stage whose settings did not change (each stage stamps its settings).
`--quick` runs the same path at a smaller size in a few minutes.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from cac_jax.stages import (  # noqa: F401  (re-exported: the study and the tests use them)
    IMPLEMENTATION_KEYS,
    _comparable,
    _config_defaults,
    _config_path,
    _evaluation,
    _say,
    _stage,
    _Stamps,
)
from data_pipeline.atomic import atomic_write_text
from data_pipeline.errors import InputError

MODELS = ("convlstm", "unet")
PROTOCOLS = ("cac", "ctac")
# Models need sides divisible by 16 (four 2x downsamplings).
MODEL_SIZE_MULTIPLE = 16
# Fewest patients: 80/10/10 by patient needs one each in validation and test, two to train on.
MIN_PATIENTS = 4
# (task, architecture) -> config file: the ConvLSTM-attention network at half the paper-scale
# widths and the UNet width-matched to it, which fit the demo's time boxes on a 2-core CPU
# (docs/demo_results.md).
TRAINED = {
    ("heart", "convlstm"): "configs/demo_convlstm_heart.py",
    ("calcium", "convlstm"): "configs/demo_convlstm_calcium.py",
    ("heart", "unet"): "configs/demo_unet_heart.py",
    ("calcium", "unet"): "configs/demo_unet_calcium.py",
}


# The study's reference models: the ConvLSTM heart and calcium models trained to convergence on the
# study's multi-site cohort (docs/study.md). Present in a source checkout, not in the wheel.
REFERENCE_DIR = Path(__file__).resolve().parents[1] / "models" / "synthetic"
REFERENCE_MODELS = ("heart_convlstm", "calcium_convlstm")

# The demo trains with the configs' own recipe (docs/training_notes.md: candidate-weighted focal
# loss, half-size crops centred near coronary calcium for the calcium model, whole slices for the
# heart); the calcium crops (image_size / 2) cost a quarter of a whole slice, so its batch is
# larger.


class DemoError(RuntimeError):
    """A stage failed; the message names the stage and the command."""


@dataclasses.dataclass(frozen=True)
class DemoSettings:
    """Sizes of one demo run. `full()` and `quick()` are the two presets."""

    patients: int = 64
    site2_patients: int = 8
    size: int = 128
    seed: int = 0
    heart_steps: int = 2000
    calcium_steps: int = 4000
    # Heart: whole slices, batch 4 (as good per step as 8 at 128 px and twice the steps);
    # calcium: half-size crops, a quarter of a slice's cost each.
    batch_size: int = 4
    calcium_batch_size: int = 16
    # Validation costs about as much as 25 training steps at 128 px; the time-boxed demo runs
    # validate at this interval (and at the end, where the best checkpoint is chosen).
    eval_every: int = 1000
    bench_samples: int = 6
    bench_size: int = 128
    site2: str = "site2"
    workers: int = 2  # processes of `cac-jax synth` and `cac-jax ingest`
    # Training time boxes (seconds of training per model; 0: none): the demo must fit its budget
    # on a 2-core CPU whatever the machine's speed, so steps are an upper bound.
    heart_seconds: float = 60.0
    calcium_seconds: float = 120.0
    # The learning rate falls linearly to 0 over this last fraction of each time box
    # (`train.anneal_fraction`): fewer false coronary voxels at the end of a short run
    # (docs/training_notes.md).
    anneal_fraction: float = 0.5
    # Where the calcium models see the scan (docs/heart_frame.md): "slice" (whole slices, the
    # paper's set-up: the demo's default) or "heart" (a window around the heart resampled to
    # `frame_spacing_mm`, `frame_size` px, trained on half-size crops: the same pixels per sample
    # as the slice crops at the default sizes, so the same steps fit in the time box).
    calcium_frame: str = "slice"
    frame_spacing_mm: float = 1.5
    frame_size: int = 128
    # The configs' tiny `:local` widths (tests); the demo itself trains the full models.
    local_models: bool = False
    # `--quick`: a check of the path, not of the models (the report says so).
    smoke: bool = False
    # `cac-jax train` processes run at once. 1 gives each model every core (the full demo: its
    # models are judged); 2 overlaps one process's start-up (imports, model init, compilation:
    # ~20 s each on 2 cores) with another's work (--quick: a smoke run).
    train_jobs: int = 1
    # `cac-jax infer` processes run at once (the ConvLSTM's, the UNet's and the reference models'
    # runs): what a model outputs does not depend on how the cores are shared, and one process's
    # reading, post-processing and previews (one core) overlap another's models.
    infer_jobs: int = 2
    # `cac-jax evaluate` processes run at once (each is mostly start-up; output is per folder).
    eval_jobs: int = 2
    # `cac-jax infer --min-heart-ml` (None: the tool's default). A study whose predicted heart is
    # smaller is an error row; the smoke run's seconds-trained heart models find small hearts, so
    # `--quick` (a check of the path) scores every heart that is not empty.
    min_heart_ml: float | None = None
    # Also score the demo's patients with the study's reference models (models/synthetic/ of a
    # source checkout, docs/study.md), so the report compares the demo's minutes of training with
    # the study's training to convergence. Skipped where the folder is absent (an installed wheel).
    reference_models: bool = True

    @classmethod
    def full(cls, **overrides) -> DemoSettings:
        return dataclasses.replace(cls(), **overrides)

    @classmethod
    def quick(cls, **overrides) -> DemoSettings:
        return dataclasses.replace(
            cls(patients=20, site2_patients=4, size=64, heart_steps=400, calcium_steps=800,
                batch_size=4, calcium_batch_size=16, eval_every=1000, bench_samples=3,
                bench_size=64, heart_seconds=10.0, calcium_seconds=20.0, train_jobs=2,
                smoke=True, min_heart_ml=0.0, reference_models=False),
            **overrides)

    @property
    def image_size(self) -> int:
        return -(-self.size // MODEL_SIZE_MULTIPLE) * MODEL_SIZE_MULTIPLE


def _cli(*args: str, stage: str) -> None:
    """Runs `cac-jax ARGS` as a user would (same interpreter); its output goes to ours."""
    command = [sys.executable, "-m", "cac_jax.cli", *args]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL=os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"))
    proc = subprocess.run(command, env=env, check=False)
    if proc.returncode != 0:
        raise DemoError(f"stage {stage!r} failed (exit {proc.returncode}): "
                        f"cac-jax {' '.join(args)}")


def _run_all(tasks: Sequence[Callable[[], object]], jobs: int) -> list:
    """Runs the independent `tasks` (`jobs` at a time, in order); returns their values. One at a
    time, the first failure stops the rest; with jobs > 1 every task runs (the others are already
    under way), then the first failure in task order is raised."""
    if jobs <= 1:
        return [task() for task in tasks]
    pool = ThreadPoolExecutor(max_workers=jobs)
    try:
        futures = [pool.submit(task) for task in tasks]
        errors = [f.exception() for f in futures]
    except BaseException:
        # Ctrl-C: start nothing more (the running children got the signal too).
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    errors = [e for e in errors if e is not None]
    for later in errors[1:]:
        _say(f"      also failed: {later}")
    if errors:
        raise errors[0]
    return [f.result() for f in futures]


# ---------------------------------------------------------------------------------------------
# Stages


def make_cohorts(out: Path, s: DemoSettings, stamps: _Stamps) -> None:
    cohort, site2 = out / "cohort", out / "site2"

    def synth(folder: Path, patients: int, seed: int, site: str | None) -> None:
        if folder.exists():
            shutil.rmtree(folder)  # stale (its stamp differs): only demo-made folders get here
        args = ["synth", "--out", str(folder), "--patients", str(patients), "--size", str(s.size),
                "--seed", str(seed), "--preview", "--workers", str(s.workers)]
        if site:
            args += ["--site", site]
        _cli(*args, stage="synth")

    _say(f"[1/7] synthetic cohort: {s.patients} patients at {s.size} px (gated CAC + CTAC), "
         f"and {s.site2_patients} patients from a second site ({s.site2!r})")
    from data_pipeline.phantom.cohort import GENERATOR_VERSION

    # The two cohorts are independent: made at once where processes may overlap (`train_jobs`).
    _run_all([
        lambda: _stage(stamps, "cohort", {"patients": s.patients, "size": s.size, "seed": s.seed,
                                          "generator": GENERATOR_VERSION},
                       [cohort / "manifest.csv"], lambda: synth(cohort, s.patients, s.seed, None)),
        # Another seed: other patients than the training cohort's, imaged by the other site's
        # preset.
        lambda: _stage(stamps, "site2", {"patients": s.site2_patients, "size": s.size,
                                         "seed": s.seed + 1000, "site": s.site2,
                                         "generator": GENERATOR_VERSION},
                       [site2 / "manifest.csv"],
                       lambda: synth(site2, s.site2_patients, s.seed + 1000, s.site2)),
    ], s.train_jobs)


def build_dataset(out: Path, s: DemoSettings, stamps: _Stamps) -> None:
    _say("[2/7] TFDS dataset from the cohort's manifest (patient splits 80/10/10)")
    data_dir = out / "tfds"
    built = sorted((data_dir / "cac_ct").glob("*/dataset_info.json"))
    _stage(stamps, "ingest", {"cohort": json.loads((out / ".stamps/cohort.json").read_text())},
           built[-1:] or [data_dir / "cac_ct" / "dataset_info.json"],
           lambda: _cli("ingest", "--manifest", str(out / "cohort" / "manifest.csv"),
                        "--data-dir", str(data_dir), "--seed", str(s.seed), "--overwrite",
                        "--workers", str(s.workers), stage="ingest"))


def train_overrides(data_dir: Path, s: DemoSettings, task: str) -> dict:
    """The `cac-jax train --config.KEY=VALUE` settings of the demo's `task` ("heart" or
    "calcium") model on the dataset in `data_dir` (also used by benchmarks/bench_train_throughput.py)."""
    heart = task == "heart"
    return {"data.data_dir": str(data_dir), "data.name": "cac_ct",
            "data.image_size": s.image_size,
            "train.steps": s.heart_steps if heart else s.calcium_steps,
            "train.batch_size": s.batch_size if heart else s.calcium_batch_size,
            "train.eval_every": s.eval_every,
            "train.checkpoint_every": s.eval_every, "train.log_every": 10,
            "train.max_seconds": s.heart_seconds if heart else s.calcium_seconds,
            "train.anneal_fraction": s.anneal_fraction, "seed": s.seed,
            **({} if heart or s.calcium_frame == "slice" else {
                "data.calcium_frame": "heart", "data.frame_spacing_mm": s.frame_spacing_mm,
                "data.frame_size": s.frame_size, "data.crop_size": s.frame_size // 2,
                "data.frame_jitter_mm": 10.0})}


def train_models(out: Path, s: DemoSettings, stamps: _Stamps) -> None:
    _say(f"[3/7] training heart and calcium models, ConvLSTM-attention (half width) and "
         f"width-matched UNet "
         f"(time boxes {s.heart_seconds:.0f} s heart / {s.calcium_seconds:.0f} s calcium, batch "
         f"{s.batch_size} whole slices / {s.calcium_batch_size} half-size crops "
         f"{'of whole slices' if s.calcium_frame == 'slice' else 'of the heart window'}, "
         f"{s.image_size} px)")
    tasks = []
    for (task, arch), config in TRAINED.items():
        workdir = out / "models" / f"{task}_{arch}"
        overrides = train_overrides(out / "tfds", s, task)
        if s.local_models:
            config = f"{config}:local"
        wanted = {"config": config, "overrides": overrides, "defaults": _config_defaults(config),
                  "dataset": json.loads((out / ".stamps/ingest.json").read_text())}
        args = ["train", "--config", _config_path(config), "--workdir", str(workdir)]
        args += [f"--config.{key}={value}" for key, value in overrides.items()]
        if s.train_jobs > 1:
            args.append("--config.train.progress=False")  # two progress bars would interleave

        def run(workdir=workdir, args=args, task=task, arch=arch):
            if workdir.exists():
                shutil.rmtree(workdir)  # trained with other settings: start again
            _say(f"      {task} model, {arch}:")
            _cli(*args, stage=f"train {task}_{arch}")

        # Each run's own wall time is in its workdir's summary.json.
        tasks.append(lambda name=f"train_{task}_{arch}", wanted=wanted, workdir=workdir, run=run:
                     _stage(stamps, name, wanted, [workdir / "summary.json"], run))
    _run_all(tasks, s.train_jobs)


def _test_manifest(out: Path) -> Path:
    """The cohort's held-out test patients as a manifest of their own (from the dataset's audit)."""
    from data_pipeline.manifest import read_manifest, write_manifest

    audits = sorted((out / "tfds").rglob("splits.csv"))
    if not audits:
        raise DemoError(f"no splits.csv under {out / 'tfds'}: the dataset audit is missing")
    with audits[0].open(newline="") as handle:
        test_ids = {r["scan_id"] for r in csv.DictReader(handle) if r["split"] == "test"}
    rows = [r for r in read_manifest(out / "cohort" / "manifest.csv") if r.scan_id in test_ids]
    if not rows:
        raise DemoError(f"the test split in {audits[0]} is empty")
    path = out / "eval" / "test_manifest.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_manifest(path, [dataclasses.replace(r, split="test") for r in rows])
    return path


def naive_results(manifest: Path, out_csv: Path) -> None:
    """The naive threshold scorer (HU >= 130 inside the TRUE heart mask) as a results.csv."""
    from cac_jax.baselines import threshold_score
    from cac_jax.results import number, write_results
    from cac_jax.scoring import CATEGORY_NAMES
    from data_pipeline.io import read_labels, read_study
    from data_pipeline.manifest import read_manifest

    lines = []
    for row in read_manifest(manifest):
        t0 = time.perf_counter()
        record = dict(scan_id=row.scan_id, image=str(row.image), protocol=row.protocol,
                      heart_model="true heart mask", calcium_model="naive 130 HU threshold")
        try:
            volume = read_study(row.image)
            heart = read_labels(row.heart_mask, like=volume)
            result = threshold_score(volume.hu, heart, volume.spacing_zyx_mm)
            record.update(status="ok", agatston=number(result.agatston),
                          volume_mm3=number(result.volume_mm3), category=result.category,
                          category_name=CATEGORY_NAMES[result.category],
                          n_lesions=len(result.lesions),
                          heart_volume_ml=number(heart.astype(bool).sum() * _voxel_ml(volume)))
        except (InputError, ValueError) as err:
            record.update(status="error", error=str(err).splitlines()[0])
        record["seconds"] = f"{time.perf_counter() - t0:.3f}"
        lines.append(record)
    write_results(out_csv, lines)


def _voxel_ml(volume) -> float:
    z, y, x = volume.spacing_zyx_mm
    return z * y * x / 1000.0


def _combined_manifest(out: Path, manifests: dict[str, Path]) -> Path:
    """One manifest of every cohort's rows (image paths made absolute); scan ids must differ."""
    from data_pipeline.manifest import read_manifest, write_manifest

    rows, seen = [], set()
    for manifest in manifests.values():
        for row in read_manifest(manifest):
            if row.scan_id in seen:
                raise DemoError(f"scan_id {row.scan_id!r} occurs in two cohorts")
            seen.add(row.scan_id)
            rows.append(row)
    path = out / "infer" / "manifest.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_manifest(path, rows)
    return path


def split_results(results: Path, cohorts: dict[str, tuple[Path, Path]]) -> None:
    """Writes each cohort's rows of an `infer` results.csv (by its manifest's scan ids) to the
    cohort's own results.csv (cohorts: name -> (manifest, output path))."""
    from cac_jax.results import read_results, write_results
    from data_pipeline.manifest import read_manifest

    rows, _ = read_results(results)
    for manifest, target in cohorts.values():
        ids = {r.scan_id for r in read_manifest(manifest)}
        mine = [r for r in rows.values() if r["scan_id"] in ids]
        if len(mine) != len(ids):
            raise DemoError(f"{results} has {len(mine)} of the {len(ids)} studies of {manifest}")
        write_results(target, mine)


def score_cohorts(out: Path, s: DemoSettings, stamps: _Stamps,
                  reference: bool = False) -> dict[str, Path]:
    _say("[4/7] scoring the held-out test patients and the second site (cac-jax infer), and the "
         "naive threshold for contrast")
    quiet = ["--no-progress"] if s.infer_jobs > 1 else []  # progress bars would interleave
    manifests = {"test": _test_manifest(out), "site2": out / "site2" / "manifest.csv"}
    trained = {k: json.loads((out / f".stamps/train_{k}.json").read_text())
               for k in ("heart_convlstm", "calcium_convlstm", "heart_unet", "calcium_unet")}
    # One `infer` run per architecture over both cohorts (one start-up and compilation each),
    # then its results.csv split per cohort for the evaluation.
    combined = _combined_manifest(out, manifests)
    tasks = []
    for arch in MODELS:
        folder = out / "infer" / arch
        wanted = {"manifest": {k: str(v) for k, v in manifests.items()},
                  "heart": trained[f"heart_{arch}"], "calcium": trained[f"calcium_{arch}"],
                  "min_heart_ml": s.min_heart_ml}
        outputs = [out / "infer" / f"{cohort}_{arch}" / "results.csv" for cohort in manifests]

        def run_infer(folder=folder, arch=arch):
            _cli("infer", "--heart-checkpoint", str(out / "models" / f"heart_{arch}"),
                 "--calcium-checkpoint", str(out / "models" / f"calcium_{arch}"),
                 "--manifest", str(combined), "--out", str(folder), "--save-previews",
                 "--report", "--overwrite", *quiet,
                 *([] if s.min_heart_ml is None else ["--min-heart-ml", str(s.min_heart_ml)]),
                 stage=f"infer {arch}")
            split_results(folder / "results.csv", {
                cohort: (manifest, out / "infer" / f"{cohort}_{arch}" / "results.csv")
                for cohort, manifest in manifests.items()})

        tasks.append(lambda arch=arch, wanted=wanted, outputs=outputs, run_infer=run_infer:
                     _stage(stamps, f"infer_{arch}", wanted, outputs, run_infer))
    if reference:
        tasks.append(lambda: score_reference(out, s, stamps, manifests, quiet))
    _run_all(tasks, s.infer_jobs)
    for cohort, manifest in manifests.items():
        naive = out / "infer" / f"{cohort}_naive" / "results.csv"
        _stage(stamps, f"naive_{cohort}", {"manifest": str(manifest)}, [naive],
               lambda manifest=manifest, naive=naive: naive_results(manifest, naive))
    return manifests


def reference_available(s: DemoSettings) -> bool:
    return s.reference_models and all((REFERENCE_DIR / name / "config.json").is_file()
                                      for name in REFERENCE_MODELS)


def score_reference(out: Path, s: DemoSettings, stamps: _Stamps,
                    manifests: dict[str, Path], quiet: Sequence[str] = ()) -> None:
    """The same patients scored with the study's reference ConvLSTM models (`reference`)."""
    _say(f"      the study's reference models ({REFERENCE_DIR}) on the same patients")
    heart, calcium = (REFERENCE_DIR / name for name in REFERENCE_MODELS)
    folder = out / "infer" / "reference"
    wanted = {"manifest": {k: str(v) for k, v in manifests.items()},
              "models": {name: json.loads((REFERENCE_DIR / name / "config.json").read_text())
                         for name in REFERENCE_MODELS},
              "steps": sorted(p.name for name in REFERENCE_MODELS
                              for p in (REFERENCE_DIR / name / "checkpoints").iterdir()),
              "min_heart_ml": s.min_heart_ml}
    outputs = [out / "infer" / f"{cohort}_reference" / "results.csv" for cohort in manifests]

    def run_infer():
        _cli("infer", "--heart-checkpoint", str(heart), "--calcium-checkpoint", str(calcium),
             "--manifest", str(_combined_manifest(out, manifests)), "--out", str(folder),
             "--overwrite", *quiet,
             *([] if s.min_heart_ml is None else ["--min-heart-ml", str(s.min_heart_ml)]),
             stage="infer reference")
        split_results(folder / "results.csv", {
            cohort: (manifest, out / "infer" / f"{cohort}_reference" / "results.csv")
            for cohort, manifest in manifests.items()})

    _stage(stamps, "infer_reference", wanted, outputs, run_infer)


def evaluate(out: Path, manifests: dict[str, Path], jobs: int = 1,
             reference: bool = False, stamps: _Stamps | None = None) -> dict:
    """Runs `cac-jax evaluate` per cohort and model; with `stamps`, an evaluation whose input
    files (predictions and truth, by content) and arguments are unchanged is reused."""
    _say("[5/7] agreement with the truth (cac-jax evaluate): kappa, concordance, z-test")
    runs = {}  # metrics key -> (output folder, evaluate arguments)
    for cohort, manifest in manifests.items():
        ref = ["--ref", str(manifest), "--by", "protocol"]
        for model in (*MODELS, "naive", *(("reference",) if reference else ())):
            pred = out / "infer" / f"{cohort}_{model}" / "results.csv"
            runs[(cohort, model)] = (f"{cohort}_{model}", ["--pred", str(pred), *ref])
        convlstm, unet = (str(out / "infer" / f"{cohort}_{m}" / "results.csv") for m in MODELS)
        runs[(cohort, "comparison")] = (f"{cohort}_convlstm_vs_unet",
                                        ["--pred", convlstm, "--pred2", unet, *ref])
        # The paper's CTAC design: CTAC predictions against the same patients' gated reference.
        runs[(cohort, "ctac_vs_gated")] = (f"{cohort}_ctac_vs_gated",
                                           ["--pred", convlstm, "--pred2", unet, *ref,
                                            "--ref-protocol", "cac"])

    def one(key):
        folder, args = runs[key]
        target = out / "eval" / folder
        return _evaluation(
            stamps, f"evaluate_{folder}", args, target,
            lambda: _cli("evaluate", *args, "--out", str(target), "--report",
                         stage=f"evaluate {folder}"), report=True)

    keys = list(runs)
    values = _run_all([lambda key=key: one(key) for key in keys], jobs)
    return dict(zip(keys, values, strict=True))


def bench(out: Path, s: DemoSettings, stamps: _Stamps) -> Path:
    _say(f"[6/7] timing study (cac-jax bench: {s.bench_samples} samples of 16 slices at "
         f"{s.bench_size} px per model)")
    folder = out / "bench"
    wanted = {"samples": s.bench_samples, "size": s.bench_size, "local": s.local_models}
    args = ["bench", "--models", "convlstm,unet_matched", "--samples", str(s.bench_samples),
            "--slices", "16", "--size", str(s.bench_size), "--out", str(folder)]
    if s.local_models:
        args.append("--local")
    _stage(stamps, "bench", wanted, [folder / "bench.json"], lambda: _cli(*args, stage="bench"))
    return folder


# ---------------------------------------------------------------------------------------------
# Report


def _protocol_metrics(metrics: dict, protocol: str) -> dict:
    return (metrics.get("by_protocol") or {}).get(protocol) or {}


def _fmt(value, pattern="{:.3f}") -> str:
    return "n/a" if value is None else pattern.format(value)


def summarise(metrics: dict) -> dict:
    """summary.json's `test` and `site2` blocks (a contract): model -> protocol -> kappa, exact."""
    summary = {}
    for cohort in ("test", "site2"):
        block = {}
        for model in (*MODELS, "naive", "reference"):
            if (cohort, model) not in metrics:
                continue  # no reference models in this checkout
            block[model] = {}
            for protocol in PROTOCOLS:
                m = _protocol_metrics(metrics[(cohort, model)], protocol)
                block[model][protocol] = {"kappa_linear": m.get("kappa_linear"),
                                          "kappa_linear_ci95": m.get("kappa_linear_ci95"),
                                          "exact_agreement": m.get("exact_agreement"),
                                          "n": m.get("n")}
        summary[cohort] = block
    return summary


def _beats(model: dict, naive: dict) -> bool:
    """Strictly better kappa and exact agreement than the naive threshold."""
    keys = ("kappa_linear", "exact_agreement")
    if any(model.get(k) is None for k in keys):
        return False
    return all(model[k] > (naive.get(k) if naive.get(k) is not None else -1.0) for k in keys)


def training_curves(out: Path) -> Path | None:
    """Training loss and validation kappa against step for the four models (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    drawn = False
    for (task, arch) in TRAINED:
        path = out / "models" / f"{task}_{arch}" / "metrics.jsonl"
        if not path.exists():
            continue
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        train = [(r["step"], r["loss"]) for r in rows if r.get("loss") is not None]
        val = [(r["step"], r["val_kappa"]) for r in rows if r.get("val_kappa") is not None]
        if train:
            axes[0].plot(*zip(*train, strict=True), label=f"{task} {arch}")
            drawn = True
        if val:
            axes[1].plot(*zip(*val, strict=True), marker="o", label=f"{task} {arch}")
    if not drawn:
        plt.close(fig)
        return None
    axes[0].set(xlabel="step", ylabel="training focal loss", yscale="log",
                title="Training loss")
    axes[1].set(xlabel="step", ylabel="validation kappa (linear)", title="Validation kappa")
    for ax in axes:
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    target = out / "figures" / "training_curves.png"
    target.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(target, dpi=110)
    plt.close(fig)
    return target


def _rel(path: Path, out: Path) -> str:
    return os.path.relpath(path, out)


def _test_previews(out: Path) -> list[Path]:
    """The ConvLSTM's preview PNGs of the held-out test studies."""
    path = out / "infer" / "test_convlstm" / "results.csv"
    if not path.exists():
        return []
    with path.open(newline="") as handle:
        ids = {r["scan_id"] for r in csv.DictReader(handle)}
    from cac_jax.inference import safe_name

    return [p for p in sorted((out / "infer" / "convlstm").glob("*.png"))
            if p.stem in {safe_name(i) for i in ids}]


def write_report(out: Path, s: DemoSettings, metrics: dict, summary: dict, seconds: dict,
                 bench_dir: Path) -> Path:
    lines = ["# cac-jax demo report", "",
             f"Synthetic cohort: {s.patients} patients at {s.size} px (gated CAC and ungated CTAC "
             f"scans of each), seed {s.seed}; second site ({s.site2!r} acquisition preset, never "
             f"trained on): {s.site2_patients} patients. Models trained at {s.image_size} px, "
             f"time-boxed: heart {s.heart_seconds:.0f} s (batch {s.batch_size}, whole slices), "
             f"calcium {s.calcium_seconds:.0f} s (batch {s.calcium_batch_size}, "
             + (f"{s.image_size // 2} px crops of whole slices" if s.calcium_frame == "slice"
                else f"{s.frame_size // 2} px crops of a {s.frame_size} px window around the "
                f"heart at {s.frame_spacing_mm:g} mm")
             + "); steps reached are under Training. "
             + (f"{s.train_jobs} models trained at a time (sharing the cores: fewer steps "
                "each). " if s.train_jobs > 1 else "")
             + ("The ConvLSTM runs at half the configs' widths (a quarter of the FLOPs) and the "
                "UNet is width-matched to it (base 12, the same parameter count). "
                if not s.local_models else "Both models at the configs' tiny `:local` widths. ")
             + "The naive baseline counts every voxel >= 130 HU inside the *true* heart "
             "mask as coronary (a generous baseline: it is handed the heart).", ""]
    test, naive = summary["test"]["convlstm"], summary["test"]["naive"]
    verdict = [p for p in PROTOCOLS if _beats(test[p], naive[p])]
    if len(verdict) == len(PROTOCOLS):
        lines += ["**Verdict:** on the held-out test patients the trained ConvLSTM beats the "
                  "naive threshold on both protocols (higher linearly weighted kappa and exact "
                  "agreement).", ""]
    else:
        missing = ", ".join(p.upper() for p in PROTOCOLS if p not in verdict)
        lines += [f"**Verdict:** the trained ConvLSTM does NOT beat the naive threshold on the "
                  f"held-out test patients for {missing} in this run (see the tables)."
                  + (" This was a smoke run (`--quick`: seconds of training at "
                     f"{s.image_size} px, {s.patients} patients): it checks the path, not the "
                     "models; the full demo trains for minutes at 128 px." if s.smoke else ""),
                  ""]
    for cohort, title in (("test", "Held-out test patients"), ("site2", "Second site")):
        lines += [f"## {title}", "",
                  "| model | protocol | n | kappa (linear) | 95% CI | exact agreement |",
                  "|---|---|---|---|---|---|"]
        for model in (*MODELS, "naive", "reference"):
            if model not in summary[cohort]:
                continue
            for protocol in PROTOCOLS:
                m = summary[cohort][model][protocol]
                ci = m.get("kappa_linear_ci95")
                ci_text = "n/a" if not ci or None in ci else f"{ci[0]:.2f} to {ci[1]:.2f}"
                lines.append(f"| {model} | {protocol.upper()} | {_fmt(m['n'], '{}')} | "
                             f"{_fmt(m['kappa_linear'])} | {ci_text} | "
                             f"{_fmt(m['exact_agreement'], '{:.0%}')} |")
        if "reference" in summary[cohort]:
            lines += ["", "`reference`: the study's ConvLSTM models (`models/synthetic/`, trained "
                      "for hours on the study's multi-site cohort at 256 px, the calcium model "
                      "on both of its anatomies; docs/study.md) on the same patients, beside the demo's models trained "
                      "for minutes: "
                      + "; ".join(f"{p.upper()} kappa "
                                  f"{_fmt(summary[cohort]['reference'][p]['kappa_linear'])} "
                                  f"(demo ConvLSTM "
                                  f"{_fmt(summary[cohort]['convlstm'][p]['kappa_linear'])})"
                                  for p in PROTOCOLS) + "."]
        comparison = metrics[(cohort, "comparison")]
        lines += ["", "ConvLSTM vs UNet, z-test for the difference of kappas: "
                  + ", ".join(f"{p.upper()} p = {_fmt(_protocol_metrics(comparison, p).get('z_test_p'))}"
                              for p in PROTOCOLS), ""]
        gated = metrics[(cohort, "ctac_vs_gated")]
        ctac = _protocol_metrics(gated, "ctac") or gated
        lines += [f"CTAC predictions against the same patients' gated reference (the paper's "
                  f"design): ConvLSTM kappa {_fmt(ctac.get('kappa_linear'))}, UNet "
                  f"{_fmt(ctac.get('kappa_linear_2'))}.", ""]
        for model in MODELS:
            for png in sorted((out / "eval" / f"{cohort}_{model}").glob("*.png")):
                if "concordance" in png.name:
                    lines.append(f"![{cohort} {model} {png.stem}]({_rel(png, out)})")
        lines.append("")
        lines.append(f"Full reports: `eval/{cohort}_*/report.md`.")
        lines.append("")
    curves = training_curves(out)
    if curves:
        lines += ["## Training", "", f"![training curves]({_rel(curves, out)})", ""]
        for (task, arch) in TRAINED:
            path = out / "models" / f"{task}_{arch}" / "summary.json"
            if path.exists():
                info = json.loads(path.read_text())
                best = info.get("best_value")
                lines.append(
                    f"- {task} {arch}: {info.get('steps')} steps in "
                    f"{_fmt(info.get('wall_time_s'), '{:.0f}')} s; best {info.get('best_metric')} "
                    f"{_fmt(best)} at step {info.get('best_step')}"
                    + (" (stopped early)" if info.get("stopped_early") else ""))
        lines.append("")
    previews = _test_previews(out)
    if previews:
        lines += ["## A scored study", "", f"![preview]({_rel(previews[0], out)})", ""]
    bench_json = bench_dir / "bench.json"
    if bench_json.exists():
        lines += ["## Timing study", ""]
        results = json.loads(bench_json.read_text()).get("results", {}).get("jax", {})
        lines += ["| model | median s per 16-slice sample | IQR s | n |", "|---|---|---|---|"]
        for model, r in results.items():
            lines.append(f"| {model} | {_fmt(r.get('median_s'))} | {_fmt(r.get('iqr_s'))} | "
                         f"{r.get('n')} |")
        for png in sorted(bench_dir.glob("*.png")):
            lines.append(f"\n![timing]({_rel(png, out)})")
        lines.append("")
    lines += ["## Stages and times", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.0f} |" for k, v in seconds.items()]
    lines += ["", "Synthetic patients are not clinical validation: these numbers show the system "
              "works end to end, not how it performs on patients.", ""]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines))
    from cac_jax.html_report import write_markdown_report

    # The same report as one self-contained page (figures embedded; docs/clinical.md).
    return write_markdown_report(path, out / "report.html", "cac-jax demo report")


def run(out: Path, s: DemoSettings) -> dict:
    """Runs every stage into `out`; returns summary.json's content."""
    out.mkdir(parents=True, exist_ok=True)
    stamps = _Stamps(out)
    seconds: dict[str, float] = {}

    def timed(name, fn, *args):
        t0 = time.perf_counter()
        value = fn(*args)
        seconds[name] = time.perf_counter() - t0
        return value

    timed("synth", make_cohorts, out, s, stamps)
    timed("ingest", build_dataset, out, s, stamps)
    timed("train", train_models, out, s, stamps)
    # The reference models' scoring (where they are present) runs beside the demo's own.
    reference = reference_available(s)
    manifests = timed("infer", score_cohorts, out, s, stamps, reference)
    metrics = timed("evaluate", evaluate, out, manifests, s.eval_jobs, reference, stamps)
    bench_dir = timed("bench", bench, out, s, stamps)
    _say("[7/7] report")
    summary = summarise(metrics)
    seconds["total"] = sum(seconds.values())
    summary["seconds"] = seconds
    summary["settings"] = dataclasses.asdict(s)
    report = write_report(out, s, metrics, summary, seconds, bench_dir)
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    for cohort in ("test", "site2"):
        for model in summary[cohort]:
            cells = ", ".join(
                f"{p.upper()} kappa {_fmt(summary[cohort][model][p]['kappa_linear'])}"
                for p in PROTOCOLS)
            _say(f"      {cohort:5s} {model:8s} {cells}")
    _say(f"report: {report}")
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cac_jax.demo",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")
    parser.add_argument("--quick", action="store_true",
                        help="smaller cohort, size and step counts (a few minutes)")
    parser.add_argument("--patients", type=int, help="synthetic training-site patients")
    parser.add_argument("--site2-patients", type=int, help="second-site patients")
    parser.add_argument("--size", type=int, help="in-plane matrix size of the cohorts")
    parser.add_argument("--heart-steps", type=int, help="training steps of the heart models")
    parser.add_argument("--calcium-steps", type=int, help="training steps of the calcium models")
    parser.add_argument("--seed", type=int, help="cohort, split and training seed")
    parser.add_argument("--workers", type=int, help="processes for the cohort generator and the ingest")
    parser.add_argument("--calcium-frame", choices=("slice", "heart"),
                        help="calcium models on whole slices (default) or on a window around "
                             "the heart (docs/heart_frame.md)")
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in vars(args).items()
                 if k not in ("out", "quick") and v is not None}
    settings = (DemoSettings.quick if args.quick else DemoSettings.full)(**overrides)
    if settings.patients < MIN_PATIENTS:
        parser.error(f"--patients must be >= {MIN_PATIENTS}, got {settings.patients}")
    if settings.site2_patients < 1:
        parser.error("--site2-patients must be >= 1")
    try:
        run(Path(args.out), settings)
    except (DemoError, InputError) as err:
        print(f"demo: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
