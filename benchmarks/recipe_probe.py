"""Probe: what a trained calcium (or heart) model scores on held-out scans, per protocol.

Run:  python benchmarks/recipe_probe.py --calcium WORKDIR --data-dir D --manifest M.csv
          [--name cac_ct] [--heart WORKDIR] [--splits validation,test] [--out FILE.json]

How a training recipe is judged here (docs/training_notes.md: the recipe probes): not by its loss
but by
the Agatston categories of held-out patients. For each scan of the chosen splits of the dataset
(its `splits.csv` audit), read from the manifest it was built from:
- the calcium model's coronary class at >= 130 HU inside the heart silhouette (the REFERENCE heart
  mask dilated as inference does, so a weak heart model does not hide what the calcium model
  learnt; with `--heart` the heart model's silhouette instead, as `cac-jax infer` scores), scored
  by the Agatston contract;
- the naive 130 HU threshold inside the reference heart (`cac_jax.baselines`);
- the linearly weighted kappa and exact agreement of each against the reference category, per
  protocol, and candidate-voxel counts (true coronary voxels found, false ones, missed ones).
With `--heart` it also reports the heart model's Dice against the reference heart.
Prints a table and writes the JSON (default: WORKDIR/recipe_probe.json).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np
from sklearn.metrics import cohen_kappa_score

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cac_jax import postprocess  # noqa: E402
from cac_jax.baselines import threshold_score  # noqa: E402
from cac_jax.checkpoints import load_trained  # noqa: E402
from cac_jax.inference import _ModelRunner  # noqa: E402
from data_pipeline import io  # noqa: E402
from data_pipeline.config import DATASET_VERSION  # noqa: E402
from data_pipeline.constants import CALCIUM_THRESHOLD_HU, CORONARY_LABELS  # noqa: E402
from data_pipeline.manifest import read_manifest  # noqa: E402

CATEGORIES = [0, 1, 2, 3]


def _kappa(truth, pred) -> float:
    if not truth:
        return float("nan")
    return float(cohen_kappa_score(truth, pred, labels=CATEGORIES, weights="linear"))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calcium", required=True, help="calcium model training workdir")
    parser.add_argument("--heart", help="heart model workdir (default: the reference heart)")
    parser.add_argument("--data-dir", required=True, help="TFDS data dir the models trained on")
    parser.add_argument("--name", default="cac_ct")
    parser.add_argument("--manifest", required=True,
                        help="the manifest the dataset was built from")
    parser.add_argument("--splits", default="validation,test")
    parser.add_argument("--out", help="JSON output (default: CALCIUM/recipe_probe.json)")
    args = parser.parse_args(argv)

    dataset = Path(args.data_dir) / args.name / DATASET_VERSION
    with (dataset / "splits.csv").open(newline="") as handle:
        split_of = {r["scan_id"]: r["split"] for r in csv.DictReader(handle)}
    wanted = set(args.splits.split(","))
    rows = [r for r in read_manifest(args.manifest)
            if split_of.get(r.scan_id) in wanted]
    if not rows:
        raise SystemExit(f"no scans of splits {sorted(wanted)} in {dataset / 'splits.csv'}")
    calcium = load_trained(args.calcium)
    runner = _ModelRunner(calcium, "calcium", 8, 16)
    heart_runner = _ModelRunner(load_trained(args.heart), "heart", 8, 16) if args.heart else None
    scans = {}
    for row in rows:
        volume = io.read_study(row.image)
        spacing = tuple(float(s) for s in volume.spacing_zyx_mm)
        reference_heart = io.read_labels(row.heart_mask, like=volume) > 0
        record = {"protocol": row.protocol, "split": split_of[row.scan_id],
                  "truth": int(row.category)}
        if heart_runner is not None:
            predicted = heart_runner.predict(volume.hu, spacing, probabilities=False, timings={})
            heart = postprocess.heart_silhouette(predicted, spacing, 0.0)
            record["heart_dice"] = float(2 * (heart & reference_heart).sum()
                                         / max(1, heart.sum() + reference_heart.sum()))
        else:
            heart = reference_heart
        silhouette = postprocess.heart_silhouette(heart, spacing,
                                                  postprocess.DEFAULT_HEART_DILATION_MM)
        pred = runner.predict(volume.hu, spacing, probabilities=False, timings={})
        score = postprocess.predicted_score(volume.hu, pred, silhouette, spacing)
        naive = threshold_score(volume.hu, reference_heart, spacing)
        labels = io.read_labels(row.calcium_labels, like=volume)
        coronary = np.isin(labels, CORONARY_LABELS)
        called = ((pred == postprocess.CORONARY_CLASS) & (volume.hu >= CALCIUM_THRESHOLD_HU)
                  & silhouette)
        record.update(model=int(score.category), naive=int(naive.category),
                      agatston=float(row.agatston), model_agatston=float(score.agatston),
                      coronary_found=int((coronary & called).sum()),
                      false_coronary=int((called & ~coronary).sum()),
                      coronary_missed=int((coronary & ~called).sum()))
        scans[row.scan_id] = record

    summary = {}
    for protocol in sorted({r["protocol"] for r in scans.values()}):
        mine = [r for r in scans.values() if r["protocol"] == protocol]
        truth = [r["truth"] for r in mine]
        cell = {"n": len(mine)}
        for key in ("model", "naive"):
            cell[f"{key}_kappa"] = _kappa(truth, [r[key] for r in mine])
            cell[f"{key}_exact"] = float(np.mean([r[key] == r["truth"] for r in mine]))
        for key in ("coronary_found", "false_coronary", "coronary_missed"):
            cell[key] = int(sum(r[key] for r in mine))
        if heart_runner is not None:
            cell["heart_dice_mean"] = float(np.mean([r["heart_dice"] for r in mine]))
        summary[protocol] = cell
    result = {"calcium": str(args.calcium), "heart": args.heart or "reference heart mask",
              "splits": sorted(wanted), "calcium_steps": int(calcium.step),
              "summary": summary, "scans": scans}
    print(f"calcium model {args.calcium} (step {calcium.step}); heart: {result['heart']}; "
          f"splits {', '.join(sorted(wanted))}")
    print("| protocol | n | model kappa | model exact | naive kappa | naive exact | coronary "
          "voxels found / false / missed |" + (" heart Dice |" if heart_runner else ""))
    for protocol, c in summary.items():
        print(f"| {protocol} | {c['n']} | {c['model_kappa']:.2f} | {c['model_exact']:.0%} | "
              f"{c['naive_kappa']:.2f} | {c['naive_exact']:.0%} | {c['coronary_found']} / "
              f"{c['false_coronary']} / {c['coronary_missed']} |"
              + (f" {c['heart_dice_mean']:.2f} |" if heart_runner else ""))
    out = Path(args.out) if args.out else Path(args.calcium) / "recipe_probe.json"
    out.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
