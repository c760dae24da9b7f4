"""`cac-jax score` end to end: DICOM and .mhd studies give the hand-computed JSON; bad input gives
exit code 2 and one line on stderr naming the file, never a traceback.

The study (4 slices of 24 x 24 px, 0.5 x 0.5 mm pixels, integer HU so DICOM round-trips exactly):
- slice 1, label 1 (LAD): 3 x 3 px = 2.25 mm^2 at 250 HU with one voxel at 410 -> weight 4;
- slice 2, label 3 (RCA): 2 x 4 px = 2.0 mm^2 at 180 HU -> weight 1;
- slice 2, label 2 (LCX): 1 x 3 px = 0.75 mm^2 at 500 HU -> under 1 mm^2, not counted;
- slice 3, label 7 (non-coronary) at 1000 HU (bone) -> never scored.
Agatston = (2.25 * 4 + 2.0 * 1) * (z spacing / 3 mm); counted voxels 9 + 8 = 17;
sum of counted HU = 8 * 250 + 410 + 8 * 180 = 3850.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate

from cac_jax.cli import main
from cac_jax.scoring import score_study
from data_pipeline.io import CTVolume, StudyMetadata, write_dicom_series, write_volume

SHAPE = (4, 24, 24)
IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def _arrays() -> tuple[np.ndarray, np.ndarray]:
    hu = np.full(SHAPE, 40.0, np.float32)
    hu[:, :3, :] = -1000.0             # air: the image looks like HU
    labels = np.zeros(SHAPE, np.int16)
    hu[1, 8:11, 8:11] = 250.0
    hu[1, 9, 10] = 410.0
    labels[1, 7:12, 7:12] = 1          # the label's rim is soft tissue: not calcium
    hu[2, 14:16, 4:8] = 180.0
    labels[2, 14:16, 4:8] = 3
    hu[2, 5, 15:18] = 500.0
    labels[2, 5, 15:18] = 2
    hu[3, 18:22, 10:20] = 1000.0
    labels[3, 18:22, 10:20] = 7
    return hu, labels


def _volume(hu, spacing_zyx_mm, *, thickness=None, direction=IDENTITY) -> CTVolume:
    metadata = StudyMetadata(source="test", modality="CT", patient_id="CLI001",
                             slice_thickness_mm=thickness, kvp=120.0, ecg_gated=True,
                             protocol="cac", manufacturer="cac-jax tests")
    return CTVolume(hu=hu, spacing_zyx_mm=spacing_zyx_mm, origin_xyz_mm=(-10.0, -20.0, 30.0),
                    direction=direction, metadata=metadata)


def _expected(z_spacing: float, calibration: float | None = None) -> dict:
    factor, pixel_area = z_spacing / 3.0, 0.25
    voxel_volume = pixel_area * z_spacing
    lad, rca = 2.25 * 4 * factor, 2.0 * 1 * factor
    return {
        "agatston": lad + rca,
        "volume_mm3": 17 * voxel_volume,
        "mass_mg": None if calibration is None else calibration * 3850.0 * voxel_volume,
        "per_artery": {"LAD": lad, "LCX": 0.0, "RCA": rca, "other": 0.0},
        "lesions": [
            {"slice_index": 1, "label": 1, "artery": "LAD", "area_mm2": 2.25, "peak_hu": 410.0,
             "weight": 4, "agatston": lad, "volume_mm3": 9 * voxel_volume,
             "mass_mg": None if calibration is None else calibration * 2410.0 * voxel_volume,
             "n_voxels": 9, "centroid_yx": [9.0, 9.0]},
            {"slice_index": 2, "label": 3, "artery": "RCA", "area_mm2": 2.0, "peak_hu": 180.0,
             "weight": 1, "agatston": rca, "volume_mm3": 8 * voxel_volume,
             "mass_mg": None if calibration is None else calibration * 1440.0 * voxel_volume,
             "n_voxels": 8, "centroid_yx": [14.5, 5.5]},
        ],
        "spacing_zyx_mm": [z_spacing, 0.5, 0.5],
    }


def _assert_close(actual, expected, where: str) -> None:
    """Equal structure and types; floats within 1e-9 relative (JSON round-trip, sum order)."""
    if isinstance(expected, dict):
        assert isinstance(actual, dict) and list(actual) == list(expected), where
        for key in expected:
            _assert_close(actual[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, list):
        assert isinstance(actual, list) and len(actual) == len(expected), where
        for index, (a, e) in enumerate(zip(actual, expected)):
            _assert_close(a, e, f"{where}[{index}]")
    elif isinstance(expected, float):
        assert isinstance(actual, float) and actual == pytest.approx(expected, rel=1e-9), where
    else:
        assert type(actual) is type(expected) and actual == expected, where


def _assert_matches(payload: dict, expected: dict) -> None:
    assert list(payload) == ["agatston", "volume_mm3", "mass_mg", "category", "category_name",
                             "per_artery", "lesions", "spacing_zyx_mm", "warnings"]
    for key, value in expected.items():
        _assert_close(payload[key], value, key)


@pytest.fixture(scope="module")
def dicom_study(tmp_path_factory) -> tuple[Path, Path]:
    """DICOM folder at 1.5 mm spacing with a 3 mm nominal thickness, labels as .nii.gz."""
    root = tmp_path_factory.mktemp("dicom_study")
    hu, labels = _arrays()
    volume = _volume(hu, (1.5, 0.5, 0.5), thickness=3.0)
    write_dicom_series(volume, root / "dicom", uid_seed="cli-score")
    write_volume(root / "calcium_labels.nii.gz", labels, like=volume)
    return root / "dicom", root / "calcium_labels.nii.gz"


@pytest.fixture(scope="module")
def mhd_study(tmp_path_factory) -> tuple[Path, Path]:
    """orCaScore-style: int16 HU image .mhd and a label .mhd (1 LAD, 2 LCX, 3 RCA), 3 mm."""
    root = tmp_path_factory.mktemp("mhd_study")
    hu, labels = _arrays()
    volume = _volume(hu, (3.0, 0.5, 0.5))
    write_volume(root / "TRV1P1CTI.mhd", hu.astype(np.int16), like=volume)
    write_volume(root / "TRV1P1R.mhd", labels.astype(np.uint8), like=volume)
    return root / "TRV1P1CTI.mhd", root / "TRV1P1R.mhd"


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["score", *map(str, argv)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_dicom_study_gives_the_contracted_json(dicom_study, capsys, tmp_path):
    image, labels = dicom_study
    out = tmp_path / "results" / "score.json"
    code, stdout, stderr = _run(capsys, "--image", image, "--labels", labels, "--json", out,
                                "--calibration", "0.00075")
    assert code == 0
    payload = json.loads(stdout)
    _assert_matches(payload, _expected(1.5, calibration=0.00075))
    assert payload["agatston"] == pytest.approx(5.5)
    assert (payload["category"], payload["category_name"]) == (1, "1-100")
    # 3 mm slices reconstructed every 1.5 mm: warned, and scored by the spacing.
    assert len(payload["warnings"]) == 1 and "overlapping" in payload["warnings"][0]
    assert "overlapping" in stderr
    assert json.loads(out.read_text()) == payload
    assert not list(out.parent.glob(".*tmp*"))  # atomic write left no temporary file


def test_mhd_study_with_orcascore_labels(mhd_study, capsys):
    image, labels = mhd_study
    code, stdout, stderr = _run(capsys, "--image", image, "--labels", labels)
    assert code == 0
    payload = json.loads(stdout)
    _assert_matches(payload, _expected(3.0))
    assert payload["agatston"] == pytest.approx(11.0)
    assert payload["warnings"] == [] and stderr == ""


def test_options_min_area_and_five_class(mhd_study, capsys):
    image, labels = mhd_study
    code, stdout, _ = _run(capsys, "--image", image, "--labels", labels, "--min-area-mm2", "0.5",
                           "--five-class")
    assert code == 0
    payload = json.loads(stdout)
    # The 0.75 mm^2 LCX lesion (peak 500 -> weight 4) now counts: 11 + 0.75 * 4 = 14.
    assert payload["agatston"] == pytest.approx(14.0)
    assert payload["per_artery"]["LCX"] == pytest.approx(3.0)
    assert (payload["category"], payload["category_name"]) == (2, "11-100")


def test_console_script(mhd_study, tmp_path):
    script = Path(sys.executable).with_name("cac-jax")
    if not script.exists():
        found = shutil.which("cac-jax")
        assert found, "the cac-jax console script is not installed (pip install -e .)"
        script = Path(found)
    image, labels = mhd_study
    out = tmp_path / "score.json"
    proc = subprocess.run([str(script), "score", "--image", str(image), "--labels", str(labels),
                           "--json", str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    payload = json.loads(proc.stdout)
    _assert_matches(payload, _expected(3.0))
    assert json.loads(out.read_text()) == payload


def test_help_describes_each_argument(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["score", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in ("--image", "--labels", "--json", "--min-area-mm2", "--calibration",
                   "--five-class"):
        assert option in text
    assert "mg per (HU * mm^3)" in text and "DICOM folder" in text


@pytest.mark.parametrize("argv, message", [
    (["--min-area-mm2", "-1"], "--min-area-mm2: must be a finite number >= 0"),
    (["--min-area-mm2", "one"], "--min-area-mm2: expected a number"),
    (["--calibration", "0"], "--calibration: must be a finite number > 0"),
    (["--calibration", "nan"], "--calibration: must be a finite number > 0"),
])
def test_bad_arguments_exit_2(mhd_study, capsys, argv, message):
    image, labels = mhd_study
    with pytest.raises(SystemExit) as exit_info:
        main(["score", "--image", str(image), "--labels", str(labels), *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


# --- bad input: exit 2, one line naming the file -----------------------------------------------

def _assert_one_line_error(capsys, argv, names: Path, *keywords: str) -> str:
    code, stdout, stderr = _run(capsys, *argv)
    assert code == 2
    assert stdout == ""
    lines = stderr.strip("\n").split("\n")
    assert len(lines) == 1, stderr
    line = lines[0]
    assert line.startswith("cac-jax score: error: ")
    assert "Traceback" not in stderr
    assert str(names) in line
    for keyword in keywords:
        assert keyword.lower() in line.lower(), line
    return line


def _copy_dicom(dicom_study, tmp_path) -> Path:
    folder = tmp_path / "dicom"
    shutil.copytree(dicom_study[0], folder)
    return folder


def _edit_all(folder: Path, edit) -> None:
    for path in sorted(folder.glob("*.dcm")):
        ds = pydicom.dcmread(path)
        edit(ds)
        ds.save_as(path, enforce_file_format=True)


def test_folder_without_dicom(dicom_study, capsys, tmp_path):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "readme.txt").write_text("not an image\n")
    _assert_one_line_error(capsys, ["--image", folder, "--labels", dicom_study[1]], folder,
                           "no DICOM")


def test_missing_image_path(dicom_study, capsys, tmp_path):
    missing = tmp_path / "nowhere"
    _assert_one_line_error(capsys, ["--image", missing, "--labels", dicom_study[1]], missing,
                           "does not exist")


def test_folder_of_mr_images(dicom_study, capsys, tmp_path):
    folder = _copy_dicom(dicom_study, tmp_path)
    mr_storage = "1.2.840.10008.5.1.4.1.1.4"

    def to_mr(ds):
        ds.Modality = "MR"
        ds.SOPClassUID = mr_storage
        ds.file_meta.MediaStorageSOPClassUID = mr_storage

    _edit_all(folder, to_mr)
    _assert_one_line_error(capsys, ["--image", folder, "--labels", dicom_study[1]], folder, "MR")


def test_single_slice(dicom_study, capsys, tmp_path):
    folder = _copy_dicom(dicom_study, tmp_path)
    for path in sorted(folder.glob("*.dcm"))[1:]:
        path.unlink()
    _assert_one_line_error(capsys, ["--image", folder, "--labels", dicom_study[1]], folder,
                           "single slice")


def test_mismatched_label_geometry(dicom_study, capsys, tmp_path):
    hu, labels = _arrays()
    other = _volume(hu[:, :, :20], (1.5, 0.5, 0.5))
    bad_labels = tmp_path / "labels_other_shape.nii.gz"
    write_volume(bad_labels, labels[:, :, :20], like=other)
    _assert_one_line_error(capsys, ["--image", dicom_study[0], "--labels", bad_labels],
                           bad_labels, "shape")
    shifted = tmp_path / "labels_other_spacing.nii.gz"
    write_volume(shifted, labels, like=_volume(hu, (3.0, 0.5, 0.5)))
    _assert_one_line_error(capsys, ["--image", dicom_study[0], "--labels", shifted], shifted,
                           "spacing")


def test_truncated_dicom_slice(dicom_study, capsys, tmp_path):
    folder = _copy_dicom(dicom_study, tmp_path)
    victim = sorted(folder.glob("*.dcm"))[2]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) - 400])
    _assert_one_line_error(capsys, ["--image", folder, "--labels", dicom_study[1]], victim,
                           "truncated")


def test_unreadable_image_file(dicom_study, capsys, tmp_path):
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"\x1f\x8b\x08\x00 definitely not a NIfTI volume")
    _assert_one_line_error(capsys, ["--image", broken, "--labels", dicom_study[1]], broken,
                           "unreadable")


def test_oblique_series(capsys, tmp_path):
    hu, labels = _arrays()
    angle = np.deg2rad(30.0)  # tilted 30 deg about x: far from axial
    c, s = float(np.cos(angle)), float(np.sin(angle))
    volume = _volume(hu, (3.0, 0.5, 0.5), direction=(1.0, 0.0, 0.0, 0.0, c, -s, 0.0, s, c))
    folder = tmp_path / "oblique"
    write_dicom_series(volume, folder, uid_seed="oblique")
    write_volume(tmp_path / "labels.nii.gz", labels, like=volume)
    _assert_one_line_error(capsys, ["--image", folder, "--labels", tmp_path / "labels.nii.gz"],
                           folder, "not axial")


@pytest.mark.parametrize("values, keyword", [("negative", "negative"),
                                             ("fractional", "non-integer")])
def test_bad_label_values(dicom_study, capsys, tmp_path, values, keyword):
    hu, labels = _arrays()
    like = _volume(hu, (1.5, 0.5, 0.5))
    bad = labels.astype(np.float32)
    bad[2, 0, 0] = -1.0 if values == "negative" else 0.5
    path = tmp_path / f"labels_{values}.nii.gz"
    write_volume(path, bad, like=like)
    _assert_one_line_error(capsys, ["--image", dicom_study[0], "--labels", path], path, keyword)


def test_unsupported_compression(dicom_study, capsys, tmp_path):
    folder = _copy_dicom(dicom_study, tmp_path)

    def to_mpeg2(ds):
        # Pixel data "compressed" as MPEG2 video: no pydicom decoder exists for it.
        ds.file_meta.TransferSyntaxUID = pydicom.uid.MPEG2MPML
        ds.PixelData = encapsulate([b"\x00" * 64])
        ds["PixelData"].VR = "OB"

    _edit_all(folder, to_mpeg2)
    line = _assert_one_line_error(capsys, ["--image", folder, "--labels", dicom_study[1]],
                                  folder, "1.2.840.10008.1.2.4.100")
    assert "MPEG2" in line


def test_unwritable_json_output(mhd_study, capsys, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    out = blocker / "score.json"
    _assert_one_line_error(capsys, ["--image", mhd_study[0], "--labels", mhd_study[1],
                                    "--json", out], out, "cannot write")


# --- score_study: warnings from the study's metadata --------------------------------------------

def test_score_study_reports_skipped_series_and_tube_voltage(tmp_path):
    hu, labels = _arrays()
    volume = dataclasses.replace(_volume(hu, (3.0, 0.5, 0.5), thickness=3.0),
                                 metadata=StudyMetadata(source="test", kvp=100.0,
                                                       patient_id="CLI001"))
    write_dicom_series(volume, tmp_path / "study" / "main", uid_seed="main")
    short = _volume(hu[:2], (3.0, 0.5, 0.5), thickness=3.0)
    write_dicom_series(short, tmp_path / "study" / "short", series_number=2, uid_seed="short")
    write_volume(tmp_path / "labels.nii.gz", labels, like=volume)
    result = score_study(tmp_path / "study", tmp_path / "labels.nii.gz")
    assert result.agatston == pytest.approx(11.0)
    skipped = [w for w in result.warnings if w.startswith("skipped series")]
    assert len(skipped) == 1 and "fewer slices (2)" in skipped[0]
    (chosen,) = [w for w in result.warnings if w.startswith("chosen series")]
    assert "SliceThickness 3 mm, closest to the 3 mm of calcium scoring" in chosen
    assert any("100 kVp" in w and "120 kVp" in w for w in result.warnings)
    assert len(result.warnings) == 3


def test_score_study_warns_when_image_is_not_in_hu(tmp_path):
    hu, labels = _arrays()
    volume = _volume(hu + 1024.0, (3.0, 0.5, 0.5))  # stored values without the -1024 intercept
    write_volume(tmp_path / "raw.mhd", (hu + 1024.0).astype(np.int16), like=volume)
    write_volume(tmp_path / "labels.mhd", labels, like=volume)
    result = score_study(tmp_path / "raw.mhd", tmp_path / "labels.mhd")
    assert result.warnings == (
        "the image's lowest value is 24 HU, but a chest CT contains air at about -1000 HU; "
        "check that the image is in Hounsfield units (rescale slope/intercept)",)
