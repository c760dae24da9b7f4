"""Inference: the Scorer (buckets, streaming, resampling, post-processing), `cac-jax infer`, no TF.

The helpers at the top are shared with the other inference tests. `cac_jax.checkpoints.TrainedModel`
(the checkpoint contract, docs/contracts.md) is mirrored by `Trained`, so the tests build models
from the `:local` configs with random weights (`random_variables`: shapes from `jax.eval_shape`,
He-normal kernels drawn with numpy, so no slow `init` compile), and a `ThresholdNet` whose
prediction is known exactly (HU above a threshold) for geometry tests.
"""

from __future__ import annotations

import dataclasses
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import script_loader
from flax import linen as nn

from cac_jax import inference
from cac_jax.batch import run_batch
from cac_jax.results import RESULT_COLUMNS
from data_pipeline.io import CTVolume, StudyMetadata, read_labels, read_study, write_volume

ROOT = pathlib.Path(__file__).resolve().parents[1]


@dataclasses.dataclass
class Trained:
    """The fields of `cac_jax.checkpoints.TrainedModel` that inference reads."""

    config: object
    model: nn.Module
    variables: dict
    step: int
    path: pathlib.Path
    workdir: pathlib.Path
    task: str
    num_classes: int
    pixel_spacing_mm: dict
    neighbour_mm: float
    metrics: dict


def load_config(name: str, arg: str = "local"):
    """`configs/<name>.py` get_config(arg)."""
    return script_loader.load_config(name, arg)


def random_variables(model: nn.Module, seed: int = 0, size: int = 64) -> dict:
    """Variables of `model` for (1, 3, size, size, 1) inputs: He-normal kernels, unit scales,
    zero biases (numpy draws on `jax.eval_shape`'s shapes: no init compile)."""
    shapes = jax.eval_shape(model.init, jax.random.key(0),
                            jnp.zeros((1, 3, size, size, 1), jnp.float32))
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = str(getattr(path[-1], "key", path[-1]))
        if name == "scale":
            return np.ones(leaf.shape, leaf.dtype)
        if len(leaf.shape) < 2:
            return np.zeros(leaf.shape, leaf.dtype)
        fan_in = int(np.prod(leaf.shape[:-1]))
        return (rng.standard_normal(leaf.shape) * np.sqrt(2.0 / fan_in)).astype(leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def trained(name: str, *, spacing=(0.6, 0.7, 0.8), seed: int = 0, arg: str = "local",
            neighbour_mm: float = 3.0, step: int = 5) -> Trained:
    """A Trained model from `configs/<name>.py` with random weights."""
    config = load_config(name, arg)
    from cac_jax.models import build_model

    model = build_model(config)
    return Trained(config=config, model=model, variables=random_variables(model, seed),
                   step=step, path=pathlib.Path(f"/models/{name}"),
                   workdir=pathlib.Path(f"/models/{name}"), task=config.task,
                   num_classes=int(config.model.num_classes),
                   pixel_spacing_mm=dict(zip(("min", "median", "max"), spacing, strict=True)),
                   neighbour_mm=neighbour_mm, metrics={})


class ThresholdNet(nn.Module):
    """Class 1 where the centre slice's windowed value exceeds `threshold` (else class 0).

    A stand-in with an exactly known answer: in window units 0.6 is 400 HU.
    """

    num_classes: int
    threshold: float = 0.6

    @nn.compact
    def __call__(self, x, train: bool = False):
        centre = x[:, 1].astype(jnp.float32)  # (batch, H, W, 1)
        margin = 200.0 * (centre - self.threshold)
        logits = [-margin, margin] + [jnp.full_like(margin, -1e4)] * (self.num_classes - 2)
        return jnp.concatenate(logits, axis=-1), {}


def threshold_model(task: str, spacing=(2.6, 2.7, 2.8)) -> Trained:
    """A Trained ThresholdNet for `task`, recorded as trained at `spacing` (min, median, max)."""
    config = load_config(f"unet_{task}")
    model = ThresholdNet(num_classes=int(config.model.num_classes))
    return Trained(config=config, model=model, variables={}, step=1,
                   path=pathlib.Path(f"/models/threshold_{task}"),
                   workdir=pathlib.Path(f"/models/threshold_{task}"), task=task,
                   num_classes=int(config.model.num_classes),
                   pixel_spacing_mm=dict(zip(("min", "median", "max"), spacing, strict=True)),
                   neighbour_mm=3.0, metrics={})


def tiny_study(seed: int, size: int = 64, slices: int = 6, spacing=(3.0, 0.7, 0.7)):
    """(hu float32, calcium labels int16, heart uint8): air outside a body disc, a heart disc,
    two coronary lesions (labels 1 and 3), an aortic one (label 5) and a bone column."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    c = size // 2
    body = (yy - c) ** 2 + (xx - c) ** 2 < (0.45 * size) ** 2
    hu = np.where(body, 40.0, -1000.0) + rng.normal(0, 10, (slices, size, size))
    heart = np.zeros(hu.shape, np.uint8)
    disc = (yy - c) ** 2 + (xx - c) ** 2 < (size // 5) ** 2
    heart[1:slices - 1][:, disc] = 1
    labels = np.zeros(hu.shape, np.int16)
    o = seed % 4
    hu[1, c + o:c + o + 3, c:c + 3] = 320
    labels[1, c + o:c + o + 3, c:c + 3] = 1
    hu[slices - 2, c - 5:c - 2, c + o:c + o + 3] = 480
    labels[slices - 2, c - 5:c - 2, c + o:c + o + 3] = 3
    hu[2, 6:9, c:c + 3] = 700
    labels[2, 6:9, c:c + 3] = 5
    hu[:, size - 10:size - 6, c - 2:c + 2] = 600  # spine: calcium-level HU, not labelled
    return hu.astype(np.float32), labels, heart


def volume_of(hu, spacing=(3.0, 0.7, 0.7), origin=(10.0, -20.0, 30.0), source="memory"):
    """A CTVolume of `hu` with an axis-aligned geometry."""
    return CTVolume(hu, spacing, origin, (1, 0, 0, 0, 1, 0, 0, 0, 1),
                    StudyMetadata(source=source, slice_thickness_mm=spacing[0]))


# ---------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def scorer():
    """UNet :local heart and calcium models (random weights), batch 4, trained at 0.6-0.8 mm."""
    return inference.Scorer(trained("unet_heart"), trained("unet_calcium", seed=1), batch_size=4,
                            min_heart_ml=0.0)


def test_one_compilation_per_shape_bucket():
    scorer = inference.Scorer(threshold_model("heart", spacing=(0.6, 0.7, 0.8)),
                              threshold_model("calcium", spacing=(0.6, 0.7, 0.8)), batch_size=4)
    assert scorer.compilations == {"heart": 0, "calcium": 0}
    # 64 px (8 and 3 slices: full and short batches) and 48 x 60 px share the 64 x 64 bucket.
    for shape in ((8, 64, 64), (3, 64, 64), (5, 48, 60)):
        hu = np.full(shape, -1000.0, np.float32)
        hu[:, 10:20, 10:20] = 500.0  # a "heart" on every slice: the calcium model runs too
        result = scorer.score(volume_of(hu))
        assert result.calcium_labels.shape == shape and result.heart_mask.shape == shape
        assert result.timings["calcium_slices"] == shape[0]
    assert scorer.compilations == {"heart": 1, "calcium": 1}
    assert scorer._runners["heart"].shapes == {(4, 3, 64, 64, 1)}
    # A taller study opens one more bucket per model, once.
    hu = np.full((2, 80, 64), -1000.0, np.float32)
    hu[:, 60:70, 10:20] = 500.0
    for _ in range(2):
        scorer.score(volume_of(hu))
    assert scorer.compilations == {"heart": 2, "calcium": 2}


def test_streaming_memory_is_bounded_by_the_batch():
    """The windows of a study are never materialised: host memory of a prediction is the class
    map plus a batch, far below 3 window copies of the volume."""
    import tracemalloc

    scorer = inference.Scorer(threshold_model("heart", spacing=(0.6, 0.7, 0.8)),
                              threshold_model("calcium", spacing=(0.6, 0.7, 0.8)), batch_size=4)
    runner = scorer._runners["heart"]
    runner.predict(np.zeros((4, 64, 64), np.float32), (3.0, 0.7, 0.7), probabilities=False,
                   timings={})  # compile first
    peaks = {}
    for slices in (24, 96):
        hu = np.full((slices, 64, 64), -1000.0, np.float32)
        tracemalloc.start()
        try:
            classes = runner.predict(hu, (3.0, 0.7, 0.7), probabilities=False, timings={})
            peaks[slices] = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert classes.shape == hu.shape
    # 4x the slices: the peak grows by the larger class map (uint8), within a batch or two of
    # inputs, not by the windows (3 x 72 slices of float32: 3.5 MB), nor by one float32 copy of
    # the study (1.2 MB). Growth, not the absolute peak: the peak also holds a fixed ~1 MB of
    # JAX dispatch bookkeeping that varies from host to host.
    class_map_growth = (96 - 24) * 64 * 64
    batch_bytes = 4 * 3 * 64 * 64 * 4
    assert peaks[96] - peaks[24] < class_map_growth + 2 * batch_bytes, peaks


def test_streamed_batches_equal_one_call_per_slice(scorer):
    """Batching, padding and the async pipeline give each slice its own model output."""
    hu, _, _ = tiny_study(3, size=48, slices=7)
    volume = volume_of(hu)
    result = scorer.score(volume, probabilities=True)
    runner = scorer._runners["calcium"]
    # Slices 0, 3, 6 as one batch of their own (another composition and padding than the
    # stream's), through the same compiled function: each slice's output is its own.
    from data_pipeline.labels import model_inputs

    centres = np.array([0, 3, 6])
    windows = np.zeros((4, 3, 64, 64, 1), np.float32)
    windows[:3, :, :48, :48] = model_inputs(hu, centres, offset=1)  # 3 mm slices and neighbours
    expected = np.asarray(runner._forward(runner._variables, windows, probabilities=True))
    np.testing.assert_allclose(result.probabilities["calcium"][centres], expected[:3, :48, :48],
                               atol=1e-5)
    assert scorer.compilations["calcium"] == 1
    # Class maps follow from the probabilities; the labels are the post-processing of those.
    assert result.probabilities["heart"].shape == (7, 48, 48, 2)
    assert set(np.unique(result.calcium_labels)) <= {0, 4, 5}


def test_neighbours_at_the_trained_distance(scorer):
    """A 1.5 mm series gives neighbours 2 slices away for a model trained with 3 mm."""
    result = scorer.score(volume_of(np.full((6, 64, 64), -1000.0, np.float32),
                                    spacing=(1.5, 0.7, 0.7)))
    assert result.neighbour_offsets == {"heart": 2, "calcium": 2}


def test_perfect_prediction_equals_cac_jax_score(scorer, tmp_path, capsys):
    """The true labels fed through the post-processing score as `cac-jax score` scores them."""
    import json

    from cac_jax.cli import main
    from data_pipeline.labels import calcium_classes

    hu, labels, heart = tiny_study(5, size=64, slices=6)
    hu = np.round(hu)
    volume = volume_of(hu)
    write_volume(tmp_path / "image.nii.gz", hu.astype(np.int16), volume)
    write_volume(tmp_path / "labels.nii.gz", labels, volume)
    assert main(["score", "--image", str(tmp_path / "image.nii.gz"),
                 "--labels", str(tmp_path / "labels.nii.gz")]) == 0
    reference = json.loads(capsys.readouterr().out)
    study = read_study(tmp_path / "image.nii.gz")
    result = scorer.score_predictions(study, heart, calcium_classes(labels, study.hu))
    assert reference["agatston"] > 0 and reference["category"] >= 1
    assert result.score.agatston == pytest.approx(reference["agatston"], rel=1e-9)
    assert result.score.volume_mm3 == pytest.approx(reference["volume_mm3"], rel=1e-9)
    assert result.score.category == reference["category"]
    assert len(result.score.lesions) == len(reference["lesions"])
    # Coronary calcium is 4 (scored), the aortic lesion 5 (shown, never scored), bone too (5).
    assert set(np.unique(result.calcium_labels[labels == 1])) == {4}
    assert set(np.unique(result.calcium_labels[labels == 5])) == {5}


def test_resampled_to_training_spacing_and_back():
    """A study at 0.7 mm runs at a training spacing (2.8 mm: its 179 mm field of view in the
    models' 64 px frame; the median 2.7 mm would spill over it) and its masks land on its own
    grid."""
    size = 256
    yy, xx = np.mgrid[:size, :size]
    hu = np.full((3, size, size), 0.0, np.float32)
    disc = (yy - 100.0) ** 2 + (xx - 150.0) ** 2 < 40.0 ** 2  # 28 mm radius: ~10 model pixels
    hu[:, disc] = 600.0
    scorer = inference.Scorer(threshold_model("heart"), threshold_model("calcium"), batch_size=2,
                              heart_dilation_mm=0.0)
    result = scorer.score(volume_of(hu, spacing=(3.0, 0.7, 0.7)))
    assert result.model_spacing_yx_mm["heart"] == pytest.approx((2.8, 2.8))
    assert result.model_spacing_yx_mm["calcium"] == result.model_spacing_yx_mm["heart"]
    # 256 px at 0.7 mm is 64 px at 2.8 mm: the 64 px frame (at 2.7 mm: 66 px, a 128 px bucket).
    assert scorer._runners["heart"].shapes == {(2, 3, 64, 64, 1)}
    truth = np.broadcast_to(disc, hu.shape)
    dice = 2 * (result.heart_mask & truth).sum() / (result.heart_mask.sum() + truth.sum())
    assert dice > 0.97
    coronary = result.calcium_labels == 4
    assert 2 * (coronary & truth).sum() / (coronary.sum() + truth.sum()) > 0.97
    # The score uses the original HU at the original spacing: area of the disc, weight 4 (600 HU).
    area_mm2 = coronary[1].sum() * 0.7 * 0.7
    assert result.score.agatston == pytest.approx(3 * area_mm2 * 4, rel=1e-6)
    # Probabilities on request come back on the study's grid too, summing to 1.
    probs = scorer.score(volume_of(hu, spacing=(3.0, 0.7, 0.7)), probabilities=True).probabilities
    assert probs["calcium"].shape == (3, size, size, 3)
    np.testing.assert_allclose(probs["heart"].sum(-1), 1.0, atol=1e-5)
    assert scorer.compilations == {"heart": 1, "calcium": 1}
    # Inside the covered range (2.7 mm / (1 + zoom) .. ): run as is.
    same = scorer.score(volume_of(hu[:, ::4, ::4].copy(), spacing=(3.0, 2.8, 2.8)))
    assert same.model_spacing_yx_mm == {"heart": None, "calcium": None} and not same.resampled


def heart_on_some_slices(seed: int = 0, slices: int = 12, size: int = 64):
    """A study whose only tissue above 400 HU (a ThresholdNet heart) is a disc on slices 4-7,
    with calcium-level (130-400 HU) bone on every slice, inside and outside that disc."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    hu = np.where((yy - 32) ** 2 + (xx - 32) ** 2 < 28 ** 2, 40.0, -1000.0)
    hu = hu + rng.normal(0, 20, (slices, size, size))
    disc = (yy - 30) ** 2 + (xx - 28) ** 2 < 12 ** 2
    hu[4:8][:, disc] = 500.0 + rng.normal(0, 30, (4, int(disc.sum())))
    hu[:, 50:56, 26:38] = 250.0  # a vertebra below the heart, on every slice
    hu[:, 26:34, 26:30] = np.maximum(hu[:, 26:34, 26:30], 300.0)  # calcium-level plaque column
    return hu.astype(np.float32)


@pytest.mark.parametrize("probabilities", [False, True])
def test_calcium_model_runs_only_where_the_heart_is(probabilities):
    """Running the calcium model only on the slices the dilated heart silhouette reaches gives
    the score, coronary labels and heart mask of running it on every slice."""
    heart_model = threshold_model("heart", spacing=(0.6, 0.7, 0.8))
    calcium_model = trained("unet_calcium", seed=4)
    volume = volume_of(heart_on_some_slices())
    results = {}
    for mode in ("heart", "all"):
        scorer = inference.Scorer(heart_model, calcium_model, batch_size=4, calcium_slices=mode)
        results[mode] = scorer.score(volume, probabilities=probabilities)
        assert scorer.compilations == {"heart": 1, "calcium": 1}
        assert scorer._runners["calcium"].shapes == {(4, 3, 64, 64, 1)}  # last batch padded
    skip, full = results["heart"], results["all"]
    # Heart on slices 4-7, dilated by 3 mm = one 3 mm slice each way: slices 3-8 of 12.
    np.testing.assert_array_equal(np.flatnonzero(full.heart_mask.any(axis=(1, 2))), [4, 5, 6, 7])
    np.testing.assert_array_equal(skip.calcium_slices, np.arange(3, 9))
    np.testing.assert_array_equal(full.calcium_slices, np.arange(12))
    assert skip.timings["calcium_slices"] == 6 and full.timings["calcium_slices"] == 12
    assert skip.timings["heart_slices"] == full.timings["heart_slices"] == 12
    np.testing.assert_array_equal(skip.heart_mask, full.heart_mask)
    coronary = full.calcium_labels == 4
    assert coronary.sum() > 0  # the random calcium model calls some coronary calcium
    np.testing.assert_array_equal(skip.calcium_labels == 4, coronary)
    assert skip.score.to_json_dict() == full.score.to_json_dict()
    assert full.score.agatston > 0
    # Non-coronary calcium is marked where the calcium model ran, and only there.
    ran = np.zeros(12, bool)
    ran[3:9] = True
    np.testing.assert_array_equal(skip.calcium_labels[ran], full.calcium_labels[ran])
    assert (full.calcium_labels[~ran] == 5).any() and not skip.calcium_labels[~ran].any()
    if probabilities:
        calcium = {mode: r.probabilities["calcium"] for mode, r in results.items()}
        np.testing.assert_allclose(calcium["heart"][ran], calcium["all"][ran], atol=1e-5)
        # Slices not run: background with certainty.
        np.testing.assert_array_equal(calcium["heart"][~ran], np.broadcast_to(
            np.array([1.0, 0.0, 0.0], np.float32), calcium["heart"][~ran].shape))
        np.testing.assert_array_equal(skip.probabilities["heart"], full.probabilities["heart"])


def test_no_heart_no_calcium_model_run():
    scorer = inference.Scorer(threshold_model("heart", spacing=(0.6, 0.7, 0.8)),
                              trained("unet_calcium", seed=4), batch_size=4)
    result = scorer.score(volume_of(np.full((5, 64, 64), -1000.0, np.float32)))
    assert result.calcium_slices.size == 0 and result.timings["calcium_slices"] == 0
    assert scorer.compilations["calcium"] == 0
    assert not result.calcium_labels.any() and result.score.agatston == 0
    with pytest.raises(ValueError, match="calcium_slices"):
        inference.Scorer(threshold_model("heart"), threshold_model("calcium"),
                         calcium_slices="lungs")


def test_covered_spacing_includes_zoom_augmentation():
    model = threshold_model("heart", spacing=(0.5, 0.7, 0.9))
    model.config.data.augment.scale = 0.1
    low, high = inference.covered_spacing_mm(model)
    assert low == pytest.approx(0.5 / 1.1) and high == pytest.approx(0.9 / 0.9)
    assert inference.model_spacing_mm(model, (0.46, 0.46)) is None
    assert inference.model_spacing_mm(model, (0.44, 0.6)) == (0.7, 0.7)
    model.config.data.augment.enabled = False
    assert inference.model_spacing_mm(model, (0.46, 0.46)) == (0.7, 0.7)
    # With the study's shape: the median while the study fits the 64 px training frame there,
    # else the spacing that fits it, at most the coarsest covered (0.9 mm).
    assert model.config.data.image_size == 64
    assert inference.model_spacing_mm(model, (0.3, 0.3), (100, 120)) == (0.7, 0.7)
    assert inference.model_spacing_mm(model, (0.3, 0.3), (160, 180)) == pytest.approx((0.84375,) * 2)
    assert inference.model_spacing_mm(model, (0.3, 0.3), (250, 100)) == (0.9, 0.9)
    # At a covered spacing: as it is while it fits the frame; a larger matrix (a finer scan of a
    # large field of view) is resampled to fit it (80 px x 0.8 mm = 64 px x 1.0 mm, at most 0.9).
    assert inference.model_spacing_mm(model, (0.8, 0.8), (64, 60)) is None
    assert inference.model_spacing_mm(model, (0.6, 0.6), (80, 80)) == (0.75, 0.75)
    assert inference.model_spacing_mm(model, (0.8, 0.8), (80, 80)) == (0.9, 0.9)


def test_smaller_studies_run_in_the_training_frame():
    """A study smaller than the 64 px frame the models were validated in is padded to it, as the
    evaluation pipeline pads it; a larger one gets the next bucket."""
    scorer = inference.Scorer(threshold_model("heart", spacing=(0.6, 0.7, 0.8)),
                              threshold_model("calcium", spacing=(0.6, 0.7, 0.8)), batch_size=2,
                              bucket_px=16)
    runner = scorer._runners["heart"]
    assert runner.bucket(24, 40) == (64, 64) and runner.bucket(70, 30) == (80, 64)
    hu = np.full((2, 24, 40), -1000.0, np.float32)
    hu[:, 5:15, 5:15] = 500.0
    result = scorer.score(volume_of(hu))
    assert runner.shapes == {(2, 3, 64, 64, 1)}
    assert result.heart_mask[:, 5:15, 5:15].all() and result.heart_mask.sum() == 200


def test_wrong_role_or_class_count_is_refused():
    heart, calcium = threshold_model("heart"), threshold_model("calcium")
    with pytest.raises(inference.ModelMismatchError, match="given as the calcium model, but it "
                                                           "is a heart model.*2 classes"):
        inference.Scorer(heart, heart)
    with pytest.raises(inference.ModelMismatchError, match="heart model"):
        inference.Scorer(calcium, calcium)
    odd = dataclasses.replace(calcium, num_classes=4)
    with pytest.raises(inference.ModelMismatchError, match="4 classes"):
        inference.Scorer(heart, odd)


def test_scan_ids_from_paths(tmp_path):
    files = [tmp_path / "a.nii.gz", tmp_path / "b.mhd"]
    assert inference.scan_ids_for(files) == ["a", "b"]
    folders = [tmp_path / "p1" / "cac" / "dicom", tmp_path / "p2" / "cac" / "dicom"]
    assert inference.scan_ids_for(folders) == ["p1_cac_dicom", "p2_cac_dicom"]
    assert inference.scan_ids_for([tmp_path / "p1" / "dicom"]) == ["p1_dicom"]
    assert inference.safe_name("../a b/c") == "_a_b_c"


def _write_cohort(root, count=3):
    paths = []
    for k in range(count):
        hu, _, _ = tiny_study(k, size=64 if k % 2 == 0 else 48, slices=5 + k)
        path = root / "studies" / f"s{k}.nii.gz"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_volume(path, np.round(hu).astype(np.int16), volume_of(hu))
        paths.append(path)
    return paths


def test_cli_batch_results_masks_previews_errors(scorer, tmp_path, monkeypatch, capsys):
    import csv
    import json

    from cac_jax.cli import main

    paths = _write_cohort(tmp_path)
    corrupt = tmp_path / "studies" / "broken.nii.gz"
    corrupt.write_bytes(b"not a nifti file at all")
    monkeypatch.setattr(inference.Scorer, "from_checkpoints",
                        classmethod(lambda cls, h, c, **kw: scorer))
    out = tmp_path / "out"
    argv = ["infer", "--heart-checkpoint", "H", "--calcium-checkpoint", "C", "--input",
            str(paths[0]), str(corrupt), str(paths[1]), str(paths[2]), "--out", str(out),
            "--save-masks", "--save-previews", "--no-progress"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "scored 3, failed 1, skipped 0" in captured.out
    assert captured.err.count("error:") == 1 and "broken.nii.gz" in captured.err
    with (out / "results.csv").open() as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == RESULT_COLUMNS
        rows = list(reader)
    assert [r["scan_id"] for r in rows] == ["s0", "broken", "s1", "s2"]
    assert [r["status"] for r in rows] == ["ok", "error", "ok", "ok"]
    bad = rows[1]
    assert "broken.nii.gz" in bad["error"] and "\n" not in bad["error"] and bad["agatston"] == ""
    for row, path in zip([rows[0], rows[2], rows[3]], paths, strict=True):
        study = read_study(path)
        score = json.loads((out / f"{row['scan_id']}.json").read_text())
        assert float(row["agatston"]) == pytest.approx(score["agatston"], rel=1e-5)
        assert int(row["category"]) == score["category"]
        assert int(row["n_lesions"]) == len(score["lesions"])
        assert row["heart_model"] == "/models/unet_heart" and row["calcium_step"] == "5"
        # Masks in the input's geometry, readable against it; re-scoring them gives the JSON.
        labels = read_labels(out / f"{row['scan_id']}_calcium_labels.nii.gz", like=study)
        heart = read_labels(out / f"{row['scan_id']}_heart_mask.nii.gz", like=study)
        assert labels.shape == study.shape and set(np.unique(heart)) <= {0, 1}
        assert set(np.unique(labels)) <= {0, 4, 5}
        from cac_jax.scoring import agatston_score

        rescored = agatston_score(study.hu, labels, study.spacing_zyx_mm)
        assert rescored.agatston == pytest.approx(score["agatston"], rel=1e-9)
        png = (out / f"{row['scan_id']}.png").read_bytes()
        assert png.startswith(b"\x89PNG")
    # Every study failed: exit code 2; an empty batch of good studies is never "all failed".
    assert main(["infer", "--heart-checkpoint", "H", "--calcium-checkpoint", "C", "--input",
                 str(corrupt), "--out", str(tmp_path / "out2"), "--no-progress"]) == 2


def test_cli_calcium_slices_option(scorer, tmp_path, monkeypatch, capsys):
    from cac_jax.cli import main

    seen = []

    def from_checkpoints(cls, heart, calcium, **kwargs):
        seen.append(kwargs["calcium_slices"])
        return scorer

    monkeypatch.setattr(inference.Scorer, "from_checkpoints", classmethod(from_checkpoints))
    paths = _write_cohort(tmp_path, count=1)
    argv = ["infer", "--heart-checkpoint", "H", "--calcium-checkpoint", "C", "--input",
            str(paths[0]), "--no-progress", "--out"]
    assert main([*argv, str(tmp_path / "a")]) == 0
    assert main([*argv, str(tmp_path / "b"), "--calcium-slices", "all"]) == 0
    assert seen == ["heart", "all"]
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main([*argv, str(tmp_path / "c"), "--calcium-slices", "lungs"])
    assert "--calcium-slices" in capsys.readouterr().err


def test_killed_batch_resumes_without_redoing(scorer, tmp_path):
    paths = _write_cohort(tmp_path, count=3)
    studies = inference.studies_from_args([str(p) for p in paths], None)
    out = tmp_path / "out"

    class Killed(inference.Scorer):
        """Scores two studies, then the process 'dies' on the third."""

        calls = 0

        def score_path(self, path, **kw):
            type(self).calls += 1
            if type(self).calls == 3:
                raise KeyboardInterrupt
            return inference.Scorer.score_path(self, path, **kw)

    killed = Killed.__new__(Killed)
    killed.__dict__.update(scorer.__dict__)
    with pytest.raises(KeyboardInterrupt):
        run_batch(killed, studies, out, progress=False)
    done = {p.name: p.stat().st_mtime_ns for p in out.glob("*.json")}
    assert sorted(done) == ["s0.json", "s1.json"]

    calls = []
    original = scorer.score_path

    def counting(path, **kw):
        calls.append(pathlib.Path(path).name)
        return original(path, **kw)

    scorer.score_path = counting
    try:
        summary = run_batch(scorer, studies, out, progress=False)
        assert calls == ["s2.nii.gz"]
        assert (summary.scored, summary.skipped, summary.failed) == (1, 2, 0)
        assert {p.name: p.stat().st_mtime_ns for p in out.glob("s[01].json")} == done
        calls.clear()
        summary = run_batch(scorer, studies, out, progress=False, overwrite=True)
        assert len(calls) == 3 and summary.scored == 3
    finally:
        del scorer.score_path


def test_manifest_input_and_bad_arguments(scorer, tmp_path, monkeypatch, capsys):
    from cac_jax.cli import main
    from data_pipeline.io import write_dicom_series
    from data_pipeline.manifest import ManifestRow, write_manifest

    paths = _write_cohort(tmp_path, count=2)
    # The second study as a DICOM series: masks are written in its geometry all the same.
    write_dicom_series(read_study(paths[1]), tmp_path / "dicom" / "s1", uid_seed="s1")
    paths[1] = tmp_path / "dicom" / "s1"
    manifest = tmp_path / "manifest.csv"
    write_manifest(manifest, [ManifestRow(patient_id=f"P{k}", scan_id=f"patient {k}",
                                          protocol="ctac", image=p, calcium_labels=None,
                                          heart_mask=None, site="", split=None)
                              for k, p in enumerate(paths)])
    monkeypatch.setattr(inference.Scorer, "from_checkpoints",
                        classmethod(lambda cls, h, c, **kw: scorer))
    out = tmp_path / "out"
    assert main(["infer", "--heart-checkpoint", "H", "--calcium-checkpoint", "C", "--manifest",
                 str(manifest), "--out", str(out), "--no-progress", "--save-masks"]) == 0
    text = (out / "results.csv").read_text()
    assert "patient 0," in text and "patient 1," in text and text.count(",ctac,ok,") == 2
    assert (out / "patient_0.json").exists()
    heart = read_labels(out / "patient_1_heart_mask.nii.gz", like=read_study(paths[1]))
    assert heart.shape == read_study(paths[1]).shape
    capsys.readouterr()
    # --out onto a file: one line, exit 2.
    assert main(["infer", "--heart-checkpoint", "H", "--calcium-checkpoint", "C", "--input",
                 str(paths[1]), "--out", str(paths[0]), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(paths[0]) in err[0]


def test_inference_never_imports_tensorflow(tmp_path):
    """Importing inference and checkpoint loading, and running a whole `score`, leaves
    TensorFlow unimported."""
    import subprocess
    import sys

    code = (
        "import sys, numpy as np\n"
        "sys.path.insert(0, 'tests')\n"
        "from test_inference import threshold_model, volume_of, tiny_study\n"
        "import cac_jax.cli, cac_jax.commands.infer, cac_jax.checkpoints\n"
        "from cac_jax import inference\n"
        "scorer = inference.Scorer(threshold_model('heart'), threshold_model('calcium'))\n"
        "hu, _, _ = tiny_study(0, 32, 4)\n"
        "scorer.score(volume_of(hu), probabilities=True)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('tensorflow', 'tensorflow_datasets')))\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_a_three_column_manifest_is_enough_and_its_series_column_is_used(tmp_path):
    from cac_jax.inference import studies_from_args

    manifest = tmp_path / "studies.csv"
    manifest.write_text("scan_id,image,protocol,series\n"
                        "a,a_dicom,cac,3\n"
                        "b,b.nii.gz,ctac,\n")
    studies = studies_from_args(None, str(manifest))
    assert [(s.scan_id, s.image.name, s.protocol, s.series) for s in studies] == [
        ("a", "a_dicom", "cac", "3"), ("b", "b.nii.gz", "ctac", None)]
    # --series on the command line wins over the column.
    assert [s.series for s in studies_from_args(None, str(manifest), series="7")] == ["7", "7"]


def _convlstm_pair(frame: bool):
    """ConvLSTM :local heart and calcium models (random weights); the calcium one recorded as a
    heart-frame model (32 px at 1.4 mm) when `frame`."""
    heart, calcium = trained("convlstm_heart", seed=2), trained("convlstm_calcium", seed=3)
    if frame:
        config = calcium.config.copy_and_resolve_references()
        config.data.calcium_frame = "heart"
        config.data.frame_size = 32
        config.data.frame_spacing_mm = 1.4
        calcium = dataclasses.replace(calcium, config=config)
    return heart, calcium


@pytest.mark.parametrize("frame,spacings", [
    (False, ((1.5, 0.7, 0.7), (3.0, 1.4, 1.4))),  # neighbour offset 2; resampled, offset 1
    (True, ((3.0, 0.7, 0.7),)),                    # the heart frame
])
def test_shared_slices_score_as_the_windows(frame, spacings):
    """A ConvLSTM run on each batch's distinct slices (every slice encoded once) gives the
    probabilities, masks and scores of running its 3-slice windows: at neighbour offsets 1 and
    2, on a resampled study, and in the heart frame."""
    heart, calcium = _convlstm_pair(frame)
    kwargs = dict(batch_size=4, min_heart_ml=0.0, calcium_slices="all")
    shared = inference.Scorer(heart, calcium, **kwargs)
    windows = inference.Scorer(heart, calcium, share_slices=False, **kwargs)
    assert shared._runners["calcium"].share_slices
    assert not windows._runners["calcium"].share_slices
    hu = tiny_study(5, size=48, slices=9)[0]
    for spacing in spacings:
        a = shared.score(volume_of(hu, spacing=spacing), probabilities=True)
        b = windows.score(volume_of(hu, spacing=spacing), probabilities=True)
        for role in ("heart", "calcium"):
            np.testing.assert_allclose(a.probabilities[role], b.probabilities[role], atol=1e-5)
        np.testing.assert_array_equal(a.heart_mask, b.heart_mask)
        np.testing.assert_array_equal(a.calcium_labels, b.calcium_labels)
        assert a.score.to_json_dict() == b.score.to_json_dict()
    # A batch of 4 centres holds 4 + 2 * offset distinct slices instead of 4 windows of 3.
    shapes = shared._runners["heart"].shapes
    assert {s[0] for s in shapes} == ({6} if frame else {6, 8})
    assert all(len(s) == 4 for s in shapes)
    assert all(s[:2] == (4, 3) for s in windows._runners["heart"].shapes)


def test_centres_too_far_apart_to_share_run_as_windows():
    """Centres whose windows need more distinct slices than a shared batch holds run as
    windows, with the same result."""
    heart, _ = _convlstm_pair(False)
    hu = tiny_study(6, size=48, slices=9)[0]
    outputs = []
    for share in (True, False):
        runner = inference._ModelRunner(heart, "heart", batch_size=4, bucket_px=16,
                                        share_slices=share)
        # 0, 4, 8 at offset 1: slices 0, 1, 3, 4, 5, 7, 8, seven > 4 + 2 * 1.
        outputs.append(runner.predict(hu, (3.0, 0.7, 0.7), probabilities=True, timings={},
                                      slices=np.array([0, 4, 8])))
        assert len(runner.shapes) == 1 and next(iter(runner.shapes))[:2] == (4, 3)
    np.testing.assert_allclose(outputs[0], outputs[1], atol=1e-6)
    assert inference.shared_windows(9, np.array([0, 4, 8]), 1, 4, 6) is None
    distinct, windows = inference.shared_windows(9, np.array([0, 1, 2]), 1, 4, 6)
    np.testing.assert_array_equal(distinct, [0, 1, 2, 3])
    np.testing.assert_array_equal(windows, [[0, 0, 1], [0, 1, 2], [1, 2, 3], [0, 0, 0]])
