"""Numbers and codes that scoring, labels, the synthetic cohort and the models all share.

The one source of each (no imports: every layer can use it). The label codes follow the orCaScore
challenge convention the Agatston rules adopt (docs/contracts.md).
"""

from __future__ import annotations

# Agatston et al. 1990: calcium is HU >= 130.
CALCIUM_THRESHOLD_HU = 130.0

# Calcium label codes of an annotation: 1 LAD (with left main), 2 LCX, 3 RCA, 4 coronary of
# undetermined artery; 5 and above are non-coronary (aorta, valves, other) and never scored.
ARTERY_NAMES = {1: "LAD", 2: "LCX", 3: "RCA", 4: "other"}
CORONARY_LABELS = tuple(ARTERY_NAMES)
FIRST_NON_CORONARY_LABEL = 5

# CAC categories: 0, 1-100, 101-400, > 400 (the paper's four) and the five-class variant.
CATEGORY_NAMES = ("0", "1-100", "101-400", ">400")
CATEGORY_NAMES_5 = ("0", "1-10", "11-100", "101-400", ">400")
CATEGORY_UPPER = (100.0, 400.0)  # inclusive upper bounds of classes 1 and 2
CATEGORY_UPPER_5 = (10.0, 100.0, 400.0)
NUM_CATEGORIES = len(CATEGORY_NAMES)

# Distance between a centre slice and each neighbour the models see, in mm: one gated CAC slice
# spacing (3 mm, the reconstruction Agatston scoring is defined on). "Adjacent" is a physical
# distance, so a 0.625 mm series gives neighbours 5 slices away, not 0.6 mm away.
DEFAULT_NEIGHBOUR_MM = 3.0
