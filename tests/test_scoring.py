"""Agatston scorer (cac_jax.scoring): each contract rule and its boundary, with hand-computed values.

Unless a test says otherwise, volumes use 3 mm slices and 1 x 1 mm pixels (z factor 1, pixel area
1 mm^2), so a lesion's Agatston contribution is its pixel count times its weight.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from cac_jax.scoring import (
    ARTERY_NAMES,
    CATEGORY_NAMES,
    CATEGORY_NAMES_5,
    AgatstonResult,
    Lesion,
    agatston_score,
    cac_category,
)
from data_pipeline.errors import LabelError, StudyReadError

SPACING_3MM = (3.0, 1.0, 1.0)


def _empty(shape=(1, 8, 8)):
    return np.zeros(shape, np.float32), np.zeros(shape, np.int16)


def _single_blob(peak_hu, n_pixels=4, label=1, base_hu=150.0):
    """One slice with one 1 x n_pixels lesion whose first pixel holds the peak."""
    hu, labels = _empty((1, 4, 12))
    hu[0, 1, 1:1 + n_pixels] = base_hu
    hu[0, 1, 1] = peak_hu
    labels[0, 1, 1:1 + n_pixels] = label
    return hu, labels


# --- rule 1: candidates (label 1..4 and HU >= 130) ---------------------------------------------

@pytest.mark.parametrize("value, counted", [(129.0, False), (129.99, False), (130.0, True)])
def test_calcium_threshold_130(value, counted):
    hu, labels = _empty()
    hu[0, 2:4, 2:4] = value  # 4 px = 4 mm^2, weight 1
    labels[0, 2:4, 2:4] = 1
    result = agatston_score(hu, labels, SPACING_3MM)
    assert result.agatston == (4.0 if counted else 0.0)
    assert len(result.lesions) == (1 if counted else 0)


def test_voxels_under_130_inside_labels_excluded_from_area():
    hu, labels = _empty()
    labels[0, 1:4, 1:4] = 3          # 9 labelled pixels
    hu[0, 1:4, 1:4] = 100.0           # ... of which these 5 are soft tissue
    hu[0, 1, 1:4] = 210.0             # 3 px of calcium
    hu[0, 2, 1] = 135.0               # 1 px touching them
    hu[0, 3, 3] = 180.0               # 1 px not 8-connected to the rest (2,2 and 2,3 are 100)
    result = agatston_score(hu, labels, SPACING_3MM, min_area_mm2=0.0)
    areas = sorted(lesion.area_mm2 for lesion in result.lesions)
    assert areas == [1.0, 4.0]
    # 4 px at peak 210 -> weight 2; 1 px at peak 180 -> weight 1.
    assert result.agatston == 4 * 2 + 1 * 1
    assert result.volume_mm3 == 5 * 3.0


def test_labels_5_and_above_ignored_even_at_high_hu():
    hu, labels = _empty()
    hu[0, 1:5, 1:5] = 1500.0
    labels[0, 1:3, 1:5] = 5
    labels[0, 3, 1:5] = 6
    labels[0, 4, 1:5] = 7
    result = agatston_score(hu, labels, SPACING_3MM)
    assert result.agatston == 0.0
    assert result.volume_mm3 == 0.0
    assert result.lesions == ()
    assert result.category == 0


def test_empty_labels_score_zero_category_zero():
    hu, labels = _empty((3, 16, 16))
    hu[:] = 1000.0  # bone-like HU everywhere, but nothing labelled
    result = agatston_score(hu, labels, SPACING_3MM, calibration_mg_per_hu_mm3=0.00075)
    assert result.agatston == 0.0
    assert result.volume_mm3 == 0.0
    assert result.mass_mg == 0.0
    assert result.category == 0 and result.category_name == "0"
    assert result.per_artery == {"LAD": 0.0, "LCX": 0.0, "RCA": 0.0, "other": 0.0}
    assert result.lesions == ()


# --- rule 2: 2D 8-connected components per slice and per label ---------------------------------

def test_diagonal_pixels_join_with_8_connectivity():
    hu, labels = _empty()
    for i in range(4):  # a diagonal line of 4 px: one lesion with 8-, four with 4-connectivity
        hu[0, 1 + i, 1 + i] = 300.0
        labels[0, 1 + i, 1 + i] = 2
    result = agatston_score(hu, labels, SPACING_3MM)
    # One 4 mm^2 lesion (counts; 1 mm^2 single pixels would count too, so check the number).
    assert len(result.lesions) == 1
    assert result.lesions[0].area_mm2 == 4.0
    assert result.lesions[0].n_voxels == 4
    assert result.agatston == 4 * 3
    # With 4-connectivity each pixel would be its own 1 mm^2 lesion; at min area 2 mm^2 none
    # would count. Under 8-connectivity the lesion still does.
    assert agatston_score(hu, labels, SPACING_3MM, min_area_mm2=2.0).agatston == 12.0


def test_components_do_not_connect_across_slices():
    hu, labels = _empty((2, 8, 8))
    hu[:, 3, 3] = 450.0  # the same pixel on two slices: two 1 mm^2 lesions, not one of 2 mm^2
    labels[:, 3, 3] = 1
    result = agatston_score(hu, labels, SPACING_3MM, min_area_mm2=1.5)
    assert result.agatston == 0.0
    result = agatston_score(hu, labels, SPACING_3MM)
    assert [lesion.slice_index for lesion in result.lesions] == [0, 1]
    assert result.agatston == 2 * 4.0


def test_two_touching_labels_are_two_lesions():
    hu, labels = _empty()
    hu[0, 2, 1:7] = 250.0
    hu[0, 2, 6] = 420.0          # peak of the LCX part only
    labels[0, 2, 1:4] = 1        # 3 px LAD, peak 250 -> weight 2
    labels[0, 2, 4:7] = 2        # 3 px LCX touching it, peak 420 -> weight 4
    result = agatston_score(hu, labels, SPACING_3MM)
    assert [(lesion.artery, lesion.area_mm2, lesion.weight) for lesion in result.lesions] == [
        ("LAD", 3.0, 2), ("LCX", 3.0, 4)]
    assert result.per_artery == {"LAD": 6.0, "LCX": 12.0, "RCA": 0.0, "other": 0.0}
    assert result.agatston == 18.0


# --- rule 3: minimum area ----------------------------------------------------------------------

@pytest.mark.parametrize("n_pixels, counted", [(3, False), (4, True), (5, True)])
def test_min_area_with_half_mm_pixels(n_pixels, counted):
    # 0.5 x 0.5 mm pixels: 4 px = 1.0 mm^2 counts (>=), 3 px = 0.75 mm^2 does not.
    hu, labels = _single_blob(peak_hu=150.0, n_pixels=n_pixels)
    result = agatston_score(hu, labels, (3.0, 0.5, 0.5))
    assert result.agatston == (n_pixels * 0.25 if counted else 0.0)
    assert len(result.lesions) == int(counted)


@pytest.mark.parametrize("n_pixels, counted", [(2, False), (3, True)])
def test_min_area_with_non_square_pixels(n_pixels, counted):
    # 0.4 (y) x 0.9 (x) mm pixels = 0.36 mm^2: 2 px = 0.72 (no), 3 px = 1.08 mm^2 (yes).
    hu, labels = _single_blob(peak_hu=150.0, n_pixels=n_pixels)
    result = agatston_score(hu, labels, (3.0, 0.4, 0.9))
    expected = n_pixels * 0.4 * 0.9 if counted else 0.0
    assert result.agatston == pytest.approx(expected, rel=1e-12)
    if counted:
        assert result.lesions[0].area_mm2 == pytest.approx(1.08, rel=1e-12)


def test_exact_minimum_area_counts_despite_binary_rounding():
    # 0.1 mm pixels: 100 px is exactly 1 mm^2 in decimal arithmetic.
    hu, labels = _empty((1, 12, 12))
    hu[0, 1:11, 1:11] = 150.0
    labels[0, 1:11, 1:11] = 4
    result = agatston_score(hu, labels, (3.0, 0.1, 0.1))
    assert len(result.lesions) == 1
    assert result.agatston == pytest.approx(1.0)


def test_min_area_option():
    hu, labels = _single_blob(peak_hu=150.0, n_pixels=5)
    assert agatston_score(hu, labels, SPACING_3MM, min_area_mm2=5.0).agatston == 5.0
    assert agatston_score(hu, labels, SPACING_3MM, min_area_mm2=5.01).agatston == 0.0


# --- rule 4: weights from each lesion's own peak -----------------------------------------------

@pytest.mark.parametrize("peak, weight", [
    (130.0, 1), (199.0, 1), (199.9, 1), (200.0, 2), (299.0, 2), (300.0, 3), (399.0, 3),
    (399.9, 3), (400.0, 4), (3000.0, 4)])
def test_weight_boundaries(peak, weight):
    hu, labels = _single_blob(peak_hu=peak, n_pixels=4, base_hu=130.0)
    result = agatston_score(hu, labels, SPACING_3MM)
    assert len(result.lesions) == 1
    assert result.lesions[0].weight == weight
    assert result.lesions[0].peak_hu == pytest.approx(peak, abs=1e-4)
    assert result.agatston == 4.0 * weight


def test_one_voxel_at_400_weights_the_whole_lesion():
    hu, labels = _single_blob(peak_hu=400.0, n_pixels=6, base_hu=140.0)
    result = agatston_score(hu, labels, SPACING_3MM)
    assert result.lesions[0].weight == 4
    assert result.agatston == 6 * 4


def test_each_lesion_uses_its_own_peak():
    hu, labels = _empty((1, 8, 12))
    hu[0, 1, 1:5] = 150.0
    hu[0, 1, 1] = 450.0       # lesion A: peak 450 -> 4
    hu[0, 5, 1:5] = 250.0     # lesion B (same label, separate): peak 250 -> 2
    labels[0, 1, 1:5] = 1
    labels[0, 5, 1:5] = 1
    result = agatston_score(hu, labels, SPACING_3MM)
    assert [lesion.weight for lesion in result.lesions] == [4, 2]
    assert result.agatston == 4 * 4 + 4 * 2


# --- rule 5: z spacing factor and the thickness warning ----------------------------------------

@pytest.mark.parametrize("spacing_z, factor", [(1.5, 0.5), (3.0, 1.0), (5.0, 5.0 / 3.0)])
def test_slice_spacing_factor(spacing_z, factor):
    hu, labels = _single_blob(peak_hu=300.0, n_pixels=4)  # 4 mm^2, weight 3 -> 12 per 3 mm
    result = agatston_score(hu, labels, (spacing_z, 1.0, 1.0), slice_thickness_mm=spacing_z)
    assert result.agatston == pytest.approx(12.0 * factor, rel=1e-12)
    assert result.lesions[0].agatston == pytest.approx(12.0 * factor, rel=1e-12)
    assert result.volume_mm3 == pytest.approx(4 * spacing_z, rel=1e-12)
    assert result.warnings == ()


def test_overlapping_slices_warn_and_use_spacing():
    hu, labels = _single_blob(peak_hu=300.0, n_pixels=4)
    result = agatston_score(hu, labels, (1.5, 1.0, 1.0), slice_thickness_mm=3.0)
    assert result.agatston == 6.0  # spacing factor 0.5, not thickness factor 1.0
    assert len(result.warnings) == 1
    warning = result.warnings[0]
    assert "overlapping" in warning and "3 mm" in warning and "1.5 mm" in warning
    assert "spacing" in warning and "double counted" in warning


def test_gap_between_slices_warns():
    hu, labels = _single_blob(peak_hu=300.0, n_pixels=4)
    result = agatston_score(hu, labels, (3.0, 1.0, 1.0), slice_thickness_mm=1.0)
    assert result.agatston == 12.0
    assert len(result.warnings) == 1 and "gaps" in result.warnings[0]


def test_thickness_equal_to_spacing_within_header_rounding_no_warning():
    hu, labels = _single_blob(peak_hu=300.0)
    assert agatston_score(hu, labels, (2.5, 1.0, 1.0), slice_thickness_mm=2.5049).warnings == ()


def test_labels_not_matching_image_warn():
    hu, labels = _empty((1, 16, 16))
    labels[0, 2:8, 2:8] = 1   # 36 labelled voxels, all soft tissue: labels of another scan?
    hu[0, 2, 2] = 500.0       # one calcified voxel
    result = agatston_score(hu, labels, SPACING_3MM)
    assert result.agatston == 4.0
    assert any("35 of 36 voxels" in warning for warning in result.warnings)


# --- rule 6: volume and mass -------------------------------------------------------------------

def test_volume_and_mass_with_calibration():
    # Pixels 0.5 x 0.8 mm (0.4 mm^2), 2 mm slices: voxel volume 0.8 mm^3, z factor 2/3.
    hu, labels = _empty((2, 8, 8))
    hu[0, 1, 1:4] = [150.0, 250.0, 350.0]   # 3 px = 1.2 mm^2, peak 350 -> weight 3
    labels[0, 1, 1:4] = 1
    hu[1, 5, 5:7] = [500.0, 130.0]          # 2 px = 0.8 mm^2 < 1: not counted
    labels[1, 5, 5:7] = 3
    hu[1, 2, 2:5] = 200.0                   # 3 px = 1.2 mm^2, weight 2
    labels[1, 2, 2:5] = 3
    spacing = (2.0, 0.5, 0.8)
    result = agatston_score(hu, labels, spacing, calibration_mg_per_hu_mm3=0.001)
    assert result.agatston == pytest.approx((1.2 * 3 + 1.2 * 2) * 2.0 / 3.0, rel=1e-12)
    assert result.volume_mm3 == pytest.approx(6 * 0.8, rel=1e-12)
    assert result.mass_mg == pytest.approx(0.001 * (750.0 + 600.0) * 0.8, rel=1e-12)
    assert [lesion.mass_mg for lesion in result.lesions] == pytest.approx(
        [0.001 * 750.0 * 0.8, 0.001 * 600.0 * 0.8], rel=1e-12)
    assert [lesion.volume_mm3 for lesion in result.lesions] == pytest.approx([2.4, 2.4])
    without = agatston_score(hu, labels, spacing)
    assert without.mass_mg is None
    assert all(lesion.mass_mg is None for lesion in without.lesions)
    assert without.agatston == result.agatston


# --- rule 7: categories ------------------------------------------------------------------------

@pytest.mark.parametrize("score, four, five", [
    (0.0, 0, 0), (0.0001, 1, 1), (10.0, 1, 1), (10.0001, 1, 2), (100.0, 1, 2),
    (100.0001, 2, 3), (400.0, 2, 3), (400.01, 3, 4), (5000.0, 3, 4)])
def test_category_boundaries(score, four, five):
    assert cac_category(score) == four
    assert cac_category(score, five_class=True) == five


@pytest.mark.parametrize("pixels, pixel_mm, bound, four", [(625, 0.4, 100.0, 1), (2500, 0.4, 400.0, 2)])
def test_a_sum_exactly_at_a_bound_stays_in_its_category(pixels, pixel_mm, bound, four):
    # One weight-1 lesion of 625 (2500) pixels of 0.4 x 0.4 mm on 3 mm slices: exactly 100 (400)
    # in exact arithmetic; the float64 sum comes out a hair above the bound.
    side = int(np.sqrt(pixels))
    hu, labels = _empty((1, side + 2, side + 2))
    hu[0, 1:-1, 1:-1], labels[0, 1:-1, 1:-1] = 150.0, 1
    result = agatston_score(hu, labels, (3.0, pixel_mm, pixel_mm))
    assert result.agatston == pytest.approx(bound, rel=1e-12)
    assert result.category == four
    assert cac_category(bound * (1 + 1e-13)) == four
    assert cac_category(bound * (1 + 1e-10)) == four + 1  # a real score above the bound moves up


def test_category_names():
    assert CATEGORY_NAMES == ("0", "1-100", "101-400", ">400")
    assert CATEGORY_NAMES_5 == ("0", "1-10", "11-100", "101-400", ">400")
    assert ARTERY_NAMES == {1: "LAD", 2: "LCX", 3: "RCA", 4: "other"}


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf")])
def test_category_rejects_bad_scores(bad):
    with pytest.raises(ValueError):
        cac_category(bad)


def test_result_category_four_and_five_class():
    hu, labels = _empty((1, 8, 8))
    hu[0, 1:4, 1:4] = 150.0  # 9 mm^2 weight 1 -> 9
    labels[0, 1:4, 1:4] = 2
    four = agatston_score(hu, labels, SPACING_3MM)
    five = agatston_score(hu, labels, SPACING_3MM, five_class=True)
    assert (four.category, four.category_name) == (1, "1-100")
    assert (five.category, five.category_name) == (1, "1-10")
    hu[0, 1, 1] = 250.0      # weight 2 -> 18
    assert agatston_score(hu, labels, SPACING_3MM, five_class=True).category_name == "11-100"


# --- per artery, ordering, JSON ----------------------------------------------------------------

def _four_artery_case():
    hu, labels = _empty((2, 10, 10))
    # (slice, rows, columns, HU, label): Agatston at 3 mm, 1 mm^2 pixels.
    for z, rows, cols, value, label in [
        (0, slice(1, 3), slice(1, 3), 450.0, 3),   # RCA: 4 px * 4 = 16
        (0, slice(6, 8), slice(6, 9), 210.0, 1),   # LAD: 6 px * 2 = 12
        (1, 1, slice(1, 4), 310.0, 2),             # LCX: 3 px * 3 = 9
        (1, slice(5, 7), slice(5, 7), 160.0, 4),   # other: 4 px * 1 = 4
        (1, 8, slice(1, 5), 900.0, 1),             # LAD: 4 px * 4 = 16
    ]:
        hu[z, rows, cols] = value
        labels[z, rows, cols] = label
    return hu, labels


def test_per_artery_sums_and_lesion_order():
    hu, labels = _four_artery_case()
    result = agatston_score(hu, labels, (1.5, 1.0, 1.0))
    assert result.per_artery == pytest.approx(
        {"LAD": 14.0, "LCX": 4.5, "RCA": 8.0, "other": 2.0}, rel=1e-12)
    assert sum(result.per_artery.values()) == pytest.approx(result.agatston, rel=1e-12)
    assert sum(lesion.agatston for lesion in result.lesions) == pytest.approx(result.agatston)
    assert result.agatston == pytest.approx(28.5)
    # By slice, then label, then raster position.
    assert [(lesion.slice_index, lesion.label) for lesion in result.lesions] == [
        (0, 1), (0, 3), (1, 1), (1, 2), (1, 4)]
    assert result.lesions[0].centroid_yx == (6.5, 7.0)


def test_to_json_dict_keys_types_and_json():
    hu, labels = _four_artery_case()
    result = agatston_score(hu, labels, (3.0, 0.5, 0.5), slice_thickness_mm=5.0,
                            calibration_mg_per_hu_mm3=0.00075)
    assert isinstance(result, AgatstonResult)
    assert all(isinstance(lesion, Lesion) for lesion in result.lesions)
    payload = result.to_json_dict()
    assert list(payload) == ["agatston", "volume_mm3", "mass_mg", "category", "category_name",
                             "per_artery", "lesions", "spacing_zyx_mm", "warnings"]
    assert list(payload["per_artery"]) == ["LAD", "LCX", "RCA", "other"]
    assert payload["spacing_zyx_mm"] == [3.0, 0.5, 0.5]
    assert len(payload["warnings"]) == 1
    # Plain Python types only: json round-trips to an equal object.
    assert json.loads(json.dumps(payload)) == payload
    assert type(payload["agatston"]) is float and type(payload["category"]) is int
    lesion = payload["lesions"][0]
    assert set(lesion) == {"slice_index", "label", "artery", "area_mm2", "peak_hu", "weight",
                           "agatston", "volume_mm3", "mass_mg", "n_voxels", "centroid_yx"}
    assert all(type(lesion[key]) is int for key in ("slice_index", "label", "weight", "n_voxels"))
    empty = agatston_score(*_empty(), SPACING_3MM).to_json_dict()
    assert empty["mass_mg"] is None and empty["lesions"] == []
    assert empty["per_artery"] == {"LAD": 0.0, "LCX": 0.0, "RCA": 0.0, "other": 0.0}
    assert json.loads(json.dumps(empty)) == empty


# --- input validation --------------------------------------------------------------------------

def test_labels_shape_mismatch_is_an_error():
    hu, _ = _empty((2, 8, 8))
    with pytest.raises(LabelError, match=r"shape \(2, 8, 9\).*\(2, 8, 8\)"):
        agatston_score(hu, np.zeros((2, 8, 9), np.int16), SPACING_3MM)


@pytest.mark.parametrize("labels, message", [
    (np.full((1, 4, 4), -1, np.int16), "negative"),
    (np.full((1, 4, 4), 1.5, np.float32), "non-integer"),
    (np.ones((1, 4, 4), bool), "boolean"),
])
def test_bad_label_values_are_errors(labels, message):
    with pytest.raises(LabelError, match=message):
        agatston_score(np.zeros((1, 4, 4), np.float32), labels, SPACING_3MM)


def test_float_labels_with_integer_values_accepted():
    hu, labels = _single_blob(peak_hu=250.0)
    result = agatston_score(hu, labels.astype(np.float32), SPACING_3MM)
    assert result.agatston == 8.0 and result.lesions[0].label == 1


@pytest.mark.parametrize("kwargs", [
    {"spacing_zyx_mm": (0.0, 1.0, 1.0)}, {"spacing_zyx_mm": (3.0, -1.0, 1.0)},
    {"spacing_zyx_mm": (3.0, 1.0)}, {"spacing_zyx_mm": (3.0, float("nan"), 1.0)},
    {"min_area_mm2": -1.0}, {"calibration_mg_per_hu_mm3": 0.0},
    {"calibration_mg_per_hu_mm3": -0.001},
])
def test_bad_arguments_raise(kwargs):
    hu, labels = _single_blob(peak_hu=250.0)
    arguments = {"spacing_zyx_mm": SPACING_3MM} | kwargs
    spacing = arguments.pop("spacing_zyx_mm")
    with pytest.raises(ValueError):
        agatston_score(hu, labels, spacing, **arguments)


def test_not_3d_is_an_error():
    with pytest.raises(ValueError, match="3D"):
        agatston_score(np.zeros((4, 4)), np.zeros((4, 4), np.int16), SPACING_3MM)


def test_nan_hu_inside_labels_is_an_error():
    hu, labels = _single_blob(peak_hu=250.0)
    hu[0, 1, 2] = np.nan
    with pytest.raises(StudyReadError, match="non-finite"):
        agatston_score(hu, labels, SPACING_3MM)


# --- randomized comparison with an independent reference ---------------------------------------

def _reference_agatston(hu, labels, spacing_zyx_mm, min_area_mm2=1.0):
    """A deliberately plain implementation: per slice, per label, flood-fill each component."""
    spacing_z, spacing_y, spacing_x = spacing_zyx_mm
    lesions = []  # (slice, label, area, peak, n_voxels)
    depth, height, width = hu.shape
    for z in range(depth):
        for label in (1, 2, 3, 4):
            candidate = [[labels[z, y, x] == label and hu[z, y, x] >= 130 for x in range(width)]
                         for y in range(height)]
            seen = [[False] * width for _ in range(height)]
            for y0 in range(height):
                for x0 in range(width):
                    if not candidate[y0][x0] or seen[y0][x0]:
                        continue
                    stack, pixels = [(y0, x0)], []
                    seen[y0][x0] = True
                    while stack:
                        y, x = stack.pop()
                        pixels.append((y, x))
                        for dy in (-1, 0, 1):
                            for dx in (-1, 0, 1):
                                ny, nx = y + dy, x + dx
                                if (0 <= ny < height and 0 <= nx < width
                                        and candidate[ny][nx] and not seen[ny][nx]):
                                    seen[ny][nx] = True
                                    stack.append((ny, nx))
                    area = len(pixels) * spacing_y * spacing_x
                    if area < min_area_mm2:
                        continue
                    peak = max(float(hu[z, y, x]) for y, x in pixels)
                    weight = 1 if peak < 200 else 2 if peak < 300 else 3 if peak < 400 else 4
                    lesions.append((z, label, area, weight, len(pixels)))
    total = sum(area * weight for _, _, area, weight, _ in lesions) * spacing_z / 3.0
    per_label = {label: sum(a * w for _, lab, a, w, _ in lesions if lab == label)
                 * spacing_z / 3.0 for label in (1, 2, 3, 4)}
    return total, per_label, sorted((z, lab, n) for z, lab, _, _, n in lesions)


@pytest.mark.parametrize("seed", range(6))
def test_matches_reference_on_random_volumes(seed):
    rng = np.random.default_rng(seed)
    shape = (3, 20, 24)
    hu = rng.choice([0.0, 120.0, 135.0, 180.0, 210.0, 299.0, 300.0, 350.0, 399.0, 400.0, 800.0],
                    size=shape).astype(np.float32)
    # Blobby labels: mostly 0, patches of 1..4, and some 5..7 that must be ignored.
    coarse = rng.integers(0, 8, size=(shape[0], shape[1] // 4, shape[2] // 4))
    labels = np.repeat(np.repeat(coarse, 4, axis=1), 4, axis=2).astype(np.int16)
    labels[rng.random(shape) < 0.35] = 0
    spacing = (float(rng.choice([1.5, 2.5, 3.0])), float(rng.choice([0.5, 0.7])), 0.6)
    min_area = float(rng.choice([0.0, 0.5, 1.0]))
    result = agatston_score(hu, labels, spacing, min_area_mm2=min_area)
    total, per_label, lesions = _reference_agatston(hu, labels, spacing, min_area)
    assert total > 0  # the random case must exercise the scorer
    assert result.agatston == pytest.approx(total, rel=1e-9)
    for value, name in ARTERY_NAMES.items():
        assert result.per_artery[name] == pytest.approx(per_label[value], rel=1e-9, abs=1e-12)
    assert sorted((les.slice_index, les.label, les.n_voxels) for les in result.lesions) == lesions
    expected_volume = sum(n for _, _, n in lesions) * spacing[0] * spacing[1] * spacing[2]
    assert result.volume_mm3 == pytest.approx(expected_volume, rel=1e-9)


def test_scoring_does_not_import_jax_or_tensorflow():
    # A workstation that only scores studies should pay for neither (docs/architecture.md).
    code = ("import sys, cac_jax.scoring; "
            "print(sorted(m for m in ('jax', 'tensorflow', 'flax') if m in sys.modules))")
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True).stdout
    assert output.strip() == "[]"
