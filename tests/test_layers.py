"""Package layers: `data_pipeline` never imports `cac_jax` (import-linter contracts in pyproject.toml).

The contract is checked on the real tree, and on a copy of it with one deliberately added upward
import, which must break it: a contract that cannot fail would guard nothing.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _lint_imports(cwd: Path) -> subprocess.CompletedProcess:
    """Runs `lint-imports` (config: cwd/pyproject.toml) on the packages found first on cwd."""
    env = dict(os.environ, PYTHONPATH=os.fspath(cwd))
    code = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
    return subprocess.run([sys.executable, "-c", code, "--no-cache"], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def _copy_tree(tmp_path: Path) -> Path:
    for package in ("cac_jax", "data_pipeline"):
        shutil.copytree(ROOT / package, tmp_path / package,
                        ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def test_repository_keeps_the_layer_contracts():
    result = _lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"Contracts: [1-9]\d* kept, 0 broken", result.stdout), result.stdout[-2000:]


def test_upward_import_breaks_the_layers_contract(tmp_path):
    tree = _copy_tree(tmp_path)
    assert _lint_imports(tree).returncode == 0  # the untouched copy passes
    labels = tree / "data_pipeline" / "labels.py"
    # A lazy import inside a function counts as much as a top-level one.
    labels.write_text(labels.read_text() + "\n\ndef _upward():\n"
                      "    from cac_jax.scoring import agatston_score\n\n"
                      "    return agatston_score\n")
    result = _lint_imports(tree)
    assert result.returncode != 0
    assert "BROKEN" in result.stdout
    assert "data_pipeline.labels -> cac_jax.scoring" in result.stdout


def test_tensorflow_import_in_scoring_breaks_the_forbidden_contract(tmp_path):
    tree = _copy_tree(tmp_path)
    agatston = tree / "data_pipeline" / "agatston.py"
    agatston.write_text(agatston.read_text() + "\n\ndef _heavy():\n"
                        "    import tensorflow\n\n    return tensorflow\n")
    result = _lint_imports(tree)
    assert result.returncode != 0
    assert "data_pipeline.agatston -> tensorflow" in result.stdout
