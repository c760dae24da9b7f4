"""UNet baseline (Ronneberger et al. 2015) with the 3 adjacent slices as input channels.

The paper's reference model: "UNet model with 3 adjacent slices" (Methods). Four down and four up
levels; widths base * (1, 2, 4, 8, 16); max-pool down, 2x2 stride-2 transposed convolutions up;
two 3x3 conv-norm-ReLU layers per level; a 1x1 convolution to the class logits. With base 64 this
is the literature's UNet: 31.0 M parameters for 3 input channels (docs/architecture.md). A smaller
`base_width` gives the width-matched baseline (configs/unet_matched_calcium.py).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from cac_jax.models.convlstm import NUM_SLICES
from cac_jax.models.layers import (
    DoubleConv,
    TransposedConv2x2,
    check_spatial,
    conv1x1,
    max_pool2x,
    norm_kwargs,
)

Dtype = Any


class UNet(nn.Module):
    """UNet on (batch, 3, H, W, 1) inputs; returns (logits (batch, H, W, classes) float32, {}).

    The empty aux dict keeps the (logits, aux) interface of the ConvLSTM model.
    """

    num_classes: int
    base_width: int = 64
    depth: int = 4
    norm: str = "group"
    groups: int = 8
    bn_axis_name: str | None = None
    conv_impl: str = "xla"  # "xla" | "onednn" | "onednn_direct" | "auto": see conv_impl_fn
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False):
        """Segment the centre slice; the slices enter as channels (below, centre, above)."""
        if x.ndim != 5 or x.shape[1] != NUM_SLICES or x.shape[-1] != 1:
            raise ValueError(f"expected input (batch, {NUM_SLICES}, H, W, 1), got {x.shape}")
        check_spatial(x.shape, 2 ** self.depth, "UNet")
        kw = norm_kwargs(self)
        # (batch, 3, H, W, 1) -> (batch, H, W, 3): slices as channels.
        y = jnp.moveaxis(x[..., 0], 1, -1).astype(self.dtype)
        skips = []
        for level in range(self.depth):
            y = DoubleConv(self.base_width * 2**level, name=f"down{level}", **kw)(y, train)
            skips.append(y)
            y = max_pool2x(y)
        y = DoubleConv(self.base_width * 2**self.depth, name="bottleneck", **kw)(y, train)
        for level in reversed(range(self.depth)):
            width = self.base_width * 2**level
            # 2x2 stride-2 transposed conv, He init with its effective fan_in (= its input
            # channels), see cac_jax/models/layers.py.
            y = TransposedConv2x2(width, dtype=self.dtype, param_dtype=self.param_dtype,
                                  name=f"upsample{level}")(y)
            y = jnp.concatenate([skips[level], y], axis=-1)
            y = DoubleConv(width, name=f"up{level}", **kw)(y, train)
        logits = conv1x1(self.num_classes, self.dtype, self.param_dtype, name="head")(y)
        return logits.astype(jnp.float32), {}
