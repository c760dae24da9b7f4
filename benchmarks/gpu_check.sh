#!/usr/bin/env bash
# Every accelerator measurement of the project in one prepared script (about 5-7 minutes on one
# GPU at full size). Run it on a GPU machine whose Python has JAX with CUDA
# (pip install -e ".[cuda12,torch]" -c constraints.txt; torch with CUDA for the PyTorch column):
#
#   bash benchmarks/gpu_check.sh                      # results under benchmarks/results/gpu/
#   GPU_CHECK_TINY=1 bash benchmarks/gpu_check.sh     # tiny :local models at 64 px (checks the
#                                                     # script itself on a CPU in a minute or two)
#
# Environment: PYTHON (default .venv/bin/python), GPU_CHECK_OUT (output folder),
# GPU_CHECK_TORCH_COMPILE=1 (also time torch.compile; adds minutes of compilation).
#
# What it measures (each step writes bench.json/.md/.png in its own folder; summary.md at the end):
# 1. training step time, step/forward ratio and peak device memory of the ConvLSTM and UNet-64 at
#    512 px, global batch 16, in bfloat16 and float32 (the paper: 13.11 vs 22.31 GB training
#    memory): one process per model and dtype, because the device's peak is process-wide;
# 2. the timing study: per-sample inference (16 slices) of the three models, JAX vs PyTorch
#    (eager, channels_last), bfloat16, median and IQR, rank-sum tests;
# 3. the accelerator tests (pytest -m gpu).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-.venv/bin/python}
# JAX and PyTorch share the GPU in one process: JAX must not preallocate 75% of its memory.
# Its peak_bytes_in_use still counts what the step really used.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
OUT=${GPU_CHECK_OUT:-benchmarks/results/gpu}
if [[ "${GPU_CHECK_TINY:-0}" == 1 ]]; then
  SIZE=64; BATCH=2; SAMPLES=2; SLICES=2; REPEATS=1; LOCAL=(--local)
else
  SIZE=512; BATCH=16; SAMPLES=32; SLICES=16; REPEATS=5; LOCAL=()
fi
mkdir -p "$OUT"
START=$(date +%s)
log() { echo "[gpu_check $(( $(date +%s) - START ))s] $*" | tee -a "$OUT/gpu_check.log"; }

BACKEND=$("$PY" -c 'import jax; print(jax.default_backend())')
if [[ "$BACKEND" == cpu && "${GPU_CHECK_TINY:-0}" != 1 ]]; then
  echo "gpu_check: JAX sees no GPU/TPU (backend cpu); install jax[cuda12] or set GPU_CHECK_TINY=1" >&2
  exit 2
fi
{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "jax backend: $BACKEND"
  "$PY" -c 'import jax; print("jax", jax.__version__, jax.devices())'
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
} > "$OUT/device.txt" 2>&1 || true
log "device: $(tr '\n' ' ' < "$OUT/device.txt")"

FRAMEWORKS=jax
if "$PY" -c 'import torch' 2>/dev/null; then FRAMEWORKS=jax,torch; fi
COMPILE=(--no-torch-compile)
[[ "${GPU_CHECK_TORCH_COMPILE:-0}" == 1 ]] && COMPILE=()

# 1. Training step and memory: one process per (model, dtype).
for model in convlstm unet64; do
  for dtype in bfloat16 float32; do
    log "training step: $model $dtype, batch $BATCH, $SIZE px"
    "$PY" -m cac_jax.cli bench --models "$model" --frameworks "$FRAMEWORKS" "${COMPILE[@]}" \
      --samples 1 --slices 1 --size "$SIZE" "${LOCAL[@]}" --dtype "$dtype" \
      --train-step --train-batch "$BATCH" --train-repeats "$REPEATS" \
      --out "$OUT/train_${model}_${dtype}" > /dev/null 2>> "$OUT/gpu_check.log"
  done
done

# 2. The timing study, JAX vs PyTorch, bfloat16.
log "timing study: $SAMPLES samples of $SLICES slices, $FRAMEWORKS"
"$PY" -m cac_jax.cli bench --frameworks "$FRAMEWORKS" "${COMPILE[@]}" --samples "$SAMPLES" \
  --slices "$SLICES" --size "$SIZE" "${LOCAL[@]}" --dtype bfloat16 \
  --out "$OUT/timing_bf16" > /dev/null 2>> "$OUT/gpu_check.log"

# 3. Accelerator tests (skipped by pytest where JAX sees no GPU/TPU).
log "pytest -m gpu"
"$PY" -m pytest -m gpu tests/test_gpu.py -q -p no:cacheprovider > "$OUT/pytest_gpu.txt" 2>&1 \
  || log "pytest -m gpu failed (see pytest_gpu.txt)"

# Summary: one table of the training steps, then the timing study's report.
"$PY" - "$OUT" <<'EOF'
import json, pathlib, sys

out = pathlib.Path(sys.argv[1])
lines = ["# gpu_check summary", "", "```", (out / "device.txt").read_text().strip(), "```", "",
         "| model | dtype | framework | batch | step s | forward s | step/forward | peak GiB |",
         "|---|---|---|---:|---:|---:|---:|---:|"]
for path in sorted(out.glob("train_*/bench.json")):
    res = json.loads(path.read_text())
    for fw, models in res["train_step"].items():
        if fw == "torch":
            continue
        for name, r in models.items():
            lines.append(f"| {name} | {res['settings']['dtype']} | {fw} | {r['batch']} | "
                         f"{r['step_s']:.4f} | {r['forward_s']:.4f} | {r['step_over_forward']:.2f}"
                         f" | {r['peak_memory_bytes'] / 2**30:.2f} |")
timing = out / "timing_bf16" / "bench.md"
if timing.exists():
    lines += ["", timing.read_text()]
(out / "summary.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
log "done: $OUT/summary.md"
