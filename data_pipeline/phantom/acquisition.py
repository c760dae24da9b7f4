"""Acquisition and grid of a synthetic scan: the protocol's per-patient draws and the voxel grid.

A `Protocol` holds one scan's acquisition and reconstruction parameters (gated CAC or ungated
low-dose CTAC, `sample_protocol`, scaled by a site preset of `sites`), independent of the image
size; `make_grid` lays its voxel centres out at a pixel count. `apply_contrast` is the tube
voltage's effect on positive CT numbers, applied to noise-free HU by `tissues` and `render`.
The image formation as a whole is described in `render`.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from data_pipeline.phantom import sites
from data_pipeline.phantom.anatomy import Anatomy
from data_pipeline.phantom.sites import SitePreset

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
    # Ungated coronary motion seen by one slice: None (generator version 2) averages the whole
    # cycle's path, dwell-weighted, shifted by 0.3 x the slice's phase; a fraction w of the cycle
    # averages `cardiac_displacement` over the window [t0, t0 + w) that starts at the slice's
    # phase t0 = (slice_phase + 1) / 2 (a reconstruction window of rotation time / RR interval).
    motion_window: float | None = None


@dataclasses.dataclass(frozen=True)
class CtacImaging:
    """How an ungated CTAC scan images the beating coronaries and its noise (`CTAC_IMAGING`).

    `window`: None averages each slice over the whole cycle (`Protocol.motion_window` None);
    (lo, hi) draws one reconstruction window per patient, uniform in [lo, hi] of the cycle.
    `noise_scale` multiplies the drawn CTAC noise sigma."""

    window: tuple[float, float] | None = None
    noise_scale: float = 1.0


# CTAC imaging models (`cac-jax synth --ctac-imaging`; docs/synthetic_cohort.md, "CTAC imaging").
# "classic" is the generator's CTAC as it has always been. "calibrated" is bound to what scanners
# do: a slice is reconstructed from half a rotation or a whole one (0.5-0.8 s rotation) at heart
# rates of 55-90 beats a minute, so its window is 0.3-1.0 of the cardiac cycle, not the whole
# cycle's average; and a CTAC of about half a gated CAC scan's dose at 3-5 mm has about the gated
# scan's noise, not two to four times it (sigma 20-45 HU at the 512 px reconstruction, against
# 10-25 HU for the gated scans). Its window draw comes from the patient's CTAC stream after every
# other CTAC draw, so the patients, their gated scans and their CTAC geometry stay the same.
CTAC_IMAGING = {"classic": CtacImaging(),
                "calibrated": CtacImaging(window=(0.3, 1.0), noise_scale=0.5)}
DEFAULT_CTAC_IMAGING = "classic"


def check_ctac_imaging(name: str | None) -> str:
    """The CTAC imaging model's name (None is the default, "classic"); unknown names are refused."""
    if name is None:
        return DEFAULT_CTAC_IMAGING
    if name not in CTAC_IMAGING:
        raise ValueError(f"unknown CTAC imaging {name!r}; expected one of "
                         f"{', '.join(CTAC_IMAGING)}")
    return name


# Coronary displacement over one cardiac cycle (fraction of the R-R interval -> position along the
# artery's motion direction, in units of its peak-to-peak amplitude, -0.5..0.5): the systolic
# excursion, the return in rapid filling, diastasis, the atrial kick.
CARDIAC_CYCLE_KNOTS = (0.0, 0.1, 0.35, 0.5, 0.6, 0.85, 0.95, 1.0)
CARDIAC_DISPLACEMENT_KNOTS = (-0.5, -0.4, 0.5, 0.0, -0.3, -0.35, -0.45, -0.5)


def cardiac_displacement(t: np.ndarray) -> np.ndarray:
    """Position along the motion direction (units of the amplitude) at cycle fractions `t`
    (taken modulo 1)."""
    return np.interp(np.mod(t, 1.0), CARDIAC_CYCLE_KNOTS, CARDIAC_DISPLACEMENT_KNOTS)


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
                    ctac_overlap: bool = False, site: SitePreset | None = None,
                    ctac_imaging: str | None = None) -> Protocol:
    """Draws the scan parameters of protocol `name` for a patient (independent of image size).

    `site` (data_pipeline.phantom.sites) scales the draws after they are made, so a site's patient
    sees the same random stream as the default's; `ctac_overlap` wins over a site's CTAC thickness.
    `ctac_imaging` names a CTAC imaging model of `CTAC_IMAGING` (the gated scan ignores it).
    """
    imaging = CTAC_IMAGING[check_ctac_imaging(ctac_imaging)]
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
    window = None
    if not gated:   # the CTAC's per-slice phases, then its imaging model (the last draws)
        phase = rng.uniform(-1, 1, size=n)
        sigma *= imaging.noise_scale
        if imaging.window is not None:
            window = float(u(*imaging.window))
    return Protocol(name=name, fov_mm=fov, center_xy_mm=center, z_first_mm=round(z_first, 3),
                    n_slices=n, spacing_z_mm=spacing, thickness_mm=thickness, noise_sigma_hu=sigma,
                    psf_mm=psf, heart_blur_mm=heart_blur, motion=motion, slice_phase=phase,
                    kvp=kvp, ecg_gated=gated, series_description=desc,
                    contrast=sites.kvp_contrast(kvp), sharpen=float(acq.sharpen),
                    sharpen_sigma_mm=float(acq.sharpen_sigma_mm), kernel=acq.kernel,
                    motion_window=window)


def apply_contrast(hu: np.ndarray, contrast: float) -> np.ndarray:
    """Tube-voltage contrast: positive CT numbers times `contrast`, water (0 HU) and everything
    below it unchanged (see `sites.kvp_contrast`). Applied to noise-free HU before the kernel."""
    return hu + (contrast - 1.0) * np.maximum(hu, 0.0)


def _range(coords: np.ndarray, lo: float, hi: float) -> slice:
    """Index slice of the sorted `coords` within [lo, hi]."""
    return slice(int(np.searchsorted(coords, lo, "left")), int(np.searchsorted(coords, hi, "right")))
