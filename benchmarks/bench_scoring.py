"""Benchmark: Agatston scoring of a 512 x 512 x 80 volume with a few hundred lesions.

Run:  python benchmarks/bench_scoring.py [--repeats 7] [--lesions 300] [--seed 0]

Builds a synthetic chest-like HU volume (air, lungs, soft tissue, a bone-like spine at 700-1200 HU
labelled 7, i.e. non-coronary) with a few hundred random calcified plaques labelled 1-4 (half of
them with a soft-tissue rim inside the label, as drawn annotations have), then times
`cac_jax.scoring.agatston_score` (median of several repeats, after one warm-up). Side by side in
the same run, as references that make the figure readable on a shared machine: the straightforward
per-slice loop (one 2D `ndimage.label` per slice and label; its total must equal the scorer's) and
two threshold passes over the volume (`labels >= 1`, `hu >= 130`), a lower bound for any scorer.
Writes benchmarks/results/bench_scoring.json and .md.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

from cac_jax.scoring import agatston_score
from data_pipeline.atomic import atomic_write_text

RESULTS = Path(__file__).resolve().parent / "results"
SHAPE = (80, 512, 512)
SPACING_ZYX_MM = (3.0, 0.6, 0.6)


def synthetic_study(n_lesions: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """HU and labels `(z, y, x)`: body, lungs, spine (label 7) and `n_lesions` plaques (1-4)."""
    rng = np.random.default_rng(seed)
    depth, height, width = SHAPE
    yy, xx = np.mgrid[:height, :width]
    body = ((yy - height / 2) / (0.42 * height)) ** 2 + ((xx - width / 2) / (0.48 * width)) ** 2 < 1
    hu_slice = np.where(body, 40.0, -1000.0).astype(np.float32)
    lungs = ((((yy - 0.45 * height) / (0.22 * height)) ** 2
              + ((np.abs(xx - width / 2) - 0.2 * width) / (0.12 * width)) ** 2) < 1)
    hu_slice[lungs] = -850.0
    spine = ((yy - 0.8 * height) ** 2 + (xx - width / 2) ** 2) < (0.06 * height) ** 2
    hu = np.repeat(hu_slice[None], depth, axis=0)
    hu += rng.normal(0.0, 15.0, size=SHAPE).astype(np.float32)
    labels = np.zeros(SHAPE, np.int16)
    hu[:, spine] = rng.uniform(700.0, 1200.0, size=(depth, int(spine.sum()))).astype(np.float32)
    labels[:, spine] = 7  # bone-like, annotated non-coronary: must never be scored
    for _ in range(n_lesions):
        z = int(rng.integers(0, depth))
        cy, cx = rng.integers(int(0.3 * height), int(0.6 * height)), rng.integers(
            int(0.3 * width), int(0.7 * width))
        radius = float(rng.uniform(0.8, 5.0))
        peak = float(rng.uniform(140.0, 900.0))
        r = int(np.ceil(radius)) + 1
        window = (z, slice(cy - r, cy + r + 1), slice(cx - r, cx + r + 1))
        dy, dx = np.mgrid[-r:r + 1, -r:r + 1]
        distance = np.hypot(dy, dx)
        inside = distance <= radius
        plaque = peak * np.clip(1.0 - 0.5 * distance / max(radius, 1.0), 0.0, 1.0)
        hu[window] = np.where(inside, np.maximum(hu[window], plaque), hu[window])
        rim = distance <= radius + 1.0 if rng.random() < 0.5 else inside
        labels[window] = np.where(rim, int(rng.integers(1, 5)), labels[window])
    return hu, labels


def per_slice_agatston(hu: np.ndarray, labels: np.ndarray, spacing_zyx_mm) -> float:
    """The straightforward alternative, for comparison: a 2D `ndimage.label` per slice and label."""
    spacing_z, spacing_y, spacing_x = spacing_zyx_mm
    total = 0.0
    eight = np.ones((3, 3), dtype=bool)
    for z in range(hu.shape[0]):
        calcium = hu[z] >= 130.0
        for value in (1, 2, 3, 4):
            mask = calcium & (labels[z] == value)
            components, n = ndimage.label(mask, structure=eight)
            if n == 0:
                continue
            # Statistics over the candidate pixels only (ndimage.maximum argsorts its input).
            ids, values = components[mask], hu[z][mask]
            index = np.arange(1, n + 1)
            area = np.bincount(ids, minlength=n + 1)[1:] * spacing_y * spacing_x
            peak = ndimage.maximum(values, ids, index)
            weight = 1 + np.searchsorted([200.0, 300.0, 400.0], peak, side="right")
            total += float(np.sum((area * weight)[area >= 1.0]))
    return total * spacing_z / 3.0


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _median_seconds(function, repeats: int) -> tuple[float, list[float]]:
    function()  # warm-up: page in the arrays, import-time costs
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def main(argv: list[str] | None = None) -> int:
    """Times the scorer and writes the results files."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed repeats (median reported)")
    parser.add_argument("--lesions", type=int, default=300, help="plaques to draw")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the synthetic study")
    parser.add_argument("--out", type=Path, default=RESULTS,
                        help="folder for bench_scoring.json and .md")
    args = parser.parse_args(argv)

    hu, labels = synthetic_study(args.lesions, args.seed)
    result = agatston_score(hu, labels, SPACING_ZYX_MM)
    score_s, score_times = _median_seconds(
        lambda: agatston_score(hu, labels, SPACING_ZYX_MM), args.repeats)
    passes_s, _ = _median_seconds(lambda: ((labels >= 1) & (hu >= 130.0)).sum(), args.repeats)
    per_slice_s, _ = _median_seconds(
        lambda: per_slice_agatston(hu, labels, SPACING_ZYX_MM), args.repeats)
    per_slice_total = per_slice_agatston(hu, labels, SPACING_ZYX_MM)
    if not np.isclose(per_slice_total, result.agatston, rtol=1e-9):
        raise AssertionError(f"per-slice reference {per_slice_total} != scorer {result.agatston}")

    record = {
        "benchmark": "bench_scoring",
        "shape_zyx": list(SHAPE),
        "spacing_zyx_mm": list(SPACING_ZYX_MM),
        "lesions_drawn": args.lesions,
        "lesions_counted": len(result.lesions),
        "agatston": result.agatston,
        "repeats": args.repeats,
        "score_median_s": score_s,
        "score_times_s": score_times,
        "two_threshold_passes_median_s": passes_s,
        "score_over_two_passes": score_s / passes_s,
        "per_slice_loop_median_s": per_slice_s,
        "per_slice_loop_over_score": per_slice_s / score_s,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "machine": platform.machine(),
        "processor": _cpu_model(),
        "command": "python benchmarks/bench_scoring.py" + (
            f" --repeats {args.repeats}" if args.repeats != 7 else ""),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "bench_scoring.json", json.dumps(record, indent=2) + "\n")
    markdown = (
        "# Agatston scoring benchmark\n\n"
        f"`{record['command']}`\n\n"
        "| volume (z, y, x) | lesions counted | `agatston_score` | per-slice 2D loop "
        "| two threshold passes |\n|---|---|---|---|---|\n"
        f"| {SHAPE[0]} x {SHAPE[1]} x {SHAPE[2]} | {len(result.lesions)} | "
        f"{score_s * 1e3:.0f} ms (1x) | {per_slice_s * 1e3:.0f} ms "
        f"({per_slice_s / score_s:.1f}x) | {passes_s * 1e3:.0f} ms ({passes_s / score_s:.2f}x) |\n\n"
        f"Median of {args.repeats} repeats after one warm-up, one process, numpy {np.__version__}, "
        f"Python {platform.python_version()}, {record['processor']}. Timed side by side in one run: "
        "the per-slice loop (one 2D `ndimage.label` per slice and label, same total checked) and "
        "two threshold passes over the volume (`(labels >= 1) & (hu >= 130)`, a lower bound for "
        "any scorer), so the ratios hold on a loaded machine.\n")
    atomic_write_text(args.out / "bench_scoring.md", markdown)
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
