"""Reference scorers that need no trained model, for comparison with the learned ones.

The naive threshold scorer counts every voxel at HU >= 130 inside a heart mask as coronary calcium
(label 4, "coronary, artery not determined"). It is what a segmentation model must beat: it counts
valve and mitral-annulus calcium, noise and (with a loose mask) bone as coronary.
"""

from __future__ import annotations

import numpy as np

from cac_jax.scoring import CALCIUM_THRESHOLD_HU, AgatstonResult, agatston_score

UNDETERMINED_CORONARY_LABEL = 4


def threshold_labels(hu: np.ndarray, heart_mask: np.ndarray) -> np.ndarray:
    """Label volume (int16) with 4 wherever HU >= 130 inside `heart_mask`, 0 elsewhere."""
    hu = np.asarray(hu)
    heart_mask = np.asarray(heart_mask)
    if hu.shape != heart_mask.shape:
        raise ValueError(f"heart mask shape {heart_mask.shape} does not match the image shape "
                         f"{hu.shape}")
    candidates = (hu >= CALCIUM_THRESHOLD_HU) & (heart_mask > 0)
    return candidates.astype(np.int16) * UNDETERMINED_CORONARY_LABEL


def threshold_score(hu: np.ndarray, heart_mask: np.ndarray, spacing_zyx_mm,
                    **score_kwargs) -> AgatstonResult:
    """Agatston result of the naive threshold scorer (`threshold_labels` scored by the contract)."""
    return agatston_score(hu, threshold_labels(hu, heart_mask), spacing_zyx_mm, **score_kwargs)
