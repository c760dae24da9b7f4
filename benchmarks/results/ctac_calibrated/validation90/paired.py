"""The training loop's validation metric from inference scores (RUN.md): the pooled paired kappa
(gated scans against their truth, CTAC scans against the same patient's gated category; linear
weights, four categories) of `benchmarks/operating_point.py` argmax scores, and its two parts.

    python paired.py PROBE[,PROBE...] MANIFEST [MANIFEST ...]
"""

import csv
import json
import sys

from sklearn.metrics import cohen_kappa_score


def kappa(truth, pred):
    return round(float(cohen_kappa_score(truth, pred, weights="linear", labels=[0, 1, 2, 3])), 3)


def main(probes: str, *manifests: str) -> None:
    scans = {}
    for probe in probes.split(","):
        with open(f"{probe}/scans.jsonl") as f:
            for line in f:
                record = json.loads(line)
                scans[record["scan_id"]] = record["scores"]["argmax"][1]
    rows = []
    for manifest in manifests:
        with open(manifest, newline="") as f:
            rows += list(csv.DictReader(f))
    gated = {r["patient_id"]: int(r["category"]) for r in rows if r["protocol"] == "cac"}
    parts = {"cac": ([], []), "ctac": ([], [])}
    for r in rows:
        if r["scan_id"] in scans:
            parts[r["protocol"]][0].append(gated[r["patient_id"]])
            parts[r["protocol"]][1].append(scans[r["scan_id"]])
    truth = parts["cac"][0] + parts["ctac"][0]
    pred = parts["cac"][1] + parts["ctac"][1]
    print(f"{probes}: {len(truth)} scans, paired {kappa(truth, pred)}, gated "
          f"{kappa(*parts['cac'])}, CTAC against gated {kappa(*parts['ctac'])}")


if __name__ == "__main__":
    main(*sys.argv[1:])
