"""Batch runs of `cac-jax infer`: a `Scorer` over many studies into one output folder.

`run_batch` scores studies into `OUT` (results.csv through `cac_jax.results`, the scorer's JSON
per study, optional masks and previews); `shard` picks one of N disjoint parts of a batch, and
`merge_results` joins the results of the parts. The rules (docs/data_flow.md, section 6):

- One run per output folder at a time (`cac_jax.results.OutputLock`); a second is refused.
- A study that cannot be read or scored, or whose score must not be used
  (`StudyResult.problems`: not an image in HU, no heart found) gets `status=error` and its one-line
  reason, and the batch goes on. A folder that cannot be written (read-only, full disk) stops
  the batch with one line (`OutputWriteError`): every later study would fail the same way.
- A rerun skips the studies already scored ok for the same image by the same models and scores
  the rest; an `--out` with rows of other models (another checkpoint path or step) is refused
  unless `overwrite`, which scores every study again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import os
import re
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cac_jax import postprocess
from cac_jax.inference import NON_CORONARY_LABEL, Scorer, Study, StudyResult, safe_name, write_mask
from cac_jax.results import (
    RESULTS_NAME,
    OutputLock,
    ResultsAppender,
    ResultsFileError,
    describe_identity,
    identity_of,
    model_identity,
    number,
    read_results,
    write_results,
)
from data_pipeline.errors import InputError, error_line


class OutputWriteError(InputError):
    """The output folder cannot be written (read-only, full, gone): the batch stops."""


def _reason(err: OSError) -> str:
    return err.strerror or str(err)


def _output_problem(err: OSError, out: Path) -> bool:
    """An OSError of writing into `out` (a full or read-only disk, or a file under `out`), as
    opposed to one of a study's own (its files, a PACS connection)."""
    if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
        return True
    if not err.filename:
        return False
    try:
        return Path(os.fspath(err.filename)).resolve().is_relative_to(Path(out).resolve())
    except (OSError, TypeError, ValueError):
        return False


@dataclasses.dataclass
class BatchSummary:
    """Counts of a batch run; `text()` is the summary line printed at the end."""

    out: Path
    scored: int = 0
    failed: int = 0
    skipped: int = 0
    seconds: list[float] = dataclasses.field(default_factory=list)

    @property
    def all_failed(self) -> bool:
        """Every study of the batch failed (nothing scored now or before)."""
        return self.failed > 0 and self.scored == 0 and self.skipped == 0

    def text(self) -> str:
        """One summary line."""
        mean = f"{np.mean(self.seconds):.2f} s" if self.seconds else "n/a"
        return (f"scored {self.scored}, failed {self.failed}, skipped {self.skipped} (already "
                f"done); mean {mean} per scored study; results in {self.out / RESULTS_NAME}")


def parse_shard(text: str) -> tuple[int, int]:
    """(K, N) of a `--shard K/N` argument, 1 <= K <= N."""
    try:
        k, n = (int(part) for part in text.split("/"))
    except ValueError:
        raise ValueError(f"expected K/N (e.g. 2/8), got {text!r}") from None
    if n < 1 or not 1 <= k <= n:
        raise ValueError(f"K/N needs 1 <= K <= N (K counts from 1), got {text!r}")
    return k, n


def shard(studies: Sequence[Study], k: int, n: int) -> list[Study]:
    """The studies of part K of N (1 <= K <= N): those whose scan_id's SHA-256 is K - 1 modulo N.

    Decided by each study's own id, so N processes given the same studies in any order split
    them into N disjoint parts that together hold each study once.
    """
    def part(scan_id: str) -> int:
        return int.from_bytes(hashlib.sha256(scan_id.encode("utf-8")).digest()[:8], "big") % n

    return [s for s in studies if part(s.scan_id) == k - 1]


def _prepare_out(out: Path, studies: Iterable[Study]) -> None:
    if out.exists() and not out.is_dir():
        raise InputError(out, "--out must be a folder, but this is a file")
    if out.resolve() in {s.image.resolve() for s in studies}:
        raise InputError(out, "--out is one of the input studies; choose another folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputWriteError(out, f"cannot create the output folder: {_reason(err)}") from None


def _lock(out: Path, log) -> OutputLock:
    try:
        return OutputLock(out, log).acquire()
    except OSError as err:
        raise OutputWriteError(out, f"cannot write into the output folder: {_reason(err)}") \
            from None


def run_batch(scorer: Scorer, studies: list[Study], out: str | os.PathLike, *,
              save_masks: bool = False, save_previews: bool = False, overwrite: bool = False,
              progress: bool = True, log=None, after_study=None) -> BatchSummary:
    """Scores `studies` into `out` (see the module docstring and `cac-jax infer --help`).

    results.csv is rewritten (atomically) once at the start, keeping the rows this run will not
    redo, and then gets one appended row per study, after that study's other files: a killed
    batch leaves only complete rows. `after_study(out, name, study, volume, result)` (e.g. the
    DICOM outputs, docs/clinical.md) runs after a study's own files; what it raises makes that
    study an error row, except a failure to write into `out` (a full disk), which stops the
    batch like the study's own files would.
    """
    out = Path(out)
    _prepare_out(out, studies)
    lock = _lock(out, log)
    if lock.held:  # without a lock another run's temporaries may be live
        _remove_stale_temporaries(out)
    try:
        return _run_locked(scorer, studies, out, save_masks=save_masks,
                           save_previews=save_previews, overwrite=overwrite, progress=progress,
                           log=log, after_study=after_study)
    finally:
        lock.release()


def _start_results(path: Path, studies: list[Study], models: dict[str, str], overwrite: bool,
                   log) -> set[str]:
    """Rewrites results.csv with the rows this run keeps; returns the scan_ids to skip."""
    previous, torn = ({}, None) if overwrite else read_results(path)
    if torn is not None and log is not None:
        log(f"warning: {path}: its last line was cut short ({torn[:40]!r}); that study is "
            "scored again")
    others = [row for row in previous.values() if identity_of(row) != models]
    if others:
        raise ResultsFileError(
            path, f"{len(others)} of its {len(previous)} rows were scored by other models "
                  f"({describe_identity(identity_of(others[0]))}), this run uses "
                  f"{describe_identity(models)}; choose another --out, or --overwrite to score "
                  "every study again with these models")
    out = path.parent

    def finished(study: Study) -> bool:
        row = previous.get(study.scan_id)
        return (row is not None and row.get("status") == "ok"
                and row.get("image") == str(study.image)
                and (out / f"{safe_name(study.scan_id)}.json").exists())

    skip = {s.scan_id for s in studies if finished(s)}
    batch = {s.scan_id for s in studies}
    kept = [row for scan_id, row in previous.items() if scan_id not in batch or scan_id in skip]
    if overwrite or not path.exists() or torn is not None or len(kept) != len(previous):
        try:
            write_results(path, kept)
        except OSError as err:
            raise OutputWriteError(path, f"cannot write the results: {_reason(err)}") from None
    return skip


# `atomic_path`'s temporary names: "." + the target's name + "." + mkstemp's 8 characters + ".tmp"
# + the target's suffix.
_TEMPORARY = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp(\.[^/]*)?$")


def _remove_stale_temporaries(out: Path) -> None:
    """Removes the temporary files of atomic writes (`.NAME.XXXX.tmpSUFFIX`,
    `data_pipeline.atomic`) a killed run left in `out`: under the folder's lock no live writer
    owns one."""
    for path in out.glob(".*.tmp*"):
        if _TEMPORARY.match(path.name) and path.is_file() and not path.is_symlink():
            with contextlib.suppress(OSError):  # tidying only: a file we may not remove stays
                path.unlink()


def _run_locked(scorer: Scorer, studies: list[Study], out: Path, *, save_masks: bool,
                save_previews: bool, overwrite: bool, progress: bool, log,
                after_study=None) -> BatchSummary:
    from tqdm import tqdm

    results_path = out / RESULTS_NAME
    models = model_identity(scorer.heart, scorer.calcium)
    skip = _start_results(results_path, studies, models, overwrite, log)
    summary = BatchSummary(out)
    try:
        appender = ResultsAppender(results_path)
    except OSError as err:
        raise OutputWriteError(results_path, f"cannot write the results: {_reason(err)}") \
            from None
    bar = tqdm(studies, unit="study", disable=not progress, file=sys.stderr, dynamic_ncols=True)
    try:
        for study in bar:
            bar.set_postfix_str(study.scan_id, refresh=False)
            if study.scan_id in skip:
                summary.skipped += 1
                missing = _missing_outputs(out, study, save_masks, save_previews, after_study)
                if missing and log is not None:
                    log(f"note: {study.scan_id}: already scored in {out}, without "
                        f"{', '.join(p.name for p in missing)} asked for now; run again with "
                        "--overwrite to write them")
                continue
            start = time.perf_counter()
            row = _score_study(scorer, study, out, models, save_masks, save_previews,
                               after_study)
            seconds = time.perf_counter() - start
            row["seconds"] = f"{seconds:.3f}"
            if row["status"] == "ok":
                summary.scored += 1
                summary.seconds.append(seconds)
            else:
                summary.failed += 1
                if log is not None:
                    log(f"error: {row['error']}")
            try:
                appender.append(row)
            except OSError as err:
                raise OutputWriteError(results_path, f"cannot write the results: "
                                                     f"{_reason(err)}") from None
    except BaseException:
        bar.close()
        with contextlib.suppress(OSError):  # the error being raised is the one to report
            appender.close()
        raise
    bar.close()
    try:
        appender.close()
    except OSError as err:
        raise OutputWriteError(results_path, f"cannot write the results: {_reason(err)}") \
            from None
    return summary


def _score_study(scorer: Scorer, study: Study, out: Path, models: dict[str, str],
                 save_masks: bool, save_previews: bool, after_study=None) -> dict[str, Any]:
    """The results row of one study, after writing its other files."""
    row: dict[str, Any] = {"scan_id": study.scan_id, "image": str(study.image),
                           "protocol": study.protocol, **models}
    try:
        volume, result = scorer.score_path(study.image, series=study.series)
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as err:  # noqa: BLE001 - one bad study must not stop the batch
        row.update(status="error", error=error_line(err))
        return row
    row["protocol"] = study.protocol or volume.metadata.protocol or ""
    row["heart_volume_ml"] = number(result.heart_volume_ml)
    if result.problems:
        row.update(status="error", error=error_line(InputError(study.image,
                                                              "; ".join(result.problems))))
        return row
    name = safe_name(study.scan_id)
    try:
        _write_study_files(out, name, study, volume, result, save_masks, save_previews)
    except OSError as err:
        raise OutputWriteError(out, f"cannot write the outputs of {study.scan_id}: "
                                    f"{_reason(err)}") from None
    if after_study is not None:
        try:
            after_study(out, name, study, volume, result)
        except (KeyboardInterrupt, SystemExit):
            raise
        except OSError as err:
            if _output_problem(err, out):  # every later study would fail the same way
                raise OutputWriteError(out, f"cannot write the outputs of {study.scan_id}: "
                                            f"{_reason(err)}") from None
            row.update(status="error", error=error_line(err))
            return row
        except Exception as err:  # noqa: BLE001 - one bad study must not stop the batch
            row.update(status="error", error=error_line(err))
            return row
    score = result.score
    row.update(status="ok", error="", agatston=number(score.agatston),
               volume_mm3=number(score.volume_mm3), category=score.category,
               category_name=score.category_name, n_lesions=len(score.lesions))
    return row


def _missing_outputs(out: Path, study: Study, save_masks: bool, save_previews: bool,
                     after_study) -> list[Path]:
    """The files this run asks for that an earlier run, which scored `study`, did not write."""
    name = safe_name(study.scan_id)
    wanted = []
    if save_masks:
        wanted += [out / f"{name}_calcium_labels.nii.gz", out / f"{name}_heart_mask.nii.gz"]
    if save_previews:
        wanted.append(out / f"{name}.png")
    expected = getattr(after_study, "expected", None)
    if expected is not None:
        wanted += expected(out, name, study)
    return [path for path in wanted if not path.exists()]


def _write_study_files(out: Path, name: str, study: Study, volume, result: StudyResult,
                       save_masks: bool, save_previews: bool) -> None:
    from data_pipeline.atomic import atomic_write_text

    atomic_write_text(out / f"{name}.json",
                      json.dumps(result.score.to_json_dict(), indent=2, allow_nan=False) + "\n")
    if save_masks:
        for path, mask in ((out / f"{name}_calcium_labels.nii.gz", result.calcium_labels),
                           (out / f"{name}_heart_mask.nii.gz", result.heart_mask.astype(np.uint8))):
            write_mask(path, mask, volume)
            _check_written_image(path)
    if save_previews:
        save_preview(out / f"{name}.png", volume, result, study.scan_id)


def _check_written_image(path: Path) -> None:
    """Raise OSError if an image file just written has no readable header.

    SimpleITK's writers do not report every failed write: on a full disk a .nii.gz can come out
    empty while the write "succeeds" (and the atomic rename then puts it in place).
    """
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        if path.stat().st_size == 0:
            raise RuntimeError("empty file")
        reader.ReadImageInformation()
    except RuntimeError:
        path.unlink(missing_ok=True)
        raise OSError(errno.EIO, f"{path.name} came out empty or unreadable (is the disk "
                                 "full?)") from None


def merge_results(folders: Sequence[str | os.PathLike], out: str | os.PathLike, *,
                  expected: Sequence[str] | None = None, log=None) -> int:
    """Joins the results.csv of the shard folders `folders` into `out/results.csv` (atomically);
    returns the number of rows.

    Refused (`InputError`, one line) when a folder has no results, when the shards were scored by
    different models, or when a study appears in two shards; with `expected` (the batch's
    scan_ids) also when a study of the batch is in no shard or a row is not of the batch. The
    scorer's JSON and other files stay in the shard folders.
    """
    out = Path(out)
    rows: dict[str, dict[str, str]] = {}
    where: dict[str, Path] = {}
    identity = None
    for folder in map(Path, folders):
        path = folder / RESULTS_NAME
        if not path.is_file():
            raise InputError(folder, f"has no {RESULTS_NAME} to merge")
        found, torn = read_results(path)
        if torn is not None and log is not None:
            log(f"warning: {path}: its last line was cut short and is left out ({torn[:40]!r})")
        for scan_id, row in found.items():
            mine = identity_of(row)
            if identity is None:
                identity, first = mine, path
            elif mine != identity:
                raise InputError(path, f"{scan_id} was scored by other models "
                                       f"({describe_identity(mine)}) than the rows of {first} "
                                       f"({describe_identity(identity)}); merge results of one "
                                       "pair of models")
            if scan_id in rows:
                raise InputError(path, f"{scan_id} is also in {where[scan_id]}: the shards "
                                       "overlap")
            rows[scan_id], where[scan_id] = row, path
    if expected is not None:
        missing = [i for i in dict.fromkeys(expected) if i not in rows]
        extra = sorted(set(rows) - set(expected))
        if missing or extra:
            what = (f"{len(missing)} studies of the batch are in no shard ({_few(missing)}); "
                    "score the missing shard(s) first" if missing else
                    f"{len(extra)} rows are not studies of the batch ({_few(extra)})")
            raise InputError(out, f"cannot merge: {what}")
    if out.resolve() in {Path(f).resolve() for f in folders}:
        raise InputError(out, "--out is one of the folders to merge; choose another folder")
    _prepare_out(out, [])
    lock = _lock(out, log)
    try:
        write_results(out / RESULTS_NAME, rows.values())
    except OSError as err:
        raise OutputWriteError(out, f"cannot write the results: {_reason(err)}") from None
    finally:
        lock.release()
    return len(rows)


def _few(ids: Sequence[str], count: int = 3) -> str:
    return ", ".join(ids[:count]) + (", ..." if len(ids) > count else "")


def save_preview(path: str | os.PathLike, volume, result: StudyResult, scan_id: str,
                 *, count: int = 8) -> None:
    """A PNG of the slices with predicted calcium (coronary red, non-coronary yellow) over the CT,
    the heart outline in cyan, and the score and category in the title (atomically)."""
    from data_pipeline.montage import Tile, write_montage

    labels = result.calcium_labels
    per_slice = (labels > 0).reshape(labels.shape[0], -1).sum(axis=1)
    slices = np.flatnonzero(per_slice)
    if len(slices) > count:  # the slices with the most calcium, shown in order
        slices = np.sort(slices[np.argsort(-per_slice[slices], kind="stable")[:count]])
    if len(slices) == 0:  # no calcium: slices through the predicted heart, else the volume
        heart_z = np.flatnonzero(result.heart_mask.reshape(labels.shape[0], -1).any(axis=1))
        pool = heart_z if len(heart_z) else np.arange(labels.shape[0])
        slices = np.unique(pool[np.linspace(0, len(pool) - 1, min(4, len(pool))).astype(int)])
    hu = volume.hu
    tiles = [Tile(hu[z], np.select([labels[z] == postprocess.UNDETERMINED_CORONARY_LABEL,
                                    labels[z] == NON_CORONARY_LABEL], [1, 2], 0),
                  result.heart_mask[z], f"slice {z}") for z in slices]
    score = result.score
    write_montage(path, tiles, window=(-200.0, 600.0),
                  colours={1: (1.0, 0.1, 0.1, 0.9), 2: (1.0, 0.9, 0.1, 0.9)},
                  title=f"{scan_id}: Agatston {score.agatston:.1f}, category "
                        f"{score.category_name}\nred: coronary calcium (scored), yellow: "
                        "non-coronary calcium, cyan: heart")
