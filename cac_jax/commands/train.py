"""`cac-jax train --config configs/NAME.py[:local] --workdir DIR [--config.KEY=VALUE ...]`."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    # The arguments are absl/ml_collections flags (`--config.train.steps=100`), which argparse
    # cannot list in advance: hand them over untouched ('+' is never used as a prefix here).
    parser = subparsers.add_parser(
        "train", prefix_chars="+", add_help=False,
        help="train (or resume) a model: --config configs/NAME.py[:local] --workdir DIR "
             "[--config.KEY=VALUE ...]")
    parser.add_argument("flags", nargs=argparse.REMAINDER)
    parser.set_defaults(func=run)


def run(args) -> int:
    from cac_jax.main import run as train_main

    return train_main(args.flags)
