"""TFDS dataset of whole CT scans from a manifest (offline: local files only, no downloads).

One dataset stores both label kinds, so one build serves the calcium and the heart task (the input
pipeline picks the targets): per scan, HU as int16, the 3 training calcium classes (uint8, mapped by
`data_pipeline.labels.calcium_classes` at build time), the heart mask (uint8 {0, 1}), per-slice
"annotated calcium" / "has heart" flags for the sampler, spacing, protocol, ids, site, and the reference
Agatston score and category. Scans are stored whole (not as 3-slice windows, which would triple the
storage); the pipeline cuts windows. A scan without calcium labels or heart mask stores an empty
(0, 0, 0) array and `has_calcium_labels` / `has_heart_mask` = False.

Volumes are zlib-compressed records (`tfds.features.Tensor(..., encoding="zlib")`): CT compresses
well and decoding happens once per scan when the pipeline loads it.

Per scan the metadata also stores `shape_zyx` (so the input pipeline sizes its buffers before
decoding) and the slice flags are `annotated_calcium_slice` (any calcium label, coronary or not:
the calcium task's positive slices). The dataset's `metadata.json` records the neighbour distance
(`neighbour_mm`, 3 mm by default) and how many scans of each protocol get which slice offset.

Build: `cac-jax ingest --manifest M.csv --data-dir D [--name N] [--seed S] [--skip-bad]`, or
`CacCtBuilder(data_dir=D, manifest_path=M, split_seed=S).download_and_prepare()`. The result lives in
D/N/VERSION with `splits.json`/`splits.csv` (patient split assignment), `skipped.json` (rows left out
with `--skip-bad`) and a copy of the manifest beside TFDS's own files. Read it back with
`tfds.builder_from_directory(D/N/VERSION)` (no class needed) or `input_pipeline.make_dataset`.

`build_dataset` parses and checks the manifest (whole-file problems always, row problems unless
`skip_bad`) and the data directory before it creates anything, so a bad manifest leaves no
half-made dataset folder behind (and never removes an existing one with `overwrite`).

With `skip_bad`, every row's files are read once before the splits are assigned and the rows that
fail are skipped then, so the assignment (and the validation/test balance) covers exactly the scans
that go into the dataset, and no split is planned on rows that all fail (TFDS cannot write a split
without examples). The splits need each scan's CAC category before any record is written: a row
without `agatston`/`category` in the manifest is read and scored then (as is every row with
`skip_bad`), and its record reuses that score, so each scan is scored once; its files are read a
second time to write the record (holding every decoded scan until then would need the whole
cohort in RAM). Both reads can run in worker processes (`workers`, `cac-jax ingest --workers`;
`data_pipeline.scan_rows.map_rows`), the records written in the rows' order. A row that still
fails when its example is written (its files changed in between) is skipped there; the audit files
always describe the dataset as built: skipped scans are left out of splits.json/splits.csv (a
patient left with no scan disappears from them) and listed under "skipped" in splits.json (and in
skipped.json). A split left without any scan is reported as a warning (stderr by default) and
listed under "empty_splits" in splits.json.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from data_pipeline import labels as labels_lib
from data_pipeline import splits as splits_lib
from data_pipeline.agatston import cac_category
from data_pipeline.atomic import atomic_write_text
from data_pipeline.config import DATASET_VERSION
from data_pipeline.constants import CATEGORY_NAMES
from data_pipeline.errors import InputError, ManifestError
from data_pipeline.manifest import SPLITS, ManifestRow, parse_manifest
from data_pipeline.scan_rows import WARNINGS_KEY, map_rows, read_row, score_row

DEFAULT_NAME = "cac_ct"


def _volume(dtype) -> tfds.features.Tensor:
    return tfds.features.Tensor(shape=(None, None, None), dtype=dtype, encoding="zlib")


def features() -> tfds.features.FeaturesDict:
    """The stored features of one scan."""
    return tfds.features.FeaturesDict({
        "scan_id": tfds.features.Text(),
        "patient_id": tfds.features.Text(),
        "protocol": tfds.features.Text(),  # "cac" | "ctac"
        "site": tfds.features.Text(),
        "hu": _volume(np.int16),  # (z, y, x) Hounsfield units, rounded
        "calcium_class": _volume(np.uint8),  # (z, y, x) 0 background, 1 coronary, 2 non-coronary
        "heart_mask": _volume(np.uint8),  # (z, y, x) {0, 1}
        # Slices with any annotated calcium (label > 0: coronary or non-coronary): the sampler's
        # positive slices for the calcium task (both calcium classes are rare; see labels.py).
        "annotated_calcium_slice": tfds.features.Tensor(shape=(None,), dtype=np.bool_),
        "heart_slice": tfds.features.Tensor(shape=(None,), dtype=np.bool_),
        "has_calcium_labels": tfds.features.Tensor(shape=(), dtype=np.bool_),
        "has_heart_mask": tfds.features.Tensor(shape=(), dtype=np.bool_),
        "num_slices": tfds.features.Tensor(shape=(), dtype=np.int32),
        # (z, y, x) of `hu`: lets the input pipeline size its buffers before decoding any volume.
        "shape_zyx": tfds.features.Tensor(shape=(3,), dtype=np.int32),
        "spacing_zyx_mm": tfds.features.Tensor(shape=(3,), dtype=np.float32),
        "agatston": tfds.features.Tensor(shape=(), dtype=np.float32),  # NaN when unknown
        "category": tfds.features.Tensor(shape=(), dtype=np.int32),  # -1 when unknown
    })


def load_manifest(manifest_path: str | os.PathLike,
                  skip_bad: bool = False) -> tuple[list[ManifestRow], list[ManifestError]]:
    """The manifest's valid rows and row errors; raises `ManifestError` for a bad file, for the
    first bad row unless `skip_bad`, and when no row is usable."""
    rows, errors = parse_manifest(manifest_path)
    if errors and not skip_bad:
        more = f" (and {len(errors) - 1} more bad rows; --skip-bad skips them)" if len(
            errors) > 1 else " (--skip-bad skips bad rows)"
        raise ManifestError(errors[0].path, errors[0].problem + more)
    if not rows:
        raise ManifestError(manifest_path, "no usable rows in the manifest")
    return rows, errors


def _print_warning(line: str) -> None:
    print(f"warning: {line}", file=sys.stderr)


class CacCtBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Whole CT scans with calcium classes and heart masks, from a local manifest."""

    name = DEFAULT_NAME
    VERSION = tfds.core.Version(DATASET_VERSION)
    RELEASE_NOTES = {
        "1.0.0": "Whole scans; calcium classes and heart mask in one dataset.",
        "1.1.0": "annotated_calcium_slice (was calcium_slice), shape_zyx; neighbour distance and "
                 "the resulting slice offsets in the metadata.",
    }

    def __init__(self, *, manifest_path: str | os.PathLike | None = None, split_seed: int = 0,
                 skip_bad: bool = False, progress: bool = True,
                 on_skip: Callable[[str], None] | None = None,
                 on_warning: Callable[[str], None] | None = None,
                 parsed_manifest: tuple[list[ManifestRow], list[ManifestError]] | None = None,
                 neighbour_mm: float = labels_lib.DEFAULT_NEIGHBOUR_MM,
                 workers: int = 1, **kwargs):
        """`parsed_manifest`: the result of `load_manifest` when the caller already checked it;
        `on_warning` gets warnings such as an empty split (default: printed to stderr);
        `neighbour_mm`: the neighbour distance recorded in the metadata with the slice offsets it
        gives these scans (training uses `config.data.neighbour_mm`; see docs/input_pipeline.md);
        `workers`: processes reading the studies at once (`data_pipeline.scan_rows.map_rows`)."""
        # Set before the base __init__, which may call _info().
        self.manifest_path = None if manifest_path is None else Path(manifest_path)
        self.split_seed = int(split_seed)
        self.skip_bad = skip_bad
        self.progress = progress
        self.on_skip = on_skip
        self.on_warning = _print_warning if on_warning is None else on_warning
        self.parsed_manifest = parsed_manifest
        self.neighbour_mm = float(neighbour_mm)
        self.workers = max(1, int(workers))
        labels_lib.neighbour_offset(3.0, self.neighbour_mm)  # rejects a bad distance up front
        self.neighbour_offsets: dict[str, dict[str, int]] = {}
        self.skipped: list[dict[str, str]] = []
        self.assignment: list[splits_lib.PatientSplit] = []
        # Agatston of each scan scored from its labels while assigning splits (None: not scored).
        self.scores: dict[str, float | None] = {}
        self._built_now = False
        super().__init__(**kwargs)

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        """None: an offline builder has no checksums file beside its code to look up.

        (TFDS otherwise resolves the module as a package resource, which needs the optional
        `importlib_resources` package.)
        """
        return None

    def _info(self) -> tfds.core.DatasetInfo:
        # dataset_info_from_configs() needs a registered package's metadata; this works anywhere.
        return tfds.core.DatasetInfo(
            builder=self,
            description=("Whole CT scans (HU int16), 3-class calcium labels, heart masks, spacing, "
                         "protocol, ids and reference Agatston scores, from a cac-jax manifest."),
            features=features(),
            metadata=tfds.core.MetadataDict(),
        )

    def _skip(self, where: str, problem: str, scan_id: str | None = None) -> None:
        entry = {"row": where, "problem": problem}
        if scan_id is not None:
            entry["scan_id"] = scan_id
        self.skipped.append(entry)
        if self.on_skip is not None:
            self.on_skip(f"skipped {where}: {problem}")

    def _split_generators(self, dl_manager):
        del dl_manager  # offline: every file is local and named by the manifest
        if self.manifest_path is None:
            raise ManifestError(None, "building the dataset needs manifest_path")
        rows, errors = self.parsed_manifest or load_manifest(self.manifest_path, self.skip_bad)
        for err in errors:
            self._skip(str(err.problem).split(":")[0], str(err))

        if self.skip_bad:
            rows = self._readable_rows(rows)

        # Rows the manifest gives no score or category are read and scored once, here (or in
        # _readable_rows), `workers` at a time; the score is reused for their records.
        unscored = [row for row in rows if row.category is None and row.agatston is None
                    and row.scan_id not in self.scores]
        for row, score in map_rows(score_row, unscored, self.workers,
                                   manifest_path=self.manifest_path):
            if isinstance(score, ManifestError):
                raise score
            self.scores[row.scan_id] = score

        def category_of(row: ManifestRow) -> int | None:
            if row.scan_id not in self.scores:
                self.scores[row.scan_id] = score_row(row, self.manifest_path)
            score = self.scores[row.scan_id]
            return None if score is None else cac_category(score)

        self.assignment = splits_lib.assign_splits(rows, seed=self.split_seed,
                                                   category_of=category_of,
                                                   manifest=self.manifest_path)
        by_scan = splits_lib.scan_splits(self.assignment)
        self._built_now = True
        generators = {}
        for split in SPLITS:
            split_rows = [row for row in rows if by_scan[row.scan_id] == split]
            if split_rows:
                generators[split] = self._generate_examples(split, split_rows)
        return generators

    def _readable_rows(self, rows: list[ManifestRow]):
        """The rows whose files read (scored into `self.scores`); the others are skipped."""
        from tqdm import tqdm

        good = []
        checked = map_rows(score_row, rows, self.workers, manifest_path=self.manifest_path)
        for row, score in tqdm(checked, total=len(rows), desc="check", unit="scan",
                               disable=not self.progress):
            if isinstance(score, ManifestError):
                self._skip(row.where, str(score), scan_id=row.scan_id)
                continue
            self.scores[row.scan_id] = score
            good.append(row)
        if not good:
            raise ManifestError(self.manifest_path, "no row of the manifest could be read "
                                                    f"({len(self.skipped)} skipped)")
        return good

    def _generate_examples(self, split: str, rows: list[ManifestRow]) -> Iterator[tuple[str, dict]]:
        from tqdm import tqdm

        examples = map_rows(read_row, rows, self.workers, manifest_path=self.manifest_path,
                            per_row=lambda row: {"scored_agatston": self.scores.get(row.scan_id)})
        for row, example in tqdm(examples, total=len(rows), desc=f"ingest {split}",
                                 unit="scan", disable=not self.progress):
            if isinstance(example, ManifestError):
                if not self.skip_bad:
                    raise example
                self._skip(row.where, str(example), scan_id=row.scan_id)
                continue
            for warning in example.pop(WARNINGS_KEY, ()):
                self.on_warning(f"{self.manifest_path}: {row.where}: {warning}")
            self._record_neighbours(row.protocol, float(example["spacing_zyx_mm"][0]))
            yield row.scan_id, example

    def _record_neighbours(self, protocol: str, spacing_z_mm: float) -> None:
        """Counts scans per (protocol, slice offset) for the metadata: what `neighbour_mm` means
        on this dataset (e.g. CTAC at 5 mm keeps offset 1, a 0.625 mm series gets 5)."""
        offset = str(labels_lib.neighbour_offset(spacing_z_mm, self.neighbour_mm))
        counts = self.neighbour_offsets.setdefault(protocol, {})
        counts[offset] = counts.get(offset, 0) + 1
        # Saved with the dataset (metadata.json) when TFDS writes its info after generation.
        self.info.metadata["neighbour_mm"] = self.neighbour_mm
        self.info.metadata["neighbour_offsets"] = self.neighbour_offsets

    def download_and_prepare(self, *args, **kwargs):
        """Builds the dataset (if absent), then writes the audit files next to it and warns
        about splits left empty."""
        super().download_and_prepare(*args, **kwargs)
        if self._built_now:
            self.write_audit(Path(self.data_dir))
            from data_pipeline.scan_index import write_scan_index

            write_scan_index(self, self.data_dir)
            for split in splits_lib.empty_splits(self.built_assignment()):
                self.on_warning(
                    f"split {split!r} is empty (no scans in the dataset), so nothing can be "
                    f"trained or evaluated on it: too few patients with a known CAC category "
                    f"(validation and test get one each from {splits_lib.MIN_PATIENTS_FOR_EVAL} "
                    "patients to assign on), or the manifest's split column or skipped rows "
                    "leave none for it")
            for category in splits_lib.unevaluated_categories(self.built_assignment()):
                self.on_warning(
                    f"CAC category {CATEGORY_NAMES[category]} has too few patients to evaluate on: they "
                    "stay in training (the split keeps one patient of every category there), so "
                    "validation and test hold none of it")

    def built_assignment(self) -> list[splits_lib.PatientSplit]:
        """The patient assignment restricted to the scans in the dataset (skipped rows removed)."""
        skipped_ids = {entry["scan_id"] for entry in self.skipped if "scan_id" in entry}
        return splits_lib.drop_scans(self.assignment, skipped_ids)

    def write_audit(self, directory: Path) -> None:
        """splits.json/.csv (scans in the dataset only), skipped.json and a copy of the manifest,
        next to the dataset."""
        splits_lib.write_split_audit(directory, self.built_assignment(), seed=self.split_seed,
                                     manifest=self.manifest_path, skipped=self.skipped)
        atomic_write_text(directory / "skipped.json", json.dumps(self.skipped, indent=2) + "\n")
        if self.manifest_path is not None:
            shutil.copyfile(self.manifest_path, directory / "manifest.csv")


def dataset_dir(data_dir: str | os.PathLike, name: str = DEFAULT_NAME,
                version: str = DATASET_VERSION) -> Path:
    """Where a built dataset lives: DATA_DIR/NAME/VERSION."""
    return Path(data_dir).expanduser() / name / version


def check_data_dir(data_dir: str | os.PathLike, name: str = DEFAULT_NAME) -> Path:
    """DATA_DIR/NAME/VERSION, after checking that no existing part of that path is a file
    (`InputError` naming it); nothing is created."""
    target = dataset_dir(data_dir, name)
    probe = target
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        where = "" if probe == Path(data_dir).expanduser() else f" (the dataset goes to {target})"
        raise InputError(probe, f"is a file, not a directory{where}; --data-dir must be a "
                                "directory (it is created when missing)")
    return target


def _builder_class(name: str) -> type[CacCtBuilder]:
    """The builder class for dataset `name` (a subclass when it is not the default name)."""
    if name == DEFAULT_NAME:
        return CacCtBuilder
    if not name.isidentifier() or name != name.lower():
        raise InputError(None, f"dataset name {name!r} must be lower_snake_case "
                               "(letters, digits, underscores)")
    return type(f"CacCtBuilder_{name}", (CacCtBuilder,), {"name": name}, skip_registration=True)


def make_builder(data_dir: str | os.PathLike, *, manifest_path: str | os.PathLike | None = None,
                 name: str = DEFAULT_NAME, split_seed: int = 0, skip_bad: bool = False,
                 progress: bool = True, on_skip: Callable[[str], None] | None = None,
                 on_warning: Callable[[str], None] | None = None,
                 parsed_manifest: tuple[list[ManifestRow], list[ManifestError]] | None = None,
                 neighbour_mm: float = labels_lib.DEFAULT_NEIGHBOUR_MM,
                 workers: int = 1) -> CacCtBuilder:
    """A builder instance writing to DATA_DIR/NAME/VERSION (`name` gives the dataset its name)."""
    cls = _builder_class(name)
    return cls(data_dir=os.fspath(Path(data_dir).expanduser()), manifest_path=manifest_path,
               split_seed=split_seed, skip_bad=skip_bad, progress=progress, on_skip=on_skip,
               on_warning=on_warning, parsed_manifest=parsed_manifest,
               neighbour_mm=neighbour_mm, workers=workers)


def build_dataset(manifest_path: str | os.PathLike, data_dir: str | os.PathLike, *,
                  name: str = DEFAULT_NAME, split_seed: int = 0, skip_bad: bool = False,
                  overwrite: bool = False, progress: bool = True,
                  on_skip: Callable[[str], None] | None = None,
                  on_warning: Callable[[str], None] | None = None,
                  neighbour_mm: float = labels_lib.DEFAULT_NEIGHBOUR_MM,
                  workers: int = 1) -> CacCtBuilder:
    """Builds the dataset from a manifest into DATA_DIR/NAME/VERSION; returns the builder.

    The data directory and the manifest are checked before anything is created or removed.
    `on_warning` receives warnings such as an empty split (default: printed to stderr);
    `workers`: processes reading the studies at once (the records are the same).
    """
    _builder_class(name)  # a bad name fails here, before anything is touched
    target = check_data_dir(data_dir, name)
    parsed = load_manifest(manifest_path, skip_bad)
    with _build_lock(target.parent):
        _remove_unfinished(target, on_warning)
        return _build(target, manifest_path, data_dir, parsed, name=name, split_seed=split_seed,
                      skip_bad=skip_bad, overwrite=overwrite, progress=progress, on_skip=on_skip,
                      on_warning=on_warning, neighbour_mm=neighbour_mm, workers=workers)


@contextlib.contextmanager
def _build_lock(folder: Path):
    """An exclusive lock on DATA_DIR/NAME (`.ingest.lock`) for the whole build: a second ingest
    into the same dataset is refused with one line instead of racing the first."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle = open(folder / ".ingest.lock", "a+")  # noqa: SIM115 (held for the block)
    except OSError as err:
        raise InputError(err.filename or folder, f"cannot build the dataset here: "
                                                 f"{err.strerror or err}") from None
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InputError(folder, "another `cac-jax ingest` is building this dataset now; "
                                     "wait for it or use another --name") from None
        yield
    finally:
        handle.close()  # releases the lock


def _remove_unfinished(target: Path, on_warning: Callable[[str], None] | None) -> None:
    """Tidies what a killed build left beside `target` (under the build lock, nothing there
    belongs to a running build): TFDS builds into `NAME/incomplete.XXXXXX_VERSION/`, removed; a
    killed `--overwrite` rebuild had set the old dataset aside (`_set_aside`): put back when no
    dataset took its place, else removed (the rebuild finished)."""
    warn = on_warning or _print_warning
    for stale in sorted(target.parent.glob(f"incomplete.*_{target.name}")):
        if stale.is_dir():
            shutil.rmtree(stale)
            warn(f"removed {stale}: the unfinished build of an interrupted ingest")
    aside = sorted((p for p in target.parent.glob(f".{target.name}.replaced-*") if p.is_dir()),
                   key=lambda p: p.stat().st_mtime)
    if not aside:
        return
    if (target / "dataset_info.json").exists():  # the rebuild finished: the old one is spare
        for stale in aside:
            shutil.rmtree(stale)
            warn(f"removed {stale}: the dataset a finished --overwrite rebuild replaced")
        return
    if target.is_dir() and not any(target.iterdir()):
        target.rmdir()  # what an interrupted run leaves: no dataset
    if target.exists():
        warn(f"kept {aside[-1]}: the dataset an interrupted --overwrite rebuild had set aside; "
             f"{target} holds files but no finished dataset")
        return
    os.replace(aside[-1], target)
    warn(f"restored {target}: the dataset an interrupted --overwrite rebuild had set aside")


def _build(target: Path, manifest_path, data_dir, parsed, *, name, split_seed, skip_bad,
           overwrite, progress, on_skip, on_warning, neighbour_mm, workers) -> CacCtBuilder:
    previous = _set_aside(target, overwrite)  # only once the inputs are checked
    try:
        builder = make_builder(data_dir, manifest_path=manifest_path, name=name,
                               split_seed=split_seed, skip_bad=skip_bad, progress=progress,
                               on_skip=on_skip, on_warning=on_warning, parsed_manifest=parsed,
                               neighbour_mm=neighbour_mm, workers=workers)
        # One progress bar (ours, per scan) instead of TFDS's several per split.
        tfds.disable_progress_bar()
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(
                download_mode=tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS))
    except BaseException as err:
        if previous is not None:  # a failed rebuild leaves the old dataset as it was
            if target.exists():
                shutil.rmtree(target)
            os.replace(previous, target)
        # A full or read-only disk, also as TensorFlow reports it (ResourceExhaustedError in a
        # RuntimeError): one line, not TFDS's traceback.
        reason = next((r for r in ("No space left on device", "Disk quota exceeded",
                                   "Read-only file system") if r in str(err)), None)
        if reason is not None and not isinstance(err, InputError):
            raise InputError(target.parent, f"cannot write the dataset: {reason}"
                             + ("; the dataset built before is kept" if previous else "")) \
                from None
        raise
    if previous is not None:
        shutil.rmtree(previous, ignore_errors=True)
    return builder


def _set_aside(target: Path, overwrite: bool) -> Path | None:
    """Makes room for a build at `target`; returns where an existing dataset was moved.

    An existing dataset (or any non-empty folder) needs `overwrite`, and is only renamed beside
    the target, so a rebuild that fails can put it back; an empty folder (left by an interrupted
    run) is removed, since TFDS would take it for a finished dataset and build nothing.
    """
    if not target.is_dir():
        return None
    if not any(target.iterdir()):
        target.rmdir()
        return None
    if not overwrite:
        what = ("dataset already built here" if (target / "dataset_info.json").exists()
                else "folder holds files but no finished dataset")
        raise InputError(target, f"{what}; pass --overwrite to rebuild it or --name to build "
                                 "another")
    previous = target.with_name(f".{target.name}.replaced-{os.getpid()}")
    if previous.exists():
        shutil.rmtree(previous)
    os.replace(target, previous)
    return previous
