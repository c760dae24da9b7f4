#!/bin/bash
# classic_rest.sh CKPT LABEL: the classic held-out lowdose and sharp sites, then all three sites pooled.
set -e
CKPT=$1; LABEL=$2
cd /work/run-study
PY=/work/main/.venv/bin/python
export PYTHONPATH=/work/run-study
for s in lowdose sharp; do
  d=/work/probe/$LABEL/classic_$s; M=/work/study_mixed/cohorts/test_$s/manifest.csv
  [ -f $d/eval/metrics.json ] && continue
  $PY -m cac_jax.cli infer --heart-checkpoint models/synthetic/heart_convlstm \
    --calcium-checkpoint $CKPT --manifest $M --out $d/infer 2>&1 | tail -1
  $PY -m cac_jax.cli evaluate --pred $d/infer/results.csv --ref $M --by protocol \
    --ref-protocol cac --out $d/eval 2>&1 | tail -1
done
d=/work/probe/$LABEL/classic_heldout; mkdir -p $d
{ head -1 /work/probe/$LABEL/classic_default/infer/results.csv; for s in default lowdose sharp; do tail -n +2 /work/probe/$LABEL/classic_$s/infer/results.csv; done; } > $d/results.csv
python3 - $d/manifest.csv <<'PY'
import csv, pathlib, sys
rows = []
for s in ("default", "lowdose", "sharp"):
    m = pathlib.Path(f"/work/study_mixed/cohorts/test_{s}/manifest.csv")
    for r in csv.DictReader(open(m)):
        for k in ("image", "calcium_labels", "heart_mask"):
            if r[k]:
                r[k] = str(m.parent / r[k])
        rows.append(r)
with open(sys.argv[1], "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(rows[0])); w.writeheader(); w.writerows(rows)
PY
$PY -m cac_jax.cli evaluate --pred $d/results.csv --ref $d/manifest.csv --by protocol --ref-protocol cac --out $d/eval 2>&1 | tail -3
