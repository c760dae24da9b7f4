"""benchmarks/operating_point.py: the stricter and looser coronary rules, and its kappas."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest
from script_loader import load_benchmark

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def script():
    return load_benchmark("operating_point")


def _scan():
    """Two coronary lesions called by the argmax (A: peak 0.9, B: peak 0.65, both 2 voxels), one
    voxel where coronary is 0.35 but non-coronary likelier (C), all at 400 HU."""
    probabilities = np.zeros((1, 6, 12, 3), np.float32)
    probabilities[..., 0] = 1.0
    hu = np.full((1, 6, 12), -50.0, np.float32)

    def put(y, x, p_coronary, p_other):
        probabilities[0, y, x] = (1.0 - p_coronary - p_other, p_coronary, p_other)
        hu[0, y, x] = 400.0

    put(1, 1, 0.9, 0.05)   # A: its peak
    put(1, 2, 0.55, 0.1)   # A: a weaker voxel of the same lesion
    put(4, 6, 0.65, 0.2)   # B
    put(4, 7, 0.62, 0.25)  # B
    put(2, 10, 0.35, 0.6)  # C: non-coronary by the argmax
    return probabilities, hu


def test_argmax_and_lesion_rule(script):
    probabilities, hu = _scan()
    argmax = script.rule_prediction(probabilities, hu, "argmax", 0.0)
    assert argmax[0, 1, 1] == argmax[0, 1, 2] == argmax[0, 4, 6] == 1
    assert argmax[0, 2, 10] == 2
    strict = script.rule_prediction(probabilities, hu, "lesion", 0.7)
    # A is kept whole (its weak voxel too); B's peak 0.65 < 0.7: it goes to its likelier other
    # class, non-coronary; C is untouched.
    assert strict[0, 1, 1] == strict[0, 1, 2] == 1
    assert strict[0, 4, 6] == strict[0, 4, 7] == 2
    assert strict[0, 2, 10] == 2
    assert (strict == 1).sum() == 2


def test_voxel_rule_both_ways(script):
    probabilities, hu = _scan()
    strict = script.rule_prediction(probabilities, hu, "voxel", 0.6)
    # Voxel by voxel: A's 0.55 voxel goes to its likelier other class (background); B stays.
    assert strict[0, 1, 1] == 1 and strict[0, 1, 2] == 0
    assert strict[0, 4, 6] == 1 and strict[0, 4, 7] == 1
    loose = script.rule_prediction(probabilities, hu, "voxel", 0.3)
    # Below 0.5 the rule calls C, which the argmax gave to non-coronary.
    assert loose[0, 2, 10] == 1
    assert (loose == 1).sum() == 5


def test_unknown_rule_refused(script):
    probabilities, hu = _scan()
    with pytest.raises(ValueError, match="unknown rule"):
        script.rule_prediction(probabilities, hu, "median", 0.5)


def _record(pid, protocol, reference_category, called):
    return {"patient_id": pid, "protocol": protocol, "problems": [],
            "reference": [0.0, reference_category],
            "scores": {"argmax": [0.0, called[0]], "lesion@0.7": [0.0, called[1]]}}


def test_summary_pairs_ctac_with_the_gated_reference(script):
    # Patient p0 has no gated calcium and a CTAC call under the argmax only; p1 is category 3
    # on gated and 1 on its CTAC truth, called 3 / 1; p2, p3 are right everywhere.
    rows = [_record("p0", "cac", 0, (0, 0)), _record("p0", "ctac", 0, (1, 0)),
            _record("p1", "cac", 3, (3, 3)), _record("p1", "ctac", 1, (3, 1)),
            _record("p2", "cac", 2, (2, 2)), _record("p2", "ctac", 2, (2, 2)),
            _record("p3", "cac", 1, (1, 1)), _record("p3", "ctac", 1, (1, 1))]
    summary = script.summarise(rows)
    assert list(summary) == ["argmax", "lesion@0.7"]
    assert summary["argmax"]["gated"] == 1.0
    assert summary["argmax"]["calcium_free_ctac_called"] == 1
    assert summary["lesion@0.7"]["calcium_free_ctac_called"] == 0
    assert summary["argmax"]["calcium_free_patients"] == 1
    # The argmax's CTAC agrees with the gated reference except p0; the strict rule's CTAC with its
    # own truth everywhere.
    assert summary["lesion@0.7"]["ctac_own_truth"] == 1.0
    assert summary["argmax"]["ctac_vs_gated"] > summary["lesion@0.7"]["ctac_vs_gated"]
    assert summary["argmax"]["ctac_own_truth"] < 1.0


def test_bad_thresholds_refused(script, tmp_path, capsys):
    manifest = tmp_path / "m.csv"
    manifest.write_text("patient_id,scan_id,protocol,image,calcium_labels\n")
    code = script.main(["--heart", "h", "--calcium", "c", "--cohort", f"a={manifest}",
                        "--voxel-thresholds", "0.3,1.2", "--out", str(tmp_path / "out")])
    assert code == 2
    assert "strictly between 0 and 1" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_resume_drops_a_cut_off_line(script, tmp_path):
    """A killed run can leave half a line at the end of scans.jsonl: it is dropped (that scan runs
    again) and the rest is summarised."""
    manifest = tmp_path / "m.csv"
    manifest.write_text("patient_id,scan_id,protocol,image,calcium_labels\n"
                        "p0,p0_cac,cac,p0.nii.gz,\np0,p0_ctac,ctac,p0c.nii.gz,\n")
    for name in ("p0.nii.gz", "p0c.nii.gz"):
        (tmp_path / name).write_bytes(b"")  # never read with --summarise-only
    out = tmp_path / "out"
    out.mkdir()
    good = {"cohort": "a", **_record("p0", "cac", 0, (0, 0)), "scan_id": "p0_cac",
            "argmax_check": 0}
    (out / "scans.jsonl").write_text(json.dumps(good) + "\n" + '{"cohort": "a", "scan_')
    code = script.main(["--heart", "h", "--calcium", "c", "--cohort", f"a={manifest}",
                        "--pool", "all=a", "--out", str(out), "--summarise-only"])
    assert code == 0
    assert (out / "scans.jsonl").read_text() == json.dumps(good) + "\n"
    result = json.loads((out / "operating_point.json").read_text())
    assert result["cohorts"]["a"]["argmax"]["gated_scans"] == 1
    assert result["argmax_mismatches"] == 0
