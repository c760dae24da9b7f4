"""Agatston score, calcium volume and mass, and CAC categories (docs/contracts.md, the rules).

The implementation is `data_pipeline.agatston` (the lower package layer: the dataset builder and
the synthetic cohort score reference labels too, and `data_pipeline` never imports `cac_jax`);
this module is its public home for users, the CLI and inference. No JAX, no TensorFlow.
"""

from __future__ import annotations

from data_pipeline.agatston import (
    ARTERY_NAMES,
    CALCIUM_THRESHOLD_HU,
    CATEGORY_NAMES,
    CATEGORY_NAMES_5,
    CORONARY_LABELS,
    DEFAULT_MIN_AREA_MM2,
    REFERENCE_SLICE_MM,
    WEIGHT_THRESHOLDS_HU,
    AgatstonResult,
    Lesion,
    agatston_score,
    cac_category,
    score_study,
)

__all__ = [
    "ARTERY_NAMES", "CALCIUM_THRESHOLD_HU", "CATEGORY_NAMES", "CATEGORY_NAMES_5", "CORONARY_LABELS",
    "DEFAULT_MIN_AREA_MM2", "REFERENCE_SLICE_MM", "WEIGHT_THRESHOLDS_HU", "AgatstonResult", "Lesion",
    "agatston_score", "cac_category", "score_study",
]
