"""Predicted masks -> Agatston labels: heart silhouette, coronary labels, and the score."""

import numpy as np
import pytest

from cac_jax import postprocess
from cac_jax.baselines import threshold_labels
from cac_jax.scoring import agatston_score


def test_heart_silhouette_keeps_largest_component_and_dilates_in_mm():
    pred = np.zeros((5, 40, 40), np.uint8)
    pred[1:4, 10:20, 10:20] = 1  # the heart
    pred[2, 35:37, 35:37] = 1  # a stray island
    sil = postprocess.heart_silhouette(pred, (3.0, 1.0, 1.0), dilation_mm=2.0)
    assert not sil[2, 35, 35]
    assert sil[2, 10:20, 10:20].all()
    # Grown by 2 mm in-plane (2 pixels of 1 mm), but not by a 3 mm slice in z.
    assert sil[2, 15, 8] and not sil[2, 15, 7]
    assert not sil[0].any() and not sil[4].any()
    # Physical distance: with 0.5 mm pixels the same 2 mm is 4 pixels.
    sil_fine = postprocess.heart_silhouette(pred, (3.0, 0.5, 0.5), dilation_mm=2.0)
    assert sil_fine[2, 15, 6] and not sil_fine[2, 15, 5]
    assert not postprocess.heart_silhouette(np.zeros((2, 4, 4)), (3, 1, 1)).any()
    np.testing.assert_array_equal(postprocess.heart_silhouette(pred, (3, 1, 1), 0.0)[2, 35, 35],
                                  False)


def test_coronary_labels_need_coronary_class_heart_and_130_hu():
    hu = np.full((1, 2, 3), 200.0)
    hu[0, 0, 0] = 129.0
    pred = np.array([[[1, 1, 2], [1, 0, 1]]])
    heart = np.array([[[1, 1, 1], [1, 1, 0]]])
    labels = postprocess.coronary_labels(pred, hu, heart)
    np.testing.assert_array_equal(labels, [[[0, 4, 0], [4, 0, 0]]])
    assert labels.dtype == np.int16
    with pytest.raises(ValueError, match="shape"):
        postprocess.coronary_labels(pred[:, :1], hu, heart)


def test_perfect_prediction_scores_like_the_threshold_inside_the_heart():
    rng = np.random.default_rng(0)
    hu = rng.normal(0, 200, (4, 32, 32)).astype(np.float32)
    heart = np.zeros(hu.shape, bool)
    heart[:, 8:24, 8:24] = True
    pred = np.where(hu >= 130, 1, 0)
    result = postprocess.predicted_score(hu, pred, heart, (3.0, 0.7, 0.7))
    expected = agatston_score(hu, threshold_labels(hu, heart), (3.0, 0.7, 0.7))
    assert result.agatston == pytest.approx(expected.agatston)
    assert result.agatston > 0


def test_heart_silhouette_equals_labelling_the_whole_volume():
    """Components are labelled inside the predicted voxels' bounding box only: the silhouette is
    the one a whole-volume labelling (the direct reading of the definition) gives."""
    from scipy import ndimage

    def whole_volume(pred, spacing, dilation_mm):
        components, count = ndimage.label(pred, structure=np.ones((3, 3, 3), bool))
        if count == 0:
            return np.zeros(pred.shape, bool)
        largest = components == np.argmax(np.bincount(components.ravel())[1:]) + 1
        return ndimage.distance_transform_edt(~largest, sampling=spacing) <= dilation_mm

    rng = np.random.default_rng(5)
    zz, yy, xx = np.ogrid[:30, :60, :50]
    for case in range(8):
        pred = rng.random((30, 60, 50)) > 0.9995  # islands
        for _ in range(case % 4):
            c, r = rng.integers([3, 5, 5], [27, 55, 45]), rng.integers(2, 9)
            pred |= (zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2 < r * r
        for dilation in (0.0, 4.0):
            got = postprocess.heart_silhouette(pred, (2.5, 0.7, 0.8), dilation)
            np.testing.assert_array_equal(got, whole_volume(pred, (2.5, 0.7, 0.8), dilation))
    assert not postprocess.heart_silhouette(np.zeros((3, 4, 5)), (1, 1, 1), 5.0).any()
