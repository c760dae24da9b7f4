"""Accelerator checks (marker `gpu`): skipped unless JAX sees a GPU or TPU."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cac_jax.models import build_model
from cac_jax.models.config import model_config

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("arch", ["convlstm", "unet"])
def test_bf16_forward_on_accelerator_matches_float32(arch):
    """dtype "auto" computes in bfloat16 on GPU/TPU; its logits stay close to float32's."""
    cfg = model_config(arch, "calcium", local=True)
    x = jax.random.uniform(jax.random.key(0), (2, 3, 64, 64, 1))
    model_auto = build_model(cfg)
    variables = jax.jit(model_auto.init)(jax.random.key(1), x)
    logits_auto, _ = jax.jit(model_auto.apply)(variables, x)
    cfg.dtype = "float32"
    logits_f32, _ = jax.jit(build_model(cfg).apply)(variables, x)
    assert logits_auto.dtype == jnp.float32  # logits are returned in float32 either way
    np.testing.assert_allclose(np.asarray(logits_auto), np.asarray(logits_f32), atol=0.1)
