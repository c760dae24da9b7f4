"""`results.csv`, the batch output of `cac-jax infer`: its columns, values, writer and reader.

The one home of the format (docs/data_flow.md, section 6: a contract). `cac-jax infer`, the demo's
naive baseline and `cac-jax infer --merge` write it through this module; `cac-jax evaluate` reads it.

- Columns: `RESULT_COLUMNS`, in that order. `heart_model`/`calcium_model` (the checkpoint step
  folders) and `heart_step`/`calcium_step` identify the models that scored a row
  (`model_identity`), so a results file never mixes two pairs of models unnoticed.
- Numbers (`agatston`, `volume_mm3`, `heart_volume_ml`) are written with `number`: the shortest
  text that reads back as the same float (`repr`), so a score exactly at a category boundary
  (100.0 vs 100.00000001) keeps its category when `evaluate` reads it again.
- Writing: `ResultsAppender` appends one row per study to a file whose header (and earlier rows)
  were written atomically, each row with a single `write` call on an append-mode descriptor: the
  cost of a row does not grow with the batch (a rewrite per study would be quadratic in it), and a
  killed process leaves every earlier row intact. A row torn by a crash or a full disk has no
  final newline; `read_results` leaves such a last line out and reports it, and a resumed batch
  rewrites the file without it (`write_results`, atomic) and scores that study again.
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from data_pipeline.errors import InputError

RESULTS_NAME = "results.csv"
RESULT_COLUMNS = ("scan_id", "image", "protocol", "status", "error", "agatston", "volume_mm3",
                  "category", "category_name", "n_lesions", "heart_volume_ml", "heart_model",
                  "calcium_model", "heart_step", "calcium_step", "seconds")
MODEL_COLUMNS = ("heart_model", "calcium_model", "heart_step", "calcium_step")


class ResultsFileError(InputError):
    """A results.csv that cannot be read, or one this run must not write into."""


def number(value: float) -> str:
    """`value` as the shortest text that reads back as the same float (full precision)."""
    return repr(float(value))


def model_identity(heart, calcium) -> dict[str, str]:
    """The model columns of a row scored by `heart` and `calcium` (`TrainedModel`s: step folder
    and step), as the strings the CSV holds."""
    return {"heart_model": str(getattr(heart, "path", "") or ""),
            "calcium_model": str(getattr(calcium, "path", "") or ""),
            "heart_step": str(int(getattr(heart, "step", 0) or 0)),
            "calcium_step": str(int(getattr(calcium, "step", 0) or 0))}


def identity_of(row: Mapping[str, Any]) -> dict[str, str]:
    """The model columns of a row, as strings."""
    return {k: str(row.get(k, "") or "") for k in MODEL_COLUMNS}


def describe_identity(identity: Mapping[str, str]) -> str:
    """'heart H step S, calcium C step T' for messages."""
    return (f"heart {identity['heart_model'] or '?'} step {identity['heart_step'] or '?'}, "
            f"calcium {identity['calcium_model'] or '?'} step {identity['calcium_step'] or '?'}")


def row_text(row: Mapping[str, Any]) -> str:
    """One CSV line (with its newline) of `row`'s `RESULT_COLUMNS` (missing ones empty)."""
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerow(
        ["" if row.get(k) is None else row.get(k) for k in RESULT_COLUMNS])
    return buffer.getvalue()


def header_text() -> str:
    """The header line (with its newline)."""
    return ",".join(RESULT_COLUMNS) + "\n"


def write_results(path: str | os.PathLike, rows: Iterable[Mapping[str, Any]]) -> None:
    """Writes a whole results.csv (header and `rows`) atomically (`data_pipeline.atomic`)."""
    from data_pipeline.atomic import atomic_write_text

    atomic_write_text(path, header_text() + "".join(row_text(r) for r in rows))


def read_results(path: str | os.PathLike) -> tuple[dict[str, dict[str, str]], str | None]:
    """(rows by scan_id in file order, the torn last line or None) of a results.csv.

    A missing file has no rows. A last line without its newline (a write cut short by a crash or a
    full disk) is not a row: it is returned separately. A repeated scan_id keeps its last row.
    Raises `ResultsFileError` for a file that is unreadable or has other columns.
    """
    path = Path(path)
    if not path.exists():
        return {}, None
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ResultsFileError(path, f"cannot read the results: {getattr(err, 'strerror', None) or err}"
                               ) from err
    torn = None
    if text and not text.endswith("\n"):
        cut = text.rfind("\n") + 1
        text, torn = text[:cut], text[cut:]
    try:
        reader = csv.DictReader(io.StringIO(text))
        if text and tuple(reader.fieldnames or ()) != RESULT_COLUMNS:
            raise ResultsFileError(path, "is not a results file of this version (other columns); "
                                         "use another --out or --overwrite")
        rows = {row["scan_id"]: dict(row) for row in reader}
    except csv.Error as err:
        raise ResultsFileError(path, f"cannot read the results: {err}") from err
    return rows, torn


class ResultsAppender:
    """Appends rows to a results.csv whose header is already written, one `write` per row.

    A write that fails part-way (a full disk) is cut back to the last whole row before the error
    is raised, so the file always ends with a complete row. Close (or use as a context manager) to
    flush the rows to disk.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)

    def append(self, row: Mapping[str, Any]) -> None:
        data = row_text(row).encode("utf-8")
        size = os.fstat(self._fd).st_size
        try:
            written = os.write(self._fd, data)
            if written != len(data):
                raise OSError(28, os.strerror(28))  # ENOSPC: a short write to a regular file
        except OSError:
            # Cut back to the last whole row; if even that fails, readers leave the torn last
            # line out all the same. The write's error is the one raised.
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, size)
            raise

    def close(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def __enter__(self) -> ResultsAppender:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------
# One writer per output folder
# ---------------------------------------------------------------------------------------------

LOCK_NAME = ".cac-jax-infer.lock"


class OutputLockedError(InputError):
    """Another live process is writing into the output folder."""


class OutputLock:
    """An exclusive lock on an output folder: `OUT/.cac-jax-infer.lock` (`name`), locked with
    `flock`; `command` and `advice` word the message a second run gets.

    The kernel releases an flock when its process dies, so a lock file left by a killed run is
    no lock: the next run takes it over. The file names its holder (pid, host, start time) for the
    message a second run gets. Filesystems without flock support (some parallel filesystems)
    run unlocked, with a warning through `log`.
    """

    def __init__(self, folder: str | os.PathLike, log=None, *, name: str = LOCK_NAME,
                 command: str = "cac-jax infer", advice: str = "choose another --out"):
        self.path = Path(folder) / name
        self._command, self._advice = command, advice
        self._log = log
        self._fd: int | None = None

    def acquire(self) -> OutputLock:
        import errno
        import fcntl
        import socket
        import time

        for _ in range(10):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 512, 0).decode("utf-8", "replace").strip()
                os.close(fd)
                raise OutputLockedError(
                    self.path.parent, f"another {self._command} is writing into this folder "
                                      f"({holder or 'holder unknown'}; lock {self.path}); wait "
                                      f"for it to finish or {self._advice}") from None
            except OSError as err:
                os.close(fd)
                if err.errno not in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                if self._log is not None:
                    self._log(f"warning: {self.path.parent}: the filesystem does not support "
                              "locks; make sure no other run writes into this folder")
                return self
            # The previous holder may have removed the file between our open and flock: then
            # we hold a lock on a file nobody else will open. Retry on the current file.
            try:
                current = os.stat(self.path)
            except FileNotFoundError:
                current = None
            mine = os.fstat(fd)
            if current is None or (current.st_ino, current.st_dev) != (mine.st_ino, mine.st_dev):
                os.close(fd)
                continue
            stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {stamp}\n"
                      .encode(), 0)
            self._fd = fd
            return self
        raise OutputLockedError(self.path.parent, f"could not lock {self.path} (it keeps being "
                                                  "replaced); is another run starting?")

    @property
    def held(self) -> bool:
        """False where the filesystem has no locks (the run goes on unlocked)."""
        return self._fd is not None

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            self.path.unlink(missing_ok=True)  # while still locked: see `acquire`
        finally:
            os.close(fd)

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
