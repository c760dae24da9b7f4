"""Image formation for the synthetic cohort: the continuous phantom to a CT volume in HU.

Steps, for one patient and one protocol (`Protocol`: gated CAC or ungated low-dose CTAC):
1. Anatomy on a sub-slice grid: every structure is a signed-distance function (mm) and its
   partial-volume occupancy is a one-pixel linear ramp of that distance (the exact box-filter
   coverage of a straight edge), painted outer to inner. The slice sensitivity profile is a box
   over the nominal thickness, sampled by sub-slices every half slice spacing and averaged, so
   overlapping reconstructions (5 mm every 2.5 mm) share sub-slices.
2. Lung vessels: a tubular random texture (where two smooth random fields are both near zero)
   on a fixed per-patient world lattice, interpolated to the scan grid, inside the lungs.
3. Calcifications: each ellipsoid is supersampled in its own small patch (in-plane sub-pixels,
   sub-slices over the thickness and, for CTAC coronary plaques, positions along a cardiac-motion
   path), giving its exact excess over the anatomy it displaces.
4. Reconstruction kernel and noise: the image plus white noise is blurred in-plane by a Gaussian
   point-spread function (plus an unsharp-mask edge enhancement for a site's sharp kernel), so
   the noise is correlated like a real kernel's; the white noise is pre-scaled so that the
   blurred noise has the protocol's standard deviation at the scanner's 512 px matrix, or on a
   coarser one the sigma of that image averaged down to the rendered pixel size. The kernel is
   linear, so each calcification's blurred excess can be added to the blurred anatomy on its own
   (the category design loop in `cohort` re-renders only the plaques). A site's tube voltage
   scales positive CT numbers before the kernel (`apply_contrast`).
5. Labels, as an expert marks them: a calcification is seen when its peak excess reaches 50 HU
   and 3 noise sigmas of the scan (`visible_hu`: a faint plaque in low-dose CTAC adds to the HU
   but cannot be told from the noise, so it is not labelled); a seen calcification's label seeds
   the voxels where its blurred excess is >= 50 HU and the final HU is >= 130 (Agatston 1990);
   each coronary label then covers the whole in-slice 8-connected >= 130 HU region it seeds (the
   lesion a reader clicks, with its blurred rim and touching noise), see `complete_lesions`.

The protocol and grid live in `acquisition`, steps 1-2 in `tissues`, step 4 in `kernel`; this
module renders the calcifications and labels (steps 3 and 5) and re-exports the others' API,
so `render.<name>` is the one place the cohort builder and the tests reach the image formation.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from data_pipeline.constants import CALCIUM_THRESHOLD_HU
from data_pipeline.phantom.acquisition import (
    REFERENCE_MATRIX,
    Grid,
    Protocol,
    _range,
    apply_contrast,
    cardiac_displacement,
    make_grid,
    sample_protocol,
)
from data_pipeline.phantom.devices import Wire
from data_pipeline.phantom.kernel import (
    blur,
    kernel_radius_px,
    kernel_sigma_px,
    noise_gain,
    noise_sigma_at,
    noisy_background,
    reconstruct,
    sharpen_sigma_px,
    white_noise_sigma,
)
from data_pipeline.phantom.plaques import Calcification
from data_pipeline.phantom.tissues import (
    CHUNK_SLICES,
    HU_AIR,
    AnatomyImage,
    _ellipsoid_sdf,  # noqa: F401  (tests/test_phantom.py)
    render_anatomy,
)

__all__ = [
    "CALCIUM_HU", "CHUNK_SLICES", "FOOTPRINT_HU", "HU_AIR", "REFERENCE_MATRIX", "VISIBLE_SIGMAS",
    "AnatomyImage", "Grid", "Patch", "Protocol", "apply_contrast", "blur",
    "calcification_patch", "complete_lesions", "compose", "kernel_radius_px", "kernel_sigma_px",
    "make_grid", "noise_gain", "noise_sigma_at", "noisy_background", "patches_region",
    "reconstruct", "render_anatomy", "sample_protocol", "sharpen_sigma_px", "visible_hu",
    "white_noise_sigma", "wire_patch",
]

CALCIUM_HU = CALCIUM_THRESHOLD_HU  # Agatston 1990 threshold (one source: data_pipeline.constants)
FOOTPRINT_HU = 50.0              # a calcification "shows" where it adds at least this much
# A reader sees a calcification only where it stands out from the noise: its peak excess must
# reach this many noise sigmas of the scan (`visible_hu`; the Rose criterion asks 3-5).
VISIBLE_SIGMAS = 3.0


# --------------------------------------------------------------------------- calcifications

@dataclasses.dataclass(frozen=True)
class Patch:
    """A calcification's blurred excess HU over the anatomy, on a box of the scan grid."""

    label: int
    index: tuple[slice, slice, slice]
    delta: np.ndarray          # float32, blurred

    @functools.cached_property
    def peak(self) -> float:
        """The largest excess (HU) the calcification adds anywhere."""
        return float(self.delta.max()) if self.delta.size else 0.0


def calcification_patch(calc: Calcification, grid: Grid, protocol: Protocol,
                        anatomy_hu: np.ndarray) -> Patch | None:
    """Supersampled partial-volume rendering of one calcification, blurred by the kernel.

    Sub-samples: an in-plane sub-pixel grid (about 0.35 mm), sub-slices every ~0.5 mm over the
    slice thickness (box profile) and, for coronary plaques in ungated scans, 6 positions along
    the artery's motion path (cosine-weighted dwell: the heart rests longest at the extremes),
    shifted per slice by that slice's cardiac phase; or, with `protocol.motion_window`, its
    positions at 6 equal times of that slice's reconstruction window on the cardiac cycle.
    A metal device's `Wire` piece is rendered by `wire_patch`.
    """
    if isinstance(calc, Wire):
        return wire_patch(calc, grid, protocol, anatomy_hu)
    pixel = grid.pixel_mm
    thickness = grid.thickness_mm
    motion = protocol.motion.get(calc.artery) if calc.coronary else None
    amplitude = motion[1] if motion else 0.0
    reach = float(calc.half_mm.max()) + amplitude + pixel
    zsl = _range(grid.z, calc.center[2] - reach - thickness / 2, calc.center[2] + reach + thickness / 2)
    ysl = _range(grid.y, calc.center[1] - reach, calc.center[1] + reach)
    xsl = _range(grid.x, calc.center[0] - reach, calc.center[0] + reach)
    if zsl.start >= zsl.stop or ysl.start >= ysl.stop or xsl.start >= xsl.stop:
        return None
    ss = int(np.clip(np.ceil(pixel / 0.35), 2, 8))
    n_sub_z = int(np.clip(np.ceil(thickness / 0.5), 2, 10))
    offs = (np.arange(ss) + 0.5) / ss - 0.5
    xs = (grid.x[xsl][:, None] + offs[None, :] * pixel).ravel()
    ys = (grid.y[ysl][:, None] + offs[None, :] * pixel).ravel()
    z_offs = ((np.arange(n_sub_z) + 0.5) / n_sub_z - 0.5) * thickness
    if motion:
        k = np.arange(6)
        path = 0.5 * np.cos(np.pi * (k + 0.5) / 6)    # dwell-weighted positions, -0.5..0.5
    else:
        path = np.zeros(1)
    inv = (calc.axes / calc.half_mm[None, :]).astype(np.float64)   # world -> unit-sphere coords
    ny, nx = ysl.stop - ysl.start, xsl.stop - xsl.start
    occ = np.zeros((zsl.stop - zsl.start, ny, nx), dtype=np.float32)
    dens = np.zeros_like(occ)
    for i, iz in enumerate(range(zsl.start, zsl.stop)):
        shift = np.zeros((1, 3))
        if motion:
            phase = float(protocol.slice_phase[iz]) if len(protocol.slice_phase) else 0.0
            if protocol.motion_window is None:
                positions = path + 0.3 * phase
            else:   # the reconstruction window's positions, at 6 equal times
                positions = cardiac_displacement(
                    (phase + 1) / 2 + protocol.motion_window * (k + 0.5) / 6)
            shift = np.outer(positions, motion[0]) * amplitude
        # offsets: (S,) over sub-slices x motion positions
        dzs = (grid.z[iz] + z_offs[:, None] - calc.center[2] - shift[None, :, 2]).ravel()
        dys = (-calc.center[1] - np.broadcast_to(shift[None, :, 1], (n_sub_z, len(path)))).ravel()
        dxs = (-calc.center[0] - np.broadcast_to(shift[None, :, 0], (n_sub_z, len(path)))).ravel()
        px = xs[None, None, :] + dxs[:, None, None]
        py = ys[None, :, None] + dys[:, None, None]
        pz = dzs[:, None, None]
        r2 = np.zeros((len(dzs), len(ys), len(xs)), dtype=np.float32)
        for j in range(3):
            q = px * inv[0, j] + py * inv[1, j] + pz * inv[2, j]
            r2 += q * q
        inside = r2 <= 1.0
        value = np.where(inside, calc.density_hu * (1.0 - 0.3 * r2), 0.0)
        if protocol.contrast != 1.0:
            value = apply_contrast(value, protocol.contrast)
        occ[i] = inside.reshape(len(dzs), ny, ss, nx, ss).mean(axis=(0, 2, 4))
        dens[i] = value.reshape(len(dzs), ny, ss, nx, ss).mean(axis=(0, 2, 4))
    if not occ.any():
        return None
    return _blurred_patch(calc.label, dens - occ * anatomy_hu[zsl, ysl, xsl], (zsl, ysl, xsl),
                          grid, protocol)


def _blurred_patch(label: int, delta: np.ndarray, box, grid: Grid, protocol: Protocol) -> Patch:
    """The Patch of an excess `delta` on the grid box `box` (z, y, x slices): padded in-plane by
    the kernel's reach and reconstructed (blurred) by the protocol's kernel."""
    zsl, ysl, xsl = box
    pad = kernel_radius_px(protocol, grid) + 1
    y0, y1 = max(0, ysl.start - pad), min(len(grid.y), ysl.stop + pad)
    x0, x1 = max(0, xsl.start - pad), min(len(grid.x), xsl.stop + pad)
    padded = np.zeros((delta.shape[0], y1 - y0, x1 - x0), dtype=np.float32)
    padded[:, ysl.start - y0:ysl.stop - y0, xsl.start - x0:xsl.stop - x0] = delta
    return Patch(label, (zsl, slice(y0, y1), slice(x0, x1)),
                 reconstruct(padded, protocol, grid, mode="constant"))


def wire_patch(wire: Wire, grid: Grid, protocol: Protocol, anatomy_hu: np.ndarray) -> Patch | None:
    """Supersampled partial-volume rendering of one metal `Wire` piece (uniform density), blurred
    by the kernel: the same sub-pixels and sub-slices as `calcification_patch`, no motion."""
    pixel = grid.pixel_mm
    thickness = grid.thickness_mm
    reach = wire.radius_mm + pixel
    lo, hi = wire.points.min(axis=0) - reach, wire.points.max(axis=0) + reach
    zsl = _range(grid.z, lo[2] - thickness / 2, hi[2] + thickness / 2)
    ysl = _range(grid.y, lo[1], hi[1])
    xsl = _range(grid.x, lo[0], hi[0])
    if zsl.start >= zsl.stop or ysl.start >= ysl.stop or xsl.start >= xsl.stop:
        return None
    ss = int(np.clip(np.ceil(pixel / 0.35), 2, 8))
    n_sub_z = int(np.clip(np.ceil(thickness / 0.5), 2, 10))
    offs = (np.arange(ss) + 0.5) / ss - 0.5
    xs = (grid.x[xsl][:, None] + offs[None, :] * pixel).ravel()[None, None, :]
    ys = (grid.y[ysl][:, None] + offs[None, :] * pixel).ravel()[None, :, None]
    z_offs = ((np.arange(n_sub_z) + 0.5) / n_sub_z - 0.5) * thickness
    ny, nx = ysl.stop - ysl.start, xsl.stop - xsl.start
    occ = np.zeros((zsl.stop - zsl.start, ny, nx), dtype=np.float32)
    pts = wire.points
    first, last = pts[0], pts[-1]
    n0, n1 = wire.start_normal, wire.end_normal
    for i, iz in enumerate(range(zsl.start, zsl.stop)):
        zs = (grid.z[iz] + z_offs)[:, None, None]
        d2 = np.full((n_sub_z, ys.shape[1], xs.shape[2]), np.inf)
        for a, b in zip(pts[:-1], pts[1:]):
            ab = b - a
            t = np.clip(((xs - a[0]) * ab[0] + (ys - a[1]) * ab[1] + (zs - a[2]) * ab[2])
                        / float(ab @ ab), 0.0, 1.0)
            d2 = np.minimum(d2, (xs - a[0] - t * ab[0]) ** 2 + (ys - a[1] - t * ab[1]) ** 2
                            + (zs - a[2] - t * ab[2]) ** 2)
        inside = ((d2 <= wire.radius_mm ** 2)
                  & ((xs - first[0]) * n0[0] + (ys - first[1]) * n0[1] + (zs - first[2]) * n0[2] >= 0)
                  & ((xs - last[0]) * n1[0] + (ys - last[1]) * n1[1] + (zs - last[2]) * n1[2] < 0))
        occ[i] = inside.reshape(n_sub_z, ny, ss, nx, ss).mean(axis=(0, 2, 4))
    if not occ.any():
        return None
    density = float(wire.density_hu)
    if protocol.contrast != 1.0:
        density = float(apply_contrast(np.float64(density), protocol.contrast))
    return _blurred_patch(wire.label, occ * (density - anatomy_hu[zsl, ysl, xsl]), (zsl, ysl, xsl),
                          grid, protocol)


def visible_hu(protocol: Protocol, grid: Grid) -> float:
    """The peak excess (HU) a calcification needs to be seen, and so labelled, in this scan:
    FOOTPRINT_HU, or VISIBLE_SIGMAS noise sigmas where the noise is larger (low-dose CTAC: a
    faint plaque is there, and adds to the HU, but no reader can tell it from the noise)."""
    return max(FOOTPRINT_HU, VISIBLE_SIGMAS * noise_sigma_at(protocol, grid))


def compose(background: np.ndarray, patches: Sequence[Patch], region=None,
            min_peak_hu: float = FOOTPRINT_HU):
    """Final HU (rounded, int-valued float32) and calcium labels (int16) from the blurred
    background and calcification patches, on the whole grid or a `region` (tuple of slices).

    A voxel's label is that of the calcification adding the most HU there, where it adds at
    least FOOTPRINT_HU and the final HU is >= 130; a calcification whose peak excess is below
    `min_peak_hu` (`visible_hu`) adds its HU but labels nothing.
    """
    if region is None:
        region = tuple(slice(0, n) for n in background.shape)
    hu = background[region].copy()
    best = np.zeros(hu.shape, dtype=np.float32)
    owner = np.zeros(hu.shape, dtype=np.int16)
    starts = [s.start for s in region]
    for patch in patches:
        local = []
        src = []
        for axis, s in enumerate(patch.index):
            lo = max(s.start, region[axis].start)
            hi = min(s.stop, region[axis].stop)
            if lo >= hi:
                break
            local.append(slice(lo - starts[axis], hi - starts[axis]))
            src.append(slice(lo - s.start, hi - s.start))
        else:
            d = patch.delta[tuple(src)]
            hu[tuple(local)] += d
            if patch.peak < min_peak_hu:
                continue
            b = best[tuple(local)]
            o = owner[tuple(local)]
            better = d > b
            b[better] = d[better]
            o[better] = patch.label
    np.round(hu, out=hu)
    np.clip(hu, -1024, 3071, out=hu)
    labels = np.where((best >= FOOTPRINT_HU) & (hu >= CALCIUM_HU), owner, 0).astype(np.int16)
    return hu, complete_lesions(hu, labels)


# 2D 8-connectivity within each axial slice, none between slices: the Agatston lesion definition.
_IN_SLICE_8 = np.zeros((3, 3, 3), dtype=bool)
_IN_SLICE_8[1] = True


def complete_lesions(hu: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Extends coronary labels to the whole lesions an expert would mark.

    A reader marks a lesion by clicking it: the whole 2D 8-connected region at >= 130 HU gets the
    artery's label, including its blurred rim and any noise touching it. The footprint rule of
    `compose` only seeds the labels; each >= 130 HU in-slice component holding coronary seeds
    (labels 1-4) gets the label that most of its seeds carry, on its unlabelled voxels. Components
    whose seeds are mostly non-coronary (5+) are left as they are, and no existing label changes.
    """
    calcium = hu >= CALCIUM_HU
    coronary = (labels >= 1) & (labels <= 4)
    if not coronary.any():
        return labels
    component, count = ndimage.label(calcium, structure=_IN_SLICE_8)
    seeded = (labels > 0) & calcium
    votes = np.zeros((count + 1, int(labels.max()) + 1), dtype=np.int64)
    np.add.at(votes, (component[seeded], labels[seeded]), 1)
    votes[0] = 0  # component id 0 is "below 130 HU"
    winner = votes.argmax(axis=1)
    grow = (labels == 0) & calcium & (winner[component] >= 1) & (winner[component] <= 4)
    out = labels.copy()
    out[grow] = winner[component[grow]]
    return out


def patches_region(patches: Sequence[Patch], shape) -> tuple[slice, slice, slice] | None:
    """The bounding box (slices) of all patches, or None when there are none."""
    if not patches:
        return None
    lo = [min(p.index[a].start for p in patches) for a in range(3)]
    hi = [max(p.index[a].stop for p in patches) for a in range(3)]
    return tuple(slice(max(0, a), min(n, b)) for a, b, n in zip(lo, hi, shape))
