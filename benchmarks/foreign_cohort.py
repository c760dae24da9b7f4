#!/usr/bin/env python
"""An independently written phantom generator, deliberately unlike data_pipeline.phantom, used to
probe how the reference models carry to another generator's scans.

Nothing here is shared with the project's own synthetic cohort: the anatomy, the acquisition model
and the file conventions were written from scratch, so a model trained on the project's phantoms
sees, here, CT from "another scanner at another site". Only the contracts are shared: label codes,
manifest columns, orientation (docs/contracts.md), and the truth score is the project's
`cac_jax.scoring.agatston_score` on the scan as the project's reader reads it back.

Per patient it writes an ECG-gated calcium scan (`<pid>_cac/`, DICOM) and the same patient's
ungated low-dose attenuation-correction CT (`<pid>_ctac/`, DICOM), each with a calcium label map
and a heart (pericardial sac) mask in the series' own geometry, and `manifest.csv` for the cohort.

Model, in short:
- Anatomy is a set of signed-distance shapes in patient coordinates (LPS, mm, carina at z = 0):
  a superellipse torso with subcutaneous fat and muscle, a rib cage cavity filled with lung
  (gravity gradient, branching vessel trees), diaphragm domes over liver/stomach/spleen, a spine of
  vertebrae (cortical shell, trabecular core, discs, posterior elements) with paraspinal muscle,
  24 ribs with costal cartilage, sternum, clavicles, scapulae, optional arms and breasts, trachea,
  bronchi, oesophagus, aorta, pulmonary arteries and veins, venae cavae, and a heart built from
  four ellipsoidal chambers in a per-patient rotated long-axis frame, wrapped in epicardial fat
  (smooth union, so the grooves fill with fat) and a pericardium. The coronaries (LM/LAD in the
  anterior interventricular groove, LCX and RCA in the AV groove) are found by ray-marching the
  chamber surface for the grooves, and run as tapered tubes in the fat.
- Calcium is a cluster of small ellipsoids (spots, nodules, long crescentic segments) rendered on
  a 0.2-0.5 mm sub-grid, integrated over each voxel and the slice sensitivity profile, so partial
  volume is exact; the non-coronary calcium (label 5) is aortic wall plaque, aortic valve and
  mitral annulus calcium. Pacemaker leads and sternal wires are metal, unlabelled.
- Acquisition: Gaussian slice profile (FWHM = thickness), an in-plane MTF (Gaussian with optional
  edge enhancement for sharp kernels), FBP-like correlated noise (NPS ~ f MTF^2, anisotropic,
  non-stationary, correlated across overlapping slices), 12-bit unsigned or 16-bit signed storage,
  a reconstruction circle for large FOVs. The CTAC adds cardiac motion (each slice sees the heart
  at its own phase; calcium is averaged over the half-scan window, so it smears and its peak
  drops), respiratory displacement, blur of the heart, another table height, arms up or down.
- Labels: the voxels at >= 130 HU in the written scan where a lesion contributes; the category
  mix of the gated truth is steered to ~30/25/25/20 % by choosing plaque burdens per patient.

Run: python benchmarks/foreign_cohort.py --out DIR --patients N --size 256 --seed S
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from scipy import fft as sfft
from scipy import ndimage

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
LAD, LCX, RCA, NON_CORONARY = 1, 2, 3, 5
AIR = -1000.0
HU_MIN, HU_MAX = -1024, 3071
CALCIUM_HU = 130.0
# A voxel belongs to a lesion when the lesion adds at least this much to it (after the kernel)
# and the scan reads >= 130 HU there: the lesion's own voxels, its partial volume and blooming.
FOOTPRINT_HU = 20.0
# Target 4-class mix of the gated truth and, per class, (draw low, draw high, hard cap) of the
# plaque burden aimed at (approximate Agatston on the noise-free gated image).
CATEGORY_SHARES = (0.30, 0.25, 0.25, 0.20)
BURDEN = {1: (4.0, 80.0, 96.0), 2: (125.0, 360.0, 390.0), 3: (470.0, 2400.0, 6000.0)}


# --------------------------------------------------------------------------------------------
# small geometry helpers


def _unit(v) -> np.ndarray:
    v = np.asarray(v, dtype=float)
    return v / np.linalg.norm(v)


def _occ(d, w: float) -> np.ndarray:
    """Fraction of a voxel inside a shape whose signed distance (mm, < 0 inside) is `d`."""
    return np.clip(0.5 - np.asarray(d, dtype=np.float32) * np.float32(1.0 / w), 0.0, 1.0)


def _smin(a, b, k: float):
    """Polynomial smooth minimum (smooth union of two signed distances, blend width k mm)."""
    h = np.clip(0.5 + 0.5 * (b - a) / k, 0.0, 1.0)
    return b + (a - b) * h - k * h * (1.0 - h)


def _superellipse(X, Y, cx, cy, a, bf, bb, n: float):
    """Approximate signed distance (f/|grad f|) to a superellipse |dx/a|^n + |dy/b|^n = 1 whose
    half-depth is bf in front (y < cy) and bb behind. Separable powers keep it cheap."""
    dx = np.abs(X - cx) + 1e-3
    dy = Y - cy
    b = np.where(dy < 0, bf, bb)
    ady = np.abs(dy) + 1e-3
    an = np.power(a, -n)
    bn = np.power(b, -n)
    tx = np.power(dx, n) * an
    ty = np.power(ady, n) * bn
    gx = np.power(dx, n - 1) * an
    gy = np.power(ady, n - 1) * bn
    f = tx + ty - 1.0
    g = n * np.sqrt(gx * gx + gy * gy)
    return f / np.maximum(g, 1e-4)


def _ellipsoid_local(qa, qr, qn, c, s):
    """Approximate signed distance to an axis-aligned ellipsoid (in its own frame)."""
    xa = (qa - c[0]) / s[0]
    xr = (qr - c[1]) / s[1]
    xn = (qn - c[2]) / s[2]
    f = xa * xa + xr * xr + xn * xn - 1.0
    g = 2.0 * np.sqrt((xa / s[0]) ** 2 + (xr / s[1]) ** 2 + (xn / s[2]) ** 2)
    return f / np.maximum(g, 1e-3)


def _seg_dist(X, Y, Z, p0, p1):
    d = p1 - p0
    L2 = max(float(d @ d), 1e-9)
    ax, ay, az = X - p0[0], Y - p0[1], Z - p0[2]
    t = np.clip((ax * d[0] + ay * d[1] + az * d[2]) / L2, 0.0, 1.0)
    qx, qy, qz = ax - t * d[0], ay - t * d[1], az - t * d[2]
    return np.sqrt(qx * qx + qy * qy + qz * qz), t


def _resample(points, step: float, smooth_mm: float = 0.0):
    """Polyline resampled every `step` mm, optionally Gaussian-smoothed (end points kept)."""
    p = np.asarray(points, dtype=float)
    seg = np.linalg.norm(np.diff(p, axis=0), axis=1)
    s = np.concatenate([[0.0], np.cumsum(seg)])
    n = max(2, int(math.ceil(s[-1] / step)) + 1)
    si = np.linspace(0.0, s[-1], n)
    out = np.stack([np.interp(si, s, p[:, i]) for i in range(3)], axis=1)
    if smooth_mm > 0 and n > 4:
        sig = smooth_mm / max(si[1] - si[0], 1e-6)
        ends = out[[0, -1]].copy()
        out = ndimage.gaussian_filter1d(out, sig, axis=0, mode="nearest")
        out[[0, -1]] = ends
    return out


def _arc_length(p):
    return np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(p, axis=0), axis=1))])


def _ssp(thickness: float, m: int):
    """Sub-slice offsets and weights of a Gaussian slice sensitivity profile (FWHM = thickness)."""
    if m <= 1:
        return np.zeros(1), np.ones(1)
    offs = ((np.arange(m) + 0.5) / m - 0.5) * 1.2 * thickness
    w = np.exp(-0.5 * (offs / (thickness / 2.3548)) ** 2)
    return offs, w / w.sum()


def _mtf(f, f50: float, enh: float):
    """In-plane MTF of the reconstruction kernel: 0.5 at f50 (cycles/mm); `enh` > 0 gives the
    mid-frequency boost (and PSF overshoot) of a sharp kernel."""
    x = (np.asarray(f) / f50) ** 2
    gamma = 1.0 + math.log2(1.0 + enh)
    return (1.0 + enh * x) * np.exp2(-gamma * x)


def _psf_kernel(pixel: float, f50: float, enh: float, radius: int = 4) -> np.ndarray:
    n = 64
    f = np.hypot(*np.meshgrid(sfft.fftfreq(n, d=pixel), sfft.fftfreq(n, d=pixel), indexing="ij"))
    k = np.real(sfft.fftshift(sfft.ifft2(_mtf(f, f50, enh))))
    c = n // 2
    k = k[c - radius:c + radius + 1, c - radius:c + radius + 1]
    return (k / k.sum()).astype(np.float32)


# --------------------------------------------------------------------------------------------
# the scan grid


@dataclasses.dataclass
class Grid:
    """A scan's canonical grid (z increasing toward the head, y posterior, x left), world mm.
    Rendering happens on `m` sub-slices per slice (the slice profile), in patient coordinates:
    world = patient + shift."""

    n: int
    pixel: float
    centre: tuple[float, float]
    z: np.ndarray            # slice centres, world, increasing
    thickness: float
    shift: np.ndarray        # world = patient + shift
    m: int = 3

    def __post_init__(self):
        half = (self.n - 1) / 2.0
        self.xw = self.centre[0] + (np.arange(self.n) - half) * self.pixel
        self.yw = self.centre[1] + (np.arange(self.n) - half) * self.pixel
        self.offs, self.w = _ssp(self.thickness, self.m)
        self.zw_sub = (self.z[:, None] + self.offs[None, :]).ravel()
        self.px = (self.xw - self.shift[0]).astype(np.float32)
        self.py = (self.yw - self.shift[1]).astype(np.float32)
        self.pz = (self.zw_sub - self.shift[2]).astype(np.float32)
        self.nz = len(self.z)
        self.spacing = float(self.z[1] - self.z[0]) if self.nz > 1 else self.thickness
        self.dz_sub = max(self.thickness * 1.2 / self.m, 0.5)

    @property
    def sub_shape(self):
        return (len(self.pz), self.n, self.n)

    def region(self, lo, hi, offset=None):
        """Sub-slice index box holding the patient-coordinate box [lo, hi] (displaced by
        `offset`), with coordinate arrays Z, Y, X (broadcastable) minus the offset."""
        off = np.zeros(3, np.float32) if offset is None else np.asarray(offset, np.float32)
        pieces = []
        for coords, a, b in ((self.pz - off[2], lo[2], hi[2]), (self.py - off[1], lo[1], hi[1]),
                             (self.px - off[0], lo[0], hi[0])):
            idx = np.flatnonzero((coords >= a) & (coords <= b))
            if idx.size == 0:
                return None
            pieces.append((slice(int(idx[0]), int(idx[-1]) + 1), coords))
        (sz, cz), (sy, cy), (sx, cx) = pieces
        Z = cz[sz][:, None, None]
        Y = cy[sy][None, :, None]
        X = cx[sx][None, None, :]
        return (sz, sy, sx), X, Y, Z

    def full(self, offset=None):
        off = np.zeros(3, np.float32) if offset is None else np.asarray(offset, np.float32)
        return ((slice(None),) * 3, (self.px - off[0])[None, None, :],
                (self.py - off[1])[None, :, None], (self.pz - off[2])[:, None, None])

    def collapse(self, sub: np.ndarray) -> np.ndarray:
        s = sub.reshape(self.nz, self.m, *sub.shape[1:])
        out = s[:, 0] * np.float32(self.w[0])
        for i in range(1, self.m):
            out += s[:, i] * np.float32(self.w[i])
        return out


def _paint(V, sl, occ, hu):
    v = V[sl]
    v += occ * (hu - v)


def _tubes(buf, grid: Grid, pts, radii, offset=None, pad: float = 0.0):
    """Max-accumulates the occupancy of a tapered polyline tube into `buf` (sub-slice grid)."""
    pts = np.asarray(pts, float)
    radii = np.broadcast_to(np.asarray(radii, float), (len(pts),))
    for i in range(len(pts) - 1):
        p0, p1 = pts[i], pts[i + 1]
        r0, r1 = radii[i] + pad, radii[i + 1] + pad
        m = max(r0, r1) + grid.pixel + grid.dz_sub
        reg = grid.region(np.minimum(p0, p1) - m, np.maximum(p0, p1) + m, offset)
        if reg is None:
            continue
        sl, X, Y, Z = reg
        dist, t = _seg_dist(X, Y, Z, p0, p1)
        occ = _occ(dist - (r0 + (r1 - r0) * t), grid.pixel)
        view = buf[sl]
        np.maximum(view, occ, out=view)


# --------------------------------------------------------------------------------------------
# calcium lesions


@dataclasses.dataclass
class Lesion:
    """A calcified lesion: a cluster of ellipsoids (max density where they overlap)."""

    centres: np.ndarray      # (E, 3) patient mm (heart at rest)
    axes: np.ndarray         # (E, 3, 3) rows: unit axes
    semi: np.ndarray         # (E, 3) mm
    dens: np.ndarray         # (E,) HU of the calcium itself
    label: int
    with_heart: bool         # moves with the heart (coronary, valve, annulus)
    amp: np.ndarray          # (3,) cardiac motion amplitude (CTAC)
    kind: str = ""

    @property
    def lo(self):
        return (self.centres - self.semi.max(axis=1)[:, None]).min(axis=0)

    @property
    def hi(self):
        return (self.centres + self.semi.max(axis=1)[:, None]).max(axis=0)


def _render_lesion(les: Lesion, grid: Grid, hs, motion) -> tuple | None:
    """Voxel fraction and calcium mass of a lesion on the scan grid (exact partial volume on a
    fine sub-grid, slice profile, motion averaging). Returns (slices, frac, mass) or None."""
    hs = np.asarray(hs, float) if les.with_heart else np.zeros(3)
    T = grid.thickness
    fine_xy = 0.22 if motion is None else 0.4
    s = max(2, int(math.ceil(grid.pixel / fine_xy)))
    q = max(7, int(round(1.5 * T / (0.3 if motion is None else 0.5))) | 1)
    zoff = np.linspace(-0.75 * T, 0.75 * T, q)
    zw = np.exp(-0.5 * (zoff / (T / 2.3548)) ** 2)
    zw /= zw.sum()
    lo = les.lo + grid.shift + hs
    hi = les.hi + grid.shift + hs
    reach = np.zeros(3) if motion is None else np.abs(les.amp) + motion["resp_amp"]
    lo, hi = lo - reach - 0.5, hi + reach + 0.5
    ks = np.flatnonzero((grid.z >= lo[2] - 0.75 * T) & (grid.z <= hi[2] + 0.75 * T))
    margin = 5
    cols = np.flatnonzero((grid.xw >= lo[0] - grid.pixel) & (grid.xw <= hi[0] + grid.pixel))
    rows = np.flatnonzero((grid.yw >= lo[1] - grid.pixel) & (grid.yw <= hi[1] + grid.pixel))
    if ks.size == 0 or cols.size == 0 or rows.size == 0:
        return None
    r0, r1 = max(rows[0] - margin, 0), min(rows[-1] + margin + 1, grid.n)
    c0, c1 = max(cols[0] - margin, 0), min(cols[-1] + margin + 1, grid.n)
    k0, k1 = int(ks[0]), int(ks[-1]) + 1
    sub = (np.arange(s) + 0.5) / s - 0.5
    yf = (grid.yw[r0:r1, None] + sub[None, :] * grid.pixel).ravel()
    xf = (grid.xw[c0:c1, None] + sub[None, :] * grid.pixel).ravel()
    nr, nc = r1 - r0, c1 - c0
    frac = np.zeros((k1 - k0, nr, nc), np.float32)
    mass = np.zeros((k1 - k0, nr, nc), np.float32)
    # ellipsoid matrices: q' = M (p - c), inside when |q'| <= 1
    M = les.axes / les.semi[:, :, None]
    ext = les.semi.max(axis=1)
    for kk, k in enumerate(range(k0, k1)):
        zf = grid.z[k] + zoff
        if motion is None:
            disps = [np.zeros(3)]
        else:
            disps = motion["disp"](k, les)
        acc_in = np.zeros((q, nr, nc), np.float32)
        acc_d = np.zeros((q, nr, nc), np.float32)
        for dsp in disps:
            cw = les.centres + grid.shift + hs + dsp  # world centres
            dens = np.zeros((q, nr * s, nc * s), np.float32)
            for e in range(len(cw)):
                c, r = cw[e], ext[e]
                iz = np.searchsorted(zf, [c[2] - r, c[2] + r])
                iy = np.searchsorted(yf, [c[1] - r, c[1] + r])
                ix = np.searchsorted(xf, [c[0] - r, c[0] + r])
                if iz[0] >= iz[1] or iy[0] >= iy[1] or ix[0] >= ix[1]:
                    continue
                dz = (zf[iz[0]:iz[1]] - c[2])[:, None, None]
                dy = (yf[iy[0]:iy[1]] - c[1])[None, :, None]
                dx = (xf[ix[0]:ix[1]] - c[0])[None, None, :]
                Me = M[e]
                u0 = Me[0, 0] * dx + Me[0, 1] * dy + Me[0, 2] * dz
                u1 = Me[1, 0] * dx + Me[1, 1] * dy + Me[1, 2] * dz
                u2 = Me[2, 0] * dx + Me[2, 1] * dy + Me[2, 2] * dz
                inside = (u0 * u0 + u1 * u1 + u2 * u2) <= 1.0
                view = dens[iz[0]:iz[1], iy[0]:iy[1], ix[0]:ix[1]]
                np.maximum(view, np.where(inside, np.float32(les.dens[e]), np.float32(0)),
                           out=view)
            d4 = dens.reshape(q, nr, s, nc, s)
            acc_d += d4.mean(axis=(2, 4))
            acc_in += (d4 > 0).mean(axis=(2, 4))
        n_d = float(len(disps))
        frac[kk] = np.tensordot(zw, acc_in, axes=(0, 0)) / n_d
        mass[kk] = np.tensordot(zw, acc_d, axes=(0, 0)) / n_d
    if frac.max() <= 0:
        return None
    return (slice(k0, k1), slice(r0, r1), slice(c0, c1)), frac, mass


# --------------------------------------------------------------------------------------------
# the patient


HEART_CHAMBERS = {  # heart frame (a: base->apex, r: toward the right, n: anterior), mm at scale 1
    "LV": ((-8.0, -9.0, -3.0), (60.0, 31.0, 31.0)),
    "RV": ((-16.0, 14.0, 12.0), (52.0, 26.0, 27.0)),
    "LA": ((-58.0, -6.0, -20.0), (22.0, 28.0, 19.0)),
    "RA": ((-52.0, 27.0, -6.0), (24.0, 21.0, 23.0)),
}
CAVITY = {"LV": ((-6.0, -9.0, -3.0), (52.0, 20.5, 20.5)),
          "RV": ((-16.0, 16.5, 14.5), (48.0, 21.5, 22.5)),
          "LA": ((-58.0, -6.0, -20.0), (19.5, 25.5, 16.5)),
          "RA": ((-52.0, 27.0, -6.0), (22.0, 19.0, 21.0))}


class Patient:
    """One synthetic patient: anatomy drawn from `rng`, rendered into any scan grid."""

    def __init__(self, rng: np.random.Generator, pid: str):
        r = rng
        self.pid = pid
        self.sex = "F" if r.random() < 0.45 else "M"
        self.age = int(r.integers(40, 87))
        male = self.sex == "M"
        old = (self.age - 40) / 46.0
        self.a0 = r.uniform(150, 186) if male else r.uniform(138, 172)
        self.bf0 = r.uniform(102, 136) if male else r.uniform(94, 128)
        self.bb0 = self.bf0 * r.uniform(0.9, 1.02)
        self.n_body = r.uniform(2.0, 2.7)
        self.n_cav = r.uniform(2.0, 2.4)
        self.shoulder = r.uniform(0.03, 0.12)
        fat = min(r.uniform(4, 40), 0.25 * self.a0)
        self.fat_lat, self.fat_front, self.fat_back = fat, min(fat * r.uniform(0.5, 0.9),
                                                               0.2 * self.bf0), \
            min(fat * r.uniform(0.5, 0.9), 0.2 * self.bb0)
        self.muscle = r.uniform(8, 18)
        self.hu_fat = r.uniform(-118, -88)
        self.hu_medfat = self.hu_fat + r.uniform(-5, 12)
        self.hu_muscle = r.uniform(38, 58)
        self.hu_lung = r.uniform(-880, -815)
        self.lung_grad = r.uniform(15, 60)
        self.hu_blood = r.uniform(24, 46)
        self.hu_myo = self.hu_blood + r.uniform(2, 14)
        self.hu_epi = r.uniform(-112, -82)
        self.hu_peri = r.uniform(10, 40)
        self.hu_liver = r.uniform(48, 68) if r.random() > 0.12 else r.uniform(0, 35)
        self.hu_cort = r.uniform(950, 1450) * (1.0 - 0.15 * old)
        self.hu_trab = r.uniform(170, 320) * (1.0 - 0.35 * old)
        self.hu_cart = r.uniform(70, 140)
        self.breasts = (not male and r.random() < 0.9) or (male and r.random() < 0.1)
        self.z_inlet = r.uniform(58, 78)
        self.rng_seed = int(r.integers(0, 2**31 - 1))
        self._dome = (r.uniform(-4, 6), r.uniform(8, 24))   # left dome vs heart, right vs left
        self.stomach_air = r.random() < 0.6
        # spine: straight in x, mild kyphosis in y
        self.rx_vb, self.ry_vb = r.uniform(17, 22), r.uniform(14, 18)
        self.spine_depth = r.uniform(18, 28)
        self._place_spine()
        self.kyph = r.uniform(3, 12)
        self.level_h = r.uniform(22, 27)
        self.disc = r.uniform(4.5, 7.0)
        self.z_t1 = r.uniform(115, 135)
        self.tr_gap = r.uniform(14, 22)
        self._build_heart(r, old)
        self.y_tr = self.y_vb0 - self.ry_vb - self.tr_gap   # trachea / carina
        self._build_vessels(r, old)
        self._build_arteries(r)
        self._build_lung_trees(r)
        self._build_ribs(r)
        self._build_noncoronary(r, old)
        self._build_metal(r)

    # ---- torso outline --------------------------------------------------------------------
    def body_abc(self, z):
        up = 0.5 * (1 + np.tanh((z - 55) / 30))
        low = np.clip((-z - 150) / 120, 0, 1)
        a = self.a0 * (1 + self.shoulder * up - 0.05 * low)
        bf = self.bf0 * (1 - 0.06 * up + 0.03 * low)
        bb = self.bb0 * (1 - 0.03 * up)
        return a, bf, bb

    def muscle_abc(self, z):
        a, bf, bb = self.body_abc(z)
        return a - self.fat_lat, bf - self.fat_front, bb - self.fat_back

    def cavity_abc(self, z):
        a, bf, bb = self.muscle_abc(z)
        a = a - self.muscle - 7
        bf = bf - 0.8 * self.muscle - 9
        bb = bb - 0.6 * self.muscle - 10
        f = np.sqrt(np.clip(1 - (np.maximum(z - self.z_inlet, 0) / 55.0) ** 2, 0, 1))
        return a * f, bf * f, bb * f

    def y_vb(self, z):
        return self.y_vb0 + self.kyph * (1 - ((z + 60) / 180.0) ** 2)

    def cavity_point(self, theta, z, side, out=0.0):
        """Point on the rib cage cavity outline at angle theta (0 = posterior, pi = anterior)."""
        a, bf, bb = (float(v[0]) for v in self.cavity_abc(np.array([z])))
        a, bf, bb = max(a, 25), max(bf, 20), max(bb, 20)
        st, ct = abs(math.sin(theta)), math.cos(theta)
        b = bb if ct > 0 else bf
        n = self.n_cav
        rad = 1.0 / ((st / a) ** n + (abs(ct) / b) ** n) ** (1.0 / n) + out
        return np.array([side * rad * st, rad * ct, z])

    def cavity_sdf_pts(self, P):
        P = np.asarray(P, float)
        a, bf, bb = self.cavity_abc(P[:, 2])
        return _superellipse(P[:, 0], P[:, 1], 0.0, 0.0, a, bf, bb, self.n_cav)

    def _place_spine(self):
        _, _, bbc = self.cavity_abc(np.array([-60.0]))
        self.y_vb0 = float(bbc[0]) - self.spine_depth

    # ---- heart ----------------------------------------------------------------------------
    def _build_heart(self, r, old):
        male = self.sex == "M"
        s = r.uniform(0.86, 1.12) * (1.04 if male else 0.95) * (1 + 0.06 * old)
        az, el = math.radians(r.uniform(30, 58)), math.radians(r.uniform(18, 40))
        roll = math.radians(r.uniform(-14, 14))
        u = np.array([math.cos(el) * math.cos(az), -math.cos(el) * math.sin(az), -math.sin(el)])
        ant = np.array([0.0, -1.0, 0.0])
        e_a = _unit(ant - (ant @ u) * u)
        e_r = _unit(np.cross(u, e_a))
        if e_r[0] > 0:
            e_r = -e_r
        e_r, e_a = math.cos(roll) * e_r + math.sin(roll) * e_a, \
            -math.sin(roll) * e_r + math.cos(roll) * e_a
        self.R = np.column_stack([u, e_r, e_a])     # local (a, r, n) -> patient
        zc = r.uniform(-98, -72)
        xc = r.uniform(10, 32)
        margin = r.uniform(4, 12)
        for _ in range(80):
            spine_front = self.y_vb(zc) - self.ry_vb
            self.s_h = s
            self.ch = {k: (np.array(c) * s, np.array(sm) * s) for k, (c, sm) in
                       HEART_CHAMBERS.items()}
            self.cav = {k: (np.array(c) * s, np.array(sm) * s) for k, (c, sm) in CAVITY.items()}
            lo, hi = self._heart_extent(np.zeros(3))
            _, bfc, _ = self.cavity_abc(np.array([zc]))
            yc = -float(bfc[0]) + margin - lo[1]
            self.c = np.array([xc, yc, zc])
            lo, hi = self._heart_extent(self.c)
            if hi[1] <= spine_front - 8:
                break
            if s > 0.84:
                s *= 0.98
            else:   # a small chest for this heart: a deeper chest instead
                self.bf0 += 2.0
                self.bb0 += 2.0
                self._place_spine()
        self.heart_lo, self.heart_hi = lo, hi
        self.f_epi = r.uniform(1.5, 7.0)
        self.k_epi = r.uniform(10, 20) * s
        self.f_para = r.uniform(1, 14)
        self.root_local = np.array([-60.0, 5.0, 7.0]) * s
        self.root_base = self.c + self.R @ self.root_local
        self.root_dir = _unit(np.array([-0.22, -0.28, 1.0]) + r.normal(0, 0.08, 3))
        self.r_root = r.uniform(13, 16) * (1 + 0.12 * old)
        self.hr = r.uniform(55, 95)

    def _heart_extent(self, c):
        lo, hi = np.full(3, 1e9), np.full(3, -1e9)
        for cl, sm in self.ch.values():
            centre = c + self.R @ cl
            ext = np.sqrt(((self.R * sm[None, :]) ** 2).sum(axis=1))
            lo, hi = np.minimum(lo, centre - ext), np.maximum(hi, centre + ext)
        return lo, hi

    def to_local(self, P):
        return (np.asarray(P, float) - self.c) @ self.R

    def outer_local(self, qa, qr, qn):
        d = None
        for cl, sm in self.ch.values():
            e = _ellipsoid_local(qa, qr, qn, cl, sm)
            d = e if d is None else np.minimum(d, e)
        return d

    def sac_local(self, qa, qr, qn, root=None):
        """Pericardial sac: smooth union of the chambers (and the aortic root), offset by fat."""
        d = None
        for cl, sm in self.ch.values():
            e = _ellipsoid_local(qa, qr, qn, cl, sm)
            d = e if d is None else _smin(d, e, self.k_epi)
        if root is not None:
            d = _smin(d, root, self.k_epi)
        return d - self.f_epi

    def _root_sdf_local(self, qa, qr, qn):
        ra = self.R.T @ self.root_dir
        p0 = self.root_local
        p1 = p0 + ra * 26.0
        dist, _ = _seg_dist(qa, qr, qn, p0, p1)
        return dist - (self.r_root + 2.0)

    def _surface_rho(self, a_vals, phis, centre):
        rho = np.arange(0.0, 110.0, 0.5)
        A = a_vals[:, None, None]
        qr = centre[0] + rho[None, None, :] * np.cos(phis)[None, :, None]
        qn = centre[1] + rho[None, None, :] * np.sin(phis)[None, :, None]
        shape = (len(a_vals), len(phis), len(rho))
        d = self.outer_local(np.broadcast_to(A, shape), np.broadcast_to(qr, shape),
                             np.broadcast_to(qn, shape))
        out = d >= 0
        first = np.argmax(out, axis=2).astype(float)
        bad = ~out.any(axis=2) | ~(d[:, :, 0] < 0)
        res = rho[np.minimum(first.astype(int), len(rho) - 1)]
        res = np.where(bad, np.nan, res)
        return res

    def _push_out(self, P, radius, clearance=0.3):
        """Moves centreline points out of the myocardium (so the vessel runs in the fat)."""
        P = P.copy()
        for _ in range(4):
            q = self.to_local(P)
            d = self.outer_local(q[:, 0], q[:, 1], q[:, 2])
            need = radius + clearance - d
            if need.max() <= 0.05:
                break
            h = 0.3
            g = np.zeros_like(P)
            for i in range(3):
                dq = np.zeros(3)
                dq[i] = h
                qa = self.to_local(P + dq)
                g[:, i] = (self.outer_local(qa[:, 0], qa[:, 1], qa[:, 2]) - d) / h
            g /= np.maximum(np.linalg.norm(g, axis=1, keepdims=True), 1e-6)
            P += np.maximum(need, 0)[:, None] * g
        return P

    def _build_arteries(self, r):
        s = self.s_h
        from_local = lambda q: self.c + np.asarray(q) @ self.R.T  # noqa: E731
        a_av = -46.0 * s
        # AV ring (RCA, LCX): groove = smallest surface radius over a window of a
        phis_r = np.radians(np.arange(100, -131, -4.0))
        phis_l = np.radians(np.arange(120, 300, 4.0))
        a_vals = np.arange(a_av - 12 * s, a_av + 10 * s, 1.0)
        centre = (2.0 * s, 2.0 * s)

        def ring(phis, roff):
            rho = self._surface_rho(a_vals, phis, centre)
            rho = np.where(np.isnan(rho), 1e3, rho)
            ia = np.argmin(rho, axis=0)
            a_star = ndimage.gaussian_filter1d(a_vals[ia].astype(float), 2.0, mode="nearest")
            rr = np.array([np.interp(a_star[j], a_vals, rho[:, j]) for j in range(len(phis))])
            rr = ndimage.gaussian_filter1d(np.where(rr > 500, np.nan, rr), 1.0, mode="nearest")
            rr = np.where(np.isnan(rr), np.nanmedian(rr), rr)
            q = np.stack([a_star, centre[0] + (rr + roff) * np.cos(phis),
                          centre[1] + (rr + roff) * np.sin(phis)], axis=1)
            return from_local(q)

        k = r.uniform(0.85, 1.15)
        self.r_art = {"LM": 2.2 * k, "LAD": (1.9 * k, 0.8 * k), "LCX": (1.7 * k, 0.9 * k),
                      "RCA": (1.95 * k, 1.0 * k)}
        # LAD: the anterior interventricular crease, base to apex
        a_lad = np.arange(a_av + 6 * s, 50 * s, 2.0)
        phis = np.radians(np.arange(55, 175, 2.0))
        rho = self._surface_rho(a_lad, phis, centre)
        rho = np.where(np.isnan(rho), 1e3, rho)
        phi_star = []
        last = math.radians(115)
        for i in range(len(a_lad)):
            row = rho[i]
            j = int(np.argmin(row))
            if 2 < j < len(phis) - 3 and row[j] < 500:
                last = phis[j]
            phi_star.append(last)
        phi_star = ndimage.gaussian_filter1d(np.array(phi_star), 2.0, mode="nearest")
        rr = np.array([np.interp(phi_star[i], phis, np.where(rho[i] > 500, np.nan, rho[i]))
                       for i in range(len(a_lad))])
        rr = np.where(np.isnan(rr), np.nanmedian(rr), rr)
        lad_pts = from_local(np.stack([a_lad, centre[0] + (rr + 2.2) * np.cos(phi_star),
                                       centre[1] + (rr + 2.2) * np.sin(phi_star)], axis=1))
        lad_end = int(len(a_lad) * r.uniform(0.8, 1.0))
        lad_pts = lad_pts[:max(lad_end, 4)]
        # ostia on the aortic root (sinuses ~1 cm above the base)
        up = self.root_dir
        mid = self.root_base + up * r.uniform(8, 13)
        left_dir = _unit(np.array([1.0, 0.3, 0.0]) - (np.array([1.0, 0.3, 0.0]) @ up) * up)
        ant_dir = _unit(np.array([-0.45, -1.0, 0.0]) - (np.array([-0.45, -1.0, 0.0]) @ up) * up)
        lm_ost = mid + left_dir * self.r_root
        rca_ost = mid + ant_dir * self.r_root + up * r.uniform(-2, 4)
        # LM -> bifurcation at the start of the LAD
        bif = lad_pts[0]
        lm_len = np.linalg.norm(bif - lm_ost)
        lm = _resample([lm_ost, lm_ost + left_dir * min(6.0, lm_len / 3), bif], 1.0, 2.0)
        lad = _resample(np.concatenate([lm, lad_pts[1:]]), 1.0, 3.0)
        # LCX: bifurcation -> left AV groove -> posterior (length varies with dominance)
        lcx_ring = ring(phis_l, 2.0)
        dist = np.linalg.norm(lcx_ring - bif, axis=1)
        j0 = int(np.argmin(dist[: len(dist) // 2]))
        j1 = int(len(phis_l) * r.uniform(0.45, 0.95))
        lcx = _resample(np.concatenate([[bif], lcx_ring[j0 + 1:max(j1, j0 + 4)]]), 1.0, 3.0)
        # RCA: right ostium -> right AV groove -> crux (and a short PDA when dominant)
        rca_ring = ring(phis_r, 2.0)
        j1 = int(len(phis_r) * r.uniform(0.7, 1.0))
        rca_pts = [rca_ost, rca_ost + ant_dir * 6.0 - up * 4.0]
        rca = _resample(np.concatenate([rca_pts, rca_ring[1:j1]]), 1.0, 3.0)
        self.arteries = {}
        for name, pts, (r_p, r_d), lab in (("LAD", lad, self.r_art["LAD"], LAD),
                                            ("LCX", lcx, self.r_art["LCX"], LCX),
                                            ("RCA", rca, self.r_art["RCA"], RCA)):
            pts = _resample(pts, 0.5, 1.0)
            sarc = _arc_length(pts)
            rad = r_p + (r_d - r_p) * np.clip(sarc / max(sarc[-1], 1), 0, 1)
            if name == "LAD":
                rad = np.where(sarc < lm_len, np.maximum(rad, self.r_art["LM"]), rad)
            pts = self._push_out(pts, rad)
            sarc = _arc_length(pts)
            tang = np.gradient(pts, axis=0)
            tang /= np.maximum(np.linalg.norm(tang, axis=1, keepdims=True), 1e-6)
            out = pts - self.c
            n1 = out - (out * tang).sum(1, keepdims=True) * tang
            n1 /= np.maximum(np.linalg.norm(n1, axis=1, keepdims=True), 1e-6)
            n2 = np.cross(tang, n1)
            self.arteries[name] = dict(p=pts, r=rad, s=sarc, t=tang, n1=n1, n2=n2, label=lab)
        # enough epicardial fat that every coronary lies inside the sac
        need = []
        root = None
        for a in self.arteries.values():
            q = self.to_local(a["p"])
            root = self._root_sdf_local(q[:, 0], q[:, 1], q[:, 2])
            d = self.sac_local(q[:, 0], q[:, 1], q[:, 2], root) + self.f_epi
            need.append(d + a["r"] + 1.5)
        need = np.concatenate(need)
        self.f_epi = float(max(self.f_epi, np.quantile(need, 0.98)))

    # ---- vessels and airways ----------------------------------------------------------------
    def _build_vessels(self, r, old):
        s = self.s_h
        yv = self.y_vb0
        self.y_spine_front = yv - self.ry_vb
        self.r_desc = r.uniform(10.5, 13.5) * (1 + 0.12 * old)
        x_desc = self.rx_vb + self.r_desc - r.uniform(4, 10)
        y_desc = self.y_spine_front + r.uniform(-2, 6)
        z_arch = r.uniform(18, 38)
        rb = self.root_base
        asc_top = rb + self.root_dir * (z_arch - 18 - rb[2]) / max(self.root_dir[2], 0.5)
        pts = [rb, rb + self.root_dir * 20, asc_top,
               np.array([asc_top[0] + 10, self.y_tr - 18, z_arch]),
               np.array([x_desc - 6, self.y_tr + 4, z_arch + 1]),
               np.array([x_desc, y_desc, z_arch - 22]),
               np.array([x_desc, y_desc, -110]),
               np.array([x_desc - 4, y_desc - 4, -300])]
        self.aorta = _resample(pts, 3.0, 9.0)
        sa = _arc_length(self.aorta)
        r_asc = self.r_root * r.uniform(0.95, 1.15)
        self.aorta_r = np.interp(sa, [0, 25, sa[-1] * 0.35, sa[-1] * 0.5, sa[-1]],
                                 [self.r_root + 1.5, r_asc, r_asc * 0.92, self.r_desc,
                                  self.r_desc * 0.9])
        self.aorta_s = sa
        # pulmonary trunk and arteries
        rvot = self.c + self.R @ (np.array([-46.0, -2.0, 25.0]) * s)
        bif = np.array([8.0 + r.uniform(-4, 6), self.y_tr - 20, r.uniform(-16, -6)])
        self.pa = [(_resample([rvot, rvot + np.array([2, 6, 22]), bif], 3.0, 5.0),
                    r.uniform(12, 15)),
                   (_resample([bif, np.array([42, self.y_tr + 2, bif[2] - 6]),
                               np.array([62, self.y_tr + 14, bif[2] - 22])], 3.0, 4.0),
                    r.uniform(9, 11)),
                   (_resample([bif, np.array([-18, self.y_tr - 8, bif[2] - 8]),
                               np.array([-55, self.y_tr + 2, bif[2] - 18])], 3.0, 4.0),
                    r.uniform(9, 11))]
        ra_c = self.c + self.R @ self.ch["RA"][0]
        la_c = self.c + self.R @ self.ch["LA"][0]
        x_svc = r.uniform(-34, -24)
        self.svc = _resample([np.array([x_svc, self.y_tr - 16, 200]),
                              np.array([x_svc, self.y_tr - 14, ra_c[2] + 25]), ra_c], 3.0, 6.0)
        self.r_svc = r.uniform(8, 11)
        self.ivc = _resample([ra_c, ra_c + np.array([4, 12, -30]),
                              np.array([-14, self.y_spine_front - 12, -320])], 3.0, 8.0)
        self.bcv = _resample([np.array([65, -self.bf0 + 40, self.z_inlet + 30]),
                              np.array([10, self.y_tr - 26, z_arch + 14]),
                              np.array([x_svc, self.y_tr - 16, z_arch + 6])], 3.0, 6.0)
        self.pv = []
        for side, dz in ((1, 10), (1, -12), (-1, 8), (-1, -14)):
            end = np.array([side * r.uniform(45, 58), self.y_tr + r.uniform(4, 16),
                            la_c[2] + dz + r.uniform(-5, 5)])
            self.pv.append(_resample([la_c, la_c + (end - la_c) * 0.5 + np.array([0, 4, 0]),
                                      end], 3.0, 4.0))
        self.r_pv = r.uniform(5, 7.5)
        # arch branches
        ap = self.aorta
        top = ap[np.argmax(ap[:, 2])]
        self.branches = [_resample([top + np.array([dx, dy, 0]), top + np.array([dx * 1.4, dy,
                                    60])], 3.0, 0.0) for dx, dy in ((-12, -6), (2, -2), (14, 4))]
        # airways and oesophagus
        self.x_tr = r.uniform(-6, 6)
        self.bronchi = [
            (_resample([np.array([self.x_tr, self.y_tr, 0]), np.array([-26, self.y_tr + 6, -18]),
                        np.array([-46, self.y_tr + 12, -32])], 2.0, 3.0), r.uniform(6, 7.5)),
            (_resample([np.array([self.x_tr, self.y_tr, 0]), np.array([30, self.y_tr + 8, -30]),
                        np.array([52, self.y_tr + 14, -46])], 2.0, 3.0), r.uniform(5, 6.5))]
        self.r_tr = r.uniform(8, 10.5)
        self.eso_x = r.uniform(4, 12)
        self.eso_air = r.random() < 0.4

    def _build_lung_trees(self, r):
        """Pulmonary vessel trees from each hilum, branching and tapering into the lung."""
        segs = []
        for side in (1, -1):
            hilum = np.array([side * r.uniform(48, 60), self.y_tr + r.uniform(6, 18),
                              r.uniform(-45, -20)])
            stack = []
            for d in ((side * 0.3, -0.1, 1.0), (side * 0.9, 0.0, -0.1), (side * 0.4, 0.5, -0.8),
                      (side * 0.4, -0.6, -0.7), (side * 0.2, 0.9, -0.2), (side * 0.5, -0.8, 0.3),
                      (side * 0.6, 0.4, 0.6), (side * 0.7, 0.1, -0.7), (side * 0.3, 0.6, 0.7)):
                stack.append((hilum, _unit(np.array(d) + r.normal(0, 0.2, 3)),
                              r.uniform(4.0, 6.0), r.uniform(24, 38), 0))
            while stack:
                p, d, rad, length, g = stack.pop()
                p1 = p + d * length
                if self.cavity_sdf_pts(p1[None])[0] > -4:
                    p1 = p + d * length * 0.5
                    if self.cavity_sdf_pts(p1[None])[0] > -4:
                        continue
                segs.append((p, p1, rad, rad * 0.85))
                if rad * 0.72 < 0.75 or g >= 7 or (g > 2 and r.random() < 0.1):
                    continue
                for _ in range(2):
                    axis = _unit(np.cross(d, r.normal(size=3)))
                    ang = math.radians(r.uniform(18, 45))
                    nd = _unit(d * math.cos(ang) + axis * math.sin(ang))
                    stack.append((p1, nd, rad * r.uniform(0.66, 0.8), length * r.uniform(0.7, 0.9),
                                  g + 1))
            # peripheral twigs, pointing away from the hilum
            for _ in range(int(r.integers(150, 260))):
                q = hilum + np.array([side * r.uniform(10, 160), r.uniform(-130, 130),
                                      r.uniform(-150, 120)])
                if self.cavity_sdf_pts(q[None])[0] > -5:
                    continue
                d = _unit(q - hilum + r.normal(0, 25, 3))
                ln = r.uniform(6, 18)
                rad = r.uniform(0.6, 1.4)
                segs.append((q, q + d * ln, rad, rad * 0.8))
        self.lung_segs = segs

    def _build_ribs(self, r):
        self.ribs = []
        self.cart_calc = []
        costal_calc = r.random() < 0.2 + 0.5 * (self.age - 40) / 46
        for side in (1, -1):
            for i in range(12):
                z0 = self.z_t1 - (i + 0.5) * self.level_h + r.uniform(-2, 2)
                if i < 7:
                    th_end, th_bone = math.radians(r.uniform(164, 172)), math.radians(
                        r.uniform(125, 148) if i > 0 else 150)
                elif i < 10:
                    th_end, th_bone = math.radians(r.uniform(140, 160)), math.radians(
                        r.uniform(115, 130))
                else:
                    th_end = th_bone = math.radians(r.uniform(80, 115))
                drop = (45 + 11 * min(i, 6)) * r.uniform(0.85, 1.15) if i > 0 else 28
                ths = np.radians(np.arange(12.0, math.degrees(th_end), 5.0))
                pts = []
                for th in ths:
                    frac = th / math.pi
                    z = z0 - drop * frac ** 1.15 + 3 * math.sin(math.pi * min(frac * 3, 1))
                    pts.append(self.cavity_point(th, z, side, out=4.0))
                head = np.array([side * 16.0, self.y_vb(z0) + self.ry_vb + 6, z0 + 3])
                pts = np.array([head] + pts)
                bone = np.concatenate([[True], ths <= th_bone])
                rad = r.uniform(2.8, 3.4) * (0.85 if i == 0 else 1.0)
                self.ribs.append((pts, bone, rad, r.uniform(2.3, 3.4)))
                nb = int(bone.sum())
                if costal_calc and nb < len(pts) - 1 and r.random() < 0.5:
                    j = int(r.integers(nb - 1, len(pts) - 1))
                    self.cart_calc.append((pts[j:j + 2], rad * r.uniform(0.3, 0.6)))

    def _build_noncoronary(self, r, old):
        """Label-5 calcium: aortic wall plaques, aortic valve, mitral annulus."""
        les = []
        if r.random() < 0.25 + 0.6 * old:
            sa, ap, ar = self.aorta_s, self.aorta, self.aorta_r
            for _ in range(int(r.integers(1, 9))):
                s0 = r.uniform(25, min(sa[-1], 330))
                i = int(np.searchsorted(sa, s0))
                i = min(max(i, 1), len(ap) - 2)
                t = _unit(ap[i + 1] - ap[i - 1])
                n1 = _unit(np.cross(t, [0.3, 0.5, 0.8]))
                n2 = np.cross(t, n1)
                alpha = r.uniform(0, 2 * math.pi)
                ne = int(r.integers(2, 7))
                cs, ax, sm, de = [], [], [], []
                dens = r.uniform(300, 1200)
                for _e in range(ne):
                    al = alpha + r.normal(0, 0.18)
                    radial = math.cos(al) * n1 + math.sin(al) * n2
                    c = ap[i] + t * r.uniform(-4, 4) + radial * ar[i] * r.uniform(0.9, 0.99)
                    circ = np.cross(t, radial)
                    cs.append(c)
                    ax.append(np.stack([t, radial, circ]))
                    sm.append([r.uniform(1.0, 4.0), r.uniform(0.4, 1.1), r.uniform(1.0, 4.0)])
                    de.append(dens * r.uniform(0.8, 1.2))
                les.append(Lesion(np.array(cs), np.array(ax), np.array(sm), np.array(de),
                                  NON_CORONARY, False, np.zeros(3), "aortic wall"))
        if r.random() < 0.08 + 0.3 * old:   # aortic valve
            up = self.root_dir
            n1 = _unit(np.cross(up, [1.0, 0, 0]))
            n2 = np.cross(up, n1)
            for _ in range(int(r.integers(1, 4))):
                al = r.uniform(0, 2 * math.pi)
                radial = math.cos(al) * n1 + math.sin(al) * n2
                c = self.root_base + up * r.uniform(1, 5) + radial * self.r_root * r.uniform(
                    0.3, 0.75)
                ne = int(r.integers(1, 4))
                cs = c + r.normal(0, 1.2, (ne, 3))
                ax = np.stack([np.stack([up, radial, np.cross(up, radial)])] * ne)
                sm = r.uniform(0.7, 2.4, (ne, 3))
                les.append(Lesion(cs, ax, sm, r.uniform(350, 1100, ne), NON_CORONARY, True,
                                  r.normal(0, 2.5, 3), "aortic valve"))
        if r.random() < 0.06 + 0.3 * old:   # mitral annulus: an arc between LA and LV
            s = self.s_h
            ca, cr, cn = -47 * s, -9 * s, -10 * s
            rad = r.uniform(13, 17) * s
            ph0 = r.uniform(180, 240)
            span = r.uniform(40, 170)
            ne = max(3, int(span / 12))
            cs, ax, sm = [], [], []
            for ph in np.radians(np.linspace(ph0, ph0 + span, ne)):
                q = np.array([ca + r.normal(0, 1), cr + rad * math.cos(ph), cn + rad * math.sin(ph)])
                cs.append(self.c + self.R @ q)
                tang = self.R @ np.array([0, -math.sin(ph), math.cos(ph)])
                rad_dir = self.R @ np.array([0, math.cos(ph), math.sin(ph)])
                ax.append(np.stack([tang, rad_dir, self.R[:, 0]]))
                sm.append([r.uniform(2.0, 4.0), r.uniform(1.0, 2.6), r.uniform(1.0, 2.5)])
            les.append(Lesion(np.array(cs), np.array(ax), np.array(sm),
                              r.uniform(300, 1000, len(cs)), NON_CORONARY, True,
                              r.normal(0, 3.5, 3), "mitral annulus"))
        self.noncoronary = les

    def _build_metal(self, r):
        self.metal = []   # (polyline, radius)
        self.pacer_box = None
        if r.random() < 0.06:
            ra_c = self.c + self.R @ self.ch["RA"][0]
            rv_apex = self.c + self.R @ (np.array([28.0, 14.0, 8.0]) * self.s_h)
            dev = np.array([r.uniform(70, 100), -self.bf0 + self.fat_front * 0.5 + 4,
                            self.z_inlet + r.uniform(0, 25)])
            lead = _resample([dev, dev + np.array([-40, 25, 8]), self.svc[2], self.svc[
                len(self.svc) // 2], ra_c, ra_c * 0.5 + rv_apex * 0.5, rv_apex], 2.0, 6.0)
            self.metal.append((lead, 0.9))
            self.pacer_box = (dev, np.array([22.0, 4.0, 18.0]))
        if r.random() < 0.1:
            for k in range(int(r.integers(4, 8))):
                z = -30 - k * r.uniform(16, 22)
                zz = np.array([z])
                _, bfc, _ = self.cavity_abc(zz)
                cy = -float(bfc[0]) - 8.0
                th = np.linspace(0, 2 * math.pi, 25)
                ring = np.stack([22 * np.cos(th), cy + 9 * np.sin(th), z + 0 * th], axis=1)
                self.metal.append((ring, 0.6))

    # ---- lesions ------------------------------------------------------------------------------
    def make_plaque(self, r, kind: str, artery: str) -> Lesion:
        art = self.arteries[artery]
        L_art = art["s"][-1]
        s0 = float(np.clip(r.gamma(1.7, 0.2 * L_art), 3.0, max(L_art - 3, 3.5)))
        alpha0 = r.uniform(0, 2 * math.pi)
        if kind == "spot":
            ne, span, dens0 = int(r.integers(1, 3)), 1.2, math.exp(r.uniform(math.log(300),
                                                                           math.log(1100)))
            semi = lambda: [r.uniform(0.4, 1.1), r.uniform(0.3, 0.8), r.uniform(0.4, 1.0)]  # noqa
        elif kind == "nodule":
            ne, span, dens0 = int(r.integers(2, 5)), 3.0, math.exp(r.uniform(math.log(380),
                                                                           math.log(1400)))
            semi = lambda: [r.uniform(0.8, 2.2), r.uniform(0.6, 1.4), r.uniform(0.8, 2.0)]  # noqa
        else:
            length = r.uniform(6, 22)
            ne, span = int(math.ceil(length / 1.5)), length
            dens0 = math.exp(r.uniform(math.log(350), math.log(1500)))
            semi = lambda: [r.uniform(0.9, 1.8), r.uniform(0.5, 1.2), r.uniform(1.0, 2.6)]  # noqa
        cs, ax, sm, de = [], [], [], []
        for e in range(ne):
            se = s0 + (e / max(ne - 1, 1) - 0.5) * span + r.normal(0, 0.4)
            i = int(np.clip(np.searchsorted(art["s"], se), 0, len(art["s"]) - 1))
            al = alpha0 + r.normal(0, 0.45 if kind == "segment" else 0.3)
            radial = math.cos(al) * art["n1"][i] + math.sin(al) * art["n2"][i]
            t = art["t"][i]
            cs.append(art["p"][i] + radial * art["r"][i] * r.uniform(0.55, 1.05))
            ax.append(np.stack([t, radial, np.cross(t, radial)]))
            sm.append(semi())
            de.append(min(dens0 * r.uniform(0.75, 1.25), 1900.0))
        amp_scale = {"LAD": (2.0, 4.5), "LCX": (3.0, 6.0), "RCA": (4.0, 9.0)}[artery]
        amp = _unit(r.normal(size=3)) * r.uniform(*amp_scale)
        return Lesion(np.array(cs), np.array(ax), np.array(sm), np.array(de), art["label"], True,
                      amp, kind)

    # ---- rendering ----------------------------------------------------------------------------
    def render(self, g: Grid, scan) -> tuple[np.ndarray, np.ndarray]:
        """Background (everything but calcium) on the sub-slice grid; returns the collapsed
        HU volume (pre-kernel) and the heart (sac) occupancy."""
        V = np.full(g.sub_shape, AIR, np.float32)
        w = g.pixel
        hs = scan.hs
        bone_k = scan.bone_factor
        rs = np.random.default_rng(self.rng_seed)
        # table and mattress (scanner coordinates)
        X2 = g.xw[None, :]
        Y2 = g.yw[:, None]
        ytop = scan.table_y - 25.0 * (X2 / 230.0) ** 2
        inside_x = _occ(np.abs(X2) - 230.0, w)
        shell = (_occ(np.abs(Y2 - (ytop + 6.0)) - 6.0, w) * inside_x)[None]
        core = (_occ(np.abs(Y2 - (ytop + 6.0)) - 4.0, w) * inside_x)[None]
        V += shell * (260.0 - V)
        V += core * (-900.0 - V)
        full, X, Y, Z = g.full()
        zc = Z
        a, bf, bb = self.body_abc(zc)
        d_body = _superellipse(X, Y, 0.0, 0.0, a, bf, bb, self.n_body)
        if scan.pad_mm > 0:
            pad = _occ(np.abs(Y - (self.bb0 + scan.pad_mm / 2)) - scan.pad_mm / 2, w) * _occ(
                np.abs(X) - self.a0 * 0.9, w)
            _paint(V, full, pad * (V < -900), -880.0)
        _paint(V, full, _occ(d_body, w), self.hu_fat)
        # arms (down: beside the chest)
        if scan.arms_down:
            for side in (1, -1):
                ax_ = side * (a + 52.0)
                ra = 44.0 + 0 * zc
                reg_occ = _occ(np.hypot(X - ax_, Y - 8.0) - ra, w) * _occ(zc - 120.0, 2.0)
                _paint(V, full, reg_occ, self.hu_fat)
                _paint(V, full, _occ(np.hypot(X - ax_, Y - 8.0) - (ra - 9.0), w) * _occ(
                    zc - 118.0, 2.0), self.hu_muscle)
                hum = _occ(np.hypot(X - ax_, Y - 6.0) - 11.0, w) * _occ(zc - 110.0, 2.0)
                _paint(V, full, hum, 1100.0 * bone_k)
                _paint(V, full, _occ(np.hypot(X - ax_, Y - 6.0) - 7.5, w) * _occ(zc - 105, 2.0),
                       -40.0)
        if self.breasts:
            rb = np.random.default_rng(self.rng_seed + 1)
            for side in (1, -1):
                c = np.array([side * rb.uniform(50, 80), -self.bf0 + rb.uniform(0, 14),
                              self.c[2] + rb.uniform(-5, 25)])
                sm = np.array([rb.uniform(45, 70), rb.uniform(22, 48), rb.uniform(42, 58)])
                reg = g.region(c - sm - 3, c + sm + 3)
                if reg is None:
                    continue
                sl, Xb, Yb, Zb = reg
                d = _ellipsoid_local(Xb, Yb, Zb, c, sm)
                _paint(V, sl, _occ(d, w), self.hu_fat)
                cg = c + np.array([0, sm[1] * 0.25, 0])
                d = _ellipsoid_local(Xb, Yb, Zb, cg, sm * 0.55)
                _paint(V, sl, _occ(d, w) * 0.7, rb.uniform(0, 35))
        # muscle wall
        am, bfm, bbm = self.muscle_abc(zc)
        _paint(V, full, _occ(_superellipse(X, Y, 0.0, 0.0, am, bfm, bbm, self.n_body), w),
               self.hu_muscle)
        # thoracic cavity -> lung (gravity-dependent density, denser in expiration)
        ac, bfc, bbc = self.cavity_abc(zc)
        d_cav = _superellipse(X, Y, 0.0, 0.0, np.maximum(ac, 1.0), np.maximum(bfc, 1.0),
                              np.maximum(bbc, 1.0), self.n_cav)
        d_cav = np.where((ac > 1.0), d_cav, 50.0).astype(np.float32)
        hu_lung = self.hu_lung + scan.lung_shift + self.lung_grad * (Y / self.bb0)
        occ_cav = _occ(d_cav, w)
        _paint(V, full, occ_cav, hu_lung)
        # diaphragm domes and the upper abdomen
        zl = self.heart_lo[2] + hs[2] + self._dome[0]
        zr = zl + self._dome[1]
        ya = -0.25 * self.bf0
        rx, ry = self.a0 * 0.52, self.bf0 * 0.95
        dl = zl - 70.0 * (((X - 45.0) / rx) ** 2 + ((Y - ya) / ry) ** 2)
        dr = zr - 70.0 * (((X + 55.0) / rx) ** 2 + ((Y - ya) / ry) ** 2)
        z_dia = -_smin(-dl, -dr, 20.0)
        occ_ab = occ_cav * _occ(Z - z_dia, g.dz_sub)
        liver_w = _occ(X - (10.0 + 0 * Y), 12.0)
        _paint(V, full, occ_ab, liver_w * self.hu_liver + (1 - liver_w) * 32.0)
        c_st = np.array([62.0, -0.2 * self.bf0, zl - 38.0])
        sm_st = np.array([34.0, 30.0, 32.0])
        reg = g.region(c_st - sm_st, c_st + sm_st, None)
        if reg is not None:
            sl, Xs, Ys, Zs = reg
            d = _ellipsoid_local(Xs, Ys, Zs, c_st, sm_st)
            st_occ = _occ(d, w) * occ_ab[sl]
            lvl = c_st[2] + (sm_st[2] - 9.0 if self.stomach_air else 1e3)
            _paint(V, sl, st_occ, np.where(Zs > lvl, -1000.0, 22.0).astype(np.float32))
        c_sp = np.array([78.0, self.bb0 * 0.55, zl - 55.0])
        sm_sp = np.array([26.0, 44.0, 48.0])
        reg = g.region(c_sp - sm_sp, c_sp + sm_sp)
        if reg is not None:
            sl, Xs, Ys, Zs = reg
            _paint(V, sl, _occ(_ellipsoid_local(Xs, Ys, Zs, c_sp, sm_sp), w) * occ_ab[sl], 46.0)
        del occ_ab, dl, dr
        # paraspinal muscle block
        yv = self.y_vb(zc)
        front = yv - self.ry_vb - 4.0
        back = bbm
        cyb = (front + back) / 2
        ryb = (back - front) / 2
        d_ps = _superellipse(X, Y, 0.0, cyb, 40.0, ryb, ryb, 2.0)
        _paint(V, full, _occ(d_ps, w), self.hu_muscle)
        # mediastinum (fat) = central column smooth-united with the pericardial sac
        lo = np.array([-90.0, -self.bf0 - 5, -400.0])
        hi = np.array([130.0, self.y_spine_front + 5, 400.0])
        reg = g.region(lo, hi)
        if reg is not None:
            sl, Xm, Ym, Zm = reg
            front_m = -self.cavity_abc(Zm)[1]
            cy = (front_m + self.y_spine_front) / 2
            ry = np.maximum((self.y_spine_front - front_m) / 2 + 4, 5.0)
            rxm = 16.0 + 18.0 * (0.5 + 0.5 * np.tanh((Zm + 15.0) / 12.0))
            d_slab = _superellipse(Xm, Ym, 6.0, cy, rxm, ry, ry, 2.0)
            q = self._local_grid(Xm - hs[0], Ym - hs[1], Zm - hs[2])
            root = self._root_sdf_local(*q)
            sac = self.sac_local(*q, root)
            d_med = _smin(d_slab, sac - self.f_para, 14.0)
            d_med = np.maximum(d_med, z_dia[:, sl[1], sl[2]] - Zm - 2.0)
            _paint(V, sl, _occ(d_med, w) * occ_cav[sl], self.hu_medfat)
            del q, root, sac, d_med, d_slab
        del d_cav, d_body, d_ps
        # heart
        sac_occ = np.zeros(g.sub_shape, np.float32)
        lo = self.heart_lo - 25.0
        hi = self.heart_hi + 25.0
        reg = g.region(lo, hi, hs)
        if reg is not None:
            sl, Xh, Yh, Zh = reg
            qa, qr, qn = self._local_grid(Xh, Yh, Zh)
            root = self._root_sdf_local(qa, qr, qn)
            sac = self.sac_local(qa, qr, qn, root)
            # the sac stays inside the rib cage and clear of the spine
            Xp, Yp, Zp = Xh + np.float32(hs[0]), Yh + np.float32(hs[1]), Zh + np.float32(hs[2])
            ac_, bf_, bb_ = self.cavity_abc(Zp)
            d_c = _superellipse(Xp, Yp, 0.0, 0.0, np.maximum(ac_, 1.0), np.maximum(bf_, 1.0),
                                np.maximum(bb_, 1.0), self.n_cav)
            d_v = _superellipse(Xp, Yp, 0.0, self.y_vb(Zp), self.rx_vb + 3.0, self.ry_vb + 3.0,
                                self.ry_vb + 3.0, 2.2)
            sac = np.maximum(sac, np.maximum(d_c + 2.5, -d_v))
            del d_c, d_v
            o_sac = _occ(sac, w)
            sac_occ[sl] = o_sac
            _paint(V, sl, o_sac, self.hu_epi)
            shell = np.clip(o_sac - _occ(sac + 1.3, w), 0, 1)
            _paint(V, sl, shell, self.hu_peri)
            outer = self.outer_local(qa, qr, qn)
            _paint(V, sl, _occ(outer, w), self.hu_myo)
            lv_out = _ellipsoid_local(qa, qr, qn, *self.ch["LV"])
            for name, (cl, sm) in self.cav.items():
                d = _ellipsoid_local(qa, qr, qn, cl, sm)
                if name == "RV":
                    d = np.maximum(d, -lv_out)
                _paint(V, sl, _occ(d, w), self.hu_blood)
            del qa, qr, qn, root, sac, outer, lv_out, o_sac, shell
        # coronaries in a sleeve of fat
        buf = np.zeros(g.sub_shape, np.float32)
        for art in self.arteries.values():
            p, rad = art["p"][::4], art["r"][::4]
            _tubes(buf, g, p, rad, hs, pad=1.6)
        _paint(V, full, buf * sac_occ, self.hu_epi)
        buf[:] = 0
        for art in self.arteries.values():
            _tubes(buf, g, art["p"][::4], art["r"][::4], hs)
        # great vessels (same buffer: blood)
        _tubes(buf, g, self.aorta, self.aorta_r)
        for pts, rad in self.pa:
            _tubes(buf, g, pts, rad)
        _tubes(buf, g, self.svc, self.r_svc)
        _tubes(buf, g, self.ivc, 11.0)
        _tubes(buf, g, self.bcv, 6.0)
        for pts in self.pv:
            _tubes(buf, g, pts, self.r_pv)
        for pts in self.branches:
            _tubes(buf, g, pts, 5.5)
        _paint(V, full, buf, self.hu_blood + 4.0)
        # trachea, bronchi, oesophagus
        buf[:] = 0
        top = np.array([self.x_tr, self.y_tr, 260.0])
        car = np.array([self.x_tr, self.y_tr, 0.0])
        _tubes(buf, g, [top, car], self.r_tr + 2.0)
        for pts, rad in self.bronchi:
            _tubes(buf, g, pts, rad + 1.5)
        eso = np.array([[self.eso_x, self.y_spine_front - 8, 260.0],
                        [self.eso_x, self.y_spine_front - 8, -40.0],
                        [self.eso_x + 14, self.y_spine_front - 14, -200.0]])
        _tubes(buf, g, eso, 8.0)
        _paint(V, full, buf, 38.0)
        buf[:] = 0
        _tubes(buf, g, [top, car], self.r_tr)
        for pts, rad in self.bronchi:
            _tubes(buf, g, pts, rad)
        if self.eso_air:
            _tubes(buf, g, eso[:2], 2.5)
        _paint(V, full, buf, -1000.0)
        # lung vessels (only where there is lung)
        buf[:] = 0
        for p0, p1, r0, r1 in self.lung_segs:
            _tubes(buf, g, [p0, p1], [r0, r1])
        lungness = np.clip((-450.0 - V) / 300.0, 0, 1) * (V > -990)
        _paint(V, full, buf * lungness, 35.0 + rs.uniform(-5, 10))
        del lungness
        # bones
        self._render_spine(V, g, bone_k)
        cort = np.zeros(g.sub_shape, np.float32)
        marrow = np.zeros(g.sub_shape, np.float32)
        cart = np.zeros(g.sub_shape, np.float32)
        for pts, bone, rad, half in self.ribs:   # flat bands: two tubes stacked in z
            nb = int(bone.sum())
            for dz in (-half, half):
                p_ = pts + np.array([0.0, 0.0, dz])
                _tubes(cort, g, p_[:nb], rad)
                _tubes(marrow, g, p_[:nb], rad - 1.1)
                if nb < len(pts):
                    _tubes(cart, g, p_[nb - 1:], rad * 0.9)
        _paint(V, full, cart, self.hu_cart)
        if self.cart_calc:
            cart[:] = 0
            for pts, rad in self.cart_calc:
                _tubes(cart, g, pts, rad)
            _paint(V, full, cart, 520.0 * bone_k)
        _paint(V, full, cort, self.hu_cort * 0.8 * bone_k)
        _paint(V, full, marrow, self.hu_trab * bone_k)
        del cart
        # sternum
        zs_top = self.z_inlet + 30.0
        zs_bot = self.heart_lo[2] + 5.0
        reg = g.region(np.array([-40.0, -self.bf0 - 10, zs_bot - 5]),
                       np.array([40.0, 0.0, zs_top + 5]))
        if reg is not None:
            sl, Xs, Ys, Zs = reg
            bfc_s = self.cavity_abc(np.minimum(Zs, self.z_inlet))[1]
            cy = -bfc_s - 8.0
            rx = 14.0 + 10.0 * np.clip((Zs - (zs_top - 40)) / 40, 0, 1)
            zocc = _occ(np.maximum(Zs - zs_top, zs_bot - Zs), g.dz_sub)
            d = _superellipse(Xs, Ys, 0.0, cy, rx, 7.0, 7.0, 2.0)
            _paint(V, sl, _occ(d, w) * zocc, self.hu_cort * 0.65 * bone_k)
            d = _superellipse(Xs, Ys, 0.0, cy, rx - 1.4, 5.6, 5.6, 2.0)
            _paint(V, sl, _occ(d, w) * zocc, self.hu_trab * 0.9 * bone_k)
        # clavicles and scapulae
        cort[:] = 0
        marrow[:] = 0
        for side in (1, -1):
            _, bfc0, _ = self.cavity_abc(np.array([self.z_inlet]))
            p0 = np.array([side * 22.0, -float(bfc0[0]) - 12, self.z_inlet + 38])
            p1 = np.array([side * self.a0 * 0.75, -float(bfc0[0]) + 25, self.z_inlet + 58])
            _tubes(cort, g, [p0, p1], 6.5)
            _tubes(marrow, g, [p0, p1], 4.5)
        _paint(V, full, cort, self.hu_cort * 0.9 * bone_k)
        _paint(V, full, marrow, self.hu_trab * bone_k)
        for side in (1, -1):
            ang = side * math.radians(28)
            c = np.array([side * self.a0 * 0.56, self.bb0 - self.fat_back - 7, self.z_inlet - 10])
            ex = np.array([math.cos(ang), math.sin(ang), 0.0])
            ey = np.array([-math.sin(ang), math.cos(ang), 0.0])
            sm = np.array([52.0, 2.6, 70.0])
            ext = np.sqrt(((np.stack([ex, ey, [0, 0, 1.0]], 1) * sm) ** 2).sum(1))
            reg = g.region(c - ext, c + ext)
            if reg is None:
                continue
            sl, Xs, Ys, Zs = reg
            dx, dy, dz = Xs - c[0], Ys - c[1], Zs - c[2]
            d = _ellipsoid_local(dx * ex[0] + dy * ex[1], dx * ey[0] + dy * ey[1], dz + 0 * dx,
                                 np.zeros(3), sm)
            _paint(V, sl, _occ(d, w) * (V[sl] > -300), 480.0 * bone_k)
        del cort, marrow
        # metal: pacemaker, leads, sternal wires
        if self.metal or self.pacer_box is not None:
            buf[:] = 0
            for pts, rad in self.metal:
                _tubes(buf, g, pts, rad)
            if self.pacer_box is not None:
                c, sm = self.pacer_box
                reg = g.region(c - sm, c + sm)
                if reg is not None:
                    sl, Xs, Ys, Zs = reg
                    view = buf[sl]
                    np.maximum(view, _occ(_ellipsoid_local(Xs, Ys, Zs, c, sm), w), out=view)
            _paint(V, full, buf, 6000.0)
        del buf
        return g.collapse(V), g.collapse(sac_occ)

    def _local_grid(self, X, Y, Z):
        dx, dy, dz = X - self.c[0], Y - self.c[1], Z - self.c[2]
        R = self.R.astype(np.float32)
        return tuple(dx * R[0, i] + dy * R[1, i] + dz * R[2, i] for i in range(3))

    def _spine_parts(self):
        """Posterior elements of each vertebra as tubes: pedicles, laminae, spinous and
        transverse processes."""
        parts = []
        rx, ry = self.rx_vb, self.ry_vb
        for i in range(-2, 20):
            zc = self.z_t1 - (i + 0.5) * self.level_h
            yv = float(self.y_vb(np.array([zc]))[0])
            yb = yv + 0.9 * ry
            spin_end = np.array([0.0, yb + 40.0, zc - 16.0 - 0.25 * max(i, 0)])
            for sd in (1, -1):
                ped0 = np.array([sd * (rx - 6.0), yb - 4.0, zc + 2.0])
                ped1 = np.array([sd * (rx - 7.0), yb + 8.0, zc + 2.0])
                lam1 = np.array([0.0, yb + 20.0, zc - 1.0])
                tp1 = np.array([sd * (rx + 13.0), yb + 15.0, zc + 4.0])
                parts += [((ped0, ped1), 3.6), ((ped1, lam1), 3.0), ((ped1, tp1), 3.8)]
            parts.append(((np.array([0.0, yb + 20.0, zc - 1.0]), spin_end), 3.4))
        return parts

    def _render_spine(self, V, g: Grid, bone_k):
        w = g.pixel
        lo = np.array([-60.0, self.y_vb0 - self.ry_vb - 20, -400.0])
        hi = np.array([60.0, self.y_vb0 + self.ry_vb + 60, 400.0])
        reg = g.region(lo, hi)
        if reg is None:
            return
        sl, X, Y, Z = reg
        yv = self.y_vb(Z)
        d_body = _superellipse(X, Y, 0.0, yv, self.rx_vb, self.ry_vb, self.ry_vb * 0.9, 2.2)
        _paint(V, sl, _occ(d_body, w), 85.0)                      # discs (continuous column)
        t = (self.z_t1 - Z) / self.level_h
        zdist = np.abs(t - np.floor(t) - 0.5) * self.level_h     # distance from level centre
        hb = (self.level_h - self.disc) / 2.0
        zocc = _occ(zdist - hb, g.dz_sub)
        zocc_in = _occ(zdist - (hb - 1.2), g.dz_sub)
        _paint(V, sl, _occ(d_body, w) * zocc, self.hu_cort * 0.6 * bone_k)
        d_in = _superellipse(X, Y, 0.0, yv, self.rx_vb - 1.3, self.ry_vb - 1.3,
                             self.ry_vb * 0.9 - 1.3, 2.2)
        _paint(V, sl, _occ(d_in, w) * zocc_in, self.hu_trab * bone_k)
        # spinal canal (CSF) behind the body, then the posterior elements
        ycan = yv + 0.9 * self.ry_vb + 9.0
        _paint(V, sl, _occ(np.sqrt(X * X + ((Y - ycan) / 1.1) ** 2) - 7.5, w), 15.0)
        cort = np.zeros(g.sub_shape, np.float32)
        marrow = np.zeros(g.sub_shape, np.float32)
        for (p0, p1), rad in self._spine_parts():
            _tubes(cort, g, [p0, p1], rad)
            _tubes(marrow, g, [p0, p1], rad - 1.2)
        _paint(V, (slice(None),) * 3, cort, self.hu_cort * 0.6 * bone_k)
        _paint(V, (slice(None),) * 3, marrow, self.hu_trab * bone_k)


# --------------------------------------------------------------------------------------------
# acquisition


@dataclasses.dataclass
class Scan:
    protocol: str
    grid: Grid
    hs: np.ndarray
    kvp: int
    bone_factor: float
    f50: float
    enh: float
    kernel: str
    noise_sd: float
    aniso: float
    table_y: float
    pad_mm: float
    arms_down: bool
    lung_shift: float
    circle: float | None
    motion: dict | None
    conv: dict
    extra: dict


def _plan_scans(p: Patient, r: np.random.Generator, size: int, protocols) -> dict:
    """Acquisition parameters of the patient's gated and CTAC scans."""
    scans = {}
    body_back = p.bb0
    if "cac" in protocols:
        fov = r.uniform(200, 260)
        spacing = 3.0 if r.random() < 0.7 else 2.5
        table_y = r.uniform(120, 200)
        pad = r.uniform(0, 25)
        shift = np.array([r.uniform(-15, 15), table_y - pad - body_back, r.uniform(-650, -250)])
        z_top = max(p.root_base[2] + 30, p.heart_hi[2] - 5) + r.uniform(5, 25)
        z_bot = p.heart_lo[2] - r.uniform(6, 22)
        nz = int(math.ceil((z_top - z_bot) / spacing)) + 1
        z = z_bot + shift[2] + np.arange(nz) * spacing
        hc = (p.heart_lo + p.heart_hi) / 2 + shift
        centre = (hc[0] + r.uniform(-12, 12), hc[1] + r.uniform(-12, 12))
        grid = Grid(size, fov / size, centre, z, 3.0, shift, m=3)
        sharp = r.random() < 0.4
        f50 = (r.uniform(0.50, 0.65) if sharp else r.uniform(0.36, 0.46))
        kernel = r.choice(["B46f", "Qr44", "FC18", "SHARP", "XCB-46"] if sharp else
                          ["B35f", "Qr36", "FC12", "STANDARD", "CardiacSTD", "Sa36"])
        scans["cac"] = Scan("cac", grid, np.zeros(3), 120, 1.0, f50,
                            r.uniform(0.1, 0.4) if sharp else r.uniform(0.0, 0.12), str(kernel),
                            r.uniform(15, 30), r.uniform(0.85, 1.18), table_y, pad, False, 0.0,
                            None, None, _conventions(r),
                            dict(phase=int(r.choice([65, 70, 75, 78])), fov=fov))
    if "ctac" in protocols:
        fov = r.uniform(450, 600)
        spacing = float(r.choice([3.0, 3.27, 3.75, 4.0, 5.0]))
        thickness = float(min(5.0, spacing * r.choice([1.0, 1.0, 1.15, 1.33])))
        table_y = r.uniform(100, 220)
        pad = r.uniform(0, 40)
        shift = np.array([r.uniform(-20, 20), table_y - pad - body_back, r.uniform(-900, -300)])
        z_top = r.uniform(40, 120)
        z_bot = p.heart_lo[2] - r.uniform(50, 110)
        nz = int(math.ceil((z_top - z_bot) / spacing)) + 1
        z = z_bot + shift[2] + np.arange(nz) * spacing
        centre = (r.uniform(-10, 10), r.uniform(-10, 10))
        grid = Grid(size, fov / size, centre, z, thickness, shift, m=3)
        kvp = int(r.choice([100, 120, 120, 120, 140]))
        bone_factor = {100: 1.12, 120: 1.0, 140: 0.93}[kvp]
        hs = np.array([r.uniform(-2, 2), r.uniform(-3, 3), r.uniform(0, 12)])
        motion = dict(hr=p.hr * r.uniform(0.95, 1.1), rot=r.uniform(0.5, 0.8),
                      speed=r.uniform(35, 110), phase0=r.uniform(0, 1),
                      resp_amp=r.uniform(1.0, 4.0), resp_period=r.uniform(3.0, 5.5),
                      heart_amp=_unit(r.normal(size=3)) * r.uniform(0.5, 2.5),
                      blur_xy=r.uniform(0.8, 2.2), blur_z=r.uniform(1.0, 3.0), K=5)
        scans["ctac"] = Scan("ctac", grid, hs, kvp, bone_factor, r.uniform(0.13, 0.24), 0.0,
                             str(r.choice(["B19f", "B30s", "Br38", "FC08", "SOFT", "SMOOTH",
                                           "Qr20"])),
                             40.0 + 50.0 * float(r.beta(1.4, 1.6)), r.uniform(0.8, 1.25),
                             table_y, pad, r.random() < 0.3, r.uniform(0, 60),
                             min(fov / 2, 250.0 + r.uniform(0, 40)) if r.random() < 0.85 else None,
                             motion, _conventions(r), dict(fov=fov))
    return scans


def _conventions(r) -> dict:
    return dict(position="FFS" if r.random() < 0.3 else "HFS",
                signed=bool(r.random() < 0.5),
                order=str(r.choice(["asc", "desc", "shuffle"])),
                names=str(r.choice(["instance", "uid", "random"])),
                implicit=bool(r.random() < 0.3),
                pad_value=int(r.choice([-1024, -1024, -2000, -3024])),
                gating_tag=bool(r.random() < 0.6))


def _cardiac_g(ph):
    ph = np.mod(ph, 1.0)
    return np.where(ph < 0.7, np.sin(np.pi * ph / 0.7) ** 2, 0.0)


def _motion_model(scan: Scan):
    """Per slice, the displacements a moving lesion takes during that slice's half-scan."""
    m = scan.motion
    g = scan.grid
    tc = 60.0 / m["hr"]
    t_slice = (g.z - g.z[0]) / m["speed"]
    window = 0.6 * m["rot"]
    taus = np.linspace(0.0, window, m["K"])

    def disp(k, les: Lesion):
        t = t_slice[k] + taus
        card = _cardiac_g(t / tc + m["phase0"])
        resp = m["resp_amp"] * np.sin(2 * np.pi * t / m["resp_period"])
        out = []
        for i in range(len(t)):
            d = les.amp * card[i] if les.with_heart else les.amp * 0.2 * card[i]
            out.append(d + np.array([0.0, 0.3 * resp[i], resp[i]]) * les.with_heart)
        return out

    heart_shift = []
    for k in range(g.nz):
        t = t_slice[k] + taus
        card = _cardiac_g(t / tc + m["phase0"]).mean() - 0.3
        heart_shift.append(m["heart_amp"][:2] * card)
    m["disp"] = disp
    m["heart_shift"] = np.array(heart_shift)
    return m


def _apply_heart_motion(B, sac, scan: Scan):
    """CTAC: the heart (and what is near it) blurred and displaced slice by slice."""
    m = scan.motion
    g = scan.grid
    mask = sac > 0.5
    if not mask.any():
        return B, sac
    zz, yy, xx = np.nonzero(mask)
    pad = int(math.ceil(12.0 / g.pixel))
    pz = int(math.ceil(6.0 / g.spacing))
    sl = (slice(max(zz.min() - pz, 0), zz.max() + pz + 1),
          slice(max(yy.min() - pad, 0), yy.max() + pad + 1),
          slice(max(xx.min() - pad, 0), xx.max() + pad + 1))
    sub = B[sl]
    blurred = ndimage.gaussian_filter(sub, (m["blur_z"] / g.spacing, m["blur_xy"] / g.pixel,
                                            m["blur_xy"] / g.pixel))
    wmask = ndimage.binary_dilation(mask[sl], iterations=max(1, int(round(6.0 / g.pixel))))
    wgt = ndimage.gaussian_filter(wmask.astype(np.float32), (0.5, 1.5, 1.5))
    sac_sub = sac[sl].copy()
    for i, k in enumerate(range(sl[0].start, sl[0].start + sub.shape[0])):
        dxy = m["heart_shift"][k] / g.pixel
        blurred[i] = ndimage.shift(blurred[i], (dxy[1], dxy[0]), order=1, mode="nearest")
        sac_sub[i] = ndimage.shift(sac_sub[i], (dxy[1], dxy[0]), order=1, mode="nearest")
    out = B.copy()
    out[sl] = sub + wgt * (blurred - sub)
    sac_out = sac.copy()
    sac_out[sl] = sac_sub
    return out, sac_out


def _apply_mtf(vol, scan: Scan):
    g = scan.grid
    p = 8
    padded = np.pad(vol, ((0, 0), (p, p), (p, p)), mode="edge")
    n = padded.shape[1]
    fy = sfft.fftfreq(n, d=g.pixel)[:, None]
    fx = sfft.rfftfreq(n, d=g.pixel)[None, :]
    H = _mtf(np.hypot(fx, fy), scan.f50, scan.enh).astype(np.float32)
    out = sfft.irfft2(sfft.rfft2(padded, workers=1) * H, s=(n, n), workers=1)
    return out[:, p:-p, p:-p].astype(np.float32)


def _noise(scan: Scan, rng, p: Patient) -> np.ndarray:
    """Correlated (FBP-like), anisotropic, non-stationary noise, unit SD at the heart."""
    g = scan.grid
    n = g.n
    white = rng.standard_normal((g.nz, n, n), dtype=np.float32)
    fy = sfft.fftfreq(n, d=g.pixel)[:, None]
    fx = sfft.rfftfreq(n, d=g.pixel)[None, :]
    f = np.hypot(fx * scan.aniso, fy / scan.aniso)
    nps = f * _mtf(f, scan.f50, scan.enh) ** 2 + 0.03 * scan.f50 * np.exp(-(f / 0.05) ** 2)
    fyf = sfft.fftfreq(n, d=g.pixel)[:, None]
    fxf = sfft.fftfreq(n, d=g.pixel)[None, :]
    ff = np.hypot(fxf * scan.aniso, fyf / scan.aniso)
    norm = math.sqrt(float(np.mean(ff * _mtf(ff, scan.f50, scan.enh) ** 2
                                   + 0.03 * scan.f50 * np.exp(-(ff / 0.05) ** 2))))
    H = (np.sqrt(nps) / norm).astype(np.float32)
    nz = sfft.irfft2(sfft.rfft2(white, workers=1) * H, s=(n, n), workers=1).astype(np.float32)
    overlap = max(0.0, 1.0 - g.spacing / g.thickness)
    if overlap > 0 and g.nz > 2:
        rho = 0.8 * overlap
        nz = (nz + rho * (np.roll(nz, 1, 0) + np.roll(nz, -1, 0))) / math.sqrt(1 + 2 * rho * rho)
    # non-stationarity: more noise deep in a large body, less in air, more at the shoulders
    X = (g.xw - g.shift[0])[None, :]
    Y = (g.yw - g.shift[1])[:, None]
    body = ((X / p.a0) ** 2 + (Y / p.bf0) ** 2)
    gmap = np.where(body <= 1.0, 0.8 + 0.35 * np.exp(-2.0 * body), 0.55).astype(np.float32)
    hc = p.c + scan.hs
    g0 = 0.8 + 0.35 * math.exp(-2.0 * ((hc[0] / p.a0) ** 2 + (hc[1] / p.bf0) ** 2))
    gmap /= g0
    zf = 1.0 + 0.5 * np.clip((g.z - g.shift[2] - p.z_inlet + 10) / 60.0, 0, 1)
    return nz * gmap[None] * zf[:, None, None].astype(np.float32)


# --------------------------------------------------------------------------------------------
# lesions on a scan, plaque burden, labels


def _lesion_patch(les, scan: Scan, B, Bpsf, kern):
    """A lesion's local contribution after the kernel, and the local pre-noise HU."""
    out = _render_lesion(les, scan.grid, scan.hs, scan.motion)
    if out is None:
        return None
    sl, frac, mass = out
    mass = mass * np.float32(scan.bone_factor)
    delta = mass - frac * B[sl]
    contrib = ndimage.convolve(delta, kern[None], mode="constant")
    return dict(sl=sl, delta=delta, contrib=contrib, hu=Bpsf[sl] + contrib, les=les)


def _patch_score(patch, scan: Scan) -> float:
    from cac_jax.scoring import agatston_score

    c = patch["contrib"]
    thr = FOOTPRINT_HU
    lab = ((c >= thr) & (patch["hu"] >= CALCIUM_HU)).astype(np.int16) * patch["les"].label
    if not lab.any():
        return 0.0
    g = scan.grid
    return float(agatston_score(patch["hu"], lab, (g.spacing, g.pixel, g.pixel)).agatston)


def _choose_plaques(p: Patient, scan: Scan, B, Bpsf, kern, target_cat: int, rng):
    """Adds coronary plaques until the approximate gated score falls in the target category."""
    if target_cat == 0:
        return []
    lo, hi, cap = BURDEN[target_cat]
    floor = {1: 1.0, 2: 101.0, 3: 401.0}[target_cat]
    target = math.exp(rng.uniform(math.log(lo), math.log(hi)))
    chosen, total = [], 0.0
    for _attempt in range(120):
        if total >= target and total > floor * 1.05:
            break
        remaining = target - total
        if remaining < 25:
            kind = rng.choice(["spot", "nodule"], p=[0.7, 0.3])
        elif remaining < 150:
            kind = rng.choice(["spot", "nodule", "segment"], p=[0.2, 0.55, 0.25])
        else:
            kind = rng.choice(["nodule", "segment"], p=[0.4, 0.6])
        artery = str(rng.choice(["LAD", "LCX", "RCA"], p=[0.45, 0.22, 0.33]))
        les = p.make_plaque(rng, str(kind), artery)
        if any(np.linalg.norm(les.centres[:, None] - o["les"].centres[None], axis=2).min()
               < les.semi.max() + o["les"].semi.max() + 2.5 for o in chosen):
            continue
        patch = _lesion_patch(les, scan, B, Bpsf, kern)
        if patch is None:
            continue
        sc = _patch_score(patch, scan)
        if total + sc > cap:
            continue
        if sc == 0 and rng.random() < 0.6:
            continue
        patch["score"] = sc
        chosen.append(patch)
        total += sc
    return chosen


def _label(scan, hu, patches):
    labels = np.zeros(hu.shape, np.uint8)
    best = np.zeros(hu.shape, np.float32)
    for pt in patches:
        sl = pt["sl"]
        c = pt["contrib"]
        thr = FOOTPRINT_HU
        m = (c >= thr) & (hu[sl] >= CALCIUM_HU) & (c > best[sl])
        labels[sl][m] = pt["les"].label
        best[sl][m] = c[m]
    return labels


def _acquire(p: Patient, scan: Scan, rng, target_cat, lesions=None):
    """Renders, adds calcium, applies the kernel and noise. Returns the stored-range HU
    (canonical array), labels, heart mask, and the coronary lesions used."""
    g = scan.grid
    B, sac = p.render(g, scan)
    if scan.motion is not None:
        _motion_model(scan)
        B, sac = _apply_heart_motion(B, sac, scan)
    Bpsf = _apply_mtf(B, scan)
    kern = _psf_kernel(g.pixel, scan.f50, scan.enh)
    if lesions is None:
        patches = _choose_plaques(p, scan, B, Bpsf, kern, target_cat, rng)
        lesions = [pt["les"] for pt in patches]
    else:
        patches = [pt for pt in (_lesion_patch(les, scan, B, Bpsf, kern) for les in lesions)
                   if pt is not None]
    nc = [pt for pt in (_lesion_patch(les, scan, B, Bpsf, kern) for les in p.noncoronary)
          if pt is not None]
    allp = patches + nc
    img = Bpsf
    for pt in allp:
        img[pt["sl"]] += pt["contrib"]
    noise = _noise(scan, rng, p) * np.float32(scan.noise_sd)
    img += noise
    inside = sac >= 0.5
    scan.extra["noise_realized"] = float(noise[inside].std()) if inside.any() else float("nan")
    del noise
    hu = np.clip(np.rint(img), HU_MIN, HU_MAX)
    if scan.circle is not None:
        X = g.xw[None, :]
        Y = g.yw[:, None]
        outside = (X * X + Y * Y) > scan.circle ** 2
        padv = scan.conv["pad_value"] if scan.conv["signed"] else HU_MIN
        hu[:, outside] = padv
    hu = hu.astype(np.int16)
    labels = _label(scan, hu, allp)
    heart = (sac >= 0.5).astype(np.uint8)
    return hu, labels, heart, lesions


# --------------------------------------------------------------------------------------------
# DICOM and label files


def _uid(*parts) -> str:
    return generate_uid(entropy_srcs=["foreign-cohort", *map(str, parts)])


def _write_series(folder: Path, hu: np.ndarray, scan: Scan, p: Patient, seed: int, rng):
    conv = scan.conv
    g = scan.grid
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.iterdir():
        old.unlink()
    nz, ny, nx = hu.shape
    if conv["position"] == "FFS":
        iop = [-1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        arr = hu[:, :, ::-1]
        x_first = g.xw[-1]
    else:
        iop = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        arr = hu
        x_first = g.xw[0]
    if conv["signed"]:
        stored, intercept, bits, prep = arr.astype(np.int16), 0.0, 16, 1
    else:
        stored, intercept, bits, prep = (arr.astype(np.int32) + 1024).astype(np.uint16), \
            -1024.0, 12, 0
    if conv["order"] == "asc":
        inst = np.arange(nz) + 1
    elif conv["order"] == "desc":
        inst = nz - np.arange(nz)
    else:
        inst = rng.permutation(nz) + 1
    key = (seed, p.pid, scan.protocol)
    study, series, frame = _uid(*key, "study"), _uid(*key, "series"), _uid(*key, "for")
    gated = scan.protocol == "cac"
    desc = (str(rng.choice(["CaScore 3.0 {k}", "Calcium Scoring 3mm", "Cardiac CaSc {ph}%",
                            "ECG gated CAC {k}"]))
            if gated else str(rng.choice(["CTAC 5.0 {k}", "CT Attenuation Correction",
                                          "AC CT non-gated", "PET CTAC {k}"])))
    desc = desc.format(k=scan.kernel, ph=scan.extra.get("phase", 75))
    date = f"20{rng.integers(15, 25):02d}{rng.integers(1, 13):02d}{rng.integers(1, 29):02d}"
    mA = int(rng.integers(60, 300) if gated else rng.integers(15, 80))
    for k in range(nz):
        sop = _uid(*key, "sop", k)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
        meta.MediaStorageSOPInstanceUID = sop
        meta.TransferSyntaxUID = ImplicitVRLittleEndian if conv["implicit"] else \
            ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = CT_IMAGE_STORAGE
        ds.SOPInstanceUID = sop
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = series
        ds.FrameOfReferenceUID = frame
        ds.PositionReferenceIndicator = ""
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.PatientName = f"Foreign^{p.pid}"
        ds.PatientID = p.pid
        ds.PatientSex = p.sex
        ds.PatientAge = f"{p.age:03d}Y"
        ds.PatientBirthDate = ""
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = date
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = "101500"
        ds.AccessionNumber = ""
        ds.StudyID = "1"
        ds.ReferringPhysicianName = ""
        ds.Modality = "CT"
        ds.Manufacturer = "Foreign Synthetic CT"
        ds.ManufacturerModelName = "FX-64" if gated else "FX-PET/CT"
        ds.InstitutionName = "Foreign test site"
        ds.BodyPartExamined = "HEART" if gated else "CHEST"
        ds.StudyDescription = "Cardiac calcium" if gated else "PET-CT"
        ds.SeriesDescription = desc
        ds.ProtocolName = desc
        ds.SeriesNumber = 2 if gated else 3
        ds.AcquisitionNumber = 1
        ds.InstanceNumber = int(inst[k])
        ds.PatientPosition = conv["position"]
        ds.KVP = scan.kvp
        ds.SliceThickness = f"{g.thickness:.2f}"
        ds.SpacingBetweenSlices = f"{g.spacing:.3f}"
        ds.DataCollectionDiameter = "500"
        ds.ReconstructionDiameter = f"{scan.extra['fov']:.1f}"
        ds.ConvolutionKernel = scan.kernel
        ds.XRayTubeCurrent = mA
        ds.GantryDetectorTilt = "0"
        ds.TableHeight = f"{scan.table_y:.1f}"
        ds.RotationDirection = "CW"
        if conv["gating_tag"]:
            ds.CardiacSynchronizationTechnique = "PROSPECTIVE" if gated else "NONE"
        if gated:
            ds.NominalPercentageOfCardiacPhase = float(scan.extra.get("phase", 75))
        ds.ImagePositionPatient = [f"{x_first:.4f}", f"{g.yw[0]:.4f}", f"{g.z[k]:.4f}"]
        ds.ImageOrientationPatient = [f"{v:g}" for v in iop]
        ds.SliceLocation = f"{g.z[k]:.4f}"
        ds.PixelSpacing = [f"{g.pixel:.6f}", f"{g.pixel:.6f}"]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = ny, nx
        ds.BitsAllocated = 16
        ds.BitsStored = bits
        ds.HighBit = bits - 1
        ds.PixelRepresentation = prep
        ds.RescaleIntercept = f"{intercept:g}"
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
        ds.WindowCenter = "40" if gated else "50"
        ds.WindowWidth = "400" if gated else "350"
        ds.PixelData = np.ascontiguousarray(stored[k]).tobytes()
        if conv["names"] == "instance":
            name = f"IM{int(inst[k]):05d}.dcm"
        elif conv["names"] == "uid":
            name = f"{sop}.dcm"
        else:
            name = f"{int(rng.integers(0, 10**9)):09d}_{k}"
        ds.save_as(folder / name, enforce_file_format=True)


def _read_back(folder: Path):
    reader = sitk.ImageSeriesReader()
    files = reader.GetGDCMSeriesFileNames(str(folder))
    reader.SetFileNames(files)
    return reader.Execute()


def _to_stored(canon: np.ndarray, img: sitk.Image) -> np.ndarray:
    """Canonical (z up, y back, x left) array -> the array order SimpleITK reads the series in."""
    d = np.array(img.GetDirection()).reshape(3, 3)
    out = canon
    if d[0, 0] < 0:
        out = out[:, :, ::-1]
    if d[1, 1] < 0:
        out = out[:, ::-1, :]
    if d[2, 2] < 0:
        out = out[::-1]
    return np.ascontiguousarray(out)


def _write_like(path: Path, canon: np.ndarray, img: sitk.Image):
    out = sitk.GetImageFromArray(_to_stored(canon.astype(np.uint8), img))
    out.CopyInformation(img)
    sitk.WriteImage(out, str(path), useCompression=True)


# --------------------------------------------------------------------------------------------
# the cohort


def target_categories(n: int, seed: int, forced=None) -> list[int]:
    if forced:
        return [int(forced[i % len(forced)]) for i in range(n)]
    shares = np.array(CATEGORY_SHARES) * n
    counts = np.floor(shares).astype(int)
    order = np.argsort(-(shares - counts))
    counts[order[: n - counts.sum()]] += 1
    cats = np.repeat(np.arange(4), counts)
    np.random.default_rng([seed, 991]).shuffle(cats)
    return [int(c) for c in cats]


def make_patient(out: Path, index: int, seed: int, size: int, target_cat: int,
                 protocols=("cac", "ctac")) -> list[dict]:
    """Writes one patient's scans; returns one manifest record per scan."""
    from cac_jax.scoring import agatston_score
    from data_pipeline.io import read_labels, read_study

    t0 = time.time()
    rng = np.random.default_rng([seed, index])
    pid = f"fc{seed:03d}x{index:03d}"
    p = Patient(rng, pid)
    scans = _plan_scans(p, rng, size, protocols)
    records = []
    lesions = None
    if "cac" not in scans:   # still choose the plaques on a (virtual) gated grid
        virt = _plan_scans(p, np.random.default_rng([seed, index, 7]), size, ("cac",))["cac"]
        _, _, _, lesions = _acquire(p, virt, rng, target_cat)
    for proto in ("cac", "ctac"):
        if proto not in scans:
            continue
        scan = scans[proto]
        hu, labels, heart, les = _acquire(p, scan, rng, target_cat, lesions)
        if lesions is None:
            lesions = les
        folder = out / f"{pid}_{proto}"
        _write_series(folder, hu, scan, p, seed, rng)
        img = _read_back(folder)
        stored_hu = sitk.GetArrayFromImage(img)
        if not np.array_equal(stored_hu.astype(np.int32), _to_stored(hu, img).astype(np.int32)):
            raise RuntimeError(f"{folder}: SimpleITK reads back other values than written")
        lab_path = out / f"{pid}_{proto}_labels.nii.gz"
        heart_path = out / f"{pid}_{proto}_heart.nii.gz"
        _write_like(lab_path, labels, img)
        _write_like(heart_path, heart, img)
        vol = read_study(folder)
        lab = read_labels(lab_path, like=vol)
        res = agatston_score(vol.hu, lab, vol.spacing_zyx_mm)
        g = scan.grid
        records.append(dict(
            patient_id=pid, scan_id=f"{pid}_{proto}", protocol=proto, image=folder,
            calcium_labels=lab_path, heart_mask=heart_path, agatston=float(res.agatston),
            category=int(res.category), target=target_cat, n_lesions=len(lesions),
            read_protocol=vol.metadata.protocol, pixel=g.pixel, spacing=g.spacing,
            thickness=g.thickness, nz=g.nz, noise=scan.noise_sd,
            noise_measured=scan.extra["noise_realized"],
            kernel=scan.kernel, conv=scan.conv, seconds=time.time() - t0))
    return records


def _work(args):
    return make_patient(*args)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--patients", type=int, default=10)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--protocols", default="cac,ctac")
    ap.add_argument("--categories", default="",
                    help="comma list of target categories, cycled (default: the 30/25/25/20 mix)")
    ap.add_argument("--workers", type=int, default=1)
    args = ap.parse_args(argv)
    from data_pipeline.manifest import ManifestRow, write_manifest

    protocols = tuple(x.strip() for x in args.protocols.split(",") if x.strip())
    if not protocols or any(x not in ("cac", "ctac") for x in protocols):
        ap.error("--protocols takes cac, ctac or cac,ctac")
    forced = [int(c) for c in args.categories.split(",") if c.strip()]
    args.out.mkdir(parents=True, exist_ok=True)
    cats = target_categories(args.patients, args.seed, forced)
    jobs = [(args.out, i, args.seed, args.size, cats[i], protocols) for i in range(args.patients)]
    t0 = time.time()
    if args.workers > 1:
        import multiprocessing as mp

        with mp.get_context("fork").Pool(args.workers) as pool:
            results = pool.map(_work, jobs, chunksize=1)
    else:
        results = [_work(j) for j in jobs]
    records = [r for res in results for r in res]
    rows = [ManifestRow(patient_id=r["patient_id"], scan_id=r["scan_id"], protocol=r["protocol"],
                        image=r["image"], calcium_labels=r["calcium_labels"],
                        heart_mask=r["heart_mask"], site="foreign", split="test",
                        agatston=r["agatston"], category=r["category"]) for r in records]
    write_manifest(args.out / "manifest.csv", rows)
    for r in records:
        print(f"{r['scan_id']:>16} target {r['target']} agatston {r['agatston']:8.1f} "
              f"cat {r['category']} lesions {r['n_lesions']:2d} px {r['pixel']:.2f} "
              f"dz {r['spacing']:.2f}/{r['thickness']:.2f} noise {r['noise']:.0f} "
              f"({r['noise_measured']:.0f}) {r['kernel']} {r['conv']['position']} "
              f"{'s' if r['conv']['signed'] else 'u'} {r['seconds']:.1f}s")
    for proto in protocols:
        cs = [r["category"] for r in records if r["protocol"] == proto]
        print(f"{proto}: categories {np.bincount(cs, minlength=4).tolist()}")
    print(f"wrote {len(records)} scans of {args.patients} patients to {args.out} "
          f"in {time.time() - t0:.0f} s")
    return 0


def _keep_freed_memory() -> None:
    """Keeps freed arrays in the process heap (glibc): fresh pages are slow to fault in on some
    VMs, and this generator allocates many volume-sized temporaries. CLI only: a no-op
    elsewhere, and not applied when imported (e.g. by the tests)."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-4, 0)              # M_MMAP_MAX: no mmap for large blocks
        libc.mallopt(-1, 2**31 - 1)      # M_TRIM_THRESHOLD: do not give the heap back
    except (OSError, AttributeError):
        pass


if __name__ == "__main__":
    _keep_freed_memory()
    sys.exit(main())
