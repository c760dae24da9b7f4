"""Reconstruction kernel and noise of a synthetic scan (step 4 of the image formation, `render`).

The image plus white noise is blurred in-plane by a Gaussian point-spread function (plus an
unsharp-mask edge enhancement for a site's sharp kernel), so the noise is correlated like a real
kernel's; the white noise is pre-scaled so that the reconstructed noise has the protocol's sigma
at the scanner's matrix (`REFERENCE_MATRIX`), or on a coarser grid the sigma of that image
averaged down to the rendered pixel size (`noise_sigma_at`).
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import ndimage, signal

from data_pipeline.phantom.acquisition import REFERENCE_MATRIX, Grid, Protocol


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
