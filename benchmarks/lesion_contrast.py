"""Probe: how far coronary lesions stand out from the noise of a cohort, per protocol.

Run:  python benchmarks/lesion_contrast.py --manifest COHORT/manifest.csv [--out DIR]
          [--thresholds 150,200,250,300]

Why: a calcium model can only call what the image shows. For every scan of the manifest (its
image, calcium labels and heart mask), the voxels at >= 130 HU inside the reference heart are
split into 3D connected components (26-connectivity), and each component is put in one class:
- coronary: it touches a coronary label (1-4);
- non-coronary: it touches only non-coronary labels (5-7);
- unlabelled: it touches no label (noise, or calcium too faint to be marked).
Per protocol it reports the count of each class, the 10th / 50th / 90th percentiles of their
peak HU, size (voxels) and z-extent (slices), and how many of each class peak at or above each
threshold: where coronary and unlabelled components overlap in all three, no per-voxel rule
separates them, and a model has only the lesion's place in the coronary tree to go on.
Writes DIR/lesion_contrast.json and DIR/lesion_contrast.md (default DIR: beside the manifest).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage

from data_pipeline import io
from data_pipeline.atomic import atomic_write_text
from data_pipeline.constants import CALCIUM_THRESHOLD_HU, CORONARY_LABELS
from data_pipeline.manifest import read_manifest

CLASSES = ("coronary", "non_coronary", "unlabelled")


def components(hu: np.ndarray, labels: np.ndarray, heart: np.ndarray) -> list[tuple]:
    """(class, peak HU, voxels, z-extent) of each >= 130 HU component inside `heart`."""
    candidate = (hu >= CALCIUM_THRESHOLD_HU) & heart
    comp, _ = ndimage.label(candidate, structure=np.ones((3, 3, 3), bool))
    found = []
    for index, box in enumerate(ndimage.find_objects(comp), start=1):
        inside = comp[box] == index
        touched = labels[box][inside]
        if np.isin(touched, CORONARY_LABELS).any():
            kind = "coronary"
        elif (touched > 0).any():
            kind = "non_coronary"
        else:
            kind = "unlabelled"
        found.append((kind, float(hu[box][inside].max()), int(inside.sum()),
                      box[0].stop - box[0].start))
    return found


def summarise(found: list[tuple], thresholds: list[float]) -> dict:
    out = {}
    for kind in CLASSES:
        mine = np.array([f[1:] for f in found if f[0] == kind], float).reshape(-1, 3)
        cell = {"n": len(mine)}
        for column, key in enumerate(("peak_hu", "voxels", "z_extent")):
            cell[key + "_p10_p50_p90"] = (np.percentile(mine[:, column], [10, 50, 90]).tolist()
                                          if len(mine) else None)
        cell["peak_at_least"] = {str(t): int((mine[:, 0] >= t).sum()) for t in thresholds}
        out[kind] = cell
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--manifest", required=True)
    parser.add_argument("--out", help="output folder (default: the manifest's folder)")
    parser.add_argument("--thresholds", default="150,200,250,300")
    args = parser.parse_args(argv)
    thresholds = [float(t) for t in args.thresholds.split(",")]
    rows = read_manifest(args.manifest)
    by_protocol: dict[str, list] = {}
    scans: dict[str, int] = {}
    for row in rows:
        if row.calcium_labels is None or row.heart_mask is None:
            print(f"skipping {row.scan_id}: no calcium labels or heart mask", file=sys.stderr)
            continue
        volume = io.read_study(row.image)
        labels = io.read_labels(row.calcium_labels, like=volume)
        heart = io.read_labels(row.heart_mask, like=volume) > 0
        by_protocol.setdefault(row.protocol, []).extend(components(volume.hu, labels, heart))
        scans[row.protocol] = scans.get(row.protocol, 0) + 1
    result = {"manifest": str(Path(args.manifest).resolve()), "thresholds_hu": thresholds,
              "protocols": {p: {"scans": scans[p], **summarise(found, thresholds)}
                            for p, found in sorted(by_protocol.items())}}
    lines = ["# Coronary lesions against the noise (components at >= 130 HU inside the heart)",
             "", f"Manifest: `{args.manifest}`.", "",
             "| protocol | scans | class | n | peak HU p10/p50/p90 | voxels p10/p50/p90 | "
             "z-extent p10/p50/p90 | " + " | ".join(f"peak >= {t:g}" for t in thresholds) + " |",
             "|---|---:|---|---:|---|---|---|" + "---:|" * len(thresholds)]

    def triple(values):
        return "n/a" if values is None else " / ".join(f"{v:.0f}" for v in values)

    for protocol, cell in result["protocols"].items():
        for kind in CLASSES:
            c = cell[kind]
            lines.append(f"| {protocol} | {cell['scans']} | {kind} | {c['n']} | "
                         f"{triple(c['peak_hu_p10_p50_p90'])} | {triple(c['voxels_p10_p50_p90'])} "
                         f"| {triple(c['z_extent_p10_p50_p90'])} | "
                         + " | ".join(str(c["peak_at_least"][str(t)]) for t in thresholds) + " |")
    out = Path(args.out) if args.out else Path(args.manifest).parent
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "lesion_contrast.json", json.dumps(result, indent=2))
    atomic_write_text(out / "lesion_contrast.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    main()
