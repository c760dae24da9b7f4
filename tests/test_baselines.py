"""The naive threshold scorer: HU >= 130 inside the heart mask, all counted as coronary."""

import numpy as np
import pytest

from cac_jax.baselines import threshold_labels, threshold_score


def test_threshold_labels_only_inside_heart_and_at_130():
    hu = np.zeros((1, 4, 4), np.float32)
    hu[0, 0, 0] = 129.9   # below threshold
    hu[0, 1, 1] = 130.0   # counts (>= 130)
    hu[0, 3, 3] = 900.0   # bone outside the heart mask
    heart = np.zeros_like(hu, np.uint8)
    heart[0, :3, :3] = 1
    labels = threshold_labels(hu, heart)
    assert labels.dtype == np.int16
    assert np.argwhere(labels).tolist() == [[0, 1, 1]]
    assert labels[0, 1, 1] == 4


def test_threshold_score_is_contract_score_of_threshold_labels():
    hu = np.full((2, 6, 6), 40.0, np.float32)
    hu[1, 2:4, 2:4] = 250.0  # 4 px of 0.5 mm = 1 mm^2, weight 2
    heart = np.ones_like(hu, np.uint8)
    result = threshold_score(hu, heart, (3.0, 0.5, 0.5))
    assert result.agatston == pytest.approx(1.0 * 2)
    assert result.per_artery["other"] == pytest.approx(2.0)
    with pytest.raises(ValueError, match="heart mask shape"):
        threshold_labels(hu, heart[:1])
