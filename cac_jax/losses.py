"""Multi-class (softmax) focal loss (Lin et al. 2017, "Focal Loss for Dense Object Detection").

Per pixel with true class t and softmax probability p_t: FL = -alpha_t * (1 - p_t)^gamma * log p_t.
gamma = 0 and alpha = 1 give cross-entropy; gamma > 0 down-weights pixels the model already gets
right, which is what lets the rare calcium classes (a few hundred voxels per scan) be learnt
among millions of background pixels (the paper trains with focal loss for this reason).
Computed in float32 from log-softmax (stable for large logits, bfloat16 models included).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp


def focal_loss_map(logits: jax.Array, labels: jax.Array, *,
                   alpha: Sequence[float] | jax.Array | None = None,
                   gamma: float = 2.0) -> jax.Array:
    """Per-pixel focal loss: logits (..., C), integer labels (...) -> float32 (...).

    `alpha` is one weight per class (None: 1 for every class).
    """
    logits = jnp.asarray(logits, jnp.float32)
    num_classes = logits.shape[-1]
    log_p = jax.nn.log_softmax(logits, axis=-1)
    labels = jnp.asarray(labels, jnp.int32)
    log_pt = jnp.take_along_axis(log_p, labels[..., None], axis=-1)[..., 0]
    if gamma:
        # (1 - p_t)^gamma via -expm1(log p_t): accurate when p_t is close to 1.
        modulator = jnp.power(-jnp.expm1(log_pt), gamma)
    else:
        modulator = 1.0
    loss = -modulator * log_pt
    if alpha is not None:
        alpha = jnp.asarray(alpha, jnp.float32)
        if alpha.shape != (num_classes,):
            raise ValueError(f"alpha needs one weight per class ({num_classes}), got shape "
                             f"{alpha.shape}")
        loss = loss * alpha[labels]
    return loss


def focal_loss(logits: jax.Array, labels: jax.Array, weight: jax.Array | None = None, *,
               alpha: Sequence[float] | jax.Array | None = None,
               gamma: float = 2.0) -> jax.Array:
    """Weighted mean focal loss: sum(weight * FL) / sum(weight) (0 when every weight is 0).

    `weight` (same shape as `labels`) is the input pipeline's per-pixel weight: 0 on padding and
    outside the scan, so those pixels add nothing.
    """
    loss = focal_loss_map(logits, labels, alpha=alpha, gamma=gamma)
    if weight is None:
        return jnp.mean(loss)
    weight = jnp.asarray(weight, jnp.float32)
    return jnp.sum(loss * weight) / jnp.maximum(jnp.sum(weight), 1e-12)
