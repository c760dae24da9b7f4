"""Tests for data_pipeline.io: DICOM folders (pydicom's own files and series written here),
SimpleITK image files, labels, and the writers. Tiny shapes throughout."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from io_fixtures import (
    MR_IMAGE_STORAGE,
    SECONDARY_CAPTURE,
    hu_of,
    pydicom_test_folder,
    write_series,
)
from pydicom.uid import RLELossless

from data_pipeline import io
from data_pipeline.errors import InputError, LabelError, StudyReadError
from data_pipeline.io import writers as io_writers

STEP = 2.5


def make_volume(shape=(6, 16, 12), *, spacing=(3.0, 0.7, 0.5), origin=(-20.0, -30.5, 12.25),
                gated: bool | None = True, seed: int = 0, **meta) -> io.CTVolume:
    rng = np.random.default_rng(seed)
    hu = rng.normal(0.0, 400.0, size=shape).astype(np.float32)
    hu[0, 0, :4] = (-1024.0, 3071.0, 129.6, -0.4)
    metadata = io.StudyMetadata(source="memory", patient_id="P007", kvp=120.0,
                                manufacturer="Phantom Inc", ecg_gated=gated,
                                slice_thickness_mm=meta.pop("thickness", 3.0), **meta)
    return io.CTVolume(hu=hu, spacing_zyx_mm=spacing, origin_xyz_mm=origin,
                       direction=(1, 0, 0, 0, 1, 0, 0, 0, 1), metadata=metadata)


def sitk_series(folder: Path) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    return reader.Execute()


def assert_same_as_sitk(volume: io.CTVolume, image: sitk.Image) -> None:
    """The volume equals SimpleITK's read of the same input, reoriented to LPS (the canonical
    orientation), voxel for voxel and in geometry."""
    image = sitk.DICOMOrient(image, "LPS")
    np.testing.assert_array_equal(volume.hu, sitk.GetArrayFromImage(image).astype(np.float32))
    np.testing.assert_allclose(volume.spacing_zyx_mm, image.GetSpacing()[::-1], atol=1e-4)
    np.testing.assert_allclose(volume.origin_xyz_mm, image.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(volume.direction, image.GetDirection(), atol=1e-6)


# --- write_dicom_series / read_study round trip ----------------------------------------------

@pytest.mark.parametrize("gated, protocol", [(True, "cac"), (False, "ctac"), (None, None)])
def test_dicom_round_trip_keeps_hu_geometry_and_metadata(tmp_path, gated, protocol):
    volume = make_volume(gated=gated)
    paths = io.write_dicom_series(volume, tmp_path / "out", series_number=3, uid_seed="s1")
    assert [p.name for p in paths] == [f"IM{k:06d}.dcm" for k in range(1, 7)]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [p.name for p in paths]
    ds = pydicom.dcmread(paths[0])
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2"
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert ds.Modality == "CT" and list(ds.ImageType) == ["ORIGINAL", "PRIMARY", "AXIAL"]
    assert [float(v) for v in ds.PixelSpacing] == [0.7, 0.5]
    assert ds.SeriesNumber == 3

    back = io.read_study(tmp_path / "out")
    assert back.hu.dtype == np.float32 and back.shape == volume.shape
    assert np.abs(back.hu - volume.hu).max() <= 0.5
    np.testing.assert_array_equal(back.hu[0, 0, :4], [-1024.0, 3071.0, 130.0, 0.0])
    np.testing.assert_allclose(back.spacing_zyx_mm, volume.spacing_zyx_mm, atol=1e-6)
    np.testing.assert_allclose(back.origin_xyz_mm, volume.origin_xyz_mm, atol=1e-6)
    assert back.direction == volume.direction
    meta = back.metadata
    assert (meta.patient_id, meta.kvp, meta.manufacturer, meta.slice_thickness_mm) == (
        "P007", 120.0, "Phantom Inc", 3.0)
    assert (meta.ecg_gated, meta.protocol, meta.modality) == (gated, protocol, "CT")
    assert meta.source == str(tmp_path / "out") and meta.skipped_series == ()


def test_rewriting_a_shorter_series_removes_stale_slices(tmp_path):
    io.write_dicom_series(make_volume(shape=(5, 8, 8)), tmp_path, uid_seed="long")
    (tmp_path / "notes.txt").write_text("kept")
    short = make_volume(shape=(3, 8, 8), seed=1)
    io.write_dicom_series(short, tmp_path, uid_seed="short")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "IM000001.dcm", "IM000002.dcm", "IM000003.dcm", "notes.txt"]
    back = io.read_study(tmp_path)
    assert back.shape == (3, 8, 8) and back.metadata.skipped_series == ()


def test_uids_are_deterministic_with_a_seed(tmp_path):
    volume = make_volume(shape=(2, 8, 8))
    uids = []
    for name, seed in (("a", "x"), ("b", "x"), ("c", "y")):
        paths = io.write_dicom_series(volume, tmp_path / name, uid_seed=seed)
        ds = [pydicom.dcmread(p) for p in paths]
        assert len({d.SOPInstanceUID for d in ds}) == 2
        uids.append((ds[0].StudyInstanceUID, ds[0].SeriesInstanceUID, ds[1].SOPInstanceUID))
    assert uids[0] == uids[1] and all(a != b for a, b in zip(uids[0], uids[2]))


def test_written_series_matches_simpleitk_and_its_nifti(tmp_path):
    volume = make_volume()
    io.write_dicom_series(volume, tmp_path / "dcm", uid_seed="s")
    from_dicom = io.read_study(tmp_path / "dcm")
    image = sitk_series(tmp_path / "dcm")
    assert_same_as_sitk(from_dicom, image)
    for suffix in (".nii.gz", ".mhd"):
        sitk.WriteImage(image, str(tmp_path / f"ct{suffix}"))
        from_file = io.read_study(tmp_path / f"ct{suffix}")
        np.testing.assert_array_equal(from_file.hu, from_dicom.hu)
        np.testing.assert_allclose(from_file.spacing_zyx_mm, from_dicom.spacing_zyx_mm, atol=1e-5)
        np.testing.assert_allclose(from_file.origin_xyz_mm, from_dicom.origin_xyz_mm, atol=1e-4)


def test_write_dicom_series_rejects_non_finite_hu(tmp_path):
    volume = make_volume(shape=(2, 4, 4))
    volume.hu[1, 2, 3] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        io.write_dicom_series(volume, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_left_handed_direction_is_written_as_the_same_world_geometry(tmp_path):
    volume = make_volume(shape=(4, 8, 8))
    flipped = io.CTVolume(volume.hu, volume.spacing_zyx_mm, volume.origin_xyz_mm,
                          (1, 0, 0, 0, 1, 0, 0, 0, -1), volume.metadata)
    io.write_dicom_series(flipped, tmp_path)
    back = io.read_study(tmp_path)
    np.testing.assert_array_equal(back.hu, np.rint(volume.hu[::-1]))
    np.testing.assert_allclose(back.origin_xyz_mm, (-20.0, -30.5, 12.25 - 3 * 3.0), atol=1e-6)
    assert back.direction == (1, 0, 0, 0, 1, 0, 0, 0, 1)


# --- slice ordering -------------------------------------------------------------------------

def test_sorts_by_position_not_file_name_or_instance_number(tmp_path):
    positions = [7.5, 0.0, 12.5, 2.5, 10.0, 5.0]
    names = ["zz.dcm", "b", "a17", "x.dcm", "c.DCM", "0001"]
    stored, _ = write_series(tmp_path, positions, names=names, instances=[3, 6, 1, 5, 2, 4])
    volume = io.read_study(tmp_path)
    order = np.argsort(positions)
    np.testing.assert_array_equal(volume.hu, hu_of(stored[order]))
    assert volume.spacing_zyx_mm == pytest.approx((STEP, 0.7, 0.5))
    assert volume.origin_xyz_mm == pytest.approx((-30.0, -40.0, 0.0))
    assert_same_as_sitk(volume, sitk_series(tmp_path))


def test_reversed_series_is_sorted_increasing_like_simpleitk(tmp_path):
    stored, _ = write_series(tmp_path, [10.0, 7.5, 5.0, 2.5, 0.0], slope=2.0, intercept=-1000.0)
    volume = io.read_study(tmp_path)
    np.testing.assert_array_equal(volume.hu, hu_of(stored[::-1], 2.0, -1000.0))
    assert volume.origin_xyz_mm[2] == pytest.approx(0.0)
    assert_same_as_sitk(volume, sitk_series(tmp_path))


def test_coronal_flip_orientation_sorts_along_its_own_normal(tmp_path):
    # Row (1,0,0) and column (0,-1,0): the normal is -z, so increasing position runs down in z.
    # Canonically (LPS) z runs up and y to posterior, so both axes come out reversed.
    stored, _ = write_series(tmp_path, [0.0, 2.5, 5.0], orientation=(1, 0, 0, 0, -1, 0))
    volume = io.read_study(tmp_path)
    np.testing.assert_array_equal(volume.hu, hu_of(stored)[::-1, ::-1])
    assert volume.direction == (1, 0, 0, 0, 1, 0, 0, 0, 1)
    assert_same_as_sitk(volume, sitk_series(tmp_path))


def test_pydicom_reversed_gated_series():
    """dicomdirtests/98892001/CT5N: 5 slices whose z falls as InstanceNumber rises."""
    folder = pydicom_test_folder("98892001/CT5N")
    volume = io.read_study(folder)
    files = sorted((pydicom.dcmread(p) for p in folder.iterdir()), key=lambda d: d.InstanceNumber)
    expected = np.stack([d.pixel_array * float(d.RescaleSlope) + float(d.RescaleIntercept)
                         for d in files[::-1]]).astype(np.float32)
    np.testing.assert_array_equal(volume.hu, expected)
    assert volume.spacing_zyx_mm[0] == pytest.approx(2.5)
    assert volume.origin_xyz_mm[2] == pytest.approx(-1.2375)
    assert volume.metadata.ecg_gated is True and volume.metadata.protocol == "cac"
    assert_same_as_sitk(volume, sitk_series(folder))


def test_pydicom_patient_folder_skips_scouts():
    volume = io.read_study(pydicom_test_folder("98892001"))
    assert volume.shape[0] == 5
    assert len(volume.metadata.skipped_series) == 1
    assert "Scout" in volume.metadata.skipped_series[0]
    assert "localizer" in volume.metadata.skipped_series[0]


def test_whole_dicomdirtests_tree_finds_the_one_good_ct_series():
    # The tree holds two patients' CT series: refused as a whole, readable by series number.
    with pytest.raises(StudyReadError, match=r"holds images of 2 patients \(PatientID "
                                             r"'77654033', '98890234'\)"):
        io.read_study(pydicom_test_folder())
    smartscore = next(pydicom.dcmread(p).SeriesInstanceUID
                      for p in pydicom_test_folder("98892001/CT5N").iterdir())
    volume = io.read_study(pydicom_test_folder(), series=smartscore)
    assert "SmartScore" in volume.metadata.series_description
    reasons = " | ".join(volume.metadata.skipped_series)
    assert "requested series" in volume.metadata.chosen_series
    assert reasons.count("not the requested series") == len(volume.metadata.skipped_series) > 3


def test_slightly_tilted_axial_series_matches_simpleitk(tmp_path):
    c, s = np.cos(np.radians(3)), np.sin(np.radians(3))
    stored, _ = write_series(tmp_path, [0.0, 2.5, 5.0], orientation=(1, 0, 0, 0, c, s))
    volume = io.read_study(tmp_path)
    np.testing.assert_array_equal(volume.hu, hu_of(stored))
    assert volume.direction[8] == pytest.approx(c)
    assert_same_as_sitk(volume, sitk_series(tmp_path))


@pytest.mark.parametrize("headers, gated, protocol", [
    ({"CardiacSynchronizationTechnique": "RETROSPECTIVE", "SeriesDescription": "CTAC"},
     True, "cac"),
    ({"CardiacSynchronizationTechnique": "NONE", "SeriesDescription": "CaSc"}, False, "ctac"),
    ({"SeriesDescription": "Calcium Score 3.0 B35f"}, True, "cac"),
    ({"SeriesDescription": "CaScSeq 3.0"}, True, "cac"),
    ({"ProtocolName": "PET/CT CTAC"}, False, "ctac"),
    ({"SeriesDescription": "Thorax ungated 5mm"}, False, "ctac"),
    ({"SeriesDescription": "AC CT 3.75mm"}, False, "ctac"),
    ({"TriggerTime": "350"}, True, "cac"),
    ({}, None, None),
])
def test_gating_from_the_header(tmp_path, headers, gated, protocol):
    def edit(k, ds):
        for keyword, value in headers.items():
            setattr(ds, keyword, value)

    write_series(tmp_path, [0.0, 2.5], edit=edit)
    meta = io.read_study(tmp_path).metadata
    assert (meta.ecg_gated, meta.protocol) == (gated, protocol)


def test_ctvolume_normalises_types_and_rejects_bad_shapes():
    volume = io.CTVolume(np.zeros((2, 3, 4)), [1, 2, 3], np.array([0, 0, 0]), [1, 0, 0, 0, 1, 0, 0, 0, 1],
                         io.StudyMetadata(source="x"))
    assert volume.hu.dtype == np.float32 and volume.shape == (2, 3, 4)
    assert volume.spacing_zyx_mm == (1.0, 2.0, 3.0) and isinstance(volume.origin_xyz_mm, tuple)
    with pytest.raises(ValueError, match="3-D"):
        io.CTVolume(np.zeros((3, 4)), (1, 1, 1), (0, 0, 0), (1, 0, 0, 0, 1, 0, 0, 0, 1),
                    io.StudyMetadata(source="x"))
    with pytest.raises(ValueError, match="positive"):
        io.CTVolume(np.zeros((2, 3, 4)), (0, 1, 1), (0, 0, 0), (1, 0, 0, 0, 1, 0, 0, 0, 1),
                    io.StudyMetadata(source="x"))


# --- spacing checks -------------------------------------------------------------------------

def test_pydicom_series_with_a_gap_fails_naming_positions():
    with pytest.raises(StudyReadError, match=r"missing slices.*-99\.480 and 103\.020"):
        io.read_study(pydicom_test_folder("77654033/CT2"))


def test_gap_fails_naming_positions(tmp_path):
    write_series(tmp_path, [0.0, 2.5, 5.0, 10.0, 12.5])
    with pytest.raises(StudyReadError, match=r"missing slices.*5\.000 and 10\.000.*~1 missing"):
        io.read_study(tmp_path)


def test_unreadable_slice_is_an_error_not_a_silently_dropped_slice(tmp_path):
    _, files = write_series(tmp_path, [0.0, 2.5, 5.0, 7.5, 10.0])
    broken = files[-1]
    broken.unlink()
    broken.symlink_to(tmp_path / "gone.dcm")  # a dangling link: listed, but cannot be opened
    with pytest.raises(StudyReadError, match=rf"{broken.name}: cannot read file"):
        io.read_study(tmp_path)
    with pytest.raises(LabelError, match=rf"{broken.name}: cannot read file"):
        io.read_labels(tmp_path)


def test_non_uniform_spacing_fails_naming_positions(tmp_path):
    write_series(tmp_path, [0.0, 2.5, 5.0, 7.6, 10.0])
    with pytest.raises(StudyReadError, match=r"non-uniform.*5\.000 and 7\.600"):
        io.read_study(tmp_path)


def test_small_position_rounding_is_tolerated(tmp_path):
    write_series(tmp_path, [0.0, 2.501, 4.999, 7.5, 10.002])
    assert io.read_study(tmp_path).spacing_zyx_mm[0] == pytest.approx(2.5005)


def test_duplicate_positions_fail(tmp_path):
    write_series(tmp_path, [0.0, 2.5, 2.5, 5.0])
    with pytest.raises(StudyReadError, match="duplicate slice position 2.500"):
        io.read_study(tmp_path)


# --- series choice and bad series -----------------------------------------------------------

def test_oblique_series_fails(tmp_path):
    c, s = np.cos(np.radians(30)), np.sin(np.radians(30))
    write_series(tmp_path, [0.0, 2.5, 5.0], orientation=(1, 0, 0, 0, c, s))
    with pytest.raises(StudyReadError, match=r"not axial.*30\.0 deg"):
        io.read_study(tmp_path)


def test_mr_folder_fails_saying_what_was_found(tmp_path):
    write_series(tmp_path, [0.0, 2.5, 5.0], modality="MR", sop_class=MR_IMAGE_STORAGE)
    with pytest.raises(StudyReadError, match=f"{tmp_path}.*modality MR, not CT"):
        io.read_study(tmp_path)


def test_pydicom_mr_folder_fails():
    with pytest.raises(StudyReadError, match="no usable axial CT series among 7 series"):
        io.read_study(pydicom_test_folder("98892003"))


def test_secondary_capture_fails(tmp_path):
    write_series(tmp_path, [0.0, 2.5, 5.0], sop_class=SECONDARY_CAPTURE, modality="OT")
    with pytest.raises(StudyReadError, match="secondary capture"):
        io.read_study(tmp_path)


def test_localizer_and_axial_chooses_axial(tmp_path):
    stored, _ = write_series(tmp_path / "axial", [0.0, 2.5, 5.0])
    write_series(tmp_path / "scout", [0.0, 1.0], seed=1, description="Topogram",
                 image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"), orientation=(0, 1, 0, 0, 0, -1))
    volume = io.read_study(tmp_path)
    np.testing.assert_array_equal(volume.hu, hu_of(stored))
    (skipped,) = volume.metadata.skipped_series
    assert "Topogram" in skipped and "localizer" in skipped


def test_two_axial_series_choose_the_larger(tmp_path):
    stored, _ = write_series(tmp_path / "thin", [0.0, 1.0, 2.0, 3.0, 4.0], description="thin")
    write_series(tmp_path / "thick", [0.0, 3.0, 6.0], seed=1, description="thick")
    volume = io.read_study(tmp_path)
    np.testing.assert_array_equal(volume.hu, hu_of(stored))
    (skipped,) = volume.metadata.skipped_series
    assert "thick" in skipped and "fewer slices (3)" in skipped


def test_single_slice_fails():
    with pytest.raises(StudyReadError, match="single slice"):
        io.read_study(pydicom.data.get_testdata_file("CT_small.dcm"))


def test_single_slice_folder_fails(tmp_path):
    write_series(tmp_path, [0.0])
    with pytest.raises(StudyReadError, match="single slice"):
        io.read_study(tmp_path)


def test_empty_and_non_dicom_folders_fail(tmp_path):
    with pytest.raises(StudyReadError, match="empty"):
        io.read_study(tmp_path)
    (tmp_path / "notes.txt").write_text("not an image\n" * 20)
    (tmp_path / "DICOMDIR").write_bytes(b"\0" * 300)
    with pytest.raises(StudyReadError, match=r"no DICOM image files found \(2 files"):
        io.read_study(tmp_path)


def test_non_dicom_files_are_ignored(tmp_path):
    stored, _ = write_series(tmp_path / "sub" / "deeper", [0.0, 2.5])
    (tmp_path / "README.txt").write_text("hello")
    np.testing.assert_array_equal(io.read_study(tmp_path).hu, hu_of(stored))


def test_preamble_less_legacy_files_are_read(tmp_path):
    stored, paths = write_series(tmp_path, [0.0, 2.5, 5.0])
    for path in paths:
        ds = pydicom.dcmread(path)
        ds.preamble = None
        del ds.file_meta
        ds.save_as(path, implicit_vr=True, little_endian=True)
    assert not paths[0].read_bytes()[128:132] == b"DICM"
    np.testing.assert_array_equal(io.read_study(tmp_path).hu, hu_of(stored))


def test_missing_path_fails(tmp_path):
    with pytest.raises(StudyReadError, match="does not exist"):
        io.read_study(tmp_path / "nope")


# --- compression and damaged files ----------------------------------------------------------

def test_rle_compressed_series_reads_like_uncompressed(tmp_path):
    stored, paths = write_series(tmp_path, [0.0, 2.5, 5.0])
    for path in paths:
        ds = pydicom.dcmread(path)
        ds.compress(RLELossless)
        ds.save_as(path)
    assert pydicom.dcmread(paths[0]).file_meta.TransferSyntaxUID == RLELossless
    np.testing.assert_array_equal(io.read_study(tmp_path).hu, hu_of(stored))


def test_jpeg2000_compressed_series_reads(tmp_path):
    from pydicom.uid import JPEG2000Lossless
    if not pydicom.pixels.get_encoder(JPEG2000Lossless).is_available:
        pytest.skip("no JPEG 2000 encoder installed")
    # JPEG 2000's default 6 resolution levels need tiles of at least 32 pixels.
    stored, paths = write_series(tmp_path, [0.0, 2.5], shape=(64, 48))
    for path in paths:
        ds = pydicom.dcmread(path)
        ds.compress(JPEG2000Lossless)
        ds.save_as(path)
    np.testing.assert_array_equal(io.read_study(tmp_path).hu, hu_of(stored))


@pytest.mark.parametrize("name", ["MR_small_RLE.dcm", "MR_small_jp2klossless.dcm",
                                  "MR_small_jpeg_ls_lossless.dcm", "MR_small_implicit.dcm",
                                  "MR_small_bigendian.dcm"])
def test_pydicom_encodings_decode_like_the_uncompressed_file(tmp_path, name):
    """pydicom's MR_small in several transfer syntaxes, relabelled as a 2-slice CT series."""
    reference = pydicom.dcmread(pydicom.data.get_testdata_file("MR_small.dcm")).pixel_array
    for k in range(2):
        ds = pydicom.dcmread(pydicom.data.get_testdata_file(name))
        ds.Modality = "CT"
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
        ds.ImagePositionPatient = [0, 0, 2.5 * k]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        if "RescaleIntercept" not in ds:  # Type 1 for CT
            ds.RescaleIntercept, ds.RescaleSlope = "0", "1"
        ds.save_as(tmp_path / f"s{k}.dcm")
    volume = io.read_study(tmp_path)
    expected = reference * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0))
    np.testing.assert_array_equal(volume.hu, np.stack([expected, expected]).astype(np.float32))


def claim_mpeg2(k, ds):
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"
    ds.PixelData = pydicom.encaps.encapsulate([b"\0\0\1\xb3" + b"\0" * 28])
    ds["PixelData"].VR = "OB"


def test_undecodable_transfer_syntax_is_named(tmp_path):
    write_series(tmp_path, [0.0, 2.5], edit=claim_mpeg2)
    with pytest.raises(StudyReadError, match=r"IM0001\.dcm: cannot decode.*"
                                             r"1\.2\.840\.10008\.1\.2\.4\.100 \(MPEG2 Main"):
        io.read_study(tmp_path)


def test_transfer_syntax_unknown_to_pydicom_is_named(tmp_path):
    _, paths = write_series(tmp_path, [0.0, 2.5], edit=claim_mpeg2)
    for path in paths:  # same length UID, so the file stays well formed
        path.write_bytes(path.read_bytes().replace(b"1.2.840.10008.1.2.4.100",
                                                   b"1.2.840.10008.1.2.4.110"))
    with pytest.raises(StudyReadError, match=r"IM0001\.dcm: cannot decode.*"
                                             r"1\.2\.840\.10008\.1\.2\.4\.110 \(JPEG XL Lossless\)"):
        io.read_study(tmp_path)


def test_truncated_pixel_data_names_the_file(tmp_path):
    _, paths = write_series(tmp_path, [0.0, 2.5, 5.0])
    data = paths[1].read_bytes()
    paths[1].write_bytes(data[: len(data) - 50])
    with pytest.raises(StudyReadError, match=r"IM0002\.dcm: truncated DICOM file: element "
                                             r"\(7FE0,0010\)"):
        io.read_study(tmp_path)


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")  # pydicom, on the cut UIDs
def test_every_truncation_of_a_slice_is_caught(tmp_path):
    """Cut one slice at each byte: the read fails naming that file, never silently (a file
    too short for the DICM marker is a cut slice too: ignoring it would drop a slice)."""
    _, paths = write_series(tmp_path, [0.0, 2.5, 5.0], shape=(4, 3))
    data = paths[2].read_bytes()
    for cut in range(0, len(data), 3):
        paths[2].write_bytes(data[:cut])
        with pytest.raises(StudyReadError, match=r"IM0003\.dcm: "):
            io.read_study(tmp_path)


def test_unreadable_header_names_the_file(tmp_path):
    _, paths = write_series(tmp_path, [0.0, 2.5, 5.0])
    data = bytearray(paths[0].read_bytes())
    data[140:148] = b"\xff" * 8  # corrupt the file meta group length and VR
    paths[0].write_bytes(bytes(data))
    with pytest.raises(StudyReadError, match=r"IM0001\.dcm: "):
        io.read_study(tmp_path)


# --- image files ----------------------------------------------------------------------------

def sitk_image(array: np.ndarray, spacing_xyz=(0.5, 0.7, 3.0), origin=(-10.0, 5.0, 40.0),
               direction=(1, 0, 0, 0, 1, 0, 0, 0, 1)) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing_xyz)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    return image


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".mhd", ".nrrd"])
def test_image_files_give_zyx_spacing_and_float_hu(tmp_path, suffix):
    array = np.random.default_rng(0).integers(-1024, 2000, size=(4, 6, 5)).astype(np.int16)
    direction = (0, -1, 0, 1, 0, 0, 0, 0, 1)
    sitk.WriteImage(sitk_image(array, direction=direction), str(tmp_path / f"ct{suffix}"))
    volume = io.read_study(tmp_path / f"ct{suffix}")
    # Stored x runs to world +y and stored y to world -x: canonically (LPS) they swap and the
    # new x axis is reversed.
    assert volume.hu.dtype == np.float32 and volume.shape == (4, 5, 6)
    np.testing.assert_array_equal(volume.hu, np.transpose(array, (0, 2, 1))[:, :, ::-1])
    assert volume.spacing_zyx_mm == pytest.approx((3.0, 0.5, 0.7))
    assert volume.origin_xyz_mm == pytest.approx((-10.0 - 5 * 0.7, 5.0, 40.0))
    np.testing.assert_allclose(volume.direction, (1, 0, 0, 0, 1, 0, 0, 0, 1), atol=1e-6)
    assert_same_as_sitk(volume, sitk.ReadImage(str(tmp_path / f"ct{suffix}")))
    assert volume.stored.direction == pytest.approx(direction)
    assert volume.metadata.source == str(tmp_path / f"ct{suffix}")


def test_bad_image_files_fail(tmp_path):
    (tmp_path / "broken.nii.gz").write_bytes(b"garbage" * 10)
    with pytest.raises(StudyReadError, match=r"broken\.nii\.gz: unreadable image file"):
        io.read_study(tmp_path / "broken.nii.gz")
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((5, 6), np.int16)), str(tmp_path / "a.nrrd"))
    with pytest.raises(StudyReadError, match="2-D"):
        io.read_study(tmp_path / "a.nrrd")
    (tmp_path / "scan.png").write_bytes(b"\x89PNG....")
    with pytest.raises(StudyReadError, match="not a DICOM"):
        io.read_study(tmp_path / "scan.png")


def test_float64_hu_keeps_its_side_of_every_agatston_threshold(tmp_path):
    # A float64 image with lesions a hair under 130, 200, 300 and 400 HU: read as float32, each
    # stays under its threshold (rounded down, not to the nearest float32, which is the threshold).
    from cac_jax.scoring import agatston_score

    peaks = (129.99999999, 199.9999999, 299.9999999, 399.9999999)
    hu = np.full((2, 12, 12), -50.0)  # the lesions on slice 0; a volume has 2 slices at least
    labels = np.zeros(hu.shape, np.int16)
    for i, peak in enumerate(peaks):
        hu[0, 1 + 3 * i:3 + 3 * i, 1:3] = peak  # 2 x 2 pixels of 1 mm
        labels[0, 1 + 3 * i:3 + 3 * i, 1:3] = 1
    image = sitk.GetImageFromArray(hu)  # float64 voxels (MET_DOUBLE)
    image.SetSpacing((1.0, 1.0, 3.0))
    sitk.WriteImage(image, str(tmp_path / "wide.mhd"))
    volume = io.read_study(tmp_path / "wide.mhd")
    assert volume.hu.dtype == np.float32
    assert [float(volume.hu[0, 1 + 3 * i, 1]) < t for i, t in enumerate((130, 200, 300, 400))] \
        == [True] * 4
    result = agatston_score(volume.hu, labels, volume.spacing_zyx_mm)
    # Not a candidate, then weights 1, 2, 3 on 4 mm^2 each: 24 (round to nearest gave 40).
    assert result.agatston == pytest.approx(24.0)
    assert [lesion.weight for lesion in result.lesions] == [1, 2, 3]


# --- labels ---------------------------------------------------------------------------------

def test_read_labels_matching_geometry(tmp_path):
    volume = make_volume(shape=(4, 8, 6))
    labels = np.zeros(volume.shape, np.uint8)
    labels[1, 2:4, 3] = 2
    io.write_volume(tmp_path / "labels.nii.gz", labels, volume)
    out = io.read_labels(tmp_path / "labels.nii.gz", like=volume)
    assert out.dtype == np.int16
    np.testing.assert_array_equal(out, labels)


def test_read_labels_accepts_whole_floats_and_dicom_folders(tmp_path):
    volume = make_volume(shape=(3, 8, 6))
    labels = np.zeros(volume.shape, np.float32)
    labels[0, 1, 1], labels[2, 3, 3] = 3.0, 7.0
    io.write_volume(tmp_path / "labels.mhd", labels, volume)
    np.testing.assert_array_equal(io.read_labels(tmp_path / "labels.mhd", like=volume), labels)
    label_volume = io.CTVolume(labels, volume.spacing_zyx_mm, volume.origin_xyz_mm,
                               volume.direction, io.StudyMetadata(source="labels"))
    io.write_dicom_series(label_volume, tmp_path / "dcm")
    np.testing.assert_array_equal(io.read_labels(tmp_path / "dcm", like=volume), labels)


@pytest.mark.parametrize("change, pattern", [
    ({"shape": (4, 8, 7)}, r"shape \(z, y, x\) \(4, 8, 7\) differs from the image's \(4, 8, 6\)"),
    ({"spacing": (3.0, 0.7, 0.6)},
     r"spacing \(z, y, x\) \(3, 0.7, 0.6\) mm differs from the image's \(3, 0.7, 0.5\) mm"),
    ({"origin": (-20.0, -30.5, 12.5)},
     r"origin \(x, y, z\) \(-20, -30.5, 12.5\) mm differs from the image's \(-20, -30.5, 12.25\)"),
])
def test_read_labels_geometry_mismatch_says_what_differs(tmp_path, change, pattern):
    volume = make_volume(shape=(4, 8, 6))
    other = make_volume(shape=change.get("shape", volume.shape),
                        spacing=change.get("spacing", volume.spacing_zyx_mm),
                        origin=change.get("origin", volume.origin_xyz_mm))
    io.write_volume(tmp_path / "labels.nii.gz", np.zeros(other.shape, np.uint8), other)
    with pytest.raises(LabelError, match=pattern):
        io.read_labels(tmp_path / "labels.nii.gz", like=volume)


def test_read_labels_tolerates_tiny_origin_rounding(tmp_path):
    volume = make_volume(shape=(4, 8, 6))
    other = make_volume(shape=(4, 8, 6), origin=(-20.004, -30.5, 12.25))
    io.write_volume(tmp_path / "labels.nii.gz", np.zeros(other.shape, np.uint8), other)
    assert io.read_labels(tmp_path / "labels.nii.gz", like=volume).shape == (4, 8, 6)


def test_read_labels_rejects_negative_and_fractional_values(tmp_path):
    volume = make_volume(shape=(3, 5, 4))
    negative = np.zeros(volume.shape, np.int16)
    negative[1, 2, 3] = -1
    io.write_volume(tmp_path / "neg.nii.gz", negative, volume)
    with pytest.raises(LabelError, match=r"neg\.nii\.gz: negative label values \(minimum -1"):
        io.read_labels(tmp_path / "neg.nii.gz", like=volume)
    fractional = np.zeros(volume.shape, np.float32)
    fractional[2, 0, 1] = 0.5
    io.write_volume(tmp_path / "frac.nrrd", fractional, volume)
    with pytest.raises(LabelError, match=r"frac\.nrrd: non-integer label values.*0\.5 at "
                                         r"voxel \(z, y, x\) \(2, 0, 1\)"):
        io.read_labels(tmp_path / "frac.nrrd")


def test_label_codes_beyond_int16_are_non_coronary(tmp_path):
    # Codes 5 and above are non-coronary whatever their value: a uint16 code of 40000 is read,
    # not refused, and stays non-coronary (never scored).
    volume = make_volume(shape=(3, 5, 4))
    labels = np.zeros(volume.shape, np.uint16)
    labels[1, 2, 3], labels[0, 1, 1] = 40000, 2
    io.write_volume(tmp_path / "wide.nii.gz", labels, volume)
    out = io.read_labels(tmp_path / "wide.nii.gz", like=volume)
    assert out.dtype == np.int16
    assert out[1, 2, 3] == np.iinfo(np.int16).max and out[0, 1, 1] == 2
    assert (out[labels < 5] == labels[labels < 5]).all()


def test_read_labels_missing_file(tmp_path):
    with pytest.raises(LabelError, match="does not exist"):
        io.read_labels(tmp_path / "none.nii.gz")


# --- write_volume ---------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".mhd", ".nrrd"])
@pytest.mark.parametrize("dtype, stored", [(np.uint8, sitk.sitkUInt8), (np.int16, sitk.sitkInt16),
                                           (np.bool_, sitk.sitkUInt8),
                                           (np.int64, sitk.sitkInt16),
                                           (np.float64, sitk.sitkFloat32)])
def test_write_volume_keeps_geometry_and_integer_types(tmp_path, suffix, dtype, stored):
    volume = make_volume(shape=(3, 6, 5))
    array = (np.arange(90).reshape(3, 6, 5) % 3).astype(dtype)
    target = tmp_path / "sub" / f"mask{suffix}"
    io.write_volume(target, array, volume)
    image = sitk.ReadImage(str(target))
    assert image.GetPixelID() == stored
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), array)
    back = io.read_study(target)
    np.testing.assert_allclose(back.spacing_zyx_mm, volume.spacing_zyx_mm, rtol=1e-6)
    np.testing.assert_allclose(back.origin_xyz_mm, volume.origin_xyz_mm, atol=1e-4)
    expected = {f"mask{suffix}"} | ({"mask.zraw"} if suffix == ".mhd" else set())
    assert {p.name for p in target.parent.iterdir()} == expected  # no temporaries left


def test_write_volume_failure_leaves_old_file(tmp_path, monkeypatch):
    volume = make_volume(shape=(2, 4, 4))
    for name in ("old.nii.gz", "old.mhd"):
        io.write_volume(tmp_path / name, np.ones(volume.shape, np.uint8), volume)

    def fail(image, path, *args, **kwargs):
        Path(path).write_bytes(b"half")
        raise RuntimeError("disk full")

    monkeypatch.setattr(io_writers.sitk, "WriteImage", fail)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    for name in ("old.nii.gz", "old.mhd"):
        with pytest.raises(RuntimeError, match="disk full"):
            io.write_volume(tmp_path / name, np.zeros(volume.shape, np.uint8), volume)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_write_volume_rejects_wrong_shape_and_format(tmp_path):
    volume = make_volume(shape=(2, 4, 4))
    with pytest.raises(ValueError, match="shape"):
        io.write_volume(tmp_path / "m.nii.gz", np.zeros((2, 4, 5)), volume)
    with pytest.raises(ValueError, match="format"):
        io.write_volume(tmp_path / "m.png", np.zeros((2, 4, 4)), volume)
    assert os.listdir(tmp_path) == []


def test_errors_are_input_errors():
    assert issubclass(StudyReadError, InputError) and issubclass(LabelError, InputError)


@pytest.mark.skipif(shutil.which("dciodvfy") is None,
                    reason="dicom3tools' dciodvfy is not installed (.ci/run installs it)")
def test_a_written_ct_series_passes_dciodvfy(tmp_path):
    # The synthetic cohort's DICOM is what users and the tests read as "real DICOM": no error
    # from dicom3tools (PatientPosition, a Type 2C of CT images, was missing).
    hu = np.full((3, 8, 8), -1000.0, np.float32)
    volume = io.CTVolume(hu, (3.0, 0.7, 0.7), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1),
                         io.StudyMetadata(source="memory", patient_id="P1"))
    first = io.write_dicom_series(volume, tmp_path / "ct", uid_seed="dciodvfy")[0]
    run = subprocess.run(["dciodvfy", str(first)], capture_output=True, text=True, timeout=60)
    text = run.stdout + run.stderr
    assert "CTImage" in text.replace(" ", "")
    assert [line for line in text.splitlines() if line.startswith("Error")] == []
