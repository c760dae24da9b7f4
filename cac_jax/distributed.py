"""Multi-host helpers of training: joining the cluster, agreeing between hosts, preemption.

- `setup(config)`: `jax.distributed.initialize()` when the config (`train.distributed.mode`) or
  the environment (SLURM with several tasks, a TPU pod on GKE or on TPU VMs) asks for it. Under
  SLURM JAX gives each process the GPU numbered by its `SLURM_LOCALID`, so the launch script
  starts one task per GPU (`launch/slurm_multinode.sbatch`, docs/cluster.md).
- `device_counts()` and `check_host_accelerators()`: the global and per-host device counts
  (recorded in `summary.json`), and a refusal when the processes of a host drive fewer
  accelerators than the host was given (the idle GPUs of a one-task-per-node SLURM launch).
- `any_process`, `max_processes`, `sum_processes`, `agree_on_step`: small all-gathers every host
  makes at the same step (`allgather` is the one place that talks to the other hosts).
- `Preemption`: SIGTERM sets a flag the loop polls every step (docs/cluster.md).
- `replicate`, `local_array`, `unreplicate`, `shard_batch`: pmap's replicated layout over the
  named data-parallel axis `AXIS`, and this host's share of it.
"""

from __future__ import annotations

import glob
import os
import signal
import socket
import zlib

import jax
import numpy as np

from data_pipeline.errors import InputError

AXIS = "batch"  # the named data-parallel axis of pmap (and of synchronised BatchNorm)


class ClusterError(InputError):
    """The hosts of a multi-host run disagree, or a host does not use its accelerators."""


# ----------------------------------------------------------------------------------------------
# Joining the cluster


def _jax_cluster_processes() -> int:
    """Processes of the cluster JAX's own detectors find (SLURM, GKE or GCE TPU VMs, ...);
    1 when none is found. On a TPU VM this asks the metadata server, as `initialize()` would."""
    try:
        from jax._src.clusters import ClusterEnv
    except ImportError:  # JAX moved its detectors: only the environment variables below count
        return 1
    for env in ClusterEnv._cluster_types:
        if getattr(env, "opt_in_only_method", False):
            continue
        try:
            if env.is_env_present():
                return int(env.get_process_count())
        except Exception:  # noqa: BLE001 (a detector that cannot answer: not that cluster)
            continue
    return 1


def _on_tpu_vm() -> bool:
    return bool(glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*"))


def needs_initialize() -> bool:
    """Whether this process is one of several of a cluster job (`train.distributed.mode=auto`)."""
    if int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1:
        return True
    if os.environ.get("TPU_WORKER_HOSTNAMES", "").count(","):
        return True
    # A TPU VM pod (no GKE variables): JAX's detector reads the worker list from the metadata
    # server; a single-host TPU VM reports one process.
    return _on_tpu_vm() and _jax_cluster_processes() > 1


def setup(config) -> None:
    """jax.distributed.initialize() when the config or the environment asks for several hosts."""
    d = config.train.distributed
    mode = str(d.mode)
    if mode == "off" or jax.distributed.is_initialized():
        return
    if mode == "explicit":
        # CPU collectives across processes go through gloo (loopback or a cluster network); the
        # setting only concerns the CPU backend, so it is harmless on accelerator hosts.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(str(d.coordinator_address), int(d.num_processes),
                                   int(d.process_id))
        return
    if mode != "auto":
        raise InputError(None, f"config.train.distributed.mode={mode!r}: expected auto, "
                               f"explicit or off")
    if needs_initialize():
        jax.distributed.initialize()


# ----------------------------------------------------------------------------------------------
# Agreement between hosts


def allgather(value) -> np.ndarray:
    """`value` of every process stacked on a new leading axis (process order), its dtype kept.

    The gather goes through JAX arrays, which without 64-bit mode hold 32-bit values: 8-byte
    values travel as pairs of int32 words and come back bit for bit."""
    value = np.asarray(value)
    if jax.process_count() == 1:
        return value[None]
    from jax.experimental import multihost_utils

    if value.dtype.itemsize != 8:
        return np.asarray(multihost_utils.process_allgather(value))
    words = np.ascontiguousarray(value).reshape(*value.shape, 1).view(np.int32)
    gathered = np.ascontiguousarray(np.asarray(multihost_utils.process_allgather(words)),
                                    dtype=np.int32)
    return gathered.view(value.dtype).reshape(gathered.shape[0], *value.shape)


def any_process(flag: bool) -> bool:
    if jax.process_count() == 1:
        return bool(flag)
    return bool(np.any(allgather(np.asarray(flag, np.int32))))


def sum_processes(array: np.ndarray) -> np.ndarray:
    if jax.process_count() == 1:
        return array
    return allgather(array).sum(axis=0)


def max_processes(value: float) -> float:
    """The largest `value` over all processes (each process passes its own)."""
    if jax.process_count() == 1:
        return value
    return float(np.max(allgather(np.asarray(value, np.float32))))


def agree_on_step(step: int | None, where: str) -> None:
    """Refuse to go on unless every host restored the same checkpoint step (-1: none).

    Hosts that resumed from different steps would average gradients of different models under
    `pmean` and diverge silently (a checkpoint folder not yet visible to every host of a shared
    file system, a host given another workdir)."""
    steps = allgather(np.asarray(-1 if step is None else int(step), np.int64)).reshape(-1)
    if len(set(steps.tolist())) > 1:
        found = ", ".join(f"process {i}: {'none' if s < 0 else s}" for i, s in enumerate(steps))
        raise ClusterError(where, f"the hosts resume from different checkpoints ({found}); "
                                  "every host must see the same workdir")


# ----------------------------------------------------------------------------------------------
# Devices


def device_counts(local_devices) -> dict:
    """Devices this run maps over: global, this process's, per host (counted over processes)."""
    local = len(local_devices)
    host = zlib.crc32(socket.gethostname().encode())
    gathered = allgather(np.asarray([host, local], np.int64)).reshape(-1, 2)
    per_host: dict[int, int] = {}
    for h, n in gathered.tolist():
        per_host[h] = per_host.get(h, 0) + n
    return {"global_devices": int(gathered[:, 1].sum()), "local_devices": local,
            "processes": int(jax.process_count()), "hosts": len(per_host),
            "host_devices": int(per_host[host]), "platform": local_devices[0].platform}


def host_accelerators(platform: str) -> int | None:
    """Accelerators this machine was given (None: unknown, or a CPU run).

    GPUs: the job's allocation (`SLURM_GPUS_ON_NODE`), else `CUDA_VISIBLE_DEVICES`, else the
    `/dev/nvidiaN` device files; TPUs: the `/dev/accelN` (or `/dev/vfio/N`) device files."""
    if platform == "gpu":
        given = os.environ.get("SLURM_GPUS_ON_NODE", "")
        if given.isdigit():
            return int(given)
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible is not None:
            return len([v for v in visible.split(",") if v.strip()])
        found = glob.glob("/dev/nvidia[0-9]*")
        return len(found) or None
    if platform == "tpu":
        found = glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*")
        return len(found) or None
    return None


def check_host_accelerators(counts: dict, num_devices_setting: int = 0) -> None:
    """Refuse a run whose processes on this host drive fewer accelerators than it has.

    `config.train.num_devices` (a deliberate subset, single process) turns the check off."""
    if num_devices_setting:
        return
    have = host_accelerators(counts["platform"])
    used = counts["host_devices"]
    if have is not None and used < have:
        raise ClusterError(None, f"this host ({socket.gethostname()}) has {have} "
                                 f"{counts['platform'].upper()}s but the run's processes here use "
                                 f"{used}; start one process per accelerator (see "
                                 "launch/slurm_multinode.sbatch) or limit the visible devices "
                                 "(CUDA_VISIBLE_DEVICES)")


# ----------------------------------------------------------------------------------------------
# Preemption


class Preemption:
    """SIGTERM (SLURM, TPU preemption) sets a flag; the loop polls it every step and during
    evaluation, and hosts agree on it at a cadence (`train.log_every` steps)."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: no handler (the caller handles signals)
            self._previous = None
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


# ----------------------------------------------------------------------------------------------
# pmap's replicated layout


def replicate(tree, devices):
    """One copy of `tree` per device, stacked on a leading axis sharded over `devices` (pmap's
    input layout), without a host-side stack of the copies.

    With several processes pmap spans every process's devices and takes this host's share as
    host arrays (local devices, ...), so the copies are stacked on the host instead.
    """
    if jax.process_count() > 1:
        return jax.tree.map(lambda x: np.broadcast_to(np.asarray(x)[None],
                                                      (len(devices), *np.shape(x))), tree)
    sharding = jax.sharding.NamedSharding(jax.sharding.Mesh(np.asarray(devices), (AXIS,)),
                                          jax.sharding.PartitionSpec(AXIS))

    def put(x):
        x = np.asarray(x)
        return jax.make_array_from_callback((len(devices), *x.shape), sharding,
                                            lambda index: x[None])

    return jax.tree.map(put, tree)


def local_array(x) -> np.ndarray:
    """This host's rows of a pmapped array (leading axis = local devices) as numpy.

    With several processes a pmap output is not fully addressable: read its local shards.
    """
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        shards = sorted(x.addressable_shards, key=lambda shard: shard.index[0].start or 0)
        parts = [np.asarray(shard.data) for shard in shards]
        return np.concatenate([p if p.ndim == x.ndim else p[None] for p in parts])
    return np.asarray(x)


def unreplicate(tree):
    """The first local copy of a replicated pytree, as host arrays."""
    return jax.tree.map(lambda x: local_array(x)[0], tree)


def shard_batch(batch: dict, keys=("image", "label", "weight", "candidate")) -> dict:
    """The arrays the step needs (strings such as `scan_id` stay on the host)."""
    return {k: batch[k] for k in keys if k in batch}
