#!/usr/bin/env python
"""Which lesions a calcium model calls on the CTAC scans, against the plaques the patient has.

    python benchmarks/ctac_lesions.py --radius 5 --out benchmarks/results/ctac_lesions \
        --cohort default=INFER_DIR,MANIFEST --cohort lowdose=... --pool held-out=default,lowdose

`INFER_DIR` is a `cac-jax infer` output (one JSON per scan) and `MANIFEST` the cohort's manifest
(both protocols of every patient, with calcium labels). For every patient with a scored CTAC scan:
- the model's coronary lesions on the CTAC scan (the JSON's lesions of labels 1-4, their
  centroids mapped to world millimetres with the scan's geometry);
- the CTAC truth's coronary lesions (the scan's own labels: the calcium the generator marks as
  visible in it, at 130 HU) and the gated truth's (the same patient's gated scan: every plaque
  the gated scan shows). The two scans of a synthetic patient share one world frame; how well
  they line up (each CTAC truth lesion's distance to the nearest gated one) is reported.

Each called lesion is `visible` when a CTAC truth lesion lies within RADIUS mm of it, else
`hidden` when a gated truth lesion does (a real plaque the CTAC label rule left out), else
`false`. Per cohort: the linearly weighted kappa against the gated category (the paper's CTAC
design) of the CTAC truth, of the model, of the model without its `false` lesions and of its
`visible` lesions alone; the Agatston score in each class; how many patients the model puts above
their CTAC truth's category, and whether the hidden lesions do it.

This answers why a model can agree with the gated category better than a perfect reader of the
CTAC labels (docs/study.md): it may call plaques the labels leave out, or false lesions that
happen to raise the right patients. Writes OUT/ctac_lesions.json and OUT/ctac_lesions.md
atomically.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cac_jax.benchmark import machine_info  # noqa: E402
from data_pipeline.agatston import cac_category  # noqa: E402
from data_pipeline.atomic import atomic_write_text  # noqa: E402
from data_pipeline.constants import CALCIUM_THRESHOLD_HU, CORONARY_LABELS  # noqa: E402

KINDS = ("visible", "hidden", "false")
SCORERS = ("ctac_truth", "model", "without_false", "visible_only")


def to_world(volume, zyx) -> np.ndarray:
    """World (LPS) millimetres of a continuous voxel index (z, y, x) of a canonical volume."""
    z, y, x = (float(v) for v in zyx)
    sz, sy, sx = volume.spacing_zyx_mm
    direction = np.asarray(volume.direction, dtype=float).reshape(3, 3)
    return np.asarray(volume.origin_xyz_mm) + direction @ np.array([x * sx, y * sy, z * sz])


def truth_lesions(volume, labels: np.ndarray) -> np.ndarray:
    """World centroids (n, 3) of the coronary label's connected parts at >= 130 HU."""
    from scipy import ndimage

    parts, n = ndimage.label(np.isin(labels, CORONARY_LABELS) & (volume.hu >= CALCIUM_THRESHOLD_HU))
    if n == 0:
        return np.zeros((0, 3))
    centres = ndimage.center_of_mass(np.ones(parts.shape), parts, range(1, n + 1))
    return np.array([to_world(volume, c) for c in centres])


def classify(point: np.ndarray, ctac_truth: np.ndarray, gated_truth: np.ndarray,
             radius_mm: float) -> str:
    """`visible`, `hidden` or `false` (module docstring)."""
    def near(points):
        return len(points) > 0 and float(np.min(np.linalg.norm(points - point, axis=1))) <= radius_mm
    return "visible" if near(ctac_truth) else "hidden" if near(gated_truth) else "false"


def patient_rows(infer_dir: Path, manifest: Path, radius_mm: float) -> tuple[list, list]:
    """Per patient: categories and the Agatston of each lesion class; and the alignment distances."""
    from data_pipeline.io import read_labels, read_study

    scans: dict[str, dict] = {}
    with open(manifest, newline="") as f:
        for row in csv.DictReader(f):
            scans.setdefault(row["patient_id"], {})[row["protocol"]] = row
    root = manifest.parent
    rows, alignment = [], []
    for patient, both in sorted(scans.items()):
        if "cac" not in both or "ctac" not in both:
            continue
        result = infer_dir / f"{both['ctac']['scan_id']}.json"
        if not result.exists():
            continue
        volumes = {p: read_study(root / both[p]["image"]) for p in ("cac", "ctac")}
        truth = {p: truth_lesions(v, read_labels(root / both[p]["calcium_labels"], like=v))
                 for p, v in volumes.items()}
        for point in truth["ctac"]:
            if len(truth["cac"]):
                alignment.append(float(np.min(np.linalg.norm(truth["cac"] - point, axis=1))))
        called = json.loads(result.read_text())
        agatston = dict.fromkeys(KINDS, 0.0)
        for lesion in called["lesions"]:
            if lesion["label"] not in CORONARY_LABELS:
                continue
            point = to_world(volumes["ctac"], (lesion["slice_index"], *lesion["centroid_yx"]))
            agatston[classify(point, truth["ctac"], truth["cac"], radius_mm)] += lesion["agatston"]
        total = sum(agatston.values())
        if cac_category(total) != int(called["category"]):
            raise ValueError(f"{result}: its lesions sum to category {cac_category(total)}, "
                             f"its category is {called['category']}")
        rows.append({"patient": patient, "gated": int(both["cac"]["category"]),
                     "ctac_truth": int(both["ctac"]["category"]), "model": cac_category(total),
                     "without_false": cac_category(agatston["visible"] + agatston["hidden"]),
                     "visible_only": cac_category(agatston["visible"]), **agatston})
    return rows, alignment


def summarise(rows: list, alignment: list) -> dict:
    from sklearn.metrics import cohen_kappa_score

    gated = [r["gated"] for r in rows]
    kappa = {k: round(float(cohen_kappa_score(gated, [r[k] for r in rows], weights="linear",
                                              labels=[0, 1, 2, 3])), 3) for k in SCORERS}
    return {
        "patients": len(rows),
        "alignment_mm": ({"median": round(float(np.median(alignment)), 1),
                          "p90": round(float(np.percentile(alignment, 90)), 1)}
                         if alignment else None),
        "kappa_vs_gated": kappa,
        "agatston": {k: round(sum(r[k] for r in rows), 1) for k in KINDS},
        "patients_with": {k: sum(r[k] > 0 for r in rows) for k in KINDS},
        "above_ctac_truth": sum(r["model"] > r["ctac_truth"] for r in rows),
        "above_ctac_truth_toward_gated": sum(r["ctac_truth"] < r["model"] <= r["gated"]
                                             for r in rows),
        "above_gated": sum(r["model"] > r["gated"] for r in rows),
        "raised_by_hidden": sum(r["without_false"] > r["visible_only"] for r in rows),
    }


def markdown(result: dict) -> str:
    lines = [f"# CTAC lesions: visible, hidden and false calls (radius {result['radius_mm']} mm)",
             "", "Kappa against the gated category (linear, four categories); Agatston summed "
             "over the cohort's CTAC scans by class.", "",
             "| cohort | patients | CTAC truth | model | model without false | visible only | "
             "Agatston visible / hidden / false | above truth (toward gated) | above gated | "
             "raised by hidden | alignment median / p90 mm |",
             "| --- " * 11 + "|"]
    for name, s in result["cohorts"].items():
        k, a = s["kappa_vs_gated"], s["agatston"]
        align = (f"{s['alignment_mm']['median']} / {s['alignment_mm']['p90']}"
                 if s["alignment_mm"] else "-")
        lines.append(f"| {name} | {s['patients']} | {k['ctac_truth']} | {k['model']} | "
                     f"{k['without_false']} | {k['visible_only']} | {a['visible']:.0f} / "
                     f"{a['hidden']:.0f} / {a['false']:.0f} | {s['above_ctac_truth']} "
                     f"({s['above_ctac_truth_toward_gated']}) | {s['above_gated']} | "
                     f"{s['raised_by_hidden']} | {align} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cohort", action="append", required=True, metavar="NAME=INFER,MANIFEST",
                        help="a cohort: its inference folder and its manifest (repeatable)")
    parser.add_argument("--pool", action="append", default=[], metavar="NAME=A,B",
                        help="also summarise these cohorts' patients together (repeatable)")
    parser.add_argument("--radius", type=float, default=5.0,
                        help="mm from a truth lesion within which a call is that lesion")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    per, cohorts = {}, {}
    for spec in args.cohort:
        name, _, paths = spec.partition("=")
        infer_dir, _, manifest = paths.partition(",")
        if not (name and infer_dir and manifest):
            parser.error(f"--cohort {spec!r}: expected NAME=INFER_DIR,MANIFEST")
        for p in (Path(infer_dir), Path(manifest)):
            if not p.exists():
                parser.error(f"--cohort {name}: {p} does not exist")
        try:
            per[name] = patient_rows(Path(infer_dir), Path(manifest), args.radius)
        except (ValueError, KeyError, OSError) as error:   # InputError is a ValueError
            parser.exit(2, f"ctac_lesions: cohort {name}: {error}\n")
        cohorts[name] = summarise(*per[name])
        print(name, json.dumps(cohorts[name]["kappa_vs_gated"]), flush=True)
    for spec in args.pool:
        name, _, members = spec.partition("=")
        missing = [m for m in members.split(",") if m not in per]
        if missing or not name:
            parser.error(f"--pool {spec!r}: unknown cohorts {missing}")
        rows = [r for m in members.split(",") for r in per[m][0]]
        cohorts[name] = summarise(rows, [d for m in members.split(",") for d in per[m][1]])
    result = {"radius_mm": args.radius, "machine": machine_info(()), "cohorts": cohorts,
              "patients": {name: rows for name, (rows, _) in per.items()}}
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "ctac_lesions.json", json.dumps(result, indent=1) + "\n")
    atomic_write_text(args.out / "ctac_lesions.md", markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
