"""Checkpoints: `load_trained` restores what training saved, picks the best, refuses bad paths,
and never imports TensorFlow."""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cac_jax import checkpoints as ckpt
from cac_jax.models import build_model
from data_pipeline.errors import InputError

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _config(name="unet_heart"):
    spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config("local")


def _write_run(workdir: pathlib.Path, config, steps_metrics):
    """A workdir saved the way cac_jax.train saves it, with perturbed params per step."""
    model = build_model(config)
    # Shapes only (no compilation): random values stand in for trained weights.
    abstract = jax.eval_shape(model.init, jax.random.key(0),
                              jax.ShapeDtypeStruct((1, 3, 32, 32, 1), jnp.float32))
    rng = np.random.default_rng(0)
    variables = jax.tree.map(lambda s: rng.normal(0, 0.1, s.shape).astype(s.dtype), abstract)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / ckpt.CONFIG_FILE).write_text(json.dumps(ckpt.config_to_dict(config)))
    manager = ckpt.make_manager(workdir, config, keep=1)
    saved = {}
    for step, metrics in steps_metrics:
        v = jax.tree.map(lambda x, s=step: np.asarray(x) + s, variables)
        meta = {"step": step, "metrics": metrics or {}, "pixel_spacing_mm":
                {"min": 0.5, "median": 0.7, "max": 0.9}}
        manager.save(step, args=ckpt.save_args(v, {"step": np.asarray(step)}, meta, config),
                     metrics=metrics, force=True)
        saved[step] = v
    manager.wait_until_finished()
    manager.close()
    return saved


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("ckpt") / "run"
    config = _config()
    # Best dice at step 2; steps 3 and 4 later and worse; keep=1 latest plus the best.
    saved = _write_run(workdir, config, [(1, {"val_dice_mean": 0.2}), (2, {"val_dice_mean": 0.9}),
                                         (3, {"val_dice_mean": 0.5}), (4, None)])
    return workdir, config, saved


def _leaves_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_workdir_loads_best_and_keeps_latest_plus_best(run):
    workdir, config, saved = run
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [2, 4]  # step 1 and 3 dropped: neither latest nor best
    trained = ckpt.load_trained(workdir)
    assert trained.step == 2 and trained.path == workdir.absolute() / "checkpoints" / "2"
    assert trained.workdir == workdir.absolute()
    assert trained.task == "heart" and trained.num_classes == 2
    assert trained.metrics == {"val_dice_mean": 0.9}
    assert trained.pixel_spacing_mm == {"min": 0.5, "median": 0.7, "max": 0.9}
    assert trained.neighbour_mm == 3.0
    assert trained.config.model.arch == "unet"
    _leaves_equal(trained.variables, saved[2])
    logits, _ = trained.model.apply(trained.variables, jnp.zeros((1, 3, 32, 32, 1)))
    assert logits.shape == (1, 32, 32, 2)


def test_step_folder_loads_that_step(run):
    workdir, _, saved = run
    trained = ckpt.load_trained(workdir / "checkpoints" / "4")
    assert trained.step == 4 and trained.metrics == {}
    _leaves_equal(trained.variables, saved[4])


def test_latest_when_no_metrics(tmp_path):
    config = _config("unet_matched_calcium")
    _write_run(tmp_path / "run", config, [(5, None), (7, None)])
    trained = ckpt.load_trained(tmp_path / "run")
    assert trained.step == 7 and trained.task == "calcium" and trained.num_classes == 3


def test_bad_paths_raise_input_error_naming_the_path(run, tmp_path):
    workdir, config, _ = run
    cases = {
        tmp_path / "missing": "no such",
        tmp_path: "not a cac-jax training workdir",
        workdir / "checkpoints": "not a cac-jax training workdir",
        workdir / ckpt.CONFIG_FILE: "a file",
    }
    empty = tmp_path / "empty_run"
    (empty / "checkpoints").mkdir(parents=True)
    (empty / ckpt.CONFIG_FILE).write_text(json.dumps(ckpt.config_to_dict(config)))
    cases[empty] = "no complete checkpoint"
    # A write killed half-way: Orbax's temporary folder, and a step folder missing an item.
    tmp_ckpt = tmp_path / "killed" / "checkpoints" / "9.orbax-checkpoint-tmp-123"
    shutil.copytree(workdir / "checkpoints" / "2", tmp_ckpt)
    cases[tmp_ckpt] = "incomplete checkpoint"
    partial = tmp_path / "partial" / "checkpoints" / "2"
    shutil.copytree(workdir / "checkpoints" / "2", partial)
    shutil.rmtree(partial / "variables")
    cases[partial] = "incomplete checkpoint"
    unfinished = tmp_path / "unfinished" / "checkpoints" / "2"
    shutil.copytree(workdir / "checkpoints" / "2", unfinished)
    (unfinished / "_CHECKPOINT_METADATA").unlink()
    cases[unfinished] = "not finalised"
    for path, problem in cases.items():
        with pytest.raises(InputError, match=problem) as err:
            ckpt.load_trained(path)
        assert str(path.absolute().name) in str(err.value)


def test_mismatched_model_is_refused(run, tmp_path):
    workdir, config, _ = run
    bad = tmp_path / "bad" / "checkpoints" / "2"
    shutil.copytree(workdir / "checkpoints" / "2", bad)
    other = _config("unet_calcium")  # a 3-class head against 2-class weights
    (bad / "config" / "metadata").write_text(json.dumps(ckpt.config_to_dict(other)))
    with pytest.raises(InputError, match="does not match") as err:
        ckpt.load_trained(bad)
    # Found from the stored metadata, before any array is read, and named.
    assert "is stored as" in str(err.value) and "the model needs" in str(err.value)
    assert str(bad) in str(err.value)


def test_loading_never_imports_tensorflow(run):
    workdir, _, _ = run
    code = ("import sys; from cac_jax.checkpoints import load_trained; "
            f"t = load_trained({os.fspath(workdir)!r}); "
            "assert t.step == 2; bad = [m for m in sys.modules if m.startswith('tensorflow')]; "
            "assert not bad, bad; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("ok")


def test_loading_logs_no_orbax_warning(run, caplog):
    """A checkpoint this tool wrote loads without Orbax's missing-`_CHECKPOINT_METADATA` warning
    (the Composite save keeps that file at the step level)."""
    import logging

    workdir, _, _ = run
    with caplog.at_level(logging.WARNING):
        ckpt.load_trained(workdir / "checkpoints" / "4")
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
