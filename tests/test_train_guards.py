"""Training's guards (docs/cluster.md): bad rates and config keys refused, diverged runs stop
unsaved, validation that cannot rank refused, the plateau on an infinite loss, the logging window,
TensorBoard on resume, resume from the last intact checkpoint, file-system faults as one line,
and the multi-host agreements (with a monkeypatched all-gather)."""

from __future__ import annotations

import errno
import json
import math
import os
import pathlib
import shutil
import sys

import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("tensorflow_datasets")

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from test_train import (  # noqa: E402
    build_tiny_dataset,
    compilation_cache,  # noqa: F401 (the module's persistent compilation cache)
    load_config,
    rows,
    tiny_config,
)

from cac_jax import distributed as dist  # noqa: E402
from cac_jax import main as main_lib  # noqa: E402
from cac_jax import train as train_lib  # noqa: E402
from cac_jax import train_support as support  # noqa: E402
from data_pipeline.errors import InputError  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return build_tiny_dataset(tmp_path_factory.mktemp("guards_data"))


@pytest.mark.parametrize("rate", [math.nan, math.inf, -1.0, 0.0])
def test_non_finite_or_non_positive_learning_rate_refused(rate):
    config = load_config("unet_heart")
    config.train.learning_rate = rate
    with pytest.raises(train_lib.ConfigError, match="learning_rate"):
        train_lib.check_config(config)


@pytest.mark.parametrize("key, name", [("best_metric", "val_kappa_pairs"),
                                       ("best_metric", ""),
                                       ("early_stop_metric", "val_los"),
                                       ("best_metric", "val_dice_heart")])
def test_a_metric_validation_never_reports_is_refused(key, name):
    """A misspelt ranking or stopping metric would rank every checkpoint last: refused, naming
    the key (val_dice_heart is a heart model's, not a calcium model's)."""
    config = load_config("convlstm_calcium")
    config.train[key] = name
    with pytest.raises(train_lib.ConfigError, match=f"config.train.{key}="):
        train_lib.check_config(config)


@pytest.mark.parametrize("config_name, key, name", [
    ("convlstm_calcium", "best_metric", "val_kappa_paired"),
    ("convlstm_calcium", "early_stop_metric", "val_loss"),
    ("convlstm_calcium", "best_metric", "val_kappa_ctac_vs_gated"),
    ("unet_heart", "best_metric", "val_dice_heart"),
    ("unet_heart", "early_stop_metric", "")])
def test_every_metric_validation_reports_is_accepted(config_name, key, name):
    config = load_config(config_name)
    config.train[key] = name
    train_lib.check_config(config)


def test_unknown_config_key_is_one_line_with_its_path_and_a_suggestion():
    cfg = str(ROOT / "configs" / "unet_heart.py") + ":local"
    cases = {"--config.train.stepz=3": "unknown config key train.stepz; did you mean train.steps?",
             "--config.trian.steps=3": "unknown config key trian.steps; did you mean train?",
             "--config.train.steps.x=1": "train.steps is a value, not a group"}
    for arg, message in cases.items():
        with pytest.raises(InputError) as info:
            main_lib.parse_flags(["--config", cfg, "--workdir", "/tmp/unused", arg])
        assert message in str(info.value) and "\n" not in str(info.value)


def test_loss_weight_uses_the_pipelines_candidate_mask():
    """The candidate mask (stored HU >= 130, before augmentation) wins over the augmented image."""
    config = load_config("convlstm_calcium")
    config.train.non_candidate_weight = 0.1
    images = jnp.full((1, 3, 1, 2, 1), 0.9)  # both pixels look bright after augmentation
    candidate = jnp.asarray([[[True, False]]])
    got = train_lib.loss_weight(config, images, jnp.ones((1, 1, 2)), candidate)
    np.testing.assert_allclose(np.asarray(got), [[[1.0, 0.1]]])


def test_validation_that_cannot_rank_is_refused():
    calcium = load_config("convlstm_calcium")
    with pytest.raises(support.ValidationError, match="no scans"):
        support.check_validation(calcium, [], {}, 0, 0, "d")
    with pytest.raises(support.ValidationError, match="heart mask.*best_metric=val_loss"):
        support.check_validation(calcium, ["s"], {}, 3, 0, "d")
    support.check_validation(calcium, ["s"], {"s": 1}, 3, 1, "d")
    calcium.train.best_metric = "val_loss"  # the defined fallback metric
    support.check_validation(calcium, ["s"], {}, 3, 0, "d")


def test_calcium_run_without_validation_heart_masks_refused_at_start(data_dir, tmp_path,
                                                                     monkeypatch):
    monkeypatch.setattr(train_lib, "_reference_heart_masks", lambda *a: {})
    config = tiny_config("unet_calcium", data_dir, steps=2)
    with pytest.raises(support.ValidationError, match="val_kappa"):
        train_lib.train_and_evaluate(config, tmp_path / "w")
    assert not (tmp_path / "w" / "checkpoints").exists() or not any(
        p.name.isdigit() for p in (tmp_path / "w" / "checkpoints").iterdir())


@pytest.mark.slow
def test_diverged_run_stops_with_one_line_and_saves_nothing(data_dir, tmp_path, capsys):
    workdir = tmp_path / "diverged"
    argv = ["train", "--config", str(ROOT / "configs" / "unet_heart.py") + ":local",
            "--workdir", str(workdir), f"--config.data.data_dir={data_dir}",
            "--config.data.name=tiny", "--config.train.progress=False",
            "--config.train.steps=4", "--config.train.log_every=4", "--config.train.eval_every=2",
            "--config.train.checkpoint_every=2", "--config.train.learning_rate=1e30",
            "--config.train.grad_clip_norm=0"]
    from cac_jax.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "training loss is nan" in err or "training loss is inf" in err, err
    assert err.count("\n") == 1, err
    saved = [p for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()]
    assert saved == []


@pytest.mark.slow
def test_window_mean_loss_and_no_plateau_cut_on_infinite_loss(data_dir, tmp_path, monkeypatch):
    """Rows log the mean loss of their window (log_every=2 vs every step); an evaluation whose
    loss is infinite leaves the rate alone (patience 1 would otherwise halve it each time);
    summary.json records the device counts."""
    monkeypatch.setattr(train_lib, "evaluate",
                        lambda *a, **k: {"val_loss": math.inf, "val_dice_mean": 0.5})
    common = dict(steps=4, eval_every=1, checkpoint_every=4, plateau_patience=1)
    summary = train_lib.train_and_evaluate(
        tiny_config("unet_heart", data_dir, log_every=1, **common), tmp_path / "every")
    train_lib.train_and_evaluate(tiny_config("unet_heart", data_dir, log_every=2, **common),
                                 tmp_path / "window")
    every = [r["loss"] for r in rows(tmp_path / "every") if "loss" in r]
    window = [r["loss"] for r in rows(tmp_path / "window") if "loss" in r]
    assert len(every) == 4 and len(window) == 2
    np.testing.assert_allclose(window, [np.mean(every[:2]), np.mean(every[2:])], rtol=1e-5)
    lr = load_config("unet_heart").train.learning_rate
    rates = [r["learning_rate_next"] for r in rows(tmp_path / "every") if "learning_rate_next" in r]
    assert rates == pytest.approx([lr] * 4)
    # summary.json records the device counts.
    saved = json.loads((tmp_path / "every" / "summary.json").read_text())
    for key, value in (("devices", 8), ("local_devices", 8), ("host_devices", 8),
                       ("hosts", 1), ("processes", 1), ("platform", "cpu")):
        assert summary[key] == saved[key] == value


def _events(folder: pathlib.Path) -> list[int]:
    import tensorflow as tf
    from tensorflow.core.util import event_pb2

    steps = []
    for path in sorted(folder.glob("events.out.tfevents.*")):
        for record in tf.data.TFRecordDataset(str(path)):
            event = event_pb2.Event.FromString(bytes(record.numpy()))
            if event.summary.value:
                steps.append(event.step)
    return steps


def test_tensorboard_events_after_the_resumed_checkpoint_are_not_duplicated(tmp_path):
    writer = train_lib._Writer(tmp_path, 0, enabled=True)
    for step in range(1, 6):
        writer.write({"step": step, "loss": float(step)})
    writer.close()
    writer = train_lib._Writer(tmp_path, 3, enabled=True)  # resumed from the step-3 checkpoint
    for step in (4, 5):
        writer.write({"step": step, "loss": float(step)})
    writer.close()
    assert sorted(_events(tmp_path / "tensorboard")) == [1, 2, 3, 4, 5]
    assert [r["step"] for r in rows(tmp_path)] == [1, 2, 3, 4, 5]


def _corrupt(step_dir: pathlib.Path) -> None:
    for path in (step_dir / "variables").rglob("*"):
        if path.is_file() and path.stat().st_size > 0:
            path.write_bytes(b"\0garbage")


@pytest.mark.slow
def test_resume_falls_back_to_the_last_intact_checkpoint(data_dir, tmp_path, capsys):
    common = dict(log_every=2, eval_every=4, checkpoint_every=2, keep_checkpoints=3)
    workdir = tmp_path / "w"
    train_lib.train_and_evaluate(tiny_config("unet_heart", data_dir, steps=4, **common), workdir)
    _corrupt(workdir / "checkpoints" / "4")
    summary = train_lib.train_and_evaluate(
        tiny_config("unet_heart", data_dir, steps=6, **common), workdir)
    assert summary["resumed_from"] == 2 and summary["steps"] == 6
    assert "resuming from step 2: newer checkpoint(s) do not restore" in capsys.readouterr().out
    assert (workdir / "checkpoints.damaged" / "4").is_dir()
    for step in ("2", "4", "6"):
        if (workdir / "checkpoints" / step).exists():
            _corrupt(workdir / "checkpoints" / step)
    with pytest.raises(InputError, match="no intact checkpoint to resume from") as info:
        train_lib.train_and_evaluate(tiny_config("unet_heart", data_dir, steps=8, **common),
                                     workdir)
    assert "\n" not in str(info.value)


def test_workdir_faults_are_one_line(data_dir, tmp_path, monkeypatch):
    config = tiny_config("unet_heart", data_dir, steps=2)
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(InputError, match="is a file"):
        train_lib.train_and_evaluate(config, afile)
    with pytest.raises(InputError, match="under a file"):
        train_lib.train_and_evaluate(config, afile / "run")

    import tempfile

    def read_only(*args, **kwargs):  # as the OS says it: naming the probe file it could not make
        raise PermissionError(errno.EROFS, "Read-only file system",
                              os.path.join(kwargs.get("dir"), ".write-test-x1y2z3"))

    monkeypatch.setattr(tempfile, "NamedTemporaryFile", read_only)
    with pytest.raises(InputError, match="Read-only file system") as info:
        train_lib.train_and_evaluate(config, tmp_path / "ro")
    assert str(info.value).startswith(f"{tmp_path / 'ro'}: cannot write the run")
    assert ".write-test" not in str(info.value)


def test_a_second_run_into_a_live_runs_workdir_is_refused(data_dir, tmp_path):
    # Two runs in one workdir would interleave their checkpoints and metrics: the second is
    # refused in one line naming the first (its lock), before it writes anything.
    from cac_jax.results import OutputLock

    config = tiny_config("unet_heart", data_dir, steps=2)
    workdir = tmp_path / "run"
    workdir.mkdir()
    held = OutputLock(workdir, name=".cac-jax-train.lock").acquire()
    try:
        with pytest.raises(InputError, match=r"another cac-jax train is writing into this folder "
                                             rf"\(pid {os.getpid()} .*choose another --workdir"):
            train_lib.train_and_evaluate(config, workdir)
    finally:
        held.release()
    assert sorted(p.name for p in workdir.iterdir()) == []


def test_disk_full_while_saving_is_one_line(data_dir, tmp_path, monkeypatch):
    """Not enough free space for a checkpoint is found before Orbax starts writing."""
    config = tiny_config("unet_heart", data_dir, steps=2, log_every=1, eval_every=2,
                         checkpoint_every=1)
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(support.shutil, "disk_usage",
                        lambda path: usage._replace(free=4096))
    with pytest.raises(InputError, match="no space left on the device for the step-1 "
                                         "checkpoint") as info:
        train_lib.train_and_evaluate(config, tmp_path / "w0")
    assert str(tmp_path / "w0" / "checkpoints") in str(info.value)


@pytest.mark.slow
def test_disk_filling_during_a_save_is_one_line(data_dir, tmp_path, monkeypatch):
    """The disk fills while Orbax writes: its wrapped error's cause, as one line."""
    from cac_jax import checkpoints as ckpt

    def full(*args, **kwargs):
        try:
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "w" / "x"))
        except OSError as err:
            raise ValueError("save failed in a background thread") from err

    def tensorstore_full(*args, **kwargs):  # what a full disk under Orbax's array writer says
        raise ValueError(f'RESOURCE_EXHAUSTED: Error writing "kernel/0.0" in OCDBT database at '
                         f'local file "{tmp_path}/w2/checkpoints/1.orbax-checkpoint-tmp/": '
                         'Failed to write 1289538 bytes to file 18: No space left on device '
                         "[os_error_code='28']")

    config = tiny_config("unet_heart", data_dir, steps=2, log_every=1, eval_every=2,
                         checkpoint_every=1)
    for fake, workdir in ((full, tmp_path / "w"), (tensorstore_full, tmp_path / "w2")):
        monkeypatch.setattr(ckpt, "save_args", fake)
        with pytest.raises(InputError, match="No space left on device") as info:
            train_lib.train_and_evaluate(config, workdir)
        assert str(workdir) in str(info.value) and "\n" not in str(info.value)


def test_missing_tfrecord_is_one_line(data_dir, tmp_path):
    copy = tmp_path / "tfds"
    shutil.copytree(data_dir, copy)
    record = sorted(copy.rglob("*.tfrecord*"))[0]
    record.unlink()
    with pytest.raises(InputError, match="missing") as info:
        train_lib.train_and_evaluate(tiny_config("unet_heart", copy, steps=2), tmp_path / "w")
    assert record.name in str(info.value)


# ----------------------------------------------------------------------------------------------
# Multi-host agreement (the all-gather monkeypatched to what other hosts would answer)


def test_hosts_must_resume_from_the_same_step(monkeypatch):
    monkeypatch.setattr(dist, "allgather", lambda value: np.stack([np.asarray(value),
                                                                   np.asarray(6)]))
    with pytest.raises(dist.ClusterError, match="process 0: 8, process 1: 6"):
        dist.agree_on_step(8, "/w/checkpoints")
    dist.agree_on_step(6, "/w/checkpoints")
    monkeypatch.setattr(dist, "allgather", lambda value: np.stack([np.asarray(value),
                                                                   np.asarray(-1)]))
    with pytest.raises(dist.ClusterError, match="process 1: none"):
        dist.agree_on_step(8, "/w/checkpoints")


def test_device_counts_and_a_host_with_idle_accelerators(monkeypatch):
    import jax

    counts = dist.device_counts(jax.local_devices())
    assert counts["global_devices"] == counts["local_devices"] == counts["host_devices"] == 8
    # One process per node under SLURM: JAX gives it GPU SLURM_LOCALID only.
    gpu = {**counts, "platform": "gpu", "host_devices": 1}
    monkeypatch.setenv("SLURM_GPUS_ON_NODE", "8")
    with pytest.raises(dist.ClusterError, match="has 8 GPUs but the run's processes here use 1"):
        dist.check_host_accelerators(gpu)
    dist.check_host_accelerators({**gpu, "host_devices": 8})
    dist.check_host_accelerators(gpu, num_devices_setting=1)  # a deliberate subset
    monkeypatch.delenv("SLURM_GPUS_ON_NODE")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    assert dist.host_accelerators("gpu") == 2
    assert dist.host_accelerators("cpu") is None


def test_tpu_vm_pod_detected_without_gke_variables(monkeypatch):
    monkeypatch.delenv("SLURM_NTASKS", raising=False)
    monkeypatch.delenv("TPU_WORKER_HOSTNAMES", raising=False)
    monkeypatch.setattr(dist, "_on_tpu_vm", lambda: True)
    monkeypatch.setattr(dist, "_jax_cluster_processes", lambda: 4)
    assert dist.needs_initialize()
    monkeypatch.setattr(dist, "_jax_cluster_processes", lambda: 1)  # a single-host TPU VM
    assert not dist.needs_initialize()


# ----------------------------------------------------------------------------------------------
# Cloud storage paths (a fake gs:// backend for etils.epath, mapped onto a local folder)


class _FakeGcs:
    """etils.epath's backend for gs:// URLs, storing `gs://B/K` at `root/B/K` (no network)."""

    def __init__(self, root: pathlib.Path):
        from etils.epath import backend

        self.root, self.os = root, backend.os_backend

    def _local(self, path) -> str:
        text = str(path)
        assert text.startswith("gs://"), text
        return str(self.root / text[len("gs://"):])

    def _url(self, local: str) -> str:
        return "gs://" + str(pathlib.Path(local).relative_to(self.root))

    def __getattr__(self, name):
        def call(path, *args, **kwargs):
            args = [self._local(a) if str(a).startswith("gs://") else a for a in args]
            result = getattr(self.os, name)(self._local(path), *args, **kwargs)
            return [self._url(r) for r in result] if name == "glob" else result
        return call


@pytest.fixture
def fake_gcs(tmp_path, monkeypatch):
    from etils.epath import gpath

    bucket_root = tmp_path / "bucket_store"
    bucket_root.mkdir()
    backends = dict(gpath._PREFIX_TO_BACKEND)
    backends["gs"] = _FakeGcs(bucket_root)
    monkeypatch.setattr(gpath, "_PREFIX_TO_BACKEND", backends)
    monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)
    monkeypatch.chdir(tmp_path)  # a local "gs:" folder would appear here
    return bucket_root


def test_gs_urls_stay_urls_for_data_dir_and_workdir(data_dir, tmp_path, fake_gcs, monkeypatch):
    """A gs:// data_dir is looked up as the URL (the error names it); a gs:// workdir gets its
    config there and its checkpoints under it; nothing is written to a local `gs:` folder."""
    from cac_jax import checkpoints as ckpt

    config = tiny_config("unet_heart", data_dir, steps=1)
    config.data.data_dir = "gs://bucket/data"
    with pytest.raises(InputError, match=r"gs://bucket/data/tiny/\S+: no dataset here"):
        train_lib.train_and_evaluate(config, "gs://bucket/runs/r")

    managers = []

    class Stop(Exception):
        pass

    def manager(workdir, config, **kwargs):
        import orbax.checkpoint as ocp

        def record(directory, **kw):
            managers.append(str(directory))
            raise Stop  # Orbax's array writes would go to Cloud Storage itself

        monkeypatch.setattr(ocp, "CheckpointManager", record)
        return make_manager(workdir, config, **kwargs)

    make_manager = ckpt.make_manager
    monkeypatch.setattr(ckpt, "make_manager", manager)
    with pytest.raises(Stop):
        train_lib.train_and_evaluate(tiny_config("unet_heart", data_dir, steps=1),
                                     "gs://bucket/runs/r")
    assert managers == ["gs://bucket/runs/r/checkpoints"]
    saved = json.loads((fake_gcs / "bucket" / "runs" / "r" / "config.json").read_text())
    assert saved["task"] == "heart"
    assert not (tmp_path / "gs:").exists()


@pytest.mark.slow
def test_sigterm_during_evaluation_saves_and_the_resumed_run_evaluates_first(data_dir, tmp_path,
                                                                             monkeypatch):
    """SIGTERM arriving in validation at step 2 (log_every 4: no logging step yet) stops the run
    there: the checkpoint is saved, the evaluation abandoned, and the resumed run evaluates step 2
    before it trains on."""
    import os
    import signal

    evaluate = train_lib.evaluate
    sent = []

    def evaluate_with_sigterm(*args, **kwargs):
        if not sent:
            sent.append(True)
            os.kill(os.getpid(), signal.SIGTERM)
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(train_lib, "evaluate", evaluate_with_sigterm)
    common = dict(log_every=4, eval_every=2, checkpoint_every=4)
    workdir = tmp_path / "w"
    summary = train_lib.train_and_evaluate(tiny_config("unet_heart", data_dir, steps=4, **common),
                                           workdir)
    assert summary["preempted"] and summary["steps"] == 2
    assert [p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()] == ["2"]
    # The evaluation was abandoned: no validation row (no training row either before step 4).
    assert not (workdir / "metrics.jsonl").exists() or not [
        r for r in rows(workdir) if "val_loss" in r]
    summary = train_lib.train_and_evaluate(tiny_config("unet_heart", data_dir, steps=4, **common),
                                           workdir)
    assert summary["resumed_from"] == 2 and summary["steps"] == 4 and not summary["preempted"]
    assert [r["step"] for r in rows(workdir) if "val_loss" in r] == [2, 4]


@pytest.mark.parametrize("mode, values, delta, stop_after, best", [
    # Any gain resets the patience without a min delta: the slow creep never stops.
    ("max", [0.90, 0.901, 0.902, 0.903, 0.904, 0.905], 0.0, None, 0.905),
    # With a min delta of 0.01 the creep counts as no gain: stops after 3, the best still 0.905.
    ("max", [0.90, 0.901, 0.902, 0.903, 0.904, 0.905], 0.01, 4, 0.905),
    # A real gain resets it.
    ("max", [0.5, 0.505, 0.6, 0.601, 0.602, 0.603], 0.01, 6, 0.603),
    # Lower is better (val_loss); a NaN evaluation counts as no gain.
    ("min", [1.0, 0.5, float("nan"), 0.499, 0.498], 0.01, 5, 0.498),
])
def test_early_stopping_min_delta(mode, values, delta, stop_after, best):
    import ml_collections

    from cac_jax import train

    config = ml_collections.ConfigDict({"train": {"early_stop_patience": 3,
                                                  "early_stop_min_delta": delta}})
    run = _loop_decisions(config, mode, mode)
    stopped = None
    for i, value in enumerate(values, start=1):
        train._Run._track_best(run, i, value, value)
        if run.host.stopped_early and stopped is None:
            stopped = i
    assert stopped == stop_after
    assert run.host.best_value == best and run.host.best_step == values.index(best) + 1


def _loop_decisions(config, best_mode: str, stop_mode: str):
    """The loop's best-checkpoint and early-stopping bookkeeping without a model."""
    import functools
    import types

    from cac_jax import train

    run = types.SimpleNamespace(host=train._HostState(plateau=None), config=config,
                                best_mode=best_mode, stop_mode=stop_mode)
    run._count_patience = functools.partial(train._Run._count_patience, run)
    return run


def test_early_stopping_on_the_loss_while_the_best_checkpoint_follows_the_kappa():
    import ml_collections

    from cac_jax import train

    config = ml_collections.ConfigDict({"train": {"early_stop_patience": 3,
                                                  "early_stop_metric": "val_loss",
                                                  "best_metric": "val_kappa"}})
    assert train.stop_options(config) == ("val_loss", "min")
    config.train.early_stop_metric = ""
    assert train.stop_options(config) == ("val_kappa", "max")
    # A kappa that peaks early and swings, a loss that keeps falling and then converges.
    kappas = [0.6, 0.3, 0.4, 0.5, 0.55, 0.7, 0.65, 0.6, 0.62]
    losses = [0.010, 0.008, 0.007, 0.006, 0.0055, 0.005, 0.0051, 0.0052, 0.0050]
    on_kappa = _loop_decisions(config, "max", "max")
    on_loss = _loop_decisions(config, "max", "min")
    stops = {}
    for name, run, stop in (("kappa", on_kappa, kappas), ("loss", on_loss, losses)):
        for i, (kappa, value) in enumerate(zip(kappas, stop, strict=True), start=1):
            train._Run._track_best(run, i, kappa, value)
            if run.host.stopped_early:
                stops[name] = i
                break
    # On the kappa the run ends at the fourth evaluation, before its best; on the loss it goes on
    # until the loss has not improved three times, and its best checkpoint is the best kappa.
    assert stops == {"kappa": 4, "loss": 9}
    assert (on_loss.host.best_value, on_loss.host.best_step) == (0.7, 6)
    assert on_kappa.host.best_step == 1


def test_a_checkpoint_from_before_the_min_delta_resumes_its_patience_from_the_best():
    import optax

    from cac_jax import train

    template = optax.contrib.reduce_on_plateau().init(None)
    host = train._HostState(plateau=template, best_value=0.8, best_step=5, evals_since_best=2,
                            patience_value=0.79)
    saved = host.to_json()
    assert train._HostState.from_json(saved, template).patience_value == 0.79
    del saved["patience_value"]  # meta written before the key existed
    old = train._HostState.from_json(saved, template)
    assert (old.patience_value, old.evals_since_best) == (0.8, 2)


def test_a_run_stopped_early_continues_under_a_laxer_stop_rule(data_dir, tmp_path, monkeypatch):
    common = dict(log_every=2, eval_every=2, checkpoint_every=2, early_stop_patience=1)
    workdir = tmp_path / "w"
    # No gain can beat a min delta of 100: the second evaluation ends the run.
    strict = tiny_config("unet_heart", data_dir, steps=8, early_stop_min_delta=100.0, **common)
    summary = train_lib.train_and_evaluate(strict, workdir)
    assert summary["stopped_early"] and summary["steps"] == 4
    finished = (workdir / "summary.json").read_text()
    # The same rule again: the run stays stopped, and keeps its summary (times, last metrics).
    summary = train_lib.train_and_evaluate(strict, workdir)
    assert summary["stopped_early"] and summary["steps"] == 4 and summary["steps_this_run"] == 0
    assert (workdir / "summary.json").read_text() == finished
    # Without the min delta and with no patience limit it continues from its last checkpoint.
    lax = tiny_config("unet_heart", data_dir, steps=8, early_stop_min_delta=0.0,
                      **{**common, "early_stop_patience": 0})
    # While it trains, the stopped run's summary is gone: a run killed now must not read as
    # finished (the study reuses finished runs).
    summary_while_saving = []
    save = train_lib.ckpt_lib.save_training

    def watched_save(*args, **kwargs):
        summary_while_saving.append((workdir / "summary.json").exists())
        return save(*args, **kwargs)

    monkeypatch.setattr(train_lib.ckpt_lib, "save_training", watched_save)
    summary = train_lib.train_and_evaluate(lax, workdir)
    assert summary_while_saving == [False, False]
    assert summary["resumed_from"] == 4 and summary["steps"] == 8
    assert not summary["stopped_early"]
    assert [r["step"] for r in rows(workdir) if "val_loss" in r] == [2, 4, 6, 8]
    assert json.loads((workdir / "config.json").read_text())["train"]["early_stop_patience"] == 0


def test_allgather_keeps_64_bit_values(monkeypatch):
    """Between hosts the gather runs on JAX arrays, 32-bit without x64 mode: 8-byte values (the
    hashed patient IDs that pair CTAC with gated scans, int64 counts, float64) come back whole."""
    import jax
    import jax.numpy as jnp
    from jax.experimental import multihost_utils

    def two_hosts(x):  # what process_allgather does with x64 off: through a JAX array
        here = np.asarray(jnp.asarray(x))
        return np.stack([here, here + 1 if here.dtype.kind in "iu" else here])

    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(multihost_utils, "process_allgather", two_hosts)
    key = np.asarray([[2**62 + 2**33 + 7, 3]], np.int64)
    got = dist.allgather(key)
    assert got.dtype == np.int64 and got.shape == (2, 1, 2)
    np.testing.assert_array_equal(got[0], key)
    assert int(dist.allgather(np.asarray(2**40, np.int64))[0]) == 2**40
    np.testing.assert_array_equal(dist.allgather(np.asarray([0.1, 1e300]))[0], [0.1, 1e300])
    assert dist.allgather(np.zeros((0, 2), np.int64)).shape == (2, 0, 2)
    assert dist.allgather(np.asarray([5], np.int32)).tolist() == [[5], [6]]


def _wrong_digest(step_dir: pathlib.Path, key: str) -> None:
    """Stands for bytes changed inside an array file: the saved checksum no longer matches."""
    meta = step_dir / "meta" / "metadata"
    data = json.loads(meta.read_text())
    assert data[key]
    data[key] = "0" * 64
    meta.write_text(json.dumps(data))


def test_a_damaged_optimizer_state_is_caught_and_set_aside_again(data_dir, tmp_path, capfd,
                                                                  caplog):
    # The optimizer state has a checksum too (damaged, it resumed into NaN losses blamed on the
    # learning rate); a step whose number was set aside before (damaged, then saved anew) is set
    # aside under another name.
    common = dict(log_every=2, eval_every=100, checkpoint_every=2, keep_checkpoints=3)
    workdir = tmp_path / "w"
    train_lib.train_and_evaluate(tiny_config("unet_heart", data_dir, steps=4, **common), workdir)
    # Step 2 was saved between evaluations: no metrics, as designed, and no notice about it.
    assert not [r for r in caplog.records if "did not provide metrics" in r.getMessage()]
    _wrong_digest(workdir / "checkpoints" / "4", "train_state_sha256")
    (workdir / "checkpoints.damaged" / "4").mkdir(parents=True)  # set aside by an earlier run
    capfd.readouterr()
    summary = train_lib.train_and_evaluate(
        tiny_config("unet_heart", data_dir, steps=6, **common), workdir)
    assert summary["resumed_from"] == 2 and summary["steps"] == 6
    captured = capfd.readouterr()
    assert captured.out.count("newer checkpoint(s) do not restore") == 1
    assert str(workdir / "checkpoints" / "4") in captured.out
    assert "the optimizer state" in captured.out and "Traceback" not in captured.err
    assert sorted(p.name for p in (workdir / "checkpoints.damaged").iterdir()) == ["4", "4.2"]
    assert (workdir / "checkpoints.damaged" / "4.2" / "train_state").is_dir()


def test_checkpoint_count_patience_device_count_and_dataset_path_rules():
    config = load_config("unet_heart")
    for key, value, message in (("keep_checkpoints", 0, "keep_checkpoints must be >= 1"),
                                ("keep_checkpoints", -1, "keep_checkpoints must be >= 1"),
                                ("early_stop_patience", -1, "early_stop_patience must be >= 0")):
        bad = load_config("unet_heart")
        bad.train[key] = value
        with pytest.raises(InputError, match=message):
            train_lib.check_config(bad)
    train_lib.check_config(config)
    from cac_jax.checkpoints import config_to_dict

    saved = config_to_dict(config)
    saved["data"]["per_device_batch"] = 4  # the run was made on twice as many devices
    saved["data"]["data_dir"] = "tfds"
    now = load_config("unet_heart")
    with now.unlocked():
        now.data.per_device_batch = 8
    now.data.data_dir = os.path.abspath("tfds")
    assert train_lib.config_differences(saved, now) == []
    now.data.data_dir = os.path.abspath("other")
    assert [d.split()[0] for d in train_lib.config_differences(saved, now)] == ["data.data_dir"]
