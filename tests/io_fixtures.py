"""Builds small DICOM series for the I/O tests, independently of `data_pipeline.io`'s writer.

`slice_dataset` makes one CT Image Storage slice from explicit geometry; `write_series` writes a
stack of them with chosen positions, orientation, file names and header overrides, so each bad
input the reader must catch (gaps, oblique stacks, MR, localizers...) can be made in a few lines.
`write_image_file` writes a `(z, y, x)` array as an image file SimpleITK reads (NIfTI, MetaImage).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def slice_dataset(stored: np.ndarray, position: Sequence[float], *,
                  orientation: Sequence[float] = AXIAL, pixel_spacing=(0.7, 0.5),
                  series_uid: str, study_uid: str, instance: int, slope: float = 1.0,
                  intercept: float = -1024.0, sop_class: str = CT_IMAGE_STORAGE,
                  modality: str = "CT", image_type=("ORIGINAL", "PRIMARY", "AXIAL"),
                  description: str = "test series") -> FileDataset:
    """One grey-scale slice with uint16 stored values and the given geometry."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset("", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    ds.ImageType = list(image_type)
    ds.PatientID = "TESTPAT"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.SeriesDescription = description
    ds.SeriesNumber = 1
    ds.InstanceNumber = instance
    ds.ImagePositionPatient = [f"{v:.6f}" for v in position]
    ds.ImageOrientationPatient = [f"{v:.6f}" for v in orientation]
    ds.PixelSpacing = [f"{v:g}" for v in pixel_spacing]
    ds.SliceThickness = "2.5"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = stored.shape
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.RescaleSlope = f"{slope:g}"
    ds.RescaleIntercept = f"{intercept:g}"
    ds.PixelData = np.ascontiguousarray(stored, dtype="<u2").tobytes()
    return ds


def write_series(folder: Path, positions_z: Sequence[float], *, shape=(12, 10), seed: int = 0,
                 orientation: Sequence[float] = AXIAL, names: Sequence[str] | None = None,
                 instances: Sequence[int] | None = None,
                 edit: Callable[[int, FileDataset], None] | None = None,
                 **slice_kwargs) -> tuple[np.ndarray, list[Path]]:
    """Writes one series, slice k at `positions_z[k]` along the slice normal of `orientation`.

    Returns (stored values (k, y, x) in the order of `positions_z`, file paths). `names` and
    `instances` default to IM0001.dcm... and 1.. in `positions_z` order; `edit(k, ds)` may change
    a slice's header before it is saved.
    """
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    stored = rng.integers(0, 2500, size=(len(positions_z), *shape)).astype(np.uint16)
    row, col = np.array(orientation[:3]), np.array(orientation[3:])
    normal = np.cross(row, col)
    series_uid, study_uid = generate_uid(), generate_uid()
    paths = []
    for k, z in enumerate(positions_z):
        position = np.array([-30.0, -40.0, 0.0]) + z * normal
        ds = slice_dataset(stored[k], position, orientation=orientation, series_uid=series_uid,
                           study_uid=study_uid,
                           instance=instances[k] if instances is not None else k + 1,
                           **slice_kwargs)
        if edit is not None:
            edit(k, ds)
        path = folder / (names[k] if names is not None else f"IM{k + 1:04d}.dcm")
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return stored, paths


def write_image_file(path: Path, array: np.ndarray, spacing_zyx: Sequence[float],
                     origin_xyz: Sequence[float]) -> None:
    """`array` (z, y, x) as an axial image file at `path` with the given geometry."""
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(array)
    image.SetSpacing(tuple(float(s) for s in spacing_zyx[::-1]))
    image.SetOrigin(tuple(float(o) for o in origin_xyz))
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))


def hu_of(stored: np.ndarray, slope: float = 1.0, intercept: float = -1024.0) -> np.ndarray:
    """Stored values to HU as the reader should compute them."""
    return stored.astype(np.float32) * np.float32(slope) + np.float32(intercept)


def pydicom_test_folder(sub: str = "") -> Path:
    """A folder of pydicom's bundled `dicomdirtests` data."""
    return Path(pydicom.data.get_testdata_file("dicomdirtests/DICOMDIR")).parent / sub


def shuffle_frames(path: Path, seed: int = 0) -> list[int]:
    """Reorders the frames of the native multi-frame file at `path` (pixels and per-frame
    functional groups together), so that frame order is not slice order; returns the order (the
    old frame index of each new frame)."""
    ds = pydicom.dcmread(path)
    pixels = ds.pixel_array
    order = [int(i) for i in np.random.default_rng(seed).permutation(len(pixels))]
    items = list(ds.PerFrameFunctionalGroupsSequence)
    ds.PerFrameFunctionalGroupsSequence = [items[i] for i in order]
    ds.PixelData = np.ascontiguousarray(pixels[order]).tobytes()
    ds.save_as(path)
    return order
