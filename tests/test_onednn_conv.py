"""oneDNN convolutions (cac_jax/ops, docs/onednn.md): forward and both gradients equal XLA's over the
models' shapes and odd ones, under jit, vmap and pmap; whole models equal under both
implementations; the XLA fallback when the extension is missing; the build's failure path."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from cac_jax.models import build_model, layers
from cac_jax.models.config import model_config
from cac_jax.ops import build as build_lib
from cac_jax.ops import onednn_conv

needs_onednn = pytest.mark.skipif(not onednn_conv.available(),
                                  reason="oneDNN extension not built (python -m cac_jax.ops.build)")
DIMS = ("NHWC", "HWIO", "NHWC")
FORWARD = "cac_onednn_conv_forward"
WINOGRAD = onednn_conv.WINOGRAD_TARGET

# (input NHWC, kernel (kh, kw), out channels, strides, padding): the models' kinds of convolution
# at tiny sizes (3x3 SAME at stride 1 and 2, the UNet's 3-channel input, the ConvLSTM's 4 * hidden
# gates) and odd ones: 1-pixel images, batch 1, channels not a multiple of 8, VALID, other kernels.
CASES = [
    ((2, 16, 16, 8), (3, 3), 16, (1, 1), "SAME"),
    ((2, 16, 16, 8), (3, 3), 16, (2, 2), "SAME"),
    ((1, 8, 8, 3), (3, 3), 8, (1, 1), "SAME"),
    ((3, 8, 8, 16), (3, 3), 64, (1, 1), "SAME"),
    ((1, 1, 1, 3), (3, 3), 5, (1, 1), "SAME"),
    ((1, 1, 1, 5), (3, 3), 7, (2, 2), "SAME"),
    ((2, 9, 7, 5), (3, 3), 7, (2, 2), "SAME"),
    ((2, 9, 7, 5), (3, 3), 6, (1, 1), "VALID"),
    ((1, 10, 12, 4), (5, 5), 3, (2, 1), "SAME"),
    ((2, 6, 6, 4), (1, 1), 3, (1, 1), "VALID"),
    ((2, 6, 5, 3), (2, 3), 4, (1, 2), ((1, 0), (2, 1))),
]


def xla_conv(x, w, strides, padding):
    return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=DIMS)


def onednn(x, w, strides, padding):
    return onednn_conv.conv_general_dilated(x, w, strides, padding, dimension_numbers=DIMS)


def operands(shape, kernel, features, seed=0):
    kx, kw = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(kx, shape, jnp.float32)
    w = jax.random.normal(kw, (*kernel, shape[-1], features), jnp.float32) / np.sqrt(
        np.prod(kernel) * shape[-1])
    return x, w


def loss_of(conv, strides, padding):
    # A nonlinear loss, so the incoming gradient differs per output element.
    return lambda x, w: jnp.sum(jnp.sin(conv(x, w, strides, padding)))


def close(a, b, rtol=1e-5):
    a, b = np.asarray(a), np.asarray(b)
    np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * max(1.0, float(np.abs(b).max())))


@needs_onednn
@pytest.mark.parametrize("shape,kernel,features,strides,padding", CASES)
def test_forward_and_both_gradients_equal_xla(shape, kernel, features, strides, padding):
    x, w = operands(shape, kernel, features)
    fn = jax.jit(onednn, static_argnums=(2, 3))
    assert FORWARD in str(jax.make_jaxpr(onednn, static_argnums=(2, 3))(x, w, strides, padding))
    close(fn(x, w, strides, padding), xla_conv(x, w, strides, padding))
    grads = jax.jit(jax.grad(loss_of(onednn, strides, padding), (0, 1)))(x, w)
    expected = jax.grad(loss_of(xla_conv, strides, padding), (0, 1))(x, w)
    for got, want in zip(grads, expected, strict=True):
        assert got.shape == want.shape
        close(got, want)


@needs_onednn
def test_vmap_folds_a_shared_kernel_and_maps_per_example_kernels():
    strides, padding = (2, 2), "SAME"
    x, w = operands((2, 9, 9, 5), (3, 3), 6)
    xs = jnp.stack([x, 2 * x, -x])
    ws = jnp.stack([w, -w, 0.5 * w])
    # Shared kernel: one call over the folded batch (no loop in the jaxpr).
    folded = jax.make_jaxpr(jax.vmap(lambda x: onednn(x, w, strides, padding)))(xs)
    assert FORWARD in str(folded) and "scan" not in str(folded)
    close(jax.vmap(lambda x: onednn(x, w, strides, padding))(xs),
          jax.vmap(lambda x: xla_conv(x, w, strides, padding))(xs))
    # Per-example kernels and per-example gradients of both operands.
    got = jax.jit(jax.vmap(jax.grad(loss_of(onednn, strides, padding), (0, 1))))(xs, ws)
    want = jax.vmap(jax.grad(loss_of(xla_conv, strides, padding), (0, 1)))(xs, ws)
    for a, b in zip(got, want, strict=True):
        close(a, b)
    # A batched kernel with a shared input.
    close(jax.vmap(lambda w: onednn(x, w, strides, padding))(ws),
          jax.vmap(lambda w: xla_conv(x, w, strides, padding))(ws))


@needs_onednn
def test_pmap_over_host_devices():
    n = min(4, jax.local_device_count())
    x, w = operands((n * 2, 8, 8, 4), (3, 3), 8)
    xs = x.reshape(n, 2, 8, 8, 4)
    grad = jax.grad(loss_of(onednn, (1, 1), "SAME"), 1)
    got = jax.pmap(lambda x: jax.lax.pmean(grad(x, w), "d"), axis_name="d")(xs)
    want = jax.grad(loss_of(xla_conv, (1, 1), "SAME"), 1)(x, w) / n
    for row in np.asarray(got):
        close(row, want)


def test_uncovered_convolutions_go_to_xla():
    x, w = operands((1, 8, 8, 4), (3, 3), 4)
    cases = [
        lambda: onednn_conv.conv_general_dilated(x.astype(jnp.float16), w.astype(jnp.float16),
                                                 (1, 1), "SAME", dimension_numbers=DIMS),
        lambda: onednn_conv.conv_general_dilated(x, w, (1, 1), "SAME", rhs_dilation=(2, 2),
                                                 dimension_numbers=DIMS),
        lambda: onednn_conv.conv_general_dilated(x, w[:, :, :2], (1, 1), "SAME",
                                                 feature_group_count=2, dimension_numbers=DIMS),
    ]
    for case in cases:
        assert FORWARD not in str(jax.make_jaxpr(case)())


# Winograd F(2x2, 3x3) (3x3, stride 1, 'same', >= WINOGRAD_MIN_CHANNELS input channels): the
# models' large convolutions and odd ones (1-pixel and odd-sized images whose last tile is cut,
# batch 1, channels not a multiple of 8). With 128 or more output channels the input gradient
# runs by Winograd too (its input channels are the forward's output channels).
WINOGRAD_CASES = [
    ((1, 1, 1, 128), 3),
    ((2, 7, 5, 130), 17),
    ((1, 5, 4, 136), 129),
]


@needs_onednn
@pytest.mark.parametrize("shape,features", WINOGRAD_CASES)
def test_winograd_forward_and_both_gradients_equal_xla(shape, features):
    x, w = operands(shape, (3, 3), features)
    args = ((1, 1), "SAME")
    forward = str(jax.make_jaxpr(onednn, static_argnums=(2, 3))(x, w, *args))
    assert WINOGRAD in forward and FORWARD not in forward
    backward = str(jax.make_jaxpr(jax.grad(loss_of(onednn, *args), (0, 1)))(x, w))
    assert backward.count(WINOGRAD) == (2 if features >= onednn_conv.WINOGRAD_MIN_CHANNELS else 1)
    close(jax.jit(onednn, static_argnums=(2, 3))(x, w, *args), xla_conv(x, w, *args))
    grads = jax.jit(jax.grad(loss_of(onednn, *args), (0, 1)))(x, w)
    expected = jax.grad(loss_of(xla_conv, *args), (0, 1))(x, w)
    for got, want in zip(grads, expected, strict=True):
        assert got.shape == want.shape
        close(got, want)


@needs_onednn
def test_winograd_only_where_it_fits_and_never_under_onednn_direct():
    x, w = operands((2, 8, 8, 128), (3, 3), 8)
    direct = layers.conv_impl_fn("onednn_direct")
    jaxpr = str(jax.make_jaxpr(lambda x, w: direct(x, w, (1, 1), "SAME",
                                                   dimension_numbers=DIMS))(x, w))
    assert FORWARD in jaxpr and WINOGRAD not in jaxpr
    close(direct(x, w, (1, 1), "SAME", dimension_numbers=DIMS), xla_conv(x, w, (1, 1), "SAME"))
    # Stride 2, VALID padding, a 5x5 kernel, fewer input channels: the direct algorithm.
    for conv in (lambda: onednn(x, w, (2, 2), "SAME"), lambda: onednn(x, w, (1, 1), "VALID"),
                 lambda: onednn(*operands((2, 8, 8, 128), (5, 5), 8), (1, 1), "SAME"),
                 lambda: onednn(*operands((2, 8, 8, 127), (3, 3), 8), (1, 1), "SAME")):
        jaxpr = str(jax.make_jaxpr(conv)())
        assert FORWARD in jaxpr and WINOGRAD not in jaxpr
    assert onednn_conv.resolve_impl("onednn_direct") == "onednn_direct"
    # A 5x5 kernel with padding 1 and 128 output channels: neither its forward nor its input
    # gradient is a 'same' 3x3 convolution, so both run the direct algorithm.
    x5, w5 = operands((1, 6, 6, 4), (5, 5), 128)
    pads = ((1, 1), (1, 1))
    assert WINOGRAD not in str(jax.make_jaxpr(jax.grad(loss_of(onednn, (1, 1), pads)))(x5, w5))
    close(jax.grad(loss_of(onednn, (1, 1), pads))(x5, w5),
          jax.grad(loss_of(xla_conv, (1, 1), pads))(x5, w5))


@needs_onednn
def test_winograd_is_deterministic_and_vmaps_by_folding_the_batch():
    x, w = operands((2, 9, 6, 128), (3, 3), 32)
    fn = jax.jit(onednn, static_argnums=(2, 3))
    first = np.asarray(fn(x, w, (1, 1), "SAME"))
    np.testing.assert_array_equal(first, np.asarray(fn(x, w, (1, 1), "SAME")))
    xs = jnp.stack([x, -2 * x])
    folded = jax.make_jaxpr(jax.vmap(lambda x: onednn(x, w, (1, 1), "SAME")))(xs)
    assert WINOGRAD in str(folded) and "scan" not in str(folded)
    close(jax.vmap(lambda x: onednn(x, w, (1, 1), "SAME"))(xs),
          jax.vmap(lambda x: xla_conv(x, w, (1, 1), "SAME"))(xs))


needs_bf16 = pytest.mark.skipif(not onednn_conv.bf16_native(),
                                reason="no native bfloat16 on this CPU (or no extension)")


@needs_bf16
@pytest.mark.parametrize("shape,kernel,features,strides,padding",
                         [CASES[0], CASES[1], CASES[3], CASES[4], CASES[6], CASES[10]])
def test_bfloat16_forward_and_both_gradients_match_xla(shape, kernel, features, strides,
                                                       padding):
    x, w = (a.astype(jnp.bfloat16) for a in operands(shape, kernel, features))
    jaxpr = str(jax.make_jaxpr(onednn, static_argnums=(2, 3))(x, w, strides, padding))
    assert f"{FORWARD}{onednn_conv.BF16_SUFFIX}" in jaxpr
    y = jax.jit(onednn, static_argnums=(2, 3))(x, w, strides, padding)
    assert y.dtype == jnp.bfloat16
    # The reference: XLA's float32 convolution of the same (bfloat16-valued) operands; oneDNN
    # accumulates in float32 and rounds once to bfloat16 (relative 2^-8).
    x32, w32 = x.astype(jnp.float32), w.astype(jnp.float32)
    close(y.astype(jnp.float32), xla_conv(x32, w32, strides, padding), rtol=1e-2)

    def loss(conv):
        return lambda a, b: jnp.sum(jnp.sin(conv(a, b, strides, padding).astype(jnp.float32)))

    grads = jax.jit(jax.grad(loss(onednn), (0, 1)))(x, w)
    expected = jax.grad(loss(xla_conv), (0, 1))(x32, w32)
    for got, want in zip(grads, expected, strict=True):
        assert got.dtype == jnp.bfloat16 and got.shape == want.shape
        # the incoming gradient is rounded to bfloat16 too: a few bfloat16 steps
        close(got.astype(jnp.float32), want, rtol=3e-2)


def test_bfloat16_stays_with_xla_where_the_cpu_lacks_it(monkeypatch):
    monkeypatch.setattr(onednn_conv, "bf16_native", lambda: False)
    x, w = (a.astype(jnp.bfloat16) for a in operands((1, 8, 8, 4), (3, 3), 4))
    assert FORWARD not in str(jax.make_jaxpr(onednn, static_argnums=(2, 3))(x, w, (1, 1),
                                                                             "SAME"))


def model_outputs(arch: str, impl: str, dtype: str = "float32"):
    cfg = model_config(arch, "calcium", local=True)
    cfg.conv_impl = impl
    cfg.dtype = dtype
    model = build_model(cfg)
    x = jax.random.normal(jax.random.key(1), (1, 3, 16, 16, 1))
    params = model.init(jax.random.key(0), x)["params"]

    def loss(p):
        logits, _ = model.apply({"params": p}, x)
        return jnp.mean(logits ** 2), logits

    lowered = jax.jit(jax.value_and_grad(loss, has_aux=True)).lower(params)
    (_, logits), grads = lowered.compile()(params)
    return params, logits, grads, lowered.as_text()


@needs_onednn
@pytest.mark.parametrize("arch", [pytest.param("convlstm", marks=pytest.mark.slow), "unet"])
def test_models_equal_under_both_implementations(arch):
    p_xla, logits_xla, grads_xla, jaxpr_xla = model_outputs(arch, "xla")
    p_dnn, logits_dnn, grads_dnn, jaxpr_dnn = model_outputs(arch, "onednn")
    assert FORWARD in str(jaxpr_dnn) and FORWARD not in str(jaxpr_xla)
    # The test models' deepest 3x3 convolutions have 128 or more input channels: Winograd runs
    # those (forward and input gradients), oneDNN's direct algorithm the others.
    assert WINOGRAD in str(jaxpr_dnn) and WINOGRAD not in str(jaxpr_xla)
    # Same parameter tree, names, shapes and initial values: checkpoints do not depend on it.
    assert jax.tree.structure(p_xla) == jax.tree.structure(p_dnn)
    for a, b in zip(jax.tree.leaves(p_xla), jax.tree.leaves(p_dnn), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    close(logits_dnn, logits_xla, rtol=1e-4)
    for a, b in zip(jax.tree.leaves(grads_dnn), jax.tree.leaves(grads_xla), strict=True):
        close(a, b, rtol=1e-4)


def test_missing_extension_falls_back_to_xla_with_one_line(monkeypatch, tmp_path, capsys):
    missing = tmp_path / "libmissing.so"
    monkeypatch.setattr(onednn_conv, "LIBRARY", missing)
    onednn_conv.resolve_impl.cache_clear()
    try:
        assert onednn_conv.resolve_impl("auto") == "xla"
        assert onednn_conv.resolve_impl("onednn") == "xla"
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and str(missing) in lines[0] and "XLA" in lines[0]
        _, logits, _, jaxpr = model_outputs("unet", "onednn")
        assert FORWARD not in str(jaxpr) and np.isfinite(np.asarray(logits)).all()
        x, w = operands((1, 4, 4, 2), (3, 3), 2)
        assert FORWARD not in str(jax.make_jaxpr(onednn, static_argnums=(2, 3))(
            x, w, (1, 1), "SAME"))
    finally:
        onednn_conv.resolve_impl.cache_clear()
    with pytest.raises(ValueError, match="conv_impl"):
        onednn_conv.resolve_impl("mkl")


def test_build_failure_is_one_line_and_not_an_error(monkeypatch, capsys):
    def no_dnnl():
        raise FileNotFoundError("/nowhere/include/oneapi/dnnl/dnnl.hpp: missing")

    monkeypatch.setattr(build_lib, "dnnl_dirs", no_dnnl)
    assert build_lib.main([]) == 0
    assert build_lib.main(["--strict"]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and all("dnnl.hpp: missing" in line and "XLA" in line
                                   for line in lines)


@needs_bf16
def test_a_bfloat16_model_runs_its_convolutions_through_onednn():
    _, logits_ref, grads_ref, _ = model_outputs("unet", "xla", "float32")
    _, logits_xla, grads_xla, text_xla = model_outputs("unet", "xla", "bfloat16")
    _, logits_dnn, grads_dnn, text_dnn = model_outputs("unet", "onednn", "bfloat16")
    assert f"{FORWARD}{onednn_conv.BF16_SUFFIX}" in text_dnn and FORWARD not in text_xla

    def error(a, ref):
        a, ref = np.asarray(a, np.float32), np.asarray(ref, np.float32)
        return float(np.linalg.norm(a - ref) / max(np.linalg.norm(ref), 1e-30))

    # Against the float32 model, oneDNN's bfloat16 is as close as XLA's bfloat16 (both round the
    # activations to bfloat16 between layers; oneDNN accumulates each convolution in float32).
    assert error(logits_dnn, logits_ref) <= max(2 * error(logits_xla, logits_ref), 0.02)
    # The gradients: bfloat16 rounding leaves 10-40% relative error on the deep layers' leaves
    # with either library (another order of accumulation, e.g. AMX on a Xeon, moves each leaf's
    # by a few per cent), so the whole gradient is compared closely and each leaf loosely; a
    # wrong kernel is off by ~100%.
    def flat(tree):
        return np.concatenate([np.ravel(np.asarray(x, np.float32)) for x in jax.tree.leaves(tree)])

    assert error(flat(grads_dnn), flat(grads_ref)) <= 1.25 * error(flat(grads_xla),
                                                                   flat(grads_ref)) + 0.01
    for a, b, ref in zip(jax.tree.leaves(grads_dnn), jax.tree.leaves(grads_xla),
                         jax.tree.leaves(grads_ref), strict=True):
        assert error(a, ref) <= 2 * error(b, ref) + 0.05, (error(a, ref), error(b, ref))
