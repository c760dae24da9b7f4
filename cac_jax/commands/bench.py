"""`cac-jax bench`: the paper's timing and memory study, JAX vs PyTorch side by side.

Writes DIR/bench.json, DIR/bench.md and DIR/bench.png (box plot); see `cac_jax.benchmark`.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

from cac_jax.commands import positive_int

EPILOG = """\
Each sample is SLICES consecutive slices of a synthetic 512 px CAC study, segmented as one batch;
the time per sample is reported as median and IQR over N samples (the paper: N = 1024, 16 slices),
with the Wilcoxon rank-sum test between models. Compilation and warm-up are excluded and reported.
Models come from configs/ (untrained weights); --local takes their tiny 64 px variants.

examples:
  cac-jax bench --out bench_out                                   # JAX, 3 models, 512 px, N = 5
  cac-jax bench --models convlstm,unet64 --frameworks jax,torch --train-step --out bench_out
  cac-jax bench --local --size 64 --samples 3 --frameworks jax,torch --out /tmp/b  # seconds
"""


def _csv(text: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in text.split(",") if item.strip())




def register(subparsers: argparse._SubParsersAction) -> None:
    """Adds the `bench` subcommand to the `cac-jax` parser."""
    from cac_jax.benchmark import DEFAULT_SAMPLES, MODEL_CONFIGS

    parser = subparsers.add_parser(
        "bench",
        help="timing and memory study of the models (per-sample inference, training step), "
             "JAX vs PyTorch",
        description="Times each model on N samples of 16 slices (the paper's protocol), optionally "
                    "a training step, in JAX and in the PyTorch reference, side by side.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--models", type=_csv, default=tuple(MODEL_CONFIGS),
                        help=f"comma-separated, from {','.join(MODEL_CONFIGS)} (default: all)")
    parser.add_argument("--frameworks", type=_csv, default=("jax",),
                        help="jax or jax,torch (torch needs: pip install -e .[torch])")
    parser.add_argument("--samples", type=positive_int, default=DEFAULT_SAMPLES, metavar="N",
                        help=f"samples per model (default {DEFAULT_SAMPLES}; the paper: 1024)")
    parser.add_argument("--slices", type=positive_int, default=16,
                        help="slices per sample (default 16)")
    parser.add_argument("--size", type=positive_int, default=512,
                        help="slice size in pixels, a multiple of 16 (default 512)")
    parser.add_argument("--train-step", action="store_true",
                        help="also time a focal-loss + Adam training step and its memory")
    parser.add_argument("--train-batch", type=positive_int, default=2,
                        help="batch of the training step (default 2)")
    parser.add_argument("--train-repeats", type=positive_int, default=3,
                        help="timed training steps per model (default 3)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "auto"), default="float32",
                        help="compute dtype (auto: bfloat16 on GPU/TPU; default float32)")
    parser.add_argument("--local", action="store_true",
                        help="the configs' tiny :local variants (tests, smoke runs)")
    parser.add_argument("--no-torch-compile", action="store_true",
                        help="skip the torch.compile variant (its compilation takes minutes)")
    parser.add_argument("--conv-impls", type=_csv, default=("xla", "onednn"),
                        help="JAX variants by convolution library: xla (jax_xla), onednn "
                             "(jax_onednn, where built: Winograd for the large 3x3 convolutions), "
                             "onednn_direct (jax_onednn_direct: oneDNN's direct algorithm only; "
                             "docs/onednn.md); default xla,onednn")
    parser.add_argument("--seed", type=int, default=0, help="synthetic study and weights seed")
    parser.add_argument("--out", required=True, type=pathlib.Path, metavar="DIR",
                        help="output folder for bench.json, bench.md, bench.png")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Runs the study and writes its outputs."""
    from cac_jax.benchmark import BenchSettings, run_bench, write_outputs

    settings = BenchSettings(
        models=args.models, frameworks=args.frameworks, samples=args.samples,
        slices=args.slices, size=args.size, train_step=args.train_step,
        train_batch=args.train_batch, train_repeats=args.train_repeats, local=args.local,
        dtype=args.dtype, torch_compile=not args.no_torch_compile, conv_impls=args.conv_impls,
        seed=args.seed,
    )
    settings.check()
    result = run_bench(settings, log=lambda msg: print(msg, file=sys.stderr, flush=True))
    paths = write_outputs(result, args.out)
    print(paths["md"].read_text())
    print(f"wrote {paths['json']}, {paths['md']}, {paths['png']}", file=sys.stderr)
    return 0
