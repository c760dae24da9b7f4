"""ConvLSTM-attention segmenter: temporal/spatial fusion by a learned per-pixel attention map.

The paper's architecture (its Figure 1) is "a modified version of hierarchical multi-scale
attention" (Tao et al. 2020, the paper's ref. [7]): HMSA predicts a segmentation at two image
scales and a per-pixel attention map `a` that blends them, `a * lower + (1 - a) * higher`. Here the
two "scales" are two views of the slice stack: a *temporal* prediction decoded from ConvLSTM states
scanned over the 3 adjacent slices, and a *spatial* prediction from the centre slice's own encoder
features. The fused logits are `a * temporal + (1 - a) * spatial`; both branch predictions and `a`
are returned so training can add HMSA-style auxiliary losses on each branch and plots can show `a`.

Layout (default widths in cac_jax/models/config.py; H, W the slice size):
- shared SliceEncoder on the 3 slices folded into the batch: 2x2 space-to-depth stem, stages at
  H/2, H/4, H/8, H/16;
- ConvLSTMs scanned over the slice axis at the `lstm_levels` (default: H/8 and H/16, "hierarchical":
  context at two scales; the H/16 one sees a ~200-pixel receptive field, enough to relate a
  calcification to the heart, aorta and spine across slices). Bidirectional optional;
- temporal decoder: from the deepest ConvLSTM state up to H/2; at each finer level it concatenates
  the ConvLSTM state where there is one, else the centre slice's encoder features (a UNet skip, so
  the temporal branch still localises small lesions);
- spatial decoder: a UNet decoder on the centre slice's encoder features;
- heads: 1x1 convolutions at H/2 predict 4 * classes channels, rearranged (depth-to-space, the exact
  inverse of the stem) into full-resolution logits; the attention head (conv-norm-ReLU-1x1 conv,
  sigmoid) sees both decoders' features and gives `a` at full resolution.

Default size (calcium, 3 classes): 4.35 M parameters and 63.7 GFLOP per 512 x 512 sample (XLA cost
analysis), against 31.0 M and 381.7 GFLOP for UNet-64 and 4.37 M and 54.1 GFLOP for the
width-matched UNet (base 24); it spends its FLOPs at low resolution, where CPU convolutions are
efficient (benchmarks/results/bench_models.md).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from cac_jax.models.convlstm import CENTRE, NUM_SLICES, ConvLSTM, SliceEncoder
from cac_jax.models.layers import (
    ConvNormAct,
    check_spatial,
    conv1x1,
    depth_to_space,
    norm_kwargs,
    upsample2x,
)

Dtype = Any


class Decoder(nn.Module):
    """UNet-style decoder: from the deepest input up to level 0, with one skip per level.

    `skips[l]` is the feature map concatenated at level l (None for levels above `start`).
    Each level: 2x nearest upsampling, concatenation with the skip, `convs` conv-norm-ReLU layers.
    """

    widths: tuple[int, ...]  # output width per level, finest first (len = number of levels - 1)
    convs: int = 1
    norm: str = "group"
    groups: int = 8
    bn_axis_name: str | None = None
    conv_impl: str = "xla"  # "xla" | "onednn" | "onednn_direct" | "auto": see conv_impl_fn
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, deepest: jax.Array, skips: list[jax.Array], train: bool = False) -> jax.Array:
        """deepest: features at level len(skips); skips[l]: features at level l (finest first)."""
        kw = norm_kwargs(self)
        y = deepest
        for level in reversed(range(len(skips))):
            y = jnp.concatenate([upsample2x(y), skips[level].astype(y.dtype)], axis=-1)
            for i in range(self.convs):
                y = ConvNormAct(self.widths[level], name=f"level{level}_conv{i}", **kw)(y, train)
        return y


class AttentionHead(nn.Module):
    """conv-norm-ReLU-1x1 conv, sigmoid: the per-pixel weight of the temporal prediction (HMSA)."""

    width: int
    upscale: int = 2
    norm: str = "group"
    groups: int = 8
    bn_axis_name: str | None = None
    conv_impl: str = "xla"  # "xla" | "onednn" | "onednn_direct" | "auto": see conv_impl_fn
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """x: (N, h, w, C) -> a in (0, 1), (N, h * upscale, w * upscale, 1), float32."""
        x = ConvNormAct(self.width, **norm_kwargs(self))(x, train)
        x = conv1x1(self.upscale * self.upscale, self.dtype, self.param_dtype, name="logit")(x)
        return nn.sigmoid(depth_to_space(x.astype(jnp.float32), self.upscale))


class ConvLSTMAttentionNet(nn.Module):
    """ConvLSTM over 3 adjacent slices + spatial branch, fused by an attention map.

    __call__(x, train) with x of shape (batch, 3, H, W, 1) (below, centre, above), H and W
    multiples of 2^len(encoder_widths), returns (logits, aux): logits (batch, H, W, classes)
    float32, aux = {"temporal": logits, "spatial": logits, "attention": (batch, H, W, 1)}.
    """

    num_classes: int
    encoder_widths: tuple[int, ...] = (32, 64, 128, 256)
    lstm_levels: tuple[int, ...] = (2, 3)
    lstm_features: tuple[int, ...] = (64, 128)
    bidirectional: bool = False
    decoder_widths: tuple[int, ...] = (32, 64, 128)
    temporal_decoder_widths: tuple[int, ...] = (32, 64, 128)
    decoder_convs: int = 1
    attention_width: int = 32
    norm: str = "group"
    groups: int = 8
    bn_axis_name: str | None = None
    conv_impl: str = "xla"  # "xla" | "onednn" | "onednn_direct" | "auto": see conv_impl_fn
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def _check_config(self) -> None:
        """Validate the configuration (called from __call__; clear messages for bad configs)."""
        levels = len(self.encoder_widths)
        if len(self.lstm_levels) != len(self.lstm_features) or not self.lstm_levels:
            raise ValueError("lstm_levels and lstm_features must be non-empty and of equal length")
        if any(not 0 <= lvl < levels for lvl in self.lstm_levels):
            raise ValueError(f"lstm_levels {self.lstm_levels} outside encoder levels 0..{levels - 1}")
        if len(self.decoder_widths) != levels - 1 or len(self.temporal_decoder_widths) != levels - 1:
            raise ValueError(f"decoder widths need {levels - 1} entries (one per level below the deepest)")

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, windows: jax.Array | None = None):
        """Segment the centre slice of each (below, centre, above) stack; see the class docstring.

        `windows` (inference only): x is then a stack of distinct slices (slices, H, W, 1) and
        `windows` (batch, 3) int the indices into it of each sample's (below, centre, above).
        Every slice goes through the encoder (and the ConvLSTMs' input convolutions) once,
        however many windows share it; the result equals running the gathered windows
        `x[windows]` (tests/test_models.py). Adjacent centre slices share two of their three
        slices, so a study's windows need about a third of the encoder's work.
        """
        self._check_config()
        if windows is not None:
            if train and self.norm == "batch":
                raise ValueError("windows= is for inference: BatchNorm in training would "
                                 "weigh a shared slice once instead of once per window")
            if x.ndim != 4 or x.shape[-1] != 1 or windows.ndim != 2 or windows.shape[1] != NUM_SLICES:
                raise ValueError(f"with windows=, expected slices (n, H, W, 1) and windows "
                                 f"(batch, {NUM_SLICES}), got {x.shape} and {windows.shape}")
            x = x[:, None]  # (slices, 1, H, W, 1): each slice encoded once
        elif x.ndim != 5 or x.shape[1] != NUM_SLICES or x.shape[-1] != 1:
            raise ValueError(f"expected input (batch, {NUM_SLICES}, H, W, 1), got {x.shape}")
        check_spatial(x.shape, 2 ** len(self.encoder_widths), "ConvLSTMAttentionNet")
        batch, steps, height, width, _ = x.shape
        kw = norm_kwargs(self)
        x = x.astype(self.dtype)

        # Shared encoder: the slice axis folded into the batch (one big convolution per layer).
        feats = SliceEncoder(self.encoder_widths, name="encoder", **kw)(
            x.reshape(batch * steps, height, width, 1), train)
        if windows is None:
            feats = [f.reshape(batch, steps, *f.shape[1:]) for f in feats]
            centre = [f[:, CENTRE] for f in feats]
            lstm_inputs = {level: (feats[level], None) for level in self.lstm_levels}
        else:
            centre = [jnp.take(f, windows[:, CENTRE], axis=0) for f in feats]
            lstm_inputs = {level: (feats[level], windows) for level in self.lstm_levels}

        # Temporal features: ConvLSTM scanned over the slices at each chosen level.
        temporal = {}
        for level, hidden in zip(self.lstm_levels, self.lstm_features):
            fwd = ConvLSTM(hidden, conv_impl=self.conv_impl, dtype=self.dtype,
                           param_dtype=self.param_dtype,
                           name=f"lstm{level}")(*lstm_inputs[level])
            if self.bidirectional:
                bwd = ConvLSTM(hidden, reverse=True, conv_impl=self.conv_impl, dtype=self.dtype,
                               param_dtype=self.param_dtype,
                               name=f"lstm{level}_reverse")(*lstm_inputs[level])
                # Centre step of both directions: below+centre and above+centre, symmetric.
                temporal[level] = jnp.concatenate([fwd[:, CENTRE], bwd[:, CENTRE]], axis=-1)
            else:
                # Last step: the state after seeing all three slices.
                temporal[level] = fwd[:, -1]

        deepest_lstm = max(self.lstm_levels)
        t_skips = [temporal.get(level, centre[level]) for level in range(deepest_lstm)]
        t_feat = Decoder(self.temporal_decoder_widths[:deepest_lstm], self.decoder_convs,
                         name="temporal_decoder", **kw)(temporal[deepest_lstm], t_skips, train)
        s_feat = Decoder(self.decoder_widths, self.decoder_convs, name="spatial_decoder", **kw)(
            centre[-1], centre[:-1], train)

        # Heads at H/2 with 4 * classes channels -> depth-to-space -> full-resolution logits.
        k = self.num_classes
        temporal_logits = depth_to_space(
            conv1x1(4 * k, self.dtype, self.param_dtype, name="temporal_head")(t_feat), 2
        ).astype(jnp.float32)
        spatial_logits = depth_to_space(
            conv1x1(4 * k, self.dtype, self.param_dtype, name="spatial_head")(s_feat), 2
        ).astype(jnp.float32)
        attention = AttentionHead(self.attention_width, name="attention", **kw)(
            jnp.concatenate([t_feat, s_feat], axis=-1), train)
        logits = attention * temporal_logits + (1.0 - attention) * spatial_logits
        aux = {"temporal": temporal_logits, "spatial": spatial_logits, "attention": attention}
        return logits, aux
