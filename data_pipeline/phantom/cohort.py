"""Synthetic patients and cohorts: paired gated CAC and ungated CTAC scans with ground truth.

One patient = one anatomy (`anatomy.sample_anatomy`) and one set of calcifications, imaged by
both protocols. The patient's target CAC category is met on the *gated CAC* scan: coronary
plaques are taken from an ordered candidate list (`plaques.coronary_candidates`) until the
Agatston score that `data_pipeline.agatston.agatston_score` measures on the rendered, noisy CAC image
(with the expert-style labels of `render.compose`) lies in the target category; the last plaque
is shrunk or swapped when one plaque overshoots. The CTAC scan renders the same calcium with its
own resolution, noise and motion, and its true score is measured on its own image: it may fall in
another category, which is the point of the paper.

Determinism: every random draw comes from `numpy.random.SeedSequence(patient_seed)` streams, and
`patient_seed(seed, k)` depends only on the cohort seed and the patient index, so patient k is the
same whatever the cohort size. Categories are assigned in shuffled blocks (`assign_categories`),
so every complete block has exactly the requested proportions.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import shutil
import tempfile
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from data_pipeline.atomic import atomic_write_text
from data_pipeline.errors import InputError
from data_pipeline.manifest import ManifestRow, write_manifest
from data_pipeline.phantom import plaques as plaque_lib
from data_pipeline.phantom import render
from data_pipeline.phantom.acquisition import DEFAULT_CTAC_IMAGING, check_ctac_imaging
from data_pipeline.phantom.anatomy import Anatomy, grooved_anatomy, sample_anatomy
from data_pipeline.phantom.devices import device_wires
from data_pipeline.phantom.sites import SitePreset, get_site

PROTOCOLS = ("cac", "ctac")
# Bumped whenever the same seed and size render different images or labels (2: noise sigmas are
# those of the 512 px reconstruction, `render.noise_sigma_at`, and a calcification is labelled
# only where it stands 3 noise sigmas out, `render.visible_hu`), so stored cohorts can be told
# apart.
GENERATOR_VERSION = 2
# Anatomy variants (`--anatomy`). "classic" is the anatomy this generator has always drawn (uniform
# epicardial fat, no devices); "grooved" (`anatomy.grooved_anatomy`, `devices`) varies the fat over
# the heart, lays the coronaries on the groove floors and adds metal devices. A variant's version
# is bumped whenever its cohorts change; it is part of `generator_identity`.
ANATOMIES = {"classic": 0, "grooved": 1}
DEFAULT_ANATOMY = "classic"
# CTAC imaging models (`acquisition.CTAC_IMAGING`, `--ctac-imaging`) and their versions, bumped
# like the anatomies'; a model other than "classic" is part of `generator_identity`.
CTAC_IMAGING_VERSIONS = {"classic": 0, "calibrated": 1}
DEFAULT_PROPORTIONS = (0.25, 0.25, 0.25, 0.25)
SITE = "synthetic"                                # the default preset's manifest `site`
MANUFACTURER = "cac-jax synthetic phantom"        # the default preset's DICOM Manufacturer
_DIRECTION = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
# SeedSequence children of a patient: one stream per purpose, so adding draws to one part never
# changes another; they are numbered, so streams appended here leave the earlier ones as they were
# ("grooves" and "devices" are drawn only by the grooved anatomy).
_STREAMS = ("anatomy", "category", "coronary", "noncoronary", "cac", "ctac", "cac-noise",
            "ctac-noise", "grooves", "devices")


# Below about 48 px a single CAC voxel covers tens of mm^2, and the 1-100 category cannot always
# be met (seen at 32-36 px); 48, 64 and 96 px met it for 40 of 40 patients each.
MIN_SIZE = 48


@dataclasses.dataclass(frozen=True)
class SyntheticScan:
    """One rendered scan in memory, with its ground truth."""

    volume: object                  # data_pipeline.io.CTVolume (HU rounded to integers)
    calcium_labels: np.ndarray      # int16 (z, y, x): 0, 1 LAD, 2 LCX, 3 RCA, 5 aorta, 6 valve, 7 other
    heart_mask: np.ndarray          # uint8 (z, y, x): the pericardial sac (heart silhouette)
    agatston: float                 # true Agatston score of this scan (scorer on its own image)
    category: int                   # cac_category(agatston)
    patient_id: str
    scan_id: str
    protocol: str = ""
    target_category: int = 0        # the patient's designed category (met by the CAC scan)
    calcifications: tuple = ()      # the patient's Calcification objects (world mm)
    site: str = SITE                # the acquisition site preset's manifest `site` value


def check_anatomy(anatomy: str | None) -> str:
    """The anatomy variant's name (None is the default, "classic"); unknown names are refused."""
    if anatomy is None:
        return DEFAULT_ANATOMY
    if anatomy not in ANATOMIES:
        raise ValueError(f"unknown anatomy {anatomy!r}; expected one of {', '.join(ANATOMIES)}")
    return anatomy


def generator_identity(anatomy: str | None = None, ctac_imaging: str | None = None):
    """What made a cohort, for provenance stamps: GENERATOR_VERSION (an int) for the classic
    anatomy and CTAC, as it has always been stamped, and e.g. "2+grooved1" or
    "2+grooved1+calibrated1" for variants."""
    anatomy, ctac_imaging = check_anatomy(anatomy), check_ctac_imaging(ctac_imaging)
    parts = [str(GENERATOR_VERSION)]
    if anatomy != DEFAULT_ANATOMY:
        parts.append(f"{anatomy}{ANATOMIES[anatomy]}")
    if ctac_imaging != DEFAULT_CTAC_IMAGING:
        parts.append(f"{ctac_imaging}{CTAC_IMAGING_VERSIONS[ctac_imaging]}")
    return GENERATOR_VERSION if len(parts) == 1 else "+".join(parts)


def _anatomy_salt(anatomy: str) -> int:
    return zlib.crc32(f"anatomy:{anatomy}".encode())


def patient_seed(seed: int, index: int, site: str | SitePreset | None = None,
                 anatomy: str | None = None) -> int:
    """The seed of patient `index` in a cohort generated with `seed` (independent of N).

    A non-default `site` salts it, so a site's cohort has its own patients for every seed; so
    does a non-classic `anatomy` (its cohorts share no patient with the classic ones).
    """
    preset = get_site(site)
    anatomy = check_anatomy(anatomy)
    key = [int(seed), int(index)] if preset.is_default else [int(seed), int(index), preset.salt]
    if anatomy != DEFAULT_ANATOMY:
        key.append(_anatomy_salt(anatomy))
    state = np.random.SeedSequence(key).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 31 | int(state[1]) >> 1


def patient_id_for(seed: int, index: int, site: str | SitePreset | None = None,
                   anatomy: str | None = None) -> str:
    """The patient id of patient `index` in a cohort generated with `seed` (a non-default
    `site`'s name and a non-classic `anatomy`'s are part of it: `syn0-site2-0003`,
    `syn0-grooved-0003`, `syn0-site2-grooved-0003`)."""
    preset = get_site(site)
    parts = [f"syn{int(seed)}"]
    if not preset.is_default:
        parts.append(preset.name)
    if check_anatomy(anatomy) != DEFAULT_ANATOMY:
        parts.append(anatomy)
    return "-".join(parts + [f"{int(index):04d}"])


def _check_proportions(proportions: Sequence[float]) -> np.ndarray:
    p = np.asarray(proportions, dtype=np.float64)
    if p.shape != (4,) or not np.all(np.isfinite(p)) or np.any(p < 0) or p.sum() <= 0:
        raise ValueError(f"category proportions must be 4 non-negative numbers with a positive "
                         f"sum (categories 0, 1-100, 101-400, >400), got {list(proportions)}")
    return p / p.sum()


def _block(p: np.ndarray) -> list[int]:
    """The smallest multiset of categories with exactly proportions `p` (at most 100 items;
    largest-remainder rounding beyond that)."""
    for size in range(1, 101):
        counts = p * size
        if np.allclose(counts, np.round(counts), atol=1e-6):
            counts = np.round(counts).astype(int)
            break
    else:
        size = 100
        counts = np.floor(p * size).astype(int)
        rest = np.argsort(-(p * size - counts), kind="stable")[: size - counts.sum()]
        counts[rest] += 1
    return [c for c, n in enumerate(counts) for _ in range(n)]


def assign_categories(seed: int, patients: int, proportions=DEFAULT_PROPORTIONS) -> list[int]:
    """Target CAC category of each patient: shuffled blocks with exactly `proportions`.

    Patient k's category depends only on (seed, k, proportions), not on the cohort size; any
    cohort that is a whole number of blocks (4 patients for equal proportions) has exactly the
    requested proportions, and any other is off by less than one block.
    """
    block = _block(_check_proportions(proportions))
    out = []
    for b in range(math.ceil(patients / len(block))):
        rng = np.random.default_rng([int(seed), b, 7919])
        out.extend(int(c) for c in rng.permutation(block))
    return out[:patients]


def _streams(seed: int) -> dict[str, np.random.Generator]:
    children = np.random.SeedSequence(int(seed)).spawn(len(_STREAMS))
    return {name: np.random.default_rng(child) for name, child in zip(_STREAMS, children)}


def _volume(hu: np.ndarray, grid: render.Grid, protocol: render.Protocol, patient_id: str,
            scan_id: str, manufacturer: str = MANUFACTURER):
    from data_pipeline.io import CTVolume, StudyMetadata

    metadata = StudyMetadata(
        source=f"synthetic:{scan_id}", modality="CT", patient_id=patient_id,
        series_description=protocol.series_description, slice_thickness_mm=protocol.thickness_mm,
        kvp=protocol.kvp, manufacturer=manufacturer, convolution_kernel=protocol.kernel,
        ecg_gated=protocol.ecg_gated, protocol=protocol.name)
    return CTVolume(hu=hu, spacing_zyx_mm=grid.spacing_zyx_mm, origin_xyz_mm=grid.origin_xyz_mm,
                    direction=_DIRECTION, metadata=metadata)


def _score(hu: np.ndarray, labels: np.ndarray, grid: render.Grid) -> float:
    from data_pipeline.agatston import agatston_score

    return float(agatston_score(hu, labels, grid.spacing_zyx_mm,
                                slice_thickness_mm=grid.thickness_mm).agatston)


@dataclasses.dataclass
class _Scene:
    """A protocol's rendering state: grid, blurred noisy anatomy, heart mask."""

    protocol: render.Protocol
    grid: render.Grid
    anatomy_hu: np.ndarray
    background: np.ndarray
    heart_mask: np.ndarray

    @functools.cached_property
    def min_peak_hu(self) -> float:
        """Peak excess (HU) a calcification needs to be labelled here (`render.visible_hu`)."""
        return render.visible_hu(self.protocol, self.grid)


def _scene(anat: Anatomy, protocol: render.Protocol, size: int, noise_rng) -> _Scene:
    grid = render.make_grid(protocol, size)
    image = render.render_anatomy(anat, grid, protocol)
    background = render.noisy_background(image.hu, protocol, grid, noise_rng)
    mask = (image.heart_occ >= 0.5).astype(np.uint8)
    return _Scene(protocol, grid, image.hu, background, mask)


def _design_coronary(anat: Anatomy, scene: _Scene, category: int, rng, others) -> list:
    """Coronary plaques whose CAC-scan Agatston score lies in `category` (see module doc)."""
    from data_pipeline.agatston import cac_category

    if category == 0:
        return []
    candidates = plaque_lib.coronary_candidates(anat, category, rng)
    target = plaque_lib.target_score(category, rng)
    cache: dict = {}

    def patch(calc):
        key = id(calc)
        if key not in cache:
            cache[key] = (calc, render.calcification_patch(calc, scene.grid, scene.protocol,
                                                           scene.anatomy_hu))
        return cache[key][1]

    other_patches = [p for p in (patch(c) for c in others) if p is not None]

    def score(chosen) -> float:
        patches = other_patches + [p for p in (patch(c) for c in chosen) if p is not None]
        region = render.patches_region(patches, scene.background.shape)
        if region is None:
            return 0.0
        hu, labels = render.compose(scene.background, patches, region, scene.min_peak_hu)
        return _score(hu, labels, scene.grid)

    for _attempt in range(4):
        if score(candidates) >= target:
            break
        candidates = [c.scaled(1.3) for c in candidates]
    else:
        raise RuntimeError(f"could not reach an Agatston score of {target:.0f} with "
                           f"{len(candidates)} plaques (category {category})")
    lo, hi = 1, len(candidates)
    while lo < hi:   # smallest prefix reaching the target
        mid = (lo + hi) // 2
        if score(candidates[:mid]) >= target:
            hi = mid
        else:
            lo = mid + 1
    chosen = candidates[:lo]
    if cac_category(score(chosen)) == category:
        return chosen
    # One plaque overshot the category: shrink it, or swap it for a later candidate.
    head = chosen[:-1]
    for factor in (0.85, 0.7, 0.55, 0.4, 0.3):
        trial = head + [chosen[-1].scaled(factor)]
        if cac_category(score(trial)) == category:
            return trial
    for alternative in candidates[lo:]:
        for factor in (1.0, 0.7, 0.5, 0.35):
            trial = head + [alternative.scaled(factor)]
            if cac_category(score(trial)) == category:
                return trial
    raise RuntimeError(f"could not meet CAC category {category} (target {target:.0f})")


def _finish(scene: _Scene, calcs: Sequence, patient_id: str, category: int,
            clip_to_heart: bool, site: SitePreset) -> SyntheticScan:
    from data_pipeline.agatston import cac_category

    patches = [p for p in (render.calcification_patch(c, scene.grid, scene.protocol,
                                                      scene.anatomy_hu) for c in calcs)
               if p is not None]
    hu, labels = render.compose(scene.background, patches, min_peak_hu=scene.min_peak_hu)
    if clip_to_heart:
        # Motion smear can carry a plaque's footprint past the sac edge; coronary calcium is
        # only marked inside the heart.
        outside = (labels >= 1) & (labels <= 3) & (scene.heart_mask == 0)
        labels[outside] = 0
    agatston = _score(hu, labels, scene.grid)
    scan_id = f"{patient_id}_{scene.protocol.name}"
    return SyntheticScan(
        volume=_volume(hu, scene.grid, scene.protocol, patient_id, scan_id, site.manufacturer),
        calcium_labels=labels, heart_mask=scene.heart_mask, agatston=agatston,
        category=cac_category(agatston), patient_id=patient_id, scan_id=scan_id,
        protocol=scene.protocol.name, target_category=category, calcifications=tuple(calcs),
        site=site.site)


def render_patient(patient_seed: int, protocols: Sequence[str] = PROTOCOLS, size: int = 128, *,
                   category: int | None = None, patient_id: str | None = None,
                   ctac_overlap: bool = False, site: str | SitePreset | None = None,
                   anatomy: str | None = None,
                   ctac_imaging: str | None = None) -> dict[str, SyntheticScan]:
    """Renders one patient's scans in memory: {protocol: SyntheticScan}.

    `category` is the target CAC category (0-3) met by the gated scan; None draws it from the
    patient's own seed (equal proportions). The CAC scan is always rendered (the plaque design is
    measured on it) and returned only when asked for. `site` is an acquisition preset
    (`sites.SITES`, default "default"); it changes how the patient is imaged, not the patient
    (use `patient_seed(seed, k, site)` for a site's own patients). `anatomy` is the anatomy
    variant (`ANATOMIES`, default "classic"); "grooved" draws its fat layout and devices from
    streams of their own, so the rest of the patient (body, scanner, noise) stays as drawn.
    `ctac_imaging` names the CTAC imaging model (`acquisition.CTAC_IMAGING`, default "classic");
    it changes the CTAC scan only, not the patient or the gated scan.
    """
    preset = get_site(site)
    anatomy = check_anatomy(anatomy)
    ctac_imaging = check_ctac_imaging(ctac_imaging)
    for name in protocols:
        if name not in PROTOCOLS:
            raise ValueError(f"unknown protocol {name!r}; expected one of {', '.join(PROTOCOLS)}")
    if size < MIN_SIZE:
        raise ValueError(f"size must be at least {MIN_SIZE} pixels, got {size}")
    streams = _streams(patient_seed)
    if category is None:
        category = int(streams["category"].integers(0, 4))
    if category not in (0, 1, 2, 3):
        raise ValueError(f"category must be 0, 1, 2 or 3, got {category}")
    patient_id = patient_id or f"syn-{patient_seed}"
    anat = sample_anatomy(streams["anatomy"])
    if anatomy == "grooved":
        anat = grooved_anatomy(anat, streams["grooves"])
    others = plaque_lib.noncoronary_calcifications(anat, category, streams["noncoronary"])
    if anatomy == "grooved":
        others = others + device_wires(anat, category, streams["devices"])
    cac_protocol = render.sample_protocol("cac", anat, streams["cac"], site=preset)
    ctac_protocol = render.sample_protocol("ctac", anat, streams["ctac"], ctac_overlap=ctac_overlap,
                                           site=preset, ctac_imaging=ctac_imaging)
    cac = _scene(anat, cac_protocol, size, streams["cac-noise"])
    coronary = _design_coronary(anat, cac, category, streams["coronary"], others)
    calcs = list(others) + list(coronary)
    out = {}
    if "cac" in protocols:
        scan = _finish(cac, calcs, patient_id, category, clip_to_heart=False, site=preset)
        if scan.category != category:
            raise RuntimeError(f"{scan.scan_id}: designed category {category} but the rendered "
                               f"scan scores {scan.agatston:.1f}")
        out["cac"] = scan
    if "ctac" in protocols:
        ctac = _scene(anat, ctac_protocol, size, streams["ctac-noise"])
        out["ctac"] = _finish(ctac, calcs, patient_id, category, clip_to_heart=True, site=preset)
    return {name: out[name] for name in protocols}


def render_scan(patient_seed: int, protocol: str, size: int = 128, *, category: int | None = None,
                patient_id: str | None = None, ctac_overlap: bool = False,
                site: str | SitePreset | None = None, anatomy: str | None = None,
                ctac_imaging: str | None = None) -> SyntheticScan:
    """One synthetic scan in memory, no files (the same scan `generate_cohort` writes for
    `patient_seed(seed, k, site, anatomy)` with `category=assign_categories(seed, N, ...)[k]`)."""
    return render_patient(patient_seed, (protocol,), size, category=category,
                          patient_id=patient_id, ctac_overlap=ctac_overlap, site=site,
                          anatomy=anatomy, ctac_imaging=ctac_imaging)[protocol]


# --------------------------------------------------------------------------- writing

def _write_dicom_atomic(volume, folder: Path, series_number: int, uid_seed: str) -> None:
    """Writes the series into a fresh folder, then swaps it in, so a rerun never mixes slices."""
    from data_pipeline.io import write_dicom_series

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".dicom.", dir=folder.parent))
    try:
        write_dicom_series(volume, tmp, series_number=series_number, uid_seed=uid_seed)
        old = None
        if folder.exists():
            old = Path(tempfile.mkdtemp(prefix=".dicom-old.", dir=folder.parent))
            os.replace(folder, old / "dicom")
        os.replace(tmp, folder)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@dataclasses.dataclass(frozen=True)
class _Job:
    out_dir: str
    index: int
    seed: int
    category: int
    protocols: tuple[str, ...]
    size: int
    preview: bool
    ctac_overlap: bool
    site: SitePreset | None = None
    anatomy: str = DEFAULT_ANATOMY
    ctac_imaging: str = DEFAULT_CTAC_IMAGING


def _run_job(job: _Job) -> list[ManifestRow]:
    from data_pipeline.io import write_volume

    out = Path(job.out_dir)
    pid = patient_id_for(job.seed, job.index, job.site, job.anatomy)
    scans = render_patient(patient_seed(job.seed, job.index, job.site, job.anatomy), job.protocols,
                           job.size, category=job.category, patient_id=pid,
                           ctac_overlap=job.ctac_overlap, site=job.site, anatomy=job.anatomy,
                           ctac_imaging=job.ctac_imaging)
    rows = []
    for number, (name, scan) in enumerate(scans.items(), start=1):
        folder = out / pid / name
        dicom = folder / "dicom"
        _write_dicom_atomic(scan.volume, dicom, series_number=number,
                            uid_seed=f"cac-jax-synth:{job.seed}:{scan.scan_id}:{job.size}")
        labels = folder / "calcium_labels.nii.gz"
        mask = folder / "heart_mask.nii.gz"
        write_volume(labels, scan.calcium_labels, like=scan.volume)
        write_volume(mask, scan.heart_mask, like=scan.volume)
        if job.preview:
            from data_pipeline.phantom.preview import save_preview

            save_preview(scan, out / "previews" / f"{scan.scan_id}.png")
        rows.append(ManifestRow(patient_id=pid, scan_id=scan.scan_id, protocol=name, image=dicom,
                                calcium_labels=labels, heart_mask=mask, site=scan.site, split=None,
                                agatston=round(scan.agatston, 4), category=scan.category))
    return rows


def generate_cohort(out_dir, *, patients: int, protocols=PROTOCOLS, size: int = 512, seed: int = 0,
                    preview: bool = False, category_proportions=DEFAULT_PROPORTIONS,
                    workers: int = 1, ctac_overlap: bool = False,
                    progress: Callable[[int], None] | None = None,
                    site: str | SitePreset | None = None,
                    anatomy: str | None = None,
                    ctac_imaging: str | None = None) -> list[ManifestRow]:
    """Generates `patients` synthetic patients into `out_dir` and writes `out_dir/manifest.csv`.

    Layout: OUT/<patient_id>/<protocol>/dicom/*.dcm, .../calcium_labels.nii.gz,
    .../heart_mask.nii.gz, OUT/previews/<scan_id>.png (with `preview`), OUT/manifest.csv (true
    Agatston and category of every scan, the site preset's `site` ("synthetic" for the default),
    split empty) and OUT/cohort.json (GENERATOR_VERSION and the arguments). `site` names an
    acquisition preset (`sites.SITES`): a non-default site images its own patients (salted seeds,
    the site's name in the patient ids). `anatomy` names an anatomy variant (`ANATOMIES`); a
    non-classic one also has its own patients (salted seeds, its name in the ids) and is recorded
    in cohort.json ("anatomy" and "generator_identity"; the classic cohort's cohort.json is as it
    always was). `ctac_imaging` names the CTAC imaging model (`acquisition.CTAC_IMAGING`): the
    same patients, their CTAC imaged otherwise; recorded in cohort.json ("ctac_imaging" and
    "generator_identity") when not "classic". `workers` > 1 renders patients in parallel processes; `progress(n)` is called as
    each patient finishes.
    Returns the manifest rows.
    """
    preset = get_site(site)
    anatomy = check_anatomy(anatomy)
    ctac_imaging = check_ctac_imaging(ctac_imaging)
    if patients < 1:
        raise ValueError(f"patients must be >= 1, got {patients}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    protocols = tuple(protocols)
    if not protocols or any(p not in PROTOCOLS for p in protocols) or len(set(protocols)) != len(protocols):
        raise ValueError(f"protocols must be distinct values of {PROTOCOLS}, got {protocols}")
    categories = assign_categories(seed, patients, category_proportions)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(out, "output folder for the cohort is an existing file")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(out, f"cannot create the output folder: {exc.strerror or exc}") from None
    jobs = [_Job(str(out), k, int(seed), categories[k], protocols, int(size), bool(preview),
                 bool(ctac_overlap), preset, anatomy, ctac_imaging) for k in range(patients)]
    results: dict[int, list[ManifestRow]] = {}
    if workers <= 1:
        for job in jobs:
            results[job.index] = _run_job(job)
            if progress:
                progress(1)
    else:
        import concurrent.futures
        import multiprocessing

        context = multiprocessing.get_context("spawn")   # safe with threads (JAX, BLAS) in parent
        with concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
            futures = {pool.submit(_run_job, job): job.index for job in jobs}
            try:
                for future in concurrent.futures.as_completed(futures):
                    results[futures[future]] = future.result()
                    if progress:
                        progress(1)
            except BaseException:
                # A generator failure is a bug to report at once, not after every other patient.
                for future in futures:
                    future.cancel()
                raise
    rows = [row for k in range(patients) for row in results[k]]
    write_manifest(out / "manifest.csv", rows)
    # Provenance beside the manifest (whose columns are a contract): what made these files.
    provenance = {
        "generator_version": GENERATOR_VERSION, "patients": int(patients), "seed": int(seed),
        "size": int(size), "protocols": list(protocols), "site": preset.name,
        "category_proportions": [float(p) for p in category_proportions],
        "ctac_overlap": bool(ctac_overlap)}
    if anatomy != DEFAULT_ANATOMY:   # absent: the classic anatomy (cohorts made before variants)
        provenance["anatomy"] = anatomy
    if ctac_imaging != DEFAULT_CTAC_IMAGING:   # absent: the classic CTAC
        provenance["ctac_imaging"] = ctac_imaging
    if (anatomy, ctac_imaging) != (DEFAULT_ANATOMY, DEFAULT_CTAC_IMAGING):
        provenance["generator_identity"] = generator_identity(anatomy, ctac_imaging)
    atomic_write_text(out / "cohort.json", json.dumps(provenance, indent=2) + "\n")
    return rows
