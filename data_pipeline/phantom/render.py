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
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import numpy as np
from scipy import ndimage, signal

from data_pipeline.constants import CALCIUM_THRESHOLD_HU
from data_pipeline.phantom import sites
from data_pipeline.phantom.anatomy import (
    ALPHA_HEAD,
    Anatomy,
    Centerline,
    heart_extent,
    rib_drop,
)
from data_pipeline.phantom.plaques import Calcification
from data_pipeline.phantom.sites import SitePreset

HU_AIR = -1000.0
CALCIUM_HU = CALCIUM_THRESHOLD_HU  # Agatston 1990 threshold (one source: data_pipeline.constants)
FOOTPRINT_HU = 50.0              # a calcification "shows" where it adds at least this much
# A reader sees a calcification only where it stands out from the noise: its peak excess must
# reach this many noise sigmas of the scan (`visible_hu`; the Rose criterion asks 3-5).
VISIBLE_SIGMAS = 3.0
CHUNK_SLICES = 8                 # output slices rendered at a time (memory, cache)
# The scanner's reconstruction matrix: a protocol's noise sigma is that of its image at this many
# pixels across the field of view (`noise_sigma_at`).
REFERENCE_MATRIX = 512


@dataclasses.dataclass(frozen=True)
class Protocol:
    """Acquisition and reconstruction of one scan (size independent: the pixel count is not here)."""

    name: str                        # "cac" | "ctac"
    fov_mm: float
    center_xy_mm: tuple[float, float]
    z_first_mm: float                # centre of the first (lowest) slice
    n_slices: int
    spacing_z_mm: float
    thickness_mm: float
    noise_sigma_hu: float            # at the REFERENCE_MATRIX (see `noise_sigma_at`)
    psf_mm: float                    # Gaussian sigma of the reconstruction kernel
    heart_blur_mm: float             # extra edge blur of the beating heart (ungated)
    motion: dict                     # artery -> (unit direction (3,), peak-to-peak amplitude mm)
    slice_phase: np.ndarray          # (n_slices,) cardiac phase offset of each slice, -1..1
    kvp: float
    ecg_gated: bool
    series_description: str
    # Site preset extras (data_pipeline.phantom.sites); the defaults leave the image unchanged.
    contrast: float = 1.0            # factor on positive CT numbers (tube voltage, `kvp_contrast`)
    sharpen: float = 0.0             # edge enhancement gain of the kernel (unsharp mask)
    sharpen_sigma_mm: float = 1.0
    kernel: str | None = None        # DICOM ConvolutionKernel


@dataclasses.dataclass(frozen=True)
class Grid:
    """Voxel centres of a scan (world mm); axes aligned with the world (identity direction)."""

    x: np.ndarray
    y: np.ndarray
    z: np.ndarray
    pixel_mm: float
    spacing_z_mm: float
    thickness_mm: float

    @property
    def shape(self) -> tuple[int, int, int]:
        """(z, y, x) voxel counts."""
        return len(self.z), len(self.y), len(self.x)

    @property
    def spacing_zyx_mm(self) -> tuple[float, float, float]:
        """Spacing (z, y, x) in mm."""
        return self.spacing_z_mm, self.pixel_mm, self.pixel_mm

    @property
    def origin_xyz_mm(self) -> tuple[float, float, float]:
        """World position of voxel (0, 0, 0)."""
        return float(self.x[0]), float(self.y[0]), float(self.z[0])


def make_grid(protocol: Protocol, size: int) -> Grid:
    """The voxel grid of `protocol` at `size` x `size` pixels (the field of view is fixed)."""
    pixel = round(protocol.fov_mm / size, 6)
    cx, cy = protocol.center_xy_mm
    idx = np.arange(size) + 0.5 - size / 2
    z = protocol.z_first_mm + protocol.spacing_z_mm * np.arange(protocol.n_slices)
    return Grid(x=cx + idx * pixel, y=cy + idx * pixel, z=np.round(z, 6), pixel_mm=pixel,
                spacing_z_mm=protocol.spacing_z_mm, thickness_mm=protocol.thickness_mm)


def sample_protocol(name: str, anatomy: Anatomy, rng: np.random.Generator, *,
                    ctac_overlap: bool = False, site: SitePreset | None = None) -> Protocol:
    """Draws the scan parameters of protocol `name` for a patient (independent of image size).

    `site` (data_pipeline.phantom.sites) scales the draws after they are made, so a site's patient
    sees the same random stream as the default's; `ctac_overlap` wins over a site's CTAC thickness.
    """
    u = rng.uniform
    heart = anatomy.heart.center
    z_lo, z_hi = anatomy.z_range
    motion = {}
    if name == "cac":
        # Gated calcium scan: small cardiac field of view, 3 mm contiguous (Agatston 1990).
        fov = u(210, 320)
        center = (heart[0] * 0.6 + u(-10, 10), heart[1] * 0.4 + u(-10, 10))
        thickness = spacing = 3.0
        sigma = u(10, 25)
        psf = u(0.3, 0.45)
        heart_blur = 0.0
        lo, hi = z_lo, z_hi
        phase = np.zeros(0)
        gated = True
    elif name == "ctac":
        # Ungated low-dose attenuation-correction CT: whole-body field of view, thick slices.
        fov = u(460, 560)
        center = (u(-5, 5), anatomy.body_y0 + u(-5, 5))
        if ctac_overlap:
            thickness, spacing = 5.0, 2.5
        else:
            thickness = float(rng.choice([3.0, 4.0, 5.0]))
            spacing = thickness
        sigma = u(40, 90)
        psf = u(0.8, 1.3)
        heart_blur = u(1.5, 3.5)
        lo, hi = z_lo + u(-15, 5), z_hi + u(-5, 15)
        gated = False
        amplitude = {"LM": (2, 4), "LAD": (3, 7), "LCX": (4, 9), "RCA": (6, 12)}
        for artery, (a_lo, a_hi) in amplitude.items():
            direction = rng.normal(size=3)
            direction[2] *= 0.4   # cardiac motion is mostly in-plane
            motion[artery] = (direction / np.linalg.norm(direction), u(a_lo, a_hi))
        phase = None
    else:
        raise ValueError(f"unknown protocol {name!r}; expected 'cac' or 'ctac'")
    acq = (site or sites.SITES[sites.DEFAULT_SITE]).acquisition(name)
    fov *= acq.fov_scale
    sigma *= acq.noise_scale
    psf *= acq.psf_scale
    if acq.thickness_mm is not None and not (name == "ctac" and ctac_overlap):
        thickness = spacing = float(acq.thickness_mm)
    kvp = float(acq.kvp)
    if gated:
        desc = f"CaSc gated {thickness:.1f} mm"
    else:
        desc = f"CTAC ungated low dose {thickness:.1f} mm"
    n = int(np.clip(round((hi - lo) / spacing) + 1, 60 if spacing <= 3 else 36, 100))
    mid = 0.5 * (lo + hi)
    z_first = mid - 0.5 * (n - 1) * spacing
    if phase is None:
        phase = rng.uniform(-1, 1, size=n)
    return Protocol(name=name, fov_mm=fov, center_xy_mm=center, z_first_mm=round(z_first, 3),
                    n_slices=n, spacing_z_mm=spacing, thickness_mm=thickness, noise_sigma_hu=sigma,
                    psf_mm=psf, heart_blur_mm=heart_blur, motion=motion, slice_phase=phase,
                    kvp=kvp, ecg_gated=gated, series_description=desc,
                    contrast=sites.kvp_contrast(kvp), sharpen=float(acq.sharpen),
                    sharpen_sigma_mm=float(acq.sharpen_sigma_mm), kernel=acq.kernel)


# --------------------------------------------------------------------------- primitives

def _occ(sdf, width):
    """Partial-volume occupancy of the inside (sdf < 0) for an edge ramp `width` mm wide."""
    return np.clip(0.5 - sdf / width, 0.0, 1.0)


def _paint(volume, occ, value):
    """Alpha-composites `value` (scalar or array) over `volume` in place with occupancy `occ`."""
    volume += occ * (value - volume)


def _ellipsoid_sdf(u, v, w, radii):
    """Approximate signed distance (mm) to an axis-aligned ellipsoid (exact on the axes)."""
    a, b, c = radii
    k0 = np.sqrt((u / a) ** 2 + (v / b) ** 2 + (w / c) ** 2)
    k1 = np.sqrt((u / (a * a)) ** 2 + (v / (b * b)) ** 2 + (w / (c * c)) ** 2)
    return k0 * (k0 - 1.0) / np.maximum(k1, 1e-9)


def _ellipse_sdf(x, y, a, b):
    """Approximate signed distance (mm) to an ellipse with semi-axes a, b."""
    k0 = np.sqrt((x / a) ** 2 + (y / b) ** 2)
    k1 = np.sqrt((x / (a * a)) ** 2 + (y / (b * b)) ** 2)
    return k0 * (k0 - 1.0) / np.maximum(k1, 1e-9)


def _superellipse_sdf(x, y, a, b, power):
    """Distance along the ray from the centre to |x/a|^p + |y/b|^p = 1 (negative inside)."""
    q = (np.abs(x / a) ** power + np.abs(y / b) ** power) ** (1.0 / power)
    r = np.hypot(x, y)
    return (q - 1.0) * r / np.maximum(q, 1e-9)


def _range(coords: np.ndarray, lo: float, hi: float) -> slice:
    """Index slice of the sorted `coords` within [lo, hi]."""
    return slice(int(np.searchsorted(coords, lo, "left")), int(np.searchsorted(coords, hi, "right")))


def _elliptic_angle(anat: Anatomy, x, y):
    """Elliptical angle around the cavity (0 posterior midline, pi anterior), cavity radius there,
    normalised radius (1 on the inner rib surface)."""
    a, b = anat.cavity_axes
    alpha = np.arctan2(np.abs(x) / a, y / b)
    radius = np.sqrt((a * np.sin(alpha)) ** 2 + (b * np.cos(alpha)) ** 2)
    return alpha, radius, np.sqrt((x / a) ** 2 + (y / b) ** 2)


def _rib_slope_cos(anat: Anatomy, alpha, radius):
    t = np.clip((alpha - ALPHA_HEAD) / (np.pi - ALPHA_HEAD), 1e-6, 1.0)
    d_drop = anat.rib_drop_mm * 1.4 * t ** 0.4 / (np.pi - ALPHA_HEAD)
    return 1.0 / np.sqrt(1.0 + (d_drop / radius) ** 2)


# --------------------------------------------------------------------------- anatomy

@dataclasses.dataclass
class _Static:
    """Per-scan precomputations shared by all chunks (2D maps, index sets)."""

    base: np.ndarray            # (ny, nx) HU of the z-invariant body (skin, fat, muscle, cavity)
    cavity_occ: np.ndarray      # (ny, nx)
    dome_z: np.ndarray          # (ny, nx) diaphragm height
    abdomen_hu: np.ndarray      # (ny, nx)
    band_sdf: np.ndarray        # (ny, nx) mediastinum outside the heart and vessels (incl. spine)
    vert_sdf: np.ndarray        # (ny, nx) vertebral body
    post_sdf: np.ndarray        # (ny, nx) posterior elements
    canal_sdf: np.ndarray       # (ny, nx)
    sternum_sdf: np.ndarray     # (ny, nx)
    rib_iy: np.ndarray          # annulus pixels where ribs can be
    rib_ix: np.ndarray
    rib_alpha: np.ndarray
    rib_dr: np.ndarray
    rib_cos: np.ndarray
    rib_drop: np.ndarray
    rib_radius: np.ndarray
    spine_box: tuple[slice, slice]
    sternum_box: tuple[slice, slice]


def _static_maps(anat: Anatomy, grid: Grid) -> _Static:
    pixel = grid.pixel_mm
    Y, X = grid.y[:, None], grid.x[None, :]
    a, b = anat.body_axes
    yb = Y - anat.body_y0
    base = np.full((len(grid.y), len(grid.x)), HU_AIR, dtype=np.float32)
    body = _superellipse_sdf(X, yb, a, b, anat.body_power)
    _paint(base, _occ(body, pixel), 25.0)                                   # skin
    _paint(base, _occ(body + anat.skin_mm, pixel), anat.hu_fat)              # subcutaneous fat
    _paint(base, _occ(body + anat.skin_mm + anat.fat_mm, pixel), anat.hu_muscle)
    # Paraspinal muscles and the posterior wall are muscle already; the cavity is mediastinal fat
    # (lungs and organs are painted into it per slice).
    ca, cb = anat.cavity_axes
    cavity = _ellipse_sdf(X, Y, ca, cb)
    cavity_occ = _occ(cavity, pixel).astype(np.float32)
    _paint(base, cavity_occ, anat.hu_fat + 15.0)
    xr, yr, topr, rr = anat.dome_right
    xl, yl, topl, rl = anat.dome_left
    dome = np.maximum(topr - ((X - xr) ** 2 + (Y - yr) ** 2) / (2 * rr),
                      topl - ((X - xl) ** 2 + (Y - yl) ** 2) / (2 * rl))
    liver_share = _occ(X - 10.0, 20.0)
    abdomen = liver_share * anat.hu_liver + (1 - liver_share) * (anat.hu_muscle - 10.0)
    vx, vy = anat.vertebra_axes
    vert = _ellipse_sdf(X, Y - anat.spine_y, vx, vy)
    canal_y = anat.spine_y + vy + anat.canal_radius_mm + 2.0
    canal = np.hypot(X, Y - canal_y) - anat.canal_radius_mm
    ring = np.maximum(np.abs(np.hypot(X, Y - canal_y) - anat.canal_radius_mm - 3.0) - 3.0,
                      anat.spine_y + vy - Y)
    spinous = _ellipse_sdf(X, Y - (canal_y + anat.canal_radius_mm + 18.0), 4.0, 16.0)
    transverse = _ellipse_sdf(np.abs(X) - 24.0, Y - canal_y + 2.0, 13.0, 5.0)
    post = np.minimum(np.minimum(ring, spinous), transverse)
    # Central mediastinal band (between sternum and spine) and the spine itself keep lungs out.
    band_y0 = 0.5 * (-cb + anat.spine_y)
    band = _ellipse_sdf(X - 4.0, Y - band_y0, 15.0, 0.5 * (cb + anat.spine_y) + 4.0)
    sa, sb = anat.sternum_axes
    sternum = _ellipse_sdf(X, Y + cb + sb + 1.0, sa, sb)
    alpha, radius, rho = _elliptic_angle(anat, X, Y)
    dr = (rho - 1.0) * radius
    ht, hh = anat.rib_half_mm
    ann = ((dr > -2.0) & (dr < 2 * ht + 4.0) & (alpha > ALPHA_HEAD - 0.2)
           & (alpha < max(anat.cartilage_end_alpha) + 0.1))
    iy, ix = np.nonzero(ann)
    al, rad = alpha[iy, ix], radius[iy, ix]
    return _Static(base=base, cavity_occ=cavity_occ, dome_z=dome.astype(np.float32),
                   abdomen_hu=abdomen.astype(np.float32), band_sdf=band.astype(np.float32),
                   vert_sdf=vert.astype(np.float32), post_sdf=post.astype(np.float32),
                   canal_sdf=canal.astype(np.float32), sternum_sdf=sternum.astype(np.float32),
                   rib_iy=iy, rib_ix=ix, rib_alpha=al, rib_dr=dr[iy, ix], rib_radius=rad,
                   rib_cos=_rib_slope_cos(anat, al, rad), rib_drop=rib_drop(anat, al),
                   spine_box=_box2d(np.minimum(np.minimum(vert, post), canal) < 2 * pixel),
                   sternum_box=_box2d(sternum < 2 * pixel))


def _box2d(mask: np.ndarray) -> tuple[slice, slice]:
    """Bounding (y, x) slices of a 2D mask (an empty pair when the mask is empty)."""
    rows, cols = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
    if len(rows) == 0:
        return slice(0, 0), slice(0, 0)
    return slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)


def _tube_sdf(lines: Sequence[Centerline], grid: Grid, zs: np.ndarray, margin: float,
              out: np.ndarray) -> None:
    """Minimum over spheres along `lines` of (distance - radius), written into `out` (in place)."""
    for line in lines:
        p, r = line.points, line.radii
        reach = r + margin
        keep = (p[:, 2] + reach >= zs[0]) & (p[:, 2] - reach <= zs[-1])
        for (px, py, pz), radius, ext in zip(p[keep], r[keep], reach[keep]):
            zsl = _range(zs, pz - ext, pz + ext)
            ysl = _range(grid.y, py - ext, py + ext)
            xsl = _range(grid.x, px - ext, px + ext)
            if zsl.start >= zsl.stop or ysl.start >= ysl.stop or xsl.start >= xsl.stop:
                continue
            dz2 = ((zs[zsl] - pz) ** 2)[:, None, None]
            dy2 = ((grid.y[ysl] - py) ** 2)[None, :, None]
            dx2 = ((grid.x[xsl] - px) ** 2)[None, None, :]
            d = np.sqrt(dz2 + dy2 + dx2) - radius
            view = out[zsl, ysl, xsl]
            np.minimum(view, d, out=view)


def _interval_sdf(z: np.ndarray, intervals) -> np.ndarray:
    """Signed distance along z to the union of [lo, hi] intervals (negative inside)."""
    lo = np.array([i[0] for i in intervals])[None, :]
    hi = np.array([i[1] for i in intervals])[None, :]
    return np.max(np.stack(np.broadcast_arrays(lo - z[:, None], z[:, None] - hi)), axis=0).min(axis=1)


def _box(grid: Grid, zs: np.ndarray, lo, hi):
    """(z, y, x) index slices of the chunk box [lo, hi] (world mm), or None when empty."""
    box = (_range(zs, lo[2], hi[2]), _range(grid.y, lo[1], hi[1]), _range(grid.x, lo[0], hi[0]))
    return None if any(s.start >= s.stop for s in box) else box


def _tube_group(lines: Sequence[Centerline], grid: Grid, zs: np.ndarray, margin: float):
    """Union-of-spheres SDF of `lines` on their bounding box in the chunk: (box, sdf) or None."""
    pts = np.concatenate([line.points for line in lines])
    rad = np.concatenate([line.radii for line in lines])[:, None] + margin
    box = _box(grid, zs, (pts - rad).min(axis=0), (pts + rad).max(axis=0))
    if box is None:
        return None
    zsl, ysl, xsl = box
    sdf = np.full((zsl.stop - zsl.start, ysl.stop - ysl.start, xsl.stop - xsl.start), 1e3,
                  dtype=np.float32)
    sub = dataclasses.replace(grid, x=grid.x[xsl], y=grid.y[ysl])
    _tube_sdf(lines, sub, zs[zsl], margin, sdf)
    return box, sdf


def _render_chunk(anat: Anatomy, grid: Grid, protocol: Protocol, st: _Static, zs: np.ndarray):
    """HU, heart-sac occupancy and lung occupancy on sub-slices `zs` (ideal, no noise)."""
    pixel = grid.pixel_mm
    nz, ny, nx = len(zs), len(grid.y), len(grid.x)
    zs = zs.astype(np.float32)
    Z = zs[:, None, None]
    vol = np.broadcast_to(st.base, (nz, ny, nx)).copy()
    heart_w = pixel + protocol.heart_blur_mm

    # Diaphragm: below the domes the cavity is abdomen (liver right, spleen/stomach left).
    n_low = int(np.searchsorted(zs, float(st.dome_z.max()) + pixel, "right"))
    below = np.zeros((n_low, ny, nx), dtype=np.float32)
    if n_low:
        below = _occ(Z[:n_low] - st.dome_z, pixel) * st.cavity_occ
        _paint(vol[:n_low], below, st.abdomen_hu)

    # Mediastinum (keeps lungs out): a central band above the heart's middle, the spine, the
    # heart sac with paracardial fat, vessels and airways.
    heart = anat.heart
    med = np.maximum(st.band_sdf, float(heart.center[2]) - Z)
    np.minimum(med, st.vert_sdf - 6.0, out=med)
    ext = np.array([heart_extent(heart, e) for e in np.eye(3)]) + 6.0
    hbox = _box(grid, zs, heart.center - ext, heart.center + ext)
    heart_occ = np.zeros((nz, ny, nx), dtype=np.float32)
    if hbox is not None:
        hz, hy, hx = hbox
        u, v, w = heart.to_local(grid.x[hx].astype(np.float32)[None, None, :],
                                 grid.y[hy].astype(np.float32)[None, :, None], zs[hz][:, None, None])
        sac = _ellipsoid_sdf(u, v, w, heart.radii)
        view = med[hbox]
        np.minimum(view, sac - 4.0, out=view)   # paracardial fat around the sac
    vessels = _tube_group(anat.vessels + (anat.aorta,), grid, zs, 4.0)
    airways = _tube_group(anat.airways, grid, zs, 4.0)
    for group in (vessels, airways):
        if group is not None:
            view = med[group[0]]
            np.minimum(view, group[1] - 3.0, out=view)

    # Lungs: cavity, above the diaphragm, outside the mediastinum.
    lung_occ = 1.0 - _occ(med, pixel)
    lung_occ *= st.cavity_occ
    if n_low:
        lung_occ[:n_low] *= 1.0 - below
    _paint(vol, lung_occ, anat.hu_lung)

    # Airways (wall, then air), vessels.
    if airways is not None:
        view = vol[airways[0]]
        _paint(view, _occ(airways[1] - 1.5, pixel), anat.hu_muscle - 10.0)
        _paint(view, _occ(airways[1], pixel), HU_AIR)
    if vessels is not None:
        _paint(vol[vessels[0]], _occ(vessels[1], pixel), anat.hu_blood)

    # Heart: pericardium line, epicardial fat, myocardium, blood pools, coronary lumens.
    if hbox is not None:
        hv = vol[hbox]
        heart_occ[hbox] = _occ(sac, pixel)
        _paint(hv, _occ(sac, heart_w), 25.0)
        _paint(hv, _occ(sac + 1.2, heart_w), anat.hu_fat)
        _paint(hv, _occ(sac + heart.fat_mm, heart_w), anat.hu_myocardium)
        inner = _occ(sac + heart.fat_mm + heart.wall_mm * 0.5, heart_w)
        for center, radii in (anat.lv_cavity, anat.rv_cavity, anat.atria):
            cav = _ellipsoid_sdf(u - float(center[0]), v - float(center[1]), w - float(center[2]),
                                 radii)
            _paint(hv, np.minimum(_occ(cav, heart_w), inner), anat.hu_blood)
        lumen = np.full(hv.shape, 1e3, dtype=np.float32)
        sub = dataclasses.replace(grid, x=grid.x[hx], y=grid.y[hy])
        _tube_sdf(tuple(anat.coronaries.values()), sub, zs[hz], 2.0, lumen)
        _paint(hv, _occ(lumen, heart_w), anat.hu_blood)
        if vessels is not None:   # the aortic root and pulmonary trunk start inside the sac
            vbox, vsdf = vessels
            inter = tuple(slice(max(a.start, b.start), min(a.stop, b.stop)) for a, b in zip(vbox, hbox))
            if all(s.start < s.stop for s in inter):
                v_local = tuple(slice(i.start - b.start, i.stop - b.start) for i, b in zip(inter, vbox))
                h_local = tuple(slice(i.start - b.start, i.stop - b.start) for i, b in zip(inter, hbox))
                _paint(hv[h_local], _occ(vsdf[v_local], heart_w), anat.hu_blood)

    # Spine: discs, vertebral bodies (cortical shell, cancellous core), posterior elements, canal.
    sy, sx = st.spine_box
    sv = vol[:, sy, sx]
    dzv = _interval_sdf(zs, anat.vertebra_z)[:, None, None].astype(np.float32)
    vert = st.vert_sdf[sy, sx]
    _paint(sv, _occ(np.maximum(vert, -dzv), pixel), 80.0)
    outer = _occ(np.maximum(vert, dzv), pixel)
    inner = _occ(np.maximum(vert + 1.5, dzv + 1.5), pixel)
    sv *= 1.0 - outer
    sv += anat.hu_cancellous * inner + anat.hu_cortical * (outer - inner)
    _paint(sv, _occ(np.maximum(st.post_sdf[sy, sx], dzv - 2.0), pixel), 0.7 * anat.hu_cortical)
    _paint(sv, _occ(st.canal_sdf[sy, sx], pixel), 15.0)
    vol[:, sy, sx] = sv

    # Sternum.
    z_lo, z_hi = anat.sternum_z
    zsl = _range(zs, z_lo - pixel, z_hi + pixel)
    if zsl.start < zsl.stop:
        ty, tx = st.sternum_box
        tv = vol[zsl, ty, tx]
        dzs = np.maximum(z_lo - Z[zsl], Z[zsl] - z_hi)
        sdf = st.sternum_sdf[ty, tx]
        outer = _occ(np.maximum(sdf, dzs), pixel)
        inner = _occ(np.maximum(sdf + 1.2, dzs + 1.2), pixel)
        tv *= 1.0 - outer
        tv += (anat.hu_cancellous + 50.0) * inner + anat.hu_cortical * (outer - inner)
        vol[zsl, ty, tx] = tv

    # Ribs and costal cartilage, on the annulus pixels only.
    _render_ribs(anat, st, zs, vol, pixel)
    return vol, heart_occ, lung_occ


def _render_ribs(anat: Anatomy, st: _Static, zs: np.ndarray, vol: np.ndarray, pixel: float):
    if len(st.rib_iy) == 0:
        return
    ht, hh = anat.rib_half_mm
    rib_z = np.array(anat.rib_z)
    order = np.argsort(rib_z)
    sorted_z = rib_z[order]
    lifted = zs[:, None] + st.rib_drop[None, :]          # (nz, P): z as if the rib were level
    pos = np.clip(np.searchsorted(sorted_z, lifted), 1, len(sorted_z) - 1)
    below, above = sorted_z[pos - 1], sorted_z[pos]
    nearest = np.where(np.abs(lifted - below) < np.abs(lifted - above), pos - 1, pos)
    k = order[nearest]
    dz = (lifted - rib_z[k]) * st.rib_cos[None, :]
    dr = st.rib_dr[None, :] - (ht + 0.5)
    section = _ellipse_sdf(dr, dz, ht, hh)
    marrow = _ellipse_sdf(dr, dz, ht - 1.2, hh - 1.2)
    end = np.array(anat.rib_end_alpha)[k]
    cart_end = np.array(anat.cartilage_end_alpha)[k]
    alpha = st.rib_alpha[None, :]
    along = np.maximum(ALPHA_HEAD - alpha, alpha - cart_end) * st.rib_radius[None, :]
    occ_all = _occ(np.maximum(section, along), pixel)
    bone_share = _occ((alpha - end) * st.rib_radius[None, :], 4.0)
    occ_bone = occ_all * bone_share
    occ_marrow = _occ(np.maximum(marrow, along), pixel) * bone_share
    value = (anat.hu_cancellous * occ_marrow + anat.hu_cortical * (occ_bone - occ_marrow)
             + anat.hu_cartilage * occ_all * (1.0 - bone_share))
    current = vol[:, st.rib_iy, st.rib_ix]
    vol[:, st.rib_iy, st.rib_ix] = current * (1.0 - occ_all) + value


_TEXTURE_STEP_MM = 2.5


@functools.lru_cache(maxsize=2)
def _texture_lattice(seed: int, lo: tuple, shape: tuple) -> np.ndarray:
    """Vessel fraction on a world lattice (z, y, x): where two smooth random fields (about 4.5 mm
    correlation length) are both near zero, i.e. along random tubes. Cached: both protocols of a
    patient sample the same lattice."""
    rng = np.random.default_rng(seed)
    fields = []
    for _ in range(2):
        f = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), 1.8, truncate=3.0)
        fields.append(f / f.std())
    width = 0.3
    return np.exp(-(fields[0] ** 2 + fields[1] ** 2) / (2 * width ** 2)).astype(np.float32)


def _lung_texture(anat: Anatomy, grid: Grid) -> np.ndarray:
    """Vessel fraction (0..1) on the scan grid, from a fixed per-patient world lattice."""
    step = _TEXTURE_STEP_MM
    a, b = anat.cavity_axes
    lo = np.array([-a - 5.0, -b - 5.0, anat.z_range[0] - 30.0])
    hi = np.array([a + 5.0, b + 5.0, anat.z_range[1] + 30.0])
    shape = tuple(int(n) for n in np.ceil((hi - lo) / step) + 1)   # (x, y, z)
    vessel = _texture_lattice(anat.texture_seed, tuple(lo), shape[::-1])

    def taps(coords, lo_, n):
        """Two-tap linear interpolation (indices, weights) from the lattice to `coords`."""
        t = np.clip((coords - lo_) / step, 0, n - 1.000001)
        i0 = np.floor(t).astype(np.intp)
        return i0, (t - i0).astype(np.float32)

    iz, fz = taps(grid.z, lo[2], shape[2])
    iy, fy = taps(grid.y, lo[1], shape[1])
    ix, fx = taps(grid.x, lo[0], shape[0])
    # Separable: z, then x, then y (each a gather of two neighbours and a blend).
    out = vessel[iz] * (1 - fz)[:, None, None] + vessel[iz + 1] * fz[:, None, None]
    out = out[:, :, ix] * (1 - fx) + out[:, :, ix + 1] * fx
    out = out[:, iy, :] * (1 - fy)[:, None] + out[:, iy + 1, :] * fy[:, None]
    return out.astype(np.float32, copy=False)


@dataclasses.dataclass(frozen=True)
class AnatomyImage:
    """The noise-free anatomy of one scan (before the kernel blur), and its masks."""

    hu: np.ndarray           # float32 (z, y, x)
    heart_occ: np.ndarray    # float32 sac occupancy (slice-averaged)


def render_anatomy(anat: Anatomy, grid: Grid, protocol: Protocol) -> AnatomyImage:
    """Renders the anatomy with partial volume and the slice profile (no noise, no calcium)."""
    st = _static_maps(anat, grid)
    nz, ny, nx = grid.shape
    half = grid.spacing_z_mm / 2.0
    per_slice = int(round(2 * grid.thickness_mm / grid.spacing_z_mm))
    if per_slice < 1 or abs(per_slice * half - grid.thickness_mm) > 1e-6:
        raise ValueError(f"thickness {grid.thickness_mm} mm must be a multiple of half the "
                         f"slice spacing {grid.spacing_z_mm} mm")
    hu = np.empty((nz, ny, nx), dtype=np.float32)
    heart = np.empty((nz, ny, nx), dtype=np.float32)
    lung = np.empty((nz, ny, nx), dtype=np.float32)
    first = grid.z[0] - grid.thickness_mm / 2 + half / 2
    for i0 in range(0, nz, CHUNK_SLICES):
        i1 = min(nz, i0 + CHUNK_SLICES)
        n_sub = 2 * (i1 - 1 - i0) + per_slice
        zs = first + half * (2 * i0 + np.arange(n_sub))
        vol, h_occ, l_occ = _render_chunk(anat, grid, protocol, st, zs)
        for target, source in ((hu, vol), (heart, h_occ), (lung, l_occ)):
            acc = source[0:2 * (i1 - i0 - 1) + 1:2].copy()
            for j in range(1, per_slice):
                acc += source[j:j + 2 * (i1 - i0 - 1) + 1:2]
            target[i0:i1] = acc / per_slice
    vessels = _lung_texture(anat, grid)
    hu += lung * vessels * (anat.hu_blood - anat.hu_lung) * 0.9
    if protocol.contrast != 1.0:
        hu = apply_contrast(hu, protocol.contrast)
    return AnatomyImage(hu=hu, heart_occ=heart)


def apply_contrast(hu: np.ndarray, contrast: float) -> np.ndarray:
    """Tube-voltage contrast: positive CT numbers times `contrast`, water (0 HU) and everything
    below it unchanged (see `sites.kvp_contrast`). Applied to noise-free HU before the kernel."""
    return hu + (contrast - 1.0) * np.maximum(hu, 0.0)


# --------------------------------------------------------------------------- kernel and noise

def kernel_sigma_px(protocol: Protocol, grid: Grid) -> float:
    """In-plane Gaussian sigma (pixels) of the reconstruction kernel at this grid."""
    return max(protocol.psf_mm / grid.pixel_mm, 0.5)


def blur(volume: np.ndarray, sigma_px: float) -> np.ndarray:
    """In-plane Gaussian blur (the reconstruction kernel) of a (z, y, x) array."""
    return ndimage.gaussian_filter(volume, sigma=(0.0, sigma_px, sigma_px), mode="nearest")


def sharpen_sigma_px(protocol: Protocol, grid: Grid) -> float:
    """In-plane sigma (pixels) of the edge enhancement's low-pass Gaussian."""
    return max(protocol.sharpen_sigma_mm / grid.pixel_mm, 0.5)


def kernel_radius_px(protocol: Protocol, grid: Grid) -> int:
    """How far (pixels) the reconstruction kernel reaches, as scipy truncates it (4 sigma)."""
    radius = int(4.0 * kernel_sigma_px(protocol, grid) + 0.5)
    if protocol.sharpen:
        radius += int(4.0 * sharpen_sigma_px(protocol, grid) + 0.5)
    return radius


def reconstruct(volume: np.ndarray, protocol: Protocol, grid: Grid, mode: str = "nearest"):
    """The reconstruction kernel, in-plane: a Gaussian point-spread function and, for a sharp
    (edge-enhancing) kernel, an unsharp mask `k + sharpen * (k - G(k))` that overshoots at edges
    as sharp clinical kernels do. Linear, so calcifications can be convolved on their own."""
    sigma = kernel_sigma_px(protocol, grid)
    out = ndimage.gaussian_filter(volume, sigma=(0.0, sigma, sigma), mode=mode)
    if protocol.sharpen:
        s2 = sharpen_sigma_px(protocol, grid)
        low = ndimage.gaussian_filter(out, sigma=(0.0, s2, s2), mode=mode)
        out *= 1.0 + protocol.sharpen
        out -= protocol.sharpen * low
    return out


def noise_gain(protocol: Protocol, grid: Grid) -> float:
    """Standard deviation of reconstructed unit white noise: the root sum of squares of the
    kernel's 2D weights, as scipy applies them (truncated Gaussians)."""
    sigma_px = kernel_sigma_px(protocol, grid)
    if not protocol.sharpen:
        radius = int(4.0 * sigma_px + 0.5)
        taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma_px) ** 2)
        taps /= taps.sum()
        return float(np.sum(taps ** 2))    # separable: sqrt((sum t^2)^2)
    return float(np.sqrt(np.sum(_impulse_response(protocol, grid) ** 2)))


def _impulse_response(protocol: Protocol, grid: Grid) -> np.ndarray:
    """The kernel's 2D weights on `grid`, as `reconstruct` applies them."""
    radius = kernel_radius_px(protocol, grid) + 1
    impulse = np.zeros((1, 2 * radius + 1, 2 * radius + 1), dtype=np.float64)
    impulse[0, radius, radius] = 1.0
    return reconstruct(impulse, protocol, grid, mode="constant")[0]


def _box_weights(width: float) -> np.ndarray:
    """1D weights (summing to 1) of a mean over `width` pixels (>= 1, maybe fractional: the last
    pixel weighs its fraction, so the weights change continuously with the width)."""
    whole = int(np.floor(width))
    part = width - whole
    weights = np.ones(whole + (part > 1e-12))
    if part > 1e-12:
        weights[-1] = part
    return weights / width


# Sub-pixels per reference pixel of the fine grid on which `noise_sigma_at` models the continuous
# noise field.
_NOISE_SUBPIXELS = 8


def noise_sigma_at(protocol: Protocol, grid: Grid) -> float:
    """Standard deviation (HU) of the reconstructed noise of `protocol` on `grid`.

    The protocol's `noise_sigma_hu` is that of the scanner's own reconstruction, REFERENCE_MATRIX
    pixels across the field of view with the protocol's kernel. A coarser rendering of the same
    acquisition (a 128 px image of a 500 mm CTAC field: 4 mm pixels) has that noise field
    averaged over its larger pixels, not the reference's noise pixel by pixel: the field (white
    noise through the kernel) is modelled on a grid `_NOISE_SUBPIXELS` times finer than the
    reference, and the sigma scales with the root of the variance of a pixel-sized box mean,
    this pixel's over the reference pixel's (continuous and monotone in the pixel size). A finer
    rendering keeps `noise_sigma_hu`."""
    ratio = REFERENCE_MATRIX / len(grid.x)      # exact: the field of view is the same
    if ratio <= 1.0:
        return protocol.noise_sigma_hu
    fine = dataclasses.replace(grid, pixel_mm=protocol.fov_mm / (REFERENCE_MATRIX
                                                                  * _NOISE_SUBPIXELS))
    response = _impulse_response(protocol, fine)

    def box_variance(width: float) -> float:
        box = _box_weights(width)
        return float(np.sum(signal.fftconvolve(response, np.outer(box, box)) ** 2))

    return float(protocol.noise_sigma_hu * np.sqrt(
        box_variance(_NOISE_SUBPIXELS * ratio) / box_variance(_NOISE_SUBPIXELS)))


def white_noise_sigma(protocol: Protocol, grid: Grid) -> float:
    """Per-pixel sigma of the white noise before the kernel that gives `noise_sigma_at`."""
    return noise_sigma_at(protocol, grid) / noise_gain(protocol, grid)


def noisy_background(anatomy_hu: np.ndarray, protocol: Protocol, grid: Grid,
                     rng: np.random.Generator) -> np.ndarray:
    """reconstruct(anatomy + white noise), the white noise scaled so the reconstructed noise
    has the protocol's sigma at the reference matrix (`white_noise_sigma`, `noise_sigma_at`)."""
    noise = rng.standard_normal(anatomy_hu.shape, dtype=np.float32)
    noise *= white_noise_sigma(protocol, grid)
    noise += anatomy_hu
    if not protocol.sharpen:
        return blur(noise, kernel_sigma_px(protocol, grid))
    return reconstruct(noise, protocol, grid)


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
    shifted per slice by that slice's cardiac phase.
    """
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
            shift = np.outer(path + 0.3 * phase, motion[0]) * amplitude
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
    delta = dens - occ * anatomy_hu[zsl, ysl, xsl]
    pad = kernel_radius_px(protocol, grid) + 1
    y0, y1 = max(0, ysl.start - pad), min(len(grid.y), ysl.stop + pad)
    x0, x1 = max(0, xsl.start - pad), min(len(grid.x), xsl.stop + pad)
    padded = np.zeros((delta.shape[0], y1 - y0, x1 - x0), dtype=np.float32)
    padded[:, ysl.start - y0:ysl.stop - y0, xsl.start - x0:xsl.stop - x0] = delta
    return Patch(calc.label, (zsl, slice(y0, y1), slice(x0, x1)),
                 reconstruct(padded, protocol, grid, mode="constant"))


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
