#!/usr/bin/env bash
# Train on this machine's CPU (one process, one device).
#   launch/local_cpu.sh configs/convlstm_calcium.py:local /tmp/convlstm_calcium [--config.KEY=VALUE ...]
# Set DEVICES=N to split the CPU into N virtual devices (tests the data-parallel path; no speed-up).
set -euo pipefail
CONFIG=${1:?usage: launch/local_cpu.sh CONFIG WORKDIR [--config.KEY=VALUE ...]}
WORKDIR=${2:?usage: launch/local_cpu.sh CONFIG WORKDIR [--config.KEY=VALUE ...]}
shift 2
cd "$(dirname "$0")/.."
export JAX_PLATFORMS=cpu
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}
if [[ -n "${DEVICES:-}" ]]; then
  export XLA_FLAGS="--xla_force_host_platform_device_count=${DEVICES} ${XLA_FLAGS:-}"
fi
exec .venv/bin/python -m cac_jax.main --config "$CONFIG" --workdir "$WORKDIR" "$@"
