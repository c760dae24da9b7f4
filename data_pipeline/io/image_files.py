"""Image files read with SimpleITK (.nii, .nii.gz, .mhd, .mha, .nrrd, .nhdr), with the payload
checks SimpleITK lacks: a NIfTI or MetaImage whose voxel data is shorter than its header
declares is refused here, naming the file, instead of being read with zeros or garbage.

SimpleITK orders spacing (x, y, z); `_read_image_grid` converts it to (z, y, x), the only place
in the package that does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import math
import re
import shutil
import tempfile
import zlib
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from data_pipeline.errors import InputError
from data_pipeline.io.volume import StudyMetadata, _Grid, hu_float32

# Suffixes SimpleITK reads for us (.mha is single-file MetaImage).
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".mhd", ".mha", ".nrrd", ".nhdr")


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def _is_image_file(path: Path) -> bool:
    return _suffix(path) in IMAGE_SUFFIXES


def _read_image_file(path: Path, *, error: type[InputError]) -> tuple[_Grid, StudyMetadata]:
    """Reads a .nii/.nii.gz/.mhd/.mha/.nrrd study as HU float32 with what metadata there is."""
    grid, image = _read_image_grid(path, error=error)
    modality = None
    if image.HasMetaDataKey("Modality") and "CT" in image.GetMetaData("Modality").upper():
        modality = "CT"  # MetaImage's MET_MOD_CT
    description = None
    if image.HasMetaDataKey("descrip"):  # NIfTI's free-text description
        description = image.GetMetaData("descrip").strip() or None
    warnings = ()
    if _suffix(path) in (".nii", ".nii.gz"):
        disagreement = _qform_sform_disagreement(path)
        if disagreement:
            warnings = (f"{path}: its NIfTI qform and sform disagree ({disagreement}); read as "
                        "SimpleITK reads it, while tools that prefer the sform (nibabel, FSL) "
                        "place the voxels elsewhere",)
    metadata = StudyMetadata(source=str(path), modality=modality, series_description=description,
                             warnings=warnings)
    return dataclasses.replace(grid, values=hu_float32(grid.values)), metadata


def _qform_sform_disagreement(path: Path) -> str | None:
    """How a NIfTI's qform and sform differ, when both are set and they describe different
    grids (voxel size, direction or origin, with the label-file tolerances of `readers`), else
    None. ITK then chooses one by rules of its own, and other tools may choose the other."""
    try:
        opener = gzip.open if _suffix(path) == ".nii.gz" else open
        with opener(path, "rb") as f:
            header = f.read(540)
    except (OSError, EOFError, zlib.error):
        return None  # the read itself has already succeeded or failed on its own terms
    forms = _nifti_forms(header)
    if forms is None:
        return None
    qform, sform = forms
    q_size, s_size = np.linalg.norm(qform[:, :3], axis=0), np.linalg.norm(sform[:, :3], axis=0)
    if np.any(q_size <= 0) or np.any(s_size <= 0):
        return None
    if np.any(np.abs(q_size - s_size) > 1e-3 * s_size):
        return f"voxel size {np.round(q_size, 4).tolist()} against {np.round(s_size, 4).tolist()} mm"
    turn = float(np.abs(qform[:, :3] / q_size - sform[:, :3] / s_size).max())
    if turn > 1e-3:
        return f"direction cosines differ by up to {turn:.3g}"
    shift = float(np.abs(qform[:, 3] - sform[:, 3]).max())
    if shift > max(0.01, 0.1 * float(s_size.min())):
        return (f"origin {np.round(qform[:, 3], 3).tolist()} against "
                f"{np.round(sform[:, 3], 3).tolist()} mm (RAS)")
    return None


def _nifti_forms(header: bytes) -> tuple[np.ndarray, np.ndarray] | None:
    """(qform, sform) of a NIfTI-1 or NIfTI-2 header as 3 x 4 RAS matrices (voxel to mm), or
    None unless both codes are set."""
    for endian in ("<", ">"):
        if len(header) >= 348 and np.frombuffer(header[:4], f"{endian}i4")[0] == 348:
            real, codes_at, codes_type, pixdim_at, quat_at = f"{endian}f4", 252, f"{endian}i2", 76, 256
            break
        if len(header) >= 540 and np.frombuffer(header[:4], f"{endian}i4")[0] == 540:
            real, codes_at, codes_type, pixdim_at, quat_at = f"{endian}f8", 344, f"{endian}i4", 104, 352
            break
    else:
        return None
    size = np.dtype(real).itemsize
    qcode, scode = np.frombuffer(header[codes_at:codes_at + 2 * np.dtype(codes_type).itemsize],
                                 codes_type)
    if qcode <= 0 or scode <= 0:
        return None
    pixdim = np.frombuffer(header[pixdim_at:pixdim_at + 8 * size], real).astype(np.float64)
    values = np.frombuffer(header[quat_at:quat_at + 18 * size], real).astype(np.float64)
    b, c, d = values[:3]
    a = np.sqrt(max(0.0, 1.0 - (b * b + c * c + d * d)))
    rotation = np.array([[a * a + b * b - c * c - d * d, 2 * (b * c - a * d), 2 * (b * d + a * c)],
                         [2 * (b * c + a * d), a * a + c * c - b * b - d * d, 2 * (c * d - a * b)],
                         [2 * (b * d - a * c), 2 * (c * d + a * b), a * a + d * d - c * c - b * b]])
    qfac = -1.0 if pixdim[0] < 0 else 1.0
    qform = np.column_stack([rotation * np.array([pixdim[1], pixdim[2], qfac * pixdim[3]]),
                             values[3:6]])
    return qform, values[6:18].reshape(3, 4)


def _read_image_grid(path: Path, *, error: type[InputError]) -> tuple[_Grid, sitk.Image]:
    """SimpleITK read; spacing (x, y, z) -> (z, y, x) here and nowhere else."""
    # ITK's warnings go to stderr in several lines naming the temporary copy, not the user's
    # file; the one that matters for geometry (qform against sform) is checked here instead.
    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
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
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)
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
