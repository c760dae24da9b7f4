"""The scan index of a built dataset (`scan_index.json` beside `dataset_info.json`).

Training needs each scan's metadata (ids, protocol, shape, spacing, reference score and the
per-slice target flags) and its record's place in the TFRecord files before the first step.
Without an index that means reading every record of the host's shard, volumes included: the whole
dataset's bytes at paper scale. `cac-jax ingest` writes this index once after the build (a few
hundred bytes per scan) and the input pipeline reads only it (data_pipeline.input_pipeline); a
dataset built before the index existed is read record by record as before.

Layout: {"version": 1, "files": {TFRECORD_FILE_NAME: [entry per record, in file order]}}, each
entry {"offset", "length", the metadata fields, "targets": {task: {"has", "positive"}}} where
"positive" lists the slices with targets (coronary calcium; heart).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from data_pipeline.atomic import atomic_write_text

INDEX_FILE = "scan_index.json"
VERSION = 1
TASKS = ("calcium", "heart")


def write_scan_index(builder, directory: str | os.PathLike) -> Path:
    """Reads each record of the built dataset once (at build time) and writes the index."""
    from data_pipeline.input_pipeline import _META_KEYS, _Records, _target_keys

    files: dict[str, list[dict]] = {}
    for split in builder.info.splits:
        records = _Records(builder, split)
        keys = set(_META_KEYS)
        for task in TASKS:
            keys.update(_target_keys(task)[1:])
        for (path, start, size), index in zip(records.locations, range(len(records)),
                                              strict=True):
            ex = records.read(index, tuple(sorted(keys)))
            agatston = float(ex["agatston"])
            entry = {
                "offset": start, "length": size,
                "scan_id": _text(ex["scan_id"]), "patient_id": _text(ex["patient_id"]),
                "protocol": _text(ex["protocol"]), "site": _text(ex["site"]),
                "shape_zyx": [int(n) for n in ex["shape_zyx"]],
                "spacing_zyx_mm": [float(v) for v in ex["spacing_zyx_mm"]],
                "agatston": None if math.isnan(agatston) else agatston,
                "category": int(ex["category"]), "targets": {}}
            for task in TASKS:
                _, flag_key, has_key = _target_keys(task)
                entry["targets"][task] = {
                    "has": bool(ex[has_key]),
                    "positive": [int(z) for z in ex[flag_key].nonzero()[0]]}
            files.setdefault(os.path.basename(path), []).append(entry)
    target = Path(directory) / INDEX_FILE
    atomic_write_text(target, json.dumps({"version": VERSION, "files": files}) + "\n")
    return target


def read_scan_index(dataset_dir: str | os.PathLike) -> dict | None:
    """{file name: entries} of a dataset's index; None without one (or of another version)."""
    from etils import epath

    path = epath.Path(dataset_dir) / INDEX_FILE
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    if data.get("version") != VERSION:
        return None
    return data["files"]


def split_entries(builder, split: str, index: dict | None) -> list[dict] | None:
    """The index entries of the examples of `split` (a TFDS split, slicing allowed), in the
    order `builder.as_dataset(split, shuffle_files=False)` reads them; None when any of its files
    is not indexed."""
    if index is None:
        return None
    entries = []
    for instruction in builder.info.splits[split].file_instructions:
        indexed = index.get(os.path.basename(instruction.filename))
        if indexed is None:
            return None
        entries.extend(indexed[instruction.skip:instruction.skip + instruction.take])
    return entries


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
