"""The calcium model's heart frame: a fixed-size window centred on the heart at a fixed spacing.

`config.data.calcium_frame` says what the calcium model sees:
- "slice": the whole slice at the scan's own pixel spacing (the paper's set-up; evaluation and
  inference pad the slice into the training frame);
- "heart": a square window of `frame_size` pixels at `frame_spacing_mm` in-plane spacing, centred on
  the heart. Every study, whatever its field of view or matrix, is seen at the same physical scale
  and one compiled function serves them all. Training centres it on the reference heart mask
  (jittered by up to `frame_jitter_mm` each way), validation on the reference heart, inference on
  the heart the heart model found. Its window of `frame_size * frame_spacing_mm` mm must hold the
  dilated heart (a heart is at most about 16 cm across).

The frame's centre is the centre of the heart mask's in-plane bounding box over all slices, in
pixel coordinates of the scan (`heart_centre_yx`), so one window serves every slice of a study.
Pixel centres sit at integer coordinates: frame pixel (i, j) samples scan point
(cy + (i - c) * ry, cx + (j - c) * rx) with c = (frame_size - 1) / 2 and r = frame spacing / scan
spacing, the mapping the training pipeline's affine resample uses too. Numpy only (inference and
validation share these functions; training does the same mapping in tf.data).

Also here, on the same linear taps: `resize_planes` (whole slices between the scan's and the
model's spacing, as `scipy.ndimage.zoom(order=1, grid_mode=True, mode="nearest")` does) and
`class_map` (the argmax over class planes), which inference uses in "slice" mode.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

CALCIUM_FRAMES = ("slice", "heart")


@dataclasses.dataclass(frozen=True)
class FrameGeometry:
    """Where a study's heart frame lies: centre (y, x) in scan pixels, scan pixels per frame pixel
    (ry, rx), the frame's side in pixels and the scan's in-plane shape."""

    centre_yx: tuple[float, float]
    ratio_yx: tuple[float, float]
    size: int
    scan_hw: tuple[int, int]

    def coordinates(self) -> np.ndarray:
        """Scan coordinates (2, size, size) that the frame's pixels sample."""
        c = (self.size - 1) / 2.0
        offsets = np.arange(self.size, dtype=np.float64) - c
        ys = self.centre_yx[0] + offsets * self.ratio_yx[0]
        xs = self.centre_yx[1] + offsets * self.ratio_yx[1]
        yy, xx = np.meshgrid(ys, xs, indexing="ij")
        return np.stack([yy, xx])

    def inverse_axes(self) -> tuple[np.ndarray, np.ndarray]:
        """Frame row coordinate (h,) of every scan row and frame column coordinate (w,) of every
        scan column: the frame's axes are the scan's, scaled and shifted."""
        c = (self.size - 1) / 2.0
        h, w = self.scan_hw
        fy = (np.arange(h, dtype=np.float64) - self.centre_yx[0]) / self.ratio_yx[0] + c
        fx = (np.arange(w, dtype=np.float64) - self.centre_yx[1]) / self.ratio_yx[1] + c
        return fy, fx

    def inverse_coordinates(self) -> np.ndarray:
        """Frame coordinates (2, h, w) of every scan pixel."""
        yy, xx = np.meshgrid(*self.inverse_axes(), indexing="ij")
        return np.stack([yy, xx])


def check_frame_config(data) -> None:
    """Raises ValueError unless the data config's frame settings are usable."""
    frame = str(data.get("calcium_frame", "slice"))
    if frame not in CALCIUM_FRAMES:
        raise ValueError(f"config.data.calcium_frame must be one of {', '.join(CALCIUM_FRAMES)}, "
                         f"got {frame!r}")
    if frame == "heart":
        if not float(data.get("frame_spacing_mm", 0) or 0) > 0:
            raise ValueError("config.data.frame_spacing_mm must be > 0 for the heart frame")
        if not int(data.get("frame_size", 0) or 0) > 0:
            raise ValueError("config.data.frame_size must be > 0 for the heart frame")
        if float(data.get("frame_jitter_mm", 0) or 0) < 0:
            raise ValueError("config.data.frame_jitter_mm must be >= 0")


def uses_heart_frame(config) -> bool:
    """True when `config` (a full experiment config or a data config) is a calcium model trained
    in the heart frame. Configs written before the frame existed are whole-slice models."""
    data = config.data if "data" in config else config
    task = config.get("task", data.get("task", ""))
    return task == "calcium" and str(data.get("calcium_frame", "slice")) == "heart"


def heart_centre_yx(mask: np.ndarray | None, fallback: np.ndarray | None = None
                    ) -> tuple[float, float] | None:
    """Centre (y, x) of the in-plane bounding box of `mask` (z, y, x) over all slices; of
    `fallback`'s non-zero voxels when `mask` is None or empty; None when both are empty."""
    for candidate in (mask, fallback):
        if candidate is None:
            continue
        rows = np.flatnonzero(np.asarray(candidate).any(axis=(0, 2)))
        cols = np.flatnonzero(np.asarray(candidate).any(axis=(0, 1)))
        if rows.size and cols.size:
            return (float(rows[0] + rows[-1]) / 2.0, float(cols[0] + cols[-1]) / 2.0)
    return None


def geometry(centre_yx: Sequence[float] | None, spacing_yx_mm: Sequence[float],
             scan_hw: Sequence[int], frame_size: int, frame_spacing_mm: float) -> FrameGeometry:
    """The frame of a scan of in-plane shape `scan_hw` and spacing `spacing_yx_mm` around
    `centre_yx` (None: the scan's centre)."""
    h, w = (int(n) for n in scan_hw)
    if centre_yx is None:
        centre_yx = ((h - 1) / 2.0, (w - 1) / 2.0)
    ratio = tuple(float(frame_spacing_mm) / float(s) for s in spacing_yx_mm)
    return FrameGeometry(centre_yx=(float(centre_yx[0]), float(centre_yx[1])), ratio_yx=ratio,
                         size=int(frame_size), scan_hw=(h, w))


def _nearest_index(coordinate: np.ndarray) -> np.ndarray:
    """Nearest pixel index, halves away from zero (C's `round`, as tf.data's resampler does)."""
    return (np.sign(coordinate) * np.floor(np.abs(coordinate) + 0.5)).astype(np.int64)


def to_frame(images: np.ndarray, geom: FrameGeometry, *, order: int = 1,
             cval: float = 0.0) -> np.ndarray:
    """Resamples the trailing (h, w) axes of `images` (..., h, w) onto the frame (..., S, S).

    order 1: bilinear, the scan continued by `cval` beyond its edge (images); order 0: nearest
    (labels), `cval` where the nearest pixel is outside the scan. Both sample exactly as the
    training pipeline's resampler does.
    """
    images = np.asarray(images)
    lead = images.shape[:-2]
    flat = images.reshape(-1, *images.shape[-2:])
    coords = geom.coordinates()
    if order == 0:
        h, w = flat.shape[-2:]
        iy, ix = _nearest_index(coords[0]), _nearest_index(coords[1])
        valid = (iy >= 0) & (iy < h) & (ix >= 0) & (ix < w)
        out = np.full((flat.shape[0], geom.size, geom.size), cval, images.dtype)
        out[:, valid] = flat[:, iy[valid], ix[valid]]
        return out.reshape(*lead, geom.size, geom.size)
    out = np.empty((flat.shape[0], geom.size, geom.size), np.float32)
    for k, plane in enumerate(flat):
        out[k] = ndimage.map_coordinates(plane.astype(np.float32, copy=False), coords,
                                         order=order, mode="grid-constant", cval=cval,
                                         prefilter=False)
    return out.reshape(*lead, geom.size, geom.size)


def inside_scan(geom: FrameGeometry) -> np.ndarray:
    """(S, S) bool: the frame pixels whose nearest scan pixel lies inside the scan."""
    iy, ix = (_nearest_index(c) for c in geom.coordinates())
    h, w = geom.scan_hw
    return (iy >= 0) & (iy < h) & (ix >= 0) & (ix < w)


def _linear_taps(coordinate: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Linear interpolation along one axis of `size` samples at `coordinate` (1-D): the two
    sample indices and the second one's weight, beyond the ends the end sample (as
    `scipy.ndimage.map_coordinates` with order 1 and mode "nearest")."""
    low = np.floor(coordinate)
    weight = (coordinate - low).astype(np.float32)
    low = low.astype(np.int64)
    return np.clip(low, 0, size - 1), np.clip(low + 1, 0, size - 1), weight


def from_frame(probabilities: np.ndarray, geom: FrameGeometry) -> np.ndarray:
    """Class probabilities (n, S, S, C) of the frame back on the scan's grid (n, h, w, C).

    Bilinear; scan pixels outside the frame are background (class 0) with certainty. The class
    map is the argmax of the result (a linear resample of class indices would not be one). The
    resample is separable (`inverse_axes`): one linear pass along the rows, then one along the
    columns.
    """
    probabilities = np.asarray(probabilities, np.float32)
    n, _, _, classes = probabilities.shape
    h, w = geom.scan_hw
    fy, fx = geom.inverse_axes()
    last = geom.size - 1
    in_rows = np.flatnonzero((fy >= -0.5) & (fy <= last + 0.5))
    in_cols = np.flatnonzero((fx >= -0.5) & (fx <= last + 0.5))
    out = np.zeros((n, h, w, classes), np.float32)
    out[..., 0] = 1.0
    if not (in_rows.size and in_cols.size):
        return out
    y0, y1, x0, x1 = in_rows[0], in_rows[-1] + 1, in_cols[0], in_cols[-1] + 1
    top, bottom, wy = _linear_taps(fy[y0:y1], geom.size)
    left, right, wx = _linear_taps(fx[x0:x1], geom.size)
    wy, wx = wy[None, :, None, None], wx[None, None, :, None]
    rows = probabilities[:, top] * (1.0 - wy) + probabilities[:, bottom] * wy
    out[:, y0:y1, x0:x1] = rows[:, :, left] * (1.0 - wx) + rows[:, :, right] * wx
    return out


def resize_matrix(size_in: int, size_out: int) -> np.ndarray:
    """(size_out, size_in) float32: linear resampling of `size_in` samples onto `size_out`, the
    two grids' pixel areas aligned (output pixel k samples input coordinate
    (k + 0.5) * size_in / size_out - 0.5) and the end samples continued beyond the ends: what
    `scipy.ndimage.zoom(..., order=1, mode="nearest", grid_mode=True)` does along one axis."""
    coordinate = (np.arange(size_out) + 0.5) * (size_in / size_out) - 0.5
    low, high, weight = _linear_taps(coordinate, size_in)
    matrix = np.zeros((size_out, size_in), np.float32)
    np.add.at(matrix, (np.arange(size_out), low), 1.0 - weight)
    np.add.at(matrix, (np.arange(size_out), high), weight)
    return matrix


def resize_planes(planes: np.ndarray, out_hw: Sequence[int]) -> np.ndarray:
    """Planes (..., h, w) resampled linearly to (..., H, W) float32, as `resize_matrix` says: two
    matrix products (BLAS), several times faster than `scipy.ndimage.zoom` on the channel-last
    class probabilities of a batch of slices, and equal to it to float32 rounding."""
    planes = np.asarray(planes, np.float32)
    rows = resize_matrix(planes.shape[-2], int(out_hw[0])) @ planes
    return rows @ resize_matrix(planes.shape[-1], int(out_hw[1])).T


def class_map(planes: np.ndarray) -> np.ndarray:
    """`np.argmax(planes, axis=1)` (the first class on a tie) of class planes (n, C, h, w) as
    uint8, by one comparison per class over whole planes (several times faster than numpy's
    argmax along an inner axis)."""
    best = planes[:, 0].copy()
    labels = np.zeros(best.shape, np.uint8)
    for c in range(1, planes.shape[1]):
        better = planes[:, c] > best
        labels[better] = c
        np.maximum(best, planes[:, c], out=best)
    return labels
