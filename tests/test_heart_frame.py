"""The calcium model's heart frame: geometry, training samples, validation and inference agree."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from data_pipeline import frames

sys.path.insert(0, str(Path(__file__).parent))


def test_heart_centre_is_the_bounding_box_centre_with_fallbacks():
    mask = np.zeros((4, 20, 30), bool)
    mask[1, 4:9, 10:21] = True
    mask[2, 6:13, 12:15] = True
    assert frames.heart_centre_yx(mask) == (8.0, 15.0)
    fallback = np.zeros_like(mask)
    fallback[0, 2, 3] = True
    assert frames.heart_centre_yx(np.zeros_like(mask), fallback) == (2.0, 3.0)
    assert frames.heart_centre_yx(None, None) is None


def test_frame_samples_the_scan_at_the_frame_spacing():
    """A frame pixel (i, j) samples scan point centre + (i - c, j - c) * ratio: a bright dot at a
    known physical distance from the centre lands at that distance in frame pixels."""
    scan = np.zeros((40, 60), np.float32)
    scan[10, 45] = 1.0  # 10 rows up and 15 columns right of (20, 30) at 0.5 mm: -5 mm, +7.5 mm
    geom = frames.geometry((20.0, 30.0), (0.5, 0.5), scan.shape, frame_size=21,
                           frame_spacing_mm=2.5)
    out = frames.to_frame(scan, geom, order=0)
    assert np.argwhere(out == 1).tolist() == [[10 - 2, 10 + 3]]
    inside = frames.inside_scan(geom)
    assert inside[10, 10] and not inside[0, 0]  # the corner samples -25 mm: outside


def test_from_frame_inverts_to_frame_inside_and_is_background_outside():
    rng = np.random.default_rng(0)
    h, w = 48, 64
    geom = frames.geometry((24.5, 20.5), (1.0, 1.0), (h, w), frame_size=32, frame_spacing_mm=1.0)
    probs = rng.random((2, 32, 32, 3)).astype(np.float32)
    native = frames.from_frame(probs, geom)
    assert native.shape == (2, h, w, 3)
    # Same spacing, frame pixel i at scan pixel i + 9 (rows) and i + 5 (columns): the frame's
    # values come back exactly where they were cut.
    np.testing.assert_allclose(native[:, 9:41, 5:37], probs, atol=1e-6)
    np.testing.assert_array_equal(native[:, :, 38:, 0], 1.0)  # beyond the frame: background
    np.testing.assert_array_equal(native[:, :, 38:, 1:], 0.0)
    np.testing.assert_array_equal(native[:, :8, :, 0], 1.0)


@pytest.mark.parametrize("centre, spacing", [((30.2, 17.7), (0.7, 0.8)), ((2.0, 60.0), (1.3, 0.45))])
def test_from_frame_is_the_bilinear_resample_of_map_coordinates(centre, spacing):
    """The separable resample equals scipy's bilinear `map_coordinates` (order 1, edge samples
    beyond the frame's ends) at every scan pixel within half a frame pixel of the frame, at
    spacings other than the frame's and with the frame partly outside the scan."""
    from scipy import ndimage

    rng = np.random.default_rng(1)
    h, w = 50, 70
    geom = frames.geometry(centre, spacing, (h, w), frame_size=24, frame_spacing_mm=1.0)
    probs = rng.random((3, 24, 24, 3)).astype(np.float32)
    native = frames.from_frame(probs, geom)
    coords = geom.inverse_coordinates()
    inside = ((coords >= -0.5) & (coords <= 23.5)).all(axis=0)
    assert 0 < inside.sum() < h * w
    for k in range(3):
        for c in range(3):
            expected = ndimage.map_coordinates(probs[k, ..., c], coords, order=1, mode="nearest",
                                               prefilter=False)
            np.testing.assert_allclose(native[k, ..., c][inside], expected[inside], atol=1e-5)
    np.testing.assert_array_equal(native[:, ~inside, 0], 1.0)
    np.testing.assert_array_equal(native[:, ~inside, 1:], 0.0)


@pytest.mark.parametrize("shape,out_hw", [((4, 3, 32, 32), (64, 64)), ((2, 3, 25, 18), (61, 47)),
                                           ((5, 40, 36), (16, 12)), ((3, 7, 9), (7, 9))])
def test_resize_planes_is_scipy_zoom_order_1(shape, out_hw):
    """The inference's resample of class probabilities back onto the study's grid: two matrix
    products equal to `scipy.ndimage.zoom(order=1, mode="nearest", grid_mode=True)`."""
    from scipy import ndimage

    planes = np.random.default_rng(sum(shape)).random(shape, dtype=np.float32)
    factors = (1,) * (planes.ndim - 2) + (out_hw[0] / shape[-2], out_hw[1] / shape[-1])
    expected = ndimage.zoom(planes, factors, order=1, mode="nearest", grid_mode=True)
    got = frames.resize_planes(planes, out_hw)
    assert got.shape == expected.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=3e-7)
    matrix = frames.resize_matrix(shape[-1], out_hw[1])
    np.testing.assert_allclose(matrix.sum(axis=1), 1.0, rtol=1e-6)  # weights sum to one
    assert (np.count_nonzero(matrix, axis=1) <= 2).all()  # two taps per output pixel


def test_class_map_is_the_argmax_with_ties_to_the_first_class():
    rng = np.random.default_rng(3)
    planes = rng.integers(0, 4, (3, 4, 9, 7)).astype(np.float32)  # many ties
    np.testing.assert_array_equal(frames.class_map(planes), np.argmax(planes, axis=1))
    planes = rng.random((2, 3, 5, 6), dtype=np.float32)
    assert frames.class_map(planes).dtype == np.uint8
    np.testing.assert_array_equal(frames.class_map(planes), np.argmax(planes, axis=1))


def test_config_checks():
    from data_pipeline.config import data_config

    data = data_config("calcium", local=True)
    data.calcium_frame = "window"
    with pytest.raises(ValueError, match="calcium_frame"):
        frames.check_frame_config(data)
    data.calcium_frame = "heart"
    data.frame_spacing_mm = 0.0
    with pytest.raises(ValueError, match="frame_spacing_mm"):
        frames.check_frame_config(data)
    assert frames.uses_heart_frame(data)
    assert not frames.uses_heart_frame(data_config("heart", local=True))


def _store(hu, target, heart, spacing=(3.0, 0.6, 0.8)):
    from data_pipeline import input_pipeline as ip

    info = ip.ScanInfo("s", "p", "cac", "site", tuple(hu.shape), spacing, None, None, 0)
    return ip._MemoryStore.from_arrays([info], [hu], [target], heart_list=[heart],
                                       frame_spacing_mm=1.2)


def _heart_data(**overrides):
    from data_pipeline.config import data_config

    data = data_config("calcium", local=True)
    data.calcium_frame = "heart"
    data.frame_spacing_mm = 1.2
    data.frame_size = 32
    data.frame_jitter_mm = 0.0
    data.crop_size = 0
    data.augment.enabled = False
    for key, value in overrides.items():
        setattr(data, key, value)
    return data


def test_training_sample_without_augmentation_equals_the_inference_resampling():
    """tf.data's affine resample (training) and the numpy frame (validation, inference) sample the
    same points: without augmentation and jitter the two agree (anisotropic spacing too)."""
    pytest.importorskip("tensorflow")
    from data_pipeline import input_pipeline as ip
    from data_pipeline import labels as labels_lib

    tf = ip._tf()
    rng = np.random.default_rng(1)
    hu = rng.integers(-800, 1200, (3, 50, 40)).astype(np.int16)
    target = (hu > 900).astype(np.uint8)
    heart = np.zeros(hu.shape, np.uint8)
    heart[:, 14:36, 10:30] = 1
    store = _store(hu, target, heart)
    data = _heart_data()
    sample = ip._train_sample(tf, store, data, 3, tf.constant(0, tf.int64), tf.constant(1, tf.int64))
    geom = store.frame_geometry(0, 32, 1.2)
    assert geom.centre_yx == (24.5, 19.5)
    expected = frames.to_frame(labels_lib.window_hu(hu[[0, 1, 2]]), geom, order=1)
    np.testing.assert_allclose(sample["image"].numpy()[..., 0], expected, atol=2e-5)
    image, label, weight, candidate = store._frame_window_np(0, 1, 0, 32, 1.2)
    np.testing.assert_allclose(image, expected, atol=1e-6)
    np.testing.assert_array_equal(sample["label"].numpy(), label)
    np.testing.assert_array_equal(sample["weight"].numpy(), weight)
    np.testing.assert_array_equal(sample["candidate"].numpy() > 0, candidate)
    assert 0 < weight.mean() < 1  # the frame reaches past the 40-pixel-wide scan


def test_jitter_moves_the_frame_within_its_bound_and_crops_keep_the_positive():
    pytest.importorskip("tensorflow")
    from data_pipeline import input_pipeline as ip

    tf = ip._tf()
    hu = np.full((3, 60, 60), -800, np.int16)
    target = np.zeros(hu.shape, np.uint8)
    hu[1, 30, 30] = 1000
    target[1, 30, 30] = 1
    heart = np.zeros(hu.shape, np.uint8)
    heart[:, 20:41, 20:41] = 1
    store = _store(hu, target, heart, spacing=(3.0, 1.0, 1.0))
    data = _heart_data(frame_spacing_mm=1.0, frame_jitter_mm=4.0)
    store.ratios_t = tf.constant([[1.0, 1.0]])
    shifts = set()
    for index in range(12):
        s = ip._train_sample(tf, store, data, 3, tf.constant(index, tf.int64),
                             tf.constant(1, tf.int64))
        ys, xs = np.nonzero(s["label"].numpy() == 1)
        assert len(ys) == 1
        dy, dx = ys[0] - 15.5, xs[0] - 15.5
        assert abs(dy) <= 4.5 and abs(dx) <= 4.5
        shifts.add((int(ys[0]), int(xs[0])))
    assert len(shifts) > 3
    data = _heart_data(frame_spacing_mm=1.0, crop_size=16, crop_positive_fraction=1.0)
    for index in range(6):
        s = ip._train_sample(tf, store, data, 3, tf.constant(index, tf.int64),
                             tf.constant(1, tf.int64))
        assert s["label"].shape == (16, 16) and (s["label"].numpy() == 1).sum() == 1


def _heart_frame_threshold_model(frame_size=32, frame_spacing_mm=1.4):
    """A ThresholdNet calcium model (class 1 above 400 HU) recorded as a heart-frame model."""
    import dataclasses

    from test_inference import threshold_model

    model = threshold_model("calcium", spacing=(0.6, 0.7, 0.8))
    config = model.config.copy_and_resolve_references()
    config.data.calcium_frame = "heart"
    config.data.frame_size = frame_size
    config.data.frame_spacing_mm = frame_spacing_mm
    return dataclasses.replace(model, config=config)


def test_inference_runs_one_frame_for_every_matrix_and_finds_the_plaque():
    """Studies of 64 and 96 px run in one compiled 32 px frame at 1.4 mm; the plaque inside the
    heart is found and resampled back onto the study's grid; nothing is called outside the
    frame."""
    from test_inference import heart_on_some_slices, threshold_model, volume_of

    from cac_jax import inference

    heart_model = threshold_model("heart", spacing=(0.6, 0.7, 0.8))
    scorer = inference.Scorer(heart_model, _heart_frame_threshold_model(), batch_size=4)
    for size in (64, 96):
        hu = np.full((12, size, size), -1000.0, np.float32)
        hu[:, :64, :64] = heart_on_some_slices()
        hu[8, 28:33, 24:29] = 600.0  # a plaque below the heart disc, inside its dilation
        result = scorer.score(volume_of(hu))
        coronary = result.calcium_labels == 4
        assert coronary[8, 29:32, 25:28].all()  # its core (its rim blurs at 1.4 mm)
        assert not coronary[:, 64:].any() and not coronary[:, :, 64:].any()
        assert result.model_spacing_yx_mm["calcium"] == (1.4, 1.4)
    assert scorer._runners["calcium"].shapes == {(4, 3, 32, 32, 1)}
    assert scorer.compilations["calcium"] == 1


def test_validation_maps_predictions_back_exactly_as_inference():
    """The validation collector (frame samples from the input pipeline's store, probabilities
    mapped back) and inference's heart-frame runner give the same class map for one model."""
    pytest.importorskip("tensorflow")
    import jax
    from test_inference import heart_on_some_slices

    from cac_jax import inference
    from cac_jax.validation import _ScanCollector
    from data_pipeline import input_pipeline as ip
    from data_pipeline import labels as labels_lib

    model = _heart_frame_threshold_model()
    hu = heart_on_some_slices().astype(np.int16)
    hu[8, 28:33, 24:29] = 600
    target = np.zeros(hu.shape, np.uint8)
    heart = np.zeros(hu.shape, np.uint8)
    heart[4:8, 18:43, 16:41] = 1
    spacing = (3.0, 0.7, 0.7)
    info = ip.ScanInfo("s", "p", "cac", "site", tuple(hu.shape), spacing, None, None, 0,
                       labels_lib.neighbour_offset(3.0))
    store = ip._MemoryStore.from_arrays([info], [hu], [target], heart_list=[heart],
                                        frame_spacing_mm=1.4)
    data = model.config.data
    collector = _ScanCollector([info], (store, data))
    forward = jax.jit(lambda x: jax.nn.softmax(model.model.apply(model.variables, x)[0], -1))
    zs = np.arange(hu.shape[0])
    images = np.stack([store._frame_window_np(0, z, 0, 32, 1.4)[0] for z in zs])[..., None]
    batch = {"valid": np.ones(len(zs), bool), "scan_index": np.zeros(len(zs), np.int32),
             "slice_index": zs.astype(np.int32)}
    collector.add(np.asarray(forward(images)), batch)

    runner = inference._ModelRunner(model, "calcium", batch_size=4, bucket_px=16)
    centre = store.centre(0)
    predicted = runner.predict(hu.astype(np.float32), spacing, probabilities=False, timings={},
                               centre_yx=centre)
    np.testing.assert_array_equal(collector.pred[0], predicted)
    assert predicted[8, 29:32, 25:28].all()
    np.testing.assert_array_equal(collector.hu[0], hu)

    # A streamed store decodes each scan for the call: the collector keeps only the slices
    # validated (here 3-9), not the whole decoded scan, and predicts the same there.
    class Streamed:
        resident = False

        def volumes(self, scan, key):
            volume, truth = store.volumes(scan, key)
            return volume.copy(), truth.copy()

        def frame_geometry(self, *args):
            return store.frame_geometry(*args)

    some = zs[3:10]
    streamed = _ScanCollector([info], (Streamed(), data))
    streamed.add(np.asarray(forward(images[some])),
                 {k: v[some] for k, v in batch.items()})
    np.testing.assert_array_equal(streamed.pred[0][some], predicted[some])
    np.testing.assert_array_equal(streamed.hu[0][some], hu[some])
    assert not streamed.hu[0][:3].any() and not streamed.hu[0][10:].any()


def test_a_heart_frame_calcium_model_trains_validates_and_loads(tmp_path):
    """A short heart-frame run: training and validation batches in the frame, a validation kappa
    computed on the scans' own grids, and a checkpoint inference loads as a heart-frame model."""
    pytest.importorskip("tensorflow_datasets")
    from test_tfds_builder import write_tiny_cohort
    from test_train import compilation_cache, tiny_config  # noqa: F401 - the fixture

    from cac_jax import checkpoints, inference, train
    from data_pipeline.tfds_builder import build_dataset

    manifest = write_tiny_cohort(tmp_path / "cohort", patients=6, split_column=True)
    build_dataset(manifest, tmp_path / "tfds", name="tiny", progress=False)
    config = tiny_config("unet_calcium", tmp_path / "tfds", steps=4, eval_every=4,
                         checkpoint_every=4, log_every=2, batch_size=8)
    config.data.calcium_frame = "heart"
    config.data.frame_size = 32
    config.data.frame_spacing_mm = 1.0
    config.data.crop_size = 16
    summary = train.train_and_evaluate(config, tmp_path / "run")
    assert summary["final_step"] == 4 if "final_step" in summary else True
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text()
            .splitlines()]
    evaluated = [r for r in rows if "val_loss" in r]
    assert evaluated and math.isfinite(evaluated[-1]["val_loss"])
    assert evaluated[-1]["val_scans"] >= 1  # categories scored on the scans' own grids
    loaded = checkpoints.load_trained(tmp_path / "run")
    runner = inference._ModelRunner(loaded, "calcium", batch_size=2, bucket_px=16)
    assert runner.heart_frame and runner.frame_size == 32
