"""Every experiment config in configs/ loads (full and "local") and builds its model."""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from script_loader import load_file

from cac_jax.models import build_model, count_params

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / "configs"
# configs/study.py describes a whole study, not one model (tests/test_study.py checks it).
NOT_MODELS = {"__init__", "study"}
CONFIG_FILES = sorted(p for p in CONFIG_DIR.glob("*.py") if p.stem not in NOT_MODELS)
REQUIRED = {"convlstm_calcium", "convlstm_heart", "unet_calcium", "unet_heart",
            "unet_matched_calcium"}


def load_config(path: pathlib.Path, arg: str | None):
    """Import a config file by path (as ml_collections config_flags does) and call get_config."""
    module = load_file(path, f"config_{path.stem}")
    return module, module.get_config(arg)


def abstract_params(config, size: int):
    """Parameter shapes of the config's model for a (1, 3, size, size, 1) input, without compute."""
    model = build_model(config)
    x = jax.ShapeDtypeStruct((1, 3, size, size, 1), jnp.float32)
    return jax.eval_shape(model.init, jax.random.key(0), x)["params"]


def test_the_required_experiments_exist():
    assert REQUIRED <= {p.stem for p in CONFIG_FILES}


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.stem)
def test_docstring_starts_with_the_command(path):
    module, _ = load_config(path, None)
    first_line = module.__doc__.strip().splitlines()[0]
    assert first_line.startswith("`python -m cac_jax.main --config ")
    assert f"configs/{path.name}" in first_line and "--workdir" in first_line


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.stem)
def test_full_config_builds_its_model(path):
    _, config = load_config(path, None)
    task = config.task
    assert task in ("calcium", "heart") and config.model.task == task
    assert config.model.num_classes == {"calcium": 3, "heart": 2}[task]
    assert config.data.task == task and config.data.image_size == 512
    assert path.stem.removeprefix("demo_").startswith(config.model.arch)
    params = abstract_params(config, 32)
    n = count_params(params)
    if config.model.arch == "unet" and config.model.unet.base_width == 64:
        # The literature's UNet: 31.0 M parameters (docs/architecture.md); the head depends on the
        # classes.
        assert abs(n - 31.04e6) < 0.01e6
    assert config.model.get("bn_axis_name") is None or isinstance(config.model.bn_axis_name, str)


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.stem)
def test_local_config_runs_its_model(path):
    _, config = load_config(path, "local")
    size = config.data.image_size
    assert size == 64
    config.model.dtype = "float32"
    model = build_model(config)
    x = jnp.linspace(0.0, 1.0, 3 * size * size).reshape(1, 3, size, size, 1)
    variables = jax.jit(model.init)(jax.random.key(0, impl="rbg"), x)
    logits, _ = jax.jit(model.apply)(variables, x)
    assert logits.shape == (1, size, size, config.model.num_classes)
    assert np.isfinite(np.asarray(logits)).all()


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.stem)
def test_unknown_config_argument_is_rejected(path):
    # "file.py:" passes "" (the full config, like no argument); anything but "local" is an error,
    # so a typo such as "runlocal" cannot silently start a full 512 px run.
    _, config = load_config(path, "")
    assert config.data.image_size == 512
    for arg in ("runlocal", "Local", "full", "local "):
        with pytest.raises(ValueError, match=r"unknown config argument.*None.*''.*'local'"):
            load_config(path, arg)


def test_matched_unet_is_width_matched_and_others_are_smaller():
    configs = {p.stem: load_config(p, None)[1] for p in CONFIG_FILES}
    counts = {name: count_params(abstract_params(cfg, 32)) for name, cfg in configs.items()}
    convlstm, matched, unet = (counts["convlstm_calcium"], counts["unet_matched_calcium"],
                               counts["unet_calcium"])
    assert abs(matched / convlstm - 1.0) < 0.05
    assert convlstm < 0.2 * unet  # the ConvLSTM model has clearly fewer weights than UNet-64


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.stem)
def test_load_config_file_gives_the_files_config(path):
    """`config_defaults.load_config_file` (demo stamps, benchmarks): the file's get_config(arg),
    the argument given apart or as a ":arg" suffix of the path."""
    from cac_jax.config_defaults import load_config_file

    for arg in (None, "local"):
        expected = load_config(path, arg)[1].to_json()
        assert load_config_file(path, arg).to_json() == expected
        assert load_config_file(f"{path}:{arg or ''}").to_json() == expected
    assert load_config_file(path).data.image_size == 512
    assert load_config_file(f"{path}:local").data.image_size == 64


def test_a_configs_path_resolves_from_another_working_directory(tmp_path, monkeypatch):
    """`configs/NAME.py[:arg]` that the working directory lacks is read from the configs/ next to
    the package (the installed copy outside a checkout); a file that exists is used as given."""
    from cac_jax.config_defaults import CONFIG_DIR, load_config_file, resolve_config_path
    from cac_jax.main import parse_flags

    monkeypatch.chdir(tmp_path)
    shipped = CONFIG_DIR / "convlstm_calcium.py"
    assert resolve_config_path("configs/convlstm_calcium.py") == str(shipped)
    assert resolve_config_path("configs/convlstm_calcium.py:local") == f"{shipped}:local"
    assert load_config_file("configs/convlstm_calcium.py:local").data.image_size == 64
    config, workdir = parse_flags(["--config", "configs/convlstm_calcium.py:local",
                                   "--workdir", "w"])
    assert (config.model.arch, config.data.image_size, workdir) == ("convlstm", 64, "w")
    # Unknown names and other folders are left for the loader to report as given.
    assert resolve_config_path("configs/missing.py") == "configs/missing.py"
    assert resolve_config_path("mine/convlstm_calcium.py") == "mine/convlstm_calcium.py"
    # The working directory's own configs/ wins.
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "convlstm_calcium.py").write_text(shipped.read_text())
    assert resolve_config_path("configs/convlstm_calcium.py:local") == \
        "configs/convlstm_calcium.py:local"
