"""Benchmark: synthetic-cohort generation speed, and how wrong a naive threshold scorer is on it.

Run:  python benchmarks/bench_phantom.py [--patients 40] [--size 256] [--workers 2] [--seed 0]
                                         [--scan-repeats 3] [--out DIR]

1. One 512 x 512 scan, one process: `render_patient(..., ("cac",), 512)` (anatomy, noise, the
   plaque design loop that meets the target category, labels, true score) and the extra time for
   the same patient's CTAC scan; median over `--scan-repeats` patients (categories 1-3, which have
   plaques; category 0 is faster).
2. The demo cohort: `generate_cohort` with `--patients` at `--size` px, both protocols, written as
   DICOM + NIfTI + manifest with `--workers` processes (wall time, includes process start-up).
3. The naive baseline on that written cohort, read back from the files: HU >= 130 inside the true
   heart mask, all counted as coronary, scored with `cac_jax.scoring.agatston_score`; its share of
   wrong categories and its linearly weighted Cohen's kappa (sklearn) against the true categories,
   per protocol.
The machine is shared (2 cores): absolute times carry the load of the moment, reported alongside.
Writes benchmarks/results/bench_phantom.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from cac_jax.baselines import threshold_score
from cac_jax.scoring import cac_category
from data_pipeline.atomic import atomic_write_text
from data_pipeline.io import read_labels, read_study
from data_pipeline.phantom import generate_cohort, patient_seed, render_patient

RESULTS = Path(__file__).resolve().parent / "results"


def time_512(repeats: int, seed: int) -> dict:
    """Median seconds for one 512 px CAC scan and for the extra CTAC scan of the same patient."""
    cac_times, ctac_extra, shapes = [], [], []
    for k in range(repeats):
        category = 1 + k % 3
        ps = patient_seed(seed + 1000, k)
        start = time.perf_counter()
        cac = render_patient(ps, ("cac",), 512, category=category)["cac"]
        t_cac = time.perf_counter() - start
        start = time.perf_counter()
        both = render_patient(ps, ("cac", "ctac"), 512, category=category)
        t_both = time.perf_counter() - start
        cac_times.append(t_cac)
        ctac_extra.append(max(t_both - t_cac, 0.0))
        shapes.append({"cac": list(cac.volume.hu.shape), "ctac": list(both["ctac"].volume.hu.shape)})
    return {"cac_scan_s": statistics.median(cac_times), "ctac_scan_extra_s": statistics.median(ctac_extra),
            "cac_scan_s_all": cac_times, "ctac_scan_extra_s_all": ctac_extra, "shapes": shapes}


def naive_baseline(rows) -> dict:
    """Naive HU >= 130 in the heart mask, read back from the written files."""
    from sklearn.metrics import cohen_kappa_score

    out = {}
    for protocol in ("cac", "ctac"):
        truth, naive = [], []
        for row in rows:
            if row.protocol != protocol:
                continue
            volume = read_study(row.image)
            mask = read_labels(row.heart_mask, like=volume)
            score = threshold_score(volume.hu, mask, volume.spacing_zyx_mm).agatston
            truth.append(row.category)
            naive.append(cac_category(score))
        if not truth:
            continue
        truth_a, naive_a = np.array(truth), np.array(naive)
        out[protocol] = {
            "n": len(truth),
            "wrong_share": float(np.mean(truth_a != naive_a)),
            "kappa_linear": float(cohen_kappa_score(truth_a, naive_a, weights="linear",
                                                    labels=[0, 1, 2, 3])),
            "true_categories": truth, "naive_categories": naive,
        }
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=40)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scan-repeats", type=int, default=3)
    parser.add_argument("--out", default=None, help="cohort folder (default: a temporary one)")
    args = parser.parse_args()

    load_before = os.getloadavg()
    scan = time_512(args.scan_repeats, args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out) if args.out else Path(tmp) / "cohort"
        start = time.perf_counter()
        rows = generate_cohort(out, patients=args.patients, size=args.size, seed=args.seed,
                               workers=args.workers)
        cohort_s = time.perf_counter() - start
        naive = naive_baseline(rows)
    counts = {p: [sum(1 for r in rows if r.protocol == p and r.category == c) for c in range(4)]
              for p in ("cac", "ctac")}
    result = {
        "scan_512": scan,
        "cohort": {"patients": args.patients, "size": args.size, "workers": args.workers,
                   "seed": args.seed, "wall_s": cohort_s, "scans": len(rows),
                   "categories_per_protocol": counts},
        "naive_baseline": naive,
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "cpus": os.cpu_count(), "loadavg_before": load_before,
                    "loadavg_after": os.getloadavg()},
        "command": "python benchmarks/bench_phantom.py " + " ".join(sys.argv[1:]),
    }
    results = RESULTS
    results.mkdir(parents=True, exist_ok=True)
    atomic_write_text(results / "bench_phantom.json", json.dumps(result, indent=2) + "\n")
    md = [
        "# bench_phantom",
        "",
        f"Command: `{result['command']}` (shared {os.cpu_count()}-core machine, load average "
        f"{load_before[0]:.1f} before, {result['machine']['loadavg_after'][0]:.1f} after).",
        "",
        "| measurement | value |",
        "| --- | --- |",
        f"| one 512 px gated CAC scan ({scan['shapes'][0]['cac'][0]} slices), 1 process, median | "
        f"{scan['cac_scan_s']:.1f} s |",
        f"| + the same patient's CTAC scan at 512 px, median | {scan['ctac_scan_extra_s']:.1f} s |",
        f"| {args.patients}-patient cohort at {args.size} px, both protocols, written, "
        f"{args.workers} workers | {cohort_s:.0f} s |",
    ]
    for protocol, stats in naive.items():
        md.append(f"| naive 130 HU in heart mask, {protocol}: wrong category / linear kappa | "
                  f"{stats['wrong_share']:.0%} / {stats['kappa_linear']:.2f} (n={stats['n']}) |")
    md += ["", f"CAC categories per protocol (0, 1-100, 101-400, >400): {counts}", ""]
    atomic_write_text(results / "bench_phantom.md", "\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
