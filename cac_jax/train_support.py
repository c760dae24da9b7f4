"""Guards of the training loop (docs/cluster.md "Faults"): what it refuses at start, how it resumes
from the last intact checkpoint, the logging window, and TensorBoard events on resume.

- `check_workdir(workdir)`: a workdir that is a file, or one that cannot be written, is refused
  with one line before any compilation;
- `check_validation(config, scans, heart_masks)`: a run whose validation cannot give its
  best-metric (no validation scans; a kappa metric with no reference heart mask) is refused;
- `restore_intact(manager, restore_fn)`: restores the latest checkpoint that reads, saying which
  were skipped; none intact is one line;
- `LossWindow`: the per-step metrics since the last log row, their mean, and the check that the
  loss stayed finite (a diverged run stops before its parameters are evaluated or saved);
- `prune_tensorboard(folder, step)`: drops events logged after the checkpoint a run resumes from.
"""

from __future__ import annotations

import contextlib
import math
import os
import pathlib
import shutil
import tempfile

import numpy as np
from etils import epath

from data_pipeline.atomic import atomic_write_text
from data_pipeline.errors import InputError


def as_path(path) -> epath.Path:
    """A workdir or data path as `etils.epath.Path` (what Orbax and TFDS use): `gs://` and other
    URLs stay URLs (`pathlib.Path` would make `gs://b/x` a local `gs:/b/x`); local paths are made
    absolute."""
    text = os.fspath(path)
    if is_remote(text):
        return epath.Path(text)
    return epath.Path(os.path.abspath(os.path.expanduser(text)))


def is_remote(path) -> bool:
    return "://" in os.fspath(path)


def write_text(path: epath.Path, text: str) -> None:
    """Atomic on a local disk (temporary file and rename); one object write on cloud storage
    (whole or nothing there already)."""
    if is_remote(path):
        path.write_text(text)
    else:
        atomic_write_text(os.fspath(path), text)


def remove_file(path: epath.Path) -> None:
    """Removes `path` if it is there (local disk or cloud storage); one line if it cannot be."""
    try:
        if path.exists():
            path.unlink()
    except OSError as err:
        raise os_error(err, path) from None


class DivergedError(InputError):
    """The training loss became NaN or infinite: the run stops without saving."""


class ValidationError(InputError):
    """The validation split cannot give the metric that chooses the best checkpoint."""


def os_error(err: OSError, default_path) -> InputError:
    """One line for a file-system failure (disk full, read-only, a file where a folder goes)."""
    path = err.filename or default_path
    reason = err.strerror or str(err).splitlines()[0]
    return InputError(path, f"cannot write the run: {reason}")


@contextlib.contextmanager
def workdir_lock(workdir, is_main: bool):
    """One run per workdir: a second `cac-jax train` into a workdir a live run writes into is
    refused with one line (two runs would interleave their checkpoints and metrics). Held by
    process 0; the other processes of a multi-host run are the same run. A killed run's lock is
    no lock (flock dies with its process)."""
    if not is_main or is_remote(workdir):  # object stores have no flock
        yield
        return
    from cac_jax.results import OutputLock

    try:
        lock = OutputLock(workdir, print, name=".cac-jax-train.lock", command="cac-jax train",
                          advice="choose another --workdir").acquire()
    except OSError as err:
        raise os_error(err, workdir) from None
    try:
        yield
    finally:
        lock.release()


def check_workdir(workdir: epath.Path, is_main: bool) -> None:
    """Refuse a workdir that is a file or that this process cannot write into."""
    if is_remote(workdir):
        if is_main:
            probe = workdir / ".write-test"
            try:
                workdir.mkdir(parents=True, exist_ok=True)
                probe.write_text("")
                probe.unlink()
            except Exception as err:  # noqa: BLE001 (each storage backend has its own errors)
                raise InputError(workdir, f"cannot write the run there: "
                                          f"{str(err).strip().splitlines()[0]}") from None
        return
    if workdir.exists() and not workdir.is_dir():
        raise InputError(workdir, "--workdir is a file, not a folder")
    parent = workdir
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise InputError(parent, "--workdir lies under a file, not a folder")
    if not is_main and not workdir.exists():
        return  # process 0 creates it
    try:
        if is_main:
            workdir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=os.fspath(workdir), prefix=".write-test-"):
            pass
    except OSError as err:
        # Named by the workdir: the probe's own (random) name says nothing to the user.
        raise InputError(workdir, f"cannot write the run: "
                                  f"{err.strerror or str(err).splitlines()[0]}") from None


def check_free_space(folder: epath.Path, needed_bytes: int, what: str) -> None:
    """Refuse to start writing `needed_bytes` (plus a margin) into a local `folder` whose disk
    has less free: one line before Orbax's background writers fail mid-write (each logging its
    own traceback). Cloud storage has no such limit to check."""
    if is_remote(folder):
        return
    probe = pathlib.Path(os.fspath(folder))
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    needed = int(needed_bytes * 1.1) + 2**20
    if free < needed:
        raise InputError(folder, f"no space left on the device for {what}: it needs about "
                                 f"{needed / 2**20:.1f} MiB, {free / 2**20:.1f} MiB are free")


def check_validation(config, scans, heart_masks: dict, num_scans_all_hosts: int,
                     masks_all_hosts: int, where) -> None:
    """Refuse a run whose validation cannot rank checkpoints on `config.train.best_metric`.

    Without validation scans every metric is NaN, nothing "improves" and early stopping ends the
    run with no best checkpoint; the kappa metrics also need the scans' reference heart masks
    (Agatston categories are scored inside them)."""
    name = str(config.train.best_metric)
    if num_scans_all_hosts == 0:
        raise ValidationError(where, f"the validation split has no scans with {config.task} "
                                     f"targets, so {name} is undefined; put scans in it "
                                     "(manifest `split` column) and rebuild with `cac-jax ingest`")
    if name.startswith("val_kappa") and masks_all_hosts == 0:
        raise ValidationError(where, f"no validation scan has a reference heart mask, so {name} "
                                     "(Agatston categories inside the heart) is undefined; add "
                                     "heart masks or set --config.train.best_metric=val_loss")


def _unused_name(folder: epath.Path, name: str) -> epath.Path:
    """`folder / name`, or `name.2`, `name.3`, ... when a step of that number was set aside
    before (a step damaged again after the run saved it anew)."""
    candidate, n = folder / name, 1
    while candidate.exists():
        n += 1
        candidate = folder / f"{name}.{n}"
    return candidate


def restore_intact(manager, restore_fn, where: epath.Path,
                   is_main: bool = True) -> tuple[int | None, object]:
    """(step, restored items) of the latest checkpoint that restores; (None, None) when the
    workdir has none. A checkpoint that fails to read is skipped with a warning naming it, and
    moved to `<workdir>/checkpoints.damaged/` so the resumed run can save that step again."""
    steps = sorted(manager.all_steps(), reverse=True)
    if not steps:
        return None, None
    failures = []
    for step in steps:
        try:
            items = restore_fn(step)
        except Exception as err:  # noqa: BLE001 (Orbax raises many types for a damaged folder)
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            failures.append(f"{where / str(step)} ({reason[:200]})")
            continue
        if failures:
            damaged = where.parent / f"{where.name}.damaged"
            if is_main:
                damaged.mkdir(exist_ok=True)
                for bad in steps[:steps.index(step)]:
                    (where / str(bad)).rename(_unused_name(damaged, str(bad)))
            manager.reload()
            print(f"cac-jax train: warning: resuming from step {step}: newer checkpoint(s) do "
                  f"not restore (moved to {damaged}): {'; '.join(failures)}", flush=True)
        return step, items
    raise InputError(where, f"no intact checkpoint to resume from: {'; '.join(failures)}; move "
                            "the checkpoints/ folder away to start the run afresh")


class LossWindow:
    """The step metrics since the last log row (device arrays until read)."""

    # Averaged over the window; the others are the last step's (param_norm: where the run is).
    MEAN_KEYS = ("loss", "focal_loss", "aux_loss", "grad_norm")

    def __init__(self, unreplicate):
        self._unreplicate = unreplicate
        self._rows: list = []
        self._read = 0  # rows already fetched and checked
        self._first_step = 0

    def add(self, step: int, metrics) -> None:
        if not self._rows:
            self._first_step = step
        self._rows.append(metrics)

    def check_finite(self, step: int, learning_rate: float, where) -> None:
        """Raise DivergedError when any step of the window had a non-finite loss."""
        for i in range(self._read, len(self._rows)):
            row = {k: float(v) for k, v in self._unreplicate(self._rows[i]).items()}
            self._rows[i] = row
            if not math.isfinite(row["loss"]):
                bad = self._first_step + i
                raise DivergedError(where, f"training loss is {row['loss']} at step {bad}; the "
                                           "run stops (nothing saved after it). Lower "
                                           f"config.train.learning_rate (now {learning_rate:g}) "
                                           "or set config.train.grad_clip_norm")
        self._read = len(self._rows)

    def mean(self, step: int, learning_rate: float, where) -> dict:
        """The row's training metrics (window means) and a fresh window."""
        self.check_finite(step, learning_rate, where)
        rows = self._rows
        out = {k: float(np.mean([r[k] for r in rows])) if k in self.MEAN_KEYS else rows[-1][k]
               for k in rows[-1]}
        self._rows, self._read = [], 0
        return out


def prune_tensorboard(folder: epath.Path, resume_step: int) -> None:
    """Drop events with a step after `resume_step` from the event files in `folder`.

    A resumed run logs those steps again; TensorBoard would show both. Each file is rewritten
    (atomically) only if it holds such events."""
    if not folder.is_dir():
        return
    import tensorflow as tf
    from tensorflow.core.util import event_pb2

    for path in sorted(folder.glob("events.out.tfevents.*")):
        records = [bytes(r.numpy()) for r in tf.data.TFRecordDataset(os.fspath(path))]
        kept = [r for r in records if event_pb2.Event.FromString(r).step <= resume_step
                or event_pb2.Event.FromString(r).HasField("file_version")]
        if len(kept) == len(records):
            continue
        tmp = path.parent / f".{path.name}.tmp"
        with tf.io.TFRecordWriter(os.fspath(tmp)) as writer:
            for record in kept:
                writer.write(record)
        tmp.replace(path)
