"""Building blocks shared by the ConvLSTM-attention model and the UNet baseline.

Initialisation: Kaiming-normal (He et al. 2015, the paper's ref. [11]), a plain (untruncated)
normal with mean 0 and variance 2 / fan_in, where fan_in is the number of inputs that each output
value sums over (He et al.'s criterion: this keeps the activations' variance through ReLU layers).
Biases start at zero.
- Convolutions (`kaiming_normal`): the flax kernel is (kh, kw, in, out), fan_in = kh * kw * in.
  This is exactly PyTorch's `kaiming_normal_(w, mode="fan_in", nonlinearity="relu")` on a Conv2d
  weight (out, in, kh, kw), whose fan_in is also in * kh * kw (the paper used PyTorch).
- Transposed convolutions (`kaiming_normal_transposed(strides)`): an output pixel of a stride-s
  transposed convolution with a (kh, kw) kernel (kh, kw multiples of s) receives contributions
  from only (kh / s_h) * (kw / s_w) kernel taps per input channel, so its effective fan_in is
  in * kh * kw / (s_h * s_w); for the UNet's 2x2 stride-2 upsampling that is `in` (variance
  2 / in). This deliberately differs from PyTorch: `kaiming_normal_` on a ConvTranspose2d weight
  (in, out, kh, kw) takes fan_in = out * kh * kw from the weight's layout (variance 2 / (4 * out)
  for 2x2), and flax's `variance_scaling` on the (kh, kw, in, out) kernel would take
  kh * kw * in (2 / (4 * in)); in this UNet (out = in / 2) they would start the upsampled
  activations at 1/2 and 1/4 of the He variance.

Normalisation: GroupNorm by default, BatchNorm as an option (`norm="batch"`). Why GroupNorm:
training is data parallel with small per-device batches (a few 512 x 512 slices per device), where
BatchNorm statistics are noisy unless synchronised across devices (an all-reduce per layer), and
BatchNorm's running averages differ from the batch statistics it trains with (a train/eval
mismatch that is worst when the sampled training slices, enriched for calcium, differ from the
slices seen at inference). GroupNorm (Wu & He 2018) normalises each sample on its own: no
`batch_stats` collection, no `train` flag needed, identical behaviour in training and inference.
Its cost on CPU is one extra statistics pass per layer, a few per cent of the forward
(docs/benchmarks.md; `python benchmarks/bench_models.py --norm batch` measures it). With
`norm="batch"`, `bn_axis_name` names the pmap axis over which batch statistics are averaged
(cross-device synchronised BatchNorm).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from cac_jax.ops import onednn_conv

Dtype = Any

# Kaiming-normal for ReLU convolutions (He et al. 2015), matching torch.nn.init.kaiming_normal_.
kaiming_normal = nn.initializers.variance_scaling(2.0, "fan_in", "normal")


def kaiming_normal_transposed(strides: Sequence[int]) -> nn.initializers.Initializer:
    """Kaiming-normal for an `nn.ConvTranspose` kernel (kh, kw, in, out) with these strides.

    Variance 2 / (in * kh * kw / prod(strides)): the effective fan_in, the number of inputs each
    output pixel sums over (exact when the kernel size is a multiple of the stride; for a 2x2
    stride-2 kernel it is `in`). See the module docstring for how this relates to PyTorch.
    """
    # variance_scaling divides by kh * kw * in; scaling by prod(strides) gives the effective fan_in.
    return nn.initializers.variance_scaling(2.0 * math.prod(strides), "fan_in", "normal")


def norm_kwargs(module: nn.Module) -> dict:
    """The normalisation, convolution and dtype settings every conv block of `module` shares.

    Our modules all carry the fields norm, groups, bn_axis_name, conv_impl, dtype and param_dtype
    and pass them down unchanged to their ConvNormAct / DoubleConv blocks.
    """
    return dict(norm=module.norm, groups=module.groups, bn_axis_name=module.bn_axis_name,
                conv_impl=module.conv_impl, dtype=module.dtype, param_dtype=module.param_dtype)


def conv_impl_fn(conv_impl: str):
    """The `conv_general_dilated` for `nn.Conv` under `config.model.conv_impl` (docs/onednn.md).

    "xla": None (flax's default, `lax.conv_general_dilated`). "onednn" / "auto": oneDNN's
    convolutions through XLA FFI custom calls where they run (CPU, extension built; "auto" only on
    the CPU backend), the large 3x3 ones by Winograd's F(2x2, 3x3); "onednn_direct": oneDNN's
    direct algorithm only; XLA's otherwise. Only the function changes: parameters, their names and
    initial values are flax's, so checkpoints and the PyTorch port do not depend on it.
    """
    impl = onednn_conv.resolve_impl(conv_impl)
    if impl == "onednn":
        return onednn_conv.conv_general_dilated
    if impl == "onednn_direct":
        return functools.partial(onednn_conv.conv_general_dilated, winograd=False)
    return None


def resolve_dtype(name: str | None) -> Dtype:
    """Map a config dtype name to a jnp dtype; "auto" is bfloat16 on GPU/TPU, float32 on CPU."""
    if name is None or name == "auto":
        return jnp.bfloat16 if jax.default_backend() in ("gpu", "tpu") else jnp.float32
    return jnp.dtype(name)


def num_groups_for(channels: int, max_groups: int) -> int:
    """Largest group count <= max_groups that divides `channels` (GroupNorm needs a divisor)."""
    for groups in range(min(max_groups, channels), 0, -1):
        if channels % groups == 0:
            return groups
    return 1


class GroupNorm(nn.Module):
    """GroupNorm (Wu & He 2018) over NHWC, written for speed on XLA:CPU.

    Same maths and parameters ("scale", "bias" per channel) as `flax.linen.GroupNorm` with its
    default fast variance, but the statistics come from per-channel sums over H and W (one fused
    reduction pass) and the normalisation is one per-channel elementwise pass. Measured here on a
    (3, 256, 256, 32) tensor: 3 ms against 16 ms for flax's version, whose reductions over a
    reshaped (N, H, W, G, C/G) layout XLA:CPU runs slowly; at the default model's widths that
    difference was ~10% of the whole forward pass.

    The normalisation runs in float32 and is cast to `dtype` at the end: under bfloat16 compute
    the affine pass `x * mult + shift` (shift = bias - mean * mult) cancels two large numbers when
    |mean| >> std, and evaluated in bfloat16 it lost up to 0.4 per element at mean/std = 25
    (flax's GroupNorm: 0.015-0.08). In float32 the cancellation costs about |mean| / std * 2^-24,
    far below bfloat16's output rounding, so the result matches flax's to bfloat16 precision
    (tests/test_models.py). The centred form `(x - mean) * mult + bias` would be equally accurate
    and as fast forward, but XLA:CPU runs its gradient slower at the encoder's shapes
    (docs/benchmarks.md; benchmarks/results/bench_groupnorm.md).
    """

    num_groups: int
    epsilon: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Normalise each sample's channel groups to zero mean, unit variance; scale and shift."""
        n, h, w, c = x.shape
        per_group = c // self.num_groups
        scale = self.param("scale", nn.initializers.ones, (c,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (c,), self.param_dtype)
        xf = x.astype(jnp.float32)  # statistics and normalisation in float32 under bf16 compute
        sum1 = jnp.sum(xf, axis=(1, 2)).reshape(n, self.num_groups, per_group).sum(-1)
        sum2 = jnp.sum(xf * xf, axis=(1, 2)).reshape(n, self.num_groups, per_group).sum(-1)
        count = h * w * per_group
        mean = sum1 / count
        var = jnp.maximum(sum2 / count - mean * mean, 0.0)
        inv = jnp.repeat(jax.lax.rsqrt(var + self.epsilon), per_group, axis=1)
        mult = inv * scale.astype(jnp.float32)
        shift = bias.astype(jnp.float32) - jnp.repeat(mean, per_group, axis=1) * mult
        y = xf * mult[:, None, None, :] + shift[:, None, None, :]
        return y.astype(self.dtype)


class Norm(nn.Module):
    """GroupNorm or BatchNorm, chosen by name, so every model shares the same switch."""

    kind: str = "group"
    groups: int = 8
    bn_axis_name: str | None = None
    bn_momentum: float = 0.9
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Normalise `x` (NHWC); `train` only matters for BatchNorm."""
        if self.kind == "group":
            return GroupNorm(num_groups_for(x.shape[-1], self.groups), dtype=self.dtype,
                             param_dtype=self.param_dtype)(x)
        if self.kind == "batch":
            return nn.BatchNorm(
                use_running_average=not train,
                momentum=self.bn_momentum,
                axis_name=self.bn_axis_name if train else None,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
            )(x)
        raise ValueError(f"unknown norm {self.kind!r}: expected 'group' or 'batch'")


class ConvNormAct(nn.Module):
    """3x3 (by default) convolution, normalisation, ReLU."""

    features: int
    kernel_size: tuple[int, int] = (3, 3)
    strides: tuple[int, int] = (1, 1)
    norm: str = "group"
    groups: int = 8
    bn_axis_name: str | None = None
    conv_impl: str = "xla"  # "xla" | "onednn" | "onednn_direct" | "auto": see conv_impl_fn
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Apply conv -> norm -> ReLU to NHWC `x`."""
        x = nn.Conv(
            self.features,
            self.kernel_size,
            strides=self.strides,
            padding="SAME",
            use_bias=False,  # the norm's shift makes a conv bias redundant
            kernel_init=kaiming_normal,
            conv_general_dilated=conv_impl_fn(self.conv_impl),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )(x)
        x = Norm(self.norm, self.groups, self.bn_axis_name, dtype=self.dtype,
                 param_dtype=self.param_dtype)(x, train)
        return nn.relu(x)


class DoubleConv(nn.Module):
    """Two ConvNormAct layers: the UNet stage (Ronneberger et al. 2015)."""

    features: int
    norm: str = "group"
    groups: int = 8
    bn_axis_name: str | None = None
    conv_impl: str = "xla"  # "xla" | "onednn" | "onednn_direct" | "auto": see conv_impl_fn
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Apply two 3x3 conv -> norm -> ReLU layers."""
        for _ in range(2):
            x = ConvNormAct(self.features, **norm_kwargs(self))(x, train)
        return x


class Conv1x1(nn.Module):
    """1x1 convolution over NHWC as a matmul over the channels.

    The same parameters ("kernel" (1, 1, in, out), "bias" (out,) at zero), initial values and
    outputs as `nn.Conv(features, (1, 1))` (tests/test_models.py). XLA:CPU runs a 1x1 convolution
    with few output channels through its general convolution kernel about 10x more slowly than the
    same contraction as a dot: the UNet's 64 -> 3 head on a (4, 512, 512, 64) batch took 196 ms
    as a convolution and 20 ms as this einsum (benchmarks/bench_layer_rewrites.py; PyTorch's
    oneDNN convolution: 21 ms).
    """

    features: int
    use_bias: bool = True
    kernel_init: nn.initializers.Initializer = kaiming_normal
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """(..., in) -> (..., features)."""
        kernel = self.param("kernel", self.kernel_init, (1, 1, x.shape[-1], self.features),
                            self.param_dtype)
        bias = (self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
                if self.use_bias else None)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        y = jnp.einsum("...c,co->...o", x, kernel[0, 0])
        return y if bias is None else y + bias


def conv1x1(features: int, dtype: Dtype, param_dtype: Dtype, name: str | None = None,
            use_bias: bool = True) -> Conv1x1:
    """A 1x1 convolution with Kaiming-normal init (prediction and attention heads)."""
    return Conv1x1(features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, name=name)


class TransposedConv2x2(nn.Module):
    """2x2 stride-2 transposed convolution (the UNet's upsampling) as one matmul + pixel shuffle.

    The same parameters ("kernel" (2, 2, in, out) with `kaiming_normal_transposed`, "bias" (out,)
    at zero), initial values and outputs as `nn.ConvTranspose(features, (2, 2), strides=(2, 2))`
    (tests/test_models.py checks all three), so checkpoints and `cac_jax.torch_ref.from_flax` see
    no difference. Why not `nn.ConvTranspose`: XLA lowers it to a convolution over the input
    dilated with zeros, 4x the multiply-adds, and on CPU its gradient is an order of magnitude
    slower than this matmul's (docs/benchmarks.md; benchmarks/bench_layer_rewrites.py).
    With kernel size = stride each output pixel receives exactly one kernel tap, so the layer is
    a (pixels, in) x (in, 2 * 2 * out) matmul whose columns are then moved to the 2x2 block of
    output pixels they belong to. Flax's `ConvTranspose` (transpose_kernel=False)
    correlates with the kernel unflipped, which puts tap (a, b) at output offset (1 - a, 1 - b)
    of each block: hence the flip.
    """

    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """(N, H, W, in) -> (N, 2H, 2W, features)."""
        n, h, w, channels = x.shape
        kernel = self.param("kernel", kaiming_normal_transposed((2, 2)),
                            (2, 2, channels, self.features), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        y = jnp.einsum("nhwc,abco->nhawbo", x, kernel[::-1, ::-1])
        return y.reshape(n, 2 * h, 2 * w, self.features) + bias


def max_pool2x(x: jax.Array) -> jax.Array:
    """2x2 max pooling with stride 2 over NHWC (H and W even): `nn.max_pool(x, (2, 2), (2, 2))`.

    Written as a reshape and a max reduction: the same forward values, and XLA:CPU runs its
    gradient faster than the select-and-scatter of `reduce_window`'s (docs/benchmarks.md;
    benchmarks/bench_layer_rewrites.py). Where a window's
    maximum is tied the gradient is shared between the tied inputs instead of going to one of
    them (both are valid subgradients).
    In the UNet the pooled values come out of a ReLU, so most ties are zeros, whose gradient the
    ReLU stops either way; equal positive values (likelier in bfloat16) split theirs.
    """
    n, h, w, c = x.shape
    return x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def space_to_depth(x: jax.Array, block: int) -> jax.Array:
    """(N, H, W, C) -> (N, H/b, W/b, b*b*C): lossless downsampling (every pixel is kept)."""
    n, h, w, c = x.shape
    x = x.reshape(n, h // block, block, w // block, block, c)
    x = x.transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(n, h // block, w // block, block * block * c)


def depth_to_space(x: jax.Array, block: int) -> jax.Array:
    """(N, h, w, b*b*C) -> (N, h*b, w*b, C): inverse of `space_to_depth` (pixel shuffle)."""
    n, h, w, cb = x.shape
    c = cb // (block * block)
    x = x.reshape(n, h, w, block, block, c)
    x = x.transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(n, h * block, w * block, c)


def upsample2x(x: jax.Array) -> jax.Array:
    """Nearest-neighbour 2x upsampling (cheap; the following 3x3 conv smooths it)."""
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def check_spatial(shape: Sequence[int], multiple: int, what: str) -> None:
    """Raise ValueError unless H and W of an NHWC-like shape are multiples of `multiple`."""
    h, w = shape[-3], shape[-2]
    if h % multiple or w % multiple:
        raise ValueError(
            f"{what}: image height and width must be multiples of {multiple}, got {h}x{w}"
        )

