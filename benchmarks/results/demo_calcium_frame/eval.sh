#!/bin/bash
# The demo's calcium models, whole slices (A) vs heart window (B), with A's heart models, on 60
# patients the demos never saw (40 default site, 20 site2), 128 px.
set -e
M=/work/main/.venv/bin/cac-jax
for arch in convlstm unet; do
  for v in a b; do
    for c in default site2; do
      $M infer --heart-checkpoint /work/demo_a/models/heart_$arch \
        --calcium-checkpoint /work/demo_$v/models/calcium_$arch \
        --manifest /work/eval128/$c/manifest.csv --out /work/eval128/out/${arch}_${v}_$c --no-progress --overwrite
    done
  done
  for c in default site2; do
    $M evaluate --pred /work/eval128/out/${arch}_b_$c/results.csv --pred2 /work/eval128/out/${arch}_a_$c/results.csv \
      --ref /work/eval128/$c/manifest.csv --by protocol --out /work/eval128/eval/${arch}_b_vs_a_$c
  done
done
