"""PyTorch reference of the two architectures, for the framework comparison (`cac-jax bench`).

Layer for layer the Flax models of `cac_jax.models` (ConvLSTM-attention and UNet, GroupNorm),
in PyTorch's NCHW layout, with exactly the same parameters: `from_flax(config, params)` builds the
module and copies a Flax parameter tree into it, so both frameworks compute the same function on
the same weights (tests/test_torch_parity.py checks the parameter count and the logits).

Install with the optional extra: `pip install -e .[torch]` (the CPU build; see docs/commands.md,
"cac-jax bench").

Layout conventions:
- input `(batch, 3, H, W)` float32: the 3 adjacent slices (below, centre, above) as channels,
  i.e. the Flax input `(batch, 3, H, W, 1)` without its trailing axis;
- output `(logits (batch, classes, H, W), aux)`; the ConvLSTM model's aux holds "temporal",
  "spatial" (batch, classes, H, W) and "attention" (batch, 1, H, W), as in Flax.
Module attribute names mirror the Flax parameter paths (`encoder.stage0_conv0.Conv_0`), so the
weight copy is a name mapping plus the kernel transposes:
- Conv: Flax (kh, kw, in, out) -> PyTorch (out, in, kh, kw);
- ConvTranspose (2x2, stride 2): Flax (kh, kw, in, out) -> PyTorch (in, out, kh, kw), spatially
  flipped (Flax's `ConvTranspose` does not transpose the kernel, PyTorch's does);
- GroupNorm scale/bias -> weight/bias.
"SAME" padding: a stride-1 3x3 convolution pads 1 on each side; a stride-2 one on an even size
pads 0 before and 1 after (XLA's SAME), which PyTorch's symmetric `padding=1` would not match, so
those convolutions pad explicitly. Only GroupNorm models are ported (norm="group", the default).
"""

from __future__ import annotations

from typing import Any

import numpy as np

try:
    import torch
    import torch.nn.functional as F
    from torch import nn
except ImportError as err:  # the optional extra is missing
    raise ImportError(
        "the PyTorch reference needs the optional extra: pip install -e .[torch]") from err

NUM_SLICES = 3
CENTRE = 1


def num_groups_for(channels: int, max_groups: int) -> int:
    """Largest group count <= max_groups dividing `channels` (as cac_jax.models.layers)."""
    for groups in range(min(max_groups, channels), 0, -1):
        if channels % groups == 0:
            return groups
    return 1


class _Norm(nn.Module):
    """Holds the GroupNorm under the Flax name `Norm_0/GroupNorm_0`."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.GroupNorm_0 = nn.GroupNorm(num_groups_for(channels, groups), channels, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.GroupNorm_0(x)


class ConvNormAct(nn.Module):
    """3x3 convolution (no bias), GroupNorm, ReLU; stride 1 or 2 with XLA's SAME padding."""

    def __init__(self, cin: int, cout: int, groups: int, stride: int = 1):
        super().__init__()
        self.stride = stride
        self.Conv_0 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1 if stride == 1 else 0,
                                bias=False)
        self.Norm_0 = _Norm(cout, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 2:
            x = F.pad(x, (0, 1, 0, 1))  # XLA SAME for stride 2 on an even size: (0, 1)
        return F.relu(self.Norm_0(self.Conv_0(x)))


class DoubleConv(nn.Module):
    """Two ConvNormAct layers (the UNet stage)."""

    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__()
        self.ConvNormAct_0 = ConvNormAct(cin, cout, groups)
        self.ConvNormAct_1 = ConvNormAct(cout, cout, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ConvNormAct_1(self.ConvNormAct_0(x))


def space_to_depth(x: torch.Tensor, block: int) -> torch.Tensor:
    """NCHW version of cac_jax.models.layers.space_to_depth (channel order (bi, bj, c))."""
    n, c, h, w = x.shape
    x = x.reshape(n, c, h // block, block, w // block, block)
    x = x.permute(0, 3, 5, 1, 2, 4)
    return x.reshape(n, block * block * c, h // block, w // block)


def depth_to_space(x: torch.Tensor, block: int) -> torch.Tensor:
    """NCHW version of cac_jax.models.layers.depth_to_space (inverse of space_to_depth)."""
    n, cb, h, w = x.shape
    c = cb // (block * block)
    x = x.reshape(n, block, block, c, h, w)
    x = x.permute(0, 3, 4, 1, 5, 2)
    return x.reshape(n, c, h * block, w * block)


def upsample2x(x: torch.Tensor) -> torch.Tensor:
    """Nearest-neighbour 2x upsampling."""
    return F.interpolate(x, scale_factor=2, mode="nearest")


class ConvLSTMCell(nn.Module):
    """Holds the recurrent convolution under the Flax name `cell/hidden_conv`."""

    def __init__(self, hidden: int):
        super().__init__()
        self.hidden_conv = nn.Conv2d(hidden, 4 * hidden, 3, padding=1, bias=False)


class ConvLSTM(nn.Module):
    """ConvLSTM scanned over the slice axis; input (batch, steps, C, h, w)."""

    def __init__(self, cin: int, hidden: int, reverse: bool = False):
        super().__init__()
        self.hidden, self.reverse = hidden, reverse
        self.input_conv = nn.Conv2d(cin, 4 * hidden, 3, padding=1, bias=True)
        self.cell = ConvLSTMCell(hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Returns the hidden states of every step (batch, steps, hidden, h, w), in slice order."""
        b, steps, c, h, w = x.shape
        x_gates = self.input_conv(x.reshape(b * steps, c, h, w)).reshape(b, steps, -1, h, w)
        cell = x.new_zeros((b, self.hidden, h, w))
        hid = x.new_zeros((b, self.hidden, h, w))
        outs: list[Any] = [None] * steps
        order = range(steps - 1, -1, -1) if self.reverse else range(steps)
        for n, t in enumerate(order):
            # The first step's hidden state is 0, and so is its convolution (no bias): skipped,
            # as cac_jax.models.convlstm does.
            gates = x_gates[:, t] + self.cell.hidden_conv(hid) if n else x_gates[:, t]
            i, f, g, o = torch.chunk(gates, 4, dim=1)
            cell = torch.sigmoid(f) * cell + torch.sigmoid(i) * torch.tanh(g)
            hid = torch.sigmoid(o) * torch.tanh(cell)
            outs[t] = hid
        return torch.stack(outs, dim=1)


class SliceEncoder(nn.Module):
    """2x2 space-to-depth stem, then two ConvNormAct per stage (stride 2 from stage 1)."""

    def __init__(self, widths: tuple[int, ...], groups: int):
        super().__init__()
        cin = 4
        for level, width in enumerate(widths):
            setattr(self, f"stage{level}_conv0",
                    ConvNormAct(cin, width, groups, stride=1 if level == 0 else 2))
            setattr(self, f"stage{level}_conv1", ConvNormAct(width, width, groups))
            cin = width
        self.levels = len(widths)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = space_to_depth(x, 2)
        feats = []
        for level in range(self.levels):
            x = getattr(self, f"stage{level}_conv0")(x)
            x = getattr(self, f"stage{level}_conv1")(x)
            feats.append(x)
        return feats


class Decoder(nn.Module):
    """UNet-style decoder: upsample, concatenate the skip, `convs` ConvNormAct per level."""

    def __init__(self, deepest_channels: int, skip_channels: list[int], widths: tuple[int, ...],
                 convs: int, groups: int):
        super().__init__()
        self.levels, self.convs = len(skip_channels), convs
        cin = deepest_channels
        for level in reversed(range(self.levels)):
            cin = cin + skip_channels[level]
            for i in range(convs):
                setattr(self, f"level{level}_conv{i}", ConvNormAct(cin, widths[level], groups))
                cin = widths[level]
        self.out_channels = cin

    def forward(self, deepest: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        y = deepest
        for level in reversed(range(self.levels)):
            y = torch.cat([upsample2x(y), skips[level]], dim=1)
            for i in range(self.convs):
                y = getattr(self, f"level{level}_conv{i}")(y)
        return y


class AttentionHead(nn.Module):
    """ConvNormAct, 1x1 conv to upscale^2 channels, depth-to-space, sigmoid."""

    def __init__(self, cin: int, width: int, groups: int, upscale: int = 2):
        super().__init__()
        self.upscale = upscale
        self.ConvNormAct_0 = ConvNormAct(cin, width, groups)
        self.logit = nn.Conv2d(width, upscale * upscale, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.logit(self.ConvNormAct_0(x))
        return torch.sigmoid(depth_to_space(x, self.upscale))


class ConvLSTMAttentionNet(nn.Module):
    """PyTorch port of cac_jax.models.ConvLSTMAttentionNet (same fields, same defaults)."""

    def __init__(self, num_classes: int, encoder_widths=(32, 64, 128, 256), lstm_levels=(2, 3),
                 lstm_features=(64, 128), bidirectional=False, decoder_widths=(32, 64, 128),
                 temporal_decoder_widths=(32, 64, 128), decoder_convs=1, attention_width=32,
                 groups=8):
        super().__init__()
        self.lstm_levels, self.bidirectional = tuple(lstm_levels), bidirectional
        self.encoder = SliceEncoder(tuple(encoder_widths), groups)
        temporal_channels = {}
        for level, hidden in zip(lstm_levels, lstm_features):
            setattr(self, f"lstm{level}", ConvLSTM(encoder_widths[level], hidden))
            if bidirectional:
                setattr(self, f"lstm{level}_reverse",
                        ConvLSTM(encoder_widths[level], hidden, reverse=True))
            temporal_channels[level] = hidden * (2 if bidirectional else 1)
        self.deepest_lstm = max(lstm_levels)
        t_skip = [temporal_channels.get(lv, encoder_widths[lv]) for lv in range(self.deepest_lstm)]
        self.temporal_decoder = Decoder(temporal_channels[self.deepest_lstm], t_skip,
                                        tuple(temporal_decoder_widths)[:self.deepest_lstm],
                                        decoder_convs, groups)
        self.spatial_decoder = Decoder(encoder_widths[-1], list(encoder_widths[:-1]),
                                       tuple(decoder_widths), decoder_convs, groups)
        t_out, s_out = self.temporal_decoder.out_channels, self.spatial_decoder.out_channels
        self.temporal_head = nn.Conv2d(t_out, 4 * num_classes, 1)
        self.spatial_head = nn.Conv2d(s_out, 4 * num_classes, 1)
        self.attention = AttentionHead(t_out + s_out, attention_width, groups)

    def forward(self, x: torch.Tensor):
        """x: (batch, 3, H, W) -> (logits (batch, classes, H, W), aux)."""
        b, steps, h, w = x.shape
        feats = self.encoder(x.reshape(b * steps, 1, h, w))
        feats = [f.reshape(b, steps, *f.shape[1:]) for f in feats]
        centre = [f[:, CENTRE] for f in feats]
        temporal = {}
        for level in self.lstm_levels:
            fwd = getattr(self, f"lstm{level}")(feats[level])
            if self.bidirectional:
                bwd = getattr(self, f"lstm{level}_reverse")(feats[level])
                temporal[level] = torch.cat([fwd[:, CENTRE], bwd[:, CENTRE]], dim=1)
            else:
                temporal[level] = fwd[:, -1]
        t_skips = [temporal.get(lv, centre[lv]) for lv in range(self.deepest_lstm)]
        t_feat = self.temporal_decoder(temporal[self.deepest_lstm], t_skips)
        s_feat = self.spatial_decoder(centre[-1], centre[:-1])
        temporal_logits = depth_to_space(self.temporal_head(t_feat), 2)
        spatial_logits = depth_to_space(self.spatial_head(s_feat), 2)
        attention = self.attention(torch.cat([t_feat, s_feat], dim=1))
        logits = attention * temporal_logits + (1.0 - attention) * spatial_logits
        return logits, {"temporal": temporal_logits, "spatial": spatial_logits,
                        "attention": attention}


class UNet(nn.Module):
    """PyTorch port of cac_jax.models.UNet (max-pool down, 2x2 stride-2 transposed convs up)."""

    def __init__(self, num_classes: int, base_width: int = 64, depth: int = 4, groups: int = 8):
        super().__init__()
        self.depth = depth
        cin = NUM_SLICES
        for level in range(depth):
            setattr(self, f"down{level}", DoubleConv(cin, base_width * 2**level, groups))
            cin = base_width * 2**level
        self.bottleneck = DoubleConv(cin, base_width * 2**depth, groups)
        cin = base_width * 2**depth
        for level in reversed(range(depth)):
            width = base_width * 2**level
            setattr(self, f"upsample{level}", nn.ConvTranspose2d(cin, width, 2, stride=2))
            setattr(self, f"up{level}", DoubleConv(2 * width, width, groups))
            cin = width
        self.head = nn.Conv2d(cin, num_classes, 1)

    def forward(self, x: torch.Tensor):
        """x: (batch, 3, H, W) -> (logits (batch, classes, H, W), {})."""
        skips = []
        y = x
        for level in range(self.depth):
            y = getattr(self, f"down{level}")(y)
            skips.append(y)
            y = F.max_pool2d(y, 2)
        y = self.bottleneck(y)
        for level in reversed(range(self.depth)):
            y = getattr(self, f"upsample{level}")(y)
            y = torch.cat([skips[level], y], dim=1)
            y = getattr(self, f"up{level}")(y)
        return self.head(y), {}


def build_torch_model(config) -> nn.Module:
    """The PyTorch twin of `cac_jax.models.build_model(config)` (float32, GroupNorm only)."""
    cfg = config.model if "model" in config else config
    if cfg.norm != "group":
        raise ValueError(f"the PyTorch reference ports GroupNorm models only, not norm={cfg.norm!r}")
    groups = int(cfg.groups)
    if cfg.arch == "convlstm":
        c = cfg.convlstm
        return ConvLSTMAttentionNet(
            int(cfg.num_classes), tuple(c.encoder_widths), tuple(c.lstm_levels),
            tuple(c.lstm_features), bool(c.bidirectional), tuple(c.decoder_widths),
            tuple(c.temporal_decoder_widths), int(c.decoder_convs), int(c.attention_width),
            groups)
    if cfg.arch == "unet":
        return UNet(int(cfg.num_classes), int(cfg.unet.base_width), int(cfg.unet.depth), groups)
    raise ValueError(f"unknown model arch {cfg.arch!r}: expected 'convlstm' or 'unet'")


def _torch_name(path: tuple[str, ...]) -> str:
    """Flax parameter path -> PyTorch state-dict key."""
    leaf = {"kernel": "weight", "scale": "weight", "bias": "bias"}[path[-1]]
    return ".".join((*path[:-1], leaf))


def flax_to_state_dict(params: Any, model: nn.Module) -> dict[str, torch.Tensor]:
    """Convert a Flax parameter tree to `model`'s state dict; every tensor must be matched."""
    import jax

    state = {}
    modules = dict(model.named_modules())
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        keys = tuple(p.key for p in path)
        value = np.array(leaf, np.float32)  # a writable copy for torch.from_numpy
        module = modules[".".join(keys[:-1])]
        if keys[-1] == "kernel" and isinstance(module, nn.ConvTranspose2d):
            # Flax's ConvTranspose correlates without flipping; PyTorch's transposes the conv.
            value = value[::-1, ::-1].transpose(2, 3, 0, 1)
        elif keys[-1] == "kernel":
            value = value.transpose(3, 2, 0, 1)
        state[_torch_name(keys)] = torch.from_numpy(value.copy())
    expected = set(model.state_dict())
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise ValueError(f"Flax and PyTorch parameters differ: missing {missing}, extra {extra}")
    return state


def from_flax(config, params: Any) -> nn.Module:
    """Build the PyTorch twin of `config`'s model and load the Flax `params` into it."""
    model = build_torch_model(config)
    model.load_state_dict(flax_to_state_dict(params, model), strict=True)
    return model


def count_params(model: nn.Module) -> int:
    """Total number of scalar parameters."""
    return int(sum(p.numel() for p in model.parameters()))
