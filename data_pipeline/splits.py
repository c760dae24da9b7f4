"""Patient-level train/validation/test assignment (numpy only), as in the paper.

Paper, "Methods": "A train-validation-internal testing split of 80:10:10 was used with equal number
of cases from each CAC category in the internal validation and testing sets."

Rules:
- A patient is never in two splits (all of a patient's scans follow the patient).
- When the manifest's `split` column is filled for a patient, it is used (and must agree across that
  patient's rows). Patients without a split are assigned by the balanced rule below.
- Balanced rule: validation and test each get round(10%) of the patients to assign (halves
  rounded up), but at least one each when there are at least 3 (a small cohort would otherwise get
  no validation or test set at all). They are filled round-robin over the four CAC categories
  (0, 1-100, 101-400, >400) in pairs, a random patient of a category to validation and another
  to test, so both splits hold the same number of each category; a category gives a pair only
  while it keeps at least one patient for training (training must see every category the
  cohort has). Where pairs cannot fill the target, single patients follow (to the smaller split,
  still keeping one per category for training), and only a cohort too small for that takes a
  category's last patient. The round-robin starts at a seeded random category, so a target below
  4 does not always favour the low categories. The rest is training. `unevaluated_categories`
  names the categories the cohort has that neither validation nor test got (the builder warns).
- `empty_splits` names the splits left without any scan; the dataset builder warns about them.
- A patient's category: that of the patient's CAC (gated) scan when there is one, else the highest
  category over the patient's scans (a CTAC-only patient). A scan's category comes from the
  manifest's `category`, else its `agatston`, else `category_of(row)` (the builder scores the
  reference labels). Patients whose category is unknown go to training.
- Deterministic for a seed: the same manifest and seed give the same assignment.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from data_pipeline.agatston import cac_category
from data_pipeline.atomic import atomic_write_text
from data_pipeline.constants import NUM_CATEGORIES
from data_pipeline.errors import ManifestError
from data_pipeline.manifest import SPLITS, ManifestRow

EVAL_FRACTION = 0.1  # paper: 80:10:10
# From this many patients to assign on, validation and test get at least one patient each.
MIN_PATIENTS_FOR_EVAL = 3


@dataclasses.dataclass(frozen=True)
class PatientSplit:
    """Where one patient went, and why (for the audit file)."""

    patient_id: str
    split: str  # "train" | "validation" | "test"
    category: int | None
    source: str  # "manifest" (split column) | "balanced" (assigned here)
    scan_ids: tuple[str, ...]


def scan_category(row: ManifestRow,
                  category_of: Callable[[ManifestRow], int | None] | None = None) -> int | None:
    """A scan's CAC category: the manifest's `category`, else from `agatston`, else `category_of`."""
    if row.category is not None:
        return min(int(row.category), NUM_CATEGORIES - 1)
    if row.agatston is not None:
        return cac_category(row.agatston)
    if category_of is not None:
        return category_of(row)
    return None


def patient_category(rows: Sequence[ManifestRow],
                     category_of: Callable[[ManifestRow], int | None] | None = None) -> int | None:
    """One patient's category: the CAC scan's if known, else the highest over the scans."""
    by_protocol = {}
    known = []
    for row in rows:
        category = scan_category(row, category_of)
        if category is not None:
            known.append(category)
            by_protocol.setdefault(row.protocol, category)
    if "cac" in by_protocol:
        return by_protocol["cac"]
    return max(known) if known else None


def given_splits(by_patient: dict[str, list[ManifestRow]],
                 manifest: str | os.PathLike | None = None) -> dict[str, str]:
    """patient_id -> the split the manifest's split column gives the patient (patients without
    one are left out). Raises `ManifestError` (naming `manifest`) when one patient's rows name
    different splits."""
    given: dict[str, str] = {}
    for patient_id, patient_rows in by_patient.items():
        named = {row.split for row in patient_rows if row.split}
        if len(named) > 1:
            where = ", ".join(f"{row.where}: {row.split or '(empty)'}" for row in patient_rows)
            raise ManifestError(manifest, f"patient {patient_id!r} is in more than one split "
                                          f"({where}); a patient's scans must share one split")
        if named:
            given[patient_id] = named.pop()
    return given


def assign_splits(rows: Sequence[ManifestRow], *, seed: int = 0,
                  category_of: Callable[[ManifestRow], int | None] | None = None,
                  eval_fraction: float = EVAL_FRACTION,
                  manifest: str | os.PathLike | None = None) -> list[PatientSplit]:
    """Assigns every patient of `rows` to a split; returns one record per patient (first-seen order).

    Raises `ManifestError` when one patient's rows name different splits.
    """
    by_patient: dict[str, list[ManifestRow]] = {}
    for row in rows:
        by_patient.setdefault(row.patient_id, []).append(row)

    given = given_splits(by_patient, manifest)

    categories: dict[str, int | None] = {}
    for patient_id, patient_rows in by_patient.items():
        if patient_id in given:
            # Only needed for the audit; do not score reference labels just for that.
            categories[patient_id] = patient_category(patient_rows)
        else:
            categories[patient_id] = patient_category(patient_rows, category_of)

    free = [p for p in by_patient if p not in given]
    assigned = _balanced(free, categories, len(free), seed, eval_fraction)
    out = []
    for patient_id, patient_rows in by_patient.items():
        split, source = (given[patient_id], "manifest") if patient_id in given else (
            assigned[patient_id], "balanced")
        out.append(PatientSplit(patient_id, split, categories[patient_id], source,
                                tuple(row.scan_id for row in patient_rows)))
    return out


def _balanced(patients: Sequence[str], categories: dict[str, int | None], total: int, seed: int,
              eval_fraction: float) -> dict[str, str]:
    """Validation and test in pairs per category, round-robin, keeping one patient of every
    category for training; single patients where pairs cannot fill them (module docstring)."""
    rng = np.random.default_rng(seed)
    target = int(math.floor(eval_fraction * total + 0.5))  # 2.5 -> 3, not Python's even 2
    if total >= MIN_PATIENTS_FOR_EVAL:
        target = max(1, target)
    pools: list[list[str]] = []
    for category in range(NUM_CATEGORIES):
        # Sorted then permuted: the result depends on the seed and the set of patients only.
        members = sorted(p for p in patients if categories[p] == category)
        pools.append([members[i] for i in rng.permutation(len(members))])
    # Seeded start of the round-robin: with a target below 4 only the first categories in turn get
    # a patient, and always starting at category 0 would leave the high ones out of evaluation.
    start = int(rng.integers(NUM_CATEGORIES))
    pools = pools[start:] + pools[:start]
    chosen: dict[str, list[str]] = {"validation": [], "test": []}

    def room(split: str) -> bool:
        return len(chosen[split]) < target

    progressed = True
    while progressed and room("validation") and room("test"):  # pairs, one left for training
        progressed = False
        for pool in pools:
            if len(pool) >= 3 and room("validation") and room("test"):
                chosen["validation"].append(pool.pop())
                chosen["test"].append(pool.pop())
                progressed = True
    for keep in (1, 0):  # singles: first keeping one per category for training, then not
        progressed = True
        while progressed:
            progressed = False
            for pool in pools:
                open_splits = [split for split in ("validation", "test") if room(split)]
                if len(pool) > keep and open_splits:
                    smaller = min(open_splits, key=lambda split: len(chosen[split]))
                    chosen[smaller].append(pool.pop())
                    progressed = True
    assignment = {p: "train" for p in patients}
    for split, members in chosen.items():
        for patient_id in members:
            assignment[patient_id] = split
    return assignment


def unevaluated_categories(assignment: Sequence[PatientSplit]) -> list[int]:
    """The CAC categories some patient assigned by the balanced rule has that no validation or
    test patient has (too few patients of it: the rule keeps one for training first). Patients
    placed by the manifest's split column are where the user put them: not counted."""
    present = {r.category for r in assignment
               if r.category is not None and r.scan_ids and r.source == "balanced"}
    evaluated = {r.category for r in assignment
                 if r.split in ("validation", "test") and r.scan_ids}
    return sorted(present - evaluated)


def scan_splits(assignment: Sequence[PatientSplit]) -> dict[str, str]:
    """scan_id -> split, from a patient assignment."""
    return {scan_id: record.split for record in assignment for scan_id in record.scan_ids}


def drop_scans(assignment: Sequence[PatientSplit], scan_ids) -> list[PatientSplit]:
    """The assignment without `scan_ids` (e.g. rows skipped while reading); patients left with no
    scan are dropped. The other patients keep their split."""
    scan_ids = set(scan_ids)
    out = []
    for record in assignment:
        kept = tuple(s for s in record.scan_ids if s not in scan_ids)
        if kept:
            out.append(dataclasses.replace(record, scan_ids=kept))
    return out


def empty_splits(assignment: Sequence[PatientSplit]) -> list[str]:
    """The splits (in `SPLITS` order) that hold no scan in `assignment`."""
    used = {record.split for record in assignment if record.scan_ids}
    return [split for split in SPLITS if split not in used]


def write_split_audit(directory: str | os.PathLike, assignment: Sequence[PatientSplit], *,
                      seed: int, manifest: str | os.PathLike | None = None,
                      skipped: Sequence[dict] = ()) -> tuple[Path, Path]:
    """Writes `splits.json` and `splits.csv` (one row per scan) into `directory`, atomically.

    `assignment` should list only the scans that are in the dataset (see `drop_scans`);
    `skipped` (dicts with at least "row" and "problem", and "scan_id" where known) goes to
    splits.json's "skipped" list so the audit says which manifest rows are not in it.
    """
    directory = Path(directory)
    counts = {split: {"patients": 0, "scans": 0, "by_category": {}} for split in SPLITS}
    for record in assignment:
        entry = counts[record.split]
        entry["patients"] += 1
        entry["scans"] += len(record.scan_ids)
        key = "unknown" if record.category is None else str(record.category)
        entry["by_category"][key] = entry["by_category"].get(key, 0) + 1
    document = {
        "seed": seed,
        "manifest": None if manifest is None else os.fspath(manifest),
        "rule": "patient-level; manifest split column when given, else 80/10/10 with equal "
                "numbers of each CAC category in validation and test (paper), in pairs that "
                "leave every category one patient for training, at least one patient each from "
                f"{MIN_PATIENTS_FOR_EVAL} patients to assign, round-robin over the categories "
                "from a seeded random start",
        "counts": counts,
        "empty_splits": empty_splits(assignment),
        "unevaluated_categories": unevaluated_categories(assignment),
        "patients": [dataclasses.asdict(record) for record in assignment],
        "skipped": [dict(entry) for entry in skipped],
    }
    json_path = directory / "splits.json"
    csv_path = directory / "splits.csv"
    atomic_write_text(json_path, json.dumps(document, indent=2) + "\n")
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["scan_id", "patient_id", "split", "patient_category", "source"])
    for record in assignment:
        for scan_id in record.scan_ids:
            writer.writerow([scan_id, record.patient_id, record.split,
                             "" if record.category is None else record.category, record.source])
    atomic_write_text(csv_path, buffer.getvalue())
    return json_path, csv_path
