"""Resolution: a heart model trained on coarse-pixel scans gives sensible masks on a fine-pixel
study (a model trained on 128 px synthetic scans, 2.7 mm pixels, must still give sensible masks
on a 512 px study, 0.7 mm: docs/commands.md, "cac-jax infer"), here at a quarter of those sizes
to fit a test.

A 10-patient synthetic cohort is rendered at 64 px (gated CAC scans, 3.5-4.9 mm pixels: the
field of view is drawn per patient), ingested, and a ConvLSTM :local heart model trained on it
for 60 steps (about a minute on 2 cores; its heart Dice against the truth is 0.6-0.9, it
over-segments). Held-out patients are then rendered twice, at 64 px and at 256 px (the same
anatomy and field of view; 1.0-1.2 mm pixels, 4x finer than any training scan, other noise).
The scorer resamples the fine study for the model and brings the mask back onto the fine grid.
Checked: the fine mask, averaged back onto the coarse grid, agrees with the model's mask on the
coarse scan (Dice >= 0.85, heart volume within 15%), it is as close to the true heart as the
coarse one, and it is on the fine study's grid; run on the fine pixels as they are, the same
model does far worse (what the resampling is for). These patients' fields of view are wider
than 64 x the training median, so the study is resampled to fill the 64 px training frame
(`inference.model_spacing_mm`), the same spacing as its coarse scan. Slow: `pytest -m slow`.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tensorflow")
pytest.importorskip("tensorflow_datasets")

sys.path.insert(0, str(Path(__file__).parent))
from test_inference import load_config, threshold_model  # noqa: E402

from cac_jax import inference  # noqa: E402

pytestmark = pytest.mark.slow

COARSE_PX, FINE_PX = 64, 256
SEED = 11
TRAIN_PATIENTS = 10
HELD_OUT = (11, 13, 16)  # patients of the same seed that training never saw


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / max(1, a.sum() + b.sum()))


@pytest.fixture(scope="module")
def heart_model(tmp_path_factory):
    """A ConvLSTM :local heart model trained on 64 px gated CAC scans of synthetic patients."""
    from cac_jax import train as train_lib
    from cac_jax.checkpoints import load_trained
    from data_pipeline.phantom import generate_cohort
    from data_pipeline.tfds_builder import build_dataset

    root = tmp_path_factory.mktemp("resolution")
    generate_cohort(root / "cohort", patients=TRAIN_PATIENTS, protocols=("cac",),
                    size=COARSE_PX, seed=SEED)
    build_dataset(root / "cohort" / "manifest.csv", root / "tfds", name="coarse", progress=False)
    config = load_config("convlstm_heart")
    config.data.data_dir = str(root / "tfds")
    config.data.name = "coarse"
    config.train.progress = False
    config.train.num_devices = 1
    config.train.steps = 60
    config.train.eval_every = 30
    config.train.checkpoint_every = 30
    config.train.log_every = 10
    train_lib.train_and_evaluate(config, root / "heart")
    return load_trained(root / "heart")


@pytest.fixture(scope="module")
def scorer(heart_model):
    """The trained heart model with a threshold stand-in for the calcium model, which plays no
    part in the heart mask."""
    return inference.Scorer(heart_model, threshold_model("calcium"), batch_size=8)


def render(patient: int):
    """(coarse, fine) renders of held-out `patient`: the same anatomy and field of view."""
    from data_pipeline.phantom import assign_categories, patient_seed, render_scan

    category = assign_categories(SEED, max(HELD_OUT) + 1)[patient]
    return tuple(render_scan(patient_seed(SEED, patient), "cac", size, category=category)
                 for size in (COARSE_PX, FINE_PX))


@pytest.mark.parametrize("patient", HELD_OUT)
def test_fine_study_masks_agree_with_the_coarse_scan(heart_model, scorer, patient):
    trained_spacing = heart_model.pixel_spacing_mm
    assert trained_spacing["min"] > 3.0  # trained on coarse pixels only
    coarse, fine = render(patient)
    factor = FINE_PX // COARSE_PX
    assert fine.volume.spacing_zyx_mm[1] == pytest.approx(coarse.volume.spacing_zyx_mm[1] / factor,
                                                          rel=1e-5)
    assert fine.volume.spacing_zyx_mm[1] < trained_spacing["min"] / 2
    on_coarse = scorer.score(coarse.volume)
    on_fine = scorer.score(fine.volume)

    # The coarse scan lies inside the training spacing and runs as it is; the fine study is
    # resampled, and its masks come back on its own grid.
    assert on_coarse.model_spacing_yx_mm["heart"] is None
    model_spacing = on_fine.model_spacing_yx_mm["heart"]
    assert model_spacing[0] == pytest.approx(coarse.volume.spacing_zyx_mm[1], rel=1e-5)
    assert on_fine.heart_mask.shape == on_fine.calcium_labels.shape == fine.volume.shape
    assert scorer._runners["heart"].shapes == {(8, 3, COARSE_PX, COARSE_PX, 1)}

    z = fine.volume.shape[0]
    fine_on_coarse = (on_fine.heart_mask.reshape(z, COARSE_PX, factor, COARSE_PX, factor)
                      .mean(axis=(2, 4)) >= 0.5)
    assert dice(fine_on_coarse, on_coarse.heart_mask) >= 0.85
    assert on_fine.heart_volume_ml == pytest.approx(on_coarse.heart_volume_ml, rel=0.15)
    # Sensible: as close to the true heart on the fine grid as on the coarse one.
    truth_coarse = dice(on_coarse.heart_mask, coarse.heart_mask > 0)
    truth_fine = dice(on_fine.heart_mask, fine.heart_mask > 0)
    assert truth_fine >= 0.6 and truth_fine >= truth_coarse - 0.05, (truth_fine, truth_coarse)


def test_without_resampling_the_fine_study_fails(heart_model, scorer):
    """Run on the fine pixels as they are (no recorded training spacing: 1.2 mm pixels in a
    256 px frame), the same model misses the heart: the checks above can fail."""
    coarse, fine = render(HELD_OUT[0])
    truth = fine.heart_mask > 0
    resampled = dice(scorer.score(fine.volume).heart_mask, truth)
    as_is = inference.Scorer(dataclasses.replace(heart_model, pixel_spacing_mm={}),
                             threshold_model("calcium"), batch_size=8).score(fine.volume)
    assert as_is.model_spacing_yx_mm["heart"] is None
    assert dice(as_is.heart_mask, truth) < resampled - 0.2, (dice(as_is.heart_mask, truth),
                                                            resampled)
