"""Enhanced CT (multi-frame) files: read frame by frame as the classic series they were made from.

The multi-frame files are made by highdicom's legacy conversion (an implementation apart from
ours) from classic series written by `io_fixtures`, so each is checked against the same series
read slice by slice.
"""

from __future__ import annotations

import shutil

import highdicom
import numpy as np
import pydicom
import pytest
from io_fixtures import hu_of, shuffle_frames, write_series
from pydicom.uid import RLELossless

from data_pipeline.errors import InputError
from data_pipeline.io import read_study


def _convert(paths, out, *, transfer_syntax=None, series_number=7):
    """The classic slices at `paths` as one Legacy Converted Enhanced CT file `out`, its frames
    shuffled (frame order is not slice order), then compressed with `transfer_syntax`."""
    legacy = [pydicom.dcmread(p) for p in paths]
    image = highdicom.legacy.LegacyConvertedEnhancedCTImage(
        legacy, series_instance_uid=highdicom.UID(), series_number=series_number,
        sop_instance_uid=highdicom.UID(), instance_number=1)
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save_as(out)
    assert shuffle_frames(out) != sorted(range(len(paths)))
    if transfer_syntax is not None:
        ds = pydicom.dcmread(out)
        ds.compress(transfer_syntax)
        ds.save_as(out)
    return out


def _gated(k, ds):
    ds.CardiacSynchronizationTechnique = "PROSPECTIVE"
    ds.KVP = "120"
    ds.SliceThickness = "3"


@pytest.mark.parametrize("transfer_syntax", [None, RLELossless])
def test_an_enhanced_file_reads_as_its_classic_series(tmp_path, transfer_syntax):
    stored, paths = write_series(tmp_path / "classic", [0.0, 3.0, 6.0, 9.0, 12.0],
                                 shape=(12, 10), edit=_gated)
    enhanced = _convert(paths, tmp_path / "enhanced" / "ct.dcm", transfer_syntax=transfer_syntax)
    classic, multi = read_study(tmp_path / "classic"), read_study(enhanced)
    # The fixture's slices are head-first along +z; the canonical volume runs feet to head.
    np.testing.assert_array_equal(multi.hu, classic.hu)
    np.testing.assert_array_equal(np.sort(multi.hu.ravel()), np.sort(hu_of(stored).ravel()))
    assert multi.spacing_zyx_mm == classic.spacing_zyx_mm == (3.0, 0.7, 0.5)
    assert multi.origin_xyz_mm == classic.origin_xyz_mm
    assert multi.direction == classic.direction
    assert (multi.metadata.ecg_gated, multi.metadata.protocol) == (True, "cac")
    assert (multi.metadata.kvp, multi.metadata.slice_thickness_mm) == (120.0, 3.0)
    assert "5 frames in 1 file" in multi.metadata.chosen_series
    # The folder holding the file reads the same.
    np.testing.assert_array_equal(read_study(enhanced.parent).hu, classic.hu)


def test_an_enhanced_series_beside_classic_ones_is_chosen_like_them(tmp_path):
    _, thin = write_series(tmp_path / "thin", [0.0, 1.0, 2.0, 3.0, 4.0, 5.0], seed=1,
                           edit=lambda k, ds: setattr(ds, "SliceThickness", "1"))
    _, scoring = write_series(tmp_path / "scoring", [0.0, 3.0, 6.0], seed=2, edit=_gated)
    study = tmp_path / "study"
    study.mkdir()
    for path in thin:
        shutil.copy(path, study / f"thin_{path.name}")
    _convert(scoring, study / "enhanced.dcm", series_number=7)
    volume = read_study(study)
    assert volume.hu.shape == (3, 12, 10)  # the 3 mm series, closest to calcium scoring's
    assert "3 frames in 1 file" in volume.metadata.chosen_series
    assert any("6 files" in s for s in volume.metadata.skipped_series)
    assert read_study(study, series=1).hu.shape == (6, 12, 10)  # asked for: the thin one
    assert read_study(study, series=7).hu.shape == (3, 12, 10)


def test_frames_of_two_stacks_are_two_series(tmp_path):
    _, paths = write_series(tmp_path / "classic", [0.0, 3.0, 6.0, 9.0], edit=_gated)
    enhanced = _convert(paths, tmp_path / "ct.dcm")
    ds = pydicom.dcmread(enhanced)
    for frame in ds.PerFrameFunctionalGroupsSequence:
        z = float(frame.PlanePositionSequence[0].ImagePositionPatient[2])
        content = frame.FrameContentSequence[0]
        content.StackID = "1" if z < 5 else "2"  # two stacks of two slices each
    ds.save_as(enhanced)
    volume = read_study(enhanced)
    assert volume.hu.shape[0] == 2
    assert "/stack " in volume.metadata.chosen_series
    (skipped,) = volume.metadata.skipped_series
    assert "/stack " in skipped
    # One stack is picked by its listed name; the UID alone names both.
    uid = str(ds.SeriesInstanceUID)
    second = read_study(enhanced, series=f"{uid}/stack 2")
    assert second.hu.shape[0] == 2 and second.origin_xyz_mm != volume.origin_xyz_mm
    with pytest.raises(InputError, match=r"matches 2 series.*SeriesInstanceUID/stack ID"):
        read_study(enhanced, series=uid)


def _as_scanner_enhanced_ct(path):
    """Rewrites a legacy conversion as a scanner writes Enhanced CT: SOP class ...2.1, rescale,
    kVp and cardiac phase in functional groups (per-frame rescale overriding a wrong shared one),
    no unassigned-attribute groups, no FrameContentSequence, no top-level gating marker."""
    ds = pydicom.dcmread(path)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2.1"
    for keyword in ("CardiacSynchronizationTechnique", "KVP"):
        if keyword in ds:
            delattr(ds, keyword)
    shared = ds.SharedFunctionalGroupsSequence[0]
    if "UnassignedSharedConvertedAttributesSequence" in shared:
        del shared.UnassignedSharedConvertedAttributesSequence
    shared.PixelValueTransformationSequence[0].RescaleIntercept = "-1000"  # overridden below
    phase = pydicom.Dataset()
    phase.NominalPercentageOfCardiacPhase = 70
    shared.CardiacSynchronizationSequence = [phase]
    for frame in ds.PerFrameFunctionalGroupsSequence:
        for keyword in ("UnassignedPerFrameConvertedAttributesSequence", "FrameContentSequence",
                        "ConversionSourceAttributesSequence"):
            if keyword in frame:
                delattr(frame, keyword)
        rescale = pydicom.Dataset()
        rescale.RescaleSlope, rescale.RescaleIntercept, rescale.RescaleType = "1", "-1024", "HU"
        frame.PixelValueTransformationSequence = [rescale]
        xray = pydicom.Dataset()
        xray.KVP = "100"
        frame.CTXRayDetailsSequence = [xray]
    ds.save_as(path)
    return path


def test_a_scanners_enhanced_ct_reads_from_its_functional_groups(tmp_path):
    stored, paths = write_series(tmp_path / "classic", [0.0, 3.0, 6.0, 9.0], shape=(12, 10),
                                 edit=lambda k, ds: setattr(ds, "SliceThickness", "3"))
    enhanced = _as_scanner_enhanced_ct(_convert(paths, tmp_path / "enhanced" / "ct.dcm"))
    assert "CardiacSynchronizationTechnique" not in pydicom.dcmread(enhanced)
    classic, multi = read_study(tmp_path / "classic"), read_study(enhanced)
    np.testing.assert_array_equal(multi.hu, classic.hu)  # the per-frame intercept, -1024
    assert multi.metadata.kvp == 100.0
    assert (multi.metadata.ecg_gated, multi.metadata.protocol) == (True, "cac")  # the phase
    assert classic.metadata.ecg_gated is None


def test_frames_are_named_in_messages(tmp_path):
    _, paths = write_series(tmp_path / "classic", [0.0, 3.0, 6.0, 9.0], edit=_gated)
    enhanced = _convert(paths, tmp_path / "ct.dcm")
    ds = pydicom.dcmread(enhanced)
    ds.PerFrameFunctionalGroupsSequence[2].PlanePositionSequence[0].ImagePositionPatient = \
        ds.PerFrameFunctionalGroupsSequence[0].PlanePositionSequence[0].ImagePositionPatient
    ds.save_as(enhanced)
    with pytest.raises(InputError, match=r"duplicate slice position .*\(ct\.dcm \[frame \d\] and "
                                         r"ct\.dcm \[frame \d\]\)"):
        read_study(enhanced)


def test_an_enhanced_file_without_geometry_is_skipped_like_a_classic_one(tmp_path):
    _, paths = write_series(tmp_path / "scoring", [0.0, 3.0, 6.0], seed=1, edit=_gated)
    _, other = write_series(tmp_path / "other", [0.0, 3.0, 6.0], seed=2, edit=_gated)
    enhanced = _convert(other, tmp_path / "scoring" / "zz_enhanced.dcm", series_number=7)
    ds = pydicom.dcmread(enhanced)
    for frame in ds.PerFrameFunctionalGroupsSequence:
        del frame.PlanePositionSequence
    ds.save_as(enhanced)
    volume = read_study(tmp_path / "scoring")
    assert volume.hu.shape == (3, 12, 10) and "3 files" in volume.metadata.chosen_series
    (skipped,) = volume.metadata.skipped_series
    assert "3 frames in 1 file" in skipped and "ImagePositionPatient missing" in skipped


def test_a_frame_without_its_position_is_named(tmp_path):
    _, paths = write_series(tmp_path / "classic", [0.0, 3.0, 6.0], edit=_gated)
    enhanced = _convert(paths, tmp_path / "ct.dcm")
    ds = pydicom.dcmread(enhanced)
    del ds.PerFrameFunctionalGroupsSequence[1].PlanePositionSequence
    ds.save_as(enhanced)
    with pytest.raises(InputError, match=r"ct\.dcm.*frame 2 of 3 has no ImagePositionPatient"):
        read_study(enhanced)


def test_an_enhanced_file_with_a_gap_is_refused_like_a_classic_one(tmp_path):
    _, paths = write_series(tmp_path / "classic", [0.0, 3.0, 6.0, 12.0, 15.0], edit=_gated)
    with pytest.raises(InputError, match="missing slices"):
        read_study(tmp_path / "classic")
    enhanced = _convert(paths, tmp_path / "ct.dcm")
    with pytest.raises(InputError, match=r"missing slices"):
        read_study(enhanced)


def test_an_enhanced_file_with_short_pixel_data_is_named(tmp_path):
    _, paths = write_series(tmp_path / "classic", [0.0, 3.0, 6.0], edit=_gated)
    enhanced = _convert(paths, tmp_path / "ct.dcm")
    ds = pydicom.dcmread(enhanced)
    ds.PixelData = ds.PixelData[: 12 * 10 * 2 * 2]  # two frames' bytes for three frames
    ds.save_as(enhanced)
    with pytest.raises(InputError, match=r"ct\.dcm.*x 3 frames need 720"):
        read_study(enhanced)
