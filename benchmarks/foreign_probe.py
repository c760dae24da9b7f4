#!/usr/bin/env python
"""Why a heart + calcium model pair scores another generator's scans as it does.

    python benchmarks/foreign_cohort.py --out foreign256 --patients 40 --size 256 --seed 7
    cac-jax infer --heart-checkpoint models/synthetic/heart_convlstm \
        --calcium-checkpoint models/synthetic/calcium_convlstm \
        --manifest foreign256/manifest.csv --out probe/infer_convlstm
    python benchmarks/foreign_probe.py --cohort foreign256 --out probe --infer probe/infer_convlstm

For every scan of the cohort's manifest (truth labels and heart masks included), with the two
checkpoints (default: the reference ConvLSTM pair in models/synthetic/):
- the naive 130 HU threshold inside the TRUE heart (`cac_jax.demo.naive_results`), as
  `OUT/infer_naive/results.csv`;
- the calcium model run inside the TRUE heart mask instead of the heart model's (the window centred
  on the true heart, the same dilation and post-processing as `cac-jax infer`), as
  `OUT/infer_trueheart/results.csv`: set beside `cac-jax infer`'s results it separates the heart
  model's share of the error from the calcium model's;
- per truth voxel at >= 130 HU, the calcium model's class (background / coronary / non-coronary)
  against the voxel's depth below the heart-mask surface (mm, 3D distance transform), for the
  coronary truth (labels 1-3) and the non-coronary truth inside the heart (labels >= 5), per
  protocol: `OUT/depth.json` and a table in `OUT/foreign_probe.md`; with `--reference-manifest`
  also the depth distribution of that cohort's coronary calcium (the cohort the model was trained
  like), to compare the two generators' anatomy.

Then `cac-jax evaluate --pred OUT/infer_{naive,trueheart}/results.csv --ref MANIFEST --by protocol
--ref-protocol cac` scores them as the study does. Writes atomically; needs no GPU.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import numpy as np
from scipy import ndimage

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cac_jax import demo  # noqa: E402
from cac_jax.inference import Scorer  # noqa: E402
from cac_jax.results import number, read_results, write_results  # noqa: E402
from cac_jax.scoring import CALCIUM_THRESHOLD_HU, CATEGORY_NAMES  # noqa: E402
from data_pipeline import frames as frames_lib  # noqa: E402
from data_pipeline.atomic import atomic_write_text  # noqa: E402
from data_pipeline.io import read_labels, read_study  # noqa: E402
from data_pipeline.manifest import read_manifest  # noqa: E402

DEPTH_BINS_MM = (0.0, 4.0, 7.0, 10.0, 13.0, 16.0, np.inf)
CLASSES = ("background", "coronary", "non-coronary")


def depth_below_surface(heart: np.ndarray, spacing_zyx_mm) -> np.ndarray:
    """mm from each heart-mask voxel to the nearest voxel outside the mask (0 outside)."""
    return ndimage.distance_transform_edt(heart, sampling=spacing_zyx_mm)


def scans(manifest: pathlib.Path, protocol: str | None = None):
    """(row, volume, heart mask as bool, truth labels) of each scan of a cohort (of `protocol`)."""
    for row in read_manifest(manifest):
        if protocol is not None and row.protocol != protocol:
            continue
        volume = read_study(row.image)
        yield (row, volume, read_labels(row.heart_mask, like=volume) > 0,
               read_labels(row.calcium_labels, like=volume))


def true_heart_scores(scorer: Scorer, calcium_name: str, row, volume, heart, truth,
                      counts: dict) -> dict:
    """Score one scan with the calcium model inside its true heart; add its depth counts."""
    spacing = tuple(float(s) for s in volume.spacing_zyx_mm)
    _, silhouette = scorer._silhouettes(heart.astype(np.uint8), spacing, {})
    calcium = scorer._runners["calcium"].predict(
        volume.hu, spacing, probabilities=False, timings={},
        slices=np.flatnonzero(silhouette.any(axis=(1, 2))),
        centre_yx=frames_lib.heart_centre_yx(heart))
    result = scorer.score_predictions(volume, heart.astype(np.uint8), calcium)
    depth = depth_below_surface(heart, spacing)
    bright = volume.hu >= CALCIUM_THRESHOLD_HU
    for kind, mask in (("coronary", np.isin(truth, (1, 2, 3))), ("non-coronary", (truth >= 5) & heart)):
        sel = mask & bright
        bins = np.digitize(depth[sel], DEPTH_BINS_MM) - 1
        table = counts.setdefault(row.protocol, {}).setdefault(
            kind, np.zeros((len(DEPTH_BINS_MM) - 1, len(CLASSES)), np.int64))
        np.add.at(table, (bins, np.asarray(calcium)[sel].astype(int)), 1)
    score = result.score
    return dict(scan_id=row.scan_id, image=str(row.image), protocol=row.protocol, status="ok",
                agatston=number(score.agatston), volume_mm3=number(score.volume_mm3),
                category=score.category, category_name=CATEGORY_NAMES[score.category],
                n_lesions=len(score.lesions),
                heart_volume_ml=number(heart.sum() * np.prod(spacing) / 1000.0),
                heart_model="true heart mask",
                calcium_model=calcium_name)


def coronary_depths(manifest: pathlib.Path, protocol: str = "cac") -> np.ndarray:
    """Depth (mm) below the heart surface of every coronary truth voxel of a cohort's scans."""
    out = [depth_below_surface(heart, volume.spacing_zyx_mm)[np.isin(truth, (1, 2, 3))]
           for _, volume, heart, truth in scans(manifest, protocol)]
    return np.concatenate(out) if out else np.zeros(0)


def lesion_visibility(manifest: pathlib.Path, protocol: str) -> dict:
    """How far each coronary lesion stands out of the scan's noise, over a cohort's scans.

    Per scan: the noise sigma is the robust SD (1.4826 x MAD) of HU minus its 7x7 in-plane mean,
    over the heart's interior (the mask eroded by 4 voxels) where that mean is soft tissue
    (-30..90 HU), and the background is the median HU there. Per coronary lesion (a 3D connected
    component of labels 1-3): (peak HU - background) / sigma. A lesion below about 3 sigmas is at
    the Rose criterion's limit: a reader cannot tell it from noise.
    """
    excess, sigmas = [], []
    for _, volume, heart, truth in scans(manifest, protocol):
        inner = ndimage.binary_erosion(heart, iterations=4)
        local = ndimage.uniform_filter(volume.hu, size=(1, 7, 7))
        tissue = inner & (local > -30) & (local < 90)
        residual = (volume.hu - local)[tissue]
        sigma = 1.4826 * float(np.median(np.abs(residual - np.median(residual))))
        background = float(np.median(volume.hu[tissue]))
        sigmas.append(sigma)
        components, n = ndimage.label(np.isin(truth, (1, 2, 3)))
        if n:
            peaks = ndimage.maximum(volume.hu, components, index=np.arange(1, n + 1))
            excess += list((np.asarray(peaks) - background) / sigma)
    excess = np.asarray(excess)
    return {"scans": len(sigmas), "noise_sigma_hu_p10_50_90": _percentiles(np.asarray(sigmas)),
            "lesions": int(excess.size),
            "peak_excess_sigmas_p10_50_90": _percentiles(excess),
            "lesions_at_least_3_sigmas": float(np.mean(excess >= 3)) if excess.size else None}


def _percentiles(values: np.ndarray) -> list[float] | None:
    return None if values.size == 0 else [round(float(v), 1) for v in np.percentile(values, [10, 50, 90])]


def render(report: dict) -> str:
    lines = ["# Another generator's scans: where the calcium model's errors come from", "",
             f"Cohort: `{report['cohort']}`; heart `{report['heart']}`, calcium "
             f"`{report['calcium']}`. The calcium model's class of every truth voxel at >= 130 HU "
             "(calcium model run inside the true heart), by depth below the heart-mask surface:", ""]
    for protocol, kinds in report["depth"].items():
        for kind, rows in kinds.items():
            lines += [f"## {protocol}: {kind} truth", "",
                      "| depth mm | voxels | background | coronary | non-coronary |",
                      "|---|---:|---:|---:|---:|"]
            for row in rows:
                lines.append(f"| {row['depth_mm']} | {row['voxels']} | " + " | ".join(
                    f"{row[c]:.2f}" for c in CLASSES) + " |")
            lines.append("")
    lines += ["## Coronary calcium depth (gated scans, mm: 10th / 50th / 90th percentile)", ""]
    for name, value in report["coronary_depth_percentiles"].items():
        lines.append(f"- {name}: {value}")
    for protocol, v in report["heart_volume_predicted_over_true"].items():
        lines.append(f"- heart model, {protocol}: predicted / true heart volume median {v['median']}"
                     f" (range {v['min']}-{v['max']}, {v['scans']} scans)")
    lines += ["", "## Coronary lesions against the noise", "",
              "| cohort | protocol | scans | noise sigma HU (p10/50/90) | lesions | peak excess / sigma "
              "(p10/50/90) | lesions >= 3 sigma |", "|---|---|---:|---|---:|---|---:|"]
    for name, per in report["lesion_visibility"].items():
        for protocol, v in per.items():
            share = v["lesions_at_least_3_sigmas"]
            lines.append(f"| {name} | {protocol} | {v['scans']} | {v['noise_sigma_hu_p10_50_90']} | "
                         f"{v['lesions']} | {v['peak_excess_sigmas_p10_50_90']} | "
                         f"{'' if share is None else f'{share:.0%}'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cohort", type=pathlib.Path, required=True,
                   help="folder with manifest.csv (truth labels and heart masks)")
    p.add_argument("--out", type=pathlib.Path, required=True)
    p.add_argument("--heart-checkpoint", default=str(ROOT / "models/synthetic/heart_convlstm"))
    p.add_argument("--calcium-checkpoint", default=str(ROOT / "models/synthetic/calcium_convlstm"))
    p.add_argument("--infer", type=pathlib.Path, default=None,
                   help="a `cac-jax infer` --out folder of the same cohort: predicted / true heart "
                        "volume per protocol")
    p.add_argument("--reference-manifest", type=pathlib.Path, action="append", default=[],
                   help="another cohort's manifest whose coronary depths to list beside (repeatable)")
    args = p.parse_args(argv)
    manifest = args.cohort / "manifest.csv"
    args.out.mkdir(parents=True, exist_ok=True)

    demo.naive_results(manifest, args.out / "infer_naive" / "results.csv")
    scorer = Scorer.from_checkpoints(args.heart_checkpoint, args.calcium_checkpoint)
    counts: dict = {}
    rows = []
    heart_ratio: dict = {}
    predicted = read_results(args.infer / "results.csv")[0] if args.infer is not None else {}
    for row, volume, heart, truth in scans(manifest):
        rows.append(true_heart_scores(scorer, args.calcium_checkpoint, row, volume, heart, truth,
                                      counts))
        if predicted.get(row.scan_id, {}).get("status") == "ok":
            heart_ratio.setdefault(row.protocol, []).append(
                float(predicted[row.scan_id]["heart_volume_ml"]) / float(rows[-1]["heart_volume_ml"]))
        print(f"{row.scan_id}: truth {row.agatston:.1f}, true heart {rows[-1]['agatston']}", flush=True)
    (args.out / "infer_trueheart").mkdir(exist_ok=True)
    write_results(args.out / "infer_trueheart" / "results.csv", rows)

    depth = {}
    for protocol, kinds in counts.items():
        for kind, table in kinds.items():
            out_rows = []
            for i, counts_row in enumerate(table):
                n = int(counts_row.sum())
                hi = DEPTH_BINS_MM[i + 1]
                out_rows.append({"depth_mm": f"{DEPTH_BINS_MM[i]:g}-{hi:g}" if np.isfinite(hi)
                                 else f">= {DEPTH_BINS_MM[i]:g}", "voxels": n,
                                 **{c: float(counts_row[j] / max(n, 1)) for j, c in enumerate(CLASSES)}})
            depth.setdefault(protocol, {})[kind] = out_rows
    percentiles = {str(args.cohort): _percentiles(coronary_depths(manifest))}
    for other in args.reference_manifest:
        percentiles[str(other)] = _percentiles(coronary_depths(other))
    visibility = {str(m): {p: lesion_visibility(m, p) for p in ("cac", "ctac")}
                  for m in (manifest, *args.reference_manifest)}
    report = {"cohort": str(args.cohort), "heart": args.heart_checkpoint,
              "calcium": args.calcium_checkpoint, "depth_bins_mm": [str(b) for b in DEPTH_BINS_MM],
              "depth": depth, "coronary_depth_percentiles": percentiles,
              "lesion_visibility": visibility,
              "heart_volume_predicted_over_true": {
                  p: {"scans": len(v), "median": round(float(np.median(v)), 3),
                      "min": round(min(v), 3), "max": round(max(v), 3)}
                  for p, v in heart_ratio.items()}}
    atomic_write_text(args.out / "depth.json", json.dumps(report, indent=2) + "\n")
    atomic_write_text(args.out / "foreign_probe.md", render(report))
    print(render(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
