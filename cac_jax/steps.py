"""The model, the optimizer and the per-device steps of training (docs/training.md).

- `train_step`: one optimizer step on one device's share of the global batch, with explicit
  collectives over the named axis `AXIS` (`lax.pmean` of gradients and BatchNorm statistics; the
  loss normalised by the global weight sum, so any device count gives the same update); run under
  `jax.pmap` by `cac_jax.train`;
- `eval_step`: one device's validation predictions and summed loss / Dice counts;
- `loss_weight`: the per-pixel loss weight (non-candidate pixels down-weighted, calcium task);
- `ema_decay`, `eval_params`: the optional exponential moving average of the parameters
  (Polyak averaging), which validation scores and checkpoints hand to inference;
- `make_optimizer` (Adam, or AdamW, after optional clipping), `make_plateau`
  (`optax.contrib.reduce_on_plateau` counted in evaluations), `anneal_factor` (the end-of-budget
  annealing of the rate), `model_for_training`, `init_state`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import struct
from jax import lax

from cac_jax.distributed import AXIS
from cac_jax.losses import focal_loss_map
from cac_jax.models import build_model
from data_pipeline import frames as frames_lib
from data_pipeline.constants import CALCIUM_THRESHOLD_HU
from data_pipeline.labels import HU_WINDOW


class TrainState(struct.PyTreeNode):
    """What the step changes: parameters, BatchNorm statistics, optimizer state, step, and the
    parameters' moving average (None unless `train.ema_decay` > 0)."""

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    ema_params: Any = None


def ema_decay(config) -> float:
    """`train.ema_decay` (0: no moving average of the parameters)."""
    return float(config.train.get("ema_decay", 0.0) or 0.0)


def eval_params(state: TrainState) -> Any:
    """The parameters validation scores and a checkpoint hands to inference: the moving average
    when the run keeps one, else the parameters themselves."""
    return state.params if state.ema_params is None else state.ema_params


def _ema_update(config, step: jax.Array, params: Any, ema: Any) -> Any:
    """The moving average after optimizer step `step` (counted from 1): decay
    min(ema_decay, (1 + n) / (10 + n)) at the run's n-th step, the warm-up of TensorFlow's
    ExponentialMovingAverage (num_updates), so an average started at the initialisation does not
    drag it along for a horizon of 1 / (1 - decay) steps."""
    n = step.astype(jnp.float32)
    decay = jnp.minimum(ema_decay(config), (1.0 + n) / (10.0 + n))
    return optax.incremental_update(params, ema, 1.0 - decay)


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
                       opt_state=tx.init(params),
                       ema_params=params if ema_decay(config) > 0 else None)
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


def training_loss(config, logits, aux, labels, weight, images, candidate=None) -> jax.Array:
    """The loss the training step minimises, on one device's batch alone: the focal loss (the
    config's alpha and gamma) plus `aux_loss_weight` times the branch losses, weighted by
    `loss_weight` and normalised by the weights' sum. `train_step` normalises by the sum over all
    devices instead; on one device the two agree. The timing study times this loss."""
    weight = loss_weight(config, images, weight, candidate)
    main, aux_loss = _losses(config, logits, aux, labels, weight)
    total = jnp.maximum(jnp.sum(weight), 1e-12)
    return (jnp.sum(main * weight) + float(config.train.aux_loss_weight)
            * jnp.sum(aux_loss * weight)) / total


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
    ema = state.ema_params
    if ema is not None:
        ema = _ema_update(config, state.step + 1, params, ema)
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                              opt_state=opt_state, ema_params=ema)
    return new_state, metrics


def eval_step(state: TrainState, batch: dict, *, model, config):
    """Validation on one device: predictions and summed loss / Dice counts over `AXIS`, by the
    parameters a checkpoint hands to inference (`eval_params`).

    The predictions are the class map (int8), or, for a heart-frame calcium model, the class
    probabilities (float32), which validation maps back onto each scan's grid as inference does.
    A batch may hold, instead of the windows ("image"), their distinct "slices" and the
    "windows" as indices into them (`cac_jax.validation.shared_slices_batch`; ConvLSTM only).
    """
    variables = {"params": eval_params(state)}
    if state.batch_stats:
        variables["batch_stats"] = state.batch_stats
    if "slices" in batch:
        logits, aux = model.apply(variables, batch["slices"], train=False,
                                  windows=batch["windows"])
        centres = jnp.take(batch["slices"], batch["windows"][:, 1:2], axis=0)  # (B, 1, H, W, 1)
    else:
        logits, aux = model.apply(variables, batch["image"], train=False)
        centres = batch["image"]
    labels, weight = batch["label"], batch["weight"]
    main, _ = _losses(config, logits, {}, labels, weight)
    loss_w = loss_weight(config, centres, weight, batch.get("candidate"))
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
