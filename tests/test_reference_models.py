"""The reference models in models/synthetic/ (docs/study.md): parameters and config only, within
their size, each with its card, and `cac-jax infer` scores a study with them as the README shows."""

from __future__ import annotations

import csv
import pathlib

import pytest

from cac_jax import cli
from cac_jax.checkpoints import load_trained

ROOT = pathlib.Path(__file__).resolve().parents[1]
MODELS = ROOT / "models" / "synthetic"
EXPECTED = ("heart_convlstm", "calcium_convlstm", "heart_unet", "calcium_unet")
PRESENT = [name for name in EXPECTED if (MODELS / name).is_dir()]
MAX_BYTES = 40 * 2**20


def test_the_convlstm_pair_is_there_and_nothing_else():
    assert {"heart_convlstm", "calcium_convlstm"} <= set(PRESENT)
    assert sorted(p.name for p in MODELS.iterdir()) == sorted(PRESENT)
    total = sum(f.stat().st_size for f in MODELS.rglob("*") if f.is_file())
    assert total <= MAX_BYTES, f"{total / 2**20:.1f} MB"


@pytest.mark.parametrize("name", PRESENT)
def test_each_model_is_parameters_and_config_with_its_card(name):
    folder = MODELS / name
    card = (folder / "MODEL.md").read_text().splitlines()
    assert "synthetic phantoms" in card[2] and "not for clinical use" in card[2]
    steps = list((folder / "checkpoints").iterdir())
    assert len(steps) == 1 and not (steps[0] / "train_state").exists()
    trained = load_trained(folder)
    assert (trained.task, trained.config.model.arch) == tuple(name.split("_"))
    assert f"this checkpoint is step {trained.step}" in "\n".join(card)


def test_the_readme_command_scores_a_synthetic_study(tmp_path):
    """One gated study of a patient the models never saw (another seed), as DICOM."""
    cohort = tmp_path / "cohort"
    assert cli.main(["synth", "--out", str(cohort), "--patients", "1", "--protocols", "cac",
                     "--size", "256", "--seed", "4242", "--proportions", "0,0,1,0"]) == 0
    with (cohort / "manifest.csv").open() as handle:
        row = next(csv.DictReader(handle))
    out = tmp_path / "results"
    assert cli.main(["infer", "--heart-checkpoint", str(MODELS / "heart_convlstm"),
                     "--calcium-checkpoint", str(MODELS / "calcium_convlstm"),
                     "--input", str(cohort / row["image"]), "--out", str(out),
                     "--no-progress"]) == 0
    with (out / "results.csv").open() as handle:
        result = next(csv.DictReader(handle))
    assert result["status"] == "ok", result
    assert 200 <= float(result["heart_volume_ml"]) <= 1500, result
    # A patient drawn in category 101-400: the score lands in a calcified category.
    assert int(result["category"]) >= 1, result
