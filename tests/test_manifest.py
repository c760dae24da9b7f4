"""Manifest parsing and writing: the contract between users' data and the pipeline."""

from pathlib import Path

import pytest

from data_pipeline.errors import ManifestError
from data_pipeline.manifest import (
    COLUMNS,
    ManifestRow,
    parse_manifest,
    read_manifest,
    write_manifest,
)

HEADER = "patient_id,scan_id,protocol,image,calcium_labels,heart_mask,site,split"


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return path


def test_round_trip_relative_paths(tmp_path):
    image = _touch(tmp_path / "p1" / "cac" / "image.nii.gz")
    labels = _touch(tmp_path / "p1" / "cac" / "labels.nii.gz")
    rows = [ManifestRow(patient_id="p1", scan_id="p1_cac", protocol="cac", image=image,
                        calcium_labels=labels, heart_mask=None, site="s", split=None,
                        agatston=123.5, category=2, row_number=1)]
    manifest = tmp_path / "manifest.csv"
    write_manifest(manifest, rows)
    text = manifest.read_text()
    assert text.splitlines()[0] == ",".join(COLUMNS) == HEADER + ",agatston,category,series"
    assert "p1/cac/image.nii.gz" in text and str(tmp_path) not in text
    (back,) = read_manifest(manifest)
    assert back == rows[0]


def test_optional_columns_may_be_absent_and_paths_empty(tmp_path):
    _touch(tmp_path / "a.mhd")
    manifest = tmp_path / "m.csv"
    manifest.write_text(HEADER + "\nP,S,CTAC,a.mhd,,,site,\n")
    (row,) = read_manifest(manifest)
    assert row.protocol == "ctac"
    assert row.calcium_labels is None and row.heart_mask is None
    assert row.split is None and row.agatston is None and row.category is None


@pytest.mark.parametrize(
    "line, problem",
    [
        ("P,S,mri,a.mhd,,,site,", "unknown protocol 'mri'"),
        ("P,S,cac,missing.mhd,,,site,", "image file not found"),
        ("P,S,cac,a.mhd,nolabels.nii.gz,,site,", "calcium_labels file not found"),
        (",S,cac,a.mhd,,,site,", "empty patient_id"),
        ("P,S,cac,a.mhd,,,site,holdout", "unknown split 'holdout'"),
    ],
)
def test_bad_row_names_row_and_problem(tmp_path, line, problem):
    _touch(tmp_path / "a.mhd")
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"{HEADER}\nP0,S0,cac,a.mhd,,,site,train\n{line}\n")
    rows, errors = parse_manifest(manifest)
    assert [r.scan_id for r in rows] == ["S0"]
    assert len(errors) == 1
    message = str(errors[0])
    assert message.startswith(str(manifest))
    assert "row 2 (scan_id='S" in message and problem in message
    with pytest.raises(ManifestError, match="row 2"):
        read_manifest(manifest)


def test_duplicate_scan_id_and_bad_numbers(tmp_path):
    _touch(tmp_path / "a.mhd")
    manifest = tmp_path / "m.csv"
    manifest.write_text(
        f"{HEADER},agatston,category\n"
        "P,S,cac,a.mhd,,,site,,12,1\n"
        "P,S,ctac,a.mhd,,,site,,,\n"
        "P,T,ctac,a.mhd,,,site,,-3,\n"
        "P,U,ctac,a.mhd,,,site,,,high\n"
        "P,V,ctac,a.mhd,,,site,,,4\n")
    rows, errors = parse_manifest(manifest)
    assert len(rows) == 1 and rows[0].agatston == 12.0 and rows[0].category == 1
    messages = [e.problem for e in errors]
    assert "duplicate scan_id (also on row 1)" in messages[0]
    assert "must be a finite number >= 0" in messages[1]
    assert "is not an integer" in messages[2]
    assert "category 4 is not one of the paper's four" in messages[3]


def test_whole_file_problems(tmp_path):
    with pytest.raises(ManifestError, match="manifest file not found"):
        read_manifest(tmp_path / "none.csv")
    bad = tmp_path / "bad.csv"
    bad.write_text("patient_id,scan_id,image\nP,S,a.mhd\n")
    with pytest.raises(ManifestError, match="lacks required column"):
        read_manifest(bad)
    empty = tmp_path / "empty.csv"
    empty.write_text(HEADER + "\n")
    with pytest.raises(ManifestError, match="no rows"):
        read_manifest(empty)
