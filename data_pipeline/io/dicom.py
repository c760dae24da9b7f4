"""DICOM reading with pydicom: finds the files of a folder (recursively), groups them by series,
chooses the series to read (the one closest to 3 mm slice thickness, or the one asked for),
checks its slices (geometry, duplicates, gaps, rescale, truncation) and decodes it, as stored.

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
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
import pydicom.pixels
from pydicom.dataelem import RawDataElement
from pydicom.dataset import FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian

from data_pipeline.errors import InputError
from data_pipeline.io.enhanced import (
    ENHANCED_CT,
    frame_of,
    frame_path,
    frame_pixels,
    frames,
    is_enhanced_ct,
)
from data_pipeline.io.orientation import AXIAL_TOLERANCE_DEG, orientation_error, orthonormal
from data_pipeline.io.volume import StudyMetadata, _Grid

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
_MEDIA_DIRECTORY = "1.2.840.10008.1.3.10"
# Transfer syntaxes too new for pydicom's UID dictionary, so error messages can still name them.
_EXTRA_SYNTAX_NAMES = {"1.2.840.10008.1.2.4.110": "JPEG XL Lossless",
                       "1.2.840.10008.1.2.4.111": "JPEG XL JPEG Recompression",
                       "1.2.840.10008.1.2.4.112": "JPEG XL"}

# Slice steps: a step more than GAP_FACTOR x the median step means missing slices; otherwise a
# step differing from the median by more than max(1 %, 0.01 mm) is non-uniform spacing; a step
# under DUPLICATE_MM is a duplicate position.
GAP_FACTOR = 1.5
SPACING_REL_TOL = 0.01
SPACING_ABS_TOL_MM = 0.01
DUPLICATE_MM = 1e-3

# Series choice: calcium scoring is defined on 3 mm axial reconstructions (Agatston 1990; 2.5-3 mm
# in the SCCT guideline, Hecht et al. 2017), so the series whose thickness is closest wins.
SCORING_THICKNESS_MM = 3.0
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"  # and its multi-frame variants (.7.1-.7.4)
# Rescale plausibility for CT (DICOM PS3.3 C.8.2.1): real CT slopes are about 1 (0.5-2 seen) and
# intercepts -1024, -1000 or 0; anything outside these bounds is a broken header, and values
# outside HU_RANGE after rescaling are no CT (ITK's extended scale ends near 31743 HU).
MAX_RESCALE_SLOPE = 1000.0
MAX_RESCALE_INTERCEPT = 1e5
HU_RANGE = (-1e5, 1e5)

_UNGATED_RE = re.compile(r"\b(un-?gated|non[- ]?gated|not[- ]gated|no[- ]ecg|ctac|attenuation|"
                         r"att[- ]?corr\w*|ac[- ]ct|ct[- ]ac)\b", re.IGNORECASE)
_GATED_RE = re.compile(r"(\bgated\b|\becg\b|\bekg\b|casc|calcium[- ]?scor\w*|smart[- ]?score|"
                       r"\bcac\b|\bca[- ]?score\b|cardiac[- ]?score|heart[- ]?scor\w*)", re.IGNORECASE)


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
        files = len({id(frame_of(d)[0]) if frame_of(d) else path for path, d in self.datasets})
        count = (f"{files} files" if files == len(self.datasets) else
                 f"{len(self.datasets)} frames in {files} file{'s' if files > 1 else ''}")
        return f"{self.uid} ({number}{modality}{', ' + desc if desc else ''}, {count})"


def list_files(folder: Path, error: type[InputError]) -> list[Path]:
    """All regular files under `folder`, recursively, in a stable order; hidden files skipped.
    Linked subfolders are followed (each real folder once, so a link loop ends): skipping them
    would silently drop the slices stored there. A link to the folder itself or to a folder
    above it is not: it would read the whole tree around the study.

    An unreadable subfolder is an error: skipping it could silently drop slices.
    """
    files, seen = [], set()
    top = os.path.realpath(folder)

    def around(root: str, name: str) -> bool:  # a linked folder that holds the study's folder
        path = os.path.join(root, name)
        if not os.path.islink(path):
            return False
        real = os.path.realpath(path)
        return os.path.commonpath([real, top]) == real

    def unreadable(exc: OSError) -> None:
        raise error(exc.filename or folder, f"cannot read folder: {exc.strerror or exc}")

    for root, dirs, names in os.walk(folder, onerror=unreadable, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and not around(root, d))
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
        if is_enhanced_ct(ds):  # a whole series in one file: one header per frame
            if "PixelData" not in ds:
                raise error(path, "Enhanced CT file without PixelData (truncated file?)")
            for index, (key, frame) in enumerate(frames(path, ds, error)):
                # Named `file [frame k]` in messages; the frame header knows its file.
                by_uid.setdefault(key, _Series(key)).datasets.append(
                    (frame_path(path, index), frame))
            continue
        key = uid + set_apart(ds)
        by_uid.setdefault(key, _Series(key)).datasets.append((path, ds))
    if not by_uid:
        raise error(source, f"no DICOM image files found ({len(files)} files looked at)")
    chosen, why, skipped = _choose_series(source, list(by_uid.values()), error, require_ct,
                                          series)
    return _load_series(source, chosen, why, skipped, error, require_ct)


# What some scanners file under the axial images' SeriesInstanceUID: kept apart as a series of its
# own (`UID [localizer]`), which is then skipped with its reason, instead of spoiling the series.
_APART = " ["


def set_apart(ds: pydicom.Dataset) -> str:
    """"" for an image of its series, or the tag of a localizer or secondary capture sharing it."""
    if {str(v).upper() for v in _as_list(ds.get("ImageType"))} & {"LOCALIZER", "SCOUT",
                                                                   "TOPOGRAM"}:
        return f"{_APART}localizer]"
    if str(ds.get("SOPClassUID", "") or "").startswith(SECONDARY_CAPTURE):
        return f"{_APART}secondary capture]"
    return ""


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
    if sop_class.startswith(SECONDARY_CAPTURE):
        return f"secondary capture (modality {modality or 'not given'}), not a CT acquisition"
    if require_ct and modality != "CT":
        return f"modality {modality or 'not given'}, not CT"
    if require_ct and sop_class and sop_class != CT_IMAGE_STORAGE and sop_class not in ENHANCED_CT:
        return f"SOP class {sop_class} ({UID(sop_class).name}), not CT Image Storage"
    image_types = {str(v).upper() for v in _as_list(ds.get("ImageType"))}
    if image_types & {"LOCALIZER", "SCOUT", "TOPOGRAM"}:
        return "localizer/scout image"
    # An Enhanced CT frame's pixels are in its file's PixelData (`_read_dicom` checked it).
    missing = [(path, [k for k in _SLICE_ELEMENTS if k not in d and not (
        k == "PixelData" and frame_of(d) is not None)]) for path, d in s.datasets]
    if all(m for _, m in missing):
        return f"no slice image ({', '.join(missing[0][1])} missing)"
    if any(m for _, m in missing):
        path, m = next((p, m) for p, m in missing if m)
        raise error(path, f"incomplete DICOM slice ({', '.join(m)} missing) in "
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
        tilt = _float_or_none(ds.get("GantryDetectorTilt"))
        if tilt and abs(tilt) > AXIAL_TOLERANCE_DEG:  # else an oblique reformat, not the tilt
            return (f"gantry tilt {tilt:g} deg (GantryDetectorTilt; slice normal "
                    f"{angle:.1f} deg from the z axis): series tilted more than "
                    f"{AXIAL_TOLERANCE_DEG:g} deg are not supported")
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
    if keyword == "ImageOrientationPatient":
        if np.linalg.norm(np.cross(values[:3], values[3:])) < 0.5:
            raise error(path, f"malformed {keyword}: row and column directions {values.tolist()} "
                              "are not orthogonal unit vectors")
        values = orthonormal(values)
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
    if _APART in s.uid:  # a localizer set apart from its series: only by its listed name
        return s.uid == wanted
    if wanted.isdigit():
        return s.number == int(wanted)
    # A stack of an Enhanced CT file: `SeriesInstanceUID/stack ID`, or the UID for all stacks.
    return s.uid == wanted or s.uid.partition("/stack ")[0] == wanted


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
                                "SeriesInstanceUID (for one stack of an Enhanced CT file, "
                                "SeriesInstanceUID/stack ID, as listed)")
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
    # are further apart than the slices are along their normal. The z spacing is the distance
    # between slice centres, as SimpleITK reads the series (docs/contracts.md), so scores and
    # masks written back agree with it; the normal distance is kept as the other z spacing a
    # label file may carry.
    step = float(np.linalg.norm(positions[-1] - positions[0]) / (len(positions) - 1))
    normal_spacing = dz if abs(step - dz) > 1e-6 * dz else None

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
    # Each slice's own rescale, as GDCM and SimpleITK apply it: lossy JPEG writers (DCMTK's
    # dcmcjpeg) store every slice with its own intercept, and the HU are the same.
    rescale = [_rescale(path, ds, error, require_ct) for path, ds in datasets]
    for k, (path, ds) in enumerate(datasets):
        raw[k] = _pixels(path, ds, error)
    without = [k for k, r in enumerate(rescale) if r[2]]  # no intercept: values already HU
    if require_ct and without:
        _check_already_hu(datasets[without[0]][0], raw[without], error)
    slope, intercept = rescale[0][0], rescale[0][1]
    one_rescale = all(r[:2] == (slope, intercept) for r in rescale)
    for k, (slope_k, intercept_k, _) in enumerate(rescale):
        raw[k] *= np.float32(slope_k)  # in place: no second full-size array
        raw[k] += np.float32(intercept_k)
    hu = raw
    if require_ct:
        low, high = float(hu.min()), float(hu.max())
        if not (math.isfinite(low) and math.isfinite(high)) or low < HU_RANGE[0] or \
                high > HU_RANGE[1]:
            given = (f"RescaleSlope {slope:g} and RescaleIntercept {intercept:g} give"
                     if one_rescale else "the slices' RescaleSlope and RescaleIntercept give")
            raise error(datasets[0][0], f"{given} values {low:g}..{high:g}, outside any CT "
                                        f"range ({HU_RANGE[0]:g}..{HU_RANGE[1]:g} HU)")

    # SimpleITK direction: columns are row direction, column direction, slice normal.
    direction = np.stack([row_dir, col_dir, normal], axis=1)
    gated, protocol = _gating(first)
    notes = []
    thickness = _header_float(first, "SliceThickness", notes)
    kvp = _header_float(first, "KVP", notes)
    if s.number is None and first.get("SeriesNumber") not in (None, ""):
        notes.append(f"malformed SeriesNumber {first.get('SeriesNumber')!r} ignored")
    stated = _floats(first.ImageOrientationPatient, 6)
    if orientation_error(stated) >= 1e-3:  # GDCM's tolerance for a valid orientation
        notes.append(f"ImageOrientationPatient {np.round(stated, 6).tolist()} is not a pair of "
                     "orthogonal unit vectors; read with the nearest pair "
                     f"{np.round(orientation, 6).tolist()}")
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
    z_spacing = step if normal_spacing is not None else dz
    grid = _Grid(values=hu, spacing_zyx_mm=(z_spacing, float(pixel_spacing[0]),
                                            float(pixel_spacing[1])),
                 origin_xyz_mm=tuple(positions[0].tolist()),
                 direction=tuple(direction.ravel().tolist()))
    return grid, metadata, normal_spacing


def _rescale(path: Path, ds: pydicom.Dataset, error: type[InputError],
             require_ct: bool) -> tuple[float, float, bool]:
    """(RescaleSlope, RescaleIntercept, intercept missing) of a slice, checked for CT.

    Both are Type 1 in the CT Image module (DICOM PS3.3 C.8.2.1). A missing intercept would read
    stored values (often offset by 1024) as HU and shift every threshold, so it is refused unless
    the header lets the data be HU already (RescaleType "HU" or absent: it is Type 1C, present
    when the values are not HU) and the values confirm it (`_check_already_hu`). Slope 0, a
    negative slope or one outside MAX_RESCALE_SLOPE is refused: no CT stores HU that way, and
    such a header would silently scale every value.
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
        # RescaleType is Type 1C in the CT Image module, present when the values are not HU:
        # absent (or "HU"), the stored values are HU, which `_check_already_hu` then checks.
        rescale_type = str(ds.get("RescaleType", "") or "").strip().upper()
        if rescale_type not in ("", "HU"):
            raise error(path, f"RescaleIntercept missing (Type 1 for CT) and RescaleType "
                              f"{rescale_type!r}: the stored values cannot be converted to "
                              "Hounsfield units")
        intercept = 0.0
    return slope, intercept, missing


def _check_already_hu(path: Path, stored: np.ndarray, error: type[InputError]) -> None:
    """With no RescaleIntercept (RescaleType HU or absent), the stored values must look like HU:
    air inside the field of view reads about -1000 HU, so a CT in HU has values below -500.
    Padding outside the field of view (-2000, -3024: below -1500) is not air: data stored as
    HU + 1024 with padding at -2000, its intercept stripped, would otherwise pass."""
    inside = stored[stored > -1500.0]
    low = float(inside.min()) if inside.size else math.nan
    if not low < -500.0:
        raise error(path, "RescaleIntercept missing (Type 1 for CT) and the values "
                          f"({float(stored.min()):g}..{float(stored.max()):g}, lowest above the "
                          f"padding {low:g}) have no air at about -1000 HU, so they are not "
                          "Hounsfield units")


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
        _check_pixel_data_length(path, (frame_of(ds) or (ds,))[0], error)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pixels = ds.pixel_array if frame_of(ds) is None else frame_pixels(ds)
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
    """Native (uncompressed) pixel data must hold Rows x Columns x BitsAllocated / 8 bytes: pydicom
    pads a short slice with zeros and drops an excess with a warning, so a Rows/Columns that
    disagrees with the data would otherwise give a wrong image. A few trailing bytes (a pad byte
    to an even length, a writer's padding) are fine: fewer than the smaller side's row of pixels,
    they cannot be a Rows or Columns off by one or more."""
    try:
        rows, columns = int(ds.Rows), int(ds.Columns)
        bits = int(ds.BitsAllocated)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (AttributeError, TypeError, ValueError) as exc:
        raise error(path, f"malformed image header ({exc})") from None
    element = ds["PixelData"]
    length = element.length if isinstance(element, RawDataElement) else len(element.value or b"")
    if length == 0xFFFFFFFF or bits % 8:
        return  # encapsulated data under a native syntax, or packed bits: left to the decoder
    expected = rows * columns * samples * bits // 8 * frames
    if not expected <= length < expected + max(2, min(rows, columns) * samples * bits // 8):
        of_frames = f" x {frames} frames" if frames > 1 else ""
        raise error(path, f"pixel data has {length} bytes but Rows {rows} x Columns {columns} x "
                          f"{bits} bits{of_frames} need {expected}: Rows/Columns disagree with "
                          "the pixel data (or the file is truncated)")


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
