"""Preview PNGs of synthetic scans: a montage of axial slices through the heart with the ground
truth overlaid (coronary calcium by artery, non-coronary calcium, heart-mask contour), so a
person can check at a glance that the phantom looks like a chest CT."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from data_pipeline.montage import Tile, write_montage
from data_pipeline.phantom.sites import DEFAULT_SITE, SITES

# Overlay colours (RGBA): LAD red, LCX green, RCA blue, aorta/valve/other calcium orange.
_COLOURS = {1: (1.0, 0.15, 0.15, 0.9), 2: (0.1, 0.9, 0.2, 0.9), 3: (0.2, 0.5, 1.0, 0.9),
            4: (1.0, 0.0, 1.0, 0.9), 5: (1.0, 0.65, 0.0, 0.9), 6: (1.0, 0.85, 0.0, 0.9),
            7: (0.9, 0.5, 0.1, 0.9)}
WINDOW_HU = (-400.0, 800.0)


def _slices_to_show(scan, count: int) -> np.ndarray:
    """Slices through the heart, always including the slices with the most coronary calcium."""
    mask_z = np.nonzero(scan.heart_mask.reshape(scan.heart_mask.shape[0], -1).any(axis=1))[0]
    nz = scan.heart_mask.shape[0]
    lo, hi = (mask_z[0], mask_z[-1]) if len(mask_z) else (0, nz - 1)
    chosen = set(np.linspace(lo, hi, count).round().astype(int).tolist())
    coronary = ((scan.calcium_labels >= 1) & (scan.calcium_labels <= 4)).reshape(nz, -1).sum(axis=1)
    for z in np.argsort(-coronary)[: count // 3]:
        if coronary[z] > 0:
            chosen.add(int(z))
    ordered = sorted(chosen)
    while len(ordered) > count:   # drop evenly spaced slices (keep calcium slices)
        plain = [z for z in ordered if coronary[z] == 0] or ordered
        ordered.remove(plain[len(plain) // 2])
    return np.array(ordered)


def save_preview(scan, path: str | os.PathLike, *, count: int = 12) -> None:
    """Writes a PNG montage of `scan` (a `SyntheticScan`) to `path` (atomically)."""
    hu = scan.volume.hu
    slices = _slices_to_show(scan, count)
    # Crop to the body (a CTAC field of view is much wider than the patient).
    body = (hu[slices] > -500).any(axis=0)
    rows_any, cols_any = np.nonzero(body.any(axis=1))[0], np.nonzero(body.any(axis=0))[0]
    margin = max(2, hu.shape[1] // 50)
    crop = (slice(max(0, rows_any[0] - margin), rows_any[-1] + margin + 1),
            slice(max(0, cols_any[0] - margin), cols_any[-1] + margin + 1)) if len(rows_any) else (
        slice(None), slice(None))
    tiles = [Tile(hu[z][crop], scan.calcium_labels[z][crop], scan.heart_mask[z][crop],
                  f"slice {z}") for z in slices]
    spacing = scan.volume.spacing_zyx_mm
    site = "" if scan.site == SITES[DEFAULT_SITE].site else f"  site={scan.site}"
    title = (f"{scan.scan_id}  protocol={scan.protocol}{site}  Agatston={scan.agatston:.1f} "
             f"(category {scan.category}, designed {scan.target_category})\n"
             f"spacing z/y/x {spacing[0]:.2f}/{spacing[1]:.3f}/{spacing[2]:.3f} mm   "
             "red LAD, green LCX, blue RCA, orange non-coronary, cyan heart")
    write_montage(Path(path), tiles, title=title, window=WINDOW_HU, colours=_COLOURS)
