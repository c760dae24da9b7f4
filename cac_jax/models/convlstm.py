"""ConvLSTM cell, the layer that scans it over the slice axis, and the shared slice encoder.

ConvLSTM (Shi et al. 2015): an LSTM whose gates are convolutions, so the hidden state keeps its
spatial layout. Here the "time" axis is the 3 adjacent CT slices (below, centre, above): the cell
carries what it saw in one slice into the next, which is how the model aggregates information
from neighbouring slices, as a radiologist scrolls through them (paper, Discussion).

Gate computation: the gates are one convolution of concat([x_t, h_{t-1}]) with 4 * hidden output
channels. That convolution splits exactly into conv_x(x_t) + conv_h(h_{t-1}); the x part does not
depend on the recurrence, so it runs once for all 3 slices as one large convolution (batch * 3
images: one big convolution is faster on CPU than three small ones, cf. cuDNN's LSTM input
projection), and only the conv_h part runs inside the `lax.scan` (via `nn.scan`, `unroll=3`: with
3 steps a rolled loop only adds overhead, and its backward pass is several times slower on CPU).
The first step starts from h = c = 0, where conv_h(h) is exactly 0 (the convolution has no
bias): it runs outside the scan without that convolution, so a window of 3 slices costs 2 hidden
convolutions per layer, not 3, with the same outputs and parameters.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from cac_jax.models.layers import (
    ConvNormAct,
    conv_impl_fn,
    kaiming_normal,
    norm_kwargs,
    space_to_depth,
)

Dtype = Any

# Number of adjacent slices the models read: below, centre, above (docs/contracts.md).
NUM_SLICES = 3
CENTRE = 1


class ConvLSTMCell(nn.Module):
    """One ConvLSTM step given the precomputed input projection of the current slice.

    `x_gates` is conv_x(x_t) (4 * hidden channels, bias included); the cell adds conv_h(h_{t-1})
    and applies the LSTM update. The cell state c is kept in float32 even when the convolutions
    run in bfloat16, so the additive memory does not lose precision.
    """

    hidden: int
    kernel_size: tuple[int, int] = (3, 3)
    conv_impl: str = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, carry: tuple[jax.Array, jax.Array], x_gates: jax.Array):
        """carry = (c, h); returns ((c, h), h)."""
        c, h = carry
        gates = x_gates + nn.Conv(
            4 * self.hidden, self.kernel_size, padding="SAME", use_bias=False,
            kernel_init=kaiming_normal, dtype=self.dtype, param_dtype=self.param_dtype,
            conv_general_dilated=conv_impl_fn(self.conv_impl), name="hidden_conv",
        )(h)
        return lstm_update(gates, c, self.dtype)


def lstm_update(gates: jax.Array, c: jax.Array | None, dtype: Dtype):
    """The LSTM update from the summed gate pre-activations; `c` None is the zero state (the
    forget gate then has nothing to keep). Returns ((c, h), h)."""
    i, f, g, o = jnp.split(gates.astype(jnp.float32), 4, axis=-1)
    c = nn.sigmoid(i) * jnp.tanh(g) if c is None else nn.sigmoid(f) * c + nn.sigmoid(i) * jnp.tanh(g)
    h_new = (nn.sigmoid(o) * jnp.tanh(c)).astype(dtype)
    return (c, h_new), h_new


class ConvLSTM(nn.Module):
    """A ConvLSTM scanned over axis 1 of `x` (batch, slices, h, w, C).

    Returns the hidden states of every step, (batch, slices, h, w, hidden), in slice order (also
    for the reverse direction, whose step t has seen slices t..end).
    """

    hidden: int
    kernel_size: tuple[int, int] = (3, 3)
    reverse: bool = False
    conv_impl: str = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, windows: jax.Array | None = None) -> jax.Array:
        """Scan the cell over the slice axis of x.

        With `windows` (batch, slices) int, x holds distinct slices' features (n, h, w, C) and
        the sequences are `x[windows]`: the input projection runs once per distinct slice.
        """
        if windows is not None:
            (batch, steps), (height, width, channels) = windows.shape, x.shape[1:]
            x = x[:, None]
        else:
            batch, steps, height, width, channels = x.shape
        # Input projection for all slices at once: one convolution on batch * slices images.
        x_gates = nn.Conv(
            4 * self.hidden, self.kernel_size, padding="SAME", use_bias=True,
            kernel_init=kaiming_normal, dtype=self.dtype, param_dtype=self.param_dtype,
            conv_general_dilated=conv_impl_fn(self.conv_impl), name="input_conv",
        )(x.reshape(-1, height, width, channels))
        if windows is not None:
            x_gates = jnp.take(x_gates, windows, axis=0)  # (batch, steps, h, w, 4 * hidden)
        x_gates = x_gates.reshape(batch, steps, height, width, 4 * self.hidden)
        scan_cell = nn.scan(
            ConvLSTMCell,
            variable_broadcast="params",
            split_rngs={"params": False},
            in_axes=1,
            out_axes=1,
            reverse=self.reverse,
            unroll=NUM_SLICES,
        )
        cell = scan_cell(self.hidden, self.kernel_size, self.conv_impl, self.dtype,
                         self.param_dtype, name="cell")
        if steps == 1:  # nothing to peel: the scan alone (it also creates the cell's parameters)
            zeros = jnp.zeros((batch, height, width, self.hidden), jnp.float32)
            return cell((zeros, zeros.astype(self.dtype)), x_gates)[1]
        # The first step from the zero state, without its hidden convolution (module docstring);
        # the rest scanned from its state. In slice order, the reverse direction starts last.
        first, rest = (-1, slice(0, -1)) if self.reverse else (0, slice(1, None))
        carry, h_first = lstm_update(x_gates[:, first], None, self.dtype)
        _, hs = cell(carry, x_gates[:, rest])
        parts = [hs, h_first[:, None]] if self.reverse else [h_first[:, None], hs]
        return jnp.concatenate(parts, axis=1)


class SliceEncoder(nn.Module):
    """Shared-weight encoder applied to every slice (the caller folds slices into the batch).

    A lossless 2x2 space-to-depth stem (every pixel kept, so small lesions are not blurred away)
    followed by one stage per width: stage 0 at H/2, each later stage starting with a stride-2
    convolution. Returns the features of every stage, finest first.
    """

    widths: tuple[int, ...]
    norm: str = "group"
    groups: int = 8
    bn_axis_name: str | None = None
    conv_impl: str = "xla"  # "xla" | "onednn" | "onednn_direct" | "auto": see conv_impl_fn
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> list[jax.Array]:
        """x: (N, H, W, 1) -> list of (N, H / 2^(l+1), W / 2^(l+1), widths[l])."""
        kw = norm_kwargs(self)
        x = space_to_depth(x, 2)
        features = []
        for level, width in enumerate(self.widths):
            strides = (1, 1) if level == 0 else (2, 2)
            x = ConvNormAct(width, strides=strides, name=f"stage{level}_conv0", **kw)(x, train)
            x = ConvNormAct(width, name=f"stage{level}_conv1", **kw)(x, train)
            features.append(x)
        return features
