"""Record access for the tf.data input pipeline: the dataset's TFRecord files and the scans'
metadata, read without decoding any volume.

- `dataset_path` / `_builder`: the TFDS dataset a data config points at (refused when a TFRecord
  file is missing); `_host_split`: this host's share of a split (`tfds.split_for_jax_process`).
- `_Records`: random access to the examples of a host split by record offset, from the build-time
  scan index (`data_pipeline.scan_index`) when there is one, else by reading the record headers.
- `_read_meta`: each scan's `ScanInfo` and per-slice positive flags (from the scan index, or the
  records' small features); `_host_slice_counts`: slices per host, for equal evaluation steps.
- `_tf()`: TensorFlow imported with GPUs hidden (JAX owns the accelerators).

The design of the whole pipeline: `data_pipeline.input_pipeline`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import struct

import numpy as np
from scipy import ndimage

from data_pipeline import labels as labels_lib
from data_pipeline.errors import InputError

_TF_CONFIGURED = False


def _drop_tfds_dtype_notice(record: logging.LogRecord) -> bool:
    """TFDS 4.9 logs a deprecation notice each time its own code reads `FeatureConnector.dtype`
    (while decoding, not from our code); it says nothing a user can act on."""
    return "FeatureConnector.dtype` is deprecated" not in record.getMessage()


def _tf():
    """Imports TensorFlow with GPUs hidden (JAX owns the accelerators)."""
    global _TF_CONFIGURED
    import tensorflow as tf

    if not _TF_CONFIGURED:
        logging.getLogger("absl").addFilter(_drop_tfds_dtype_notice)
        try:
            tf.config.set_visible_devices([], "GPU")
        except RuntimeError:  # TF already initialised its devices; nothing placed on GPU by us
            pass
        _TF_CONFIGURED = True
    return tf


@dataclasses.dataclass(frozen=True)
class ScanInfo:
    """One scan of a host's shard (index = `scan_index` in the batches)."""

    scan_id: str
    patient_id: str
    protocol: str
    site: str
    shape_zyx: tuple[int, int, int]
    spacing_zyx_mm: tuple[float, float, float]
    agatston: float | None
    category: int | None
    num_positive_slices: int
    # Slices between the centre and each neighbour: labels.neighbour_offset(dz, neighbour_mm).
    neighbour_offset: int = 1
    # Calcium task: the slices holding the reference heart (None: the scan has no heart mask).
    heart_slices: tuple[int, ...] | None = None



def _data_config(config):
    """(data config, seed) from a full experiment config or a bare data config."""
    data = config.data if "data" in config else config
    seed = data.get("seed", None)
    if seed is None:
        seed = config.get("seed", 0) if "data" in config else 0
    return data, int(seed or 0)


def dataset_path(data):
    """DATA_DIR/NAME/VERSION of the dataset a data config points at, as `etils.epath.Path`: a
    `gs://` data_dir stays a URL (TFDS and TensorFlow read it); a local one is expanded."""
    from etils import epath

    text = os.fspath(data.data_dir)
    root = epath.Path(text if "://" in text else os.path.expanduser(text))
    return root / data.name / data.version


def _builder(data):
    import tensorflow_datasets as tfds

    path = dataset_path(data)
    if not (path / "dataset_info.json").exists():
        raise InputError(path, "no dataset here; build it with `cac-jax ingest --manifest M.csv "
                               f"--data-dir {data.data_dir} --name {data.name}`")
    builder = tfds.builder_from_directory(os.fspath(path))
    _check_files(builder)
    return builder


def _check_files(builder) -> None:
    """Refuse a dataset whose TFRecord files are not all there (one deleted or moved)."""
    gfile = _tf().io.gfile
    for split in builder.info.splits.values():
        for instruction in split.file_instructions:
            if not gfile.exists(instruction.filename):
                raise InputError(instruction.filename, "TFRecord file of the dataset is missing; "
                                                       "rebuild it with `cac-jax ingest`")


def _host_split(builder, split: str, process_index: int, process_count: int):
    import tensorflow_datasets as tfds

    # TFDS slicing ("train[:100]", "train[10%:]") picks a subset of a split's scans.
    if split.split("[", 1)[0] not in builder.info.splits:
        raise InputError(_dataset_path_of(builder), f"dataset has no {split!r} split (it has "
                                                   f"{', '.join(builder.info.splits)})")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    if process_count == 1:
        return split
    return tfds.split_for_jax_process(split, process_index=process_index,
                                      process_count=process_count)


def _dataset_path_of(builder) -> str:
    return os.fspath(builder.data_dir)


def _num_examples(builder, host_split) -> int:
    return int(builder.info.splits[host_split].num_examples)


def _target_keys(task: str) -> tuple[str, str, str]:
    if task == "calcium":
        return "calcium_class", "annotated_calcium_slice", "has_calcium_labels"
    if task == "heart":
        return "heart_mask", "heart_slice", "has_heart_mask"
    raise ValueError(f"unknown task {task!r}")


class _Records:
    """Random access to the examples of a host split in the dataset's TFRecord files.

    TFDS reads TFRecords front to back; streaming needs scan i whenever the sampling plan asks for
    it, so the record offsets are indexed once (headers only: 12 bytes read per record) and each
    example is read with one seek and decoded by TFDS's own numpy decoder
    (`ExampleParserNp` and each feature's `decode_example_np`). Example i is the i-th of `builder.as_dataset(split,
    shuffle_files=False)`: the same file instructions, in the same order.
    """

    def __init__(self, builder, host_split, index: dict | None = None):
        tf = _tf()
        from tensorflow_datasets.core import example_parser

        self._gfile = tf.io.gfile
        self.features = builder.info.features
        # TFDS's numpy parser (what `deserialize_example_np` uses); each feature is then decoded
        # on its own, so reading the metadata never decompresses a volume.
        self._parser = example_parser.ExampleParserNp(self.features.get_serialized_info())
        self.locations: list[tuple[str, int, int]] = []
        # The build-time scan index's entry of each location (data_pipeline.scan_index), or None.
        self.entries: list[dict | None] = []
        if _num_examples(builder, host_split) == 0:
            return
        for instruction in builder.info.splits[host_split].file_instructions:
            indexed = (index or {}).get(os.path.basename(instruction.filename))
            if indexed is not None:
                offsets = [(e["offset"], e["length"]) for e in indexed]
            else:
                offsets = self._offsets(instruction.filename)
            if len(offsets) != instruction.examples_in_shard:
                raise InputError(instruction.filename, f"holds {len(offsets)} records, the dataset "
                                                       f"says {instruction.examples_in_shard}; "
                                                       "rebuild it with `cac-jax ingest`")
            end = instruction.skip + instruction.take
            chosen = offsets[instruction.skip:end]
            self.locations.extend((instruction.filename, start, size) for start, size in chosen)
            self.entries.extend(indexed[instruction.skip:end] if indexed is not None
                                else [None] * len(chosen))

    def _offsets(self, path: str) -> list[tuple[int, int]]:
        """(data offset, length) of every record of a TFRecord file (uncompressed, as TFDS writes:
        8-byte little-endian length, 4-byte length CRC, data, 4-byte data CRC)."""
        out = []
        with self._gfile.GFile(path, "rb") as f:
            size = self._gfile.stat(path).length
            position = 0
            while position < size:
                f.seek(position)
                header = f.read(12)
                if len(header) < 12:
                    raise InputError(path, f"truncated TFRecord file (header at byte {position})")
                (length,) = struct.unpack("<Q", header[:8])
                start = position + 12
                position = start + length + 4
                if position > size:
                    raise InputError(path, f"truncated TFRecord file (record at byte {start})")
                out.append((start, length))
        return out

    def __len__(self) -> int:
        return len(self.locations)

    def read(self, index: int, keys) -> dict:
        """The decoded features `keys` of example `index` (numpy)."""
        path, start, size = self.locations[index]
        with self._gfile.GFile(path, "rb") as f:
            f.seek(start)
            raw = f.read(size)
        if len(raw) != size:
            raise InputError(path, f"truncated TFRecord file (record at byte {start})")
        parsed = self._parser.parse_example(raw)
        return {key: self.features[key].decode_example_np(parsed[key]) for key in keys}


_META_KEYS = ("scan_id", "patient_id", "protocol", "site", "shape_zyx", "spacing_zyx_mm",
              "agatston", "category")


def _read_meta(records: _Records, task: str, neighbour_mm: float):
    """(ScanInfo list, record index per scan, per-slice positive flags) of the scans with the
    task's targets, without decoding any volume."""
    _, flag_key, has_key = _target_keys(task)
    scans, record_index, flags = [], [], []
    for index in range(len(records)):
        entry = records.entries[index] if records.entries else None
        # Calcium task: also the reference heart's slices (validation's heart slab).
        heart_keys = ("heart_slice", "has_heart_mask") if task == "calcium" else ()
        ex = (_indexed_meta(entry, task, flag_key, has_key) if entry is not None
              else records.read(index, (*_META_KEYS, flag_key, has_key, *heart_keys)))
        if not ex[has_key]:
            continue
        heart_slices = None
        if heart_keys:
            heart = (_indexed_meta(entry, "heart", *heart_keys) if entry is not None else ex)
            if heart["has_heart_mask"]:
                heart_slices = tuple(int(z) for z in np.flatnonzero(heart["heart_slice"]))
        agatston = float(ex["agatston"])
        spacing = tuple(float(v) for v in ex["spacing_zyx_mm"])
        scans.append(ScanInfo(
            scan_id=_text(ex["scan_id"]), patient_id=_text(ex["patient_id"]),
            protocol=_text(ex["protocol"]), site=_text(ex["site"]),
            shape_zyx=tuple(int(n) for n in ex["shape_zyx"]), spacing_zyx_mm=spacing,
            agatston=None if math.isnan(agatston) else agatston,
            category=None if int(ex["category"]) < 0 else int(ex["category"]),
            num_positive_slices=int(ex[flag_key].sum()),
            neighbour_offset=labels_lib.neighbour_offset(spacing[0], neighbour_mm),
            heart_slices=heart_slices))
        record_index.append(index)
        flags.append(np.asarray(ex[flag_key], bool))
    return scans, record_index, flags


def _indexed_meta(entry: dict, task: str, flag_key: str, has_key: str) -> dict:
    """A scan-index entry in the shape `_Records.read` gives the metadata keys."""
    targets = entry["targets"][task]
    flags = np.zeros(int(entry["shape_zyx"][0]), bool)
    flags[targets["positive"]] = True
    agatston = entry["agatston"]
    return {**{k: entry[k] for k in ("scan_id", "patient_id", "protocol", "site", "shape_zyx",
                                     "spacing_zyx_mm", "category")},
            "agatston": math.nan if agatston is None else agatston, flag_key: flags,
            has_key: targets["has"]}


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)



# Validation with `eval_slices="heart"` keeps the slices within this distance of the reference
# heart: the heart silhouette inference scores inside is the heart dilated by
# cac_jax.postprocess.DEFAULT_HEART_DILATION_MM (the same value; tests/test_validation.py).
HEART_REACH_MM = 3.0
EVAL_SLICES = ("all", "heart")


def eval_slice_mask(info: ScanInfo, eval_slices: str = "all") -> np.ndarray:
    """Which slices of a scan validation runs the model on (bool per slice).

    "all": every slice. "heart": the slices within HEART_REACH_MM of a slice holding the reference
    heart, which contain every slice the dilated heart silhouette reaches: the only slices where
    the scorer counts calcium, and the slices inference runs the calcium model on (with its
    predicted heart). A scan without a heart mask keeps every slice.
    """
    if eval_slices not in EVAL_SLICES:
        raise ValueError(f"config.data.eval_slices must be one of {', '.join(EVAL_SLICES)}, "
                         f"got {eval_slices!r}")
    num = int(info.shape_zyx[0])
    if eval_slices == "all" or info.heart_slices is None:
        return np.ones(num, bool)
    mask = np.zeros(num, bool)
    mask[list(info.heart_slices)] = True
    reach = int(math.ceil(HEART_REACH_MM / float(info.spacing_zyx_mm[0])))
    return ndimage.binary_dilation(mask, np.ones(2 * reach + 1, bool)) if reach else mask


def _host_slice_counts(builder, split: str, task: str, process_count: int,
                       eval_slices: str = "all", neighbour_mm: float = 3.0) -> list[int]:
    """Slices validated on each host's shard (for equal evaluation steps): those of the scans
    with the task's targets that `eval_slice_mask` keeps."""
    import tensorflow_datasets as tfds

    from data_pipeline.scan_index import read_scan_index, split_entries

    _, _, has_key = _target_keys(task)
    decoders = tfds.decode.PartialDecoding({"num_slices": True, has_key: True})
    counts = []
    index = read_scan_index(builder.data_dir)
    for process in range(process_count):
        host_split = _host_split(builder, split, process, process_count)
        if _num_examples(builder, host_split) == 0:
            counts.append(0)
            continue
        if eval_slices != "all":  # per-slice selection: the scans' metadata
            scans, _, _ = _read_meta(_Records(builder, host_split, index), task, neighbour_mm)
            counts.append(sum(int(eval_slice_mask(s, eval_slices).sum()) for s in scans))
            continue
        entries = split_entries(builder, host_split, index)
        if entries is not None:  # the build-time index: no record read
            counts.append(sum(int(e["shape_zyx"][0]) for e in entries
                              if e["targets"][task]["has"]))
            continue
        ds = builder.as_dataset(split=host_split, shuffle_files=False, decoders=decoders)
        counts.append(sum(int(ex["num_slices"]) for ex in tfds.as_numpy(ds) if ex[has_key]))
    return counts
