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
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import struct
from jax import lax

from cac_jax import checkpoints as ckpt_lib
from cac_jax import distributed as dist
from cac_jax import train_support as support
from cac_jax.evaluation.statistics import linear_kappa
from cac_jax.losses import focal_loss_map
from cac_jax.models import build_model
from cac_jax.models.config import NUM_CLASSES
from data_pipeline import frames as frames_lib
from data_pipeline.constants import CALCIUM_THRESHOLD_HU, NUM_CATEGORIES
from data_pipeline.errors import InputError
from data_pipeline.labels import HU_WINDOW, unwindow_hu
from data_pipeline.manifest import PROTOCOLS

AXIS = "batch"  # the named data-parallel axis of pmap (and of synchronised BatchNorm)
# Keys a resumed run may change: the length of the run and how it is shown.
# model.conv_impl picks the library that runs the same convolutions (docs/onednn.md), so a run may
# resume under another.
RESUMABLE_KEYS = ("train.steps", "train.progress", "train.max_seconds", "model.conv_impl")
# Keys added to the configs after runs were made: a saved config without one had this value.
ADDED_KEYS = {"train.anneal_fraction": 0.0}
CALCIUM_CLASS_NAMES = ("background", "coronary", "noncoronary")
HEART_CLASS_NAMES = ("background", "heart")

log = logging.getLogger(__name__)
# Multi-host helpers (cac_jax.distributed) under the names the loop uses.
_setup_distributed = dist.setup
_any_process, _max_processes, _sum_processes = (dist.any_process, dist.max_processes,
                                                dist.sum_processes)


class ConfigError(InputError):
    """The experiment config is inconsistent or does not fit the run (devices, data)."""


class TrainState(struct.PyTreeNode):
    """What the step changes: parameters, BatchNorm statistics, optimizer state, step."""

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any


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
    frame_key = "frame_size" if frames_lib.uses_heart_frame(config) else "image_size"
    crop, size = int(config.data.get("crop_size", 0) or 0), int(config.data[frame_key])
    if crop < 0 or crop >= size:
        raise ConfigError(None, f"config.data.crop_size={crop} must be 0 (whole frames) or less "
                                f"than config.data.{frame_key}={size}")
    anneal = config.train.get("anneal_fraction", 0.0) or 0.0
    if not isinstance(anneal, int | float) or not 0.0 <= anneal <= 1.0:
        raise ConfigError(None, f"config.train.anneal_fraction={anneal} must be in [0, 1]")
    rate = config.train.learning_rate
    if not isinstance(rate, int | float) or not math.isfinite(rate) or rate <= 0:
        raise ConfigError(None, f"config.train.learning_rate={rate} must be a finite number > 0")
    for key in ("steps", "batch_size", "eval_every", "checkpoint_every", "log_every"):
        if int(config.train[key]) < 1:
            raise ConfigError(None, f"config.train.{key} must be >= 1, got {config.train[key]}")


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


def config_differences(saved: dict, config: ml_collections.ConfigDict) -> list[str]:
    """Keys whose values differ between a workdir's config and this run's (resumable ones aside)."""
    a, b = {**ADDED_KEYS, **flatten(saved)}, {**ADDED_KEYS, **flatten(config)}
    keys = sorted(set(a) | set(b))
    return [f"{k} ({a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r})" for k in keys
            if k not in RESUMABLE_KEYS and a.get(k, "<absent>") != b.get(k, "<absent>")]


# ----------------------------------------------------------------------------------------------
# Model, optimizer and the per-device steps


def make_optimizer(config) -> optax.GradientTransformation:
    """Adam (or AdamW with weight decay) at the base rate, optionally after gradient clipping.

    The plateau factor multiplies the updates inside the step (`lr_scale`): it changes only at
    evaluations, on the host, from `optax.contrib.reduce_on_plateau`.
    """
    t = config.train
    parts = []
    if float(t.grad_clip_norm) > 0:
        parts.append(optax.clip_by_global_norm(float(t.grad_clip_norm)))
    if float(t.weight_decay) > 0:
        parts.append(optax.adamw(float(t.learning_rate), weight_decay=float(t.weight_decay)))
    else:
        parts.append(optax.adam(float(t.learning_rate)))
    return optax.chain(*parts)


def make_plateau(config) -> optax.GradientTransformationExtraArgs:
    """reduce_on_plateau counted in evaluations (one `update` per validation loss)."""
    t = config.train
    return optax.contrib.reduce_on_plateau(
        factor=float(t.plateau_factor), patience=int(t.plateau_patience),
        rtol=float(t.plateau_rtol), cooldown=int(t.plateau_cooldown),
        min_scale=float(t.plateau_min_scale), accumulation_size=1)


def _anneal_fraction(config) -> float:
    return float(config.train.get("anneal_fraction", 0.0) or 0.0)


def anneal_factor(config, step: int, time_fraction: float = 0.0) -> float:
    """The end-of-budget annealing factor on the learning rate (1 while off or not reached).

    With `train.anneal_fraction` f > 0 the rate falls linearly to 0 over the last f of the run's
    budget: progress is the larger of step / `train.steps` and `time_fraction` (this run's
    elapsed time over `train.max_seconds`), so a time-boxed run anneals before its box ends
    whatever the machine's speed (budgeted training, Li et al. 2020: a schedule that reaches 0 at
    the budget beats a constant rate cut off there)."""
    fraction = _anneal_fraction(config)
    if fraction <= 0:
        return 1.0
    progress = max(step / max(int(config.train.steps), 1), time_fraction)
    return float(np.clip((1.0 - progress) / fraction, 0.0, 1.0))


def model_for_training(config) -> Any:
    """The model with synchronised BatchNorm over the data axis (GroupNorm needs no axis)."""
    if config.model.norm == "batch" and not config.model.get("bn_axis_name"):
        config = ml_collections.ConfigDict(config)
        config.model.bn_axis_name = AXIS
    return build_model(config)


def init_state(config, model, tx, sample_shape) -> TrainState:
    """A fresh TrainState (host arrays) from `config.seed`."""
    key = jax.random.key(int(config.seed))
    sample = jnp.zeros(sample_shape, jnp.float32)
    init = jax.jit(model.init)
    if jax.default_backend() == "cpu":
        # Run once: XLA:CPU's optimising backend spends ~9 s on the initialisers' RNG code of a
        # ConvLSTM (2.7 s unoptimised), a third of a short run's start-up. Values agree to an ulp.
        init = init.lower(key, sample).compile(
            compiler_options={"xla_backend_optimization_level": 0})
    variables = init(key, sample)
    params = variables["params"]
    batch_stats = variables.get("batch_stats", {})
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                       opt_state=tx.init(params))
    return jax.device_get(state)


def _losses(config, logits, aux, labels, weight):
    """(per-pixel main focal loss, per-pixel aux focal loss sum) for one device's batch."""
    t = config.train
    kwargs = dict(alpha=tuple(float(a) for a in t.focal_alpha), gamma=float(t.focal_gamma))
    main = focal_loss_map(logits, labels, **kwargs)
    aux_loss = jnp.zeros_like(main)
    if float(t.aux_loss_weight) > 0:
        for name in ("temporal", "spatial"):
            if name in aux:
                aux_loss = aux_loss + focal_loss_map(aux[name], labels, **kwargs)
    return main, aux_loss


def loss_weight(config, images: jax.Array, weight: jax.Array,
                candidate: jax.Array | None = None) -> jax.Array:
    """The pipeline's per-pixel weight times `config.train.non_candidate_weight` on pixels whose
    centre-slice value is below 130 HU (not Agatston candidates; calcium task only).

    `candidate` is the pipeline's mask of those pixels, decided on the stored HU before
    augmentation (contrast, shift and noise move 130-220 HU plaques across the threshold) and
    resampled with the label; without it the centre slice of `images` is thresholded (exact for
    un-augmented images).

    Scoring keeps the coronary class only at HU >= 130, so what the calcium model says below it
    never reaches a score: weighting those pixels down spends the gradient on telling coronary
    from other calcium at the candidates (about 1 coronary pixel in 100 candidates instead of 1 in
    10^4 pixels). 1.0 (and the heart task) keep every pixel equal, as the paper trains.
    """
    factor = float(config.train.get("non_candidate_weight", 1.0))
    if config.task != "calcium" or factor == 1.0:
        return weight
    if candidate is None:
        low, high = HU_WINDOW
        centre = images[:, images.shape[1] // 2, :, :, 0]  # (batch, H, W), window scaled to [0, 1]
        candidate = centre >= (CALCIUM_THRESHOLD_HU - low) / (high - low)
    return weight * jnp.where(candidate, 1.0, factor).astype(weight.dtype)


def train_step(state: TrainState, batch: dict, lr_scale: jax.Array, *, model, tx, config):
    """One optimizer step on one device's share of the global batch (run under `pmap(AXIS)`).

    The loss is normalised by the global weight sum (`psum` over devices), so the pmean of the
    device gradients equals the gradient of one mean over the whole global batch: any device count
    gives the same update.
    """
    images, labels = batch["image"], batch["label"]
    weight = loss_weight(config, images, batch["weight"], batch.get("candidate"))
    num_devices = lax.psum(1, AXIS)
    total_weight = jnp.maximum(lax.psum(jnp.sum(weight), AXIS), 1e-12)
    aux_weight = float(config.train.aux_loss_weight)
    use_bn = bool(state.batch_stats)

    def loss_fn(params):
        variables = {"params": params}
        if use_bn:
            variables["batch_stats"] = state.batch_stats
            (logits, aux), updates = model.apply(variables, images, train=True,
                                                 mutable=["batch_stats"])
        else:
            logits, aux = model.apply(variables, images, train=True)
            updates = {}
        main, aux_loss = _losses(config, logits, aux, labels, weight)
        # This device's share of the global mean, times the device count (pmean divides by it).
        main_sum = jnp.sum(main * weight) / total_weight
        aux_sum = jnp.sum(aux_loss * weight) / total_weight
        loss = (main_sum + aux_weight * aux_sum) * num_devices
        return loss, (main_sum, aux_sum, updates)

    (_, (main_sum, aux_sum, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params)
    grads = lax.pmean(grads, AXIS)
    step_updates, opt_state = tx.update(grads, state.opt_state, state.params)
    step_updates = jax.tree.map(lambda u: u * lr_scale.astype(u.dtype), step_updates)
    params = optax.apply_updates(state.params, step_updates)
    batch_stats = state.batch_stats
    if use_bn:
        batch_stats = lax.pmean(updates["batch_stats"], AXIS)
    main_loss = lax.psum(main_sum, AXIS)
    aux_loss = lax.psum(aux_sum, AXIS)
    metrics = {
        "loss": main_loss + aux_weight * aux_loss,
        "focal_loss": main_loss,
        "aux_loss": aux_loss,
        "grad_norm": optax.tree.norm(grads),
        "param_norm": optax.tree.norm(params),
    }
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                              opt_state=opt_state)
    return new_state, metrics


def eval_step(state: TrainState, batch: dict, *, model, config):
    """Validation on one device: predictions and summed loss / Dice counts over `AXIS`.

    The predictions are the class map (int8), or, for a heart-frame calcium model, the class
    probabilities (float32), which validation maps back onto each scan's grid as inference does.
    """
    variables = {"params": state.params}
    if state.batch_stats:
        variables["batch_stats"] = state.batch_stats
    logits, aux = model.apply(variables, batch["image"], train=False)
    labels, weight = batch["label"], batch["weight"]
    main, _ = _losses(config, logits, {}, labels, weight)
    loss_w = loss_weight(config, batch["image"], weight, batch.get("candidate"))
    pred = jnp.argmax(logits, axis=-1)
    classes = jnp.arange(int(config.model.num_classes))
    on = weight[..., None] > 0
    pred_1h = (pred[..., None] == classes) & on
    true_1h = (labels[..., None] == classes) & on
    sums = {
        "loss_sum": jnp.sum(main * loss_w),
        "weight_sum": jnp.sum(loss_w),
        "intersection": jnp.sum(pred_1h & true_1h, axis=(0, 1, 2)).astype(jnp.float32),
        "predicted": jnp.sum(pred_1h, axis=(0, 1, 2)).astype(jnp.float32),
        "true": jnp.sum(true_1h, axis=(0, 1, 2)).astype(jnp.float32),
    }
    if frames_lib.uses_heart_frame(config):
        return jax.nn.softmax(logits.astype(jnp.float32), axis=-1), lax.psum(sums, AXIS)
    return pred.astype(jnp.int8), lax.psum(sums, AXIS)


# ----------------------------------------------------------------------------------------------
# Validation: per-scan categories and kappa


def _reference_heart_masks(data, split: str, scan_ids: set[str]) -> dict[str, np.ndarray]:
    """The reference heart masks of the given scans, read from the TFDS dataset."""
    import tensorflow_datasets as tfds

    from data_pipeline.input_pipeline import dataset_path

    builder = tfds.builder_from_directory(os.fspath(dataset_path(data)))
    decoders = tfds.decode.PartialDecoding(
        {"scan_id": True, "heart_mask": True, "has_heart_mask": True})
    masks = {}
    if split not in builder.info.splits or not builder.info.splits[split].num_examples:
        return masks
    ds = builder.as_dataset(split=split, shuffle_files=False, decoders=decoders)
    for ex in tfds.as_numpy(ds):
        scan_id = ex["scan_id"].decode()
        if scan_id in scan_ids and ex["has_heart_mask"]:
            masks[scan_id] = ex["heart_mask"].astype(bool)
    return masks


def _train_pixel_spacing(data) -> dict:
    """min/median/max in-plane pixel spacing (mm) of the training split, for inference."""
    import tensorflow_datasets as tfds

    from data_pipeline.input_pipeline import dataset_path
    from data_pipeline.scan_index import read_scan_index, split_entries

    builder = tfds.builder_from_directory(os.fspath(dataset_path(data)))
    entries = split_entries(builder, "train", read_scan_index(dataset_path(data)))
    if entries is not None:  # the build-time scan index: no record is read
        values = [float(v) for e in entries for v in e["spacing_zyx_mm"][1:]]
    else:
        decoders = tfds.decode.PartialDecoding({"spacing_zyx_mm": True})
        ds = builder.as_dataset(split="train", shuffle_files=False, decoders=decoders)
        values = [float(v) for ex in tfds.as_numpy(ds) for v in ex["spacing_zyx_mm"][1:]]
    if not values:
        return {}
    return {"min": float(np.min(values)), "median": float(np.median(values)),
            "max": float(np.max(values))}


class _ScanCollector:
    """Reassembles per-slice predictions and HU into whole scans on the host.

    With `frame` (a heart-frame calcium model: the input pipeline's store and the data config),
    each slice's class probabilities in its heart frame are resampled onto the scan's grid and the
    argmax taken (`data_pipeline.frames.from_frame`, what inference does), and the HU and the true
    classes come from the stored scan.
    """

    def __init__(self, scans, frame=None):
        self.scans = scans
        self.frame = frame
        self.pred = [np.zeros(s.shape_zyx, np.uint8) for s in scans]
        self.hu = [np.zeros(s.shape_zyx, np.int16) for s in scans]
        self.true = [np.zeros(s.shape_zyx, np.uint8) for s in scans]

    def add(self, pred: np.ndarray, batch: dict) -> None:
        valid = batch["valid"].reshape(-1)
        scan_index = batch["scan_index"].reshape(-1)
        slice_index = batch["slice_index"].reshape(-1)
        if self.frame is not None:
            self._add_frame(pred.reshape(-1, *pred.shape[-3:]), valid, scan_index, slice_index)
            return
        pred = pred.reshape(-1, *pred.shape[-2:])
        labels = batch["label"].reshape(-1, *batch["label"].shape[-2:])
        centre = batch["image"].reshape(-1, *batch["image"].shape[-4:])[:, 1, ..., 0]
        for i in np.flatnonzero(valid):
            s, z = int(scan_index[i]), int(slice_index[i])
            _, h, w = self.scans[s].shape_zyx
            self.pred[s][z] = pred[i, :h, :w]
            self.true[s][z] = labels[i, :h, :w]
            # The windowed image gives HU back exactly within HU_WINDOW (stored int16 HU, scaled
            # to [0, 1]): enough for the 130/200/300/400 HU rules.
            self.hu[s][z] = np.rint(unwindow_hu(centre[i, :h, :w])).astype(np.int16)

    def _add_frame(self, probs, valid, scan_index, slice_index) -> None:
        store, data = self.frame
        for s in np.unique(scan_index[valid]):
            s = int(s)
            rows = np.flatnonzero(valid & (scan_index == s))
            hu, target = store.volumes(s, s)
            geom = store.frame_geometry(s, int(data.frame_size), float(data.frame_spacing_mm))
            native = frames_lib.from_frame(probs[rows], geom)
            zs = slice_index[rows].astype(np.int64)
            self.pred[s][zs] = np.argmax(native, axis=-1).astype(np.uint8)
            self.hu[s][zs] = hu[zs]
            self.true[s][zs] = target[zs]


def scan_categories(config, collector: _ScanCollector, heart_masks: dict) -> dict:
    """{protocol: (model confusion 4x4, naive-threshold confusion 4x4)} of reference vs predicted
    category, for every protocol of the manifest contract (zeros where none was validated, so
    every host sums the same arrays)."""
    from cac_jax.baselines import threshold_score
    from cac_jax.postprocess import DEFAULT_HEART_DILATION_MM, heart_silhouette, predicted_score

    shape = (NUM_CATEGORIES, NUM_CATEGORIES)
    matrices = {protocol: (np.zeros(shape, np.int64), np.zeros(shape, np.int64))
                for protocol in PROTOCOLS}
    for info, pred, hu, true in zip(collector.scans, collector.pred, collector.hu, collector.true):
        heart = heart_masks.get(info.scan_id)
        if heart is None or heart.shape != hu.shape:
            continue  # no reference heart mask: no category for this scan
        if config.task == "calcium":
            # Inference's rule: coronary calcium counts inside the heart dilated by the Scorer's
            # default margin, so the best checkpoint is picked on the number users get.
            silhouette = heart_silhouette(heart, info.spacing_zyx_mm, DEFAULT_HEART_DILATION_MM)
            predicted = predicted_score(hu, pred, silhouette, info.spacing_zyx_mm).category
        else:
            silhouette = heart_silhouette(pred, info.spacing_zyx_mm)
            predicted = threshold_score(hu, silhouette, info.spacing_zyx_mm).category
        reference = info.category
        if reference is None:
            if config.task != "calcium":
                continue
            # No reference score stored: the true coronary class scored the same way.
            reference = predicted_score(hu, true, heart, info.spacing_zyx_mm).category
        naive = threshold_score(hu, heart, info.spacing_zyx_mm).category
        if info.protocol not in matrices:
            continue  # not a protocol of the manifest contract (ingest refuses those)
        model_cm, naive_cm = matrices[info.protocol]
        model_cm[reference, predicted] += 1
        naive_cm[reference, naive] += 1
    return matrices


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

    def to_json(self) -> dict:
        p = self.plateau
        return {"plateau": {k: float(np.asarray(getattr(p, k))) for k in p._fields},
                "best_value": self.best_value, "best_step": self.best_step,
                "evals_since_best": self.evals_since_best, "stopped_early": self.stopped_early}

    @classmethod
    def from_json(cls, data: dict, template) -> _HostState:
        plateau = template._replace(**{
            k: jnp.asarray(v, dtype=np.asarray(getattr(template, k)).dtype)
            for k, v in data["plateau"].items()})
        return cls(plateau=plateau, best_value=data.get("best_value"),
                   best_step=data.get("best_step"),
                   evals_since_best=int(data.get("evals_since_best", 0)),
                   stopped_early=bool(data.get("stopped_early", False)))


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class _Writer:
    """metrics.jsonl + TensorBoard (tf.summary) on process 0."""

    def __init__(self, workdir, resume_step: int, enabled: bool):
        self.enabled = enabled
        workdir = support.as_path(workdir)
        self.path = workdir / "metrics.jsonl"
        self.tb = None
        # Cloud storage cannot append: the rows are kept and the file rewritten at each row.
        self._lines: list[str] | None = [] if support.is_remote(workdir) else None
        if not enabled:
            return
        # Rows logged after the checkpoint we resume from would be repeated: drop them.
        if self.path.exists():
            keep = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            support.write_text(self.path, "".join(f"{line}\n" for line in keep))
            if self._lines is not None:
                self._lines = keep
        support.prune_tensorboard(workdir / "tensorboard", resume_step)
        import tensorflow as tf
        from tensorflow.core.framework import summary_pb2

        self._tf = tf
        # tf.summary.scalar needs the tensorboard package (not a dependency): write the same
        # scalar events with the core op and the scalars plugin's metadata.
        self._metadata = summary_pb2.SummaryMetadata()
        self._metadata.plugin_data.plugin_name = "scalars"
        self.tb = tf.summary.create_file_writer(os.fspath(workdir / "tensorboard"))

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        row = {k: _json_safe(v) for k, v in row.items()}
        if self._lines is not None:
            self._lines.append(json.dumps(row))
            support.write_text(self.path, "".join(f"{line}\n" for line in self._lines))
        else:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
        with self.tb.as_default(step=int(row["step"])):
            for key, value in row.items():
                if key != "step" and isinstance(value, int | float) and value is not None:
                    self._tf.summary.write(key, self._tf.constant(float(value), self._tf.float32),
                                           metadata=self._metadata)
        self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _replicate(tree, devices):
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


def _local_array(x) -> np.ndarray:
    """This host's rows of a pmapped array (leading axis = local devices) as numpy.

    With several processes a pmap output is not fully addressable: read its local shards.
    """
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        shards = sorted(x.addressable_shards, key=lambda shard: shard.index[0].start or 0)
        parts = [np.asarray(shard.data) for shard in shards]
        return np.concatenate([p if p.ndim == x.ndim else p[None] for p in parts])
    return np.asarray(x)


def _unreplicate(tree):
    """The first local copy of a replicated pytree, as host arrays."""
    return jax.tree.map(lambda x: _local_array(x)[0], tree)


def _shard_batch(batch: dict, keys=("image", "label", "weight", "candidate")) -> dict:
    """The arrays the step needs (strings such as `scan_id` stay on the host)."""
    return {k: batch[k] for k in keys if k in batch}


def _device_scale(scale: float, devices) -> jax.Array:
    """The learning-rate factor (plateau times anneal) the step multiplies its updates by,
    replicated on the local devices."""
    return _replicate(jnp.asarray(scale, jnp.float32), devices)


def evaluate(config, p_eval, state, val_iter, heart_masks, stop=None) -> dict | None:
    """Validation metrics of the replicated `state` on `val_iter` (every host, same steps).

    `stop(batch_index)`, polled before each batch (every host at the same batches), ends the
    evaluation early: None is returned (a SIGTERM during validation)."""
    num_classes = int(config.model.num_classes)
    names = CALCIUM_CLASS_NAMES if config.task == "calcium" else HEART_CLASS_NAMES
    totals = None
    frame = ((val_iter.store, config.data) if frames_lib.uses_heart_frame(config) else None)
    collector = _ScanCollector(val_iter.scans, frame)
    for index, batch in enumerate(val_iter):
        if stop is not None and stop(index):
            return None
        pred, sums = p_eval(state, _shard_batch(batch))
        sums = _unreplicate(sums)
        totals = sums if totals is None else jax.tree.map(np.add, totals, sums)
        collector.add(_local_array(pred), batch)
    metrics = {}
    if totals is None:
        return metrics
    metrics["val_loss"] = float(totals["loss_sum"] / max(float(totals["weight_sum"]), 1e-12))
    dice = []
    for c in range(1, num_classes):
        denom = float(totals["predicted"][c] + totals["true"][c])
        value = 2.0 * float(totals["intersection"][c]) / denom if denom else math.nan
        metrics[f"val_dice_{names[c]}"] = value
        dice.append(value)
    finite = [d for d in dice if math.isfinite(d)]
    metrics["val_dice_mean"] = float(np.mean(finite)) if finite else math.nan
    matrices = {protocol: (_sum_processes(m), _sum_processes(n))
                for protocol, (m, n) in scan_categories(config, collector, heart_masks).items()}
    model_cm = sum(m for m, _ in matrices.values())
    naive_cm = sum(n for _, n in matrices.values())
    metrics["val_kappa"] = linear_kappa(model_cm)
    metrics["val_kappa_naive"] = linear_kappa(naive_cm)
    metrics["val_exact"] = float(np.trace(model_cm) / max(model_cm.sum(), 1))
    metrics["val_scans"] = int(model_cm.sum())
    # Per protocol (the paper reports gated CAC and CTAC apart); protocols not validated are left
    # out.
    for protocol, (m, n) in matrices.items():
        if m.sum():
            metrics[f"val_kappa_{protocol}"] = linear_kappa(m)
            metrics[f"val_kappa_naive_{protocol}"] = linear_kappa(n)
            metrics[f"val_exact_{protocol}"] = float(np.trace(m) / m.sum())
    return metrics


def _improved(value: float, best: float | None, mode: str) -> bool:
    if not math.isfinite(value):
        return False
    if best is None:
        return True
    return value < best if mode == "min" else value > best


def _restore(manager, fresh, step):
    """The items of checkpoint `step` restored into the structure of `fresh` (host arrays)."""
    import orbax.checkpoint as ocp

    variables = {"params": fresh.params}
    if fresh.batch_stats:
        variables["batch_stats"] = fresh.batch_stats
    train_items = {"opt_state": fresh.opt_state, "step": np.asarray(fresh.step)}
    return manager.restore(step, args=ocp.args.Composite(
        variables=ocp.args.StandardRestore(variables),
        train_state=ocp.args.StandardRestore(train_items),
        meta=ocp.args.JsonRestore()))


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
    _setup_distributed(config)
    check_config(config)
    workdir = support.as_path(workdir)
    devices = resolve_devices(config)
    counts = dist.device_counts(devices)
    dist.check_host_accelerators(counts, int(config.train.get("num_devices", 0) or 0))
    n_local, n_global = len(devices), counts["global_devices"]
    process_index, process_count = jax.process_index(), jax.process_count()
    is_main = process_index == 0
    if is_main:
        log.info("devices: %d global (%s), %d in this process, %d on this host, %d process(es) "
                 "on %d host(s)", n_global, counts["platform"], n_local, counts["host_devices"],
                 process_count, counts["hosts"])
    config = ml_collections.ConfigDict(config)  # our copy: derived fields are set below
    with config.unlocked():
        config.data.per_device_batch = int(config.train.batch_size) // n_global
    if config.data.get("seed") is None:
        with config.unlocked():
            config.data.seed = int(config.seed)

    from data_pipeline.input_pipeline import dataset_path

    data_path = dataset_path(config.data)
    if not (data_path / "dataset_info.json").exists():  # before any compilation
        raise InputError(data_path, "no dataset here; build it with `cac-jax ingest --manifest "
                                    f"M.csv --data-dir {config.data.data_dir} --name "
                                    f"{config.data.name}`")
    support.check_workdir(workdir, is_main)
    # Refuse to resume a run of another config (which keys differ).
    config_file = workdir / ckpt_lib.CONFIG_FILE
    if config_file.exists():
        saved = json.loads(config_file.read_text())
        diffs = config_differences(saved, config)
        if diffs:
            raise ConfigError(config_file, "workdir holds a run of a different config; differing "
                                           "keys: " + "; ".join(diffs))
    if is_main:
        support.write_text(config_file, json.dumps(ckpt_lib.config_to_dict(config), indent=2))

    from data_pipeline.input_pipeline import make_dataset

    model = model_for_training(config)
    tx = make_optimizer(config)
    plateau = make_plateau(config)
    size = int(config.data.crop_size or (config.data.frame_size if frames_lib.uses_heart_frame(
        config) else config.data.image_size))
    fresh = init_state(config, model, tx, (1, 3, size, size, 1))
    host = _HostState(plateau=plateau.init({}))
    name, mode = ckpt_lib.best_options(config)

    manager = ckpt_lib.make_manager(workdir, config)
    start_step = 0
    restored, items = support.restore_intact(
        manager, functools.partial(_restore, manager, fresh), workdir / ckpt_lib.CHECKPOINT_DIR,
        is_main)
    dist.agree_on_step(restored, workdir / ckpt_lib.CHECKPOINT_DIR)
    eval_pending = False
    if restored is not None:
        v, ts = items["variables"], items["train_state"]
        fresh = TrainState(step=jnp.asarray(ts["step"], jnp.int32), params=v["params"],
                           batch_stats=v.get("batch_stats", {}), opt_state=ts["opt_state"])
        fresh = jax.device_get(fresh)
        host = _HostState.from_json(items["meta"]["host"], host.plateau)
        start_step = int(items["meta"]["step"])
        eval_pending = bool(items["meta"].get("eval_pending", False))
    total_steps = int(config.train.steps)

    state = _replicate(fresh, devices)
    # Multi-process: pmap over all devices of all processes (devices=None); the collectives
    # then span the hosts.
    pmap_devices = devices if process_count == 1 else None
    p_train = jax.pmap(functools.partial(train_step, model=model, tx=tx, config=config),
                       axis_name=AXIS, devices=pmap_devices, donate_argnums=(0,))
    p_eval = jax.pmap(functools.partial(eval_step, model=model, config=config),
                      axis_name=AXIS, devices=pmap_devices)

    val_iter = make_dataset(config, "validation", process_index=process_index,
                            process_count=process_count, local_devices=n_local, train=False)
    heart_masks = _reference_heart_masks(config.data, "validation",
                                         {s.scan_id for s in val_iter.scans})
    support.check_validation(
        config, val_iter.scans, heart_masks,
        int(_sum_processes(np.asarray(len(val_iter.scans), np.int64))),
        int(_sum_processes(np.asarray(len(heart_masks), np.int64))), data_path)
    writer = _Writer(workdir, start_step, enabled=is_main)
    spacing = _train_pixel_spacing(config.data)
    train_iter = None
    if start_step < total_steps and not host.stopped_early:
        train_iter = make_dataset(config, "train", process_index=process_index,
                                  process_count=process_count, local_devices=n_local,
                                  start_step=start_step)
    window = support.LossWindow(_unreplicate)
    base_rate = float(config.train.learning_rate)

    def save(step: int, metrics: dict | None, pending: bool = False) -> None:
        window.check_finite(step, base_rate, workdir)  # a diverged state is never saved
        host_state = _unreplicate(state)
        variables = {"params": host_state.params}
        if host_state.batch_stats:
            variables["batch_stats"] = host_state.batch_stats
        train_items = {"opt_state": host_state.opt_state, "step": np.asarray(host_state.step)}
        # Every host checks its view of the disk and they agree, so none is left in a save.
        try:
            support.check_free_space(
                workdir / ckpt_lib.CHECKPOINT_DIR,
                sum(np.asarray(x).nbytes for x in jax.tree.leaves((variables, train_items))),
                f"the step-{step} checkpoint")
            short = None
        except InputError as err:
            short = err
        if _any_process(short is not None):
            raise short or InputError(workdir, "another host has no space left for the "
                                               f"step-{step} checkpoint")
        meta = {"step": step, "metrics": {k: _json_safe(v) for k, v in (metrics or {}).items()},
                "host": host.to_json(),
                "pixel_spacing_mm": spacing, "task": config.task,
                "num_classes": int(config.model.num_classes), "eval_pending": pending}
        clean = None
        if metrics:
            clean = {k: float(v) for k, v in metrics.items()
                     if isinstance(v, int | float) and math.isfinite(float(v))}
        manager.save(step, args=ckpt_lib.save_args(variables, train_items, meta, config),
                     metrics=clean, force=True)

    from tqdm import tqdm

    bar = tqdm(total=total_steps, initial=start_step, disable=not (is_main and
                                                                     config.train.progress),
               unit="step", dynamic_ncols=True, desc=f"train {config.model.arch}/{config.task}")
    t_start = time.perf_counter()
    last_log_time, last_log_step = time.perf_counter(), start_step
    step = start_step
    last_saved = restored
    preempted = timed_out = False
    max_seconds = float(config.train.get("max_seconds", 0) or 0)
    lr_scale = float(host.plateau.scale)
    # End-of-budget annealing (`anneal_factor`): the time part is agreed between hosts at the
    # steps where they already talk (every step with one process), so every host uses one rate.
    # The time box is this run's: a resumed time-boxed run anneals again within its new box.
    time_fraction = 0.0
    anneal_time = bool(max_seconds) and _anneal_fraction(config) > 0
    anneal = anneal_factor(config, step)
    scale_dev = _device_scale(lr_scale * anneal, devices)
    last_metrics: dict = {}
    agree_every = int(config.train.log_every)

    def stop_requested(counter: int) -> bool:
        """SIGTERM seen (by any host). One process: polled at every call; several: agreed by an
        all-gather every `log_every` counts (each host calls at the same counts)."""
        if process_count == 1:
            return preemption.requested
        return counter % agree_every == 0 and _any_process(preemption.requested)

    def run_evaluation(step: int, row: dict | None) -> dict | None:
        """Validation at `step`, the plateau, best and early-stop bookkeeping; None when a
        SIGTERM interrupted it (then nothing of it is recorded)."""
        nonlocal lr_scale, scale_dev, last_log_time
        window.check_finite(step, base_rate, workdir)  # no evaluation of a diverged state
        eval_metrics = evaluate(config, p_eval, state, val_iter, heart_masks,
                                stop=stop_requested)
        if eval_metrics is None:
            return None
        val_loss = eval_metrics.get("val_loss", math.nan)
        if math.isfinite(val_loss):  # an infinite loss is no plateau: the rate stays
            _, host.plateau = plateau.update(updates={}, state=host.plateau,
                                             value=jnp.asarray(val_loss, jnp.float32))
        lr_scale = float(host.plateau.scale)
        scale_dev = _device_scale(lr_scale * anneal, devices)
        value = float(eval_metrics.get(name, math.nan))
        if _improved(value, host.best_value, mode):
            host.best_value, host.best_step, host.evals_since_best = value, step, 0
        else:
            host.evals_since_best += 1
        patience = int(config.train.early_stop_patience)
        if patience and host.evals_since_best >= patience:
            host.stopped_early = True
        row = {**(row or {"step": step}), **eval_metrics,
               "elapsed_s": time.perf_counter() - t_start,
               "learning_rate_next": base_rate * lr_scale * anneal}
        writer.write(row)
        # Keep evaluation time out of the next row's training throughput.
        last_log_time = time.perf_counter()
        if host.stopped_early and is_main:
            bar.write(f"early stop at step {step}: no better {name} in {patience} "
                      f"evaluations (best {host.best_value} at {host.best_step})")
        return eval_metrics

    try:
        with dist.Preemption() as preemption:
            if eval_pending and not preemption.requested:
                # The evaluation of the step the run was stopped in (by a SIGTERM).
                eval_metrics = run_evaluation(step, None)
                if eval_metrics is not None:
                    # The same state again, now with its metrics (so it can rank as the best).
                    manager.delete(step)
                    save(step, eval_metrics)
                    last_saved = step
            while step < total_steps and not host.stopped_early:
                if anneal_time and (process_count == 1
                                    or step % int(config.train.log_every) == 0):
                    time_fraction = _max_processes((time.perf_counter() - t_start) / max_seconds)
                new_anneal = anneal_factor(config, step, time_fraction)
                if abs(new_anneal - anneal) > 2e-3 or (new_anneal == 0.0) != (anneal == 0.0):
                    anneal = new_anneal
                    scale_dev = _device_scale(lr_scale * anneal, devices)
                batch = _shard_batch(next(train_iter))
                state, metrics = p_train(state, batch, scale_dev)
                step += 1
                window.add(step, metrics)
                bar.update(1)
                # The time budget (config.train.max_seconds) ends the run like its last step;
                # hosts agree on it at logging steps (every step with one process).
                time_up = False
                if max_seconds and (process_count == 1
                                    or step % int(config.train.log_every) == 0):
                    time_up = _any_process(time.perf_counter() - t_start > max_seconds)
                final = step == total_steps or time_up
                row = None
                if step % int(config.train.log_every) == 0 or final:
                    now = time.perf_counter()
                    row = {"step": step, **window.mean(step, base_rate, workdir),
                           "learning_rate": base_rate * lr_scale * anneal,
                           "samples_per_s": (step - last_log_step) * int(config.train.batch_size)
                           / max(now - last_log_time, 1e-9),
                           "elapsed_s": now - t_start}
                    last_log_time, last_log_step = now, step
                    bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['learning_rate']:.1e}")
                    last_metrics = row
                eval_metrics, interrupted = None, False
                if step % int(config.train.eval_every) == 0 or final:
                    eval_metrics = run_evaluation(step, row)
                    interrupted = eval_metrics is None
                    if interrupted and row is not None:
                        writer.write(row)
                elif row is not None:
                    writer.write(row)
                stop_now = interrupted or stop_requested(step)
                if (eval_metrics is not None or step % int(config.train.checkpoint_every) == 0
                        or final or host.stopped_early or stop_now):
                    save(step, eval_metrics, pending=interrupted)
                    last_saved = step
                if time_up and not stop_now:
                    timed_out = True
                    if is_main:
                        bar.write(f"time budget of {max_seconds:.0f} s reached at step {step}")
                    break
                if stop_now:
                    preempted = True
                    if is_main:
                        bar.write(f"SIGTERM: checkpoint saved at step {step}; exiting")
                    break
        if last_saved != step and step > 0:
            save(step, None)
    finally:
        manager.wait_until_finished()
        bar.close()
        writer.close()
    wall = time.perf_counter() - t_start
    steps_run = step - start_step
    best_step = manager.best_step()
    manager.close()
    peak = _peak_memory_bytes(devices[0])
    summary = {
        "workdir": os.fspath(workdir), "task": config.task, "arch": config.model.arch,
        "steps": step, "steps_this_run": steps_run, "resumed_from": restored,
        "best_step": best_step, "best_metric": name, "best_value": host.best_value,
        "stopped_early": host.stopped_early, "preempted": preempted, "timed_out": timed_out,
        "wall_time_s": wall, "steps_per_s": steps_run / wall if wall > 0 else None,
        "devices": n_global, "local_devices": n_local, "host_devices": counts["host_devices"],
        "hosts": counts["hosts"], "platform": counts["platform"], "processes": process_count,
        "peak_memory_bytes": peak, "last": {k: _json_safe(v) for k, v in last_metrics.items()},
    }
    if is_main:
        support.write_text(workdir / "summary.json", json.dumps(summary, indent=2) + "\n")
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
