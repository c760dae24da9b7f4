"""Predicted masks -> Agatston labels -> score: the one post-processing that training's validation
and inference share (numpy + scipy only: no JAX, no TensorFlow).

docs/contracts.md ("Model inputs and targets") and the paper's two-model design: the heart model's
silhouette removes the bone the calcium model would otherwise overcall; inside it, the calcium
model's coronary class at HU >= 130 is coronary calcium. The models do not name arteries, so every
predicted voxel gets label 4 (coronary, artery not determined; orCaScore convention) and the
Agatston scorer does the rest by the contract (lesions, minimum area, weights, categories).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from cac_jax.scoring import CALCIUM_THRESHOLD_HU, AgatstonResult, agatston_score

UNDETERMINED_CORONARY_LABEL = 4  # orCaScore: coronary calcium of undetermined artery
CORONARY_CLASS = 1  # the calcium model's classes: 0 background, 1 coronary, 2 non-coronary
NON_CORONARY_CLASS = 2
# Margin added around the predicted heart: the coronaries lie on the heart's surface, in the
# epicardial fat, so a silhouette that hugs the myocardium would clip them. Our choice.
DEFAULT_HEART_DILATION_MM = 3.0


def _spacing(spacing_zyx_mm: Sequence[float]) -> tuple[float, float, float]:
    spacing = tuple(float(s) for s in spacing_zyx_mm)
    if len(spacing) != 3 or not all(np.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(f"spacing_zyx_mm must be 3 positive numbers, got {spacing_zyx_mm}")
    return spacing


def heart_silhouette(heart_pred: np.ndarray, spacing_zyx_mm: Sequence[float],
                     dilation_mm: float = DEFAULT_HEART_DILATION_MM) -> np.ndarray:
    """The heart silhouette from the heart model's mask: its largest 3D component, dilated.

    `heart_pred` is the (z, y, x) predicted heart mask (non-zero = heart). The largest
    26-connected component is kept (the heart is one organ; small islands are errors) and grown by
    `dilation_mm` in physical distance (anisotropic voxels handled by an exact Euclidean distance
    transform over the component's bounding box plus the margin). Returns bool (z, y, x); all False
    when nothing is predicted.
    """
    heart_pred = np.asarray(heart_pred) != 0
    spacing = _spacing(spacing_zyx_mm)
    if heart_pred.ndim != 3:
        raise ValueError(f"heart_pred must be (z, y, x), got shape {heart_pred.shape}")
    if dilation_mm < 0:
        raise ValueError(f"dilation_mm must be >= 0, got {dilation_mm}")
    # Components are found inside the predicted voxels' bounding box (the same components: none
    # lies outside it), a small part of a chest CT's volume.
    extent = [np.flatnonzero(heart_pred.any(axis=tuple(a for a in range(3) if a != axis)))
              for axis in range(3)]
    if not extent[0].size:
        return np.zeros(heart_pred.shape, bool)
    crop = tuple(slice(int(e[0]), int(e[-1]) + 1) for e in extent)
    components, _ = ndimage.label(heart_pred[crop], structure=np.ones((3, 3, 3), bool))
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    largest = np.zeros(heart_pred.shape, bool)
    largest[crop] = components == int(np.argmax(sizes))
    if dilation_mm == 0:
        return largest
    # Work inside the bounding box grown by the margin: the transform costs O(box), not O(volume).
    margin = [int(np.ceil(dilation_mm / s)) + 1 for s in spacing]
    box = ndimage.find_objects(largest.astype(np.int8))[0]
    box = tuple(slice(max(0, sl.start - m), min(n, sl.stop + m))
                for sl, m, n in zip(box, margin, largest.shape, strict=True))
    distance = ndimage.distance_transform_edt(~largest[box], sampling=spacing)
    silhouette = np.zeros(heart_pred.shape, bool)
    silhouette[box] = distance <= dilation_mm
    return silhouette


def coronary_labels(calcium_pred: np.ndarray, hu: np.ndarray,
                    heart_mask: np.ndarray | None) -> np.ndarray:
    """Agatston label volume (int16): 4 where the calcium model says coronary, inside the heart
    mask (None: everywhere), at HU >= 130; 0 elsewhere."""
    calcium_pred = np.asarray(calcium_pred)
    hu = np.asarray(hu)
    if calcium_pred.shape != hu.shape:
        raise ValueError(f"calcium prediction shape {calcium_pred.shape} differs from the image "
                         f"shape {hu.shape}")
    keep = (calcium_pred == CORONARY_CLASS) & (hu >= CALCIUM_THRESHOLD_HU)
    if heart_mask is not None:
        heart_mask = np.asarray(heart_mask)
        if heart_mask.shape != hu.shape:
            raise ValueError(f"heart mask shape {heart_mask.shape} differs from the image shape "
                             f"{hu.shape}")
        keep &= heart_mask != 0
    return keep.astype(np.int16) * UNDETERMINED_CORONARY_LABEL


def predicted_score(hu: np.ndarray, calcium_pred: np.ndarray, heart_mask: np.ndarray | None,
                    spacing_zyx_mm: Sequence[float], **score_kwargs) -> AgatstonResult:
    """Agatston result of a predicted calcium class map (restricted to `heart_mask`).

    `score_kwargs` go to `cac_jax.scoring.agatston_score` (min_area_mm2, calibration, five_class,
    slice_thickness_mm).
    """
    labels = coronary_labels(calcium_pred, hu, heart_mask)
    return agatston_score(hu, labels, spacing_zyx_mm, **score_kwargs)
