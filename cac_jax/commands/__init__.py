"""Subcommands of the `cac-jax` console script, one module each.

Each module defines `register(subparsers)` (adds its parser and sets `func`) and keeps to argument
parsing and a call into the library, so all logic stays importable and testable.
"""
