"""Patient-level splits: disjoint, balanced over CAC categories, deterministic, auditable."""

import collections
import json
from pathlib import Path

import pytest

from data_pipeline import splits as S
from data_pipeline.errors import ManifestError
from data_pipeline.manifest import ManifestRow


def _row(pid, protocol="cac", category=None, agatston=None, split=None, n=0):
    return ManifestRow(patient_id=pid, scan_id=f"{pid}_{protocol}", protocol=protocol,
                       image=Path(f"{pid}.nii.gz"), calcium_labels=None, heart_mask=None,
                       site="s", split=split, agatston=agatston, category=category, row_number=n)


def _cohort(per_category=10):
    rows = []
    for c in range(4):
        for i in range(per_category):
            pid = f"C{c}P{i:02d}"
            rows.append(_row(pid, "cac", category=c))
            if i % 2 == 0:  # ctac scan with a different (higher) category: the cac one wins
                rows.append(_row(pid, "ctac", category=3))
    return rows


def test_balanced_and_patient_disjoint():
    rows = _cohort(10)  # 40 patients -> 4 validation, 4 test, one of each category
    assignment = S.assign_splits(rows, seed=1)
    assert len(assignment) == 40
    by_split = collections.defaultdict(list)
    for record in assignment:
        by_split[record.split].append(record)
    assert len(by_split["validation"]) == 4 and len(by_split["test"]) == 4
    for split in ("validation", "test"):
        assert sorted(r.category for r in by_split[split]) == [0, 1, 2, 3]
    # The cac scan's category, not the ctac's (3), is the patient's.
    assert {r.patient_id: r.category for r in assignment}["C0P00"] == 0
    scan_split = S.scan_splits(assignment)
    patient_splits = collections.defaultdict(set)
    for row in rows:
        patient_splits[row.patient_id].add(scan_split[row.scan_id])
    assert all(len(s) == 1 for s in patient_splits.values())


def test_deterministic_for_seed():
    rows = _cohort(10)
    a = [r.split for r in S.assign_splits(rows, seed=5)]
    assert a == [r.split for r in S.assign_splits(rows, seed=5)]
    assert a != [r.split for r in S.assign_splits(rows, seed=6)]
    # Row order does not matter.
    shuffled = S.scan_splits(S.assign_splits(list(reversed(rows)), seed=5))
    assert shuffled == S.scan_splits(S.assign_splits(rows, seed=5))


def test_uneven_cohort_is_as_balanced_as_possible():
    # One patient of category 3: it stays in training (a model must see every category), so
    # validation and test are equal (two of category 0 each) and the category is named.
    rows = [_row(f"A{i}", category=0) for i in range(16)] + [_row("B0", category=3)]
    records = S.assign_splits(rows, seed=0)  # 17 patients -> 2 each
    val = [r.category for r in records if r.split == "validation"]
    test = [r.category for r in records if r.split == "test"]
    assert val == test == [0, 0]
    assert {r.patient_id: r.split for r in records}["B0"] == "train"
    assert S.unevaluated_categories(records) == [3]


@pytest.mark.parametrize("seed", range(6))
def test_rare_categories_stay_in_training_and_evaluation_is_equal(seed):
    # 27 patients of category 0 and one each of 1-3 (a cohort skewed to score 0): before, the
    # rare ones all went to validation, none to test, none to training.
    rows = [_row(f"Z{i:02d}", category=0) for i in range(27)] + \
        [_row(f"R{c}", category=c) for c in (1, 2, 3)]
    records = S.assign_splits(rows, seed=seed)
    by_split = collections.defaultdict(list)
    for record in records:
        by_split[record.split].append(record.category)
    assert sorted(by_split["validation"]) == sorted(by_split["test"]) == [0, 0, 0]
    assert {1, 2, 3} <= set(by_split["train"])
    assert S.unevaluated_categories(records) == [1, 2, 3]


def test_a_skewed_cohort_gets_equal_categories_in_validation_and_test():
    # 50/5/3/2 patients of categories 0-3, 60 in all -> 6 each: three pairs from category 0 (it
    # comes round most), two from 1, one from 2; category 3's two stay in training.
    rows = [_row(f"C{c}P{i:02d}", category=c)
            for c, n in enumerate((50, 5, 3, 2)) for i in range(n)]
    for seed in range(8):
        records = S.assign_splits(rows, seed=seed)
        val = sorted(r.category for r in records if r.split == "validation")
        test = sorted(r.category for r in records if r.split == "test")
        assert val == test and len(val) == 6, (seed, val, test)
        train = collections.Counter(r.category for r in records if r.split == "train")
        assert all(train[c] >= 1 for c in range(4))


def test_two_labelled_patients_among_unlabelled_go_one_to_each_evaluation_split():
    rows = [_row(f"U{i:02d}") for i in range(20)] + [_row("L0", category=0),
                                                     _row("L3", category=3)]
    records = {r.patient_id: r.split for r in S.assign_splits(rows, seed=0)}
    assert sorted([records["L0"], records["L3"]]) == ["test", "validation"]


def test_the_evaluation_size_rounds_halves_up():
    rows = [_row(f"C{c}P{i:02d}", category=c) for c in range(4) for i in range(9)][:25]
    records = S.assign_splits(rows, seed=0)  # 25 patients: 10% is 2.5 -> 3 each (was 2)
    counts = collections.Counter(r.split for r in records)
    assert counts["validation"] == counts["test"] == 3


def test_category_sources():
    assert S.scan_category(_row("x", agatston=0.0)) == 0
    assert S.scan_category(_row("x", agatston=100.0)) == 1
    assert S.scan_category(_row("x", agatston=100.5)) == 2
    assert S.scan_category(_row("x", agatston=401.0)) == 3
    assert S.scan_category(_row("x"), category_of=lambda row: 2) == 2
    assert S.scan_category(_row("x")) is None
    # CTAC-only patient: the highest category of the scans.
    assert S.patient_category([_row("x", "ctac", category=1)]) == 1
    assert S.patient_category([_row("x", "ctac", 2), _row("x", "cac", 0)]) == 0


def test_unknown_category_goes_to_train():
    rows = [_row(f"P{i}") for i in range(20)]
    assert {r.split for r in S.assign_splits(rows, seed=0)} == {"train"}


def test_manifest_split_column_wins():
    rows = _cohort(10)
    rows[0] = _row("C0P00", "cac", category=0, split="test")
    rows[1] = _row("C0P00", "ctac", category=3, split="test")
    records = {r.patient_id: r for r in S.assign_splits(rows, seed=1)}
    assert records["C0P00"].split == "test" and records["C0P00"].source == "manifest"
    conflicting = [_row("P", "cac", split="train", n=1), _row("P", "ctac", split="test", n=2)]
    with pytest.raises(ManifestError, match="more than one split.*row 1.*row 2"):
        S.assign_splits(conflicting)


def test_audit_files(tmp_path):
    records = S.assign_splits(_cohort(10), seed=2)
    json_path, csv_path = S.write_split_audit(tmp_path, records, seed=2, manifest="m.csv")
    doc = json.loads(json_path.read_text())
    assert doc["seed"] == 2 and doc["counts"]["validation"]["patients"] == 4
    assert doc["counts"]["test"]["by_category"] == {"0": 1, "1": 1, "2": 1, "3": 1}
    lines = csv_path.read_text().splitlines()
    assert lines[0] == "scan_id,patient_id,split,patient_category,source"
    assert len(lines) == 1 + len(_cohort(10))


@pytest.mark.parametrize("patients", [3, 4, 5])
def test_small_cohort_gets_validation_and_test(patients):
    # round(10% of <= 5) is 0: without the minimum, such a cohort had no validation/test at all.
    rows = [_row(f"P{i}", category=i % 4) for i in range(patients)]
    for seed in range(3):
        records = S.assign_splits(rows, seed=seed)
        counts = collections.Counter(r.split for r in records)
        assert counts["validation"] == 1 and counts["test"] == 1
        assert counts["train"] == patients - 2
        assert S.empty_splits(records) == []


def test_too_few_patients_leave_splits_empty():
    records = S.assign_splits([_row("P0", category=0), _row("P1", category=2)], seed=0)
    assert {r.split for r in records} == {"train"}
    assert S.empty_splits(records) == ["validation", "test"]


def test_round_robin_start_is_seeded_not_always_category_zero():
    rows = [_row(f"C{c}P{i}", category=c) for c in range(4) for i in range(3)]  # 12 -> 1 each
    first = set()
    for seed in range(16):
        records = S.assign_splits(rows, seed=seed)
        val = [r.category for r in records if r.split == "validation"]
        test = [r.category for r in records if r.split == "test"]
        assert len(val) == 1 and val == test  # equal counts per category in both
        first.add(val[0])
        again = S.assign_splits(rows, seed=seed)
        assert [r.split for r in again] == [r.split for r in records]
    assert first == {0, 1, 2, 3}  # every category gets its turn for some seed
    rows = [_row(f"C{c}P{i}", category=c) for c in range(4) for i in range(5)]  # 20 -> 2 each
    pairs = set()
    for seed in range(16):
        records = S.assign_splits(rows, seed=seed)
        val = sorted(r.category for r in records if r.split == "validation")
        test = sorted(r.category for r in records if r.split == "test")
        assert val == test and len(set(val)) == 2
        pairs.add(tuple(val))
    assert len(pairs) > 1 and any(3 in pair for pair in pairs)  # not always (0, 1)


def test_audit_without_skipped_scans(tmp_path):
    rows = _cohort(10)
    records = S.assign_splits(rows, seed=2)
    victim = next(r for r in records if r.split == "test")  # drop all its scans
    partial = next(r for r in records if len(r.scan_ids) == 2)  # keep its cac scan
    dropped = {*victim.scan_ids, partial.scan_ids[1]}
    kept = S.drop_scans(records, dropped)
    assert victim.patient_id not in {r.patient_id for r in kept}
    assert {r.patient_id: r.scan_ids for r in kept}[partial.patient_id] == partial.scan_ids[:1]
    assert {r.patient_id: r.split for r in kept}[partial.patient_id] == partial.split
    skipped = [{"row": "row 9", "problem": "bad", "scan_id": s} for s in sorted(dropped)]
    json_path, csv_path = S.write_split_audit(tmp_path, kept, seed=2, skipped=skipped)
    doc = json.loads(json_path.read_text())
    assert doc["counts"]["test"]["patients"] == 3 and doc["skipped"] == skipped
    listed = {line.split(",")[0] for line in csv_path.read_text().splitlines()[1:]}
    assert listed == {row.scan_id for row in rows} - dropped
    assert doc["empty_splits"] == []
