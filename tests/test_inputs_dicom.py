"""DICOM headers that used to give a wrong score or a misleading message: the series choice,
rescale attributes, malformed values, cut slices, Rows that disagree with the pixel data and
folders with two patients. Each bad case: exit code 2, one line naming the file, inputs unchanged.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from io_fixtures import hu_of, slice_dataset, write_series

from cac_jax.cli import main
from cac_jax.dicom_outputs import source_datasets
from data_pipeline import io
from data_pipeline.errors import StudyReadError


def snapshot(*roots: Path) -> dict[str, str]:
    """Content hash of every file under `roots` (to assert inputs are left unchanged)."""
    files = []
    for root in roots:
        files += [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def labels_for(folder: Path, path: Path, **kwargs) -> Path:
    """A label file in the geometry of the study in `folder` (zeros)."""
    volume = io.read_study(folder, **kwargs)
    io.write_labels(path, np.zeros(volume.shape, np.uint8), like=volume)
    return path


def assert_cli_error(capsys, argv, path: Path, *keywords: str) -> str:
    """`cac-jax score` exits 2 with one line naming `path`, and leaves its inputs unchanged."""
    inputs = [Path(argv[k + 1]) for k, a in enumerate(argv) if a in ("--image", "--labels")]
    before = snapshot(*inputs)
    code = main(["score", *map(str, argv)])
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2 and captured.out == "" and len(lines) == 1, captured.err
    assert lines[0].startswith(f"cac-jax score: error: {path}: "), lines[0]
    for keyword in keywords:
        assert keyword in lines[0], lines[0]
    assert snapshot(*inputs) == before
    return lines[0]


def patch(path: Path, old: bytes, new: bytes) -> None:
    """Rewrites header bytes in place (same length), for values pydicom refuses to write."""
    assert len(old) == len(new)
    data = path.read_bytes()
    assert data.count(old) == 1, old
    path.write_bytes(data.replace(old, new))


# --- which series ---------------------------------------------------------------------------

def two_series(folder: Path, thin_count: int = 16, thick_count: int = 4):
    def thick(k, ds):
        ds.SliceThickness, ds.SeriesNumber, ds.SeriesDescription = "3", 2, "CaSc 3.0"

    def thin(k, ds):
        ds.SliceThickness, ds.SeriesNumber, ds.SeriesDescription = "0.625", 5, "thin 0.625"

    stored_thick, _ = write_series(folder / "a", [3.0 * k for k in range(thick_count)], edit=thick)
    stored_thin, _ = write_series(folder / "b", [0.625 * k for k in range(thin_count)], edit=thin,
                                  seed=1)
    return stored_thick, stored_thin


def test_the_series_closest_to_3_mm_wins_over_more_slices(tmp_path):
    stored_thick, stored_thin = two_series(tmp_path)
    volume = io.read_study(tmp_path)
    np.testing.assert_array_equal(volume.hu, hu_of(stored_thick))
    meta = volume.metadata
    assert "SeriesNumber 2" in meta.chosen_series and "SliceThickness 3 mm" in meta.chosen_series
    (skipped,) = meta.skipped_series
    assert "thin 0.625" in skipped and "thickness 0.625 mm is farther from 3 mm" in skipped

    by_number = io.read_study(tmp_path, series=5)
    np.testing.assert_array_equal(by_number.hu, hu_of(stored_thin))
    assert by_number.metadata.chosen_series.endswith("requested series '5'")
    by_uid = io.read_study(tmp_path, series=by_number.metadata.series_uid)
    np.testing.assert_array_equal(by_uid.hu, by_number.hu)
    assert io.read_study(tmp_path, series="2").metadata.series_uid == meta.series_uid
    with pytest.raises(StudyReadError, match=r"no series '9' .*SeriesNumber 2.*SeriesNumber 5"):
        io.read_study(tmp_path, series=9)


def test_equal_thickness_prefers_more_slices_then_lower_series_number(tmp_path):
    def number(n):
        def edit(k, ds):
            ds.SeriesNumber = n
        return edit

    stored, _ = write_series(tmp_path / "a", [0.0, 2.5, 5.0], edit=number(7))
    write_series(tmp_path / "b", [0.0, 2.5, 5.0], edit=number(3), seed=1)
    volume = io.read_study(tmp_path)
    assert "SeriesNumber 3" in volume.metadata.chosen_series
    assert "lower SeriesNumber" in volume.metadata.skipped_series[0]
    write_series(tmp_path / "c", [0.0, 2.5, 5.0, 7.5], edit=number(9), seed=2)
    assert "SeriesNumber 9" in io.read_study(tmp_path).metadata.chosen_series


def test_score_cli_series_option_and_report(tmp_path, capsys):
    two_series(tmp_path / "study")
    labels = labels_for(tmp_path / "study", tmp_path / "thin_labels.nii.gz", series=5)
    assert main(["score", "--image", str(tmp_path / "study"), "--labels", str(labels),
                 "--series", "5"]) == 0
    err = capsys.readouterr().err
    assert "warning: chosen series" in err and "requested series '5'" in err
    # Without --series the 3 mm series is scored, and its labels must match it.
    line = assert_cli_error(capsys, ["--image", tmp_path / "study", "--labels", labels],
                            labels, "shape (z, y, x)")
    assert "(16, 12, 10)" in line and "(4, 12, 10)" in line
    assert_cli_error(capsys, ["--image", tmp_path / "study", "--labels", labels, "--series", "4"],
                     tmp_path / "study", "no series '4'")


# --- rescale ----------------------------------------------------------------------------------

def set_on(slice_index: int | None, **values):
    def edit(k, ds):
        if slice_index is None or k == slice_index:
            for keyword, value in values.items():
                if value is None:
                    del ds[keyword]
                else:
                    setattr(ds, keyword, value)
    return edit


@pytest.mark.parametrize("edit, keywords", [
    (set_on(None, RescaleSlope="0"), ["RescaleSlope 0 is not a plausible CT rescale"]),
    (set_on(None, RescaleSlope="1e30"), ["RescaleSlope 1e+30"]),
    (set_on(None, RescaleSlope="-1"), ["RescaleSlope -1"]),
    (set_on(None, RescaleIntercept=None), ["RescaleIntercept missing (Type 1 for CT)"]),
    (set_on(None, RescaleIntercept="-1e9"), ["RescaleIntercept -1e+09"]),
    (set_on(None, RescaleIntercept=None, RescaleType="US"), ["RescaleType 'US'"]),
])
def test_rescale_headers_that_would_make_hu_wrong_are_refused(tmp_path, capsys, edit, keywords):
    good = tmp_path / "good"
    write_series(good, [0.0, 2.5, 5.0])
    labels = labels_for(good, tmp_path / "labels.nii.gz")
    _, paths = write_series(tmp_path / "bad", [0.0, 2.5, 5.0], edit=edit)
    line = assert_cli_error(capsys, ["--image", tmp_path / "bad", "--labels", labels], paths[0],
                            *keywords)
    assert "Traceback" not in line


def test_each_slice_is_rescaled_with_its_own_slope_and_intercept(tmp_path):
    # Lossy JPEG writers store each slice with its own intercept (and a slope may differ too):
    # the HU are each slice's stored values through its own rescale, as GDCM computes them.
    intercepts, slopes = ["-1024", "-2042", "-1000", "0"], ["1", "1", "2", "1"]
    stored, _ = write_series(tmp_path / "mixed", [0.0, 2.5, 5.0, 7.5], edit=lambda k, ds: (
        setattr(ds, "RescaleIntercept", intercepts[k]), setattr(ds, "RescaleSlope", slopes[k])))
    volume = io.read_study(tmp_path / "mixed")
    for k in range(4):
        np.testing.assert_array_equal(volume.hu[k], hu_of(stored[k], float(slopes[k]),
                                                          float(intercepts[k])))


def test_missing_intercept_is_accepted_when_the_data_is_in_hu_and_says_so(tmp_path):
    def signed(k, ds):
        values = np.frombuffer(ds.PixelData, "<u2").astype(np.int16) - 1024
        ds.PixelData = values.astype("<i2").tobytes()
        ds.PixelRepresentation = 1
        ds.RescaleType = "HU"
        del ds.RescaleIntercept

    stored, _ = write_series(tmp_path / "hu", [0.0, 2.5], edit=signed)
    volume = io.read_study(tmp_path / "hu")
    np.testing.assert_array_equal(volume.hu, hu_of(stored))
    # Stored values that are not HU (no air) are refused even when RescaleType says HU.
    def unsigned_claim(k, ds):
        del ds.RescaleIntercept
        ds.RescaleType = "HU"

    write_series(tmp_path / "raw", [0.0, 2.5], edit=unsigned_claim)
    with pytest.raises(StudyReadError, match="no air at about -1000 HU"):
        io.read_study(tmp_path / "raw")
    # RescaleType is present only when the values are not HU (Type 1C): absent, the values in HU
    # are read as they are, and values without air are refused as before.
    def no_type(k, ds):
        signed(k, ds)
        del ds.RescaleType

    stored, _ = write_series(tmp_path / "untyped", [0.0, 2.5], edit=no_type)
    np.testing.assert_array_equal(io.read_study(tmp_path / "untyped").hu, hu_of(stored))

    # Stored as HU + 1024 with padding at -2000 and the intercept stripped: the padding is not
    # air, so these values (air at about 0) are refused, not read 1024 HU too high.
    def stripped_padded(k, ds):
        values = np.frombuffer(ds.PixelData, "<u2").astype(np.int16)
        values[:10] = -2000  # the first row (10 pixels)
        ds.PixelData = values.astype("<i2").tobytes()
        ds.PixelRepresentation = 1
        del ds.RescaleIntercept

    write_series(tmp_path / "padded", [0.0, 2.5], edit=stripped_padded)
    with pytest.raises(StudyReadError, match="no air at about -1000 HU"):
        io.read_study(tmp_path / "padded")


# --- malformed values -----------------------------------------------------------------------

@pytest.mark.parametrize("edit, old, new, keyword", [
    (set_on(None, PixelSpacing=["0", "0.5"]), None, None, "PixelSpacing: [0.0, 0.5] mm"),
    (set_on(None, PixelSpacing=["-0.7", "0.5"]), None, None, "PixelSpacing: [-0.7, 0.5] mm"),
    (None, b"0.7\\0.5", b"3,0\\0.5", "malformed PixelSpacing"),
    (set_on(None, ImagePositionPatient=["-30", "-40", "0"]), b"-30\\-40\\0 ", b"-30\\-40\\O ",
     "malformed ImagePositionPatient"),
    (set_on(None, RescaleIntercept="-1024.0"), b"-1024.0 ", b"-1024,0 ",
     "malformed RescaleIntercept '-1024,0'"),
])
def test_malformed_geometry_or_hu_values_are_refused_by_name(tmp_path, capsys, edit, old, new,
                                                            keyword):
    good = tmp_path / "good"
    write_series(good, [0.0, 2.5, 5.0])
    labels = labels_for(good, tmp_path / "labels.nii.gz")
    _, paths = write_series(tmp_path / "bad", [0.0, 2.5, 5.0], edit=edit)
    if old is not None:
        patch(paths[0], old, new)
    assert_cli_error(capsys, ["--image", tmp_path / "bad", "--labels", labels], paths[0], keyword)


def test_malformed_descriptive_values_are_tolerated_with_a_warning(tmp_path, capsys):
    edit = set_on(0, KVP="120.00", InstanceNumber=987654, SliceThickness="2.50")
    _, paths = write_series(tmp_path / "study", [0.0, 2.5, 5.0], edit=edit)
    patch(paths[0], b"120.00", b"120kV ")
    patch(paths[0], b"987654", b"98765a")
    patch(paths[0], b"2.50", b"2,5 ")
    volume = io.read_study(tmp_path / "study")
    assert volume.metadata.kvp is None and volume.metadata.slice_thickness_mm is None
    assert any("malformed KVP '120kV'" in w for w in volume.metadata.warnings)
    labels = labels_for(tmp_path / "study", tmp_path / "labels.nii.gz")
    assert main(["score", "--image", str(tmp_path / "study"), "--labels", str(labels)]) == 0
    err = capsys.readouterr().err
    assert "malformed KVP '120kV' ignored" in err and "malformed SliceThickness" in err


# --- cut slices, Rows, two patients -----------------------------------------------------------

@pytest.mark.parametrize("size, keyword", [(0, "empty file (0 bytes)"),
                                           (100, "truncated file (100 bytes)")])
def test_empty_or_cut_last_slice_is_named_not_a_shape_mismatch(tmp_path, capsys, size, keyword):
    _, paths = write_series(tmp_path / "study", [0.0, 2.5, 5.0])
    labels = labels_for(tmp_path / "study", tmp_path / "labels.nii.gz")
    paths[2].write_bytes(paths[2].read_bytes()[:size])
    assert_cli_error(capsys, ["--image", tmp_path / "study", "--labels", labels], paths[2],
                     keyword)


def test_rows_that_disagree_with_the_pixel_data_are_named(tmp_path, capsys):
    _, paths = write_series(tmp_path / "study", [0.0, 2.5, 5.0])
    labels = labels_for(tmp_path / "study", tmp_path / "labels.nii.gz")
    _, bad = write_series(tmp_path / "bad", [0.0, 2.5, 5.0], edit=set_on(None, Rows=11))
    assert_cli_error(capsys, ["--image", tmp_path / "bad", "--labels", labels], bad[0],
                     "Rows 11 x Columns 10", "disagree with the pixel data")


def test_folder_with_two_patients_is_refused_by_name(tmp_path, capsys):
    write_series(tmp_path / "study" / "p1", [0.0, 2.5, 5.0])
    labels = labels_for(tmp_path / "study" / "p1", tmp_path / "labels.nii.gz")
    write_series(tmp_path / "study" / "p2", [0.0, 2.5, 5.0, 7.5], seed=1,
                 edit=set_on(None, PatientID="OTHER"))
    assert_cli_error(capsys, ["--image", tmp_path / "study", "--labels", labels],
                     tmp_path / "study", "holds images of 2 patients", "'OTHER'", "'TESTPAT'")
    # Mixed inside one series (a bad merge) is refused too.
    write_series(tmp_path / "mixed", [0.0, 2.5, 5.0], edit=set_on(1, PatientID="OTHER"))
    with pytest.raises(StudyReadError, match="mixes 2 patients"):
        io.read_study(tmp_path / "mixed")


def test_sitk_export_of_a_series_chosen_among_two_is_accepted(tmp_path):
    two_series(tmp_path)
    reader = sitk.ImageSeriesReader()
    uid = io.read_study(tmp_path).metadata.series_uid
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(tmp_path / "a"), uid))
    image = reader.Execute()
    labels = sitk.GetImageFromArray((sitk.GetArrayFromImage(image) > 0).astype(np.uint8))
    labels.CopyInformation(image)
    sitk.WriteImage(labels, str(tmp_path / "labels.nii.gz"))
    volume = io.read_study(tmp_path)
    assert io.read_labels(tmp_path / "labels.nii.gz", like=volume).shape == volume.shape


# --- how scanners and archives lay series out -------------------------------------------------

def test_slices_in_a_linked_subfolder_are_read(tmp_path):
    # Half the slices behind a symbolic link (a folder assembled from an archive): all read, and
    # a link back up the tree (a loop) does not read anything twice.
    stored, paths = write_series(tmp_path / "store", [0.0, 2.5, 5.0, 7.5])
    study = tmp_path / "study"
    (study / "part1").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    for path in paths[:2]:
        path.rename(study / "part1" / path.name)
    for path in paths[2:]:
        path.rename(tmp_path / "elsewhere" / path.name)
    (study / "part2").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (tmp_path / "elsewhere" / "loop").symlink_to(study, target_is_directory=True)
    # A link up the tree is not followed: it would read everything around the study (here a
    # longer series beside it, which would then be chosen).
    (study / "up").symlink_to(tmp_path, target_is_directory=True)
    write_series(tmp_path / "beside", [0.0, 2.5, 5.0, 7.5, 10.0], seed=5)
    volume = io.read_study(study)
    np.testing.assert_array_equal(volume.hu, hu_of(stored))
    # The DICOM outputs find the same slices (`cac-jax infer --dicom`).
    assert len(source_datasets(volume)) == 4


def test_a_localizer_filed_under_the_series_uid_is_set_apart(tmp_path):
    # Some scanners file the scout (another orientation, another size) and a screen capture
    # under the axial images' SeriesInstanceUID: they are skipped, named, and the series is read.
    stored, paths = write_series(tmp_path / "study", [0.0, 2.5, 5.0])
    series_uid = pydicom.dcmread(paths[0]).SeriesInstanceUID
    scout = slice_dataset(np.zeros((8, 14), np.uint16), (-30.0, -40.0, 0.0),
                          orientation=(1.0, 0.0, 0.0, 0.0, 0.0, -1.0), series_uid=series_uid,
                          study_uid=pydicom.dcmread(paths[0]).StudyInstanceUID, instance=1,
                          image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"))
    scout.save_as(tmp_path / "study" / "ZZ_SCOUT.dcm", enforce_file_format=True)
    capture = slice_dataset(np.zeros((4, 4), np.uint16), (0.0, 0.0, 0.0), series_uid=series_uid,
                            study_uid=scout.StudyInstanceUID, instance=99,
                            sop_class="1.2.840.10008.5.1.4.1.1.7")
    del capture.ImagePositionPatient, capture.ImageOrientationPatient, capture.PixelSpacing
    capture.save_as(tmp_path / "study" / "IM9999.dcm", enforce_file_format=True)
    volume = io.read_study(tmp_path / "study")
    np.testing.assert_array_equal(volume.hu, hu_of(stored))
    skipped = " | ".join(volume.metadata.skipped_series)
    assert f"{series_uid} [localizer]" in skipped and "localizer/scout image" in skipped
    assert f"{series_uid} [secondary capture]" in skipped
    assert len(source_datasets(volume)) == 3  # the DICOM outputs leave them out too
    # Picked by its SeriesNumber, the series is still the axial images.
    np.testing.assert_array_equal(io.read_study(tmp_path / "study", series=1).hu, hu_of(stored))


def test_a_tilted_gantry_beyond_the_limit_is_named_as_such(tmp_path, capsys):
    tilt = np.radians(12.0)
    orientation = (1.0, 0.0, 0.0, 0.0, float(np.cos(tilt)), float(np.sin(tilt)))
    write_series(tmp_path / "ok", [0.0, 2.5, 5.0])
    labels = labels_for(tmp_path / "ok", tmp_path / "labels.nii.gz")
    _, paths = write_series(tmp_path / "tilted", [0.0, 2.5, 5.0], orientation=orientation,
                            edit=set_on(None, GantryDetectorTilt="-12"))
    assert_cli_error(capsys, ["--image", tmp_path / "tilted", "--labels", labels],
                     tmp_path / "tilted", "gantry tilt -12 deg (GantryDetectorTilt",
                     "more than 5 deg are not supported")


@pytest.mark.parametrize("extra, readable", [(2, True), (9, True), (10, False)])
def test_trailing_pad_bytes_shorter_than_a_row_are_read(tmp_path, extra, readable):
    # 12 rows of 10 pixels of 2 bytes: fewer than 10 extra pixels cannot be a Rows or Columns off
    # by one (that adds 10 or 12 pixels); 10 extra pixels are exactly one more row.
    def pad(k, ds):
        ds.PixelData = ds.PixelData + b"\0\0" * extra

    stored, _ = write_series(tmp_path / "padded", [0.0, 2.5], edit=pad)
    if readable:
        np.testing.assert_array_equal(io.read_study(tmp_path / "padded").hu, hu_of(stored))
    else:
        with pytest.raises(StudyReadError, match="disagree with the pixel data"):
            io.read_study(tmp_path / "padded")
