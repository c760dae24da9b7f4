"""The study manifest: one CSV row per scan, the contract between users' data and the pipeline.

Columns (docs/contracts.md, "The manifest"): `patient_id, scan_id, protocol (cac|ctac), image,
calcium_labels` are required; `heart_mask, site, split, series, agatston, category` are optional (a
missing column means empty in every row). `series` picks a DICOM series of `image` by SeriesNumber
or SeriesInstanceUID (`data_pipeline.io.read_study`); `agatston` and `category` are the reference
score and category (the synthetic cohort always writes them). Paths are relative to the manifest's
folder (absolute paths also work). `calcium_labels` and `heart_mask` may be empty (inference-only
rows); `split` may be empty (the dataset builder then splits by patient).

Inference-only use (`parse_manifest(path, inference=True)`, `read_manifest(..., inference=True)`)
needs only `scan_id`, `image` and `protocol`; `patient_id` then defaults to the scan id.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from data_pipeline.atomic import atomic_write_text
from data_pipeline.constants import NUM_CATEGORIES  # the `category` column: the paper's four
from data_pipeline.errors import ManifestError

REQUIRED_COLUMNS = ("patient_id", "scan_id", "protocol", "image", "calcium_labels")
INFERENCE_COLUMNS = ("scan_id", "image", "protocol")
OPTIONAL_COLUMNS = ("heart_mask", "site", "split", "agatston", "category", "series")
# The order write_manifest writes them in: the contract's columns in its order (docs/contracts.md),
# then this project's own `series`, so a reader that goes by position finds them where it expects.
COLUMNS = ("patient_id", "scan_id", "protocol", "image", "calcium_labels", "heart_mask", "site",
           "split", "agatston", "category", "series")
PROTOCOLS = ("cac", "ctac")
SPLITS = ("train", "validation", "test")
_SPLIT_ALIASES = {"train": "train", "training": "train", "validation": "validation",
                  "val": "validation", "valid": "validation", "test": "test", "testing": "test"}


@dataclasses.dataclass(frozen=True)
class ManifestRow:
    """One scan of the manifest, with paths resolved against the manifest's folder."""

    patient_id: str
    scan_id: str
    protocol: str  # "cac" | "ctac"
    image: Path
    calcium_labels: Path | None
    heart_mask: Path | None
    site: str
    split: str | None  # "train" | "validation" | "test" | None (assign by patient)
    agatston: float | None = None
    category: int | None = None
    row_number: int = 0  # 1-based data row number in the file (header is row 0)
    series: str | None = None  # DICOM SeriesNumber or SeriesInstanceUID to read; None: default

    @property
    def where(self) -> str:
        """How error messages name this row."""
        return f"row {self.row_number} (scan_id={self.scan_id!r})"


def _optional_path(base: Path, value: str) -> Path | None:
    value = value.strip()
    if not value:
        return None
    path = Path(value).expanduser()
    return path if path.is_absolute() else base / path


def parse_manifest(
    path: str | os.PathLike, *, check_files: bool = True, inference: bool = False
) -> tuple[list[ManifestRow], list[ManifestError]]:
    """Parses a manifest, returning the valid rows and one error per invalid row.

    `inference`: only `scan_id`, `image` and `protocol` are required (patient_id defaults to the
    scan id). Problems with the file as a whole (missing, no header, missing columns) raise
    `ManifestError`.
    Row problems (unknown protocol, empty ids, missing files when `check_files`, duplicate
    scan ids, bad numbers) are collected so a batch job can report them and go on (`--skip-bad`).
    """
    path = Path(path)
    if not path.is_file():
        raise ManifestError(path, "manifest file not found")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise ManifestError(path, f"cannot read manifest: {err}") from err
    reader = csv.DictReader(io.StringIO(text))
    if reader.fieldnames is None:
        raise ManifestError(path, "manifest is empty (no header row)")
    fieldnames = [name.strip() for name in reader.fieldnames]
    repeated = sorted({name for name in fieldnames if name and fieldnames.count(name) > 1})
    if repeated:
        raise ManifestError(path, f"column(s) {', '.join(repeated)} appear more than once in the "
                                  "header (which one is meant is ambiguous)")
    required = INFERENCE_COLUMNS if inference else REQUIRED_COLUMNS
    missing = [c for c in required if c not in fieldnames]
    if missing:
        raise ManifestError(path, f"manifest lacks required column(s) {', '.join(missing)}; "
                                  f"expected at least {', '.join(required)} (optional: "
                                  f"{', '.join(c for c in COLUMNS if c not in required)})")
    rows: list[ManifestRow] = []
    errors: list[ManifestError] = []
    seen_scan_ids: dict[str, int] = {}
    for number, raw in enumerate(reader, start=1):
        record = {(k or "").strip(): (v or "").strip() for k, v in raw.items() if k is not None}
        if inference and not record.get("patient_id"):
            record["patient_id"] = record.get("scan_id", "")
        scan_id = record.get("scan_id", "")
        where = f"row {number} (scan_id={scan_id!r})"
        if raw.get(None):  # DictReader puts the fields beyond the header under None
            errors.append(ManifestError(path, f"{where}, line {reader.line_num}: "
                                              f"{len(fieldnames) + len(raw[None])} fields where "
                                              f"the header has {len(fieldnames)} (an unquoted "
                                              "comma in a value?)"))
            continue
        try:
            rows.append(_parse_row(record, path, number, where, check_files, seen_scan_ids))
        except ManifestError as err:
            errors.append(err)
    if not rows and not errors:
        raise ManifestError(path, "manifest has a header but no rows")
    return rows, errors


def _parse_row(record: dict[str, str], manifest_path: Path, number: int, where: str,
               check_files: bool, seen_scan_ids: dict[str, int]) -> ManifestRow:
    base = manifest_path.parent

    def fail(problem: str) -> ManifestError:
        return ManifestError(manifest_path, f"{where}: {problem}")

    for column in ("patient_id", "scan_id", "image"):
        if not record.get(column):
            raise fail(f"empty {column}")
    scan_id = record["scan_id"]
    if scan_id in seen_scan_ids:
        raise fail(f"duplicate scan_id (also on row {seen_scan_ids[scan_id]})")
    protocol = record.get("protocol", "").lower()
    if protocol not in PROTOCOLS:
        raise fail(f"unknown protocol {record.get('protocol', '')!r}; expected one of "
                   f"{', '.join(PROTOCOLS)}")
    split_value = record.get("split", "").lower()
    split = None
    if split_value:
        if split_value not in _SPLIT_ALIASES:
            raise fail(f"unknown split {record['split']!r}; expected one of {', '.join(SPLITS)} "
                       "or empty")
        split = _SPLIT_ALIASES[split_value]
    agatston = None
    if record.get("agatston"):
        try:
            agatston = float(record["agatston"])
        except ValueError:
            raise fail(f"agatston {record['agatston']!r} is not a number") from None
        if not math.isfinite(agatston) or agatston < 0:
            raise fail(f"agatston {record['agatston']!r} must be a finite number >= 0")
    category = None
    if record.get("category"):
        try:
            category = int(record["category"])
        except ValueError:
            raise fail(f"category {record['category']!r} is not an integer") from None
        if not 0 <= category < NUM_CATEGORIES:
            raise fail(f"category {category} is not one of the paper's four CAC categories "
                       "0 (0), 1 (1-100), 2 (101-400), 3 (>400)")
    image = _optional_path(base, record["image"])
    calcium_labels = _optional_path(base, record.get("calcium_labels", ""))
    heart_mask = _optional_path(base, record.get("heart_mask", ""))
    if check_files:
        for column, value in (("image", image), ("calcium_labels", calcium_labels),
                              ("heart_mask", heart_mask)):
            if value is not None and not value.exists():
                raise fail(f"{column} file not found: {value}")
    seen_scan_ids[scan_id] = number
    return ManifestRow(
        patient_id=record["patient_id"], scan_id=scan_id, protocol=protocol, image=image,
        calcium_labels=calcium_labels, heart_mask=heart_mask, site=record.get("site", ""),
        split=split, agatston=agatston, category=category, row_number=number,
        series=record.get("series") or None)


def read_manifest(path: str | os.PathLike, *, check_files: bool = True,
                  inference: bool = False) -> list[ManifestRow]:
    """Parses a manifest and raises `ManifestError` on the first invalid row (`inference`: as
    `parse_manifest`)."""
    rows, errors = parse_manifest(path, check_files=check_files, inference=inference)
    if errors:
        first = errors[0]
        more = f" (and {len(errors) - 1} more bad rows)" if len(errors) > 1 else ""
        raise ManifestError(first.path, first.problem + more)
    return rows


def _relative(path: Path | None, base: Path) -> str:
    if path is None:
        return ""
    try:
        return Path(os.path.relpath(Path(path).resolve(), base.resolve())).as_posix()
    except ValueError:  # different drives on Windows
        return Path(path).as_posix()


def write_manifest(path: str | os.PathLike, rows: Iterable[ManifestRow]) -> None:
    """Writes rows as a manifest CSV (atomically), paths relative to the manifest's folder."""
    path = Path(path)
    base = path.parent
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(COLUMNS)
    for row in rows:
        writer.writerow([
            row.patient_id, row.scan_id, row.protocol, _relative(row.image, base),
            _relative(row.calcium_labels, base), _relative(row.heart_mask, base), row.site,
            row.split or "",
            "" if row.agatston is None else f"{row.agatston:.4f}",
            "" if row.category is None else str(row.category),
            row.series or "",
        ])
    atomic_write_text(path, buffer.getvalue())


def patients(rows: Sequence[ManifestRow]) -> list[str]:
    """Patient ids in first-seen order."""
    return list(dict.fromkeys(row.patient_id for row in rows))
