#!/usr/bin/env bash
# Train on one host with all its GPUs (one process; pmap over the local GPUs).
#   launch/gpu_host.sh configs/convlstm_calcium.py /data/runs/convlstm_calcium [--config.KEY=VALUE ...]
# Needs the CUDA extra: .venv/bin/pip install -e ".[cuda12]". config.train.batch_size is global:
# it must divide by the number of GPUs. CUDA_VISIBLE_DEVICES picks a subset.
set -euo pipefail
CONFIG=${1:?usage: launch/gpu_host.sh CONFIG WORKDIR [--config.KEY=VALUE ...]}
WORKDIR=${2:?usage: launch/gpu_host.sh CONFIG WORKDIR [--config.KEY=VALUE ...]}
shift 2
cd "$(dirname "$0")/.."
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}
# Let XLA take GPU memory as it needs it rather than 75% up front (the input pipeline shares the host).
export XLA_PYTHON_CLIENT_PREALLOCATE=${XLA_PYTHON_CLIENT_PREALLOCATE:-false}
exec .venv/bin/python -m cac_jax.main --config "$CONFIG" --workdir "$WORKDIR" \
  --config.train.distributed.mode=off "$@"
