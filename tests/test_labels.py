"""Label mapping, HU window and 3-slice windows (numpy only)."""

import numpy as np
import pytest

from data_pipeline import labels as L


def test_calcium_classes_mapping():
    labels = np.array([[0, 1, 2, 3, 4, 5, 6, 7, 0, 0, 3]], np.int16)
    hu = np.array([[0, 300, 500, 140, 90, 100, 800, 200, 130, 129, 50]], np.float32)
    classes = L.calcium_classes(labels, hu)
    # coronary 1-4 -> 1 (whatever the HU); >= 5 -> 2; unlabelled at HU >= 130 -> 2; else 0.
    np.testing.assert_array_equal(classes, [[0, 1, 1, 1, 1, 2, 2, 2, 2, 0, 1]])
    assert classes.dtype == np.uint8


def test_calcium_classes_shape_mismatch():
    with pytest.raises(ValueError, match="shape"):
        L.calcium_classes(np.zeros((2, 3)), np.zeros((3, 2)))


def test_heart_classes():
    np.testing.assert_array_equal(L.heart_classes(np.array([0, 1, 255, 2])), [0, 1, 1, 1])


def test_window_hu():
    out = L.window_hu(np.array([-2000, -800, 200, 1200, 3000]))
    np.testing.assert_allclose(out, [0.0, 0.0, 0.5, 1.0, 1.0])
    assert out.dtype == np.float32


def test_window_indices_repeat_edges():
    np.testing.assert_array_equal(L.window_indices(4), [[0, 0, 1], [0, 1, 2], [1, 2, 3],
                                                        [2, 3, 3]])
    np.testing.assert_array_equal(L.window_indices(1), [[0, 0, 0]])
    np.testing.assert_array_equal(L.window_indices(5, [4]), [[3, 4, 4]])
    with pytest.raises(ValueError):
        L.window_indices(3, [3])


def test_slice_windows_and_flags():
    volume = np.arange(4)[:, None, None] * np.ones((4, 2, 2))
    windows = L.slice_windows(volume)
    assert windows.shape == (4, 3, 2, 2)
    np.testing.assert_array_equal(windows[:, :, 0, 0], [[0, 0, 1], [0, 1, 2], [1, 2, 3],
                                                        [2, 3, 3]])
    labels = np.zeros((3, 2, 2), np.int16)
    labels[1, 0, 0] = 6
    np.testing.assert_array_equal(L.calcium_slices(labels), [False, True, False])
    np.testing.assert_array_equal(L.heart_slices(labels), [False, True, False])
