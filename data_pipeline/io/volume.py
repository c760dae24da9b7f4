"""The in-memory study: `CTVolume` (HU voxels plus world geometry), `StudyMetadata` (what the
header says) and `StoredGeometry` (the input's own grid and how the canonical array maps onto
it); conventions in the `data_pipeline.io` package docstring.

`_Grid` is the readers' intermediate form: voxel values in their stored type with geometry, as
the DICOM and image-file readers return them before `orientation._orient`.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np


def hu_float32(values: np.ndarray) -> np.ndarray:
    """HU as float32, rounded down where float32 cannot hold a wider value exactly.

    Rounding toward minus infinity keeps every comparison `hu >= t` with a threshold float32
    holds exactly (130, 200, 300, 400: the Agatston candidate threshold and weight bands) as it
    was in the input's own precision: a float64 129.99999999 stays under 130 (round to nearest
    would make it 130.0). Integer HU and float32 input are unchanged (no copy for float32).
    """
    values = np.asarray(values)
    out = values.astype(np.float32, copy=False)
    if values.dtype.kind == "f" and values.dtype.itemsize > 4:
        up = out.astype(values.dtype) > values
        if up.any():
            out[up] = np.nextafter(out[up], np.float32(-np.inf))
    return out


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
    ecg_gated: bool | None = None    # from the header where it says (`io.dicom` docstring)
    protocol: str | None = None      # "cac" | "ctac" where known (gated -> cac, ungated -> ctac)
    skipped_series: tuple[str, ...] = ()   # "UID (description): reason" for series not chosen
    chosen_series: str | None = None       # "UID (description): why it was chosen" (DICOM)
    warnings: tuple[str, ...] = ()         # header values tolerated but not understood


@dataclasses.dataclass(frozen=True)
class StoredGeometry:
    """The input's own voxel grid, and how the canonical array maps onto it.

    `read_study` returns every study in the canonical orientation (package docstring); this keeps
    the grid as stored (SimpleITK's view of the file or DICOM series) so masks can be written
    back in it (`write_labels`). `axes[k]` is the stored numpy axis that becomes canonical axis
    k, and `flips[k]` says whether canonical axis k then runs backwards. Under gantry tilt the z
    spacing is the distance between consecutive slice positions (SimpleITK's), and
    `normal_spacing_mm` the smaller distance between the slice planes along their normal, which
    label files from some tools carry as their z spacing (accepted by `read_labels`).
    """

    shape_zyx: tuple[int, int, int]
    spacing_zyx_mm: tuple[float, float, float]
    origin_xyz_mm: tuple[float, float, float]
    direction: tuple[float, ...]
    axes: tuple[int, int, int] = (0, 1, 2)
    flips: tuple[bool, bool, bool] = (False, False, False)
    normal_spacing_mm: float | None = None

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
            hu = hu_float32(hu)
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
