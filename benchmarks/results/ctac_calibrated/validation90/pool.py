"""The fresh patients' merged manifest, the naive threshold's results and each system's argmax
results from `benchmarks/operating_point.py` scans, for `cac-jax evaluate` (RUN.md).

    PYTHONPATH=. python pool.py OUT NAME=PROBE[,PROBE] ... -- MANIFEST [MANIFEST ...]
"""
import json
import sys
from pathlib import Path

from cac_jax.demo import naive_results
from cac_jax.results import write_results
from cac_jax.scoring import CATEGORY_NAMES
from data_pipeline.manifest import read_manifest, write_manifest

args = sys.argv[1:]
cut = args.index("--")
out, systems, manifests = Path(args[0]), args[1:cut], args[cut + 1:]
out.mkdir(parents=True, exist_ok=True)
rows = [r for m in manifests for r in read_manifest(m)]
write_manifest(out / "manifest.csv", rows)
if not (out / "naive.csv").exists():
    naive_results(out / "manifest.csv", out / "naive.csv")
for spec in systems:
    name, _, probes = spec.partition("=")
    scans = {}
    for probe in probes.split(","):
        for line in (Path(probe) / "scans.jsonl").read_text().splitlines():
            record = json.loads(line)
            scans[record["scan_id"]] = record["scores"]["argmax"]
    results = []
    for row in rows:
        agatston, category = scans[row.scan_id]
        results.append(dict(scan_id=row.scan_id, image=str(row.image), protocol=row.protocol,
                            status="ok", agatston=agatston, category=category,
                            category_name=CATEGORY_NAMES[category], heart_model="heart_convlstm",
                            calcium_model=name))
    write_results(out / f"{name}.csv", results)
    print(name, len(results), "scans")
