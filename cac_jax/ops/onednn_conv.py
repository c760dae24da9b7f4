"""2D NHWC convolutions through oneDNN as XLA FFI custom calls (docs/onednn.md).

`conv_general_dilated` has `jax.lax.conv_general_dilated`'s signature, so it can be handed to
`flax.linen.Conv(conv_general_dilated=...)` (parameters, names and initialisation stay flax's).
It sends the convolutions the extension covers (rank 4, NHWC input, HWIO kernel, float32, no
dilation, one feature group, non-negative padding; float32, or bfloat16 where the CPU computes
in bfloat16: `bf16_native()`) to oneDNN and everything else to XLA.

The oneDNN convolution is a `jax.custom_vjp`: forward, input gradient and weight gradient are three
FFI targets (`cac_jax/ops/csrc/onednn_conv.cc`) registered for the CPU platform, and a fourth runs
the forward (and input gradient) of the large 3x3 'same' float32 convolutions by Winograd's
F(2x2, 3x3) under conv_impl "onednn" (`winograd_fits`). Each call has a
batching rule (`jax.custom_batching.custom_vmap`): a vmapped input with a shared kernel folds the
vmapped axis into the convolution's batch (one call); a vmapped kernel, or the weight gradient of
vmapped inputs (one gradient per example), runs one call per example (`lax.map`).

`available()` loads the library built by `python -m cac_jax.ops.build` once; when it is missing
or fails to load it prints one line and returns False, and the callers use XLA.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from cac_jax.ops.build import BUILD_DIR, LIBRARY_NAME

LIBRARY = BUILD_DIR / LIBRARY_NAME
# FFI target name -> symbol exported by the library.
TARGETS = {
    "cac_onednn_conv_forward": "CacOnednnConvForward",
    "cac_onednn_conv_backward_data": "CacOnednnConvBackwardData",
    "cac_onednn_conv_backward_weights": "CacOnednnConvBackwardWeights",
}
WINOGRAD_TARGET = "cac_onednn_conv_winograd"
# The bfloat16 handlers: the same targets with this suffix.
BF16_SUFFIX = "_bf16"
TARGETS.update({f"{target}{BF16_SUFFIX}": f"{symbol}Bf16"
                for target, symbol in list(TARGETS.items())})
TARGETS[WINOGRAD_TARGET] = "CacOnednnConvWinograd"
IMPLS = ("xla", "onednn", "onednn_direct", "auto")
# Winograd F(2x2, 3x3) runs the 3x3, stride-1, 'same' float32 convolutions with at least this
# many input channels (fewer: the transforms cost more than the products save; docs/onednn.md).
WINOGRAD_MIN_CHANNELS = 128

Pads = tuple[tuple[int, int], tuple[int, int]]


def process_cores() -> int:
    """The cores this process may run on (its CPU affinity), which oneDNN's threads follow."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


_BF16_NATIVE: dict[str, bool] = {}


@functools.cache
def load(path: Path = LIBRARY) -> str | None:
    """Load the extension at `path` and register its FFI targets; its oneDNN version, or None.

    None (with one line on stderr naming the file and the problem) when the library is missing
    or does not load; the result is cached, so the notice appears once per process.
    """
    try:
        lib = ctypes.CDLL(str(path))
        for target, symbol in TARGETS.items():
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)),
                                        platform="cpu")
        lib.cac_onednn_set_num_threads(ctypes.c_int(process_cores()))
        version = int(lib.cac_onednn_version())
        _BF16_NATIVE[str(path)] = bool(lib.cac_onednn_bf16_native())
    except (OSError, AttributeError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        print(f"{path}: oneDNN convolutions unavailable ({reason}); using XLA's convolutions "
              "(build with `python -m cac_jax.ops.build`, docs/onednn.md)", file=sys.stderr)
        return None
    return f"{version // 10000}.{version // 100 % 100}.{version % 100}"


def available() -> bool:
    """Whether the extension (at `LIBRARY`) is built and loads in this process."""
    return load(LIBRARY) is not None


def bf16_native() -> bool:
    """Whether the extension loads and this CPU computes bfloat16 convolutions natively
    (AVX512-BF16, AMX or AVX2-VNNI-2); elsewhere bfloat16 convolutions stay with XLA."""
    return available() and _BF16_NATIVE.get(str(LIBRARY), False)


@functools.cache
def resolve_impl(name: str) -> str:
    """"xla", "onednn" or "onednn_direct" for a `config.model.conv_impl` value (one of `IMPLS`).

    "onednn" runs the convolutions through oneDNN, the large 3x3 ones by Winograd's F(2x2, 3x3)
    (`winograd_fits`); "onednn_direct" through oneDNN's direct algorithm only. "auto" is "onednn"
    when JAX's default backend is the CPU and the extension loads, XLA otherwise (always on
    GPU/TPU). The oneDNN values where they cannot run (no extension, or an accelerator backend)
    fall back to XLA with a one-line notice (once: the answer is cached per process).
    """
    if name not in IMPLS:
        raise ValueError(f"unknown conv_impl {name!r}: expected one of {IMPLS}")
    if name == "xla":
        return "xla"
    on_cpu = jax.default_backend() == "cpu"
    if name == "auto":
        return "onednn" if on_cpu and available() else "xla"
    if not on_cpu:
        print(f"conv_impl {name!r} runs on the CPU only; the {jax.default_backend()} backend uses "
              "XLA's convolutions", file=sys.stderr)
        return "xla"
    return name if available() else "xla"


def _call(target: str, out_shape: Sequence[int], a: jax.Array, b: jax.Array,
          strides: tuple[int, int], pads: Pads) -> jax.Array:
    """One unbatched FFI call with the geometry as attributes."""
    (pt, pb), (pl, pr) = pads
    if a.dtype == jnp.bfloat16:
        target += BF16_SUFFIX
    return jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(tuple(out_shape), a.dtype))(
        a, b, stride_h=np.int64(strides[0]), stride_w=np.int64(strides[1]),
        pad_top=np.int64(pt), pad_bottom=np.int64(pb), pad_left=np.int64(pl),
        pad_right=np.int64(pr))


def _per_example(fn, a: jax.Array, b: jax.Array, a_batched: bool, b_batched: bool,
                 axis_size: int) -> jax.Array:
    """fn(a[i], b[i]) for every i of the vmapped axis (unbatched operands broadcast)."""
    if not a_batched:
        a = jnp.broadcast_to(a, (axis_size, *a.shape))
    if not b_batched:
        b = jnp.broadcast_to(b, (axis_size, *b.shape))
    return lax.map(lambda ab: fn(*ab), (a, b))


def _image_op(call):
    """An op f(images, kernel) = call(images, kernel) whose output has the images' batch
    (forward, input gradient), with its batching rule."""

    @jax.custom_batching.custom_vmap
    def op(images: jax.Array, kernel: jax.Array) -> jax.Array:
        return call(images, kernel)

    @op.def_vmap
    def rule(axis_size, in_batched, images, kernel):
        images_batched, kernel_batched = in_batched
        if images_batched and not kernel_batched:  # fold the vmapped axis into the batch
            folded = op(images.reshape(-1, *images.shape[2:]), kernel)
            return folded.reshape(axis_size, -1, *folded.shape[1:]), True
        if not (images_batched or kernel_batched):
            return op(images, kernel), False
        return _per_example(op, images, kernel, images_batched, kernel_batched, axis_size), True

    return op


def _forward(x, w, strides, pads):
    def out_shape(xs, ws):
        oh = (xs[1] + sum(pads[0]) - ws[0]) // strides[0] + 1
        ow = (xs[2] + sum(pads[1]) - ws[1]) // strides[1] + 1
        return (xs[0], oh, ow, ws[3])

    return _image_op(lambda a, b: _call("cac_onednn_conv_forward", out_shape(a.shape, b.shape),
                                        a, b, strides, pads))(x, w)


def _backward_data(dy, w, in_hw, strides, pads):
    return _image_op(lambda a, b: _call("cac_onednn_conv_backward_data",
                                        (a.shape[0], *in_hw, b.shape[2]), a, b, strides,
                                        pads))(dy, w)


def winograd_fits(strides, pads, kernel_shape, dtype) -> bool:
    """Whether Winograd's F(2x2, 3x3) runs this convolution under conv_impl "onednn": 3x3
    kernel, stride 1, padding 1 on every side ('same'), float32, at least
    `WINOGRAD_MIN_CHANNELS` input channels (kernel_shape is HWIO)."""
    return (tuple(strides) == (1, 1) and tuple(map(tuple, pads)) == ((1, 1), (1, 1))
            and tuple(kernel_shape[:2]) == (3, 3) and kernel_shape[2] >= WINOGRAD_MIN_CHANNELS
            and jnp.dtype(dtype) == jnp.float32)


def _winograd(x, w):
    """Winograd F(2x2, 3x3) convolution of NHWC `x` with the 3x3 HWIO `w` (stride 1, 'same')."""
    return _image_op(lambda a, b: jax.ffi.ffi_call(
        WINOGRAD_TARGET, jax.ShapeDtypeStruct((*a.shape[:3], b.shape[3]), a.dtype))(a, b))(x, w)


def _backward_weights(x, dy, kernel_hw, strides, pads):
    @jax.custom_batching.custom_vmap
    def op(x, dy):
        return _call("cac_onednn_conv_backward_weights",
                     (*kernel_hw, x.shape[-1], dy.shape[-1]), x, dy, strides, pads)

    @op.def_vmap
    def rule(axis_size, in_batched, x, dy):
        if not any(in_batched):
            return op(x, dy), False
        return _per_example(op, x, dy, *in_batched, axis_size), True

    return op(x, dy)


def _conv(x, w, strides, pads, winograd):
    if winograd and winograd_fits(strides, pads, w.shape, x.dtype):
        return _winograd(x, w)
    return _forward(x, w, strides, pads)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def conv2d(x: jax.Array, w: jax.Array, strides: tuple[int, int], pads: Pads,
           winograd: bool = False) -> jax.Array:
    """oneDNN convolution of NHWC `x` with HWIO `w`, both float32 or both bfloat16
    (cross-correlation, as XLA).

    strides (sh, sw), pads ((top, bottom), (left, right)), all non-negative; the output shape is
    `lax.conv_general_dilated`'s. `winograd`: the convolutions `winograd_fits` admits run by
    Winograd's F(2x2, 3x3), and so do the input gradients of the 3x3 'same' float32 ones with
    at least `WINOGRAD_MIN_CHANNELS` output channels; the weight gradient is always oneDNN's
    direct one.
    """
    return _conv(x, w, strides, pads, winograd)


def _conv2d_fwd(x, w, strides, pads, winograd):
    return _conv(x, w, strides, pads, winograd), (x, w)


def _conv2d_bwd(strides, pads, winograd, residuals, dy):
    x, w = residuals
    # The input gradient of a stride-1 'same' 3x3 convolution is the 'same' convolution of dy
    # with the kernel flipped in space and its channel axes swapped.
    flipped = (*w.shape[:2], w.shape[3], w.shape[2])
    if winograd and winograd_fits(strides, pads, flipped, dy.dtype):
        dx = _winograd(dy, jnp.flip(w, (0, 1)).transpose(0, 1, 3, 2))
    else:
        dx = _backward_data(dy, w, x.shape[1:3], strides, pads)
    dw = _backward_weights(x, dy, w.shape[:2], strides, pads)
    return dx, dw


conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)

_NHWC = lax.ConvDimensionNumbers(lhs_spec=(0, 3, 1, 2), rhs_spec=(3, 2, 0, 1), out_spec=(0, 3, 1, 2))


def _covered(lhs, rhs, window_strides, pads, lhs_dilation, rhs_dilation, dimension_numbers,
             feature_group_count) -> bool:
    """Whether oneDNN's path covers this convolution (otherwise XLA runs it)."""
    dims = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    dtype_ok = lhs.dtype == rhs.dtype and (
        lhs.dtype == jnp.float32 or (lhs.dtype == jnp.bfloat16 and bf16_native()))
    return (lhs.ndim == 4 and dims == _NHWC and feature_group_count == 1 and dtype_ok
            and all(d == 1 for d in (lhs_dilation or (1, 1)))
            and all(d == 1 for d in (rhs_dilation or (1, 1)))
            and all(p >= 0 for pair in pads for p in pair) and available())


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         batch_group_count=1, precision=None, preferred_element_type=None,
                         winograd=True):
    """`lax.conv_general_dilated` with the convolutions oneDNN covers run by oneDNN (the ones
    `winograd_fits` admits by Winograd's F(2x2, 3x3) unless `winograd` is False)."""
    strides = tuple(int(s) for s in window_strides)
    if isinstance(padding, str):
        pads = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], strides, padding) \
            if lhs.ndim == 4 else None
    else:
        pads = padding
    if (pads is not None and batch_group_count == 1 and preferred_element_type is None
            and _covered(lhs, rhs, strides, pads, lhs_dilation, rhs_dilation, dimension_numbers,
                         feature_group_count)):
        pads = tuple((int(lo), int(hi)) for lo, hi in pads)
        return conv2d(lhs, rhs, strides, pads, bool(winograd))
    return lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
        batch_group_count=batch_group_count, precision=precision,
        preferred_element_type=preferred_element_type)
