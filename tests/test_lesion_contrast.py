"""benchmarks/lesion_contrast.py: components at >= 130 HU inside the heart, by label class."""

from __future__ import annotations

import json
import pathlib

import numpy as np
from script_loader import load_benchmark

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _module():
    return load_benchmark("lesion_contrast")


def test_components_are_classed_by_the_labels_they_touch():
    lc = _module()
    hu = np.zeros((4, 12, 12), np.float32)
    labels = np.zeros(hu.shape, np.int16)
    heart = np.zeros(hu.shape, bool)
    heart[:, 1:11, 1:11] = True
    hu[1:3, 2:4, 2:4] = 400.0             # a coronary plaque over 2 slices, labelled on one voxel
    labels[1, 2, 2] = 2
    hu[0, 8, 8] = 180.0                    # a noise voxel
    hu[2, 8, 2] = 250.0                    # aortic-wall calcium
    labels[2, 8, 2] = 5
    hu[3, 0, 0] = 900.0                    # outside the heart: ignored
    hu[3, 5, 5] = 129.0                    # below 130 HU: ignored
    found = sorted(lc.components(hu, labels, heart))
    assert found == [("coronary", 400.0, 8, 2), ("non_coronary", 250.0, 1, 1),
                     ("unlabelled", 180.0, 1, 1)]
    summary = lc.summarise(found, [200.0])
    assert summary["coronary"]["peak_at_least"] == {"200.0": 1}
    assert summary["unlabelled"]["peak_at_least"] == {"200.0": 0}
    assert summary["unlabelled"]["n"] == 1


def test_runs_on_a_synthetic_cohort(tmp_path):
    from data_pipeline.phantom import generate_cohort

    generate_cohort(tmp_path / "cohort", patients=2, size=48, seed=0)
    result = _module().main(["--manifest", str(tmp_path / "cohort" / "manifest.csv"),
                             "--out", str(tmp_path / "out")])
    assert set(result["protocols"]) == {"cac", "ctac"}
    assert all(cell["scans"] == 2 for cell in result["protocols"].values())
    saved = json.loads((tmp_path / "out" / "lesion_contrast.json").read_text())
    assert saved["protocols"]["cac"]["coronary"]["n"] == result["protocols"]["cac"]["coronary"]["n"]
    assert (tmp_path / "out" / "lesion_contrast.md").read_text().startswith("# Coronary lesions")
