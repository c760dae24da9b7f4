"""The wheel ships configs/, and an installed copy finds its configs from any working directory
(`--config configs/NAME.py`, the demo, `cac-jax bench`)."""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
import textwrap
import zipfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
SOURCES = ("cac_jax", "data_pipeline", "configs", "pyproject.toml", "README.md")

# Run in the unpacked wheel, from a folder with no configs/ of its own.
INSTALLED_CHECK = textwrap.dedent("""
    import pathlib, sys
    site = pathlib.Path(sys.argv[1]).resolve()
    import cac_jax
    assert pathlib.Path(cac_jax.__file__).resolve().is_relative_to(site), cac_jax.__file__
    from cac_jax import benchmark, demo, main
    from cac_jax.config_defaults import load_config_file
    assert load_config_file("configs/convlstm_calcium.py:local").data.image_size == 64
    for argv in (["--config", "configs/unet_heart.py:local"],
                 ["--config=configs/unet_heart.py:local"]):
        config, _ = main.parse_flags([*argv, "--workdir", "w", "--config.seed=3"])
        assert (config.task, config.data.image_size, config.seed) == ("heart", 64, 3)
    config = benchmark.load_config("convlstm", benchmark.BenchSettings(local=True, size=32))
    assert config.model.arch == "convlstm"
    for name in demo.TRAINED.values():
        path = pathlib.Path(demo._config_path(name)).resolve()
        assert path.is_file() and path.is_relative_to(site), path
    print("ok")
""")


def _build_wheel(tmp_path: pathlib.Path) -> pathlib.Path:
    """The project's wheel, built from a copy of its sources (no stale build/ folder)."""
    source = tmp_path / "source"
    source.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name,
                            ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy(ROOT / name, source / name)
    out = tmp_path / "wheel"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--no-build-isolation", "-w", str(out), str(source)],
                   check=True, capture_output=True, text=True)
    (wheel,) = out.glob("cac_jax-*.whl")
    return wheel


def test_the_wheel_ships_every_config_and_finds_them_outside_a_checkout(tmp_path):
    wheel = _build_wheel(tmp_path)
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        archive.extractall(tmp_path / "site")
    configs = {f"configs/{p.name}" for p in (ROOT / "configs").glob("*.py")}
    assert configs and configs <= names, sorted(configs - names)
    assert {"cac_jax/cli.py", "cac_jax/config_defaults.py", "data_pipeline/io/__init__.py"} <= names

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "site"), JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, "-c", INSTALLED_CHECK, str(tmp_path / "site")],
                          cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "ok"
