"""Draws the architecture diagrams of docs/architecture.md into docs/figures/.

Run:  python docs/make_figures.py [--out docs/figures]

- `pipeline.png`: the two-model system (the paper's Figure 1): a heart model and a calcium model
  on 3-slice windows, the heart silhouette, coronary calcium at >= 130 HU inside it, the Agatston
  scorer.
- `convlstm_attention.png`: the ConvLSTM-attention network as `cac_jax/models/attention.py`
  builds it with the default widths of `cac_jax/models/config.py`.

The widths and resolutions in the labels are read from the model configuration, so the drawing
follows the code when the defaults change. Plain matplotlib (boxes and arrows), no other tools.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display needed

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cac_jax.models.config import model_config  # noqa: E402
from data_pipeline.atomic import atomic_path  # noqa: E402
from data_pipeline.labels import HU_WINDOW  # noqa: E402

# Box colours by role: data, model part, recurrent part, fusion, classic (non-learned) step.
COLOURS = {
    "data": "#e8eef7",
    "model": "#cfe3cf",
    "lstm": "#f6d8b8",
    "fuse": "#f3c9d6",
    "step": "#eeeeee",
    "out": "#fff2b3",
}


def _box(ax, x: float, y: float, w: float, h: float, text: str, kind: str, size: float = 8.5):
    """A rounded box centred at (x, y) with wrapped text; returns its (x, y, w, h)."""
    patch = FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0.02,rounding_size=0.08",
                           facecolor=COLOURS[kind], edgecolor="#555555", linewidth=0.9)
    ax.add_patch(patch)
    ax.text(x, y, text, ha="center", va="center", fontsize=size, wrap=True)
    return x, y, w, h


def _edge(box, side: str) -> tuple[float, float]:
    x, y, w, h = box
    return {"left": (x - w / 2, y), "right": (x + w / 2, y), "top": (x, y + h / 2),
            "bottom": (x, y - h / 2)}[side]


def _arrow(ax, start, end, text: str | None = None, style: str = "-|>", colour: str = "#333333",
           rad: float = 0.0, text_offset=(0.0, 0.12)):
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle=style, mutation_scale=11, color=colour,
                                 linewidth=1.0, connectionstyle=f"arc3,rad={rad}",
                                 shrinkA=2, shrinkB=2))
    if text:
        mx, my = (start[0] + end[0]) / 2 + text_offset[0], (start[1] + end[1]) / 2 + text_offset[1]
        ax.text(mx, my, text, ha="center", va="bottom", fontsize=7, color="#333333")


def _canvas(width: float, height: float, title: str):
    fig, ax = plt.subplots(figsize=(width, height))
    ax.set_xlim(0, width)
    ax.set_ylim(0, height)
    ax.axis("off")
    ax.set_title(title, fontsize=11, loc="left")
    return fig, ax


def draw_pipeline(path: Path) -> None:
    """The two-model pipeline from a CT study to its score."""
    low, high = (int(v) for v in HU_WINDOW)
    fig, ax = _canvas(15.0, 6.4, "cac-jax: two models, one scorer (the paper's Figure 1 design)")
    study = _box(ax, 1.15, 3.1, 1.9, 1.3, "CT study\nDICOM folder,\n.nii.gz / .mhd / .nrrd", "data")
    volume = _box(ax, 4.0, 3.1, 2.2, 1.3, "HU volume (z, y, x)\ncanonical orientation\nspacing (mm)",
                  "data")
    windows = _box(ax, 6.85, 3.1, 2.2, 1.4, f"3-slice windows\n(below, centre, above)\nHU clipped to\n"
                                            f"[{low}, {high}], scaled to [0, 1]", "step", 8)
    heart = _box(ax, 9.75, 4.9, 2.4, 1.15, "A. heart model\n(ConvLSTM-attention or UNet)\n2 classes",
                 "model")
    calcium = _box(ax, 9.75, 1.3, 2.4, 1.15, "B. calcium model\n3 classes: background,\ncoronary, "
                                              "non-coronary", "model")
    silhouette = _box(ax, 13.2, 4.9, 3.0, 1.25, "heart silhouette\n(slice masks stacked):\nlargest 3D "
                                                "component, dilated 3 mm", "step", 8)
    combine = _box(ax, 13.2, 3.1, 3.0, 1.1, "coronary class AND inside\nsilhouette AND HU >= 130\n"
                                             "-> label 4 (artery undetermined)", "fuse", 8)
    scorer = _box(ax, 13.2, 1.3, 3.0, 1.25, "Agatston scorer\nscore, volume, mass, category\n"
                                             "(0 / 1-100 / 101-400 / >400)", "out", 8)
    _arrow(ax, _edge(study, "right"), _edge(volume, "left"), "read_study")
    _arrow(ax, _edge(volume, "right"), _edge(windows, "left"))
    _arrow(ax, _edge(windows, "top"), _edge(heart, "left"), rad=-0.25)
    _arrow(ax, _edge(windows, "bottom"), _edge(calcium, "left"), rad=0.25)
    _arrow(ax, _edge(heart, "right"), _edge(silhouette, "left"))
    _arrow(ax, _edge(silhouette, "bottom"), _edge(combine, "top"))
    _arrow(ax, _edge(calcium, "right"), (combine[0] - combine[2] / 2, combine[1] - 0.25), rad=0.25)
    _arrow(ax, _edge(combine, "bottom"), _edge(scorer, "top"))
    # The original HU go to the scorer (and to the >= 130 HU test), not the windowed input.
    _arrow(ax, _edge(volume, "bottom"), (scorer[0] - 0.6, scorer[1] - scorer[3] / 2),
           colour="#888888", rad=0.3)
    ax.text(6.2, 0.05, "original HU and spacing: the score is always computed on the study's own "
                       "grid", fontsize=7.5, color="#666666", ha="center")
    ax.text(0.2, 6.05, "The heart silhouette removes the bone (ribs, spine, sternum) that the "
                       "calcium model would otherwise overcall; the models do not name arteries, "
                       "so predicted coronary calcium is label 4.", fontsize=8, color="#333333")
    _save(fig, path)


def draw_network(path: Path) -> None:
    """The ConvLSTM-attention segmenter with the default (calcium) widths."""
    c = model_config("convlstm", "calcium").convlstm
    enc = list(c.encoder_widths)
    levels = [2 ** (i + 1) for i in range(len(enc))]    # stage i at H / 2^(i+1)
    lstm = dict(zip(c.lstm_levels, c.lstm_features))
    fig, ax = _canvas(14.0, 8.4, "ConvLSTM-attention network (cac_jax/models/attention.py, default "
                                 "widths)")
    # Inputs: three slices.
    names = ("slice z-1 (below)", "slice z (centre)", "slice z+1 (above)")
    inputs = [_box(ax, 1.15, 6.6 - 1.5 * i, 1.8, 0.8, f"{n}\n(H, W, 1)", "data", 8)
              for i, n in enumerate(names)]
    encoder = _box(ax, 3.75, 5.1, 2.3, 3.9,
                   "shared SliceEncoder\n(3 slices folded\ninto the batch)\n\n2x2 space-to-depth stem\n"
                   + "\n".join(f"H/{lv}: {w} ch" for lv, w in zip(levels, enc)), "model", 8)
    for box in inputs:
        _arrow(ax, _edge(box, "right"), (encoder[0] - encoder[2] / 2, box[1]))
    lstm_boxes = {}
    for row, (level, hidden) in enumerate(sorted(lstm.items(), reverse=True)):
        lstm_boxes[level] = _box(
            ax, 6.75, 6.75 - 1.45 * row, 2.4, 1.15,
            f"ConvLSTM at H/{levels[level]}\n{hidden} hidden, scanned over\n"
            f"z-1 -> z -> z+1 (nn.scan)", "lstm", 8)
        _arrow(ax, (encoder[0] + encoder[2] / 2, lstm_boxes[level][1]),
               _edge(lstm_boxes[level], "left"), f"H/{levels[level]}")
    deepest = max(lstm)
    temporal = _box(ax, 9.85, 6.1, 2.4, 1.35,
                    f"temporal decoder\nfrom the H/{levels[deepest]} state up to H/2;\nskips: "
                    "ConvLSTM states,\nelse centre features", "model", 7.5)
    spatial = _box(ax, 9.85, 2.6, 2.4, 1.35,
                   "spatial decoder\n(UNet decoder on the\ncentre slice's features,\nH/16 up to H/2)",
                   "model", 7.5)
    for level, box in lstm_boxes.items():
        _arrow(ax, _edge(box, "right"), (temporal[0] - temporal[2] / 2, temporal[1] + 0.3 *
                                         (1 if level == deepest else -1)))
    _arrow(ax, (encoder[0] + encoder[2] / 2, 3.4), _edge(spatial, "left"),
           "centre slice, all levels", text_offset=(0.0, -0.35))
    t_head = _box(ax, 12.65, 6.1, 2.1, 1.0, "temporal head\n1x1 conv -> depth-to-space\n"
                                            "-> T logits (H, W, k)", "step", 7.5)
    s_head = _box(ax, 12.65, 2.6, 2.1, 1.0, "spatial head\n1x1 conv -> depth-to-space\n"
                                           "-> S logits (H, W, k)", "step", 7.5)
    attention = _box(ax, 9.85, 4.35, 2.4, 1.0, f"attention head\nconv-norm-ReLU ({c.attention_width})"
                                               "\n-> 1x1 conv -> sigmoid: a", "fuse", 7.5)
    blend = _box(ax, 12.65, 4.35, 2.1, 1.0, "logits = a * T\n+ (1 - a) * S\n(H, W, k) centre slice",
                 "out", 8)
    _arrow(ax, _edge(temporal, "right"), _edge(t_head, "left"))
    _arrow(ax, _edge(spatial, "right"), _edge(s_head, "left"))
    _arrow(ax, _edge(temporal, "bottom"), (attention[0] - 0.4, attention[1] + attention[3] / 2))
    _arrow(ax, _edge(spatial, "top"), (attention[0] - 0.4, attention[1] - attention[3] / 2))
    _arrow(ax, _edge(attention, "right"), _edge(blend, "left"))
    _arrow(ax, _edge(t_head, "bottom"), _edge(blend, "top"))
    _arrow(ax, _edge(s_head, "top"), _edge(blend, "bottom"))
    ax.text(0.2, 0.65, "Input (batch, 3, H, W, 1); output (logits, aux) with aux = {temporal: T, "
                       "spatial: S, attention: a} for auxiliary losses and plots. Hierarchical "
                       "multi-scale attention (Tao et al. 2020) with adjacent slices in place of "
                       "image scales.", fontsize=8, color="#333333")
    ax.text(0.2, 0.25, f"k = {model_config('convlstm', 'calcium').num_classes} classes for the "
                       f"calcium model, {model_config('convlstm', 'heart').num_classes} for the "
                       "heart model; GroupNorm by default; Kaiming-normal initialisation.",
            fontsize=8, color="#333333")
    _save(fig, path)


def _save(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=130, bbox_inches="tight")
    plt.close(fig)


def main(argv=None) -> int:
    """Writes both figures; prints their paths."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "figures"),
                        help="output folder (default docs/figures)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    for name, draw in (("pipeline.png", draw_pipeline), ("convlstm_attention.png", draw_network)):
        draw(out / name)
        print(out / name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
