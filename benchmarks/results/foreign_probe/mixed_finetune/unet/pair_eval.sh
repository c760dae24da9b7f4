#!/bin/bash
# pair_eval.sh WORKTREE HEART CKPT LABEL [COMPARE_LABEL]: the pair (HEART, CKPT) on every probe
# cohort (CTAC against the same patient's gated reference), the classic held-out sites pooled;
# with COMPARE_LABEL, the z-test (paired bootstrap) against that label's results.
set -e
WT=$1; HEART=$2; CKPT=$3; LABEL=$4; CMP=$5
cd $WT
PY=/work/main/.venv/bin/python
export PYTHONPATH=$WT
C=/work/study_mixed/cohorts
declare -A M=( [foreign]=/work/foreign256/manifest.csv
  [classic_default]=$C/test_default/manifest.csv [classic_lowdose]=$C/test_lowdose/manifest.csv
  [classic_sharp]=$C/test_sharp/manifest.csv [classic_unseen]=$C/unseen/manifest.csv
  [grooved_default]=$C/test_default_grooved/manifest.csv )
for c in classic_default classic_lowdose classic_sharp classic_unseen grooved_default foreign; do
  d=/work/probe/$LABEL/$c
  if [ ! -f $d/infer/results.csv ]; then
    $PY -m cac_jax.cli infer --heart-checkpoint $HEART --calcium-checkpoint $CKPT \
      --manifest ${M[$c]} --out $d/infer 2>&1 | tail -1
  fi
  [ -f $d/eval/metrics.json ] || $PY -m cac_jax.cli evaluate --pred $d/infer/results.csv \
    --ref ${M[$c]} --by protocol --ref-protocol cac --out $d/eval 2>&1 | tail -1
done
d=/work/probe/$LABEL/classic_heldout; mkdir -p $d
{ head -1 /work/probe/$LABEL/classic_default/infer/results.csv; for s in default lowdose sharp; do tail -n +2 /work/probe/$LABEL/classic_$s/infer/results.csv; done; } > $d/results.csv
cp /work/probe/ft4750/classic_heldout/manifest.csv $d/manifest.csv
[ -f $d/eval/metrics.json ] || $PY -m cac_jax.cli evaluate --pred $d/results.csv --ref $d/manifest.csv --by protocol --ref-protocol cac --out $d/eval 2>&1 | tail -1
if [ -n "$CMP" ]; then
  for c in classic_heldout classic_unseen grooved_default foreign; do
    d=/work/probe/$LABEL/$c; r=/work/probe/$CMP/$c
    p=$r/infer/results.csv; [ -f $p ] || p=$r/results.csv
    q=$d/infer/results.csv; [ -f $q ] || q=$d/results.csv
    ref=${M[$c]}; [ $c = classic_heldout ] && ref=$d/manifest.csv
    [ -f $d/ztest_vs_$CMP/metrics.json ] || $PY -m cac_jax.cli evaluate --pred $p --pred2 $q \
      --ref $ref --by protocol --ref-protocol cac --bootstrap 1000 --out $d/ztest_vs_$CMP 2>&1 | tail -1
  done
fi
