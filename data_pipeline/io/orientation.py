"""The canonical orientation (DICOM LPS, `data_pipeline.io` package docstring): `_orient` maps a
stored grid onto it by permuting and flipping axes only, and `_check_axial` refuses volumes
whose slices are not axial.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from data_pipeline.errors import InputError
from data_pipeline.io.volume import StoredGeometry, _Grid

# A series counts as axial when its slice normal is within this angle of the scanner z axis.
# Beyond it (coronal/sagittal reformats, strongly tilted stacks) Agatston's per-axial-slice
# rules (Agatston 1990) no longer mean what they should, so such a series is refused.
AXIAL_TOLERANCE_DEG = 5.0


def _orient(grid: _Grid, normal_spacing_mm: float | None = None) -> tuple[StoredGeometry, _Grid]:
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
                            normal_spacing_mm=normal_spacing_mm)
    canonical = _Grid(values=stored.to_canonical(grid.values) if not stored.is_canonical
                      else grid.values,
                      spacing_zyx_mm=tuple(float(spacing_xyz[perm[2 - k]]) for k in range(3)),
                      origin_xyz_mm=tuple(float(v) for v in origin),
                      direction=tuple(float(v) for v in new_direction.ravel()))
    return stored, canonical


def orientation_error(values: np.ndarray) -> float:
    """How far a row/column pair is from orthonormal: the largest |norm^2 - 1| or |row . col|."""
    row, col = values[:3], values[3:]
    return float(max(abs(row @ row - 1.0), abs(col @ col - 1.0), abs(row @ col)))


def orthonormal(values: np.ndarray) -> np.ndarray:
    """The orthonormal row/column pair nearest to ImageOrientationPatient's (values rounded in a
    header are a little off); an already orthonormal pair is returned unchanged."""
    if orientation_error(values) <= 1e-9:
        return values
    u, _, vt = np.linalg.svd(np.stack([values[:3], values[3:]], axis=1), full_matrices=False)
    nearest = u @ vt
    return np.concatenate([nearest[:, 0], nearest[:, 1]])


def _check_axial(path: Path, direction: Sequence[float], error: type[InputError]) -> None:
    """Refuses a volume whose slices are not axial (canonical slice axis more than
    AXIAL_TOLERANCE_DEG from the scanner z axis): Agatston's rules are per axial slice."""
    slice_axis = np.asarray(direction, dtype=np.float64).reshape(3, 3)[:, 2]
    cosine = abs(float(slice_axis[2])) / max(float(np.linalg.norm(slice_axis)), 1e-12)
    angle = math.degrees(math.acos(min(1.0, cosine)))
    if angle > AXIAL_TOLERANCE_DEG:
        raise error(path, f"not axial: the slice axis {np.round(slice_axis, 3).tolist()} is "
                          f"{angle:.1f} deg from the z axis (oblique volumes are not supported)")


def in_plane_rotation_deg(direction: Sequence[float]) -> float:
    """Angle between the canonical x axis (right to left) and the world x axis, in degrees: the
    in-plane rotation an axial volume keeps in its `direction` (at most 45 after `_orient`)."""
    x_axis = np.asarray(direction, dtype=np.float64).reshape(3, 3)[:, 0]
    cosine = abs(float(x_axis[0])) / max(float(np.linalg.norm(x_axis)), 1e-12)
    return math.degrees(math.acos(min(1.0, cosine)))
