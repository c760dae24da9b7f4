"""One canonical orientation: the same anatomy stored head-first or feet-first, with mirrored rows
or in RAS order (DICOM and NIfTI) reads as the same array, and a mask written back for any of them
overlays that input exactly. Also labels exported with SimpleITK, gantry tilt included."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from io_fixtures import slice_dataset, write_series
from pydicom.uid import generate_uid

from data_pipeline import io
from data_pipeline.errors import LabelError

SHAPE = (5, 6, 7)               # canonical (z, y, x)
SPACING = (3.0, 0.8, 0.6)       # (z, y, x) mm
CORNER = np.array([-20.0, -30.0, 100.0])   # world LPS position of canonical voxel (0, 0, 0)


def anatomy() -> np.ndarray:
    """A volume in canonical order whose every voxel differs, so any flip or swap shows."""
    return (np.arange(np.prod(SHAPE)).reshape(SHAPE) * 3 - 900).astype(np.int16)


def canonical_world(k: int, r: int, c: int) -> np.ndarray:
    return CORNER + np.array([c * SPACING[2], r * SPACING[1], k * SPACING[0]])


def write_dicom(folder: Path, row: tuple, col: tuple, *, reverse_files: bool = False) -> None:
    """Writes the anatomy as DICOM with the given row/column directions (each +-x or +-y):
    resamples nothing, only picks for each stored pixel the anatomy voxel at its position."""
    row, col = np.array(row, float), np.array(col, float)
    normal = np.cross(row, col)
    ana = anatomy()
    # Stored slice k, row r, column c lies at start + c*dx*row + r*dy*col + k*dz*normal; choose
    # `start` so the stored grid covers exactly the canonical one.
    dz, dy, dx = SPACING
    extent = np.array([(SHAPE[2] - 1) * dx, (SHAPE[1] - 1) * dy, (SHAPE[0] - 1) * dz])
    start = CORNER + np.where(row + col + normal < 0, extent, 0.0)
    rows, columns = (SHAPE[1], SHAPE[2]) if abs(col[1]) == 1 else (SHAPE[2], SHAPE[1])
    n_rows_spacing, n_cols_spacing = (dy, dx) if abs(col[1]) == 1 else (dx, dy)
    series, study = generate_uid(), generate_uid()
    order = range(SHAPE[0])[::-1] if reverse_files else range(SHAPE[0])
    folder.mkdir(parents=True)
    for k in order:
        stored = np.empty((rows, columns), np.uint16)
        for r, c in itertools.product(range(rows), range(columns)):
            world = start + c * n_cols_spacing * row + r * n_rows_spacing * col + k * dz * normal
            index = np.rint((world - CORNER) / np.array([dx, dy, dz])).astype(int)
            stored[r, c] = ana[index[2], index[1], index[0]] + 1024
        ds = slice_dataset(stored, start + k * dz * normal, orientation=(*row, *col),
                           pixel_spacing=(n_rows_spacing, n_cols_spacing), series_uid=series,
                           study_uid=study, instance=k + 1)
        ds.save_as(folder / f"IM{k:04d}.dcm", enforce_file_format=True)


POSITIONS = {  # (row, column) direction cosines of the image plane
    "head_first_supine": ((1, 0, 0), (0, 1, 0)),
    "feet_first_supine": ((-1, 0, 0), (0, 1, 0)),
    "head_first_prone": ((-1, 0, 0), (0, -1, 0)),
    "feet_first_prone": ((1, 0, 0), (0, -1, 0)),
    "transposed_rows": ((0, 1, 0), (1, 0, 0)),
}


@pytest.fixture(scope="module")
def dicom_studies(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("orientations")
    for name, (row, col) in POSITIONS.items():
        write_dicom(root / name, row, col, reverse_files=name.startswith("feet"))
    return {name: root / name for name in POSITIONS}


def sitk_series(folder: Path) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    return reader.Execute()


@pytest.mark.parametrize("name", list(POSITIONS))
def test_every_patient_position_reads_as_the_same_array(dicom_studies, name):
    volume = io.read_study(dicom_studies[name])
    np.testing.assert_array_equal(volume.hu, anatomy().astype(np.float32))
    assert volume.spacing_zyx_mm == pytest.approx(SPACING)
    assert volume.origin_xyz_mm == pytest.approx(tuple(CORNER))
    np.testing.assert_allclose(volume.direction, np.eye(3).ravel(), atol=1e-9)
    # The canonical orientation is SimpleITK's DICOMOrient(..., "LPS") of the same series.
    oriented = sitk.DICOMOrient(sitk_series(dicom_studies[name]), "LPS")
    np.testing.assert_array_equal(volume.hu, sitk.GetArrayFromImage(oriented))
    assert volume.stored.is_canonical == (name == "head_first_supine")


def nifti_variant(path: Path, flips_xyz: tuple[bool, bool, bool], swap_xy: bool) -> None:
    """Stores the anatomy with some axes reversed (and x/y swapped), geometry adjusted so the
    world position of every voxel is unchanged; written by SimpleITK."""
    array = anatomy()
    direction = np.eye(3)
    origin = CORNER.copy()
    spacing_xyz = np.array(SPACING[::-1])
    for axis, flip in enumerate(flips_xyz):
        if flip:
            array = np.flip(array, 2 - axis)
            origin = origin + (SHAPE[2 - axis] - 1) * spacing_xyz[axis] * direction[:, axis]
            direction[:, axis] *= -1
    if swap_xy:
        array = np.swapaxes(array, 1, 2)
        direction = direction[:, [1, 0, 2]]
        spacing_xyz = spacing_xyz[[1, 0, 2]]
    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    image.SetSpacing(tuple(spacing_xyz))
    image.SetOrigin(tuple(origin))
    image.SetDirection(tuple(direction.ravel()))
    sitk.WriteImage(image, str(path))


@pytest.mark.parametrize("flips", list(itertools.product([False, True], repeat=3)))
@pytest.mark.parametrize("swap", [False, True])
def test_nifti_in_any_axis_order_reads_as_the_same_array(tmp_path, flips, swap):
    # (True, True, False) is RAS storage, what most NIfTI tools write; (False, False, True)
    # stores the slices head to feet.
    path = tmp_path / "ct.nii.gz"
    nifti_variant(path, flips, swap)
    volume = io.read_study(path)
    np.testing.assert_array_equal(volume.hu, anatomy().astype(np.float32))
    assert volume.spacing_zyx_mm == pytest.approx(SPACING)
    assert volume.origin_xyz_mm == pytest.approx(tuple(CORNER))
    oriented = sitk.DICOMOrient(sitk.ReadImage(str(path)), "LPS")
    np.testing.assert_array_equal(volume.hu, sitk.GetArrayFromImage(oriented))
    assert volume.origin_xyz_mm == pytest.approx(oriented.GetOrigin())


def mask_of(volume: io.CTVolume) -> np.ndarray:
    """A mask that is not symmetric under any flip: the voxels above a threshold, plus labels."""
    mask = (volume.hu > np.percentile(volume.hu, 70)).astype(np.uint8)
    mask[0, 0, 0] = 2
    mask[-1, 1, 2] = 3
    return mask


@pytest.mark.parametrize("name", ["feet_first_supine", "head_first_prone", "transposed_rows"])
def test_mask_written_back_overlays_the_input_exactly(dicom_studies, tmp_path, name):
    folder = dicom_studies[name]
    volume = io.read_study(folder)
    mask = mask_of(volume)
    io.write_labels(tmp_path / "mask.nii.gz", mask, like=volume)

    written = sitk.ReadImage(str(tmp_path / "mask.nii.gz"))
    series = sitk_series(folder)
    # Same grid as the input as SimpleITK (and viewers) read it: voxel for voxel.
    assert written.GetSize() == series.GetSize()
    np.testing.assert_allclose(written.GetSpacing(), series.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(written.GetOrigin(), series.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(written.GetDirection(), series.GetDirection(), atol=1e-9)
    # Each labelled voxel sits on the input voxel it was computed from (same HU there).
    stored_mask = sitk.GetArrayFromImage(written)
    stored_hu = sitk.GetArrayFromImage(series)
    np.testing.assert_array_equal(np.sort(stored_hu[stored_mask == 1]),
                                  np.sort(volume.hu[mask == 1]))
    for label in (2, 3):
        (k, j, i), = np.argwhere(stored_mask == label)
        (kc, jc, ic), = np.argwhere(mask == label)
        assert stored_hu[k, j, i] == volume.hu[kc, jc, ic]
        world = series.TransformIndexToPhysicalPoint((int(i), int(j), int(k)))
        assert np.allclose(world, canonical_world(kc, jc, ic), atol=1e-4)
    # And it reads back as the same canonical array.
    np.testing.assert_array_equal(io.read_labels(tmp_path / "mask.nii.gz", like=volume), mask)


def test_labels_exported_by_simpleitk_from_a_feet_first_series_are_accepted(dicom_studies,
                                                                             tmp_path):
    folder = dicom_studies["feet_first_supine"]
    series = sitk_series(folder)
    stored_labels = (sitk.GetArrayFromImage(series) > 0).astype(np.uint8)
    exported = sitk.GetImageFromArray(stored_labels)
    exported.CopyInformation(series)
    sitk.WriteImage(exported, str(tmp_path / "labels.nii.gz"))
    volume = io.read_study(folder)
    labels = io.read_labels(tmp_path / "labels.nii.gz", like=volume)
    np.testing.assert_array_equal(labels, (volume.hu > 0).astype(np.int16))
    # A label file written in the canonical orientation (write_volume) is accepted as well.
    io.write_volume(tmp_path / "canonical.nii.gz", labels, like=volume)
    np.testing.assert_array_equal(io.read_labels(tmp_path / "canonical.nii.gz", like=volume),
                                  labels)


@pytest.mark.parametrize("tilt_deg", [1.5, 4.0])
def test_labels_exported_with_simpleitk_from_a_gantry_tilted_series(tmp_path, tilt_deg):
    """Gantry tilt: slices tilted, table moving along z. The z spacing is the distance between
    positions (3.0 mm), as SimpleITK's; a label file with the distance along the normal
    (3 cos t, as some converters write) is accepted too, and a mask written back lands on
    SimpleITK's grid of the series."""
    c, s = np.cos(np.radians(tilt_deg)), np.sin(np.radians(tilt_deg))
    series_uid, study_uid = generate_uid(), generate_uid()
    (tmp_path / "dcm").mkdir()
    rng = np.random.default_rng(0)
    for k in range(6):
        stored = rng.integers(0, 2000, size=(8, 9)).astype(np.uint16)
        ds = slice_dataset(stored, (-30.0, -40.0, 3.0 * k), orientation=(1, 0, 0, 0, c, s),
                           series_uid=series_uid, study_uid=study_uid, instance=k + 1)
        ds.save_as(tmp_path / "dcm" / f"IM{k}.dcm", enforce_file_format=True)
    series = sitk_series(tmp_path / "dcm")
    assert series.GetSpacing()[2] == pytest.approx(3.0)
    volume = io.read_study(tmp_path / "dcm")
    assert volume.spacing_zyx_mm[0] == pytest.approx(3.0)
    assert volume.stored_geometry.normal_spacing_mm == pytest.approx(3.0 * c)
    io.write_labels(tmp_path / "mask.nii.gz", (volume.hu > 0).astype(np.uint8), like=volume)
    mask = sitk.ReadImage(str(tmp_path / "mask.nii.gz"))
    np.testing.assert_allclose(mask.GetSpacing(), series.GetSpacing(), rtol=1e-6)
    np.testing.assert_allclose(mask.GetOrigin(), series.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(mask.GetDirection(), series.GetDirection(), atol=1e-6)
    sitk.Mask(series, sitk.Cast(mask, series.GetPixelID()))  # same physical space, or it raises
    normal = sitk.Image(mask)
    normal.SetSpacing((*series.GetSpacing()[:2], 3.0 * c))
    sitk.WriteImage(normal, str(tmp_path / "normal.nii.gz"))
    np.testing.assert_array_equal(io.read_labels(tmp_path / "normal.nii.gz", like=volume),
                                  (volume.hu > 0).astype(np.int16))
    exported = sitk.GetImageFromArray((sitk.GetArrayFromImage(series) > 0).astype(np.uint8))
    exported.CopyInformation(series)
    sitk.WriteImage(exported, str(tmp_path / "labels.nii.gz"))
    labels = io.read_labels(tmp_path / "labels.nii.gz", like=volume)
    np.testing.assert_array_equal(labels, (volume.hu > 0).astype(np.int16))
    # A real mismatch in z spacing is still refused.
    wrong = sitk.Image(exported)
    wrong.SetSpacing((*series.GetSpacing()[:2], 3.3))
    sitk.WriteImage(wrong, str(tmp_path / "wrong.nii.gz"))
    with pytest.raises(LabelError, match=r"wrong\.nii\.gz: spacing \(z, y, x\)"):
        io.read_labels(tmp_path / "wrong.nii.gz", like=volume)


def test_mask_written_back_for_a_feet_first_nifti_has_its_grid(tmp_path):
    nifti_variant(tmp_path / "ct.nii", (True, False, True), swap_xy=False)
    volume = io.read_study(tmp_path / "ct.nii")
    mask = mask_of(volume)
    io.write_labels(tmp_path / "mask.nii.gz", mask, like=volume)
    source, written = sitk.ReadImage(str(tmp_path / "ct.nii")), sitk.ReadImage(
        str(tmp_path / "mask.nii.gz"))
    assert written.GetSize() == source.GetSize()
    np.testing.assert_allclose(written.GetOrigin(), source.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(written.GetDirection(), source.GetDirection(), atol=1e-9)
    stored_hu, stored_mask = sitk.GetArrayFromImage(source), sitk.GetArrayFromImage(written)
    (k, j, i), = np.argwhere(stored_mask == 3)
    assert stored_hu[k, j, i] == volume.hu[-1, 1, 2]
    np.testing.assert_array_equal(io.read_labels(tmp_path / "mask.nii.gz", like=volume), mask)


@pytest.mark.parametrize("orientation, warned", [
    ((1.0000004, 0, 0, 0, 0.9999996, 0), False),   # rounded in the header: made exact quietly
    ((1.002, 0, 0, 0, 0.998, 0), True),            # beyond GDCM's 1e-3: named in a warning
    ((1, 0.02, 0, 0, 1, 0), True),                 # rows and columns not orthogonal
])
def test_orientation_vectors_are_made_orthonormal_and_the_mask_round_trips(tmp_path, orientation,
                                                                           warned):
    write_series(tmp_path / "dcm", [0.0, 2.0, 4.0, 6.0], orientation=orientation)
    volume = io.read_study(tmp_path / "dcm")
    rotation = np.array(volume.direction).reshape(3, 3)
    np.testing.assert_allclose(rotation.T @ rotation, np.eye(3), atol=1e-12)
    assert any("ImageOrientationPatient" in w for w in volume.metadata.warnings) == warned
    mask = (volume.hu > 0).astype(np.uint8)
    io.write_labels(tmp_path / "mask.nii.gz", mask, like=volume)
    np.testing.assert_array_equal(io.read_labels(tmp_path / "mask.nii.gz", like=volume), mask)
    if orientation[1] == 0:  # a scaled, not skewed, pair: SimpleITK's identity
        series = sitk.ImageSeriesReader()
        series.SetFileNames(series.GetGDCMSeriesFileNames(str(tmp_path / "dcm")))
        np.testing.assert_allclose(volume.direction, series.Execute().GetDirection(), atol=1e-6)


def test_an_in_plane_rotation_beyond_5_degrees_is_read_with_a_warning(tmp_path):
    for degrees, warned in ((4.0, False), (20.0, True)):
        t = np.radians(degrees)
        folder = tmp_path / f"rot{degrees:g}"

        write_series(folder, [0.0, 2.0, 4.0],
                     orientation=(np.cos(t), np.sin(t), 0, -np.sin(t), np.cos(t), 0))
        volume = io.read_study(folder)
        messages = [w for w in volume.metadata.warnings if "in-plane" in w]
        assert bool(messages) == warned, volume.metadata.warnings
        if warned:
            assert messages[0].startswith(f"{folder}: rotated 20.0 deg in-plane")


def test_a_flipped_label_direction_is_named_in_the_message(tmp_path):
    image = sitk.GetImageFromArray(np.zeros((4, 5, 6), np.int16))
    image.SetOrigin((-10.0, 20.0, 30.0))
    sitk.WriteImage(image, str(tmp_path / "img.nii.gz"))
    flipped = sitk.Image(image)
    flipped.SetDirection((-1, 0, 0, 0, 1, 0, 0, 0, 1))  # same origin and voxels: other anatomy
    sitk.WriteImage(flipped, str(tmp_path / "lab.nii.gz"))
    volume = io.read_study(tmp_path / "img.nii.gz")
    with pytest.raises(LabelError) as caught:
        io.read_labels(tmp_path / "lab.nii.gz", like=volume)
    message = str(caught.value)
    assert "\n" not in message and "once both are reoriented to LPS" in message
    assert "stored with direction (-1, 0, 0, 0, 1, 0, 0, 0, 1), the image with (1, 0, 0" in message
