"""Focal loss (Lin et al. 2017): cross-entropy at gamma 0 / alpha 1, hand values, weights."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cac_jax.losses import focal_loss, focal_loss_map

RNG = np.random.default_rng(0)


def test_gamma_zero_alpha_one_is_cross_entropy():
    logits = RNG.normal(0, 3, (2, 5, 7, 3)).astype(np.float32)
    labels = RNG.integers(0, 3, (2, 5, 7))
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    np.testing.assert_allclose(focal_loss_map(logits, labels, gamma=0.0), ce, rtol=1e-6,
                               atol=1e-6)
    np.testing.assert_allclose(focal_loss_map(logits, labels, alpha=(1, 1, 1), gamma=0.0), ce,
                               rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(focal_loss(logits, labels, gamma=0.0), np.mean(ce), rtol=1e-6)


def test_hand_computed_values():
    # Two classes, logits (0, log 3): p = (0.25, 0.75).
    logits = np.array([[0.0, math.log(3.0)], [0.0, math.log(3.0)]], np.float32)
    labels = np.array([1, 0])
    alpha = (0.4, 2.0)
    got = np.asarray(focal_loss_map(logits, labels, alpha=alpha, gamma=2.0))
    expected = [-2.0 * 0.25**2 * math.log(0.75), -0.4 * 0.75**2 * math.log(0.25)]
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    # gamma 1, three classes, uniform logits: p_t = 1/3.
    got = float(focal_loss_map(np.zeros((1, 3), np.float32), np.array([2]), gamma=1.0)[0])
    assert got == pytest.approx(-(2.0 / 3.0) * math.log(1.0 / 3.0), rel=1e-6)


def test_focal_down_weights_easy_pixels():
    logits = np.array([[8.0, 0.0, 0.0], [0.5, 0.0, 0.0]], np.float32)
    labels = np.array([0, 0])
    ce = np.asarray(focal_loss_map(logits, labels, gamma=0.0))
    fl = np.asarray(focal_loss_map(logits, labels, gamma=2.0))
    assert (fl < ce).all()
    assert fl[0] / ce[0] < 1e-6 < fl[1] / ce[1]  # the confident pixel is nearly ignored


def test_weight_zeroes_padding():
    logits = RNG.normal(0, 2, (1, 4, 6, 3)).astype(np.float32)
    labels = RNG.integers(0, 3, (1, 4, 6))
    weight = np.ones((1, 4, 6), np.float32)
    weight[:, :, 3:] = 0.0  # padding on the right half
    padded = focal_loss(logits, labels, weight, alpha=(0.1, 1.0, 0.5))
    logits2 = logits.copy()
    logits2[:, :, 3:] = 1e3 * RNG.normal(size=(1, 4, 3, 3))  # anything in the padding
    labels2 = labels.copy()
    labels2[:, :, 3:] = 2
    assert float(focal_loss(logits2, labels2, weight, alpha=(0.1, 1.0, 0.5))) == pytest.approx(
        float(padded), rel=1e-6)
    crop = focal_loss(logits[:, :, :3], labels[:, :, :3], alpha=(0.1, 1.0, 0.5))
    assert float(padded) == pytest.approx(float(crop), rel=1e-6)
    assert float(focal_loss(logits, labels, np.zeros_like(weight))) == 0.0


def test_large_logits_are_finite_and_alpha_checked():
    logits = jnp.array([[1e4, -1e4, 0.0]])
    assert np.isfinite(np.asarray(focal_loss_map(logits, np.array([1])))).all()
    with pytest.raises(ValueError, match="one weight per class"):
        focal_loss_map(logits, np.array([0]), alpha=(1.0, 1.0))
