"""Agatston score, calcium volume and mass, and CAC categories (docs/contracts.md, the rules).

Lives in the lower layer (`data_pipeline`) because the dataset builder, the patient splits and the
synthetic cohort score reference labels; `cac_jax.scoring` re-exports it for users.
Pure numpy + scipy.ndimage; no JAX and no TensorFlow, so a workstation that only scores studies
pays for neither. The rules, applied to an HU volume and an integer label volume
(0 none, 1 LAD incl. left main, 2 LCX, 3 RCA, 4 coronary of undetermined artery, as in the
orCaScore challenge; 5 and above are non-coronary and never scored):

1. Candidates: voxels with label 1..4 and HU >= 130 (Agatston et al. 1990).
2. Lesions: 2D 8-connected components on each axial slice, per label value, so two touching
   components with different labels are two lesions.
3. A lesion counts if its area >= `min_area_mm2` (default 1 mm^2, the usual noise filter).
4. Weight from the lesion's own peak HU: [130, 200) -> 1, [200, 300) -> 2, [300, 400) -> 3,
   >= 400 -> 4 (Agatston 1990).
5. Agatston = sum(area_mm2 * weight) * (z spacing / 3 mm). The score was defined on contiguous
   3 mm slices; scaling by the slice *spacing* (not the nominal thickness) keeps overlapping
   reconstructions from being counted twice.
6. Volume = counted voxels * voxel volume; mass = calibration factor (mg per HU*mm^3, from a
   calibration phantom) * sum(HU * voxel volume) over counted voxels, only when a factor is given.
7. Categories: 0, (0, 100], (100, 400], > 400 (the paper's four); optionally five classes
   0, (0, 10], (10, 100], (100, 400], > 400.

The components of each label value are found with one `scipy.ndimage.label` call over the
bounding box of its candidate voxels, with a structuring element that has no z neighbours (so a
component never crosses slices); per-lesion statistics come from `np.bincount` and
`np.maximum.reduceat` over the component ids of the candidate voxels: no Python loop over voxels.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import ndimage

from data_pipeline.constants import (
    ARTERY_NAMES,
    CALCIUM_THRESHOLD_HU,
    CATEGORY_NAMES,
    CATEGORY_NAMES_5,
    CATEGORY_UPPER,
    CATEGORY_UPPER_5,
    CORONARY_LABELS,
)
from data_pipeline.errors import InputError, LabelError, StudyReadError

__all__ = [
    "ARTERY_NAMES", "CALCIUM_THRESHOLD_HU", "CATEGORY_NAMES", "CATEGORY_NAMES_5", "CORONARY_LABELS",
    "DEFAULT_MIN_AREA_MM2", "REFERENCE_SLICE_MM", "WEIGHT_THRESHOLDS_HU", "AgatstonResult", "Lesion",
    "agatston_score", "cac_category", "hu_problem", "score_study", "study_warnings",
]

# Agatston et al. 1990: peak-density weights start at 130 (CALCIUM_THRESHOLD_HU), 200, 300, 400.
WEIGHT_THRESHOLDS_HU = (200.0, 300.0, 400.0)
# The score was defined on contiguous 3 mm slices; other spacings are scaled by spacing / 3 mm.
REFERENCE_SLICE_MM = 3.0
DEFAULT_MIN_AREA_MM2 = 1.0


# Header spacings are decimal strings: a lesion whose exact area equals the minimum must not be
# dropped because count * dy * dx rounded down in binary floating point.
_AREA_RTOL = 1e-9
# Likewise a score whose exact value is a category bound (625 pixels of 0.4 x 0.4 mm at weight 1
# on 3 mm slices: 100) must not move up a category because the sum came out 100.00000000000001.
# The sum's rounding is a few 1e-16 per term, so 1e-12 covers any lesion count while a real
# score above a bound (100.00000001) still moves up.
_CATEGORY_RTOL = 1e-12
# Thickness and spacing closer than this (mm) are treated as equal (header rounding).
_THICKNESS_ATOL_MM = 0.01
# Above this fraction of labelled coronary voxels under 130 HU, the labels probably do not belong
# to this image (wrong file, flipped slice order): annotations mark calcium, which is >= 130 HU,
# plus at most a rim of blurred edge voxels.
_MISALIGNED_FRACTION = 0.9
_MISALIGNED_MIN_VOXELS = 10
# 2D 8-connectivity within each axial slice and no connection between slices.
_SLICE_8_CONNECTIVITY = np.zeros((3, 3, 3), dtype=bool)
_SLICE_8_CONNECTIVITY[1] = True


@dataclasses.dataclass(frozen=True)
class Lesion:
    """One counted calcified lesion: an 8-connected component on one axial slice, one label value.

    `agatston` is this lesion's contribution to the total, z-spacing factor included;
    `centroid_yx` is in voxel coordinates of its slice.
    """

    slice_index: int
    label: int
    artery: str
    area_mm2: float
    peak_hu: float
    weight: int
    agatston: float
    volume_mm3: float
    mass_mg: float | None
    n_voxels: int
    centroid_yx: tuple[float, float]

    def to_json_dict(self) -> dict[str, Any]:
        """Plain-Python dict (json.dumps-able) with the field names as keys."""
        return {
            "slice_index": self.slice_index,
            "label": self.label,
            "artery": self.artery,
            "area_mm2": self.area_mm2,
            "peak_hu": self.peak_hu,
            "weight": self.weight,
            "agatston": self.agatston,
            "volume_mm3": self.volume_mm3,
            "mass_mg": self.mass_mg,
            "n_voxels": self.n_voxels,
            "centroid_yx": list(self.centroid_yx),
        }


@dataclasses.dataclass(frozen=True)
class AgatstonResult:
    """Scores of one study: totals, category, per-artery Agatston, the lesions and warnings."""

    agatston: float
    volume_mm3: float
    mass_mg: float | None
    category: int
    category_name: str
    per_artery: dict[str, float]
    lesions: tuple[Lesion, ...]
    spacing_zyx_mm: tuple[float, float, float]
    warnings: tuple[str, ...]

    def to_json_dict(self) -> dict[str, Any]:
        """The JSON object of `cac-jax score` (docs/contracts.md), keys exactly as contracted."""
        return {
            "agatston": self.agatston,
            "volume_mm3": self.volume_mm3,
            "mass_mg": self.mass_mg,
            "category": self.category,
            "category_name": self.category_name,
            "per_artery": {name: self.per_artery[name] for name in ARTERY_NAMES.values()},
            "lesions": [lesion.to_json_dict() for lesion in self.lesions],
            "spacing_zyx_mm": list(self.spacing_zyx_mm),
            "warnings": list(self.warnings),
        }


def cac_category(agatston: float, five_class: bool = False) -> int:
    """CAC category index of an Agatston score.

    Four classes (the paper): 0 -> 0, (0, 100] -> 1, (100, 400] -> 2, > 400 -> 3.
    Five classes: 0 -> 0, (0, 10] -> 1, (10, 100] -> 2, (100, 400] -> 3, > 400 -> 4.
    A score within a relative 1e-12 above a bound is at the bound (floating-point rounding of a
    sum whose exact value is the bound).
    """
    score = float(agatston)
    if not math.isfinite(score) or score < 0:
        raise ValueError(f"Agatston score must be a finite number >= 0, got {agatston!r}")
    if score == 0.0:
        return 0
    uppers = CATEGORY_UPPER_5 if five_class else CATEGORY_UPPER
    for index, upper in enumerate(uppers):
        if score <= upper * (1.0 + _CATEGORY_RTOL):
            return index + 1
    return len(uppers) + 1


def _check_spacing(spacing_zyx_mm: Sequence[float]) -> tuple[float, float, float]:
    try:
        spacing = tuple(float(s) for s in spacing_zyx_mm)
    except (TypeError, ValueError) as err:
        raise ValueError(f"spacing_zyx_mm must be 3 numbers (z, y, x) in mm, got "
                         f"{spacing_zyx_mm!r}") from err
    if len(spacing) != 3 or not all(math.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(f"spacing_zyx_mm must be 3 positive finite numbers (z, y, x) in mm, got "
                         f"{spacing_zyx_mm!r}")
    return spacing  # type: ignore[return-value]


def _check_labels(labels: np.ndarray, hu_shape: tuple[int, ...]) -> np.ndarray:
    """Returns the labels as an integer array; LabelError for wrong shape, fractions, negatives."""
    if labels.shape != hu_shape:
        raise LabelError(None, f"label volume shape {labels.shape} (z, y, x) does not match the "
                               f"image shape {hu_shape}")
    if labels.dtype == bool:
        raise LabelError(None, "label volume is boolean; expected integer labels (0 none, 1 LAD, "
                               "2 LCX, 3 RCA, 4 other coronary, >= 5 non-coronary)")
    if not (np.issubdtype(labels.dtype, np.integer) or np.issubdtype(labels.dtype, np.floating)):
        raise LabelError(None, f"label volume has dtype {labels.dtype}; expected integer labels")
    if labels.size == 0:
        return labels
    if np.issubdtype(labels.dtype, np.floating):
        if not np.all(np.isfinite(labels)) or not np.array_equal(labels, np.round(labels)):
            raise LabelError(None, "label volume has non-integer values; expected integer labels")
        if labels.max() > np.iinfo(np.int32).max:
            raise LabelError(None, f"label volume has a value {labels.max():g}, too large for a "
                                   "label")
        labels = labels.astype(np.int32)
    low = labels.min()
    if low < 0:
        raise LabelError(None, f"label volume has negative values (minimum {int(low)}); labels "
                               "are 0 (none), 1-4 (coronary) or >= 5 (non-coronary)")
    return labels


def _thickness_warning(thickness_mm: float | None, spacing_z: float) -> list[str]:
    if thickness_mm is None:
        return []
    thickness = float(thickness_mm)
    if not math.isfinite(thickness) or thickness <= 0:
        return [f"slice thickness {thickness_mm!r} mm in the header is not a positive number; "
                "ignored"]
    factor = spacing_z / REFERENCE_SLICE_MM
    if thickness > spacing_z + _THICKNESS_ATOL_MM:
        return [f"overlapping slices: slice thickness {thickness:g} mm > slice spacing "
                f"{spacing_z:g} mm; the score uses the spacing (factor {factor:.4g} = "
                f"{spacing_z:g}/3 mm), not the thickness, so overlapping calcium is not double "
                "counted"]
    if thickness < spacing_z - _THICKNESS_ATOL_MM:
        return [f"gaps between slices: slice thickness {thickness:g} mm < slice spacing "
                f"{spacing_z:g} mm; calcium between slices is not imaged, and the score (factor "
                f"{factor:.4g} = {spacing_z:g}/3 mm) may be underestimated"]
    return []


@dataclasses.dataclass(frozen=True)
class _Components:
    """Per-component statistics (arrays indexed by component): of one label value, or of all of
    them concatenated (`_lesion_table`)."""

    label: np.ndarray        # int64, the label value of each component
    n_voxels: np.ndarray     # int64
    sum_hu: np.ndarray       # float64
    peak_hu: np.ndarray      # float64
    slice_index: np.ndarray  # int64
    first_flat: np.ndarray   # int64, raster index of the first voxel (ordering key)
    centroid_y: np.ndarray   # float64
    centroid_x: np.ndarray   # float64


def _components(value: int, flat: np.ndarray, hu_values: np.ndarray,
                shape: tuple[int, ...]) -> _Components:
    """Per-slice 8-connected components of one label value's candidate voxels.

    `flat` are the candidates' raster indices into a volume of `shape` (increasing), `hu_values`
    their HU. The voxels are painted into a boolean box just large enough to hold them, labelled
    with one `ndimage.label` call, and the component ids are gathered back for the statistics.
    """
    z, y, x = np.unravel_index(flat, shape)
    z0, y0, x0 = int(z.min()), int(y.min()), int(x.min())
    z, y, x = z - z0, y - y0, x - x0
    mask = np.zeros((int(z.max()) + 1, int(y.max()) + 1, int(x.max()) + 1), dtype=bool)
    mask[z, y, x] = True
    component_ids, n_components = ndimage.label(mask, structure=_SLICE_8_CONNECTIVITY)
    ids = component_ids[z, y, x] - 1
    n_voxels = np.bincount(ids, minlength=n_components)
    # First voxel of each component in raster order (flat is increasing): its slice and ordering key.
    _, first = np.unique(ids, return_index=True)
    order = np.argsort(ids, kind="stable")
    starts = np.concatenate(([0], np.cumsum(n_voxels)[:-1]))
    return _Components(
        label=np.full(n_components, value),
        n_voxels=n_voxels,
        sum_hu=np.bincount(ids, weights=hu_values, minlength=n_components),
        peak_hu=np.maximum.reduceat(hu_values[order], starts),
        slice_index=z[first] + z0,
        first_flat=flat[first],
        centroid_y=np.bincount(ids, weights=y, minlength=n_components) / n_voxels + y0,
        centroid_x=np.bincount(ids, weights=x, minlength=n_components) / n_voxels + x0,
    )


def _check_options(min_area_mm2: float,
                   calibration_mg_per_hu_mm3: float | None) -> tuple[float, float | None]:
    """The minimum lesion area and the mass calibration factor (or None) as floats; ValueError
    for a negative or non-finite area or a non-positive or non-finite factor."""
    min_area = float(min_area_mm2)
    if not math.isfinite(min_area) or min_area < 0:
        raise ValueError(f"min_area_mm2 must be a finite number >= 0, got {min_area_mm2!r}")
    calibration = None
    if calibration_mg_per_hu_mm3 is not None:
        calibration = float(calibration_mg_per_hu_mm3)
        if not math.isfinite(calibration) or calibration <= 0:
            raise ValueError("calibration_mg_per_hu_mm3 must be a finite number > 0, got "
                             f"{calibration_mg_per_hu_mm3!r}")
    return min_area, calibration


def _misaligned(n_labelled: int, n_calcium: int) -> str | None:
    """The warning for coronary labels nearly all under 130 HU (labels of another image)."""
    if (n_labelled >= _MISALIGNED_MIN_VOXELS
            and n_labelled - n_calcium > _MISALIGNED_FRACTION * n_labelled):
        return (f"{n_labelled - n_calcium} of {n_labelled} voxels labelled 1-4 (coronary) are "
                f"below {CALCIUM_THRESHOLD_HU:g} HU and are not scored; check that the labels "
                "belong to this image (same scan, same slice order)")
    return None


def misaligned_labels(hu: np.ndarray, labels: np.ndarray) -> str | None:
    """`agatston_score`'s warning that the coronary labels (1-4) lie nearly all under 130 HU,
    so they probably belong to another image; None when they do not."""
    coronary = (labels >= CORONARY_LABELS[0]) & (labels <= CORONARY_LABELS[-1])
    n_labelled = int(np.count_nonzero(coronary))
    if n_labelled < _MISALIGNED_MIN_VOXELS:
        return None
    return _misaligned(n_labelled, int(np.count_nonzero(hu[coronary] >= CALCIUM_THRESHOLD_HU)))


def _candidates(hu: np.ndarray, labels: np.ndarray,
                warnings: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Raster indices (increasing), HU (float64) and labels of the candidate voxels (rule 1).

    One pass over the volume finds the (sparse) coronary-labelled voxels; the rest works on them.
    StudyReadError for non-finite HU among them; appends a warning to `warnings` when nearly all
    of them are under 130 HU (labels that probably belong to another image).
    """
    coronary_flat = np.flatnonzero((labels >= CORONARY_LABELS[0])
                                   & (labels <= CORONARY_LABELS[-1]))
    coronary_hu = hu.reshape(-1)[coronary_flat].astype(np.float64)
    if not np.all(np.isfinite(coronary_hu)):
        raise StudyReadError(None, "image has non-finite HU values (NaN/inf) inside the coronary "
                                   "labels")
    calcium = coronary_hu >= CALCIUM_THRESHOLD_HU
    message = _misaligned(int(coronary_hu.size), int(np.count_nonzero(calcium)))
    if message:
        warnings.append(message)
    candidate_flat = coronary_flat[calcium]
    return candidate_flat, coronary_hu[calcium], labels.reshape(-1)[candidate_flat]


def _lesion_table(flat: np.ndarray, hu_values: np.ndarray, labels: np.ndarray,
                  shape: tuple[int, ...]) -> _Components:
    """The components (rule 2) of every coronary label value, label by label, in one table."""
    per_label = []
    for value in CORONARY_LABELS:
        selected = labels == value
        if np.any(selected):
            per_label.append(_components(value, flat[selected], hu_values[selected], shape))
    if not per_label:
        ints, floats = np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float64)
        return _Components(label=ints, n_voxels=ints, sum_hu=floats, peak_hu=floats,
                           slice_index=ints, first_flat=ints, centroid_y=floats,
                           centroid_x=floats)
    return _Components(**{field.name: np.concatenate([getattr(c, field.name) for c in per_label])
                          for field in dataclasses.fields(_Components)})


def agatston_score(
    hu: np.ndarray,
    labels: np.ndarray,
    spacing_zyx_mm: Sequence[float],
    *,
    min_area_mm2: float = DEFAULT_MIN_AREA_MM2,
    calibration_mg_per_hu_mm3: float | None = None,
    slice_thickness_mm: float | None = None,
    five_class: bool = False,
) -> AgatstonResult:
    """Scores an HU volume `(z, y, x)` with its label volume by the rules of docs/contracts.md.

    Args:
      hu: Hounsfield units, `(z, y, x)`.
      labels: integer labels of the same shape: 1 LAD, 2 LCX, 3 RCA, 4 other coronary; 0 and
        values >= 5 are not scored.
      spacing_zyx_mm: voxel spacing; z is the distance between slice centres.
      min_area_mm2: smallest lesion area that counts (>=).
      calibration_mg_per_hu_mm3: mass calibration factor (mg per HU*mm^3, about 0.00075 at
        120 kVp); mass is None without it.
      slice_thickness_mm: nominal thickness from the header, only to warn when it differs from the
        spacing (the score always uses the spacing).
      five_class: categorise into five classes instead of the paper's four.

    Raises:
      LabelError: labels of another shape, non-integer or negative.
      StudyReadError: non-finite HU inside the coronary labels.
      ValueError: a bad spacing, minimum area or calibration factor, or a volume that is not 3D.
    """
    hu = np.asarray(hu)
    labels = np.asarray(labels)
    if hu.ndim != 3:
        raise ValueError(f"hu must be a 3D (z, y, x) volume, got shape {hu.shape}")
    if not (np.issubdtype(hu.dtype, np.floating) or np.issubdtype(hu.dtype, np.integer)):
        raise ValueError(f"hu must be a real-valued array, got dtype {hu.dtype}")
    labels = _check_labels(labels, hu.shape)
    spacing = _check_spacing(spacing_zyx_mm)
    min_area, calibration = _check_options(min_area_mm2, calibration_mg_per_hu_mm3)

    spacing_z, spacing_y, spacing_x = spacing
    pixel_area = spacing_y * spacing_x
    voxel_volume = pixel_area * spacing_z
    z_factor = spacing_z / REFERENCE_SLICE_MM
    warnings = _thickness_warning(slice_thickness_mm, spacing_z)
    candidate_flat, candidate_hu, candidate_label = _candidates(hu, labels, warnings)
    table = _lesion_table(candidate_flat, candidate_hu, candidate_label, hu.shape)
    n_voxels, sum_hu, peak_hu, label = table.n_voxels, table.sum_hu, table.peak_hu, table.label
    slice_index, first_flat = table.slice_index, table.first_flat
    centroid_y, centroid_x = table.centroid_y, table.centroid_x

    area = n_voxels * pixel_area
    counted = area >= min_area * (1.0 - _AREA_RTOL)
    weight = 1 + np.searchsorted(np.asarray(WEIGHT_THRESHOLDS_HU), peak_hu, side="right")
    weighted_area = area * weight

    order = np.lexsort((first_flat, label, slice_index))  # by slice, then label, then position
    order = order[counted[order]]

    # Totals exactly as the contract states them: sum(area * weight) * (z spacing / 3 mm).
    total = float(np.sum(weighted_area[order])) * z_factor
    per_artery = {
        name: float(np.sum(weighted_area[order][label[order] == value])) * z_factor
        for value, name in ARTERY_NAMES.items()
    }
    n_counted = int(np.sum(n_voxels[order]))
    volume = n_counted * pixel_area * spacing_z
    mass = None if calibration is None else calibration * float(np.sum(sum_hu[order])) * voxel_volume

    lesions = tuple(
        Lesion(
            slice_index=int(slice_index[i]),
            label=int(label[i]),
            artery=ARTERY_NAMES[int(label[i])],
            area_mm2=float(area[i]),
            peak_hu=float(peak_hu[i]),
            weight=int(weight[i]),
            agatston=float(weighted_area[i]) * z_factor,
            volume_mm3=int(n_voxels[i]) * pixel_area * spacing_z,
            mass_mg=None if calibration is None else calibration * float(sum_hu[i]) * voxel_volume,
            n_voxels=int(n_voxels[i]),
            centroid_yx=(float(centroid_y[i]), float(centroid_x[i])),
        )
        for i in order
    )
    category = cac_category(total, five_class=five_class)
    names = CATEGORY_NAMES_5 if five_class else CATEGORY_NAMES
    return AgatstonResult(
        agatston=total,
        volume_mm3=float(volume),
        mass_mg=mass,
        category=category,
        category_name=names[category],
        per_artery=per_artery,
        lesions=lesions,
        spacing_zyx_mm=spacing,
        warnings=tuple(warnings),
    )


def hu_problem(hu: np.ndarray) -> str | None:
    """Why an image does not look like CT in Hounsfield units, or None.

    Air (outside the body, lungs) is about -1000 HU; a chest CT without anything below -200 HU
    was most likely stored without its rescale intercept (HU + 1024 as unsigned integers), or is
    not a CT at all (an MR image). Thresholds and weights at 130-400 HU then mean nothing.
    """
    if hu.size == 0:
        return None
    low = float(np.min(hu))
    if low > -200.0:
        return (f"the image's lowest value is {low:g} HU, but a chest CT contains air at about "
                "-1000 HU; check that the image is in Hounsfield units (rescale slope/intercept)")
    return None


def study_warnings(volume, *, check_hu: bool = True) -> list[str]:
    """What `score_study` warns about a study besides its labels: the DICOM series chosen and
    skipped, header values the reader tolerated, a tube voltage other than 120 kVp and (with
    `check_hu`) an image that does not look like HU (`hu_problem`)."""
    metadata = volume.metadata
    notes = [f"skipped series {note}" for note in metadata.skipped_series]
    if metadata.skipped_series and metadata.chosen_series:
        notes.insert(0, f"chosen series {metadata.chosen_series}")
    notes.extend(metadata.warnings)
    # The 130 HU threshold and the weights were defined at 120 kVp (Agatston 1990).
    if metadata.kvp is not None and abs(float(metadata.kvp) - 120.0) > 0.5:
        notes.append(f"tube voltage is {float(metadata.kvp):g} kVp; the Agatston thresholds are "
                     "defined at 120 kVp, so the score is not directly comparable")
    problem = hu_problem(volume.hu) if check_hu else None
    if problem:
        notes.append(problem)
    return notes


def score_study(
    image_path: str | os.PathLike,
    labels_path: str | os.PathLike,
    *,
    min_area_mm2: float = DEFAULT_MIN_AREA_MM2,
    calibration_mg_per_hu_mm3: float | None = None,
    five_class: bool = False,
    series: int | str | None = None,
) -> AgatstonResult:
    """Reads a study and its label file (each a DICOM folder or a file SimpleITK reads) and scores it.

    The slice thickness from the image header feeds the overlap/gap warning; series skipped while
    reading a DICOM folder, a tube voltage other than 120 kVp and an image that does not look like
    HU are reported in `warnings`, with the chosen series when there was a choice and header values
    the reader tolerated. `series` picks a DICOM series (`data_pipeline.io.read_study`). Raises an
    `InputError` subclass naming the file on bad input.
    """
    from data_pipeline import io as study_io

    volume = study_io.read_study(image_path, series=series)
    labels = study_io.read_labels(labels_path, like=volume)
    metadata = volume.metadata
    try:
        result = agatston_score(
            volume.hu, labels, volume.spacing_zyx_mm,
            min_area_mm2=min_area_mm2,
            calibration_mg_per_hu_mm3=calibration_mg_per_hu_mm3,
            slice_thickness_mm=metadata.slice_thickness_mm,
            five_class=five_class,
        )
    except InputError as err:
        if err.path is not None:
            raise
        path = labels_path if isinstance(err, LabelError) else image_path
        raise type(err)(path, err.problem) from err

    notes = study_warnings(volume)
    if not notes:
        return result
    return dataclasses.replace(result, warnings=result.warnings + tuple(notes))
