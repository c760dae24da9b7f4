"""Training: the data-parallel focal-loss step, validation, and the loop with Orbax checkpoints.

`train_and_evaluate(config, workdir)` runs (or resumes) one experiment (docs/training.md):
- the step is a per-device function with explicit collectives over the named axis `AXIS`
  (`lax.pmean` of gradients, BatchNorm statistics and metrics), mapped over the local devices with
  `jax.pmap`; the state is replicated. Multi-host: `jax.distributed.initialize()` first, each host
  feeds its own shard (`make_dataset(process_index=...)`);
- Adam (learning rate 1e-3, paper) with the rate scaled by `optax.contrib.reduce_on_plateau` stepped
  on the validation loss at each evaluation, and optionally annealed to 0 at the end of the run's
  step or time budget (`anneal_factor`), early stopping on `config.train.best_metric`;
- everything periodic (logging, evaluation, plateau, early stop, checkpoints) happens at global
  step counts, so every host does it at the same step even though hosts' epochs differ in length;
- validation: loss, Dice per class, and per-scan Agatston categories with the linearly weighted
  kappa the paper reports (calcium model: predicted coronary class at HU >= 130 inside the
  reference heart mask, scored by `cac_jax.postprocess`, the code inference uses; heart model:
  the naive 130 HU threshold inside the predicted heart silhouette);
- the workdir: `config.json`, `checkpoints/` (Orbax: latest K plus best; see `cac_jax.checkpoints`),
  `metrics.jsonl`, TensorBoard events in `tensorboard/`, and `summary.json` at the end.
A run killed at any point resumes from its latest complete checkpoint with the same command and
continues the same sequence (model and optimizer state, the step from which the seeded input
pipeline resumes, plateau and early-stop state are saved); SIGTERM saves a checkpoint before
exiting. Multi-host agreement, preemption, the start-up guards and the faults reported as one
line: docs/cluster.md (`cac_jax.distributed`, `cac_jax.train_support`).

Modules: this one holds the config checks, the set-up (`_start`, `_check_data_and_workdir`) and
the loop (`_Run`: its set-up, the body of a step, the decisions after each step and evaluation);
`cac_jax.steps` the model, optimizer and per-device steps; `cac_jax.validation` the validation
metrics; `cac_jax.checkpoints` restoring and saving the training state; `cac_jax.train_start`
the state a run starts from (its own checkpoint, or `train.init_from`'s model).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import time
from collections import deque
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cac_jax import checkpoints as ckpt_lib
from cac_jax import config_defaults
from cac_jax import distributed as dist
from cac_jax import train_start as start_lib
from cac_jax import train_support as support
from cac_jax.metrics_writer import MetricsWriter as _Writer
from cac_jax.metrics_writer import json_safe as _json_safe
from cac_jax.models import shares_slices
from cac_jax.models.config import NUM_CLASSES
from cac_jax.steps import (  # noqa: F401  (loss_weight: re-exported for tests and benchmarks)
    TrainState,
    _anneal_fraction,
    anneal_factor,
    eval_step,
    init_state,
    loss_weight,
    make_optimizer,
    make_plateau,
    model_for_training,
    train_step,
)
from cac_jax.validation import _reference_heart_masks, _train_pixel_spacing, evaluate, metric_names
from data_pipeline import frames as frames_lib
from data_pipeline.errors import InputError
from data_pipeline.records import EVAL_SLICES

AXIS = dist.AXIS  # the named data-parallel axis of pmap (and of synchronised BatchNorm)
# Steps dispatched but not finished on the devices that the host may run ahead by. Dispatch is
# asynchronous: unbounded, the host ran up to a log row ahead (`train.log_every` steps), and a
# SIGTERM, seen by the host, waited for all of them before the checkpoint (13-37 s measured on
# a 2-core CPU with `log_every` 25: beyond a 30 s grace period). Two keep the next batch's
# transfer and dispatch behind the running step.
MAX_STEPS_IN_FLIGHT = 2
# Keys a resumed run may change: the length of the run, when it stops (its patience is then
# counted again over the evaluations made) and how it is shown.
# model.conv_impl picks the library that runs the same convolutions (docs/onednn.md), so a run may
# resume under another.
# `train.init_from` only chooses a fresh run's start: a run with a checkpoint of its own resumes
# from it whatever the key says (docs/training.md, "Fine-tuning").
# data.per_device_batch is derived from the global batch (compared) and the device count, so a
# run may resume on another number of devices (a requeue onto another node).
RESUMABLE_KEYS = ("train.steps", "train.progress", "train.max_seconds", "model.conv_impl",
                  "train.init_from", "data.per_device_batch", *config_defaults.STOP_KEYS)
# Keys added to the configs after runs were made: a saved config without one had this value.
ADDED_KEYS = config_defaults.ADDED_KEYS

log = logging.getLogger(__name__)
# Multi-host helpers (cac_jax.distributed) under the names the loop uses.
_setup_distributed = dist.setup
_any_process, _max_processes, _sum_processes = (dist.any_process, dist.max_processes,
                                                dist.sum_processes)
_replicate, _unreplicate, _shard_batch = dist.replicate, dist.unreplicate, dist.shard_batch


class ConfigError(InputError):
    """The experiment config is inconsistent or does not fit the run (devices, data)."""


# ----------------------------------------------------------------------------------------------
# Config checks and derived settings


def flatten(config: ml_collections.ConfigDict | dict, prefix: str = "") -> dict[str, Any]:
    """{"a.b.c": value} of a (nested) config, lists for tuples."""
    data = ckpt_lib.config_to_dict(config) if isinstance(config, ml_collections.ConfigDict) \
        else config
    flat = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def check_config(config: ml_collections.ConfigDict) -> None:
    """One source of truth for the task: `config.task` must match the data and model settings."""
    task = config.get("task")
    if task not in NUM_CLASSES:
        raise ConfigError(None, f"config.task={task!r}: expected one of {sorted(NUM_CLASSES)}")
    for key, value in (("data.task", config.data.task), ("model.task", config.model.task)):
        if value != task:
            raise ConfigError(None, f"config.{key}={value!r} differs from config.task={task!r}; "
                                    f"set them alike (one task per run)")
    if int(config.model.num_classes) != NUM_CLASSES[task]:
        raise ConfigError(None, f"config.model.num_classes={config.model.num_classes} does not fit "
                                f"the {task} data's {NUM_CLASSES[task]} classes")
    alpha = tuple(config.train.focal_alpha)
    if len(alpha) != NUM_CLASSES[task]:
        raise ConfigError(None, f"config.train.focal_alpha has {len(alpha)} values; the {task} "
                                f"task has {NUM_CLASSES[task]} classes")
    try:
        frames_lib.check_frame_config(config.data)
    except ValueError as err:
        raise ConfigError(None, str(err)) from None
    # A metric validation never reports would rank every checkpoint last (or never stop).
    known = metric_names(task)
    for key in ("best_metric", "early_stop_metric"):
        name = str(config.train.get(key, "") or "")
        if (name or key == "best_metric") and name not in known:
            raise ConfigError(None, f"config.train.{key}={name!r} is not a validation metric of "
                                    f"the {task} task; expected one of {', '.join(known)}")
    eval_slices = str(config.data.get("eval_slices", "all"))
    if eval_slices not in EVAL_SLICES or (eval_slices == "heart" and task != "calcium"):
        raise ConfigError(None, f"config.data.eval_slices={eval_slices!r}: expected 'all', or "
                                f"'heart' for the calcium task (the heart model runs on every "
                                f"slice)")
    frame_key = "frame_size" if frames_lib.uses_heart_frame(config) else "image_size"
    crop, size = int(config.data.get("crop_size", 0) or 0), int(config.data[frame_key])
    if crop < 0 or crop >= size:
        raise ConfigError(None, f"config.data.crop_size={crop} must be 0 (whole frames) or less "
                                f"than config.data.{frame_key}={size}")
    decay = config.train.get("ema_decay", 0.0) or 0.0
    if not isinstance(decay, int | float) or not 0.0 <= decay < 1.0:
        raise ConfigError(None, f"config.train.ema_decay={decay} must be in [0, 1)")
    anneal = config.train.get("anneal_fraction", 0.0) or 0.0
    if not isinstance(anneal, int | float) or not 0.0 <= anneal <= 1.0:
        raise ConfigError(None, f"config.train.anneal_fraction={anneal} must be in [0, 1]")
    rate = config.train.learning_rate
    if not isinstance(rate, int | float) or not math.isfinite(rate) or rate <= 0:
        raise ConfigError(None, f"config.train.learning_rate={rate} must be a finite number > 0")
    for key in ("steps", "batch_size", "eval_every", "checkpoint_every", "log_every",
                "keep_checkpoints"):
        if int(config.train[key]) < 1:
            raise ConfigError(None, f"config.train.{key} must be >= 1, got {config.train[key]}")
    if int(config.train.early_stop_patience) < 0:
        raise ConfigError(None, "config.train.early_stop_patience must be >= 0 (0: never stop "
                                f"early), got {config.train.early_stop_patience}")


def resolve_devices(config) -> list:
    """The local devices to map over; the global batch must split evenly over all devices."""
    local = jax.local_devices()
    wanted = int(config.train.get("num_devices", 0) or 0)
    if wanted:
        if jax.process_count() > 1:
            raise ConfigError(None, "config.train.num_devices is for single-process runs; "
                                    "multi-host runs use every device")
        if wanted > len(local):
            raise ConfigError(None, f"config.train.num_devices={wanted} but only {len(local)} "
                                    f"local devices exist")
        local = local[:wanted]
    total = len(local) * jax.process_count()
    batch = int(config.train.batch_size)
    if batch % total:
        raise ConfigError(None, f"config.train.batch_size={batch} is not divisible by the "
                                f"{total} devices; use a multiple of {total}")
    return local


def stop_options(config) -> tuple[str, str]:
    """(metric name, "min" | "max") of early stopping: `train.early_stop_metric`, or the
    best-checkpoint metric when it is empty."""
    name = str(config.train.get("early_stop_metric", "") or config.train.best_metric)
    return name, ckpt_lib.metric_mode(name)


def config_differences(saved: dict, config: ml_collections.ConfigDict) -> list[str]:
    """Keys whose values differ between a workdir's config and this run's (resumable ones aside)."""
    a, b = {**ADDED_KEYS, **flatten(saved)}, {**ADDED_KEYS, **flatten(config)}
    for values in (a, b):  # the dataset folder as a path: "tfds" and "$PWD/tfds" are one folder
        folder = values.get("data.data_dir")
        if isinstance(folder, str) and folder and "://" not in folder:
            values["data.data_dir"] = os.path.abspath(os.path.expanduser(folder))
    keys = sorted(set(a) | set(b))
    return [f"{k} ({a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r})" for k in keys
            if k not in RESUMABLE_KEYS and a.get(k, "<absent>") != b.get(k, "<absent>")]


# ----------------------------------------------------------------------------------------------
# The loop


@dataclasses.dataclass
class _HostState:
    """Loop state kept on the host and saved in the checkpoint's `meta`."""

    plateau: Any  # optax ReduceLROnPlateauState
    best_value: float | None = None
    best_step: int | None = None
    evals_since_best: int = 0
    stopped_early: bool = False
    # The value that last reset early stopping's patience (with `early_stop_min_delta` 0, the
    # best value).
    patience_value: float | None = None

    def to_json(self) -> dict:
        p = self.plateau
        return {"plateau": {k: float(np.asarray(getattr(p, k))) for k in p._fields},
                "best_value": self.best_value, "best_step": self.best_step,
                "evals_since_best": self.evals_since_best, "stopped_early": self.stopped_early,
                "patience_value": self.patience_value}

    @classmethod
    def from_json(cls, data: dict, template) -> _HostState:
        plateau = template._replace(**{
            k: jnp.asarray(v, dtype=np.asarray(getattr(template, k)).dtype)
            for k, v in data["plateau"].items()})
        return cls(plateau=plateau, best_value=data.get("best_value"),
                   best_step=data.get("best_step"),
                   evals_since_best=int(data.get("evals_since_best", 0)),
                   stopped_early=bool(data.get("stopped_early", False)),
                   patience_value=data.get("patience_value", data.get("best_value")))


def _device_scale(scale: float, devices) -> jax.Array:
    """The learning-rate factor (plateau times anneal) the step multiplies its updates by,
    replicated on the local devices. Built from the host value: a device scalar would make
    the host wait for the steps in flight before it could dispatch the next one."""
    return _replicate(np.float32(scale), devices)


def _improved(value: float, best: float | None, mode: str) -> bool:
    if not math.isfinite(value):
        return False
    if best is None:
        return True
    return value < best if mode == "min" else value > best


# What the file system says in the errors of Orbax's array writer (TensorStore reports a full disk
# as `ValueError: RESOURCE_EXHAUSTED: ... No space left on device [os_error_code='28']`).
_FS_FAILURES = ("No space left on device", "Read-only file system", "Disk quota exceeded",
                "Permission denied")


def _os_error_in(err: BaseException) -> OSError | None:
    """The file-system failure behind `err` as an OSError (Orbax, TensorStore and TensorFlow
    wrap it in their own errors), or None when it is something else."""
    import re

    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError):
            return err
        text = str(err)
        for reason in _FS_FAILURES:
            if reason in text:
                paths = re.findall(r'"(/[^"]+)"', text)
                return OSError(0, reason, paths[-1] if paths else None)
        err = err.__cause__ or err.__context__
    return None


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict:
    """Train (or resume) the experiment `config` in `workdir`; returns the summary dict.

    A file-system failure (disk full, read-only folder) is reported as one `InputError` line."""
    try:
        return _train_and_evaluate(config, workdir)
    except InputError:
        raise
    except Exception as err:
        os_err = _os_error_in(err)
        if os_err is None:
            raise
        raise support.os_error(os_err, workdir) from None


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict:
    config, workdir, hosts = _start(config, workdir)
    with contextlib.ExitStack() as held:
        data_path = _check_data_and_workdir(config, workdir, hosts.is_main, held)
        run = _Run(config, workdir, hosts, data_path)
        run.train()
        return run.finish()


# ----------------------------------------------------------------------------------------------
# Set-up


@dataclasses.dataclass(frozen=True)
class _Hosts:
    """This process's devices and its place among the processes."""

    devices: list
    counts: dict  # cac_jax.distributed.device_counts
    process_index: int
    process_count: int

    @property
    def n_local(self) -> int:
        return len(self.devices)

    @property
    def n_global(self) -> int:
        return self.counts["global_devices"]

    @property
    def is_main(self) -> bool:
        return self.process_index == 0


def _start(config, workdir) -> tuple[ml_collections.ConfigDict, Any, _Hosts]:
    """Join the cluster, check the config and the devices: (our copy of the config with its
    derived fields, the workdir as an epath, the devices)."""
    _setup_distributed(config)
    check_config(config)
    workdir = support.as_path(workdir)
    devices = resolve_devices(config)
    counts = dist.device_counts(devices)
    dist.check_host_accelerators(counts, int(config.train.get("num_devices", 0) or 0))
    hosts = _Hosts(devices, counts, jax.process_index(), jax.process_count())
    if hosts.is_main:
        log.info("devices: %d global (%s), %d in this process, %d on this host, %d process(es) "
                 "on %d host(s)", hosts.n_global, counts["platform"], hosts.n_local,
                 counts["host_devices"], hosts.process_count, counts["hosts"])
    config = ml_collections.ConfigDict(config)  # our copy: derived fields are set below
    with config.unlocked():
        config.data.per_device_batch = int(config.train.batch_size) // hosts.n_global
    if config.data.get("seed") is None:
        with config.unlocked():
            config.data.seed = int(config.seed)
    return config, workdir, hosts


def _check_data_and_workdir(config, workdir, is_main: bool, held: contextlib.ExitStack):
    """The dataset's path, after refusing a missing dataset, an unusable workdir, a workdir
    another live run writes into (its lock then stays `held`) or a workdir holding a run of
    another config (which keys differ); writes `config.json`. A `config.json` without a
    checkpoint beside it (a start refused before its first step) is replaced."""
    from data_pipeline.input_pipeline import dataset_path

    data_path = dataset_path(config.data)
    if not (data_path / "dataset_info.json").exists():  # before any compilation
        raise InputError(data_path, "no dataset here; build it with `cac-jax ingest --manifest "
                                    f"M.csv --data-dir {config.data.data_dir} --name "
                                    f"{config.data.name}`")
    support.check_workdir(workdir, is_main)
    held.enter_context(support.workdir_lock(workdir, is_main))
    config_file = workdir / ckpt_lib.CONFIG_FILE
    if config_file.exists() and ckpt_lib.has_checkpoint(workdir):
        saved = json.loads(config_file.read_text())
        diffs = config_differences(saved, config)
        if diffs:
            raise ConfigError(config_file, "workdir holds a run of a different config; differing "
                                           "keys: " + "; ".join(diffs))
    if is_main:
        support.write_text(config_file, json.dumps(ckpt_lib.config_to_dict(config), indent=2))
    return data_path


# ----------------------------------------------------------------------------------------------
# The run: set-up, the loop body, and the decisions after each step and evaluation


class _Run:
    """One run of the loop: what the set-up builds, the loop's state, and its decisions.

    Everything periodic happens at global step counts, so every host takes the same decisions
    at the same steps (module docstring)."""

    def __init__(self, config, workdir, hosts: _Hosts, data_path):
        self.config, self.workdir, self.hosts = config, workdir, hosts
        self.devices = hosts.devices
        self.is_main = hosts.is_main
        self.model = model_for_training(config)
        self.tx = make_optimizer(config)
        self.plateau = make_plateau(config)
        size = int(config.data.crop_size or (config.data.frame_size if frames_lib.uses_heart_frame(
            config) else config.data.image_size))
        fresh = init_state(config, self.model, self.tx, (1, 3, size, size, 1))
        self.host = _HostState(plateau=self.plateau.init({}))
        self.best_name, self.best_mode = ckpt_lib.best_options(config)
        self.stop_name, self.stop_mode = stop_options(config)
        self.manager = ckpt_lib.make_manager(workdir, config)
        fresh = self._resume(fresh)
        if self.restored is None and config.train.get("init_from", ""):
            fresh = self._warm_start(fresh)
        self._recount_patience()
        self.total_steps = int(config.train.steps)
        self.state = _replicate(fresh, self.devices)
        self._compile_steps()
        self._open_data(data_path)
        self.window = support.LossWindow(_unreplicate)
        self.base_rate = float(config.train.learning_rate)
        self._start_loop_state()

    def _resume(self, fresh: TrainState) -> TrainState:
        """The state to start from: `fresh`, or the latest intact checkpoint's with the host
        state, the step and whether its evaluation is pending (a SIGTERM during validation)."""
        self.start_step, self.eval_pending = 0, False
        self.init_record: dict | None = None  # where train.init_from's parameters came from
        # A run under way has no summary: an earlier run's would call this one finished to
        # whoever looks while it trains or after it is killed (the study reuses finished runs).
        self.previous_summary = None  # put back unchanged when this run trains no step
        if self.is_main:
            with contextlib.suppress(OSError, ValueError):
                self.previous_summary = json.loads((self.workdir / "summary.json").read_text())
            support.remove_file(self.workdir / "summary.json")
        self.restored, items = ckpt_lib.load_state_if_possible(
            self.manager, fresh, self.workdir / ckpt_lib.CHECKPOINT_DIR, self.is_main)
        if self.restored is None:
            return fresh
        self.host = _HostState.from_json(items["meta"]["host"], self.host.plateau)
        self.start_step = int(items["meta"]["step"])
        self.eval_pending = bool(items["meta"].get("eval_pending", False))
        self.init_record = items["meta"].get("init_from")
        return jax.device_get(start_lib.resumed_state(items))

    def _warm_start(self, fresh: TrainState) -> TrainState:
        """`fresh` with the parameters of the trained model `train.init_from` (fine-tuning),
        validated before the first step (saved as step 0) so that it competes for the best."""
        state, self.init_record = start_lib.warm_start_state(self.config, fresh, self.tx)
        self.eval_pending = True
        return state

    def _compile_steps(self) -> None:
        # Multi-process: pmap over all devices of all processes (devices=None); the collectives
        # then span the hosts.
        pmap_devices = self.devices if self.hosts.process_count == 1 else None
        self.p_train = jax.pmap(
            functools.partial(train_step, model=self.model, tx=self.tx, config=self.config),
            axis_name=AXIS, devices=pmap_devices, donate_argnums=(0,))
        self.p_eval = jax.pmap(functools.partial(eval_step, model=self.model, config=self.config),
                               axis_name=AXIS, devices=pmap_devices)

    def _open_data(self, data_path) -> None:
        """The validation iterator and its reference heart masks (refused when validation cannot
        rank checkpoints), the metrics writer, and the training stream from the start step."""
        from data_pipeline.input_pipeline import make_dataset

        config, hosts = self.config, self.hosts
        shard = dict(process_index=hosts.process_index, process_count=hosts.process_count,
                     local_devices=hosts.n_local)
        self.val_iter = make_dataset(config, "validation", train=False, **shard)
        self.heart_masks = _reference_heart_masks(config.data, "validation",
                                                  {s.scan_id for s in self.val_iter.scans})
        # Each scan's model-free scoring (reference and naive categories, heart silhouette),
        # computed at the first validation and kept for the run.
        self.scoring_cache: dict = {}
        support.check_validation(
            config, self.val_iter.scans, self.heart_masks,
            int(_sum_processes(np.asarray(len(self.val_iter.scans), np.int64))),
            int(_sum_processes(np.asarray(len(self.heart_masks), np.int64))), data_path)
        self.writer = _Writer(self.workdir, self.start_step, enabled=self.is_main)
        self.spacing = _train_pixel_spacing(config.data)
        self.train_iter = None
        if self.start_step < self.total_steps and not self.host.stopped_early:
            self.train_iter = make_dataset(config, "train", start_step=self.start_step, **shard)

    def _start_loop_state(self) -> None:
        from tqdm import tqdm

        config, t = self.config, self.config.train
        self.bar = tqdm(total=self.total_steps, initial=self.start_step,
                        disable=not (self.is_main and t.progress), unit="step",
                        dynamic_ncols=True, desc=f"train {config.model.arch}/{config.task}")
        self.t_start = time.perf_counter()
        self.last_log_time, self.last_log_step = time.perf_counter(), self.start_step
        self.step = self.start_step
        self.last_saved = self.restored
        self.preempted = self.timed_out = False
        self.max_seconds = float(t.get("max_seconds", 0) or 0)
        self.lr_scale = float(self.host.plateau.scale)
        # End-of-budget annealing (`anneal_factor`): the time part is agreed between hosts at the
        # steps where they already talk (every step with one process), so every host uses one
        # rate. The time box is this run's: a resumed time-boxed run anneals again within its
        # new box.
        self.time_fraction = 0.0
        self.anneal_time = bool(self.max_seconds) and _anneal_fraction(config) > 0
        self.anneal = anneal_factor(config, self.step)
        self.scale_dev = _device_scale(self.lr_scale * self.anneal, self.devices)
        self.last_metrics: dict = {}
        self.log_every = int(t.log_every)
        self.preemption = None
        self.in_flight: deque = deque()  # metrics of the dispatched steps (MAX_STEPS_IN_FLIGHT)

    # -- the loop

    def train(self) -> None:
        """The pending evaluation of a resumed run, then steps until the end, the time budget,
        early stopping or a SIGTERM; a last checkpoint of the final step."""
        try:
            with dist.Preemption() as preemption:
                self.preemption = preemption
                if self.eval_pending and not preemption.requested:
                    self._evaluate_pending()
                while self.step < self.total_steps and not self.host.stopped_early:
                    if self._train_step():
                        break
            if self.last_saved != self.step and self.step > 0:
                self.save(self.step, None)
        finally:
            self.manager.wait_until_finished()
            self.bar.close()
            self.writer.close()

    def _evaluate_pending(self) -> None:
        """The evaluation of the step the run was stopped in (by a SIGTERM), or of a fine-tune's
        starting model (step 0), which then competes for the best checkpoint."""
        eval_metrics = self.run_evaluation(self.step, None)
        if eval_metrics is not None:
            # The same state again, now with its metrics (so it can rank as the best).
            if self.step in self.manager.all_steps():
                self.manager.delete(self.step)
            self.save(self.step, eval_metrics)
            self.last_saved = self.step

    def _train_step(self) -> bool:
        """One optimizer step and what follows it: log row, evaluation, checkpoint; True when
        the run ends at this step (time budget or SIGTERM)."""
        self._update_anneal()
        batch = _shard_batch(next(self.train_iter))
        self.state, metrics = self.p_train(self.state, batch, self.scale_dev)
        self.in_flight.append(metrics)
        if len(self.in_flight) > MAX_STEPS_IN_FLIGHT:
            jax.block_until_ready(self.in_flight.popleft())
        self.step += 1
        self.window.add(self.step, metrics)
        self.bar.update(1)
        time_up = self._time_up()
        final = self.step == self.total_steps or time_up
        row = self._log_row(final)
        eval_metrics, interrupted = None, False
        if self.step % int(self.config.train.eval_every) == 0 or final:
            eval_metrics = self.run_evaluation(self.step, row)
            interrupted = eval_metrics is None
            if interrupted and row is not None:
                self.writer.write(row)
        elif row is not None:
            self.writer.write(row)
        stop_now = interrupted or self.stop_requested(self.step)
        if self._should_save(eval_metrics, final, stop_now):
            self.save(self.step, eval_metrics, pending=interrupted)
            self.last_saved = self.step
        return self._ends_here(time_up, stop_now)

    def _update_anneal(self) -> None:
        """The end-of-budget factor for the next step; the devices' rate changes only when it
        moved (or reached 0)."""
        if self.anneal_time and (self.hosts.process_count == 1
                                 or self.step % self.log_every == 0):
            self.time_fraction = _max_processes(
                (time.perf_counter() - self.t_start) / self.max_seconds)
        new_anneal = anneal_factor(self.config, self.step, self.time_fraction)
        if abs(new_anneal - self.anneal) > 2e-3 or (new_anneal == 0.0) != (self.anneal == 0.0):
            self.anneal = new_anneal
            self.scale_dev = _device_scale(self.lr_scale * self.anneal, self.devices)

    def _time_up(self) -> bool:
        """The time budget (config.train.max_seconds) ends the run like its last step; hosts
        agree on it at logging steps (every step with one process)."""
        if self.max_seconds and (self.hosts.process_count == 1
                                 or self.step % self.log_every == 0):
            return _any_process(time.perf_counter() - self.t_start > self.max_seconds)
        return False

    def _log_row(self, final: bool) -> dict | None:
        """The training row of a logging step (mean of the window since the last), else None."""
        if not (self.step % self.log_every == 0 or final):
            return None
        now = time.perf_counter()
        row = {"step": self.step, **self.window.mean(self.step, self.base_rate, self.workdir),
               "learning_rate": self.base_rate * self.lr_scale * self.anneal,
               "samples_per_s": (self.step - self.last_log_step)
               * int(self.config.train.batch_size) / max(now - self.last_log_time, 1e-9),
               "elapsed_s": now - self.t_start}
        self.last_log_time, self.last_log_step = now, self.step
        self.bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['learning_rate']:.1e}")
        self.last_metrics = row
        return row

    # -- the decisions

    def stop_requested(self, counter: int) -> bool:
        """SIGTERM seen (by any host). One process: polled at every call; several: agreed by an
        all-gather every `log_every` counts (each host calls at the same counts)."""
        if self.hosts.process_count == 1:
            return self.preemption.requested
        return counter % self.log_every == 0 and _any_process(self.preemption.requested)

    def _should_save(self, eval_metrics: dict | None, final: bool, stop_now: bool) -> bool:
        """Checkpoint after an evaluation, every `checkpoint_every` steps, at the end, at an
        early stop and before exiting on a SIGTERM."""
        return (eval_metrics is not None
                or self.step % int(self.config.train.checkpoint_every) == 0
                or final or self.host.stopped_early or stop_now)

    def _ends_here(self, time_up: bool, stop_now: bool) -> bool:
        if time_up and not stop_now:
            self.timed_out = True
            if self.is_main:
                self.bar.write(f"time budget of {self.max_seconds:.0f} s reached at step "
                               f"{self.step}")
            return True
        if stop_now:
            self.preempted = True
            if self.is_main:
                self.bar.write(f"SIGTERM: checkpoint saved at step {self.step}; exiting")
            return True
        return False

    def run_evaluation(self, step: int, row: dict | None) -> dict | None:
        """Validation at `step`, the plateau, best and early-stop bookkeeping; None when a
        SIGTERM interrupted it (then nothing of it is recorded)."""
        # No evaluation of a diverged state.
        self.window.check_finite(step, self.base_rate, self.workdir)
        eval_metrics = evaluate(self.config, self.p_eval, self.state, self.val_iter,
                                self.heart_masks, stop=self.stop_requested,
                                cache=self.scoring_cache, share_slices=shares_slices(self.model))
        if eval_metrics is None:
            return None
        self._step_plateau(eval_metrics.get("val_loss", math.nan))
        self._track_best(step, float(eval_metrics.get(self.best_name, math.nan)),
                         float(eval_metrics.get(self.stop_name, math.nan)))
        row = {**(row or {"step": step}), **eval_metrics,
               "elapsed_s": time.perf_counter() - self.t_start,
               "learning_rate_next": self.base_rate * self.lr_scale * self.anneal}
        self.writer.write(row)
        # Keep evaluation time out of the next row's training throughput.
        self.last_log_time = time.perf_counter()
        if self.host.stopped_early and self.is_main:
            host = self.host
            self.bar.write(f"early stop at step {step}: no better {self.stop_name} in "
                           f"{int(self.config.train.early_stop_patience)} evaluations (best "
                           f"{self.best_name} {host.best_value} at {host.best_step})")
        return eval_metrics

    def _step_plateau(self, val_loss: float) -> None:
        """reduce_on_plateau on the validation loss; the devices' rate follows."""
        if math.isfinite(val_loss):  # an infinite loss is no plateau: the rate stays
            _, self.host.plateau = self.plateau.update(
                updates={}, state=self.host.plateau, value=jnp.asarray(val_loss, jnp.float32))
        self.lr_scale = float(self.host.plateau.scale)
        self.scale_dev = _device_scale(self.lr_scale * self.anneal, self.devices)

    def _track_best(self, step: int, value: float, stop_value: float) -> None:
        """The best value of `config.train.best_metric` so far, and early stopping on
        `stop_value` (the value of `early_stop_metric`)."""
        host = self.host
        if _improved(value, host.best_value, self.best_mode):
            host.best_value, host.best_step = value, step
        self._count_patience(stop_value)

    def _count_patience(self, value: float) -> None:
        """Early stopping's patience after an evaluation whose stop metric is `value`."""
        host = self.host
        delta = float(self.config.train.get("early_stop_min_delta", 0.0) or 0.0)
        shifted = value - delta if self.stop_mode == "max" else value + delta
        if _improved(shifted, host.patience_value, self.stop_mode):
            host.patience_value, host.evals_since_best = value, 0
        else:
            host.evals_since_best += 1
        patience = int(self.config.train.early_stop_patience)
        host.stopped_early = bool(patience and host.evals_since_best >= patience)

    def _recount_patience(self) -> None:
        """A resumed run's patience counted again, under this run's stop rule, over the
        evaluations `metrics.jsonl` holds up to the resumed step: the rule's keys may have changed
        since (`STOP_KEYS`), so a run stopped early may be continued with more patience or on
        another metric. Without that file (or its rows) the checkpoint's count stands. Every
        host reads the same file: the workdir is shared, as its checkpoints are."""
        path = self.workdir / "metrics.jsonl"
        if not self.restored or not path.exists():
            return
        values = []
        for line in path.read_text().splitlines():
            row = json.loads(line) if line.strip() else {}
            if 0 < row.get("step", 0) <= self.start_step and self.stop_name in row:
                value = row[self.stop_name]
                values.append(math.nan if value is None else float(value))
        if not values:
            return
        host = self.host
        host.patience_value, host.evals_since_best, host.stopped_early = None, 0, False
        for value in values:
            self._count_patience(value)

    def save(self, step: int, metrics: dict | None, pending: bool = False) -> None:
        """Checkpoint `step` (with its validation `metrics`; `pending`: its evaluation was
        interrupted), after every host checked its disk has room."""
        # A diverged state is never saved.
        self.window.check_finite(step, self.base_rate, self.workdir)
        host_state = _unreplicate(self.state)
        # Every host checks its view of the disk and they agree, so none is left in a save.
        try:
            support.check_free_space(
                self.workdir / ckpt_lib.CHECKPOINT_DIR,
                sum(np.asarray(x).nbytes
                    for x in jax.tree.leaves(ckpt_lib.training_items(host_state))),
                f"the step-{step} checkpoint")
            short = None
        except InputError as err:
            short = err
        if _any_process(short is not None):
            raise short or InputError(self.workdir, "another host has no space left for the "
                                                    f"step-{step} checkpoint")
        config = self.config
        meta = {"step": step, "metrics": {k: _json_safe(v) for k, v in (metrics or {}).items()},
                "host": self.host.to_json(),
                "pixel_spacing_mm": self.spacing, "task": config.task,
                "num_classes": int(config.model.num_classes), "eval_pending": pending,
                "init_from": self.init_record}
        ckpt_lib.save_training(self.manager, step, host_state, meta, metrics, config)

    def finish(self) -> dict:
        """The run's summary (written to `summary.json` by process 0)."""
        config, hosts, counts = self.config, self.hosts, self.hosts.counts
        wall = time.perf_counter() - self.t_start
        steps_run = self.step - self.start_step
        best_step = self.manager.best_step()
        self.manager.close()
        peak = _peak_memory_bytes(self.devices[0])
        summary = {
            "workdir": os.fspath(self.workdir), "task": config.task, "arch": config.model.arch,
            "steps": self.step, "steps_this_run": steps_run, "resumed_from": self.restored,
            "initialised_from": self.init_record,
            "best_step": best_step, "best_metric": self.best_name,
            "best_value": self.host.best_value, "stopped_early": self.host.stopped_early,
            "preempted": self.preempted, "timed_out": self.timed_out,
            "wall_time_s": wall, "steps_per_s": steps_run / wall if wall > 0 else None,
            "devices": hosts.n_global, "local_devices": hosts.n_local,
            "host_devices": counts["host_devices"], "hosts": counts["hosts"],
            "platform": counts["platform"], "processes": hosts.process_count,
            "peak_memory_bytes": peak,
            "last": {k: _json_safe(v) for k, v in self.last_metrics.items()},
        }
        written, previous = summary, self.previous_summary
        if (steps_run == 0 and isinstance(previous, dict)
                and previous.get("steps") == self.step):
            written = previous  # a finished run run again keeps its summary (times, last metrics)
        if self.is_main:
            support.write_text(self.workdir / "summary.json", json.dumps(written, indent=2) + "\n")
        return summary


def _peak_memory_bytes(device) -> int | None:
    """Peak device memory (accelerators) or this process's peak RSS (CPU)."""
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001 (backends without memory stats)
        stats = None
    if stats and "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"])
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
