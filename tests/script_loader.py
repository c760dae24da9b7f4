"""Imports the project's scripts by path for the tests: benchmarks/*.py, configs/*.py and
docs/*.py are scripts, not packages."""

from __future__ import annotations

import importlib.util
import pathlib
import sys
from types import ModuleType

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_file(path: pathlib.Path, name: str | None = None) -> ModuleType:
    """The module of the Python file `path`, imported once per name and kept in sys.modules
    (dataclasses look their module up while the file executes)."""
    name = name or path.stem
    if name in sys.modules and getattr(sys.modules[name], "__file__", None) == str(path):
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def load_benchmark(name: str) -> ModuleType:
    """`benchmarks/<name>.py`."""
    return load_file(ROOT / "benchmarks" / f"{name}.py")


def load_config(name: str, arg: str | None = "local"):
    """`configs/<name>.py`'s get_config(arg), as ml_collections' config_flags imports it."""
    return load_file(ROOT / "configs" / f"{name}.py", f"config_{name}").get_config(arg)
