"""Model configuration: `model_config(arch, task, local)` -> the `config.model` ConfigDict.

Fields (read by `cac_jax.models.build_model`):
- arch: "convlstm" | "unet"; task: "calcium" | "heart"; num_classes: 3 | 2 (from the task:
  background / coronary / non-coronary calcium, or background / heart, docs/contracts.md);
- dtype: computation dtype, "auto" (bfloat16 on GPU/TPU, float32 on CPU), "float32" or
  "bfloat16"; param_dtype: parameter dtype, float32 (bf16 compute keeps float32 master weights);
- conv_impl: "xla" | "onednn" | "onednn_direct" | "auto", which library (and, for oneDNN,
  whether Winograd's algorithm runs the large 3x3 convolutions) runs them (docs/onednn.md);
- norm: "group" (default, see cac_jax/models/layers.py for why) or "batch"; groups: GroupNorm's
  maximum group count; bn_axis_name: the pmap axis for synchronised BatchNorm (None: per device);
- convlstm.*: encoder/decoder widths, ConvLSTM levels and hidden widths, bidirectional;
- unet.*: base_width (64: the literature's UNet) and depth (4 down/up levels).

`local=True` gives tiny widths for 64 px tests (same structure, seconds per test on a CPU).
"""

from __future__ import annotations

import ml_collections

NUM_CLASSES = {"calcium": 3, "heart": 2}
ARCHS = ("convlstm", "unet")

# UNet base width whose parameter count is closest to the default ConvLSTM's (see
# benchmarks/results/bench_models.md): the "width-matched" baseline.
MATCHED_UNET_BASE_WIDTH = 24
# The models the demo trains on a 2-core CPU (configs/demo_*.py): the ConvLSTM-attention network
# at half the default widths (a quarter of the FLOPs and parameters: more training steps in a time
# box, faster inference), and the UNet base width with about its parameter count.
HALF_WIDTH_CONVLSTM = {
    "encoder_widths": (16, 32, 64, 128),
    "lstm_features": (32, 64),
    "decoder_widths": (16, 32, 64),
    "temporal_decoder_widths": (16, 32, 64),
    "attention_width": 16,
}
HALF_WIDTH_MATCHED_UNET_BASE_WIDTH = 12


def model_config(arch: str, task: str, local: bool = False) -> ml_collections.ConfigDict:
    """Return the model ConfigDict for `arch` ("convlstm" | "unet") and `task` ("calcium" | "heart")."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}: expected one of {ARCHS}")
    if task not in NUM_CLASSES:
        raise ValueError(f"unknown task {task!r}: expected one of {tuple(NUM_CLASSES)}")
    cfg = ml_collections.ConfigDict()
    cfg.arch = arch
    cfg.task = task
    cfg.num_classes = NUM_CLASSES[task]
    cfg.dtype = "auto"
    cfg.param_dtype = "float32"
    cfg.norm = "group"
    cfg.groups = 8
    cfg.bn_axis_name = ml_collections.config_dict.placeholder(str)
    # Convolutions: "xla", "onednn" (XLA FFI custom calls into oneDNN, CPU only; the large 3x3
    # ones by Winograd's F(2x2, 3x3)), "onednn_direct" (oneDNN's direct algorithm only) or "auto"
    # ("onednn" on the CPU when its extension is built, XLA otherwise); docs/onednn.md.
    cfg.conv_impl = "auto"

    cfg.convlstm = ml_collections.ConfigDict()
    c = cfg.convlstm
    if local:
        c.encoder_widths = (8, 16, 16, 32)
        c.lstm_levels = (2, 3)
        c.lstm_features = (8, 16)
        c.decoder_widths = (8, 16, 16)
        c.temporal_decoder_widths = (8, 16, 16)
        c.attention_width = 8
    else:
        # Our choice (the paper gives no widths): a few million parameters, several times faster
        # than UNet-64 on a CPU (docs/architecture.md has the sizes, docs/benchmarks.md the
        # timings).
        # Stages at H/2..H/16 (2x2 space-to-depth stem); widths are multiples of 32, which XLA:CPU
        # convolutions run efficiently; most weights sit at H/8 and H/16, where FLOPs are cheap.
        # ConvLSTMs at H/8 (64 hidden) and H/16 (128 hidden): "hierarchical" temporal context.
        c.encoder_widths = (32, 64, 128, 256)
        c.lstm_levels = (2, 3)
        c.lstm_features = (64, 128)
        c.decoder_widths = (32, 64, 128)
        c.temporal_decoder_widths = (32, 64, 128)
        c.attention_width = 32
    c.decoder_convs = 1  # conv-norm-ReLU layers per decoder level
    c.bidirectional = False  # True: a second, reversed ConvLSTM per level (+ its weights and FLOPs)

    cfg.unet = ml_collections.ConfigDict()
    cfg.unet.base_width = 8 if local else 64
    cfg.unet.depth = 4
    if local:
        cfg.groups = 4
    return cfg
