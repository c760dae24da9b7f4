"""Thin training entry: `python -m cac_jax.main --config configs/NAME.py[:local] --workdir DIR
[--config.KEY=VALUE ...]` (ml_collections config_flags); the logic lives in `cac_jax.train`.

`cac-jax train` takes the same arguments. Bad input (unknown config key, missing dataset,
inconsistent config) prints one line and exits with code 2.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from data_pipeline.errors import InputError, error_line

USAGE = ("usage: cac-jax train --config configs/NAME.py[:local] --workdir DIR "
         "[--config.KEY=VALUE ...]")


def _shipped_config(argv: Sequence[str]) -> list[str]:
    """`argv` with the `--config` file resolved by `config_defaults.resolve_config_path`, so
    `--config configs/NAME.py` reads the installed configs/ outside a checkout."""
    from cac_jax.config_defaults import resolve_config_path

    argv = list(argv)
    for i, arg in enumerate(argv):
        if arg == "--":
            break
        name, eq, value = arg.partition("=")
        if name not in ("--config", "-config"):
            continue
        if eq:
            argv[i] = f"{name}={resolve_config_path(value)}"
        elif i + 1 < len(argv):
            argv[i + 1] = resolve_config_path(argv[i + 1])
    return argv


def _unknown_override(argv: Sequence[str]) -> str | None:
    """'unknown config key train.stepz; did you mean train.steps?' for the first `--config.KEY`
    override whose key path the config file does not have (None when every path exists)."""
    import difflib

    from absl import flags
    from ml_collections import config_flags

    config_args = [a for a in argv if not a.startswith("--config.")]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=values,
                                    sys_argv=config_args)
    flags.DEFINE_string("workdir", None, "", flag_values=values)
    try:
        values(config_args)
        config = values.config
    except Exception:  # noqa: BLE001 (the original error is reported instead)
        return None
    for arg in argv:
        if not arg.startswith("--config."):
            continue
        path = arg[len("--config."):].split("=", 1)[0].split(".")
        node = config
        for depth, key in enumerate(path):
            keys = list(node.keys()) if hasattr(node, "keys") else []
            if key in keys:
                node = node[key]
                continue
            prefix = ".".join(path[:depth])
            full = ".".join(path)
            close = difflib.get_close_matches(key, keys, n=1)
            hint = (f"; did you mean {'.'.join([*path[:depth], close[0]])}?" if close
                    else f"; {prefix or 'the config'} has {', '.join(sorted(keys))}"
                    if keys else f"; {prefix} is a value, not a group")
            return f"unknown config key {full}{hint}"
    return None


def parse_flags(argv: Sequence[str]):
    """(config, workdir) from command-line arguments, on a private absl FlagValues.

    Raises InputError for a missing or unreadable config file, an unknown key or a bad value.
    """
    from absl import flags
    from ml_collections import config_flags

    values = flags.FlagValues()
    argv = ["cac-jax train", *_shipped_config(argv)]
    # config_flags finds the `--config.KEY=VALUE` overrides in the argv it is given at
    # definition (sys.argv by default, which is not ours inside a subcommand).
    config_flags.DEFINE_config_file(
        "config", None, "experiment config file (configs/NAME.py[:local])", flag_values=values,
        lock_config=True, sys_argv=argv)
    flags.DEFINE_string("workdir", None, "training workdir (created; a rerun resumes it)",
                        flag_values=values)
    try:
        values(argv)
        config, workdir = values.config, values.workdir
        if config is not None:
            # A config file that failed to load is a placeholder that raises on first use.
            config.get("task")
    except flags.Error as err:
        raise InputError(None, f"{error_line(err, with_type=False)} ({USAGE})") from None
    except (FileNotFoundError, OSError) as err:
        raise InputError(getattr(err, "filename", None),
                         f"cannot read the config: {error_line(err, with_type=False)}") from None
    except (AttributeError, KeyError, ValueError, TypeError) as err:
        unknown = _unknown_override(argv) if isinstance(err, AttributeError | KeyError) else None
        raise InputError(None, unknown or f"bad config: {error_line(err, with_type=False)}") from None
    if config is None:
        raise InputError(None, f"--config is required ({USAGE})")
    if not workdir:
        raise InputError(None, f"--workdir is required ({USAGE})")
    return config, workdir


def run(argv: Sequence[str]) -> int:
    """Parse, train, print the summary line; exit code 0 (143 after a SIGTERM save)."""
    if any(a in ("-h", "--help", "-help") for a in argv):
        print(USAGE)
        print("  Trains (or resumes) the experiment in DIR: config.json, checkpoints/, "
              "metrics.jsonl, tensorboard/, summary.json.")
        raise SystemExit(0)  # as argparse's --help does
    config, workdir = parse_flags(argv)
    from cac_jax.train import train_and_evaluate

    summary = train_and_evaluate(config, workdir)
    best = summary["best_value"]
    print(f"trained {summary['arch']}/{summary['task']} to step {summary['steps']} "
          f"({summary['steps_this_run']} steps in {summary['wall_time_s']:.1f} s); best "
          f"{summary['best_metric']} = {best if best is None else round(best, 4)} at step "
          f"{summary['best_step']}; {summary['workdir']}/summary.json")
    return 143 if summary["preempted"] else 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        return run(argv)
    except InputError as err:
        print(f"cac-jax train: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
