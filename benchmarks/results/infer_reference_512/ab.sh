#!/usr/bin/env bash
# A/B of `cac-jax infer` with the reference models on 512 px synthetic studies: the commit before
# the change (a git worktree at $OLD) against this checkout, interleaved rounds, same inputs.
# Usage: bash ab.sh OLD_WORKTREE NEW_CHECKOUT MANIFEST ROUNDS
set -euo pipefail
old=$1 new=$2 manifest=$3 rounds=${4:-2}
py=$new/.venv/bin/python
export TF_CPP_MIN_LOG_LEVEL=2
for round in $(seq "$rounds"); do
  for tree in "$old" "$new"; do
    out=$(mktemp -d)
    (cd "$tree" && "$py" -m cac_jax.cli infer --heart-checkpoint "$new/models/synthetic/heart_convlstm" \
      --calcium-checkpoint "$new/models/synthetic/calcium_convlstm" --manifest "$manifest" \
      --out "$out/r" --no-progress 2>&1 | tail -1 | sed "s|^|round $round $tree: |")
    cut -d, -f1,6-11 "$out/r/results.csv" > "$out.csv"
    cp "$out.csv" "/tmp/ab_$(basename "$tree")_$round.csv"
    rm -rf "$out" "$out.csv"
  done
done
