"""Subcommands of the `cac-jax` console script, one module each.

Each module defines `register(subparsers)` (adds its parser and sets `func`) and keeps to argument
parsing and a call into the library, so all logic stays importable and testable.
"""

from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (counts such as --samples and --batch-size)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value
