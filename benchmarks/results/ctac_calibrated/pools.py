"""The calibrated-CTAC probe's pools: merged manifests, the naive threshold, the model's argmax
scores as results.csv, and the perfect reader's kappa (RUN.md).

    PYTHONPATH=. python benchmarks/results/ctac_calibrated/pools.py COHORTS PROBE OUT [SYSTEM]

COHORTS holds the cohorts test_default, test_lowdose, test_sharp and unseen (`cac-jax synth`),
PROBE the `benchmarks/operating_point.py` output on them (scans.jsonl). Writes, per pool
(held-out, unseen): OUT/POOL/manifest.csv, OUT/POOL/naive.csv (the 130 HU threshold in the true
heart, `cac_jax.demo.naive_results`; kept when it is there), OUT/POOL/SYSTEM.csv (each scan's argmax
Agatston score and category from scans.jsonl, which the probe checked against `Scorer.score`;
SYSTEM `convlstm`, the default, or `unet`: the reference pair the probe ran), and prints the kappa
of the CTAC truth against the gated truth (scikit-learn, linear weights, four categories).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from sklearn.metrics import cohen_kappa_score

from cac_jax.demo import naive_results
from cac_jax.results import write_results
from cac_jax.scoring import CATEGORY_NAMES
from data_pipeline.manifest import read_manifest, write_manifest

POOLS = {"held-out": ("test_default", "test_lowdose", "test_sharp"), "unseen": ("unseen",)}


def main(cohorts: Path, probe: Path, out: Path, system: str = "convlstm") -> None:
    scans = {}
    for line in (probe / "scans.jsonl").read_text().splitlines():
        record = json.loads(line)
        scans[record["scan_id"]] = record
    for pool, names in POOLS.items():
        rows = [row for name in names for row in read_manifest(cohorts / name / "manifest.csv")]
        folder = out / pool
        folder.mkdir(parents=True, exist_ok=True)
        write_manifest(folder / "manifest.csv", rows)
        if not (folder / "naive.csv").exists():
            naive_results(folder / "manifest.csv", folder / "naive.csv")
        results = []
        for row in rows:
            agatston, category = scans[row.scan_id]["scores"]["argmax"]
            results.append(dict(scan_id=row.scan_id, image=str(row.image), protocol=row.protocol,
                                status="ok", agatston=agatston, category=category,
                                category_name=CATEGORY_NAMES[category],
                                heart_model=f"models/synthetic/heart_{system}",
                                calcium_model=f"models/synthetic/calcium_{system}"))
        write_results(folder / f"{system}.csv", results)
        gated = {r.patient_id: r.category for r in rows if r.protocol == "cac"}
        ctac = {r.patient_id: r.category for r in rows if r.protocol == "ctac"}
        ids = sorted(gated)
        kappa = cohen_kappa_score([gated[i] for i in ids], [ctac[i] for i in ids],
                                  weights="linear", labels=[0, 1, 2, 3])
        print(f"{pool}: {len(ids)} patients; perfect reader (CTAC truth vs gated) {kappa:.3f}")


if __name__ == "__main__":
    main(*map(Path, sys.argv[1:4]), *sys.argv[4:5])
