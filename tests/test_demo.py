"""The end-to-end demo on a tiny cohort: every stage runs and the summary is consistent."""

from __future__ import annotations

import json

from cac_jax import demo


def test_demo_end_to_end_on_a_tiny_cohort(tmp_path, capsys):
    settings = demo.DemoSettings(patients=4, size=56, seed=3)  # 56 px: not a multiple of 16
    summary = demo.run(tmp_path, settings, workers=1)
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["settings"] == {"patients": 4, "size": 56, "seed": 3}
    assert (tmp_path / "summary.md").read_text().startswith("# cac-jax demo")
    assert len(list((tmp_path / "cohort" / "previews").glob("*.png"))) == 8

    # Scores read back from the files equal the manifest's (written with 4 decimals).
    assert summary["max_abs_score_difference"] < 1e-3
    assert summary["true_category_counts"]["cac"] == [1, 1, 1, 1]
    for name, result in summary["agreement"].items():
        assert result["n"] == 4, name
        assert sum(map(sum, result["concordance"])) == 4, name

    # Patient splits 2/1/1: the training batch is rounded up to the models' multiple of 16.
    pipeline = summary["pipeline"]
    assert pipeline["validation_scans"] == 2 and pipeline["train_scans"] == 4
    assert pipeline["batch_shapes"]["image"] == [1, 4, 3, 64, 64, 1]
    assert sum(pipeline["batch_label_voxels"].values()) == 4 * 64 * 64
    model = summary["model"]
    assert model["logits_shape"] == [4, 64, 64, 3]
    low, high = model["attention_range"]
    assert 0.0 < low <= high < 1.0

    # A second run reuses the cohort and the dataset.
    capsys.readouterr()
    demo.run(tmp_path, settings, workers=1)
    out = capsys.readouterr().out
    assert "reusing the synthetic cohort" in out and "reusing the TFDS dataset" in out
