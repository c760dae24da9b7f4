"""Noise-free anatomy of a synthetic scan: tissues painted with partial volume on the scan grid.

Steps 1 and 2 of the image formation (`render`): every structure is a signed-distance function
(mm) whose partial-volume occupancy is a one-pixel linear ramp of that distance, painted outer to
inner on sub-slices every half slice spacing and averaged over the slice thickness
(`render_anatomy`); the lungs get a tubular vessel texture from a fixed per-patient world lattice
(`_lung_texture`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from data_pipeline.phantom.acquisition import Grid, Protocol, _range, apply_contrast
from data_pipeline.phantom.anatomy import (
    ALPHA_HEAD,
    Anatomy,
    Centerline,
    heart_extent,
    rib_drop,
)

HU_AIR = -1000.0
CHUNK_SLICES = 8                 # output slices rendered at a time (memory, cache)


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
        # Epicardial fat: a uniform layer, or the grooved anatomy's position-dependent one.
        fat = heart.fat_mm if heart.grooves is None else heart.grooves.fat_at_local(heart, u, v, w)
        _paint(hv, _occ(sac + fat, heart_w), anat.hu_myocardium)
        inner = _occ(sac + fat + heart.wall_mm * 0.5, heart_w)
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
