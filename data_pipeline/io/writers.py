"""The writing API: `write_labels` (a mask back in the input's own stored grid), `write_volume`
(an array in the canonical grid) and `write_dicom_series` (a volume as a CT Image Storage
series). Every file is written atomically (`data_pipeline.atomic`).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid
from pydicom.valuerep import DSfloat

from data_pipeline.atomic import atomic_path, output_mode, resolve_output
from data_pipeline.io.dicom import CT_IMAGE_STORAGE
from data_pipeline.io.image_files import _suffix
from data_pipeline.io.volume import CTVolume, StudyMetadata

WRITE_SUFFIXES = (".nii.gz", ".nii", ".mhd", ".mha", ".nrrd")

# Written DICOM: stored = round(HU) + 1024 as int16 with RescaleIntercept -1024, so HU
# -33792..31743 fit (any real CT value); outside that range values are clipped.
WRITE_RESCALE_INTERCEPT = -1024.0


def write_labels(path: str | os.PathLike, labels_zyx: np.ndarray, like: CTVolume) -> None:
    """Writes a label map or mask given in `like`'s canonical orientation back in the input
    study's own stored geometry (atomically), so it overlays the input voxel for voxel (also in
    viewers that ignore the direction matrix) and `read_labels(path, like=like)` returns the same
    array. Integer and boolean arrays only; types as `write_volume`."""
    array = np.asarray(labels_zyx)
    if array.shape != like.shape:
        raise ValueError(f"{path}: labels shape {array.shape} differs from the image's "
                         f"{like.shape}")
    if not (array.dtype == np.bool_ or np.issubdtype(array.dtype, np.integer)):
        raise ValueError(f"{path}: labels must be integers or booleans, got {array.dtype}")
    stored = like.stored_geometry
    _write_grid(path, stored.to_stored(array), stored.spacing_zyx_mm, stored.origin_xyz_mm,
                stored.direction)


def write_volume(path: str | os.PathLike, array: np.ndarray, like: CTVolume) -> None:
    """Writes `array` (z, y, x) with `like`'s spacing, origin and direction, atomically.

    The array is written in `like`'s canonical orientation (world geometry exact, so readers
    that honour the direction overlay it on the input); `write_labels` writes in the input's own
    stored orientation instead. Format from the suffix: .nii.gz, .nii, .mhd (+ compressed .zraw
    side file), .mha, .nrrd. Booleans are written as uint8; uint8/int8/int16/uint16 keep their
    type; wider integers become int16 when their values fit (else int32); floats become float32.
    """
    array = np.asarray(array)
    if array.shape != like.shape:
        raise ValueError(f"{path}: array shape {array.shape} differs from the image's {like.shape}")
    _write_grid(path, array, like.spacing_zyx_mm, like.origin_xyz_mm, like.direction)


def _write_grid(path: str | os.PathLike, array: np.ndarray, spacing_zyx_mm, origin_xyz_mm,
                direction) -> None:
    path = Path(path)
    suffix = _suffix(path)
    if suffix not in WRITE_SUFFIXES:
        raise ValueError(f"{path}: cannot write this format; use one of {', '.join(WRITE_SUFFIXES)}")
    image = sitk.GetImageFromArray(_writable_dtype(np.asarray(array)), isVector=False)
    image.SetSpacing(tuple(reversed(spacing_zyx_mm)))
    image.SetOrigin(tuple(origin_xyz_mm))
    image.SetDirection(tuple(direction))
    if suffix == ".mhd":
        _write_metaimage_pair(path, image)
        return
    with atomic_path(path) as tmp:
        # .nii.gz is gzip by its name; .mha/.nrrd compress with zlib/gzip when asked.
        sitk.WriteImage(image, str(tmp), useCompression=suffix != ".nii")


def write_dicom_series(volume: CTVolume, out_dir: str | os.PathLike, *, series_number: int = 1,
                       uid_seed: str | None = None) -> list[Path]:
    """Writes `volume` as a CT Image Storage series, one file per slice (IM000001.dcm, ...).

    Explicit VR little endian; pixels int16 with RescaleSlope 1 and RescaleIntercept -1024
    (HU rounded to integers, clipped to -33792..31743). Geometry from the volume:
    ImagePositionPatient = origin + k * z spacing * slice normal, ImageOrientationPatient from the
    first two direction columns, PixelSpacing = (y, x). Metadata: patient id, kVp, slice thickness
    (or z spacing), manufacturer, series description, and the gating markers of the
    `data_pipeline.io.dicom` docstring (CardiacSynchronizationTechnique and a ProtocolName
    keyword) so `read_study` gives back `ecg_gated` and `protocol`. UIDs are derived from `uid_seed` when given (deterministic),
    random otherwise; StudyInstanceUID is kept from the metadata when it has one.
    A left-handed direction (slice axis opposite to row x column) is written with the slices in
    reverse order, which describes the same world geometry in DICOM's right-handed convention.
    Each file is written atomically. One series per folder: IM??????.dcm files of an earlier,
    longer series in `out_dir` are removed. Returns the file paths in slice order.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = volume.metadata
    hu = volume.hu
    dz, dy, dx = volume.spacing_zyx_mm
    rotation = np.asarray(volume.direction, dtype=np.float64).reshape(3, 3)
    row_dir, col_dir, slice_dir = rotation[:, 0], rotation[:, 1], rotation[:, 2]
    origin = np.asarray(volume.origin_xyz_mm, dtype=np.float64)
    normal = np.cross(row_dir, col_dir)
    if float(np.dot(normal, slice_dir)) < 0:
        hu = hu[::-1]
        origin = origin + (hu.shape[0] - 1) * dz * slice_dir
        slice_dir = -slice_dir
    n_slices, rows, columns = hu.shape
    if not np.isfinite(hu).all():
        raise ValueError(f"{out_dir}: volume.hu has non-finite values; DICOM stores integers")

    def uid(*parts: object) -> UID:
        if uid_seed is None:
            return generate_uid()
        return generate_uid(entropy_srcs=[str(uid_seed), *map(str, parts)])

    study_uid = meta.study_uid or uid("study")
    series_uid = uid("series", study_uid, series_number)
    frame_uid = uid("frame-of-reference", study_uid)
    patient_id = meta.patient_id or "ANONYMOUS"
    protocol_name, sync = _gating_markers(meta)
    description = meta.series_description or protocol_name
    thickness = meta.slice_thickness_mm if meta.slice_thickness_mm else dz

    stored = np.clip(np.rint(hu.astype(np.float64) - WRITE_RESCALE_INTERCEPT),
                     np.iinfo(np.int16).min, np.iinfo(np.int16).max).astype("<i2")
    paths = []
    for k in range(n_slices):
        position = origin + k * dz * slice_dir
        sop_uid = uid("sop", series_uid, k)
        file_meta = FileMetaDataset()
        file_meta.MediaStorageSOPClassUID = UID(CT_IMAGE_STORAGE)
        file_meta.MediaStorageSOPInstanceUID = sop_uid
        file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        file_meta.ImplementationClassUID = pydicom.uid.PYDICOM_IMPLEMENTATION_UID
        ds = FileDataset("", {}, file_meta=file_meta, preamble=b"\0" * 128)
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SOPClassUID = UID(CT_IMAGE_STORAGE)
        ds.SOPInstanceUID = sop_uid
        ds.StudyDate = ""
        ds.StudyTime = ""
        ds.AccessionNumber = ""
        ds.Modality = "CT"
        ds.Manufacturer = meta.manufacturer or ""
        ds.ReferringPhysicianName = ""
        ds.StudyDescription = protocol_name
        ds.SeriesDescription = description
        ds.PatientName = patient_id
        ds.PatientID = patient_id
        ds.PatientBirthDate = ""
        ds.PatientSex = ""
        ds.SliceThickness = _ds(thickness)
        ds.KVP = _ds(meta.kvp) if meta.kvp is not None else ""  # Type 2: empty when unknown
        if meta.convolution_kernel:
            ds.ConvolutionKernel = meta.convolution_kernel
        ds.ProtocolName = protocol_name
        if sync is not None:
            ds.CardiacSynchronizationTechnique = sync
        ds.SpacingBetweenSlices = _ds(dz)
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.StudyID = ""
        ds.SeriesNumber = int(series_number)
        # General Series Type 2C for CT: the patient position (head first, supine: the canonical
        # volume's z runs feet to head); the body part, which is not paired, so no laterality.
        ds.PatientPosition = "HFS"
        ds.BodyPartExamined = "CHEST"
        ds.AcquisitionNumber = 1
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [_ds(v) for v in position]
        ds.ImageOrientationPatient = [_ds(v) for v in (*row_dir, *col_dir)]
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        ds.SliceLocation = _ds(float(np.dot(normal, position)))
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = rows
        ds.Columns = columns
        ds.PixelSpacing = [_ds(dy), _ds(dx)]
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.RescaleIntercept = _ds(WRITE_RESCALE_INTERCEPT)
        ds.RescaleSlope = _ds(1.0)
        ds.RescaleType = "HU"
        ds.PixelData = stored[k].tobytes()
        target = out_dir / f"IM{k + 1:06d}.dcm"
        with atomic_path(target) as tmp:
            ds.save_as(tmp, enforce_file_format=True)
        paths.append(target)
    _remove_stale_slices(out_dir, paths)
    return paths


def _gating_markers(meta: StudyMetadata) -> tuple[str, str | None]:
    """(ProtocolName, CardiacSynchronizationTechnique or None) for `meta`'s gating, as rules 1
    and 2 of the `data_pipeline.io.dicom` docstring read them back."""
    gated = meta.ecg_gated
    if gated is None and meta.protocol in ("cac", "ctac"):
        gated = meta.protocol == "cac"
    if gated is True:
        return "CAC ECG-gated calcium score", "PROSPECTIVE"
    if gated is False:
        return "CTAC ungated attenuation correction", "NONE"
    return "CT", None


def _remove_stale_slices(out_dir: Path, paths: list[Path]) -> None:
    """One series per folder: removes IM??????.dcm slices not in `paths`, left over from a
    longer series written here before, which would otherwise be read back as part of (or
    instead of) this one."""
    written = {p.name for p in paths}
    for stale in out_dir.glob("IM*.dcm"):
        if re.fullmatch(r"IM\d{6}\.dcm", stale.name) and stale.name not in written:
            stale.unlink()


def _writable_dtype(array: np.ndarray) -> np.ndarray:
    """The array in the type write_volume stores (see its docstring)."""
    if array.dtype == np.bool_:
        return array.astype(np.uint8)
    if array.dtype in (np.uint8, np.int8, np.int16, np.uint16):
        return array
    if np.issubdtype(array.dtype, np.integer):
        info = np.iinfo(np.int16)
        if array.size == 0 or (array.min() >= info.min and array.max() <= info.max):
            return array.astype(np.int16)
        return array.astype(np.int32)
    return array.astype(np.float32)


def _write_metaimage_pair(path: Path, image: sitk.Image) -> None:
    """Writes name.mhd + name.zraw atomically: both go to a temporary folder beside the target
    (so the header's ElementDataFile already names the final .zraw), then the data file is
    moved into place and the header last, so a reader never sees a header without its data.
    Symbolic links and permissions follow `data_pipeline.atomic`'s rules."""
    path = resolve_output(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        sitk.WriteImage(image, str(tmp_dir / path.name), useCompression=True)
        header = tmp_dir / path.name
        for written in sorted(tmp_dir.iterdir()):
            os.chmod(written, output_mode(path if written == header else
                                          path.parent / written.name))
        for side in sorted(tmp_dir.iterdir()):
            if side != header:
                os.replace(side, path.parent / side.name)
        os.replace(header, path)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def _ds(value: float) -> DSfloat:
    """A DICOM decimal string (at most 16 characters) as close to `value` as fits."""
    return DSfloat(float(value), auto_format=True)
