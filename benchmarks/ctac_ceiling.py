#!/usr/bin/env python
"""How much of the gated category a 130 HU scorer can recover from a CTAC scan at all.

    python benchmarks/ctac_ceiling.py --radius 3 --out benchmarks/results/ctac_ceiling \
        --cohort default=MANIFEST --cohort site2=MANIFEST --pool held-out=default,lowdose

Every Agatston score, the model's included, counts only voxels at >= 130 HU. A plaque that a CTAC
scan images below 130 HU (blurred by a smooth kernel, averaged by a thick slice or by the heart's
motion) cannot raise that scan's score, whatever finds it. This probe scores each patient's CTAC
scan with a reader that knows where the plaques are: every CTAC voxel at >= 130 HU inside the
CTAC heart mask and within RADIUS mm (world) of a gated-truth coronary voxel at >= 130 HU is
called coronary, and the CTAC scan is scored with those labels (`data_pipeline.agatston`, the
scorer inference uses). Its linearly weighted kappa against the gated category (the paper's CTAC
design) is the ceiling of any 130 HU scorer that makes no false calls away from the plaques; a
model's distance to it is what the model leaves, the ceiling's distance to 1 is what the CTAC
images lose.

Per gated-truth coronary lesion (connected part of the gated labels at >= 130 HU) it also
reports the highest CTAC HU within RADIUS mm of it (inside the heart mask), and so how many
lesions a CTAC scan shows at >= 130 HU at all. The same reader run on the gated scan itself
(`gated_self`) checks the reader: it can only add voxels to the truth's lesions, so its category
is never below the gated one, and its kappa says how loose it is.

`MANIFEST` is a `cac-jax synth` manifest (both protocols of every patient, with calcium labels
and heart masks; the two scans of a synthetic patient share one world frame). Writes
OUT/ctac_ceiling.json (per patient and per cohort) and OUT/ctac_ceiling.md atomically.
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
from data_pipeline.agatston import agatston_score, cac_category  # noqa: E402
from data_pipeline.atomic import atomic_write_text  # noqa: E402
from data_pipeline.constants import CALCIUM_THRESHOLD_HU, CORONARY_LABELS  # noqa: E402

CATEGORIES = [0, 1, 2, 3]


def world_points(volume, mask: np.ndarray) -> np.ndarray:
    """World (LPS) millimetres (n, 3) of the voxels of `mask` in a canonical volume."""
    zyx = np.argwhere(mask).astype(float)
    sz, sy, sx = volume.spacing_zyx_mm
    direction = np.asarray(volume.direction, dtype=float).reshape(3, 3)
    index_mm = zyx[:, ::-1] * np.array([sx, sy, sz])
    return np.asarray(volume.origin_xyz_mm) + index_mm @ direction.T


def oracle(gated, gated_labels: np.ndarray, target, target_heart: np.ndarray,
           radius_mm: float) -> tuple[int, float, list[float]]:
    """The located reader on `target` (module docstring): its category, its Agatston score, and
    the highest `target` HU near each gated lesion (-inf where no heart voxel is that near)."""
    from scipy import ndimage
    from scipy.spatial import cKDTree

    lesions, n = ndimage.label(np.isin(gated_labels, CORONARY_LABELS)
                               & (gated.hu >= CALCIUM_THRESHOLD_HU))
    if n == 0:
        return 0, 0.0, []
    tree = cKDTree(world_points(gated, lesions > 0))
    lesion_of_point = lesions[lesions > 0]
    heart = target_heart.astype(bool)
    distance, nearest = tree.query(world_points(target, heart), distance_upper_bound=radius_mm)
    near = np.isfinite(distance)
    hu = target.hu[heart]
    peaks = np.full(n, -np.inf)
    np.maximum.at(peaks, lesion_of_point[nearest[near]] - 1, hu[near])
    called = np.zeros(target.hu.shape, np.int16)
    flat = np.flatnonzero(heart.ravel())[near & (hu >= CALCIUM_THRESHOLD_HU)]
    called.ravel()[flat] = 1
    result = agatston_score(target.hu, called, target.spacing_zyx_mm)
    return cac_category(result.agatston), float(result.agatston), [float(p) for p in peaks]


def patient_rows(manifest: Path, radius_mm: float) -> list[dict]:
    """One row per patient with both scans: the categories and the lesions' CTAC peaks."""
    from data_pipeline.io import read_labels, read_study

    scans: dict[str, dict] = {}
    with open(manifest, newline="") as f:
        for row in csv.DictReader(f):
            scans.setdefault(row["patient_id"], {})[row["protocol"]] = row
    root = manifest.parent
    rows = []
    for patient, both in sorted(scans.items()):
        if "cac" not in both or "ctac" not in both:
            continue
        vol = {p: read_study(root / both[p]["image"]) for p in ("cac", "ctac")}
        labels = read_labels(root / both["cac"]["calcium_labels"], like=vol["cac"])
        heart = {p: read_labels(root / both[p]["heart_mask"], like=vol[p]) for p in vol}
        ctac, ctac_agatston, peaks = oracle(vol["cac"], labels, vol["ctac"], heart["ctac"],
                                            radius_mm)
        self_category, _, _ = oracle(vol["cac"], labels, vol["cac"], heart["cac"], radius_mm)
        rows.append({"patient": patient, "gated": int(both["cac"]["category"]),
                     "gated_agatston": float(both["cac"]["agatston"]),
                     "ctac_truth": int(both["ctac"]["category"]), "ceiling": ctac,
                     "ceiling_agatston": round(ctac_agatston, 1), "gated_self": self_category,
                     "lesion_ctac_peaks_hu": [round(p, 1) for p in peaks]})
    return rows


def summarise(rows: list[dict]) -> dict:
    from sklearn.metrics import cohen_kappa_score

    gated = [r["gated"] for r in rows]

    def kappa(key):
        return round(float(cohen_kappa_score(gated, [r[key] for r in rows], weights="linear",
                                             labels=CATEGORIES)), 3)

    peaks = np.array([p for r in rows for p in r["lesion_ctac_peaks_hu"]])
    return {
        "patients": len(rows),
        "kappa_vs_gated": {k: kappa(k) for k in ("ctac_truth", "ceiling", "gated_self")},
        "ceiling_above_gated": sum(r["ceiling"] > r["gated"] for r in rows),
        "ceiling_below_gated": sum(r["ceiling"] < r["gated"] for r in rows),
        "gated_lesions": int(peaks.size),
        "lesions_at_130_hu_in_ctac": int((peaks >= CALCIUM_THRESHOLD_HU).sum()),
        "lesion_ctac_peak_hu_median": (round(float(np.median(peaks[np.isfinite(peaks)])), 1)
                                       if np.isfinite(peaks).any() else None),
        # Each gated category's patients: how many the ceiling puts in each CTAC category.
        "confusion": [[sum(r["gated"] == g and r["ceiling"] == c for r in rows)
                       for c in CATEGORIES] for g in CATEGORIES],
    }


def markdown(result: dict) -> str:
    lines = [f"# What a 130 HU scorer can recover from the CTAC scans (radius "
             f"{result['radius_mm']} mm)", "",
             "Linearly weighted kappa against the gated category, four categories. Ceiling: the "
             "reader that knows where the gated plaques are (`benchmarks/ctac_ceiling.py`).", "",
             "| cohort | patients | CTAC truth | ceiling | ceiling below / above gated | gated "
             "lesions shown at >= 130 HU on CTAC | median CTAC peak HU at a lesion | "
             "reader on the gated scan |", "| --- " * 8 + "|"]
    for name, s in result["cohorts"].items():
        k = s["kappa_vs_gated"]
        lines.append(f"| {name} | {s['patients']} | {k['ctac_truth']} | {k['ceiling']} | "
                     f"{s['ceiling_below_gated']} / {s['ceiling_above_gated']} | "
                     f"{s['lesions_at_130_hu_in_ctac']} of {s['gated_lesions']} | "
                     f"{s['lesion_ctac_peak_hu_median']} | {k['gated_self']} |")
    lines += ["", "Ceiling's CTAC category (columns) against the gated category (rows):", ""]
    for name, s in result["cohorts"].items():
        lines += [f"| {name} | 0 | 1 | 2 | 3 |", "| --- " * 5 + "|"]
        lines += [f"| {g} | " + " | ".join(str(v) for v in row) + " |"
                  for g, row in enumerate(s["confusion"])]
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cohort", action="append", required=True, metavar="NAME=MANIFEST",
                        help="a `cac-jax synth` cohort's manifest (repeatable)")
    parser.add_argument("--pool", action="append", default=[], metavar="NAME=A,B",
                        help="also summarise these cohorts' patients together (repeatable)")
    parser.add_argument("--radius", type=float, default=3.0,
                        help="mm from a gated lesion voxel within which a CTAC voxel is that "
                             "lesion")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    per, cohorts = {}, {}
    for spec in args.cohort:
        name, _, manifest = spec.partition("=")
        if not (name and manifest):
            parser.error(f"--cohort {spec!r}: expected NAME=MANIFEST")
        if not Path(manifest).is_file():
            parser.exit(2, f"ctac_ceiling: {manifest}: no such manifest\n")
        try:
            per[name] = patient_rows(Path(manifest), args.radius)
        except (ValueError, KeyError, OSError) as error:   # InputError is a ValueError
            parser.exit(2, f"ctac_ceiling: cohort {name}: {error}\n")
        if not per[name]:
            parser.exit(2, f"ctac_ceiling: {manifest}: no patient has both a cac and a ctac scan\n")
        cohorts[name] = summarise(per[name])
        print(name, json.dumps(cohorts[name]["kappa_vs_gated"]), flush=True)
    for spec in args.pool:
        name, _, members = spec.partition("=")
        missing = [m for m in members.split(",") if m not in per]
        if missing or not name:
            parser.error(f"--pool {spec!r}: unknown cohorts {missing}")
        cohorts[name] = summarise([r for m in members.split(",") for r in per[m]])
    result = {"radius_mm": args.radius, "machine": machine_info(()), "cohorts": cohorts,
              "patients": per}
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "ctac_ceiling.json", json.dumps(result, indent=1) + "\n")
    atomic_write_text(args.out / "ctac_ceiling.md", markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
