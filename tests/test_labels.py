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


def test_unwindow_hu_inverts_the_window_within_it():
    hu = np.array([-2000, -800, 0, 130, 1200, 3000], np.int16)
    back = L.unwindow_hu(L.window_hu(hu))
    np.testing.assert_array_equal(np.rint(back).astype(np.int16), np.clip(hu, -800, 1200))


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
    np.testing.assert_array_equal(L.annotated_calcium_slices(labels), [False, True, False])
    np.testing.assert_array_equal(L.heart_slices(labels), [False, True, False])


@pytest.mark.parametrize("spacing, offset", [(0.625, 5), (1.25, 2), (2.5, 1), (3.0, 1), (5.0, 1),
                                             (0.6, 5), (1.0, 3), (1.2, 3)])
def test_neighbour_offset_is_physical(spacing, offset):
    assert L.neighbour_offset(spacing, 3.0) == offset


def test_neighbour_offset_rejects_bad_values():
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="spacing"):
            L.neighbour_offset(bad)
    with pytest.raises(ValueError, match="neighbour_mm"):
        L.neighbour_offset(3.0, -1.0)


def test_windows_with_offset_and_model_inputs():
    np.testing.assert_array_equal(L.window_indices(6, [0, 3, 5], offset=2),
                                  [[0, 0, 2], [1, 3, 5], [3, 5, 5]])
    hu = np.arange(6 * 2 * 2, dtype=np.float32).reshape(6, 2, 2) * 100 - 800
    inputs = L.model_inputs(hu, [3], offset=2)
    assert inputs.shape == (1, 3, 2, 2, 1) and inputs.dtype == np.float32
    np.testing.assert_allclose(inputs[0, :, :, :, 0], L.window_hu(hu[[1, 3, 5]]))
