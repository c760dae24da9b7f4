"""A manifest row's files read into the record the dataset stores, without TensorFlow: the
ingest's reading side (`data_pipeline.tfds_builder` writes the records).

`read_row` reads one row (the study, its calcium labels and heart mask) into the stored example
(numpy); `score_row` reads and scores a row for the split assignment. Every read
error names the manifest row and column (`ManifestError`).

`map_rows` runs one of them over many rows in `workers` processes (`cac-jax ingest --workers`):
results come back in the rows' order, at most two per worker are held ahead of the consumer (a
whole 512 px study is tens of MB), and a row's error is handed back as its result instead of
stopping the others. The processes are spawned, not forked (the builder has TensorFlow loaded,
which must not be forked), and import only this module's readers.
"""

from __future__ import annotations

import math
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import get_context
from typing import TypeVar

import numpy as np

from data_pipeline import labels as labels_lib
from data_pipeline.agatston import agatston_score, cac_category, misaligned_labels
from data_pipeline.errors import InputError, ManifestError
from data_pipeline.manifest import ManifestRow

_INT16 = np.iinfo(np.int16)
T = TypeVar("T")


def row_error(row: ManifestRow, manifest_path: os.PathLike | str, err: Exception,
              column: str | None = None) -> ManifestError:
    """A read error of one row's file as a `ManifestError` naming the manifest row (and column)."""
    where = row.where if column is None else f"{row.where} {column}"
    return ManifestError(manifest_path, f"{where}: {err}")


def _read_files(row: ManifestRow, manifest_path: os.PathLike | str = ""):
    """(volume, calcium labels or None, heart mask or None) of a row; errors name the row."""
    from data_pipeline import io as io_lib

    column = "image"
    try:
        volume = io_lib.read_study(row.image, series=row.series)
        column = "calcium_labels"
        calcium = None if row.calcium_labels is None else io_lib.read_labels(
            row.calcium_labels, like=volume)
        column = "heart_mask"
        heart = None if row.heart_mask is None else io_lib.read_labels(row.heart_mask, like=volume)
    except InputError as err:
        raise row_error(row, manifest_path, err, column) from err
    return volume, calcium, heart


def score_row(row: ManifestRow, manifest_path: os.PathLike | str = "") -> float | None:
    """Reads a row's files (`ManifestError` naming the row when they fail) and returns the Agatston
    score of its reference labels, or None when the manifest gives the score or category or the
    row has no calcium labels (then nothing needs scoring)."""
    volume, calcium, _ = _read_files(row, manifest_path)
    if row.category is not None or row.agatston is not None or calcium is None:
        return None
    return agatston_score(volume.hu, calcium, volume.spacing_zyx_mm).agatston


# The key of `read_row`'s example under which its warnings travel (not a stored feature).
WARNINGS_KEY = "_warnings"


def read_row(row: ManifestRow, manifest_path: os.PathLike | str = "", *,
             scored_agatston: float | None = None) -> dict:
    """Reads one manifest row into the stored example (numpy); errors name the row.

    `scored_agatston`: the score of the row's labels when the caller already computed it (the
    builder scores each scan once, while assigning the splits); else it is scored here when the
    manifest gives none.
    """
    volume, calcium, heart = _read_files(row, manifest_path)
    hu = volume.hu
    empty = np.zeros((0, 0, 0), np.uint8)
    num_slices = hu.shape[0]
    agatston = row.agatston if scored_agatston is None else scored_agatston
    category = row.category
    if calcium is not None and agatston is None:
        agatston = agatston_score(hu, calcium, volume.spacing_zyx_mm).agatston
    if category is None and agatston is not None:
        category = cac_category(agatston)
    # Not stored: popped by the builder, which reports it (ingest is where users pair images
    # with their labels, so a wrong pairing is named there).
    warnings = () if calcium is None else tuple(filter(None, [misaligned_labels(hu, calcium)]))
    return {
        WARNINGS_KEY: warnings,
        "scan_id": row.scan_id,
        "patient_id": row.patient_id,
        "protocol": row.protocol,
        "site": row.site,
        "hu": np.clip(np.rint(hu), _INT16.min, _INT16.max).astype(np.int16),
        "calcium_class": empty if calcium is None else labels_lib.calcium_classes(calcium, hu),
        "heart_mask": empty if heart is None else labels_lib.heart_classes(heart),
        "annotated_calcium_slice": (np.zeros(num_slices, bool) if calcium is None
                                    else labels_lib.annotated_calcium_slices(calcium)),
        "heart_slice": (np.zeros(num_slices, bool) if heart is None
                        else labels_lib.heart_slices(heart)),
        "has_calcium_labels": calcium is not None,
        "has_heart_mask": heart is not None,
        "num_slices": np.int32(num_slices),
        "shape_zyx": np.asarray(hu.shape, np.int32),
        "spacing_zyx_mm": np.asarray(volume.spacing_zyx_mm, np.float32),
        "agatston": np.float32(math.nan if agatston is None else agatston),
        "category": np.int32(-1 if category is None else category),
    }


def map_rows(fn: Callable[..., T], rows: Iterable[ManifestRow], workers: int = 1, *,
             per_row: Callable[[ManifestRow], dict] | None = None,
             **kwargs) -> Iterator[tuple[ManifestRow, T | ManifestError]]:
    """(row, fn(row, **kwargs, **per_row(row))) for each row, in order; a `ManifestError` raised
    for a row is returned as its result. `workers` > 1 reads that many rows at once in spawned
    processes (`fn` must then be a module-level function of an importable module)."""
    def args(row: ManifestRow) -> dict:
        return kwargs if per_row is None else {**kwargs, **per_row(row)}

    if workers <= 1:
        for row in rows:
            try:
                yield row, fn(row, **args(row))
            except ManifestError as err:
                yield row, err
        return
    ahead = 2 * workers
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        pending: deque = deque()
        for row in rows:
            pending.append((row, pool.submit(fn, row, **args(row))))
            if len(pending) >= ahead:
                yield _result(*pending.popleft())
        while pending:
            yield _result(*pending.popleft())


def _result(row: ManifestRow, future) -> tuple[ManifestRow, object]:
    try:
        return row, future.result()
    except ManifestError as err:
        return row, err
    except BrokenProcessPool:
        # A worker killed (the kernel's out-of-memory killer, a signal) takes the pool with it:
        # one line naming the study it was reading, and the build stops (nothing is replaced).
        raise InputError(row.image, f"{row.where}: the process reading it died (out of memory? "
                                    "fewer --workers need less)") from None
