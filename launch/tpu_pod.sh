#!/usr/bin/env bash
# TPU VM pod: run the same training command on every worker of the pod, detached from ssh.
#   launch/tpu_pod.sh TPU_NAME ZONE configs/convlstm_calcium.py gs://bucket/runs/convlstm_calcium [--config.KEY=VALUE ...]
# Every worker needs the repository at ~/cac-jax with `pip install -e ".[tpu]"` in .venv (the first
# command below does it) and the dataset on a path all workers read (config.data.data_dir, e.g. a
# gs:// bucket). jax.distributed.initialize() finds the pod's workers itself
# (config.train.distributed.mode=auto: on TPU VMs from the metadata server, on GKE from
# TPU_WORKER_HOSTNAMES); each worker feeds its own shard of the scans.
# The training runs under nohup with its output in ~/cac-jax-train.log on each worker, so closing
# this ssh session (or losing the connection) does not stop it. Follow it with
#   gcloud compute tpus tpu-vm ssh TPU_NAME --zone ZONE --worker=0 --command 'tail -f ~/cac-jax-train.log'
# Preempted or stopped (SIGTERM): a checkpoint is saved and the exit code is 143; running this
# script again resumes from it (docs/cluster.md).
set -euo pipefail
TPU=${1:?usage: launch/tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR [--config.KEY=VALUE ...]}
ZONE=${2:?zone}
CONFIG=${3:?config}
WORKDIR=${4:?workdir}
shift 4
EXTRA=$(printf ' %q' "$@")
REPO=${REPO:-https://github.com/cac-jax/cac-jax.git}
gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all --command "
  set -e
  test -d ~/cac-jax || git clone $REPO ~/cac-jax
  cd ~/cac-jax
  test -x .venv/bin/python || (python3 -m venv .venv && .venv/bin/pip install -q -c constraints.txt -e '.[tpu]')
"
gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all --command "
  cd ~/cac-jax && TF_CPP_MIN_LOG_LEVEL=2 nohup .venv/bin/python -m cac_jax.main \
    --config $CONFIG --workdir $WORKDIR --config.train.distributed.mode=auto$EXTRA \
    > ~/cac-jax-train.log 2>&1 < /dev/null &
  echo \"started on \$(hostname): ~/cac-jax-train.log\"
"
