"""Segmentation models: ConvLSTM-attention (the paper's) and the UNet baseline, in Flax linen.

`build_model(config)` returns an unbound module from `config.model` (or a model ConfigDict
itself); use it with pure `init`/`apply`:

    model = build_model(config)
    variables = model.init(jax.random.key(0), x)              # x: (batch, 3, H, W, 1)
    logits, aux = model.apply(variables, x)                   # inference
    (logits, aux), updates = model.apply(variables, x, train=True,
                                         mutable=["batch_stats"])  # only with norm="batch"

Both models return `(logits, aux)`; logits are float32 (batch, H, W, classes) for the centre
slice. The ConvLSTM model's aux holds the "temporal" and "spatial" branch logits and the
"attention" map; the UNet's aux is empty.
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
from flax import linen as nn

from cac_jax.models.attention import ConvLSTMAttentionNet
from cac_jax.models.layers import resolve_dtype
from cac_jax.models.unet import UNet
from cac_jax.ops.onednn_conv import resolve_impl

__all__ = ["ConvLSTMAttentionNet", "UNet", "build_model", "count_params", "shares_slices"]


def build_model(config: ml_collections.ConfigDict) -> nn.Module:
    """Build the model named by `config.model.arch` (or `config.arch` for a model ConfigDict)."""
    cfg = config.model if "model" in config else config
    common = dict(
        num_classes=int(cfg.num_classes),
        norm=cfg.norm,
        groups=int(cfg.groups),
        bn_axis_name=cfg.get("bn_axis_name"),
        # Resolved here, once: "auto" becomes "onednn" or "xla" (docs/onednn.md).
        conv_impl=resolve_impl(cfg.get("conv_impl", "auto")),
        dtype=resolve_dtype(cfg.dtype),
        param_dtype=resolve_dtype(cfg.param_dtype),
    )
    if cfg.arch == "convlstm":
        c = cfg.convlstm
        return ConvLSTMAttentionNet(
            encoder_widths=tuple(c.encoder_widths),
            lstm_levels=tuple(c.lstm_levels),
            lstm_features=tuple(c.lstm_features),
            bidirectional=bool(c.bidirectional),
            decoder_widths=tuple(c.decoder_widths),
            temporal_decoder_widths=tuple(c.temporal_decoder_widths),
            decoder_convs=int(c.decoder_convs),
            attention_width=int(c.attention_width),
            **common,
        )
    if cfg.arch == "unet":
        return UNet(base_width=int(cfg.unet.base_width), depth=int(cfg.unet.depth), **common)
    raise ValueError(f"unknown model arch {cfg.arch!r}: expected 'convlstm' or 'unet'")


def count_params(params: Any) -> int:
    """Total number of scalar parameters in a parameter pytree."""
    return int(sum(leaf.size for leaf in jax.tree_util.tree_leaves(params)))


def shares_slices(model: nn.Module) -> bool:
    """Whether `model` encodes each slice on its own and so takes a batch as distinct slices
    plus windows into them (`ConvLSTMAttentionNet(..., windows=)`); the UNet mixes the three
    slices in its first convolution and does not."""
    return isinstance(model, ConvLSTMAttentionNet)
