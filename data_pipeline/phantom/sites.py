"""Acquisition-site presets for the synthetic cohort (`cac-jax synth --site NAME`).

A model trained on one scanner's images meets other scanners in use: other noise, pixel sizes,
slice thicknesses, reconstruction kernels and tube voltages. The paper validated on an external
set (orCaScore) for this reason. A preset changes how each protocol of the phantom is acquired and
reconstructed, as factors applied to that protocol's per-patient draws (`render.sample_protocol`),
so a site keeps the default's variety between patients:

- field of view (pixel size at a given `--size`), slice thickness (contiguous slices),
- image noise (standard deviation after the kernel),
- reconstruction kernel: the Gaussian point-spread width, and an optional edge-enhancing
  (unsharp-mask) term as sharp kernels have,
- tube voltage (kVp) with its contrast: calcium and bone CT numbers rise at lower kVp and fall at
  higher kVp (water stays 0 HU by definition); modelled by `kvp_contrast`.

The anatomy and the calcium of a patient are not changed by a site, and the design loop still
meets the requested CAC category exactly on each gated scan, measured on that site's own image.
A non-default site also salts the patient seeds and puts its name in the patient ids, so a
second-site cohort never repeats the first cohort's patients (an external set shares no patient
with training). The `default` preset is the cohort as it has always been generated: same seeds,
ids, images, headers and manifest (`site` column "synthetic").
"""

from __future__ import annotations

import dataclasses
import zlib


@dataclasses.dataclass(frozen=True)
class Acquisition:
    """How a site acquires and reconstructs one protocol (factors on the default draws)."""

    fov_scale: float = 1.0           # field of view x this (larger pixels at the same --size)
    thickness_mm: float | None = None   # contiguous slices this thick; None keeps the default
    noise_scale: float = 1.0         # noise sigma x this
    psf_scale: float = 1.0           # Gaussian kernel width x this (> 1 smoother)
    sharpen: float = 0.0             # edge enhancement: out = k + sharpen * (k - G(k))
    sharpen_sigma_mm: float = 1.0    # width of the Gaussian G of the edge enhancement
    kvp: float = 120.0
    kernel: str | None = None        # DICOM ConvolutionKernel; None writes no such tag


@dataclasses.dataclass(frozen=True)
class SitePreset:
    """A named scanner/site: per-protocol acquisition and how it is recorded."""

    name: str
    site: str                        # the manifest's `site` column
    manufacturer: str                # DICOM Manufacturer
    description: str
    cac: Acquisition
    ctac: Acquisition

    @property
    def is_default(self) -> bool:
        """True for the preset that reproduces the original cohort exactly."""
        return self.name == DEFAULT_SITE

    def acquisition(self, protocol: str) -> Acquisition:
        """The acquisition of `protocol` ("cac" or "ctac") at this site."""
        if protocol not in ("cac", "ctac"):
            raise ValueError(f"unknown protocol {protocol!r}; expected 'cac' or 'ctac'")
        return self.cac if protocol == "cac" else self.ctac

    @property
    def salt(self) -> int:
        """A fixed number derived from the name (CRC-32, not Python's per-process hash)."""
        return zlib.crc32(self.name.encode("utf-8"))


DEFAULT_SITE = "default"

SITES: dict[str, SitePreset] = {
    p.name: p for p in (
        SitePreset(
            name="default", site="synthetic", manufacturer="cac-jax synthetic phantom",
            description="the standard cohort: CAC 3 mm, FOV 210-320 mm, noise 10-25 HU, sharp "
                        "Gaussian kernel; CTAC 3/4/5 mm, FOV 460-560 mm, noise 40-90 HU; 120 kVp "
                        "(noise at 512 px: less on a coarser --size)",
            cac=Acquisition(), ctac=Acquisition()),
        SitePreset(
            name="site2", site="site2", manufacturer="cac-jax synthetic site2",
            description="another scanner: gated 2.5 mm slices, 25% larger field of view, smoother "
                        "kernel (twice the blur) with less noise; CTAC 3.75 mm, smoother",
            cac=Acquisition(fov_scale=1.25, thickness_mm=2.5, noise_scale=0.7, psf_scale=2.0,
                            kernel="SYN-SMOOTH"),
            ctac=Acquisition(fov_scale=0.9, thickness_mm=3.75, noise_scale=0.75, psf_scale=1.5,
                             kernel="SYN-SMOOTH")),
        SitePreset(
            name="lowdose", site="lowdose", manufacturer="cac-jax synthetic lowdose",
            description="reduced dose at 100 kVp: noise x1.8 (CAC) and x1.5 (CTAC), calcium and "
                        "bone brighter; otherwise the default geometry",
            cac=Acquisition(noise_scale=1.8, kvp=100.0, kernel="SYN-STANDARD"),
            ctac=Acquisition(noise_scale=1.5, kvp=100.0, kernel="SYN-STANDARD")),
        SitePreset(
            name="sharp", site="sharp", manufacturer="cac-jax synthetic sharp",
            description="edge-enhancing kernel at 140 kVp: narrower blur plus an unsharp-mask "
                        "overshoot, noise x1.3, calcium and bone darker; 20% smaller CAC field of "
                        "view",
            cac=Acquisition(fov_scale=0.8, noise_scale=1.3, psf_scale=0.7, sharpen=0.6,
                            sharpen_sigma_mm=1.0, kvp=140.0, kernel="SYN-SHARP"),
            ctac=Acquisition(noise_scale=1.3, psf_scale=0.8, sharpen=0.5, sharpen_sigma_mm=2.0,
                             kvp=140.0, kernel="SYN-SHARP")),
    )
}


def get_site(site: str | SitePreset | None) -> SitePreset:
    """The preset named `site` (a SitePreset passes through; None is the default)."""
    if site is None:
        return SITES[DEFAULT_SITE]
    if isinstance(site, SitePreset):
        return site
    try:
        return SITES[site]
    except KeyError:
        raise ValueError(f"unknown site {site!r}; expected one of {', '.join(SITES)}") from None


# Calcium (hydroxyapatite) and bone attenuate mostly by the photoelectric effect at CT energies,
# which falls steeply with photon energy, while water is 0 HU at every kVp by the definition of
# the Hounsfield scale. Lower tube voltage therefore raises their CT numbers. The exponent is a
# modelling choice (about +16% at 100 kVp, -12% at 140 kVp) that makes the effect visible; it is
# not a calibration of any scanner.
_KVP_EXPONENT = 0.8


def kvp_contrast(kvp: float) -> float:
    """Factor on positive CT numbers (calcium, bone, soft tissue above water) relative to 120 kVp."""
    if kvp <= 0:
        raise ValueError(f"kVp must be positive, got {kvp}")
    return (120.0 / float(kvp)) ** _KVP_EXPONENT
