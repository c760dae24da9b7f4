"""The `cac-jax` console script: every subcommand has help, bad input is one line and exit 2."""

import subprocess
import sys

import pytest

from cac_jax import __version__
from cac_jax.cli import COMMANDS, main


@pytest.mark.parametrize("command", COMMANDS)
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: cac-jax {command}")
    assert "--" in out  # documents its options


def test_top_level_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in COMMANDS:
        assert command in out


def test_console_script_version_and_missing_command():
    version = subprocess.run([sys.executable, "-m", "cac_jax.cli", "--version"],
                             capture_output=True, text=True, check=False)
    assert version.returncode == 0 and version.stdout.strip() == f"cac-jax {__version__}"
    missing = subprocess.run([sys.executable, "-m", "cac_jax.cli"], capture_output=True, text=True,
                             check=False)
    assert missing.returncode == 2 and "required" in missing.stderr


def test_scoring_imports_no_tensorflow():
    """A workstation that only scores studies must not pay for TensorFlow (docs/architecture.md)."""
    code = ("import sys, cac_jax.cli, cac_jax.scoring, cac_jax.baselines, data_pipeline.io, "
            "data_pipeline.phantom; cac_jax.cli.build_parser(); "
            "print('tensorflow' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip() == "False"


def test_one_command_builds_its_own_parser_only():
    """`cac-jax evaluate ...` does not import the other commands' modules (the cohort generator's
    costs about a second per run); the whole parser still lists every command."""
    code = ("import sys, cac_jax.cli as cli; cli.build_parser('evaluate'); "
            "print('data_pipeline.phantom' in sys.modules, 'cac_jax.commands.synth' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert result.stdout.split() == ["False", "False"]
    from cac_jax import cli

    assert cli.build_parser("evaluate").parse_args(
        ["evaluate", "--pred", "p.csv", "--ref", "r.csv", "--out", "o"]).command == "evaluate"
    usage = cli.build_parser().format_help()
    assert all(name in usage for name in cli.COMMANDS)


def test_error_line_is_one_line_naming_the_type_of_unexpected_errors():
    from data_pipeline.errors import InputError, error_line

    assert error_line(InputError("a.dcm", "not a CT\n  image")) == "a.dcm: not a CT; image"
    assert error_line(MemoryError("out of\n   memory")) == "MemoryError: out of memory"
    assert error_line(MemoryError("out of memory"), with_type=False) == "out of memory"
    # absl/ml_collections put the config file's traceback in their messages: first and last line.
    nested = ValueError("bad config:\nTraceback (most recent call last):\n  File \"c.py\", line 3\n"
                        "KeyError: 'x'")
    assert error_line(nested, with_type=False) == "bad config KeyError: 'x'"
