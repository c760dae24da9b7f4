#!/usr/bin/env python
"""The calcium model's operating point: how sure must it be before a lesion counts as coronary?

    python benchmarks/operating_point.py --heart models/synthetic/heart_convlstm \
        --calcium models/synthetic/calcium_convlstm --out OUT \
        --cohort calib_default=cohorts/calib_default/manifest.csv --cohort ... \
        --pool calibration=calib_default,calib_lowdose --pool held-out=test_default,...

Inference counts a voxel as coronary calcium where the calcium model's most likely class is
coronary (the argmax), inside the dilated heart, at HU >= 130. This probe runs the two models once
per scan with their class probabilities and scores every scan again under stricter rules:
- `lesion`: a predicted coronary lesion (a 26-connected part of the coronary voxels at >= 130 HU)
  counts only when the coronary probability somewhere in it reaches T; the lesions that do are
  kept whole (their extent, so their Agatston, is the argmax's).
- `voxel`: a voxel counts when its coronary probability reaches T, whichever class is likelier
  (where it does not, it takes the likelier of the two other classes). Below 0.5 this calls more
  than the argmax does.
T = 0 is the argmax, what inference does now. For each cohort, pool, rule and T it reports the
linearly weighted kappa of the four categories: gated scans against their reference, CTAC scans
against the same patient's gated reference (the paper's design) and against their own truth, and
how many calcium-free patients (gated category 0) get a CTAC score. The operating point is to be
chosen on a pool of calibration patients (not trained on, not tested on) and then read off the
test pools; the probe itself chooses nothing.

Per-scan results are appended to OUT/scans.jsonl as they are computed, so a killed run resumes
where it stopped. Writes OUT/operating_point.json and OUT/operating_point.md atomically.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cac_jax.benchmark import machine_info  # noqa: E402
from data_pipeline.atomic import atomic_write_text  # noqa: E402

RULES = ("lesion", "voxel")
# Per rule; 0 is the argmax. The lesion rule keeps or drops argmax lesions, so it is only
# stricter than the argmax from 0.5 on.
DEFAULT_THRESHOLDS = {"lesion": (0.6, 0.7, 0.8), "voxel": (0.2, 0.3, 0.4, 0.6, 0.7, 0.8)}
CORONARY, NON_CORONARY = 1, 2


def _fail(message: str) -> int:
    print(f"operating_point: error: {message}", file=sys.stderr)
    return 2


def rule_prediction(probabilities: np.ndarray, hu: np.ndarray, rule: str,
                    threshold: float) -> np.ndarray:
    """The (z, y, x) class map (0, 1 coronary, 2 non-coronary) of `rule` at `threshold`, from the
    calcium model's (z, y, x, 3) probabilities on the scan's grid."""
    pred = np.argmax(probabilities, axis=-1).astype(np.uint8)
    if threshold <= 0:
        return pred
    coronary = probabilities[..., CORONARY]
    other = np.where(probabilities[..., NON_CORONARY] > probabilities[..., 0], NON_CORONARY,
                     0).astype(np.uint8)
    called = pred == CORONARY
    if rule == "voxel":
        drop = called & (coronary < threshold)
        pred[coronary >= threshold] = CORONARY  # below 0.5 this adds voxels the argmax left out
    elif rule == "lesion":
        parts, count = ndimage.label(called & (hu >= 130), structure=np.ones((3, 3, 3), bool))
        if count == 0:
            return pred
        peaks = ndimage.maximum(coronary, parts, index=np.arange(1, count + 1))
        weak = np.concatenate([[False], np.asarray(peaks) < threshold])
        drop = weak[parts]
    else:
        raise ValueError(f"unknown rule {rule!r}")
    pred[drop] = other[drop]
    return pred


def score_scan(scorer, row, thresholds) -> dict:
    """Runs both models on one scan and scores it under every rule and threshold."""
    from cac_jax import postprocess
    from cac_jax.scoring import agatston_score

    volume, result = scorer.score_path(row.image, series=row.series, probabilities=True)
    hu = volume.hu
    spacing = tuple(float(s) for s in volume.spacing_zyx_mm)
    probabilities = result.probabilities["calcium"]
    silhouette = postprocess.heart_silhouette(result.heart_mask, spacing,
                                              scorer.heart_dilation_mm)
    # Nothing outside the silhouette's box can count: score the box only (the same lesions).
    box = ndimage.find_objects(silhouette.astype(np.int8))
    if box:
        hu, probabilities, silhouette = hu[box[0]], probabilities[box[0]], silhouette[box[0]]
    scores = {}
    for rule, threshold in [("argmax", 0.0)] + [(r, t) for r in RULES for t in thresholds[r]]:
        pred = rule_prediction(probabilities, hu, rule, threshold)
        labels = postprocess.coronary_labels(pred, hu, silhouette)
        score = agatston_score(hu, labels, spacing,
                               slice_thickness_mm=volume.metadata.slice_thickness_mm,
                               **scorer.score_kwargs)
        key = "argmax" if threshold <= 0 else f"{rule}@{threshold:g}"
        scores[key] = [round(float(score.agatston), 3), int(score.category)]
    return {"scan_id": row.scan_id, "patient_id": row.patient_id, "protocol": row.protocol,
            "reference": [row.agatston, row.category], "problems": list(result.problems),
            "argmax_check": int(result.score.category), "scores": scores}


def kappa(reference, predicted) -> float | None:
    from cac_jax.evaluation.statistics import weighted_kappa

    result = weighted_kappa(reference, predicted)
    return None if result.kappa is None else round(float(result.kappa), 4)


def summarise(rows: list[dict]) -> dict:
    """Per rule key: kappas and counts over `rows` (one cohort or a pool)."""
    gated = {r["patient_id"]: r for r in rows if r["protocol"] == "cac"}
    ctac = [r for r in rows if r["protocol"] == "ctac" and not r["problems"]]
    keys = sorted({k for r in rows for k in r["scores"]},
                  key=lambda k: (k != "argmax", k.split("@")[0], float(k.split("@")[-1])
                                 if "@" in k else 0.0))
    out = {}
    for key in keys:
        g = [r for r in gated.values() if not r["problems"]]
        paired = [r for r in ctac if r["patient_id"] in gated]
        free = [r for r in paired if gated[r["patient_id"]]["reference"][1] == 0]
        out[key] = {
            "gated": kappa([r["reference"][1] for r in g], [r["scores"][key][1] for r in g]),
            "ctac_vs_gated": kappa([gated[r["patient_id"]]["reference"][1] for r in paired],
                                   [r["scores"][key][1] for r in paired]),
            "ctac_own_truth": kappa([r["reference"][1] for r in ctac],
                                    [r["scores"][key][1] for r in ctac]),
            "calcium_free_ctac_called": sum(r["scores"][key][1] > 0 for r in free),
            "calcium_free_patients": len(free),
            "gated_scans": len(g), "ctac_scans": len(paired)}
    return out


def markdown(result: dict) -> str:
    lines = [f"# Operating point of the calcium model ({result['calcium']})", "",
             "Linearly weighted kappa of the four categories: gated against the gated reference; "
             "CTAC against the same patient's gated reference (the paper's design) and against "
             "its own truth; calcium-free patients (gated category 0) whose CTAC is called > 0.",
             ""]
    for name, block in {**result["pools"], **result["cohorts"]}.items():
        lines += [f"## {name}", "",
                  "| rule | gated | CTAC vs gated | CTAC own truth | calcium-free CTAC called |",
                  "| --- | ---: | ---: | ---: | ---: |"]
        for key, cell in block.items():
            lines.append(f"| {key} | {cell['gated']} | {cell['ctac_vs_gated']} | "
                         f"{cell['ctac_own_truth']} | {cell['calcium_free_ctac_called']} / "
                         f"{cell['calcium_free_patients']} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--heart", required=True)
    parser.add_argument("--calcium", required=True)
    parser.add_argument("--cohort", action="append", required=True, metavar="NAME=MANIFEST")
    parser.add_argument("--pool", action="append", default=[], metavar="NAME=C1,C2")
    for rule in RULES:
        parser.add_argument(f"--{rule}-thresholds",
                            default=",".join(f"{t:g}" for t in DEFAULT_THRESHOLDS[rule]))
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--summarise-only", action="store_true",
                        help="write the summary from OUT/scans.jsonl without running the models")
    args = parser.parse_args(argv)
    from data_pipeline.errors import InputError
    from data_pipeline.manifest import read_manifest

    try:
        thresholds = {r: tuple(float(t) for t in getattr(args, f"{r}_thresholds").split(",")
                               if t) for r in RULES}
    except ValueError:
        return _fail("--lesion-thresholds / --voxel-thresholds: not a comma list of numbers")
    if any(t <= 0 or t >= 1 for ts in thresholds.values() for t in ts):
        return _fail("thresholds are probabilities strictly between 0 and 1")
    cohorts = {}
    for spec in args.cohort:
        name, _, path = spec.partition("=")
        try:
            cohorts[name] = read_manifest(path)
        except (InputError, OSError) as exc:
            return _fail(f"cohort {name}: {exc}")
    pools = {}
    for spec in args.pool:
        name, _, members = spec.partition("=")
        unknown = [m for m in members.split(",") if m not in cohorts]
        if unknown:
            return _fail(f"pool {name}: no cohort named {', '.join(unknown)}")
        pools[name] = members.split(",")
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return _fail(f"{args.out}: cannot create the output folder: {exc}")
    store = args.out / "scans.jsonl"
    done, failed = {}, 0
    if store.exists():
        lines = store.read_text().splitlines()
        for number, line in enumerate(lines, 1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                if number == len(lines):  # cut off by a killed run: that scan runs again
                    atomic_write_text(store, "".join(f"{kept}\n" for kept in lines[:-1]))
                    break
                return _fail(f"{store}: line {number} is not JSON")
            done[(record["cohort"], record["scan_id"])] = record
    if not args.summarise_only:
        from cac_jax.inference import Scorer

        scorer = Scorer.from_checkpoints(args.heart, args.calcium)
        todo = [(n, r) for n, rows in cohorts.items() for r in rows if (n, r.scan_id) not in done]
        t0 = time.perf_counter()
        with store.open("a") as handle:
            for i, (name, row) in enumerate(todo, 1):
                try:
                    record = {"cohort": name, **score_scan(scorer, row, thresholds)}
                except (InputError, OSError, ValueError) as exc:
                    failed += 1  # not recorded: a rerun tries it again
                    print(f"operating_point: {name} {row.scan_id}: {exc}", file=sys.stderr)
                    continue
                handle.write(json.dumps(record) + "\n")
                handle.flush()
                done[(name, row.scan_id)] = record
                print(f"[{i}/{len(todo)}] {name} {row.scan_id} "
                      f"{(time.perf_counter() - t0) / i:.1f} s/scan", flush=True)
    by_cohort = {n: [done[(n, r.scan_id)] for r in rows if (n, r.scan_id) in done]
                 for n, rows in cohorts.items()}
    if failed:
        print(f"operating_point: {failed} scans failed (above); run again to retry them",
              file=sys.stderr)
    result = {"heart": args.heart, "calcium": args.calcium, "thresholds": thresholds,
              "scans_failed": failed,
              "machine": machine_info(()),
              "argmax_mismatches": sum(r["scores"]["argmax"][1] != r["argmax_check"]
                                       for rows in by_cohort.values() for r in rows),
              "pools": {p: summarise([r for m in members for r in by_cohort[m]])
                        for p, members in pools.items()},
              "cohorts": {n: summarise(rows) for n, rows in by_cohort.items() if rows}}
    atomic_write_text(args.out / "operating_point.json", json.dumps(result, indent=1) + "\n")
    atomic_write_text(args.out / "operating_point.md", markdown(result) + "\n")
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
