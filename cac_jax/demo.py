"""End-to-end demo on a synthetic cohort: `make demo` (or `python -m cac_jax.demo --out DIR`).

Runs every stage that exists so far, from nothing to a report a person can check:
1. generates a paired synthetic cohort (gated CAC + ungated CTAC per patient) as real DICOM with
   label files, heart masks, previews and a manifest (`cac-jax synth`);
2. scores every scan from its written files with the reference labels (`cac-jax score`), and checks
   the result against the manifest's true score;
3. scores every scan with the naive threshold scorer (HU >= 130 in the heart) and reports its
   agreement with the truth per protocol (linearly weighted kappa, concordance matrix), and the
   agreement of the true CTAC categories with the true CAC categories (the paper's paired design);
4. builds the TFDS dataset from the manifest (`cac-jax ingest`) and draws a training batch and the
   evaluation pass through the tf.data pipeline;
5. runs the (untrained) ConvLSTM-attention calcium model on that batch, to show the model and the
   pipeline fit together.
Writes DIR/summary.json and DIR/summary.md. Rerunning reuses the cohort and dataset when they were
made with the same settings, so a second run is quick. Training and inference join the demo with
their issues.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cac_jax.baselines import threshold_score
from cac_jax.scoring import CATEGORY_NAMES, score_study
from data_pipeline.atomic import atomic_write_text
from data_pipeline.errors import InputError
from data_pipeline.io import read_labels, read_study
from data_pipeline.manifest import ManifestRow, read_manifest
from data_pipeline.phantom.cohort import MIN_SIZE

CATEGORIES = list(range(len(CATEGORY_NAMES)))
MODEL_SIZE_MULTIPLE = 16
# Fewest patients for a demo: 80/10/10 by patient needs one each in validation and test and at
# least two to train on.
MIN_PATIENTS = 4


@dataclasses.dataclass(frozen=True)
class DemoSettings:
    """What the cohort and dataset depend on (a rerun with equal settings reuses them)."""

    patients: int
    size: int
    seed: int


def _say(message: str) -> None:
    print(message, flush=True)


def _agreement(truth: Sequence[int], predicted: Sequence[int]) -> dict:
    """Linearly weighted kappa and concordance matrix (rows: truth, columns: predicted)."""
    from sklearn.metrics import cohen_kappa_score, confusion_matrix

    truth, predicted = list(truth), list(predicted)
    matrix = confusion_matrix(truth, predicted, labels=CATEGORIES)
    # sklearn's kappa is undefined (nan) when both raters use one category only.
    kappa = float(cohen_kappa_score(truth, predicted, labels=CATEGORIES, weights="linear"))
    return {"n": len(truth), "kappa_linear": None if np.isnan(kappa) else kappa,
            "exact_agreement": float(np.mean(np.asarray(truth) == np.asarray(predicted))),
            "concordance": matrix.tolist()}


def make_cohort(out: Path, settings: DemoSettings, workers: int) -> list[ManifestRow]:
    """The demo cohort under out/cohort, regenerated only when the settings changed."""
    from data_pipeline.phantom import generate_cohort

    cohort = out / "cohort"
    stamp = cohort / "demo_settings.json"
    wanted = json.dumps(dataclasses.asdict(settings), sort_keys=True)
    manifest = cohort / "manifest.csv"
    if manifest.exists() and stamp.exists() and stamp.read_text() == wanted:
        _say(f"[1/5] reusing the synthetic cohort in {cohort}")
        return read_manifest(manifest)
    if cohort.exists():
        shutil.rmtree(cohort)
    _say(f"[1/5] generating {settings.patients} synthetic patients at {settings.size} px "
         f"(gated CAC + ungated CTAC) into {cohort}")
    from tqdm import tqdm

    with tqdm(total=settings.patients, unit="patient", file=sys.stdout) as bar:
        generate_cohort(cohort, patients=settings.patients, size=settings.size, seed=settings.seed,
                        preview=True, workers=workers, progress=lambda n: bar.update(n))
    atomic_write_text(stamp, wanted)
    return read_manifest(manifest)


def score_cohort(rows: Sequence[ManifestRow]) -> list[dict]:
    """Per scan: the reference score from the files, and the naive threshold score."""
    from tqdm import tqdm

    results = []
    for row in tqdm(rows, unit="scan", file=sys.stdout):
        reference = score_study(row.image, row.calcium_labels)
        volume = read_study(row.image)
        heart = read_labels(row.heart_mask, like=volume)
        naive = threshold_score(volume.hu, heart, volume.spacing_zyx_mm)
        results.append({
            "scan_id": row.scan_id, "patient_id": row.patient_id, "protocol": row.protocol,
            "manifest_agatston": row.agatston, "manifest_category": row.category,
            "agatston": reference.agatston, "category": reference.category,
            "lesions": len(reference.lesions),
            "naive_agatston": naive.agatston, "naive_category": naive.category,
        })
    return results


def pipeline_check(out: Path, manifest: Path, settings: DemoSettings) -> dict:
    """Builds (or reuses) the TFDS dataset and draws one training batch and the eval pass."""
    from cac_jax.config_defaults import get_base_config
    from data_pipeline import tfds_builder
    from data_pipeline.input_pipeline import make_dataset

    data_dir = out / "tfds"
    stamp = data_dir / "demo_settings.json"
    wanted = json.dumps(dataclasses.asdict(settings), sort_keys=True)
    target = tfds_builder.dataset_dir(data_dir)
    t0 = time.perf_counter()
    if (target / "dataset_info.json").exists() and stamp.exists() and stamp.read_text() == wanted:
        _say(f"[4/5] reusing the TFDS dataset in {target}")
    else:
        _say(f"[4/5] building the TFDS dataset in {target}")
        tfds_builder.build_dataset(manifest, data_dir, overwrite=True, split_seed=settings.seed)
        atomic_write_text(stamp, wanted)
    build_s = time.perf_counter() - t0

    config = get_base_config("calcium", "convlstm")
    config.seed = settings.seed
    config.data.data_dir = str(data_dir)
    # The models need sides divisible by 16 (four 2x downsamplings); evaluation pads each slice
    # into the top-left of this grid and training resamples onto it, so rounding up loses nothing.
    config.data.image_size = -(-settings.size // MODEL_SIZE_MULTIPLE) * MODEL_SIZE_MULTIPLE
    config.data.per_device_batch = 4
    config.data.eval_per_device_batch = 8
    train = make_dataset(config, "train")
    t0 = time.perf_counter()
    batch = next(train)
    first_batch_s = time.perf_counter() - t0
    evaluation = make_dataset(config, "validation")
    eval_batches = sum(1 for _ in evaluation)
    labels = batch["label"]
    return {
        "dataset_dir": str(target), "build_or_reuse_s": build_s,
        "train_scans": len(train.scans), "train_samples_per_epoch": train.samples_per_epoch,
        "validation_scans": len(evaluation.scans), "validation_batches": eval_batches,
        "batch_shapes": {k: list(v.shape) for k, v in batch.items()},
        "batch_label_voxels": {str(c): int(np.sum(labels == c)) for c in range(3)},
        "first_batch_s": first_batch_s,
        "_batch": batch, "_config": config,
    }


def model_check(batch: dict, config) -> dict:
    """Runs the untrained default ConvLSTM calcium model on the batch (shapes, parameters)."""
    import jax
    import jax.numpy as jnp

    from cac_jax.models import build_model, count_params

    model = build_model(config)
    image = jnp.asarray(batch["image"].reshape((-1, *batch["image"].shape[2:])))
    variables = jax.jit(model.init)(jax.random.key(0), image[:1])
    apply = jax.jit(model.apply)
    logits, aux = apply(variables, image)
    t0 = time.perf_counter()
    logits, aux = jax.block_until_ready(apply(variables, image))
    seconds = time.perf_counter() - t0
    attention = np.asarray(aux["attention"])
    return {"params": count_params(variables["params"]), "logits_shape": list(logits.shape),
            "attention_range": [float(attention.min()), float(attention.max())],
            "forward_s_per_slice": seconds / image.shape[0]}


def _markdown(summary: dict) -> str:
    lines = ["# cac-jax demo", "",
             f"Cohort: {summary['settings']['patients']} synthetic patients at "
             f"{summary['settings']['size']} px, seed {summary['settings']['seed']}, "
             f"in `{summary['cohort_dir']}` (previews in `previews/`).", ""]
    lines += ["## Reference scores read back from the written files", "",
              f"Largest difference from the manifest's true score: "
              f"{summary['max_abs_score_difference']:.3g} Agatston units.", ""]
    for protocol, counts in summary["true_category_counts"].items():
        shares = ", ".join(f"{CATEGORY_NAMES[c]}: {n}" for c, n in enumerate(counts))
        lines.append(f"- {protocol.upper()} true categories: {shares}")
    lines += ["", "## Agreement (linearly weighted kappa, categories 0 / 1-100 / 101-400 / >400)",
              "", "| comparison | n | kappa | exact agreement |", "|---|---|---|---|"]
    for name, result in summary["agreement"].items():
        kappa = "n/a" if result["kappa_linear"] is None else f"{result['kappa_linear']:.3f}"
        lines.append(f"| {name} | {result['n']} | {kappa} | {result['exact_agreement']:.0%} |")
    lines += ["", "Concordance matrices (rows: truth, columns: compared):", ""]
    for name, result in summary["agreement"].items():
        lines.append(f"- {name}: `{result['concordance']}`")
    pipeline = summary.get("pipeline")
    if pipeline:
        lines += ["", "## Dataset and input pipeline", "",
                  f"- TFDS dataset: `{pipeline['dataset_dir']}`; train scans "
                  f"{pipeline['train_scans']} ({pipeline['train_samples_per_epoch']} sampled "
                  f"slices per epoch), validation scans {pipeline['validation_scans']} "
                  f"({pipeline['validation_batches']} evaluation batches)",
                  f"- training batch: {pipeline['batch_shapes']}; label voxels per class "
                  f"{pipeline['batch_label_voxels']}"]
    model = summary.get("model")
    if model:
        lines += ["", "## Model (untrained ConvLSTM-attention, calcium task)", "",
                  f"- {model['params']:,} parameters; logits {model['logits_shape']}; attention in "
                  f"[{model['attention_range'][0]:.3f}, {model['attention_range'][1]:.3f}]; "
                  f"{model['forward_s_per_slice'] * 1000:.0f} ms per slice on this CPU"]
    lines += ["", f"Total time: {summary['seconds']:.0f} s.", ""]
    return "\n".join(lines)


def run(out: Path, settings: DemoSettings, *, workers: int = 2, pipeline: bool = True) -> dict:
    """Runs the demo into `out`; returns the summary (also written as summary.json/.md)."""
    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    rows = make_cohort(out, settings, workers)
    _say(f"[2/5] scoring {len(rows)} scans from their files (reference labels and naive "
         "threshold)")
    scans = score_cohort(rows)
    max_diff = max(abs(s["agatston"] - (s["manifest_agatston"] or 0.0)) for s in scans)

    _say("[3/5] agreement statistics")
    by_protocol = {p: [s for s in scans if s["protocol"] == p] for p in ("cac", "ctac")}
    agreement = {}
    for protocol, items in by_protocol.items():
        if items:
            agreement[f"naive threshold vs truth, {protocol.upper()}"] = _agreement(
                [s["category"] for s in items], [s["naive_category"] for s in items])
    cac = {s["patient_id"]: s["category"] for s in by_protocol["cac"]}
    paired = [(cac[s["patient_id"]], s["category"]) for s in by_protocol["ctac"]
              if s["patient_id"] in cac]
    if paired:
        agreement["true CTAC vs true CAC (same patients)"] = _agreement(*zip(*paired, strict=True))
    summary = {
        "settings": dataclasses.asdict(settings),
        "cohort_dir": str(out / "cohort"),
        "max_abs_score_difference": max_diff,
        "true_category_counts": {
            p: [sum(1 for s in items if s["category"] == c) for c in CATEGORIES]
            for p, items in by_protocol.items()},
        "agreement": agreement,
        "scans": scans,
    }
    if pipeline:
        checked = pipeline_check(out, out / "cohort" / "manifest.csv", settings)
        batch, config = checked.pop("_batch"), checked.pop("_config")
        summary["pipeline"] = checked
        _say("[5/5] running the untrained ConvLSTM-attention model on a training batch")
        summary["model"] = model_check(batch, config)
    summary["seconds"] = time.perf_counter() - start
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    markdown = _markdown(summary)
    atomic_write_text(out / "summary.md", markdown)
    _say("")
    _say(markdown)
    _say(f"wrote {out / 'summary.md'} and {out / 'summary.json'}")
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cac_jax.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")
    parser.add_argument("--patients", type=int, default=40, help="synthetic patients (default 40)")
    parser.add_argument("--size", type=int, default=256, help="in-plane matrix size (default 256)")
    parser.add_argument("--seed", type=int, default=0, help="cohort and split seed (default 0)")
    parser.add_argument("--workers", type=int, default=2, help="processes for the cohort")
    parser.add_argument("--no-pipeline", action="store_true",
                        help="skip the TFDS dataset, input pipeline and model stages")
    args = parser.parse_args(argv)
    if args.patients < MIN_PATIENTS:
        parser.error(f"--patients must be >= {MIN_PATIENTS} (one each for validation and test, "
                     f"two to train on), got {args.patients}")
    if args.size < MIN_SIZE:
        parser.error(f"--size must be >= {MIN_SIZE} pixels, got {args.size}")
    try:
        run(Path(args.out), DemoSettings(args.patients, args.size, args.seed),
            workers=args.workers, pipeline=not args.no_pipeline)
    except InputError as err:
        print(f"demo: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
