"""The reading API: `read_study` (a DICOM folder or file, or an image file, to a canonical
`CTVolume`) and `read_labels` (a label map checked against and oriented like a study), with
the label value and geometry checks and their tolerances.
"""

from __future__ import annotations

import dataclasses
import errno
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from data_pipeline.errors import InputError, LabelError, StudyReadError
from data_pipeline.io.dicom import _has_dicom_magic, _read_dicom, list_files
from data_pipeline.io.image_files import (
    IMAGE_SUFFIXES,
    _is_image_file,
    _read_image_file,
    _read_image_grid,
)
from data_pipeline.io.orientation import (
    AXIAL_TOLERANCE_DEG,
    _check_axial,
    _orient,
    in_plane_rotation_deg,
)
from data_pipeline.io.volume import CTVolume, _Grid

# Label geometry checks against the image: spacing within 1e-3 relative; origin within
# max(0.01 mm, 0.1 x the smallest voxel spacing) per world axis (well under a voxel, well above
# the float32 rounding of NIfTI headers); direction cosines within 1e-3.
LABEL_SPACING_REL_TOL = 1e-3
LABEL_ORIGIN_ABS_MM = 0.01
LABEL_ORIGIN_VOXEL_FRACTION = 0.1
LABEL_DIRECTION_TOL = 1e-3


def read_study(path: str | os.PathLike, series: int | str | None = None) -> CTVolume:
    """Reads a CT study (a DICOM folder or file, or an image file SimpleITK reads) in the
    canonical orientation (`data_pipeline.io` package docstring).

    DICOM folders are searched recursively (files without a DICOM header, and DICOMDIR
    indexes, are ignored). Files are grouped by SeriesInstanceUID; an Enhanced CT file (a whole
    series in one multi-frame file) is read frame by frame as slices (`data_pipeline.io.enhanced`).
    Series that are not CT Image Storage or Enhanced CT with modality CT (MR, secondary capture,
    RT objects), localizers/scouts (ImageType LOCALIZER), series without slice geometry, single
    slices and non-axial series (slice normal more than AXIAL_TOLERANCE_DEG from z) are skipped.
    `series` picks one by SeriesNumber (an int or a string of digits) or SeriesInstanceUID;
    otherwise the series whose slice thickness is closest to 3 mm (calcium scoring is defined on
    3 mm axial reconstructions; Agatston 1990, Hecht et al. SCCT 2017) is chosen, then the one
    with the most slices. `metadata.chosen_series` says which and why,
    `metadata.skipped_series` lists the others with the reason. Slices are sorted by position
    along the slice normal, rescaled per slice with RescaleSlope/Intercept (checked: see
    `_rescale`), and checked for duplicate positions, gaps and non-uniform steps. Compressed
    pixel data is decoded by the installed pydicom plugins (pylibjpeg: JPEG, JPEG-LS, JPEG 2000,
    HTJ2K, RLE). Raises `StudyReadError` naming the file or folder and the problem.
    """
    path = _existing_path(path, StudyReadError, "image")
    if path.is_dir():
        grid, metadata, normal_spacing = _read_dicom(
            path, list_files(path, StudyReadError), error=StudyReadError, require_ct=True,
            series=series)
    elif _is_image_file(path):
        _no_series(path, series)
        grid, metadata, normal_spacing = (*_read_image_file(path, error=StudyReadError), None)
    elif _has_dicom_magic(path, StudyReadError):
        grid, metadata, normal_spacing = _read_dicom(path, [path], error=StudyReadError,
                                                     require_ct=True, series=series)
    else:
        raise StudyReadError(path, "not a DICOM file or folder, nor an image file of a supported "
                                   f"type ({', '.join(IMAGE_SUFFIXES)})")
    stored, canonical = _orient(grid, normal_spacing_mm=normal_spacing)
    _check_axial(path, canonical.direction, StudyReadError)
    rotation = in_plane_rotation_deg(canonical.direction)
    if rotation > AXIAL_TOLERANCE_DEG:
        metadata = dataclasses.replace(metadata, warnings=(*metadata.warnings, (
            f"{path}: rotated {rotation:.1f} deg in-plane (its direction matrix); the array "
            "axes are the world axes nearest to its rows and columns, so the anatomy stays that "
            "far from upright, which the models did not see in training")))
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
        files = list_files(path, LabelError) if path.is_dir() else [path]
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
    problem = _geometry_problem(grid, stored, like.metadata.source, stored.normal_spacing_mm)
    if problem is None:
        return stored.to_canonical(labels)
    # Another orientation of the same world grid (e.g. written by write_volume in the canonical
    # orientation): compare once both are canonical.
    canonical = _orient(grid)[1]
    like_grid = _Grid(like.hu, like.spacing_zyx_mm, like.origin_xyz_mm, like.direction)
    if _geometry_problem(canonical, like_grid, like.metadata.source,
                         stored.normal_spacing_mm) is None:
        return canonical.values
    if not np.allclose(grid.direction, stored.direction, atol=LABEL_DIRECTION_TOL) and \
            np.allclose(canonical.direction, like.direction, atol=LABEL_DIRECTION_TOL):
        # Told in LPS terms, since the stored grids are oriented differently: the values quoted
        # are the LPS ones, and the stored directions say why they moved.
        in_lps = _geometry_problem(canonical, like_grid, like.metadata.source,
                                   stored.normal_spacing_mm)
        problem = (f"{in_lps} once both are reoriented to LPS (the labels are stored with "
                   f"direction {_fmt(grid.direction)}, the image with {_fmt(stored.direction)})")
    raise LabelError(path, problem)


def _to_int16_labels(path: Path, values: np.ndarray) -> np.ndarray:
    """Checks label values are non-negative integers and converts them to int16 (codes above
    int16's range are non-coronary like every code from 5: they become 32767)."""
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
            # Codes 5 and above are all non-coronary (never scored): one code stands for them.
            values = np.minimum(values, np.iinfo(np.int16).max)
    return values.astype(np.int16)


def _geometry_problem(labels: _Grid, like, source: str,
                      normal_spacing_mm: float | None = None) -> str | None:
    """The first geometry property in which `labels` differs from `like` (a grid with shape,
    spacing_zyx_mm, origin_xyz_mm and direction), as a message; None when they agree.

    `normal_spacing_mm` (gantry tilt) is accepted as the z spacing too: the z spacing of a tilted
    series is the distance between slice positions (SimpleITK's), and some tools write the
    distance between the slice planes along their normal instead.
    """
    if tuple(labels.shape) != tuple(like.shape):
        return (f"shape (z, y, x) {tuple(labels.shape)} differs from the image's "
                f"{tuple(like.shape)} ({source})")
    spacing, ref = np.array(labels.spacing_zyx_mm), np.array(like.spacing_zyx_mm)
    off = np.abs(spacing - ref) > LABEL_SPACING_REL_TOL * ref
    if normal_spacing_mm is not None and off[0] and \
            abs(spacing[0] - normal_spacing_mm) <= LABEL_SPACING_REL_TOL * normal_spacing_mm:
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


def _fmt(values: Iterable[float]) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"
