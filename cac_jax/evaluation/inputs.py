"""Reading the prediction and reference CSVs and matching each prediction to its reference row,
with every row left out listed with its reason."""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from data_pipeline.constants import NUM_CATEGORIES
from data_pipeline.errors import InputError

# The part of results.csv (docs/contracts.md) that evaluation needs.
PRED_COLUMNS = ("scan_id", "status", "agatston")
REF_COLUMNS = ("scan_id", "agatston")


class EvaluationInputError(InputError):
    """A prediction or reference CSV is missing, malformed, or matches nothing."""


@dataclasses.dataclass(frozen=True)
class PredRow:
    """One study of a `results.csv` with status ok and a valid score."""

    scan_id: str
    agatston: float
    volume_mm3: float | None
    protocol: str
    row_number: int


@dataclasses.dataclass(frozen=True)
class RefRow:
    """One reference row (manifest or plain CSV)."""

    scan_id: str
    agatston: float | None
    category: int | None  # given category (4 classes) when the CSV has one
    volume_mm3: float | None
    patient_id: str | None
    protocol: str
    row_number: int
    problem: str | None = None  # why this row cannot serve as a reference


@dataclasses.dataclass(frozen=True)
class Excluded:
    """A row that was not used, and why (listed in metrics.json and the report)."""

    scan_id: str
    source: str  # "pred", "pred2" or "ref"
    reason: str

    def to_json(self) -> dict[str, str]:
        return dataclasses.asdict(self)


def _read_csv(path: str | os.PathLike, required: Sequence[str],
              what: str) -> tuple[list[str], list[dict[str, str]]]:
    path = Path(path)
    if not path.is_file():
        raise EvaluationInputError(path, f"{what} file not found")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise EvaluationInputError(path, f"cannot read the {what} CSV: {err}") from err
    reader = csv.DictReader(io.StringIO(text))
    if reader.fieldnames is None:
        raise EvaluationInputError(path, f"{what} CSV is empty (no header row)")
    fields = [(name or "").strip() for name in reader.fieldnames]
    missing = [c for c in required if c not in fields]
    if missing:
        raise EvaluationInputError(path, f"{what} CSV lacks column(s) {', '.join(missing)} "
                                         f"(has: {', '.join(fields)})")
    rows = []
    for raw in reader:
        if raw.get(None):  # DictReader puts the fields beyond the header under None
            raise EvaluationInputError(
                path, f"line {reader.line_num}: {len(fields) + len(raw[None])} fields where the "
                      f"header has {len(fields)} (an unquoted comma in a value, such as a "
                      f"thousands separator?): {','.join(raw[None])!r} left over")
        rows.append({(k or "").strip(): (v or "").strip() for k, v in raw.items()})
    if not rows:
        raise EvaluationInputError(path, f"{what} CSV has a header but no rows")
    return fields, rows


def _score(text: str, column: str) -> tuple[float | None, str | None]:
    """Parses a non-negative finite number; returns (value, problem)."""
    if not text:
        return None, f"empty {column}"
    try:
        value = float(text)
    except ValueError:
        return None, f"{column} {text!r} is not a number"
    if not math.isfinite(value) or value < 0:
        return None, f"{column} {text!r} is not a finite number >= 0"
    return value, None


def read_predictions(path: str | os.PathLike, source: str = "pred"
                     ) -> tuple[dict[str, PredRow], list[Excluded]]:
    """Reads a `results.csv`: the usable rows by scan_id, and every row left out with its reason.

    Rows with `status` other than ok (the inference's error rows), scores that are not numbers, and
    repeated scan_ids (the first is kept) are left out and listed; a repeated scan_id scored
    differently is bad input (which score is the prediction is ambiguous).
    """
    _, records = _read_csv(path, PRED_COLUMNS, "prediction")
    rows: dict[str, PredRow] = {}
    excluded: list[Excluded] = []
    for number, record in enumerate(records, start=1):
        scan_id = record.get("scan_id", "")
        if not scan_id:
            excluded.append(Excluded(f"<row {number}>", source, "empty scan_id"))
            continue
        if scan_id in rows:
            first = rows[scan_id]
            agatston, problem = _score(record.get("agatston", ""), "agatston")
            if (record.get("status", "").lower() == "ok" and problem is None
                    and agatston != first.agatston):
                raise EvaluationInputError(
                    path, f"row {number}: scan_id {scan_id!r} again, scored {agatston:g} where "
                          f"row {first.row_number} scored it {first.agatston:g} (which one is "
                          "the prediction is ambiguous)")
            excluded.append(Excluded(scan_id, source, f"duplicate scan_id (row {number}; the "
                                                      f"first row {first.row_number} is used)"))
            continue
        status = record.get("status", "").lower()
        if status != "ok":
            error = record.get("error", "") or "no error message"
            excluded.append(Excluded(scan_id, source, f"status {status or '(empty)'}: {error}"))
            continue
        agatston, problem = _score(record.get("agatston", ""), "agatston")
        if problem:
            excluded.append(Excluded(scan_id, source, problem))
            continue
        volume, _ = _score(record.get("volume_mm3", ""), "volume_mm3")
        rows[scan_id] = PredRow(scan_id, agatston, volume, record.get("protocol", "").lower(),
                                number)
    return rows, excluded


def read_reference(path: str | os.PathLike) -> tuple[dict[str, RefRow], list[str]]:
    """Reads a manifest or any CSV with `scan_id` and `agatston`: rows by scan_id, and columns.

    A row whose score is missing or invalid is kept with its `problem`, so a prediction that
    matches it is listed with that reason rather than reported as unmatched. A repeated scan_id
    is bad input (which row would be the reference is ambiguous).
    """
    fields, records = _read_csv(path, REF_COLUMNS, "reference")
    rows: dict[str, RefRow] = {}
    for number, record in enumerate(records, start=1):
        scan_id = record.get("scan_id", "")
        if not scan_id:
            continue  # nothing can match it; blank lines of a spreadsheet export
        if scan_id in rows:
            raise EvaluationInputError(path, f"row {number}: duplicate scan_id {scan_id!r} (also "
                                             f"on row {rows[scan_id].row_number})")
        agatston, problem = _score(record.get("agatston", ""), "reference agatston")
        category = None
        if record.get("category"):
            try:
                category = int(record["category"])
            except ValueError:
                problem = problem or f"category {record['category']!r} is not an integer"
            else:
                if not 0 <= category < NUM_CATEGORIES:
                    problem = problem or f"category {category} is not one of 0-{NUM_CATEGORIES - 1}"
                    category = None
        volume, _ = _score(record.get("volume_mm3", ""), "volume_mm3")
        rows[scan_id] = RefRow(scan_id, agatston, category, volume,
                               record.get("patient_id") or None,
                               record.get("protocol", "").lower(), number, problem)
    return rows, fields


@dataclasses.dataclass(frozen=True)
class Case:
    """One matched case: a prediction (or two) and its reference."""

    scan_id: str
    reference_scan_id: str
    protocol: str
    reference_agatston: float
    reference_category: int | None  # the reference CSV's own 4-class category, if given
    reference_volume: float | None
    agatston: float
    volume: float | None
    agatston_2: float | None = None
    volume_2: float | None = None
    patient_id: str | None = None  # the reference's patient_id: the bootstrap resamples patients


def match_cases(pred: dict[str, PredRow], ref: dict[str, RefRow], *,
                ref_protocol: str | None = None, pred2: dict[str, PredRow] | None = None,
                ref_path: str = "reference", left_out: Iterable[str] = (),
                ) -> tuple[list[Case], list[Excluded]]:
    """Pairs each prediction with its reference row; lists everything left out, with reasons.

    Same scan: a prediction's reference is the row with its scan_id. With `ref_protocol` (the
    paper's CTAC design) it is the row of the same patient with that protocol: the prediction's
    scan_id is looked up in the reference (a manifest with `patient_id` and `protocol`) for its
    patient. With `pred2`, only cases both models scored are kept, so both kappas are on the same
    cases. `left_out`: scan_ids whose prediction row was already left out (an error row, no
    score): their reference rows are not listed again as having no prediction.
    """
    by_patient: dict[str, list[RefRow]] = {}
    if ref_protocol is not None:
        for row in ref.values():
            if row.patient_id and row.protocol == ref_protocol:
                by_patient.setdefault(row.patient_id, []).append(row)
    cases: list[Case] = []
    excluded: list[Excluded] = []
    used_refs: set[str] = set()
    for scan_id, row in pred.items():
        own = ref.get(scan_id)
        if ref_protocol is None:
            target = own
            if target is None:
                excluded.append(Excluded(scan_id, "pred", f"no row with this scan_id in "
                                                          f"{ref_path}"))
                continue
        else:
            if own is None or not own.patient_id:
                excluded.append(Excluded(scan_id, "pred", f"scan_id not in {ref_path} (or no "
                                                          "patient_id there): its patient is "
                                                          "unknown"))
                continue
            if own.protocol == ref_protocol:
                target = own
            else:
                candidates = by_patient.get(own.patient_id, [])
                if len(candidates) != 1:
                    why = ("has no" if not candidates
                           else f"has {len(candidates)} (ambiguous)")
                    excluded.append(Excluded(scan_id, "pred", f"patient {own.patient_id!r} "
                                                              f"{why} {ref_protocol} scan in "
                                                              f"{ref_path}"))
                    continue
                target = candidates[0]
        used_refs.add(target.scan_id)
        if target.problem:
            excluded.append(Excluded(scan_id, "ref", f"reference row {target.row_number} "
                                                     f"({target.scan_id}): {target.problem}"))
            continue
        second = None
        if pred2 is not None:
            second = pred2.get(scan_id)
            if second is None:
                excluded.append(Excluded(scan_id, "pred2", "scored by the first model but not "
                                                           "(or not successfully) by the second"))
                continue
        protocol = (own.protocol if own is not None and own.protocol else row.protocol) or "unknown"
        cases.append(Case(scan_id, target.scan_id, protocol, target.agatston, target.category,
                          target.volume_mm3, row.agatston, row.volume_mm3,
                          None if second is None else second.agatston,
                          None if second is None else second.volume_mm3, target.patient_id))
    if pred2 is not None:
        for scan_id in pred2:
            if scan_id not in pred:
                excluded.append(Excluded(scan_id, "pred2", "scored by the second model but not "
                                                           "(or not successfully) by the first"))
    listed = set(left_out)
    if ref_protocol is not None:  # a left-out prediction's reference is its patient's row
        listed |= {r.scan_id for s in list(listed) if s in ref and ref[s].patient_id
                   for r in by_patient.get(ref[s].patient_id, [])}
    for scan_id, row in ref.items():
        if scan_id in used_refs or scan_id in pred or scan_id in listed:
            continue
        if ref_protocol is not None and row.protocol != ref_protocol:
            continue  # a scan of another protocol is a lookup row, not a reference
        excluded.append(Excluded(scan_id, "ref", "no prediction for this reference row"))
    return cases, excluded

