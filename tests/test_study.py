"""`cac-jax study`: its configs make valid training runs, and the whole path runs (slow)."""

from __future__ import annotations

import json
import pathlib

import pytest

from cac_jax import cli
from cac_jax.config_defaults import load_config_file

ROOT = pathlib.Path(__file__).resolve().parents[1]
STUDY = ROOT / "configs" / "study.py"


@pytest.mark.parametrize("arg", [None, "gpu", "local"])
def test_every_training_of_the_study_parses_as_cac_jax_train_would(arg, tmp_path):
    """Each training's config file and overrides parse with `cac-jax train`'s parser and pass its
    checks; calcium trainings are heart-frame models except the ablation's."""
    from cac_jax import study
    from cac_jax.main import parse_flags
    from cac_jax.train import check_config

    config = load_config_file(STUDY, arg)
    assert set(config.systems) == {"convlstm", "unet", "convlstm_slice"}
    for name, spec in config.trainings.items():
        path, relative = study._config_file(spec.config)
        argv = ["--config", path, "--workdir", str(tmp_path / name),
                *(f"--config.{item}" for item in spec.overrides)]
        parsed, _ = parse_flags(argv)
        check_config(parsed)
        assert parsed.task == name.split("_")[0]
        if parsed.task == "calcium":
            frame = "slice" if name.endswith("_slice") else "heart"
            assert parsed.data.calcium_frame == frame, name
        if arg != "local":
            assert parsed.train.max_seconds == 0  # convergence, not a time box
            assert parsed.train.early_stop_patience > 0
    for heart, calcium in config.systems.values():
        assert heart in config.trainings and calcium in config.trainings


def test_unknown_stage_or_training_is_one_line_exit_2(tmp_path, capsys):
    assert cli.main(["study", "--out", str(tmp_path / "s"), "--stages", "train,fly"]) == 2
    assert "unknown stage(s) fly" in capsys.readouterr().err
    assert cli.main(["study", "--config", f"{STUDY}:local", "--out", str(tmp_path / "s"),
                     "--only", "heart_lstm"]) == 2
    assert "--only names no training heart_lstm" in capsys.readouterr().err
    assert cli.main(["study", "--config", str(tmp_path / "none.py"), "--out",
                     str(tmp_path / "s")]) == 2
    assert "no such study config file" in capsys.readouterr().err


@pytest.mark.slow
def test_the_local_study_runs_every_stage_and_resumes(tmp_path):
    out = tmp_path / "study"
    assert cli.main(["study", "--config", f"{STUDY}:local", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    for cohort in ("test", "unseen"):
        for model in ("convlstm", "unet", "convlstm_slice", "naive"):
            assert summary[cohort][model]["cac"]["n"] >= 2
    assert (out / "report.md").exists()
    before = (out / "models" / "calcium_convlstm" / "summary.json").stat().st_mtime
    assert cli.main(["study", "--config", f"{STUDY}:local", "--out", str(out)]) == 0
    assert (out / "models" / "calcium_convlstm" / "summary.json").stat().st_mtime == before
