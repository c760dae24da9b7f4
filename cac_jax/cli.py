"""`cac-jax <command>`: the console script. Parses arguments and calls library functions.

Bad input (any `data_pipeline.errors.InputError`) is reported as one line on stderr naming the file
and the problem, with exit code 2; no traceback. So is what the file system refuses (an OSError:
a full disk, a read-only folder) where the command did not turn it into an InputError itself.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
from collections.abc import Sequence

from data_pipeline.errors import InputError

# Subcommand modules under cac_jax.commands, in the order `--help` lists them. Each module is
# imported lazily-cheap: heavy imports (JAX, TensorFlow) happen inside its handler, and a run
# of one command imports only its own module (build_parser).
COMMANDS = ("score", "synth", "ingest", "train", "infer", "evaluate", "bench", "study",
            "export")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole parser, or with `only` (a command name) the parser of that command alone: a run
    of one command then imports no other command's module (the cohort generator's, imported to
    list its sites and anatomies, takes about a second)."""
    parser = argparse.ArgumentParser(
        prog="cac-jax",
        description="Coronary artery calcium scoring (gated CAC and low-dose CTAC CT) in JAX/Flax.",
    )
    from cac_jax import __version__

    parser.add_argument("--version", action="version", version=f"cac-jax {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="<command>", required=True)
    for name in COMMANDS if only is None else (only,):
        module = importlib.import_module(f"cac_jax.commands.{name}")
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv[0] if argv and argv[0] in COMMANDS else None)
    args = parser.parse_args(argv)
    try:
        result = args.func(args)
    except InputError as err:
        print(f"cac-jax {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"cac-jax {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader of our stdout went away (`cac-jax score ... | head`): not an error of ours.
        # Point stdout at /dev/null so the interpreter's final flush does not raise again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except OSError as err:
        if err.errno is None:
            raise
        # What the file system refused (a full disk, a read-only folder, a file where a folder
        # is needed) where no command named it already: one line naming the file.
        where = f"{err.filename}: " if err.filename else ""
        print(f"cac-jax {args.command}: error: {where}{err.strerror or err}", file=sys.stderr)
        return 2
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
