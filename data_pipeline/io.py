"""CT study I/O: DICOM folders (pydicom) and image files (SimpleITK) to one `CTVolume`.

Conventions (docs/contracts.md, "Orientation and slice order"; docs/io.md):
- One canonical orientation for every study, whatever its file or patient position: DICOM LPS,
  i.e. array axis x (last) runs from the patient's right to left, y from anterior to posterior,
  and z (first) from feet to head, as `SimpleITK.DICOMOrient(image, "LPS")` gives. A feet-first
  scan, a series stored head-to-feet or with mirrored rows, and a NIfTI in RAS storage all come
  out as the same array for the same anatomy, so "below, centre, above" and left/right mean the
  same for the models and the scorer. Voxels are only permuted and flipped (never resampled);
  small rotations (gantry tilt, in-plane rotation up to AXIAL_TOLERANCE_DEG) stay in `direction`.
- `CTVolume.stored` keeps the input's own grid (what SimpleITK reports for the file or DICOM
  series); `write_labels` writes masks back in it, so they overlay the input exactly, and
  `read_labels` accepts label files in it (as SimpleITK exports them) or in the canonical one.
- `hu` is float32 `(z, y, x)`; `spacing_zyx_mm` is (z, y, x) with z the distance between slice
  centres along the slice normal (not the nominal slice thickness); `origin_xyz_mm` and
  `direction` are in SimpleITK conventions (world LPS) for the canonical array.
- SimpleITK orders spacing (x, y, z); it is converted once, here, and nowhere else.
- DICOM slices are sorted by position along the slice normal `cross(row, col) . ImagePositionPatient`,
  increasing, as ITK/GDCM's series reader orders them, before the canonical reorientation; file
  names and InstanceNumber are ignored.
- Of several series in a folder, the one whose slice thickness is closest to 3 mm is read
  (calcium scoring is defined on 3 mm reconstructions), then the one with the most slices;
  `read_study(path, series=...)` picks one by SeriesNumber or SeriesInstanceUID.

Bad input raises `StudyReadError` (image) or `LabelError` (labels) whose message names the file
or folder and the problem; the CLI prints it as one line.

ECG gating (`StudyMetadata.ecg_gated`, `protocol`) is read from the header of the chosen series,
first rule that answers wins:
1. CardiacSynchronizationTechnique (0018,9037): NONE -> ungated; PROSPECTIVE, RETROSPECTIVE,
   PACED, REALTIME -> gated.
2. Keywords in SeriesDescription, ProtocolName, StudyDescription: "ungated", "non-gated",
   "CTAC", "attenuation" (correction) -> ungated; "gated", "ECG", "CaSc", "calcium score",
   "SmartScore", "CAC" -> gated.
3. Cardiac trigger elements present with a value: TriggerTime (0018,1060),
   NominalPercentageOfCardiacPhase (0020,9241), CardiacRRIntervalSpecified (0018,9070),
   NominalCardiacTriggerDelayTime (0020,9153) -> gated.
Otherwise `None`. `protocol` is "cac" when gated, "ctac" when explicitly ungated (rule 1 or 2),
else `None`. `write_dicom_series` writes rule 1 and rule 2 markers, so gating round-trips.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import gzip
import math
import os
import re
import shutil
import tempfile
import warnings
import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pydicom
import pydicom.pixels
import SimpleITK as sitk
from pydicom.dataelem import RawDataElement
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid
from pydicom.valuerep import DSfloat

from data_pipeline.atomic import atomic_path, output_mode, resolve_output
from data_pipeline.errors import InputError, LabelError, StudyReadError

# Suffixes SimpleITK reads for us (.mha is single-file MetaImage).
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".mhd", ".mha", ".nrrd", ".nhdr")
WRITE_SUFFIXES = (".nii.gz", ".nii", ".mhd", ".mha", ".nrrd")

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
_ENHANCED_CT = {"1.2.840.10008.5.1.4.1.1.2.1": "Enhanced CT Image Storage (multi-frame)",
                "1.2.840.10008.5.1.4.1.1.2.2": "Legacy Converted Enhanced CT (multi-frame)"}
_MEDIA_DIRECTORY = "1.2.840.10008.1.3.10"
# Transfer syntaxes too new for pydicom's UID dictionary, so error messages can still name them.
_EXTRA_SYNTAX_NAMES = {"1.2.840.10008.1.2.4.110": "JPEG XL Lossless",
                       "1.2.840.10008.1.2.4.111": "JPEG XL JPEG Recompression",
                       "1.2.840.10008.1.2.4.112": "JPEG XL"}

# A series counts as axial when its slice normal is within this angle of the scanner z axis.
# Beyond it (coronal/sagittal reformats, strongly tilted stacks) Agatston's per-axial-slice
# rules (Agatston 1990) no longer mean what they should, so such a series is refused.
AXIAL_TOLERANCE_DEG = 5.0
# Slice steps: a step more than GAP_FACTOR x the median step means missing slices; otherwise a
# step differing from the median by more than max(1 %, 0.01 mm) is non-uniform spacing; a step
# under DUPLICATE_MM is a duplicate position.
GAP_FACTOR = 1.5
SPACING_REL_TOL = 0.01
SPACING_ABS_TOL_MM = 0.01
DUPLICATE_MM = 1e-3
# Label geometry checks against the image: spacing within 1e-3 relative; origin within
# max(0.01 mm, 0.1 x the smallest voxel spacing) per world axis (well under a voxel, well above
# the float32 rounding of NIfTI headers); direction cosines within 1e-3.
LABEL_SPACING_REL_TOL = 1e-3
LABEL_ORIGIN_ABS_MM = 0.01
LABEL_ORIGIN_VOXEL_FRACTION = 0.1
LABEL_DIRECTION_TOL = 1e-3

# Series choice: calcium scoring is defined on 3 mm axial reconstructions (Agatston 1990; 2.5-3 mm
# in the SCCT guideline, Hecht et al. 2017), so the series whose thickness is closest wins.
SCORING_THICKNESS_MM = 3.0
# Rescale plausibility for CT (DICOM PS3.3 C.8.2.1): real CT slopes are about 1 (0.5-2 seen) and
# intercepts -1024, -1000 or 0; anything outside these bounds is a broken header, and values
# outside HU_RANGE after rescaling are no CT (ITK's extended scale ends near 31743 HU).
MAX_RESCALE_SLOPE = 1000.0
MAX_RESCALE_INTERCEPT = 1e5
HU_RANGE = (-1e5, 1e5)

# Written DICOM: stored = round(HU) + 1024 as int16 with RescaleIntercept -1024, so HU
# -33792..31743 fit (any real CT value); outside that range values are clipped.
WRITE_RESCALE_INTERCEPT = -1024.0

_UNGATED_RE = re.compile(r"\b(un-?gated|non[- ]?gated|not[- ]gated|no[- ]ecg|ctac|attenuation|"
                         r"att[- ]?corr\w*|ac[- ]ct|ct[- ]ac)\b", re.IGNORECASE)
_GATED_RE = re.compile(r"(\bgated\b|\becg\b|\bekg\b|casc|calcium[- ]?scor\w*|smart[- ]?score|"
                       r"\bcac\b|\bca[- ]?score\b|cardiac[- ]?score|heart[- ]?scor\w*)", re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class StudyMetadata:
    """What the header says about a study; `None` where it does not say (image files say little)."""

    source: str                      # the path that was read
    modality: str | None = None
    patient_id: str | None = None
    study_uid: str | None = None
    series_uid: str | None = None
    series_description: str | None = None
    slice_thickness_mm: float | None = None
    kvp: float | None = None
    manufacturer: str | None = None
    convolution_kernel: str | None = None   # DICOM ConvolutionKernel (reconstruction kernel)
    ecg_gated: bool | None = None    # from the header where it says (module docstring)
    protocol: str | None = None      # "cac" | "ctac" where known (gated -> cac, ungated -> ctac)
    skipped_series: tuple[str, ...] = ()   # "UID (description): reason" for series not chosen
    chosen_series: str | None = None       # "UID (description): why it was chosen" (DICOM)
    warnings: tuple[str, ...] = ()         # header values tolerated but not understood


@dataclasses.dataclass(frozen=True)
class StoredGeometry:
    """The input's own voxel grid, and how the canonical array maps onto it.

    `read_study` returns every study in the canonical orientation (module docstring); this keeps
    the grid as stored (SimpleITK's view of the file or DICOM series) so masks can be written
    back in it (`write_labels`). `axes[k]` is the stored numpy axis that becomes canonical axis
    k, and `flips[k]` says whether canonical axis k then runs backwards. `slice_step_mm` is the
    distance between consecutive slice positions when it differs from the spacing along the
    slice normal (gantry tilt: SimpleITK reports that distance as the z spacing).
    """

    shape_zyx: tuple[int, int, int]
    spacing_zyx_mm: tuple[float, float, float]
    origin_xyz_mm: tuple[float, float, float]
    direction: tuple[float, ...]
    axes: tuple[int, int, int] = (0, 1, 2)
    flips: tuple[bool, bool, bool] = (False, False, False)
    slice_step_mm: float | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        """(z, y, x) voxel counts of the stored array."""
        return self.shape_zyx

    @property
    def is_canonical(self) -> bool:
        """True when the stored array already is in the canonical orientation."""
        return self.axes == (0, 1, 2) and not any(self.flips)

    def to_canonical(self, array: np.ndarray) -> np.ndarray:
        """A stored-order `(z, y, x)` array in the canonical orientation."""
        out = np.transpose(array, self.axes)
        flipped = tuple(k for k, f in enumerate(self.flips) if f)
        return np.ascontiguousarray(np.flip(out, flipped) if flipped else out)

    def to_stored(self, array: np.ndarray) -> np.ndarray:
        """A canonical `(z, y, x)` array in the input's own stored order."""
        flipped = tuple(k for k, f in enumerate(self.flips) if f)
        out = np.flip(array, flipped) if flipped else array
        return np.ascontiguousarray(np.transpose(out, np.argsort(self.axes)))


@dataclasses.dataclass(frozen=True, eq=False)
class CTVolume:
    """A CT volume in Hounsfield units with its world geometry (SimpleITK conventions).

    Construction normalises types: `hu` becomes float32, geometry becomes tuples of floats.
    """

    hu: np.ndarray                               # float32 (z, y, x), Hounsfield units
    spacing_zyx_mm: tuple[float, float, float]   # z = distance between slice centres
    origin_xyz_mm: tuple[float, float, float]    # world (LPS) position of voxel (0,0,0), as SimpleITK
    direction: tuple[float, ...]                 # 9 numbers, SimpleITK GetDirection() order
    metadata: StudyMetadata
    stored: StoredGeometry | None = None         # the input's own grid (None: same as this one)

    def __post_init__(self):
        hu = np.asarray(self.hu)
        if hu.ndim != 3:
            raise ValueError(f"CTVolume.hu must be 3-D (z, y, x), got shape {hu.shape}")
        if hu.dtype != np.float32:
            hu = hu.astype(np.float32)
        spacing = tuple(float(s) for s in self.spacing_zyx_mm)
        origin = tuple(float(o) for o in self.origin_xyz_mm)
        direction = tuple(float(d) for d in self.direction)
        if len(spacing) != 3 or len(origin) != 3 or len(direction) != 9:
            raise ValueError("CTVolume needs 3 spacings, 3 origin coordinates and 9 direction "
                             f"cosines, got {len(spacing)}, {len(origin)}, {len(direction)}")
        if not all(s > 0 and math.isfinite(s) for s in spacing):
            raise ValueError(f"CTVolume spacing must be positive, got {spacing}")
        object.__setattr__(self, "hu", hu)
        object.__setattr__(self, "spacing_zyx_mm", spacing)
        object.__setattr__(self, "origin_xyz_mm", origin)
        object.__setattr__(self, "direction", direction)

    @property
    def shape(self) -> tuple[int, int, int]:
        """(z, y, x) voxel counts."""
        return self.hu.shape

    @property
    def stored_geometry(self) -> StoredGeometry:
        """The input's own grid (this volume's own when it was built in memory)."""
        if self.stored is not None:
            return self.stored
        return StoredGeometry(self.shape, self.spacing_zyx_mm, self.origin_xyz_mm, self.direction)


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------

def read_study(path: str | os.PathLike, series: int | str | None = None) -> CTVolume:
    """Reads a CT study (a DICOM folder or file, or an image file SimpleITK reads) in the
    canonical orientation (module docstring).

    DICOM folders are searched recursively (files without a DICOM header, and DICOMDIR
    indexes, are ignored). Files are grouped by SeriesInstanceUID; series that are not CT Image
    Storage with modality CT (MR, secondary capture, RT objects, enhanced multi-frame CT),
    localizers/scouts (ImageType LOCALIZER), series without slice geometry, single slices and
    non-axial series (slice normal more than AXIAL_TOLERANCE_DEG from z) are skipped. `series`
    picks one by SeriesNumber (an int or a string of digits) or SeriesInstanceUID; otherwise the
    series whose slice thickness is closest to 3 mm (calcium scoring is defined on 3 mm axial
    reconstructions; Agatston 1990, Hecht et al. SCCT 2017) is chosen, then the one with the
    most slices. `metadata.chosen_series` says which and why, `metadata.skipped_series` lists the
    others with the reason. Slices are sorted by position along the slice normal, rescaled per
    slice with RescaleSlope/Intercept (checked: see `_rescale`), and checked for duplicate
    positions, gaps and non-uniform steps. Compressed pixel data is decoded by the installed
    pydicom plugins (pylibjpeg: JPEG, JPEG-LS, JPEG 2000, HTJ2K, RLE). Raises `StudyReadError`
    naming the file or folder and the problem.
    """
    path = _existing_path(path, StudyReadError, "image")
    if path.is_dir():
        grid, metadata, step = _read_dicom(path, _list_files(path, StudyReadError),
                                           error=StudyReadError, require_ct=True, series=series)
    elif _is_image_file(path):
        _no_series(path, series)
        grid, metadata, step = (*_read_image_file(path, error=StudyReadError), None)
    elif _has_dicom_magic(path, StudyReadError):
        grid, metadata, step = _read_dicom(path, [path], error=StudyReadError, require_ct=True,
                                           series=series)
    else:
        raise StudyReadError(path, "not a DICOM file or folder, nor an image file of a supported "
                                   f"type ({', '.join(IMAGE_SUFFIXES)})")
    stored, canonical = _orient(grid, slice_step_mm=step)
    _check_axial(path, canonical.direction, StudyReadError)
    return CTVolume(hu=canonical.values, spacing_zyx_mm=canonical.spacing_zyx_mm,
                    origin_xyz_mm=canonical.origin_xyz_mm, direction=canonical.direction,
                    metadata=metadata, stored=stored)


def read_labels(path: str | os.PathLike, like: CTVolume | None = None) -> np.ndarray:
    """Reads a label map or mask as int16 `(z, y, x)` in the canonical orientation of `like`.

    Same formats as `read_study` (a DICOM folder of per-slice label images of any modality
    works too). A label file in the image's own stored geometry (as SimpleITK exports it from
    the image's DICOM folder, or as `write_labels` writes it) is reordered exactly as the image
    was; one stored in another orientation of the same world grid is reoriented by its own
    geometry. Raises `LabelError` when the values are not non-negative integers, or when shape,
    spacing, origin (tolerances at the top of this module) or direction differ from `like`'s,
    naming which one and both values. Without `like` the labels are oriented by their own
    geometry.
    """
    path = _existing_path(path, LabelError, "labels")
    if path.is_dir() or (not _is_image_file(path) and _has_dicom_magic(path, LabelError)):
        files = _list_files(path, LabelError) if path.is_dir() else [path]
        grid, _, _ = _read_dicom(path, files, error=LabelError, require_ct=False)
    elif _is_image_file(path):
        grid = _read_image_grid(path, error=LabelError)[0]
    else:
        raise LabelError(path, "not a DICOM folder nor an image file of a supported type "
                               f"({', '.join(IMAGE_SUFFIXES)})")
    labels = _to_int16_labels(path, grid.values)
    grid = dataclasses.replace(grid, values=labels)
    if like is None:
        return _orient(grid)[1].values
    stored = like.stored_geometry
    problem = _geometry_problem(grid, stored, like.metadata.source, stored.slice_step_mm)
    if problem is None:
        return stored.to_canonical(labels)
    # Another orientation of the same world grid (e.g. written by write_volume in the canonical
    # orientation): compare once both are canonical.
    canonical = _orient(grid)[1]
    like_grid = _Grid(like.hu, like.spacing_zyx_mm, like.origin_xyz_mm, like.direction)
    if _geometry_problem(canonical, like_grid, like.metadata.source,
                         stored.slice_step_mm) is None:
        return canonical.values
    if not np.allclose(grid.direction, stored.direction, atol=LABEL_DIRECTION_TOL) and \
            np.allclose(canonical.direction, like.direction, atol=LABEL_DIRECTION_TOL):
        problem = _geometry_problem(canonical, like_grid, like.metadata.source,
                                    stored.slice_step_mm)
    raise LabelError(path, problem)


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
    (or z spacing), manufacturer, series description, and the gating markers of the module
    docstring (CardiacSynchronizationTechnique and a ProtocolName keyword) so `read_study` gives
    back `ecg_gated` and `protocol`. UIDs are derived from `uid_seed` when given (deterministic),
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
    gated = meta.ecg_gated
    if gated is None and meta.protocol in ("cac", "ctac"):
        gated = meta.protocol == "cac"
    if gated is True:
        protocol_name, sync = "CAC ECG-gated calcium score", "PROSPECTIVE"
    elif gated is False:
        protocol_name, sync = "CTAC ungated attenuation correction", "NONE"
    else:
        protocol_name, sync = "CT", None
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
        if meta.kvp is not None:
            ds.KVP = _ds(meta.kvp)
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
    # One series per folder: slices left over from a longer series written here before would
    # otherwise be read back as part of (or instead of) this one.
    written = {p.name for p in paths}
    for stale in out_dir.glob("IM*.dcm"):
        if re.fullmatch(r"IM\d{6}\.dcm", stale.name) and stale.name not in written:
            stale.unlink()
    return paths


# ---------------------------------------------------------------------------------------------
# DICOM reading
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class _Series:
    uid: str
    datasets: list[tuple[Path, pydicom.Dataset]] = dataclasses.field(default_factory=list)

    @property
    def first(self) -> pydicom.Dataset:
        return self.datasets[0][1]

    @property
    def number(self) -> int | None:
        """SeriesNumber, or None when absent or malformed."""
        return _int_or_none(self.first.get("SeriesNumber"))

    @property
    def label(self) -> str:
        desc = str(self.first.get("SeriesDescription", "") or "").strip()
        modality = str(self.first.get("Modality", "") or "?")
        number = f"SeriesNumber {self.number}, " if self.number is not None else ""
        return (f"{self.uid} ({number}{modality}{', ' + desc if desc else ''}, "
                f"{len(self.datasets)} files)")


def _list_files(folder: Path, error: type[InputError]) -> list[Path]:
    """All regular files under `folder`, recursively, in a stable order; hidden files skipped.

    An unreadable subfolder is an error: skipping it could silently drop slices.
    """
    files = []

    def unreadable(exc: OSError) -> None:
        raise error(exc.filename or folder, f"cannot read folder: {exc.strerror or exc}")

    for root, dirs, names in os.walk(folder, onerror=unreadable):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        files.extend(Path(root) / n for n in sorted(names) if not n.startswith("."))
    return files


# File names that can only be DICOM slices; such a file too short to hold a header is a slice
# cut off (an interrupted copy), not an unrelated file to ignore: dropping it would shift the
# volume, and the loss would surface later as a misleading label-shape mismatch.
_DICOM_NAME_RE = re.compile(r"(\.(dcm|dicom|dic|ima)$)|(^(im|img|i|ct)?[_-]?\d+$)|"
                            r"(^\d+(\.\d+)+$)", re.IGNORECASE)


def _has_dicom_magic(path: Path, error: type[InputError]) -> bool:
    """True when the file has the 128-byte preamble followed by b'DICM' (Part 10 file).

    A file that cannot be opened is an error, not "not DICOM": skipping it would silently drop a
    slice (a broken link, a permission problem) and shift the volume. So is a file named like a
    DICOM slice that is too short to hold even the preamble (0 bytes, a cut copy).
    """
    try:
        with open(path, "rb") as f:
            f.seek(128)
            magic = f.read(4) == b"DICM"
            size = os.fstat(f.fileno()).st_size
    except OSError as exc:
        raise error(path, f"cannot read file: {exc.strerror or exc}") from None
    if not magic and size < 132 and _DICOM_NAME_RE.search(path.name):
        raise error(path, f"{'empty' if size == 0 else 'truncated'} file ({size} bytes) where a "
                          "DICOM slice was expected; re-copy the series")
    return magic


def _read_header(path: Path, error: type[InputError]) -> pydicom.Dataset | None:
    """Parses a file's header (pixel data deferred); None when it is not a DICOM file.

    Part 10 files (128-byte preamble + b"DICM") are read; so are old preamble-less files that
    start with a group 0008 element, as some archives hold them. A Part 10 file that fails to
    parse is corrupt or truncated: that is an error, not something to skip, since silently
    dropping a slice would shift the volume.
    """
    magic = _has_dicom_magic(path, error)
    raw = not magic and _starts_with_group_0008(path)
    if not magic and not raw:
        return None
    try:
        # defer_size: the pixel data is read only for the chosen series, on first access.
        with warnings.catch_warnings():
            # Malformed values (a DS "3,0") are kept as text and judged where they are used.
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path, defer_size="4 KB", force=raw)
    except Exception as exc:  # pydicom raises many types on corrupt input; the file is named
        if magic:
            raise error(path, f"unreadable or truncated DICOM file ({type(exc).__name__}: "
                              f"{exc})") from None
        return None
    if raw:
        if "SOPClassUID" not in ds:
            return None
        # No file meta: record the encoding pydicom detected so the pixel decoders accept it.
        implicit, little = ds.original_encoding
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = (
            pydicom.uid.ImplicitVRLittleEndian if implicit else
            ExplicitVRLittleEndian if little else pydicom.uid.ExplicitVRBigEndian)
    _check_not_truncated(path, ds, error)
    return ds


def _starts_with_group_0008(path: Path) -> bool:
    # Only called after _has_dicom_magic opened the same file, so it is readable.
    with open(path, "rb") as f:
        return f.read(2) == b"\x08\x00"


def _check_not_truncated(path: Path, ds: pydicom.Dataset, error: type[InputError]) -> None:
    """Fails when the file ends before the last element it declares (pydicom stops silently).

    Elements are still raw right after `dcmread`, with their file offset and declared length.
    Undefined lengths (sequences, encapsulated pixel data) and deflated files, whose offsets
    are in the inflated stream, are left to the decoder. A file cut exactly between two
    elements cannot be told from a short one here; `_series_problem` catches slices that lack
    image elements.
    """
    syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if syntax is not None and str(syntax) == "1.2.840.10008.1.2.1.99":
        return
    size = path.stat().st_size
    for elem in ds.elements():
        if isinstance(elem, RawDataElement) and elem.value_tell is not None \
                and elem.length != 0xFFFFFFFF and elem.value_tell + elem.length > size:
            raise error(path, f"truncated DICOM file: element {elem.tag} needs bytes up to "
                              f"{elem.value_tell + elem.length} but the file has {size}")


def _read_dicom(source: Path, files: Sequence[Path], *, error: type[InputError],
                require_ct: bool, series: int | str | None = None,
                ) -> tuple[_Grid, StudyMetadata, float | None]:
    """Reads the best axial image series among `files` (a folder's content or one file), as
    stored: (grid, metadata, distance between slice positions when it differs from the spacing
    along the normal)."""
    if not files:
        raise error(source, "folder is empty: no DICOM files")
    by_uid: dict[str, _Series] = {}
    for path in files:
        ds = _read_header(path, error)
        if ds is None:
            continue
        sop_class = str(ds.get("SOPClassUID", "") or ds.file_meta.get("MediaStorageSOPClassUID", ""))
        if sop_class == _MEDIA_DIRECTORY or "DirectoryRecordSequence" in ds:
            continue  # DICOMDIR: an index of the files, which we find by walking the folder
        uid = str(ds.get("SeriesInstanceUID", "") or "")
        if not uid:
            # Type 1 in every storage SOP class: without it the file is cut short or broken,
            # and dropping it silently could lose an end slice.
            raise error(path, "incomplete DICOM file: no SeriesInstanceUID (truncated?)")
        by_uid.setdefault(uid, _Series(uid)).datasets.append((path, ds))
    if not by_uid:
        raise error(source, f"no DICOM image files found ({len(files)} files looked at)")
    chosen, why, skipped = _choose_series(source, list(by_uid.values()), error, require_ct,
                                          series)
    return _load_series(source, chosen, why, skipped, error, require_ct)


_SLICE_ELEMENTS = ("Rows", "Columns", "PixelData", "ImagePositionPatient",
                   "ImageOrientationPatient", "PixelSpacing")


def _series_problem(s: _Series, require_ct: bool, error: type[InputError]) -> str | None:
    """Why a series cannot be the study's volume, or None when it can.

    Raises (naming the file) when some slices of an otherwise usable series lack image
    elements or have malformed geometry: that is a damaged file, not a different kind of series.
    """
    ds = s.first
    sop_class = str(ds.get("SOPClassUID", "") or "")
    modality = str(ds.get("Modality", "") or "")
    if sop_class.startswith("1.2.840.10008.5.1.4.1.1.7"):
        return f"secondary capture (modality {modality or 'not given'}), not a CT acquisition"
    if sop_class in _ENHANCED_CT:
        return f"{_ENHANCED_CT[sop_class]} is not supported; export as classic CT Image Storage"
    if require_ct and modality != "CT":
        return f"modality {modality or 'not given'}, not CT"
    if require_ct and sop_class and sop_class != CT_IMAGE_STORAGE:
        return f"SOP class {sop_class} ({UID(sop_class).name}), not CT Image Storage"
    image_types = {str(v).upper() for v in _as_list(ds.get("ImageType"))}
    if image_types & {"LOCALIZER", "SCOUT", "TOPOGRAM"}:
        return "localizer/scout image"
    missing = {path: [k for k in _SLICE_ELEMENTS if k not in d] for path, d in s.datasets}
    complete = [path for path, m in missing.items() if not m]
    if not complete:
        return f"no slice image ({', '.join(missing[s.datasets[0][0]])} missing)"
    if len(complete) < len(s.datasets):
        path = next(p for p, m in missing.items() if m)
        raise error(path, f"incomplete DICOM slice ({', '.join(missing[path])} missing) in "
                          f"series {s.uid}: truncated file?")
    frames = _int_or_none(ds.get("NumberOfFrames", 1))
    if frames is None:
        raise error(s.datasets[0][0], f"malformed NumberOfFrames {ds.get('NumberOfFrames')!r}")
    if frames > 1:
        return "multi-frame image, not supported"
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        return "colour image, not a grey-scale slice"
    if len(s.datasets) < 2:
        return "single slice: a volume needs at least 2 slices"
    orientations = np.array([_geometry(path, d, "ImageOrientationPatient", 6, error)
                             for path, d in s.datasets])
    if np.abs(orientations - orientations[0]).max() > 1e-3:
        return "slices have different orientations"
    normal = _unit_normal(orientations[0])
    angle = math.degrees(math.acos(min(1.0, abs(float(normal[2])))))
    if angle > AXIAL_TOLERANCE_DEG:
        return (f"not axial: slice normal {np.round(normal, 3).tolist()} is {angle:.1f} deg from "
                f"the z axis (oblique, coronal or sagittal series are not supported)")
    return None


def _geometry(path: Path, ds: pydicom.Dataset, keyword: str, n: int,
              error: type[InputError]) -> np.ndarray:
    """A numeric multi-valued element, or an error naming the file when it is malformed."""
    try:
        values = _floats(ds[keyword].value, n)
    except (ValueError, TypeError, KeyError) as exc:
        raise error(path, f"malformed {keyword}: {exc}") from None
    if not np.all(np.isfinite(values)):
        raise error(path, f"malformed {keyword}: {values.tolist()}")
    if keyword == "ImageOrientationPatient" and np.linalg.norm(np.cross(values[:3], values[3:])) < 0.5:
        raise error(path, f"malformed {keyword}: row and column directions {values.tolist()} "
                          "are not orthogonal unit vectors")
    if keyword == "PixelSpacing" and np.any(values <= 0):
        raise error(path, f"malformed {keyword}: {values.tolist()} mm; spacings must be > 0")
    return values


def _series_thickness(s: _Series, error: type[InputError]) -> tuple[float, str]:
    """(slice thickness in mm, where it came from): SliceThickness when it is a positive
    number, else the median distance between slice positions."""
    value = _float_or_none(s.first.get("SliceThickness"))
    if value is not None and value > 0:
        return value, "SliceThickness"
    orientation = _geometry(s.datasets[0][0], s.first, "ImageOrientationPatient", 6, error)
    along = np.sort([float(_geometry(p, d, "ImagePositionPatient", 3, error) @
                           _unit_normal(orientation)) for p, d in s.datasets])
    return float(np.median(np.diff(along))), "slice spacing (no valid SliceThickness)"


def _matches(s: _Series, wanted: str) -> bool:
    if wanted.isdigit():
        return s.number == int(wanted)
    return s.uid == wanted


def _choose_series(source: Path, series: list[_Series], error: type[InputError],
                   require_ct: bool, wanted: int | str | None = None,
                   ) -> tuple[_Series, str, tuple[str, ...]]:
    """(chosen series, why, the others with the reason each was skipped).

    `wanted` (SeriesNumber or SeriesInstanceUID) picks one; otherwise the usable series whose
    thickness is closest to SCORING_THICKNESS_MM, then the most slices, then the lowest
    SeriesNumber, then the UID, so the choice is deterministic.
    """
    problems = {s.uid: _series_problem(s, require_ct, error) for s in series}
    if wanted is not None and str(wanted).strip():
        wanted = str(wanted).strip()
        picked = [s for s in series if _matches(s, wanted)]
        available = "; ".join(s.label for s in series)
        if not picked:
            raise error(source, f"no series {wanted!r} (by SeriesNumber or SeriesInstanceUID); "
                                f"found: {available}")
        if len(picked) > 1:
            raise error(source, f"series {wanted!r} matches {len(picked)} series ("
                                f"{'; '.join(s.label for s in picked)}); give the "
                                "SeriesInstanceUID")
        chosen = picked[0]
        if problems[chosen.uid] is not None:
            raise error(source, f"series {wanted!r} cannot be read as an axial CT volume: "
                                f"{chosen.label}: {problems[chosen.uid]}")
        skipped = tuple(f"{s.label}: not the requested series {wanted!r}" for s in series
                        if s is not chosen)
        return chosen, f"requested series {wanted!r}", skipped

    usable = [s for s in series if problems[s.uid] is None]
    if not usable:
        found = "; ".join(f"{s.label}: {problems[s.uid]}" for s in series)
        if source.is_file():
            found += " (one file was given: pass the series folder to read all its slices)"
        if len(series) == 1:
            raise error(source, f"no usable axial CT series: {found}")
        raise error(source, f"no usable axial CT series among {len(series)} series: {found}")
    patients = sorted({str(s.first.get("PatientID", "") or "") for s in usable})
    if len(patients) > 1:
        raise error(source, f"holds images of {len(patients)} patients (PatientID "
                            f"{', '.join(repr(p) for p in patients)}): give one patient's folder")

    thickness = {s.uid: _series_thickness(s, error) for s in usable}

    def rank(s: _Series):
        number = s.number if s.number is not None else 1 << 30
        return (round(abs(thickness[s.uid][0] - SCORING_THICKNESS_MM), 3), -len(s.datasets),
                number, s.uid)

    usable.sort(key=rank)
    chosen = usable[0]
    t_chosen, t_from = thickness[chosen.uid]
    why = f"{t_from} {t_chosen:g} mm, closest to the {SCORING_THICKNESS_MM:g} mm of calcium scoring"
    if len(usable) > 1:
        why += f" among {len(usable)} axial CT series"
    skipped = [f"{s.label}: {problems[s.uid]}" for s in series if problems[s.uid] is not None]
    for s in usable[1:]:
        t = thickness[s.uid][0]
        if rank(s)[0] > rank(chosen)[0]:
            reason = (f"slice thickness {t:g} mm is farther from {SCORING_THICKNESS_MM:g} mm than "
                      f"the chosen series' {t_chosen:g} mm")
        elif len(s.datasets) < len(chosen.datasets):
            reason = (f"fewer slices ({len(s.datasets)}) than the chosen series "
                      f"({len(chosen.datasets)}) at the same thickness")
        else:
            reason = ("same thickness and slice count as the chosen series, which has a lower "
                      "SeriesNumber/UID")
        skipped.append(f"{s.label}: {reason}")
    return chosen, why, tuple(skipped)


def _load_series(source: Path, s: _Series, why: str, skipped: tuple[str, ...],
                 error: type[InputError], require_ct: bool,
                 ) -> tuple[_Grid, StudyMetadata, float | None]:
    """Sorts, checks spacing, decodes and rescales one series, as stored."""
    datasets = s.datasets
    patients = {str(d.get("PatientID", "") or "") for _, d in datasets}
    if len(patients) > 1:
        raise error(source, f"series {s.uid} mixes {len(patients)} patients (PatientID "
                            f"{', '.join(repr(p) for p in sorted(patients))})")
    orientation = _geometry(datasets[0][0], datasets[0][1], "ImageOrientationPatient", 6, error)
    row_dir, col_dir = orientation[:3], orientation[3:]
    normal = _unit_normal(orientation)
    positions = np.array([_geometry(p, d, "ImagePositionPatient", 3, error) for p, d in datasets])
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    datasets = [datasets[i] for i in order]
    along = along[order]
    positions = positions[order]
    dz = _check_steps(source, along, datasets, error)
    # Gantry tilt: the table moves along z while the slices are tilted, so consecutive positions
    # are further apart than the slices are along their normal. The normal distance is the grid
    # spacing (it is what the voxel volume needs); SimpleITK reports the position distance.
    step = float(np.linalg.norm(positions[-1] - positions[0]) / (len(positions) - 1))
    slice_step = step if abs(step - dz) > 1e-6 * dz else None

    first = datasets[0][1]
    rows, columns = int(first.Rows), int(first.Columns)
    pixel_spacing = _geometry(datasets[0][0], first, "PixelSpacing", 2, error)
    for path, ds in datasets:
        if int(ds.Rows) != rows or int(ds.Columns) != columns:
            raise error(path, f"slice size {int(ds.Rows)}x{int(ds.Columns)} differs from the "
                              f"series' {rows}x{columns}")
        if np.abs(_geometry(path, ds, "PixelSpacing", 2, error) - pixel_spacing).max() > 1e-4:
            raise error(path, f"pixel spacing {list(ds.PixelSpacing)} differs from the series' "
                              f"{pixel_spacing.tolist()}")

    raw = np.empty((len(datasets), rows, columns), dtype=np.float32)
    rescale = [_rescale(path, ds, error, require_ct) for path, ds in datasets]
    for key, name in ((0, "RescaleSlope"), (1, "RescaleIntercept")):
        values = np.array([r[key] for r in rescale])
        if require_ct and np.any(values != values[0]):
            k = int(np.flatnonzero(values != values[0])[0])
            raise error(datasets[k][0], f"{name} {values[k]:g} differs from {values[0]:g} in "
                                        f"{datasets[0][0].name} of the same series; a CT series "
                                        "has one rescale (corrupt or mixed series?)")
    for k, (path, ds) in enumerate(datasets):
        raw[k] = _pixels(path, ds, error)
    slope, intercept = rescale[0][0], rescale[0][1]
    if require_ct and rescale[0][2]:
        _check_already_hu(datasets[0][0], raw, error)
    raw *= np.float32(slope)  # in place: no second full-size array
    raw += np.float32(intercept)
    hu = raw
    if require_ct:
        low, high = float(hu.min()), float(hu.max())
        if not (math.isfinite(low) and math.isfinite(high)) or low < HU_RANGE[0] or \
                high > HU_RANGE[1]:
            raise error(datasets[0][0], f"RescaleSlope {slope:g} and RescaleIntercept "
                                        f"{intercept:g} give values {low:g}..{high:g}, outside "
                                        f"any CT range ({HU_RANGE[0]:g}..{HU_RANGE[1]:g} HU)")

    # SimpleITK direction: columns are row direction, column direction, slice normal.
    direction = np.stack([row_dir, col_dir, normal], axis=1)
    gated, protocol = _gating(first)
    notes = []
    thickness = _header_float(first, "SliceThickness", notes)
    kvp = _header_float(first, "KVP", notes)
    if s.number is None and first.get("SeriesNumber") not in (None, ""):
        notes.append(f"malformed SeriesNumber {first.get('SeriesNumber')!r} ignored")
    metadata = StudyMetadata(
        source=str(source),
        modality=_text(first.get("Modality")),
        patient_id=_text(first.get("PatientID")),
        study_uid=_text(first.get("StudyInstanceUID")),
        series_uid=_text(first.get("SeriesInstanceUID")),
        series_description=_text(first.get("SeriesDescription")),
        slice_thickness_mm=thickness,
        kvp=kvp,
        manufacturer=_text(first.get("Manufacturer")),
        ecg_gated=gated,
        protocol=protocol,
        skipped_series=skipped,
        chosen_series=f"{s.label}: {why}",
        warnings=tuple(f"{datasets[0][0]}: {note}" for note in notes),
    )
    grid = _Grid(values=hu, spacing_zyx_mm=(dz, float(pixel_spacing[0]), float(pixel_spacing[1])),
                 origin_xyz_mm=tuple(positions[0].tolist()),
                 direction=tuple(direction.ravel().tolist()))
    return grid, metadata, slice_step


def _rescale(path: Path, ds: pydicom.Dataset, error: type[InputError],
             require_ct: bool) -> tuple[float, float, bool]:
    """(RescaleSlope, RescaleIntercept, intercept missing) of a slice, checked for CT.

    Both are Type 1 in the CT Image module (DICOM PS3.3 C.8.2.1). A missing intercept would read
    stored values (often offset by 1024) as HU and shift every threshold, so it is refused unless
    the header says the data already is in HU (RescaleType "HU") and the values confirm it
    (`_check_already_hu`). Slope 0, a negative slope or one outside MAX_RESCALE_SLOPE is refused:
    no CT stores HU that way, and such a header would silently scale every value.
    """
    def number(keyword: str, default: float | None) -> float | None:
        value = ds.get(keyword)
        if value is None or str(value).strip() == "":
            return default
        parsed = _float_or_none(value)
        if parsed is None or not math.isfinite(parsed):
            raise error(path, f"malformed {keyword} {str(value)!r}: not a finite number")
        return parsed

    slope = number("RescaleSlope", 1.0)
    intercept = number("RescaleIntercept", None)
    missing = intercept is None
    if not require_ct:
        return slope, 0.0 if missing else intercept, False
    if not (1.0 / MAX_RESCALE_SLOPE <= slope <= MAX_RESCALE_SLOPE):
        raise error(path, f"RescaleSlope {slope:g} is not a plausible CT rescale (expected "
                          f"{1 / MAX_RESCALE_SLOPE:g}..{MAX_RESCALE_SLOPE:g}, usually 1): the "
                          "values would not be Hounsfield units")
    if abs(intercept or 0.0) > MAX_RESCALE_INTERCEPT:
        raise error(path, f"RescaleIntercept {intercept:g} is not a plausible CT rescale "
                          f"(|intercept| <= {MAX_RESCALE_INTERCEPT:g}, usually -1024 or 0)")
    if missing:
        rescale_type = str(ds.get("RescaleType", "") or "").strip().upper()
        if rescale_type != "HU":
            raise error(path, "RescaleIntercept missing (Type 1 for CT): the stored values "
                              "cannot be converted to Hounsfield units")
        intercept = 0.0
    return slope, intercept, missing


def _check_already_hu(path: Path, stored: np.ndarray, error: type[InputError]) -> None:
    """With no RescaleIntercept but RescaleType HU, the stored values must look like HU: air
    inside the field of view reads about -1000 HU, so a CT in HU has values below -500."""
    if float(stored.min()) >= -500.0:
        raise error(path, "RescaleIntercept missing (Type 1 for CT) and the values "
                          f"({float(stored.min()):g}..{float(stored.max()):g}) have no air at "
                          "about -1000 HU, so they are not Hounsfield units as RescaleType says")


def _check_steps(source: Path, along: np.ndarray, datasets, error: type[InputError]) -> float:
    """Distance between slice centres; fails on duplicates, gaps and non-uniform steps."""
    steps = np.diff(along)
    dup = np.flatnonzero(steps < DUPLICATE_MM)
    if dup.size:
        k = int(dup[0])
        raise error(source, f"duplicate slice position {along[k]:.3f} mm along the slice normal "
                            f"({datasets[k][0].name} and {datasets[k + 1][0].name}"
                            f"{f'; {dup.size} duplicates in all' if dup.size > 1 else ''})")
    median = float(np.median(steps))
    gaps = np.flatnonzero(steps > GAP_FACTOR * median)
    if gaps.size:
        desc = ", ".join(f"between {along[k]:.3f} and {along[k + 1]:.3f} mm "
                         f"(~{round(steps[k] / median) - 1} missing)" for k in gaps[:5])
        raise error(source, f"missing slices: gap{'s' if gaps.size > 1 else ''} {desc} with a "
                            f"normal step of {median:.3f} mm")
    tol = max(SPACING_REL_TOL * median, SPACING_ABS_TOL_MM)
    uneven = np.flatnonzero(np.abs(steps - median) > tol)
    if uneven.size:
        desc = ", ".join(f"{steps[k]:.3f} mm between {along[k]:.3f} and {along[k + 1]:.3f}"
                         for k in uneven[:5])
        raise error(source, f"non-uniform slice spacing: median step {median:.3f} mm but {desc} "
                            f"(tolerance {tol:.3f} mm)")
    # The mean step over the whole stack is what a uniform grid spanning the slices needs.
    return float((along[-1] - along[0]) / (len(along) - 1))


def _pixels(path: Path, ds: pydicom.Dataset, error: type[InputError]) -> np.ndarray:
    """Decodes one slice's stored values (before rescale), naming the file on failure."""
    syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    compressed = syntax is not None and _is_compressed(syntax)
    if compressed:
        try:
            decoder = pydicom.pixels.get_decoder(syntax)
            available = decoder.is_available
        except NotImplementedError:
            available = False
        if not available:
            raise error(path, f"cannot decode pixel data compressed with transfer syntax "
                              f"{syntax} ({_syntax_name(syntax)}): no installed decoder supports "
                              f"it; convert the series to an uncompressed or JPEG/JPEG 2000/RLE "
                              f"transfer syntax")
    else:
        _check_pixel_data_length(path, ds, error)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pixels = ds.pixel_array
    except Exception as exc:  # decoders raise many types; the message is what matters
        problem = f"{type(exc).__name__}: {exc}"
        if compressed:
            problem = f"transfer syntax {syntax} ({_syntax_name(syntax)}): {problem}"
        raise error(path, f"cannot read pixel data ({problem}); is the file truncated or "
                          "corrupt?") from None
    if pixels.shape != (int(ds.Rows), int(ds.Columns)):
        raise error(path, f"pixel data has shape {pixels.shape}, but Rows x Columns say "
                          f"{int(ds.Rows)}x{int(ds.Columns)}")
    return pixels


def _check_pixel_data_length(path: Path, ds: pydicom.Dataset, error: type[InputError]) -> None:
    """Native (uncompressed) pixel data must hold exactly Rows x Columns x BitsAllocated / 8
    bytes (plus one pad byte to an even length): pydicom pads a short slice with zeros and
    drops an excess with a warning, so a Rows/Columns that disagrees with the data would
    otherwise give a wrong image."""
    try:
        rows, columns = int(ds.Rows), int(ds.Columns)
        bits = int(ds.BitsAllocated)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
    except (AttributeError, TypeError, ValueError) as exc:
        raise error(path, f"malformed image header ({exc})") from None
    element = ds["PixelData"]
    length = element.length if isinstance(element, RawDataElement) else len(element.value or b"")
    if length == 0xFFFFFFFF or bits % 8:
        return  # encapsulated data under a native syntax, or packed bits: left to the decoder
    expected = rows * columns * samples * bits // 8
    if length not in (expected, expected + 1):
        raise error(path, f"pixel data has {length} bytes but Rows {rows} x Columns {columns} x "
                          f"{bits} bits need {expected}: Rows/Columns disagree with the pixel "
                          "data (or the file is truncated)")


def _is_compressed(syntax: UID) -> bool:
    try:
        return syntax.is_compressed
    except ValueError:  # a UID pydicom does not know: not one of the uncompressed syntaxes
        return True


def _syntax_name(syntax: UID) -> str:
    name = syntax.name
    if name == str(syntax):
        name = _EXTRA_SYNTAX_NAMES.get(str(syntax), "unknown transfer syntax")
    return name


def _gating(ds: pydicom.Dataset) -> tuple[bool | None, str | None]:
    """(ecg_gated, protocol) from the header, by the rules in the module docstring."""
    sync = _text(ds.get("CardiacSynchronizationTechnique"))
    if sync:
        sync = sync.upper()
        if sync == "NONE":
            return False, "ctac"
        if sync in ("PROSPECTIVE", "RETROSPECTIVE", "PACED", "REALTIME"):
            return True, "cac"
    text = " ".join(_text(ds.get(k)) or "" for k in
                    ("SeriesDescription", "ProtocolName", "StudyDescription"))
    if _UNGATED_RE.search(text):
        return False, "ctac"
    if _GATED_RE.search(text):
        return True, "cac"
    for keyword in ("TriggerTime", "NominalPercentageOfCardiacPhase",
                    "CardiacRRIntervalSpecified", "NominalCardiacTriggerDelayTime"):
        if ds.get(keyword) not in (None, ""):
            return True, "cac"
    return None, None


# ---------------------------------------------------------------------------------------------
# Image files (SimpleITK)
# ---------------------------------------------------------------------------------------------

def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def _is_image_file(path: Path) -> bool:
    return _suffix(path) in IMAGE_SUFFIXES


@dataclasses.dataclass(frozen=True)
class _Grid:
    """Voxel values in their stored type plus geometry (labels must not pass through float32)."""

    values: np.ndarray
    spacing_zyx_mm: tuple[float, float, float]
    origin_xyz_mm: tuple[float, float, float]
    direction: tuple[float, ...]

    @property
    def shape(self) -> tuple[int, ...]:
        return self.values.shape


def _read_image_file(path: Path, *, error: type[InputError]) -> tuple[_Grid, StudyMetadata]:
    """Reads a .nii/.nii.gz/.mhd/.mha/.nrrd study as HU float32 with what metadata there is."""
    grid, image = _read_image_grid(path, error=error)
    modality = None
    if image.HasMetaDataKey("Modality") and "CT" in image.GetMetaData("Modality").upper():
        modality = "CT"  # MetaImage's MET_MOD_CT
    description = None
    if image.HasMetaDataKey("descrip"):  # NIfTI's free-text description
        description = image.GetMetaData("descrip").strip() or None
    metadata = StudyMetadata(source=str(path), modality=modality, series_description=description)
    return dataclasses.replace(grid, values=grid.values.astype(np.float32, copy=False)), metadata


def _read_image_grid(path: Path, *, error: type[InputError]) -> tuple[_Grid, sitk.Image]:
    """SimpleITK read; spacing (x, y, z) -> (z, y, x) here and nowhere else."""
    try:
        with _checked_source(path, error) as readable:
            image = sitk.ReadImage(str(readable))
    except RuntimeError as exc:
        lines = [ln.strip() for ln in str(exc).replace(str(readable), str(path)).splitlines()
                 if ln.strip()]
        detail = next((ln for ln in lines if "ERROR" in ln), lines[-1] if lines else "")
        detail = re.sub(r"^.*ITK ERROR: \w+\(0x[0-9a-f]+\): ", "", detail)
        # ITK's first line says where it failed; the last one (a NRRD "expected N bytes but
        # received M", an errno "Reason:") often says why.
        last = re.sub(r"^\[\w+\] ", "", lines[-1]) if lines else ""
        if last and last not in detail and "ITK ERROR" not in last:
            detail += f" ({last})"
        raise error(path, f"unreadable image file ({detail})") from None
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise error(path, f"has {image.GetNumberOfComponentsPerPixel()} components per voxel; "
                          "expected a grey-scale volume")
    if image.GetDimension() != 3:
        size = "x".join(map(str, image.GetSize()))
        raise error(path, f"is {image.GetDimension()}-D (size {size}); a 3-D volume is needed")
    if image.GetSize()[2] < 2:
        raise error(path, "single slice: a volume needs at least 2 slices")
    spacing = tuple(float(v) for v in reversed(image.GetSpacing()))
    if not all(math.isfinite(v) and v > 0 for v in spacing):
        raise error(path, f"voxel spacing (z, y, x) {spacing} mm: spacings must be > 0")
    grid = _Grid(values=sitk.GetArrayFromImage(image),  # (z, y, x)
                 spacing_zyx_mm=spacing,
                 origin_xyz_mm=tuple(float(v) for v in image.GetOrigin()),
                 direction=tuple(float(v) for v in image.GetDirection()))
    return grid, image


# MetaImage element sizes in bytes (MetaIO's metaTypes.h).
_MET_SIZES = {"MET_UCHAR": 1, "MET_CHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4,
              "MET_UINT": 4, "MET_LONG": 4, "MET_ULONG": 4, "MET_LONG_LONG": 8,
              "MET_ULONG_LONG": 8, "MET_FLOAT": 4, "MET_DOUBLE": 8}


@contextlib.contextmanager
def _checked_source(path: Path, error: type[InputError]):
    """Yields the file SimpleITK should read for `path`, after refusing files whose voxel data
    is shorter than their header declares.

    SimpleITK fills the missing voxels of a truncated NIfTI (.nii and .nii.gz) with zeros or
    garbage without an error, and reports a missing or short MetaImage data file in several
    lines of ITK text (MetaIO also prints to stderr); these are caught here first, naming the
    file. (.nrrd fails inside ITK, which `_read_image_grid` reports.) A .nii.gz has to be
    inflated to know its length: it is inflated once, into a temporary .nii that SimpleITK then
    reads, rather than inflated twice.
    """
    suffix = _suffix(path)
    if suffix == ".nii.gz":
        with tempfile.TemporaryDirectory(prefix="cac_jax_nii_") as folder:
            plain = Path(folder) / (path.name[:-3] or "image.nii")
            try:
                with gzip.open(path, "rb") as source, open(plain, "wb") as target:
                    shutil.copyfileobj(source, target, 1 << 22)
            except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
                raise error(path, f"unreadable image file (truncated or corrupt gzip data: "
                                  f"{type(exc).__name__}: {exc})") from None
            except OSError as exc:
                where = "file" if exc.filename in (None, str(path)) else "temporary copy"
                raise error(path, f"cannot read or inflate the {where}: "
                                  f"{exc.strerror or exc}") from None
            _check_nifti_payload(path, plain, error)
            yield plain
        return
    if suffix == ".nii":
        _check_nifti_payload(path, path, error)
    elif suffix in (".mhd", ".mha"):
        _check_metaimage_payload(path, error)
    yield path


def _check_nifti_payload(path: Path, plain: Path, error: type[InputError]) -> None:
    """`plain` (the uncompressed NIfTI of `path`) holds all the bytes its header declares."""
    try:
        with open(plain, "rb") as f:
            header = f.read(540)
    except OSError as exc:
        raise error(path, f"cannot read file: {exc.strerror or exc}") from None
    needed = _nifti_size(header)
    if needed is None:
        return  # not a NIfTI header SimpleITK would take: its own error names the problem
    have = plain.stat().st_size
    if have < needed:
        raise error(path, f"truncated NIfTI file: the header declares {needed} bytes of "
                          f"header and voxels but the {'inflated ' if plain != path else ''}"
                          f"file holds {have}")


def _nifti_size(header: bytes) -> int | None:
    """vox_offset + voxel bytes declared by a NIfTI-1 or NIfTI-2 header, or None."""
    for endian in ("<", ">"):
        if len(header) >= 348 and np.frombuffer(header[:4], f"{endian}i4")[0] == 348:
            dim = np.frombuffer(header[40:56], f"{endian}i2").astype(np.int64)
            bitpix = int(np.frombuffer(header[72:74], f"{endian}i2")[0])
            offset = int(np.frombuffer(header[108:112], f"{endian}f4")[0])
            break
        if len(header) >= 540 and np.frombuffer(header[:4], f"{endian}i4")[0] == 540:
            dim = np.frombuffer(header[16:80], f"{endian}i8")
            bitpix = int(np.frombuffer(header[14:16], f"{endian}i2")[0])
            offset = int(np.frombuffer(header[168:176], f"{endian}i8")[0])
            break
    else:
        return None
    ndim = int(dim[0])
    if not 1 <= ndim <= 7 or bitpix <= 0 or np.any(dim[1:ndim + 1] < 0):
        return None
    voxels = int(np.prod(dim[1:ndim + 1], dtype=np.int64))
    return max(offset, 348) + voxels * bitpix // 8


def _check_metaimage_payload(path: Path, error: type[InputError]) -> None:
    """A MetaImage's data (its ElementDataFile, or the bytes after a LOCAL header) must be as
    long as the header declares; MetaIO would print to stderr and ITK report a wrong reason."""
    try:
        head = path.read_bytes()[:64 * 1024] if path.suffix.lower() == ".mhd" else \
            _read_prefix(path, 64 * 1024)
    except OSError as exc:
        raise error(path, f"cannot read file: {exc.strerror or exc}") from None
    fields, header_end = {}, None
    position = 0
    for raw_line in head.splitlines(keepends=True):
        position += len(raw_line)
        key, sep, value = raw_line.decode("latin-1").partition("=")
        if sep:
            fields[key.strip()] = value.strip()
        if key.strip() == "ElementDataFile":
            header_end = position
            break
    data_name = fields.get("ElementDataFile", "")
    if not data_name or data_name.upper().startswith("LIST") or "%" in data_name:
        return  # no header or data split over several files: ITK's own checks apply
    if data_name.upper() == "LOCAL":
        data, size = path, path.stat().st_size - (header_end or 0)
        where = "its voxel data"
    else:
        data = path.parent / data_name
        if not data.is_file():
            raise error(path, f"its data file {data_name} (ElementDataFile) is missing from "
                              f"{path.parent}")
        size = data.stat().st_size
        where = f"its data file {data_name}"
    compressed = fields.get("CompressedData", "False").lower() == "true"
    try:
        if compressed:
            expected = int(fields["CompressedDataSize"]) if "CompressedDataSize" in fields else 0
        else:
            dims = [int(v) for v in fields.get("DimSize", "").split()]
            channels = int(fields.get("ElementNumberOfChannels", "1"))
            element = _MET_SIZES.get(fields.get("ElementType", ""), 0)
            expected = int(np.prod(dims, dtype=np.int64)) * channels * element
            if data is not path:
                expected += max(int(fields.get("HeaderSize", "0")), 0)
    except (ValueError, KeyError):
        return  # a malformed header: ITK's message names the field
    if size < expected:
        raise error(path, f"{where} is short: {size} bytes where the header declares "
                          f"{expected} (truncated copy?)")


def _read_prefix(path: Path, n: int) -> bytes:
    with open(path, "rb") as f:
        return f.read(n)


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


# ---------------------------------------------------------------------------------------------
# Labels
# ---------------------------------------------------------------------------------------------

def _to_int16_labels(path: Path, values: np.ndarray) -> np.ndarray:
    """Checks label values are non-negative integers that fit int16, and converts."""
    values = np.asarray(values)
    if values.dtype == np.bool_:
        return values.astype(np.int16)
    if np.issubdtype(values.dtype, np.floating):
        finite = np.isfinite(values)
        if not finite.all():
            where = tuple(int(i) for i in np.argwhere(~finite)[0])
            raise LabelError(path, f"non-finite label value at voxel (z, y, x) {where}")
        fractional = values != np.round(values)
        if fractional.any():
            where = tuple(int(i) for i in np.argwhere(fractional)[0])
            raise LabelError(path, f"non-integer label values ({int(fractional.sum())} voxels, "
                                   f"e.g. {float(values[where]):g} at voxel (z, y, x) {where}); "
                                   "labels must be whole numbers")
    elif not np.issubdtype(values.dtype, np.integer):
        raise LabelError(path, f"label voxels have type {values.dtype}, expected integers")
    if values.size:
        low, high = values.min(), values.max()
        if low < 0:
            where = tuple(int(i) for i in np.argwhere(values < 0)[0])
            raise LabelError(path, f"negative label values (minimum {low:g}, e.g. at voxel "
                                   f"(z, y, x) {where}); labels must be >= 0")
        if high > np.iinfo(np.int16).max:
            raise LabelError(path, f"label value {high:g} does not fit int16")
    return values.astype(np.int16)


def _geometry_problem(labels: _Grid, like, source: str,
                      slice_step_mm: float | None = None) -> str | None:
    """The first geometry property in which `labels` differs from `like` (a grid with shape,
    spacing_zyx_mm, origin_xyz_mm and direction), as a message; None when they agree.

    `slice_step_mm` (gantry tilt) is accepted as the z spacing too: SimpleITK exports a tilted
    series with the distance between slice positions as its z spacing.
    """
    if tuple(labels.shape) != tuple(like.shape):
        return (f"shape (z, y, x) {tuple(labels.shape)} differs from the image's "
                f"{tuple(like.shape)} ({source})")
    spacing, ref = np.array(labels.spacing_zyx_mm), np.array(like.spacing_zyx_mm)
    off = np.abs(spacing - ref) > LABEL_SPACING_REL_TOL * ref
    if slice_step_mm is not None and off[0] and \
            abs(spacing[0] - slice_step_mm) <= LABEL_SPACING_REL_TOL * slice_step_mm:
        off[0] = False
    if np.any(off):
        return (f"spacing (z, y, x) {_fmt(spacing)} mm differs from the image's "
                f"{_fmt(ref)} mm ({source})")
    origin, ref_origin = np.array(labels.origin_xyz_mm), np.array(like.origin_xyz_mm)
    tol = max(LABEL_ORIGIN_ABS_MM, LABEL_ORIGIN_VOXEL_FRACTION * float(ref.min()))
    if np.any(np.abs(origin - ref_origin) > tol):
        return (f"origin (x, y, z) {_fmt(origin)} mm differs from the image's "
                f"{_fmt(ref_origin)} mm by more than {tol:.3g} mm ({source})")
    direction, ref_direction = np.array(labels.direction), np.array(like.direction)
    if np.any(np.abs(direction - ref_direction) > LABEL_DIRECTION_TOL):
        return (f"direction {_fmt(direction)} differs from the image's "
                f"{_fmt(ref_direction)} ({source})")
    return None


# ---------------------------------------------------------------------------------------------
# Canonical orientation
# ---------------------------------------------------------------------------------------------

def _orient(grid: _Grid, slice_step_mm: float | None = None) -> tuple[StoredGeometry, _Grid]:
    """(the stored grid and its mapping, the grid in the canonical orientation).

    Each world axis (x: right -> left, y: anterior -> posterior, z: feet -> head; DICOM LPS) is
    given the array axis whose direction cosine is largest along it, reversed when that cosine
    is negative, as `SimpleITK.DICOMOrient(image, "LPS")` does. Voxel values are only permuted
    and flipped, never resampled; the world position of every voxel is unchanged.
    """
    rotation = np.asarray(grid.direction, dtype=np.float64).reshape(3, 3)
    magnitude = np.abs(rotation)
    perm = [-1, -1, -1]  # world axis w -> SimpleITK index axis (0 x, 1 y, 2 z)
    used: set[int] = set()
    for flat in np.argsort(-magnitude, axis=None, kind="stable"):
        world, axis = divmod(int(flat), 3)
        if perm[world] < 0 and axis not in used:
            perm[world] = axis
            used.add(axis)
    signs = [1.0 if rotation[w, perm[w]] >= 0 else -1.0 for w in range(3)]
    shape_xyz = grid.shape[::-1]
    spacing_xyz = grid.spacing_zyx_mm[::-1]
    origin = np.asarray(grid.origin_xyz_mm, dtype=np.float64).copy()
    for w in range(3):
        if signs[w] < 0:
            i = perm[w]
            origin += (shape_xyz[i] - 1) * spacing_xyz[i] * rotation[:, i]
    new_direction = np.stack([signs[w] * rotation[:, perm[w]] for w in range(3)], axis=1)
    # numpy axis k is SimpleITK axis 2 - k.
    axes = tuple(2 - perm[2 - k] for k in range(3))
    flips = tuple(signs[2 - k] < 0 for k in range(3))
    stored = StoredGeometry(shape_zyx=tuple(int(n) for n in grid.shape),
                            spacing_zyx_mm=tuple(grid.spacing_zyx_mm),
                            origin_xyz_mm=tuple(grid.origin_xyz_mm),
                            direction=tuple(grid.direction), axes=axes, flips=flips,
                            slice_step_mm=slice_step_mm)
    canonical = _Grid(values=stored.to_canonical(grid.values) if not stored.is_canonical
                      else grid.values,
                      spacing_zyx_mm=tuple(float(spacing_xyz[perm[2 - k]]) for k in range(3)),
                      origin_xyz_mm=tuple(float(v) for v in origin),
                      direction=tuple(float(v) for v in new_direction.ravel()))
    return stored, canonical


def _check_axial(path: Path, direction: Sequence[float], error: type[InputError]) -> None:
    """Refuses a volume whose slices are not axial (canonical slice axis more than
    AXIAL_TOLERANCE_DEG from the scanner z axis): Agatston's rules are per axial slice."""
    slice_axis = np.asarray(direction, dtype=np.float64).reshape(3, 3)[:, 2]
    cosine = abs(float(slice_axis[2])) / max(float(np.linalg.norm(slice_axis)), 1e-12)
    angle = math.degrees(math.acos(min(1.0, cosine)))
    if angle > AXIAL_TOLERANCE_DEG:
        raise error(path, f"not axial: the slice axis {np.round(slice_axis, 3).tolist()} is "
                          f"{angle:.1f} deg from the z axis (oblique volumes are not supported)")


def _existing_path(path: str | os.PathLike, error: type[InputError], what: str) -> Path:
    """`path` after checking it can be read, with a message that says why not."""
    if os.fspath(path).strip() == "":
        # Path("") is the current folder: never walk it by accident.
        raise error(None, f"the {what} path is empty")
    path = Path(path)
    try:
        path.stat()
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise error(path, "symbolic link loop") from None
        if path.is_symlink():
            raise error(path, f"is a symbolic link to a missing file ({os.readlink(path)})") \
                from None
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            raise error(path, "does not exist") from None
        raise error(path, f"cannot access: {exc.strerror or exc}") from None
    if not os.access(path, os.R_OK) or (path.is_dir() and not os.access(path, os.X_OK)):
        raise error(path, "cannot read: permission denied")
    return path


def _no_series(path: Path, series: int | str | None) -> None:
    if series is not None and str(series).strip():
        raise StudyReadError(path, f"series {series!r} was asked for, but an image file holds "
                                   "one volume; series choice applies to DICOM folders")


def _int_or_none(value) -> int | None:
    """An IS/US value as int, None when absent or malformed (e.g. "1a")."""
    if value is None or str(value).strip() == "":
        return None
    try:
        return int(str(value).strip())
    except ValueError:
        try:
            number = float(str(value).strip())
        except ValueError:
            return None
        return int(number) if number.is_integer() else None


def _float_or_none(value) -> float | None:
    """A DS value as float, None when absent or malformed (e.g. "3,0", "120kV")."""
    if value is None or str(value).strip() == "":
        return None
    try:
        return float(str(value).strip())
    except ValueError:
        return None


def _header_float(ds: pydicom.Dataset, keyword: str, notes: list[str]) -> float | None:
    """A descriptive number (kVp, thickness) that neither geometry nor HU depends on: a
    malformed value is noted and ignored rather than refusing the study."""
    value = ds.get(keyword)
    parsed = _float_or_none(value)
    if parsed is None and value is not None and str(value).strip():
        notes.append(f"malformed {keyword} {str(value)!r} ignored")
    if parsed is not None and not (math.isfinite(parsed) and parsed > 0):
        notes.append(f"implausible {keyword} {parsed:g} ignored")
        parsed = None
    return parsed


# ---------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------

def _fmt(values: Iterable[float]) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"


def _as_list(value) -> list:
    if value is None:
        return []
    if isinstance(value, str | bytes):
        return [value]
    with contextlib.suppress(TypeError):
        return list(value)
    return [value]


def _floats(value, n: int) -> np.ndarray:
    out = np.array([float(v) for v in _as_list(value)], dtype=np.float64)
    if out.shape != (n,):
        raise ValueError(f"expected {n} numbers, got {value!r}")
    return out


def _unit_normal(orientation: np.ndarray) -> np.ndarray:
    normal = np.cross(orientation[:3], orientation[3:])
    return normal / np.linalg.norm(normal)


def _text(value) -> str | None:
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def _ds(value: float) -> DSfloat:
    """A DICOM decimal string (at most 16 characters) as close to `value` as fits."""
    return DSfloat(float(value), auto_format=True)
