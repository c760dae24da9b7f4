"""CT study I/O: DICOM folders (pydicom) and image files (SimpleITK) to one `CTVolume`.

Conventions (DESIGN.md "Data flow"):
- `hu` is float32 `(z, y, x)`; `spacing_zyx_mm` is (z, y, x) with z the distance between slice
  centres (not the nominal slice thickness); `origin_xyz_mm` and `direction` are exactly what
  SimpleITK reports (`GetOrigin()`, `GetDirection()`, world LPS), so a volume read here from a DICOM
  folder and the .nii.gz/.mhd SimpleITK writes from that folder agree voxel for voxel.
- SimpleITK orders spacing (x, y, z); it is converted once, here, and nowhere else.
- DICOM slices are sorted by position along the slice normal `cross(row, col) . ImagePositionPatient`,
  increasing, as ITK/GDCM's series reader orders them; file names and InstanceNumber are ignored.

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
import math
import os
import re
import shutil
import tempfile
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

from data_pipeline.atomic import atomic_path
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


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------

def read_study(path: str | os.PathLike) -> CTVolume:
    """Reads a CT study: a DICOM folder (or one DICOM file), or an image file SimpleITK reads.

    DICOM folders are searched recursively (files without a DICOM header, and DICOMDIR
    indexes, are ignored). Files are grouped by SeriesInstanceUID; series that are not CT Image
    Storage with modality CT (MR, secondary capture, RT objects, enhanced multi-frame CT),
    localizers/scouts (ImageType LOCALIZER), series without slice geometry, single slices and
    non-axial series (slice normal more than AXIAL_TOLERANCE_DEG from z) are skipped; of the rest
    the one with the most slices is read and the others are listed, with the reason, in
    `metadata.skipped_series`. Slices are sorted by position along the slice normal, rescaled
    per slice with RescaleSlope/Intercept, and checked for duplicate positions, gaps and
    non-uniform steps. Compressed pixel data is decoded by the installed pydicom plugins
    (pylibjpeg: JPEG, JPEG-LS, JPEG 2000, HTJ2K, RLE). Raises `StudyReadError` naming the file
    or folder and the problem.
    """
    path = Path(path)
    if not path.exists():
        raise StudyReadError(path, "does not exist")
    if path.is_dir():
        return _read_dicom(path, _list_files(path, StudyReadError), error=StudyReadError,
                           require_ct=True)
    if _is_image_file(path):
        return _read_image_file(path, error=StudyReadError)
    if _has_dicom_magic(path, StudyReadError):
        return _read_dicom(path, [path], error=StudyReadError, require_ct=True)
    raise StudyReadError(path, "not a DICOM file or folder, nor an image file of a supported "
                               f"type ({', '.join(IMAGE_SUFFIXES)})")


def read_labels(path: str | os.PathLike, like: CTVolume | None = None) -> np.ndarray:
    """Reads a label map or mask as int16 `(z, y, x)`, checked against the image `like`.

    Same formats as `read_study` (a DICOM folder of per-slice label images of any modality
    works too). Raises `LabelError` when the values are not non-negative integers, or when
    shape, spacing, origin (tolerances at the top of this module) or direction differ from
    `like`'s, naming which one and both values.
    """
    path = Path(path)
    if not path.exists():
        raise LabelError(path, "does not exist")
    if path.is_dir() or (not _is_image_file(path) and _has_dicom_magic(path, LabelError)):
        files = _list_files(path, LabelError) if path.is_dir() else [path]
        volume = _read_dicom(path, files, error=LabelError, require_ct=False)
        grid = _Grid(volume.hu, volume.spacing_zyx_mm, volume.origin_xyz_mm, volume.direction)
    elif _is_image_file(path):
        grid = _read_image_grid(path, error=LabelError)[0]
    else:
        raise LabelError(path, "not a DICOM folder nor an image file of a supported type "
                               f"({', '.join(IMAGE_SUFFIXES)})")
    labels = _to_int16_labels(path, grid.values)
    if like is not None:
        _check_geometry(path, grid, like)
    return labels


def write_volume(path: str | os.PathLike, array: np.ndarray, like: CTVolume) -> None:
    """Writes `array` (z, y, x) with `like`'s spacing, origin and direction, atomically.

    Format from the suffix: .nii.gz, .nii, .mhd (+ compressed .zraw side file), .mha, .nrrd.
    Booleans are written as uint8; uint8/int8/int16/uint16 keep their type; wider integers
    become int16 when their values fit (else int32); floats become float32.
    """
    path = Path(path)
    suffix = _suffix(path)
    if suffix not in WRITE_SUFFIXES:
        raise ValueError(f"{path}: cannot write this format; use one of {', '.join(WRITE_SUFFIXES)}")
    array = np.asarray(array)
    if array.shape != like.shape:
        raise ValueError(f"{path}: array shape {array.shape} differs from the image's {like.shape}")
    image = sitk.GetImageFromArray(_writable_dtype(array), isVector=False)
    image.SetSpacing(tuple(reversed(like.spacing_zyx_mm)))
    image.SetOrigin(like.origin_xyz_mm)
    image.SetDirection(like.direction)
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
    def label(self) -> str:
        desc = str(self.first.get("SeriesDescription", "") or "").strip()
        modality = str(self.first.get("Modality", "") or "?")
        return f"{self.uid} ({modality}{', ' + desc if desc else ''}, {len(self.datasets)} files)"


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


def _has_dicom_magic(path: Path, error: type[InputError]) -> bool:
    """True when the file has the 128-byte preamble followed by b'DICM' (Part 10 file).

    A file that cannot be opened is an error, not "not DICOM": skipping it would silently drop a
    slice (a broken link, a permission problem) and shift the volume.
    """
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError as exc:
        raise error(path, f"cannot read file: {exc.strerror or exc}") from None


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
                require_ct: bool) -> CTVolume:
    """Reads the best axial image series among `files` (a folder's content or one file)."""
    if not files:
        raise error(source, "folder is empty: no DICOM files")
    series: dict[str, _Series] = {}
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
        series.setdefault(uid, _Series(uid)).datasets.append((path, ds))
    if not series:
        raise error(source, f"no DICOM image files found ({len(files)} files looked at)")
    chosen, skipped = _choose_series(source, list(series.values()), error, require_ct)
    return _load_series(source, chosen, skipped, error)


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
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
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
    return values


def _choose_series(source: Path, series: list[_Series], error: type[InputError],
                   require_ct: bool) -> tuple[_Series, tuple[str, ...]]:
    """Picks the axial image series with the most slices; the others with the reason skipped.

    Ties go to the lowest SeriesNumber, then the UID, so the choice is deterministic.
    """
    problems = {s.uid: _series_problem(s, require_ct, error) for s in series}
    usable = [s for s in series if problems[s.uid] is None]
    if not usable:
        found = "; ".join(f"{s.label}: {problems[s.uid]}" for s in series)
        if source.is_file():
            found += " (one file was given: pass the series folder to read all its slices)"
        if len(series) == 1:
            raise error(source, f"no usable axial CT series: {found}")
        raise error(source, f"no usable axial CT series among {len(series)} series: {found}")

    def rank(s: _Series):
        number = s.first.get("SeriesNumber")
        number = int(number) if number not in (None, "") else 1 << 30
        return (-len(s.datasets), number, s.uid)

    usable.sort(key=rank)
    chosen = usable[0]
    skipped = [f"{s.label}: {problems[s.uid]}" for s in series if problems[s.uid] is not None]
    skipped += [f"{s.label}: fewer slices ({len(s.datasets)}) than the chosen series "
                f"({len(chosen.datasets)})" if len(s.datasets) < len(chosen.datasets) else
                f"{s.label}: same slice count as the chosen series, which has a lower "
                f"SeriesNumber/UID" for s in usable[1:]]
    return chosen, tuple(skipped)


def _load_series(source: Path, s: _Series, skipped: tuple[str, ...],
                 error: type[InputError]) -> CTVolume:
    """Sorts, checks spacing, decodes and rescales one series into a CTVolume."""
    datasets = s.datasets
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
    slopes = np.ones(len(datasets), dtype=np.float32)
    intercepts = np.zeros(len(datasets), dtype=np.float32)
    for k, (path, ds) in enumerate(datasets):
        raw[k] = _pixels(path, ds, error)
        try:
            slopes[k] = float(ds.get("RescaleSlope", 1) or 1)
            intercepts[k] = float(ds.get("RescaleIntercept", 0) or 0)
        except (TypeError, ValueError) as exc:
            raise error(path, f"malformed RescaleSlope/RescaleIntercept ({exc})") from None
    raw *= slopes[:, None, None]  # in place: no second full-size array
    raw += intercepts[:, None, None]
    hu = raw

    # SimpleITK direction: columns are row direction, column direction, slice normal.
    direction = np.stack([row_dir, col_dir, normal], axis=1)
    gated, protocol = _gating(first)
    thickness = first.get("SliceThickness")
    kvp = first.get("KVP")
    metadata = StudyMetadata(
        source=str(source),
        modality=_text(first.get("Modality")),
        patient_id=_text(first.get("PatientID")),
        study_uid=_text(first.get("StudyInstanceUID")),
        series_uid=_text(first.get("SeriesInstanceUID")),
        series_description=_text(first.get("SeriesDescription")),
        slice_thickness_mm=float(thickness) if thickness not in (None, "") else None,
        kvp=float(kvp) if kvp not in (None, "") else None,
        manufacturer=_text(first.get("Manufacturer")),
        ecg_gated=gated,
        protocol=protocol,
        skipped_series=skipped,
    )
    return CTVolume(hu=hu, spacing_zyx_mm=(dz, float(pixel_spacing[0]), float(pixel_spacing[1])),
                    origin_xyz_mm=tuple(positions[0].tolist()),
                    direction=tuple(direction.ravel().tolist()), metadata=metadata)


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
    try:
        pixels = ds.pixel_array
    except Exception as exc:  # decoders raise many types; the message is what matters
        problem = f"{type(exc).__name__}: {exc}"
        if compressed:
            problem = f"transfer syntax {syntax} ({_syntax_name(syntax)}): {problem}"
        raise error(path, f"cannot read pixel data ({problem}); is the file truncated?") from None
    if pixels.shape != (int(ds.Rows), int(ds.Columns)):
        raise error(path, f"pixel data has shape {pixels.shape}, expected one "
                          f"{int(ds.Rows)}x{int(ds.Columns)} slice")
    return pixels


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


def _read_image_file(path: Path, *, error: type[InputError]) -> CTVolume:
    """Reads a .nii/.nii.gz/.mhd/.mha/.nrrd study as HU float32 with what metadata there is."""
    grid, image = _read_image_grid(path, error=error)
    modality = None
    if image.HasMetaDataKey("Modality") and "CT" in image.GetMetaData("Modality").upper():
        modality = "CT"  # MetaImage's MET_MOD_CT
    description = None
    if image.HasMetaDataKey("descrip"):  # NIfTI's free-text description
        description = image.GetMetaData("descrip").strip() or None
    metadata = StudyMetadata(source=str(path), modality=modality, series_description=description)
    return CTVolume(hu=grid.values, spacing_zyx_mm=grid.spacing_zyx_mm,
                    origin_xyz_mm=grid.origin_xyz_mm, direction=grid.direction, metadata=metadata)


def _read_image_grid(path: Path, *, error: type[InputError]) -> tuple[_Grid, sitk.Image]:
    """SimpleITK read; spacing (x, y, z) -> (z, y, x) here and nowhere else."""
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        detail = next((ln for ln in lines if "ERROR" in ln), lines[-1] if lines else "")
        raise error(path, f"unreadable image file ({detail})") from None
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise error(path, f"has {image.GetNumberOfComponentsPerPixel()} components per voxel; "
                          "expected a grey-scale volume")
    if image.GetDimension() != 3:
        size = "x".join(map(str, image.GetSize()))
        raise error(path, f"is {image.GetDimension()}-D (size {size}); a 3-D volume is needed")
    if image.GetSize()[2] < 2:
        raise error(path, "single slice: a volume needs at least 2 slices")
    grid = _Grid(values=sitk.GetArrayFromImage(image),  # (z, y, x)
                 spacing_zyx_mm=tuple(float(v) for v in reversed(image.GetSpacing())),
                 origin_xyz_mm=tuple(float(v) for v in image.GetOrigin()),
                 direction=tuple(float(v) for v in image.GetDirection()))
    return grid, image


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
    moved into place and the header last, so a reader never sees a header without its data."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        sitk.WriteImage(image, str(tmp_dir / path.name), useCompression=True)
        header = tmp_dir / path.name
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


def _check_geometry(path: Path, labels: _Grid, like: CTVolume) -> None:
    """Fails with a LabelError naming the first geometry property that differs."""
    if labels.shape != like.shape:
        raise LabelError(path, f"shape (z, y, x) {tuple(labels.shape)} differs from the image's "
                               f"{tuple(like.shape)} ({like.metadata.source})")
    spacing, ref = np.array(labels.spacing_zyx_mm), np.array(like.spacing_zyx_mm)
    if np.any(np.abs(spacing - ref) > LABEL_SPACING_REL_TOL * ref):
        raise LabelError(path, f"spacing (z, y, x) {_fmt(spacing)} mm differs from the image's "
                               f"{_fmt(ref)} mm ({like.metadata.source})")
    origin, ref_origin = np.array(labels.origin_xyz_mm), np.array(like.origin_xyz_mm)
    tol = max(LABEL_ORIGIN_ABS_MM, LABEL_ORIGIN_VOXEL_FRACTION * float(ref.min()))
    if np.any(np.abs(origin - ref_origin) > tol):
        raise LabelError(path, f"origin (x, y, z) {_fmt(origin)} mm differs from the image's "
                               f"{_fmt(ref_origin)} mm by more than {tol:.3g} mm "
                               f"({like.metadata.source})")
    direction, ref_direction = np.array(labels.direction), np.array(like.direction)
    if np.any(np.abs(direction - ref_direction) > LABEL_DIRECTION_TOL):
        raise LabelError(path, f"direction {_fmt(direction)} differs from the image's "
                               f"{_fmt(ref_direction)} ({like.metadata.source})")


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
