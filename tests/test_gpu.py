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


def test_group_norm_bf16_on_accelerator_is_as_accurate_as_flax():
    """On the accelerator's bf16 arithmetic too, |mean| / std = 25 costs no more than flax's."""
    from flax import linen as nn

    from cac_jax.models.layers import GroupNorm

    x = 25.0 + jax.random.normal(jax.random.key(5), (2, 32, 32, 64))
    v = {"params": {"scale": jnp.ones((64,)), "bias": jnp.zeros((64,))}}
    reference = np.asarray(jax.jit(nn.GroupNorm(num_groups=8, epsilon=1e-6).apply)(v, x))
    xb = x.astype(jnp.bfloat16)
    ours = jax.jit(GroupNorm(8, dtype=jnp.bfloat16).apply)(v, xb)
    theirs = jax.jit(nn.GroupNorm(num_groups=8, epsilon=1e-6, dtype=jnp.bfloat16).apply)(v, xb)
    err_ours = np.abs(np.asarray(ours, np.float32) - reference).max()
    err_flax = np.abs(np.asarray(theirs, np.float32) - reference).max()
    assert err_ours <= 1.05 * err_flax + 1e-3 and err_ours < 0.1, (err_ours, err_flax)


def test_bench_training_step_reports_device_memory(tmp_path):
    """`cac-jax bench --train-step` on the accelerator reads the device's own peak memory."""
    import json

    from cac_jax.cli import main

    out = tmp_path / "b"
    assert main(["bench", "--local", "--size", "64", "--slices", "2", "--samples", "2",
                 "--models", "convlstm", "--dtype", "bfloat16", "--train-step",
                 "--train-repeats", "1", "--out", str(out)]) == 0
    res = json.loads((out / "bench.json").read_text())
    step = res["train_step"]["jax"]["convlstm"]
    assert res["machine"]["accelerator"]
    assert step["peak_memory_bytes"] == step["device_peak_bytes_in_use"] > 0
