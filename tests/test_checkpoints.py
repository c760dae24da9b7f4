"""Checkpoints: `load_trained` restores what training saved, picks the best, refuses bad paths,
and never imports TensorFlow."""

from __future__ import annotations

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
from script_loader import load_config

from cac_jax import checkpoints as ckpt
from cac_jax.models import build_model
from data_pipeline.errors import InputError

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _config(name="unet_heart"):
    return load_config(name, "local")


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


def _damage(kind: str, step: pathlib.Path) -> None:
    variables = step / "variables"
    data = max((p for p in variables.rglob("*") if p.is_file() and p.parent.name == "d"),
               key=lambda p: p.stat().st_size)
    if kind == "truncated":
        data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    elif kind == "missing":
        data.unlink()
    elif kind == "manifest":
        (variables / "manifest.ocdbt").write_bytes(b"garbage")
    elif kind == "step_metadata":
        (step / "_CHECKPOINT_METADATA").write_text("{garbage")


@pytest.mark.parametrize("kind", ["truncated", "missing", "manifest", "step_metadata"])
def test_corrupt_checkpoint_is_one_line_at_infer(run, tmp_path, kind):
    """A damaged checkpoint: `cac-jax infer` says so in one line (exit 2), not Orbax's
    tracebacks of its failed concurrent reads."""
    workdir, _, _ = run
    damaged = tmp_path / "damaged"
    shutil.copytree(workdir, damaged)
    _damage(kind, damaged / "checkpoints" / "2")
    out = subprocess.run(
        [sys.executable, "-m", "cac_jax.cli", "infer", "--heart-checkpoint", str(damaged),
         "--calcium-checkpoint", str(workdir), "--input", str(tmp_path / "x.nii.gz"),
         "--out", str(tmp_path / "out")], capture_output=True, text=True, cwd=ROOT,
        env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}, timeout=300)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1, out.stderr[-3000:]
    assert "corrupt checkpoint" in lines[0] and str(damaged / "checkpoints" / "2") in lines[0]


def _write_with_digest(workdir: pathlib.Path, config, variables, digest_of) -> None:
    workdir.mkdir()
    (workdir / ckpt.CONFIG_FILE).write_text(json.dumps(ckpt.config_to_dict(config)))
    manager = ckpt.make_manager(workdir, config, keep=1)
    meta = {"step": 1, "metrics": {}, ckpt.DIGEST_KEY: ckpt.variables_digest(digest_of)}
    manager.save(1, args=ckpt.save_args(variables, {"step": np.asarray(1)}, meta, config),
                 force=True)
    manager.wait_until_finished()
    manager.close()


def test_parameters_that_changed_on_disk_are_caught_by_their_checksum(tmp_path):
    # A storage fault can change bytes inside an array file so that the checkpoint still
    # restores, with other values: only the digest saved with it (save_training writes it) can
    # tell. Stored values that differ from those the digest was taken of stand for that here;
    # bytes flipped in a data file, as a fault flips them, are refused either way.
    config = _config()
    model = build_model(config)
    abstract = jax.eval_shape(model.init, jax.random.key(0),
                              jax.ShapeDtypeStruct((1, 3, 32, 32, 1), jnp.float32))
    rng = np.random.default_rng(1)
    variables = jax.tree.map(lambda s: rng.normal(0, 0.1, s.shape).astype(s.dtype), abstract)
    _write_with_digest(tmp_path / "good", config, variables, variables)
    _leaves_equal(ckpt.load_trained(tmp_path / "good").variables, variables)
    changed = jax.tree.map(lambda x: x * 1.0001, variables)
    _write_with_digest(tmp_path / "changed", config, changed, variables)
    with pytest.raises(InputError, match=r"variables: the parameters do not match the checksum "
                                         r"saved with them \(variables_sha256\): the "
                                         r"checkpoint is corrupt"):
        ckpt.load_trained(tmp_path / "changed")
    data = max((p for p in (tmp_path / "good" / "checkpoints" / "1" / "variables").rglob("*")
                if p.is_file() and p.parent.name == "d"), key=lambda p: p.stat().st_size)
    raw = bytearray(data.read_bytes())
    middle = len(raw) // 2
    raw[middle:middle + 400] = bytes(b ^ 0x5A for b in raw[middle:middle + 400])
    data.write_bytes(bytes(raw))
    with pytest.raises(InputError, match="corrupt"):
        ckpt.load_trained(tmp_path / "good")


def test_loading_logs_no_orbax_warnings(run, caplog):
    """A checkpoint the tool wrote loads without Orbax's warning about a missing
    `_CHECKPOINT_METADATA` (it is read at the step level, not in the item folder)."""
    import logging

    workdir, _, _ = run
    with caplog.at_level(logging.INFO, logger="absl"):
        ckpt.load_trained(workdir)
        ckpt.load_trained(workdir / "checkpoints" / "4")
    noisy = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert noisy == []


def test_training_heart_volumes_are_read_where_recorded(run, tmp_path):
    """`heart_volume_ml` of the meta (the training hearts' range) reaches inference's bound."""
    from cac_jax.inference import DEFAULT_MIN_HEART_ML, min_heart_bound

    workdir, _, _ = run
    assert ckpt.load_trained(workdir).heart_volume_ml == {}
    assert min_heart_bound(ckpt.load_trained(workdir)) == DEFAULT_MIN_HEART_ML
    recorded = tmp_path / "recorded"
    shutil.copytree(workdir, recorded)
    meta_file = recorded / "checkpoints" / "2" / "meta" / "metadata"
    meta = json.loads(meta_file.read_text())
    meta["heart_volume_ml"] = {"min": 320.0, "median": 480.0, "max": 700.0}
    meta_file.write_text(json.dumps(meta))
    trained = ckpt.load_trained(recorded)
    assert trained.heart_volume_ml["min"] == 320.0 and min_heart_bound(trained) == 80.0


def test_export_keeps_the_best_step_without_optimizer_state(run, tmp_path, capsys):
    from cac_jax import cli

    workdir, _, saved = run
    out = tmp_path / "exported"
    assert cli.main(["export", str(workdir), str(out)]) == 0
    assert "exported step 2" in capsys.readouterr().out
    step = out / "checkpoints" / "2"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["2"]
    assert not (step / "train_state").exists() and (step / "variables").is_dir()
    trained = ckpt.load_trained(out)
    assert trained.step == 2 and trained.metrics == {"val_dice_mean": 0.9}
    assert trained.pixel_spacing_mm == {"min": 0.5, "median": 0.7, "max": 0.9}
    _leaves_equal(trained.variables, saved[2])
    assert json.loads((out / "config.json").read_text())["task"] == "heart"
    # A second export to the same folder is refused (one line, exit 2), --overwrite replaces it.
    assert cli.main(["export", str(workdir / "checkpoints" / "4"), str(out)]) == 2
    err = capsys.readouterr().err
    assert str(out) in err and "already exists" in err and len(err.strip().splitlines()) == 1
    assert ckpt.load_trained(out).step == 2
    assert cli.main(["export", str(workdir / "checkpoints" / "4"), str(out), "--overwrite"]) == 0
    assert ckpt.load_trained(out).step == 4
    assert not list(tmp_path.glob(".exported.export-*"))


def test_export_that_cannot_write_is_one_line(run, tmp_path, capsys):
    from cac_jax import cli

    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    assert cli.main(["export", str(run[0]), str(blocker / "m")]) == 2
    err = capsys.readouterr().err
    assert "cannot write the exported model" in err and len(err.strip().splitlines()) == 1
    assert blocker.read_text() == "not a folder"
