"""Training: the pmapped step (8 devices == 1 device), short runs, exact resume after a kill,
SIGTERM saves, bad input exits 2, and two processes joined by jax.distributed (slow)."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("tensorflow_datasets")

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import script_loader
from test_tfds_builder import write_tiny_cohort  # noqa: E402

from cac_jax import checkpoints as ckpt  # noqa: E402
from cac_jax import main as main_lib  # noqa: E402
from cac_jax import train as train_lib  # noqa: E402
from cac_jax import validation  # noqa: E402
from cac_jax.ops import onednn_conv  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = ("convlstm_calcium", "convlstm_heart", "unet_calcium", "unet_heart")


def load_config(name: str, arg: str | None = "local"):
    return script_loader.load_config(name, arg)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A tiny built dataset (9 patients, 32/64 px scans of 5-7 slices, train/validation/test)."""
    return build_tiny_dataset(tmp_path_factory.mktemp("train_data"))


def build_tiny_dataset(root: pathlib.Path) -> pathlib.Path:
    """The tiny dataset of `data_dir` built under `root`; returns its data_dir."""
    from data_pipeline.tfds_builder import build_dataset

    manifest = write_tiny_cohort(root, patients=9, split_column=True)
    build_dataset(manifest, root / "tfds", name="tiny", progress=False)
    return root / "tfds"


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    """A persistent compilation cache, so re-runs (resume) do not compile the same step again."""
    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")
    before = {name: getattr(jax.config, name) for name in names}
    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax_cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    yield
    for name, value in before.items():
        jax.config.update(name, value)


def tiny_config(name: str, data_dir, **train):
    config = load_config(name)
    config.data.data_dir = str(data_dir)
    config.data.name = "tiny"
    config.train.progress = False
    for key, value in train.items():
        config.train[key] = value
    return config


def rows(workdir) -> list[dict]:
    return [json.loads(line) for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text()
            .splitlines()]


@pytest.mark.slow
def test_pmapped_step_on_8_devices_equals_1_device():
    assert jax.local_device_count() == 8  # tests/conftest.py: 8 virtual CPU devices
    config, model, tx, state, batch = fixed_step_inputs()
    results = [pmapped_step(config, model, tx, state, batch, jax.local_devices()[:n],
                            jax.local_devices()[:n]) for n in (1, 8)]
    (one, m1), (eight, m8) = results
    assert int(one.step) == int(eight.step) == 1
    np.testing.assert_allclose(m1["loss"], m8["loss"], rtol=1e-5)
    np.testing.assert_allclose(m1["grad_norm"], m8["grad_norm"], rtol=1e-4)
    assert_same_update(config, state, one, eight)
    moved = sum(float(np.abs(a - b).sum()) for a, b in
                zip(jax.tree.leaves(one.params), jax.tree.leaves(state.params), strict=True))
    assert moved > 0  # the step changed the parameters


@pytest.mark.slow
def test_short_run_then_kill_and_resume_continues_the_same_sequence(data_dir, tmp_path):
    """8 steps straight vs 4 steps, a kill during the next checkpoint write, and the same command
    with steps=8: identical losses after the resume and identical final parameters."""
    common = dict(log_every=1, eval_every=4, checkpoint_every=2)
    straight = tmp_path / "straight"
    summary = train_lib.train_and_evaluate(tiny_config("unet_heart", data_dir, steps=8, **common),
                                           straight)
    assert summary["steps"] == 8 and (straight / "summary.json").exists()
    assert (straight / "config.json").exists() and list((straight / "tensorboard").iterdir())
    full = rows(straight)
    assert [r["step"] for r in full] == list(range(1, 9))
    for key in ("loss", "learning_rate", "samples_per_s"):
        assert all(np.isfinite(r[key]) for r in full)
    evals = [r for r in full if "val_loss" in r]
    assert [r["step"] for r in evals] == [4, 8]
    assert {"val_dice_heart", "val_kappa", "val_kappa_naive"} <= set(evals[0])
    validated = [p for p in ("cac", "ctac") if f"val_kappa_{p}" in evals[0]]
    assert validated, evals[0]  # per-protocol kappa for the protocols validated
    assert all({f"val_kappa_naive_{p}", f"val_exact_{p}"} <= set(evals[0]) for p in validated)

    resumed = tmp_path / "resumed"
    train_lib.train_and_evaluate(tiny_config("unet_heart", data_dir, steps=4, **common), resumed)
    # A kill while step 6 was being written: Orbax's temporary folder is left behind, and a
    # metrics row logged after the last checkpoint.
    ckpts = resumed / "checkpoints"
    shutil.copytree(ckpts / "4", ckpts / "6.orbax-checkpoint-tmp-1234")
    shutil.rmtree(ckpts / "6.orbax-checkpoint-tmp-1234" / "variables")
    with open(resumed / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 5, "loss": 123.0}) + "\n")
    summary = train_lib.train_and_evaluate(tiny_config("unet_heart", data_dir, steps=8, **common),
                                           resumed)
    assert summary["resumed_from"] == 4 and summary["steps_this_run"] == 4
    again = rows(resumed)
    assert [r["step"] for r in again] == list(range(1, 9))
    np.testing.assert_allclose([r["loss"] for r in again], [r["loss"] for r in full], rtol=1e-5)
    np.testing.assert_allclose([r["val_loss"] for r in again if "val_loss" in r],
                               [r["val_loss"] for r in evals], rtol=1e-5)
    a, b = ckpt.load_trained(straight / "checkpoints" / "8"), ckpt.load_trained(
        resumed / "checkpoints" / "8")
    for x, y in zip(jax.tree.leaves(a.variables), jax.tree.leaves(b.variables), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-7)
    # The config travels with the run; another config refuses to resume and names the keys.
    with pytest.raises(train_lib.ConfigError, match="train.learning_rate"):
        train_lib.train_and_evaluate(
            tiny_config("unet_heart", data_dir, steps=10, learning_rate=0.5, **common), resumed)


@pytest.mark.slow
@pytest.mark.skipif(not onednn_conv.available(), reason="oneDNN extension not built")
def test_a_run_through_onednn_resumes_identically_and_may_switch_library(data_dir, tmp_path):
    """docs/onednn.md: 4 steps straight with conv_impl="onednn" equal 2 steps and a resume to 4;
    a run resumes under another conv_impl (the same maths)."""
    def config(steps, impl="onednn"):
        c = tiny_config("unet_heart", data_dir, steps=steps, log_every=1, eval_every=4,
                        checkpoint_every=2)
        c.model.conv_impl = impl
        return c

    train_lib.train_and_evaluate(config(4), tmp_path / "straight")
    train_lib.train_and_evaluate(config(2), tmp_path / "resumed")
    summary = train_lib.train_and_evaluate(config(4), tmp_path / "resumed")
    assert summary["resumed_from"] == 2
    losses = [[r["loss"] for r in rows(tmp_path / run)] for run in ("straight", "resumed")]
    assert len(losses[0]) == 4
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-5)  # as the XLA resume test
    a, b = (ckpt.load_trained(tmp_path / run / "checkpoints" / "4")
            for run in ("straight", "resumed"))
    for x, y in zip(jax.tree.leaves(a.variables), jax.tree.leaves(b.variables), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-7)
    saved = json.loads(json.dumps(ckpt.config_to_dict(config(4))))
    assert train_lib.config_differences(saved, config(4, "xla")) == []


def test_anneal_factor_reaches_zero_at_the_budget():
    config = load_config("unet_heart")
    config.train.steps = 100
    assert train_lib.anneal_factor(config, 90) == 1.0           # off by default
    config.train.anneal_fraction = 0.5
    assert [train_lib.anneal_factor(config, s) for s in (0, 50, 75, 100)] == [1.0, 1.0, 0.5, 0.0]
    # A time box that ends the run first anneals by its elapsed fraction.
    assert train_lib.anneal_factor(config, 10, time_fraction=0.9) == pytest.approx(0.2)
    assert train_lib.anneal_factor(config, 90, time_fraction=0.1) == pytest.approx(0.2)
    for bad in (1.5, -0.1):
        config.train.anneal_fraction = bad
        with pytest.raises(train_lib.ConfigError, match="anneal_fraction"):
            train_lib.check_config(config)


def test_a_run_saved_before_a_key_was_added_still_resumes():
    config = load_config("unet_heart")
    saved = json.loads(json.dumps(ckpt.config_to_dict(config)))
    del saved["train"]["anneal_fraction"]
    assert train_lib.config_differences(saved, config) == []
    config.train.anneal_fraction = 0.5
    assert train_lib.config_differences(saved, config) == [
        "train.anneal_fraction (0.0 -> 0.5)"]


def test_annealed_run_steps_and_logs_the_falling_rate(data_dir, tmp_path, monkeypatch):
    sent = []
    device_scale = train_lib._device_scale
    monkeypatch.setattr(train_lib, "_device_scale",
                        lambda scale, devices: sent.append(scale) or device_scale(scale, devices))
    config = tiny_config("unet_heart", data_dir, steps=4, log_every=1, eval_every=4,
                         checkpoint_every=4, anneal_fraction=1.0)
    train_lib.train_and_evaluate(config, tmp_path / "anneal")
    lr = float(config.train.learning_rate)
    # Step k runs at the rate set from the progress before it, (k - 1) / 4: the factor sent to
    # the devices, and the rate logged in row k.
    assert sent[:4] == pytest.approx([1.0, 0.75, 0.5, 0.25])
    assert [r["learning_rate"] for r in rows(tmp_path / "anneal")] == pytest.approx(
        [lr, 0.75 * lr, 0.5 * lr, 0.25 * lr])


def _cli(argv, capsys):
    from cac_jax.cli import main

    code = main(["train", *argv])
    return code, capsys.readouterr().err


def test_bad_input_is_one_line_and_exit_2(data_dir, tmp_path, capsys):
    cfg = str(ROOT / "configs" / "unet_heart.py") + ":local"
    base = ["--config", cfg, "--workdir", str(tmp_path / "w"), f"--config.data.data_dir={data_dir}",
            "--config.data.name=tiny", "--config.train.progress=False"]
    cases = [
        (["--config", cfg, "--workdir", str(tmp_path / "w"),
          f"--config.data.data_dir={tmp_path / 'nowhere'}"], "no dataset here"),
        ([*base, "--config.train.no_such_key=1"], "no_such_key"),
        ([*base, "--config.train.batch_size=12"], "not divisible by the 8 devices"),
        ([*base, "--config.data.task=calcium"], "differs from config.task"),
        ([*base, "--config.model.num_classes=3"], "does not fit"),
        (["--config", str(tmp_path / "missing.py"), "--workdir", str(tmp_path / "w")], "missing"),
        (["--workdir", str(tmp_path / "w")], "--config is required"),
    ]
    for argv, message in cases:
        code, err = _cli(argv, capsys)
        assert code == 2, (argv, err)
        assert message in err, (argv, err)
        assert err.startswith("cac-jax train: error:") and err.count("\n") == 1, err


def test_help_lists_usage(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main_lib.main(["--help"])
    assert exit_info.value.code == 0
    assert "--workdir" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.parametrize("name", CONFIGS)
def test_each_config_trains_and_the_loss_decreases(name, data_dir, tmp_path):
    config = tiny_config(name, data_dir, steps=40, log_every=5, eval_every=20,
                         checkpoint_every=20)
    summary = train_lib.train_and_evaluate(config, tmp_path / name)
    losses = [r["loss"] for r in rows(tmp_path / name) if "loss" in r]
    assert len(losses) == 8 and all(np.isfinite(losses))
    assert np.mean(losses[-2:]) < 0.8 * np.mean(losses[:2]), losses
    assert summary["best_step"] in (20, 40)
    trained = ckpt.load_trained(tmp_path / name)
    assert trained.task == config.task and trained.step == summary["best_step"]


def test_the_host_runs_at_most_two_steps_ahead(data_dir, tmp_path, monkeypatch):
    """Dispatch is asynchronous; after dispatching step n the loop waits for step n - 2, so a
    SIGTERM's checkpoint waits for at most two steps, not for a log row's worth."""
    waited = []
    real = jax.block_until_ready

    def spy(x):
        if isinstance(x, dict) and "loss" in x:  # the step's metrics
            waited.append(x)
        return real(x)

    monkeypatch.setattr(train_lib.jax, "block_until_ready", spy)
    config = tiny_config("unet_heart", data_dir, steps=6, log_every=100, eval_every=100,
                         checkpoint_every=100)
    train_lib.train_and_evaluate(config, tmp_path / "run")
    assert train_lib.MAX_STEPS_IN_FLIGHT == 2
    assert len(waited) == 6 - train_lib.MAX_STEPS_IN_FLIGHT
    assert [r["step"] for r in rows(tmp_path / "run") if "loss" in r] == [6]


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits(data_dir, tmp_path):
    workdir = tmp_path / "term"
    argv = [sys.executable, "-m", "cac_jax.main", "--config",
            str(ROOT / "configs" / "unet_heart.py") + ":local", "--workdir", str(workdir),
            f"--config.data.data_dir={data_dir}", "--config.data.name=tiny",
            "--config.train.steps=100000", "--config.train.log_every=1",
            "--config.train.eval_every=100000", "--config.train.checkpoint_every=100000",
            "--config.train.progress=False"]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 400
    while time.time() < deadline and not (workdir / "metrics.jsonl").exists():
        time.sleep(1)
    time.sleep(2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err[-2000:]
    steps = [int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()]
    assert len(steps) == 1 and steps[0] >= 1
    assert json.loads((workdir / "summary.json").read_text())["preempted"] is True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fixed_step_inputs():
    """(config, model, tx, state, global batch of 8) for comparing one pmapped step."""
    config = load_config("unet_heart")
    config.train.aux_loss_weight = 0.0
    model = train_lib.model_for_training(config)
    tx = train_lib.make_optimizer(config)
    state = train_lib.init_state(config, model, tx, (1, 3, 32, 32, 1))
    rng = np.random.default_rng(1)
    batch = {"image": rng.uniform(0, 1, (8, 3, 32, 32, 1)).astype(np.float32),
             "label": (rng.uniform(size=(8, 32, 32)) < 0.3).astype(np.int32),
             "weight": np.ones((8, 32, 32), np.float32)}
    batch["weight"][5:, :, 20:] = 0.0  # uneven weights per device: global normalisation matters
    return config, model, tx, state, batch


def assert_same_update(config, before, a, b):
    """Two states after one step agree: Adam's moments (the summed gradients) tightly; weights
    within the rate (Adam's first update is lr * g / (|g| + eps), about lr * sign(g), so
    summation-order noise in a near-zero gradient can move that one weight by up to ~lr)."""
    lr = float(config.train.learning_rate)
    for x, y in zip(jax.tree.leaves(a.opt_state), jax.tree.leaves(b.opt_state), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-9)
    close, total = 0, 0
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params), strict=True):
        np.testing.assert_allclose(x, y, rtol=0, atol=2 * lr)
        close += int(np.sum(np.abs(np.asarray(x) - np.asarray(y)) <= 0.02 * lr))
        total += np.size(x)
    assert close >= 0.999 * total, (close, total)


def pmapped_step(config, model, tx, state, batch, devices, pmap_devices):
    """One train_step over `devices` (this process's) on `batch` (this process's rows)."""
    p_step = jax.pmap(lambda s, b, lr: train_lib.train_step(s, b, lr, model=model, tx=tx,
                                                            config=config),
                      axis_name=train_lib.AXIS, devices=pmap_devices)
    n = len(devices)
    sharded = {k: v.reshape(n, v.shape[0] // n, *v.shape[1:]) for k, v in batch.items()}
    new_state, metrics = p_step(train_lib._replicate(state, devices), sharded,
                                train_lib._replicate(jnp.asarray(1.0, jnp.float32), devices))
    return train_lib._unreplicate(new_state), train_lib._unreplicate(metrics)


MULTI_HOST_SCRIPT = """
import sys
import jax
import numpy as np
sys.path.insert(0, {tests!r})
from cac_jax import train
from test_train import fixed_step_inputs, pmapped_step, tiny_config
config = tiny_config("unet_heart", {data!r}, steps=4, log_every=1, eval_every=4,
                     checkpoint_every=4)
d = config.train.distributed
d.mode, d.coordinator_address = "explicit", "127.0.0.1:{port}"
d.num_processes, d.process_id = 2, {pid}
train._setup_distributed(config)
assert jax.device_count() == 8 and jax.local_device_count() == 4
# 64-bit values (the hashed patient IDs validation pairs scans by) cross hosts whole.
from cac_jax import distributed as dist
keys = dist.allgather(np.asarray([[2**62 + 7 + {pid}, 3]], np.int64))
assert keys.dtype == np.int64 and [int(v) for v in keys[:, 0, 0]] == [2**62 + 7, 2**62 + 8], keys
# One step on a fixed global batch of 8: this process feeds its 4 rows.
cfg, model, tx, state, batch = fixed_step_inputs()
rows = slice(4 * {pid}, 4 * {pid} + 4)
new_state, metrics = pmapped_step(cfg, model, tx, state, {{k: v[rows] for k, v in batch.items()}},
                                  jax.local_devices(), None)
np.savez({out!r} + "/step{pid}.npz", loss=metrics["loss"],
         *jax.tree.leaves(new_state.params))
# The loop: a few steps, each host on its own shard of the training scans.
summary = train.train_and_evaluate(config, {out!r} + "/multi")
print("DONE", summary["steps"], jax.process_count(), summary["devices"])
"""


@pytest.mark.slow
def test_two_processes_match_one_process_with_8_devices(data_dir, tmp_path):
    """Two processes with 4 virtual CPU devices each, joined by jax.distributed on loopback
    (gloo): one step on a fixed global batch equals one process's 8-device step, and the loop
    trains with both hosts feeding their own shards."""
    port = _free_port()
    procs = []
    for pid in range(2):
        code = MULTI_HOST_SCRIPT.format(tests=str(ROOT / "tests"), data=str(data_dir), port=port,
                                        pid=pid, out=str(tmp_path))
        env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
               "JAX_PLATFORMS": "cpu"}
        procs.append(subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = [p.communicate(timeout=1500) for p in procs]
    for p, (out, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err[-3000:]
        assert "DONE 4 2 8" in out
    config, model, tx, state, batch = fixed_step_inputs()
    single, metrics = pmapped_step(config, model, tx, state, batch, jax.local_devices(),
                                   jax.local_devices())
    lr = float(config.train.learning_rate)
    for pid in range(2):
        saved = np.load(tmp_path / f"step{pid}.npz")
        np.testing.assert_allclose(saved["loss"], metrics["loss"], rtol=1e-5)
        leaves = [saved[f"arr_{i}"] for i in range(len(saved.files) - 1)]
        close = total = 0
        for a, b in zip(leaves, jax.tree.leaves(single.params), strict=True):
            np.testing.assert_allclose(a, b, rtol=0, atol=2 * lr)  # see assert_same_update
            close += int(np.sum(np.abs(a - np.asarray(b)) <= 0.02 * lr))
            total += a.size
        assert close >= 0.999 * total, (close, total)
    run = rows(tmp_path / "multi")
    assert [r["step"] for r in run] == [1, 2, 3, 4] and all(np.isfinite(r["loss"]) for r in run)
    trained = ckpt.load_trained(tmp_path / "multi")
    assert trained.step == 4


def test_non_candidate_pixels_weighted_down_for_calcium_only():
    """Pixels of the centre slice below 130 HU get `non_candidate_weight` (calcium task); the
    neighbours' values and the heart task leave the pipeline's weight as it is."""
    config = load_config("convlstm_calcium")
    config.train.non_candidate_weight = 0.1
    low, high = -800.0, 1200.0
    hu = np.full((1, 3, 2, 2), -100.0, np.float32)
    hu[0, 1, 0, 0] = 130.0   # a candidate (HU >= 130) in the centre slice
    hu[0, 1, 0, 1] = 129.0   # just below
    hu[0, 0, 1, 1] = 900.0   # bright only in a neighbour slice: not a candidate
    images = jnp.asarray(((hu - low) / (high - low))[..., None])
    weight = jnp.asarray([[[1.0, 1.0], [0.0, 1.0]]])  # one padding pixel stays 0
    got = np.asarray(train_lib.loss_weight(config, images, weight))
    np.testing.assert_allclose(got, [[[1.0, 0.1], [0.0, 0.1]]], rtol=1e-6)
    heart = load_config("convlstm_heart")
    heart.train.non_candidate_weight = 0.1
    np.testing.assert_array_equal(np.asarray(train_lib.loss_weight(heart, images, weight)),
                                  np.asarray(weight))


def test_validating_the_heart_slab_gives_the_same_categories(tmp_path):
    """`data.eval_slices="heart"` runs the calcium model on the slices near the reference heart
    only: every validation category (and so the best checkpoint) equals the full pass's."""
    from data_pipeline.tfds_builder import build_dataset

    manifest = write_tiny_cohort(tmp_path, patients=9, split_column=True,
                                 heart_slices=slice(2, 3))
    build_dataset(manifest, tmp_path / "tfds", name="tiny", progress=False)
    metrics = {}
    for mode in ("all", "heart"):
        config = tiny_config("unet_calcium", tmp_path / "tfds", steps=2, log_every=1,
                             eval_every=2, checkpoint_every=2)
        config.data.eval_slices = mode
        train_lib.train_and_evaluate(config, tmp_path / mode)
        metrics[mode] = [r for r in rows(tmp_path / mode) if "val_kappa" in r][-1]
    same = [k for k in metrics["all"] if k.startswith(("val_kappa", "val_exact", "val_scans"))]
    assert {"val_kappa_cac", "val_kappa_paired"} <= set(same) and metrics["all"]["val_scans"] > 0
    # Every metric reported is one the config check accepts for ranking and stopping.
    from cac_jax.validation import metric_names

    reported = {k for k in metrics["all"] if k.startswith("val_")}
    assert reported <= set(metric_names("calcium")), reported - set(metric_names("calcium"))
    assert {k: metrics["heart"][k] for k in same} == {k: metrics["all"][k] for k in same}
    # The loss is another set of pixels' (fewer slices): it differs.
    assert metrics["heart"]["val_loss"] != metrics["all"]["val_loss"]
    # benchmarks/bench_validation.py times the two passes on a trained model and checks the same.
    bench = script_loader.load_benchmark("bench_validation")
    out = tmp_path / "bench"
    assert bench.main(["--checkpoint", str(tmp_path / "heart"), "--data-dir",
                       str(tmp_path / "tfds"), "--rounds", "1", "--out", str(out)]) == 0
    result = json.loads((out / "bench_validation.json").read_text())
    assert result["categories_equal"] is True
    assert 0 < result["slices"]["heart"] < result["slices"]["all"]
    assert result["metrics"]["all"]["val_kappa_cac"] == metrics["all"]["val_kappa_cac"]
    assert "| heart |" in (out / "bench_validation.md").read_text()


def test_eval_slices_heart_is_refused_for_the_heart_task():
    config = load_config("unet_heart")
    config.data.eval_slices = "heart"
    with pytest.raises(train_lib.ConfigError, match="eval_slices"):
        train_lib.check_config(config)
    config.data.eval_slices = "lungs"
    with pytest.raises(train_lib.ConfigError, match="eval_slices"):
        train_lib.check_config(config)


def test_scan_categories_per_protocol():
    """Each validated scan lands in its own protocol's confusion matrices (reference row,
    predicted column); a protocol with no scan keeps zeros, so every host sums the same arrays."""
    from data_pipeline.input_pipeline import ScanInfo

    config = load_config("convlstm_calcium")
    shape, spacing = (2, 16, 16), (3.0, 1.0, 1.0)
    hu = np.zeros(shape, np.int16)
    hu[1, 4:8, 4:8] = 450  # 16 mm^2 at weight 4, z 3 mm: Agatston 64 (category 1)
    heart = np.ones(shape, bool)
    coronary = np.zeros(shape, np.uint8)
    coronary[1, 4:8, 4:8] = 1
    nothing = np.zeros(shape, np.uint8)
    collector = validation._ScanCollector([
        ScanInfo("a_cac", "a", "cac", "s", shape, spacing, 64.0, 1, 1),
        ScanInfo("b_ctac", "b", "ctac", "s", shape, spacing, 0.0, 0, 0),
        ScanInfo("c_cac", "c", "cac", "s", shape, spacing, 0.0, 0, 0),
        ScanInfo("a_ctac", "a", "ctac", "s", shape, spacing, 0.0, 0, 0),
    ])
    # Right for a; a false call for b; nothing called for c (whose 450 HU the threshold counts);
    # nothing called on a's CTAC, whose own truth shows nothing (its gated scan is category 1).
    collector.pred = [coronary, coronary, nothing, nothing]
    collector.hu = [hu, hu, hu, hu]
    collector.true = [coronary, nothing, nothing, nothing]
    matrices = validation.scan_categories(
        config, collector, {"a_cac": heart, "b_ctac": heart, "c_cac": heart, "a_ctac": heart})
    assert set(matrices) == {"cac", "ctac", validation.CTAC_VS_GATED}

    def matrix(*cells):
        m = np.zeros((4, 4), np.int64)
        for row, column in cells:
            m[row, column] += 1
        return m

    model_cac, naive_cac = matrices["cac"]
    np.testing.assert_array_equal(model_cac, matrix((1, 1), (0, 0)))
    np.testing.assert_array_equal(naive_cac, matrix((1, 1), (0, 1)))
    model_ctac, naive_ctac = matrices["ctac"]
    np.testing.assert_array_equal(model_ctac, matrix((0, 1), (0, 0)))
    np.testing.assert_array_equal(naive_ctac, matrix((0, 1), (0, 1)))
    # The paper's design: only a's CTAC has a gated partner; its row is a's gated category.
    model_paired, naive_paired = matrices[validation.CTAC_VS_GATED]
    np.testing.assert_array_equal(model_paired, matrix((1, 0)))
    np.testing.assert_array_equal(naive_paired, matrix((1, 1)))
    # A cache kept across passes (training keeps one per run) holds each scan's model-free
    # scoring; later passes with other predictions score exactly as without it.
    masks = {"a_cac": heart, "b_ctac": heart, "c_cac": heart, "a_ctac": heart}
    cache = {}
    first = validation.scan_categories(config, collector, masks, cache)
    assert set(cache) == set(masks)
    for key in matrices:
        np.testing.assert_array_equal(first[key][0], matrices[key][0])
    collector.pred = [nothing, coronary, coronary, coronary]
    cached = validation.scan_categories(config, collector, masks, cache)
    fresh = validation.scan_categories(config, collector, masks)
    for key in fresh:
        for got, want in zip(cached[key], fresh[key], strict=True):
            np.testing.assert_array_equal(got, want)
    assert not np.array_equal(cached["cac"][0], matrices["cac"][0])  # the new calls count


def test_a_ctac_scan_pairs_with_its_gated_scan_validated_on_another_host(monkeypatch):
    """The paper's CTAC design pairs across hosts: with validation sharded so that patient a's
    gated scan is on another host, a's CTAC scan is still scored against a's gated reference (the
    all-gather answers for the other host)."""
    from cac_jax import distributed as dist
    from data_pipeline.input_pipeline import ScanInfo

    config = load_config("convlstm_calcium")
    shape, spacing = (2, 16, 16), (3.0, 1.0, 1.0)
    hu = np.zeros(shape, np.int16)
    nothing = np.zeros(shape, np.uint8)
    collector = validation._ScanCollector([
        ScanInfo("a_ctac", "a", "ctac", "s", shape, spacing, 0.0, 0, 0),
        ScanInfo("b_ctac", "b", "ctac", "s", shape, spacing, 0.0, 0, 0)])
    collector.pred, collector.hu, collector.true = [nothing] * 2, [hu] * 2, [nothing] * 2
    masks = {"a_ctac": np.ones(shape, bool), "b_ctac": np.ones(shape, bool)}
    # The other host holds a's gated scan, category 3; nobody holds b's.
    other = np.asarray([[validation._patient_key("a"), 3]], np.int64)

    def allgather(value):  # this host's value, then the other host's
        value = np.asarray(value)
        return np.stack([value, np.asarray(len(other)) if value.ndim == 0 else other])

    monkeypatch.setattr(dist, "allgather", allgather)
    paired = validation.scan_categories(config, collector, masks)[validation.CTAC_VS_GATED][0]
    expected = np.zeros((4, 4), np.int64)
    expected[3, 0] = 1  # a's CTAC, nothing called, against a's gated category 3; b unpaired
    np.testing.assert_array_equal(paired, expected)


@pytest.fixture(scope="module")
def exported_heart(data_dir, tmp_path_factory):
    """A tiny heart UNet trained 2 steps and exported (parameters and config only)."""
    tmp = tmp_path_factory.mktemp("init_from")
    common = dict(log_every=1, eval_every=2, checkpoint_every=2)
    train_lib.train_and_evaluate(tiny_config("unet_heart", data_dir, steps=2, **common),
                                 tmp / "source")
    ckpt.export_parameters(tmp / "source", tmp / "exported")
    return tmp / "exported"


def test_init_from_starts_from_a_trained_models_parameters(data_dir, exported_heart, tmp_path,
                                                           capsys):
    """`train.init_from` (docs/training.md, "Fine-tuning"): a run started from an exported model
    begins at step 0 with that model's parameters (a near-zero rate leaves them there) and records
    where they came from; a model of another config or task is one line, exit 2."""
    exported = exported_heart
    tuned = tmp_path / "tuned"
    summary = train_lib.train_and_evaluate(
        tiny_config("unet_heart", data_dir, steps=2, learning_rate=1e-12, init_from=str(exported),
                    log_every=1, eval_every=2, checkpoint_every=2), tuned)
    assert summary["resumed_from"] is None and summary["steps_this_run"] == 2
    assert summary["initialised_from"]["step"] == 2
    assert summary["initialised_from"]["path"] == str(exported)
    start, end = ckpt.load_trained(exported), ckpt.load_trained(tuned / "checkpoints" / "2")
    for a, b in zip(jax.tree.leaves(start.variables["params"]),
                    jax.tree.leaves(end.variables["params"]), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-8)
    # (The source moved its parameters ~1e-3 from the seeded initialisation in two steps, so
    # the tolerance above tells the two apart.)
    # The starting model was validated first and saved as step 0, a candidate for the best.
    evals = [r["step"] for r in rows(tuned) if "val_loss" in r]
    assert evals == [0, 2]
    for a, b in zip(jax.tree.leaves(start.variables["params"]), jax.tree.leaves(
            ckpt.load_trained(tuned / "checkpoints" / "0").variables["params"]), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    cfg = str(ROOT / "configs" / "unet_heart.py") + ":local"
    base = ["--config", cfg, f"--config.data.data_dir={data_dir}", "--config.data.name=tiny",
            "--config.train.progress=False", f"--config.train.init_from={exported}"]
    cases = [
        ([*base, "--workdir", str(tmp_path / "w1"), "--config.model.unet.base_width=4"],
         "in the checkpoint, this training's model needs"),
        (["--config", str(ROOT / "configs" / "unet_calcium.py") + ":local",
          *base[2:], "--workdir", str(tmp_path / "w2")], "a heart model cannot start a calcium"),
        ([*base[:-1], f"--config.train.init_from={tmp_path / 'nowhere'}",
          "--workdir", str(tmp_path / "w3")], "no such checkpoint"),
        ([*base[:-1], "--config.train.init_from=gs://bucket/model",
          "--workdir", str(tmp_path / "w4")], "must be a folder on this machine"),
        # A workdir holding checkpoints of another config refuses, naming the differing keys.
        ([*base, "--workdir", str(tuned), "--config.model.unet.base_width=4"],
         "workdir holds a run of a different config; differing keys: model.unet.base_width"),
    ]
    for argv, message in cases:
        code, err = _cli(argv, capsys)
        assert code == 2, (argv, err)
        assert message in err, (argv, err)
        assert err.startswith("cac-jax train: error:") and err.count("\n") == 1, err


@pytest.mark.slow
def test_init_from_record_survives_a_resume_and_a_refused_start(data_dir, exported_heart,
                                                                 tmp_path, capsys):
    """The run's own checkpoint wins over init_from on a resume, which keeps the record; a
    start refused before its first checkpoint leaves its workdir usable by another config."""
    common = dict(learning_rate=1e-12, init_from=str(exported_heart), log_every=1, eval_every=2,
                  checkpoint_every=2)
    tuned = tmp_path / "tuned"
    train_lib.train_and_evaluate(tiny_config("unet_heart", data_dir, steps=2, **common), tuned)
    resumed = train_lib.train_and_evaluate(
        tiny_config("unet_heart", data_dir, steps=4, **common), tuned)
    assert resumed["resumed_from"] == 2 and resumed["initialised_from"]["step"] == 2

    cfg = str(ROOT / "configs" / "unet_heart.py") + ":local"
    base = ["--config", cfg, f"--config.data.data_dir={data_dir}", "--config.data.name=tiny",
            "--config.train.progress=False", f"--config.train.init_from={exported_heart}",
            "--workdir", str(tmp_path / "w")]
    code, err = _cli([*base, "--config.model.unet.base_width=4"], capsys)
    assert code == 2 and "this training's model needs" in err, err
    code, err = _cli([*base, "--config.train.steps=1"], capsys)
    assert code == 0, err


def test_shared_slices_batch_holds_each_distinct_slice_once():
    """A batch of windows goes to the devices as its distinct slices (found by content) and
    the windows as indices into them; too many distinct slices keep the windows."""
    from cac_jax.validation import shared_slices_batch

    rng = np.random.default_rng(0)
    volume = rng.uniform(size=(9, 4, 4, 1)).astype(np.float32)
    centres = np.array([[0, 1, 2, 3], [5, 6, 7, 8]])  # two devices, edges repeated at 0 and 8
    windows_z = np.clip(centres[..., None] + np.array([-1, 0, 1]), 0, 8)
    images = volume[windows_z]  # (2, 4, 3, 4, 4, 1)
    slices, windows = shared_slices_batch(images)
    assert slices.shape == (2, 6, 4, 4, 1) and windows.shape == (2, 4, 3)  # 5 distinct -> 4 + 2
    for d in range(2):
        np.testing.assert_array_equal(slices[d][windows[d]], images[d])
    assert not slices[0, 5].any()  # the padding slot
    distinct = rng.uniform(size=(1, 4, 3, 4, 4, 1)).astype(np.float32)  # 12 distinct slices
    assert shared_slices_batch(distinct) is None


def test_validation_on_shared_slices_equals_the_windows(tmp_path, monkeypatch):
    """A ConvLSTM's validation batches run as their distinct slices: every metric equals the
    pass on the windows (benchmarks/bench_validation.py's heart_windows mode)."""
    from cac_jax import validation as validation_lib
    from data_pipeline.tfds_builder import build_dataset

    manifest = write_tiny_cohort(tmp_path, patients=9, split_column=True,
                                 heart_slices=slice(2, 5))
    build_dataset(manifest, tmp_path / "tfds", name="tiny", progress=False)
    config = tiny_config("convlstm_calcium", tmp_path / "tfds", steps=2, log_every=1,
                         eval_every=2, checkpoint_every=2)
    train_lib.train_and_evaluate(config, tmp_path / "run")
    packed = []
    real = validation_lib.shared_slices_batch

    def spy(images, *args):
        result = real(images, *args)
        packed.append(result is not None)
        return result

    monkeypatch.setattr(validation_lib, "shared_slices_batch", spy)
    bench = script_loader.load_benchmark("bench_validation")
    out = tmp_path / "bench"
    assert bench.main(["--checkpoint", str(tmp_path / "run"), "--data-dir", str(tmp_path / "tfds"),
                       "--rounds", "1", "--out", str(out)]) == 0
    result = json.loads((out / "bench_validation.json").read_text())
    assert result["shared_slices"] is True and any(packed)
    shared, windows = result["metrics"]["heart"], result["metrics"]["heart_windows"]
    assert set(shared) == set(windows)
    for key, value in windows.items():
        np.testing.assert_allclose(shared[key], value, rtol=1e-5, err_msg=key)
