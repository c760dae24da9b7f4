"""benchmarks/ctac_lesions.py: a CTAC call is matched in world millimetres to the CTAC truth, else
to the same patient's gated truth, else it is false; the categories follow from the classes."""

from __future__ import annotations

import csv
import json
import pathlib

import numpy as np
import pytest
from io_fixtures import write_image_file as _write
from script_loader import load_benchmark

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def script():
    return load_benchmark("ctac_lesions")


def _patient(root: pathlib.Path, pid: str, plaques: bool) -> list[dict]:
    """A gated scan (1 mm pixels, 3 mm slices) and a CTAC scan of the same world box (2 mm
    pixels, 6 mm slices, shifted origin). Plaque A (world x=10, y=10, z=33) shows in both; plaque
    B (x=30, y=30, z=33) only in the gated scan."""
    rows = []
    grids = {"cac": ((12, 40, 40), (3.0, 1.0, 1.0), (0.0, 0.0, 0.0)),
             "ctac": ((6, 20, 20), (6.0, 2.0, 2.0), (0.0, 0.0, 9.0))}
    for protocol, (shape, spacing, origin) in grids.items():
        hu = np.zeros(shape, np.int16)
        labels = np.zeros(shape, np.int16)
        if plaques:
            shown = ((10, 10, 33), (30, 30, 33)) if protocol == "cac" else ((10, 10, 33),)
            for x, y, z in shown:
                k = int(round((z - origin[2]) / spacing[0]))
                j, i = int(round(y / spacing[1])), int(round(x / spacing[2]))
                hu[k, j - 1:j + 2, i - 1:i + 2] = 400
                labels[k, j - 1:j + 2, i - 1:i + 2] = 1
        folder = root / pid / protocol
        _write(folder / "image.nii.gz", hu, spacing, origin)
        _write(folder / "labels.nii.gz", labels, spacing, origin)
        category = (2 if protocol == "cac" else 1) if plaques else 0
        rows.append({"patient_id": pid, "scan_id": f"{pid}_{protocol}", "protocol": protocol,
                     "image": f"{pid}/{protocol}/image.nii.gz",
                     "calcium_labels": f"{pid}/{protocol}/labels.nii.gz", "category": category})
    return rows


def _lesion(z, y, x, agatston, label=1):
    return {"slice_index": z, "centroid_yx": [y, x], "label": label, "agatston": agatston}


def test_calls_are_classed_by_world_position_and_scored(script, tmp_path):
    cohort, infer = tmp_path / "cohort", tmp_path / "infer"
    rows = _patient(cohort, "p1", True) + _patient(cohort, "p2", False)
    with open(cohort / "manifest.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    infer.mkdir()
    # On p1's CTAC grid (origin z 9 mm, 6 mm slices, 2 mm pixels): plaque A is voxel (4, 5, 5),
    # plaque B (4, 15, 15) (read without the origin, both would lie 9 mm off); (1, 2, 18) is far from both. A non-coronary call (label 5) is ignored.
    p1 = [_lesion(4, 5, 5, 50.0), _lesion(4, 15, 15, 60.0), _lesion(1, 2, 18, 5.0),
          _lesion(1, 2, 2, 900.0, label=5)]
    (infer / "p1_ctac.json").write_text(json.dumps({"category": 2, "lesions": p1}))
    (infer / "p2_ctac.json").write_text(json.dumps({"category": 0, "lesions": []}))
    out = tmp_path / "out"
    assert script.main(["--cohort", f"c={infer},{cohort / 'manifest.csv'}", "--radius", "5",
                        "--pool", "all=c", "--out", str(out)]) == 0
    result = json.loads((out / "ctac_lesions.json").read_text())
    p1_row = result["patients"]["c"][0]
    assert (p1_row["visible"], p1_row["hidden"], p1_row["false"]) == (50.0, 60.0, 5.0)
    assert (p1_row["gated"], p1_row["ctac_truth"], p1_row["model"]) == (2, 1, 2)
    assert (p1_row["without_false"], p1_row["visible_only"]) == (2, 1)
    summary = result["cohorts"]["c"]
    # The CTAC truth's lone plaque sits exactly where the gated one is.
    assert summary["alignment_mm"] == {"median": 0.0, "p90": 0.0}
    assert summary["kappa_vs_gated"]["model"] == 1.0
    assert summary["kappa_vs_gated"]["ctac_truth"] < 1.0
    assert summary["raised_by_hidden"] == 1 and summary["above_gated"] == 0
    assert result["cohorts"]["all"] == summary
    assert "| c | 2 |" in (out / "ctac_lesions.md").read_text()


def test_a_category_that_its_lesions_do_not_add_up_to_is_refused(script, tmp_path, capsys):
    cohort, infer = tmp_path / "cohort", tmp_path / "infer"
    rows = _patient(cohort, "p1", True)
    with open(cohort / "manifest.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    infer.mkdir()
    (infer / "p1_ctac.json").write_text(json.dumps({"category": 3,
                                                    "lesions": [_lesion(4, 5, 5, 50.0)]}))
    with pytest.raises(SystemExit) as stop:
        script.main(["--cohort", f"c={infer},{cohort / 'manifest.csv'}", "--out",
                     str(tmp_path / "out")])
    assert stop.value.code == 2
    message = capsys.readouterr().err.strip()
    assert "\n" not in message and message.startswith("ctac_lesions: cohort c: ")
    assert message.endswith("p1_ctac.json: its lesions sum to category 1, its category is 3")
    assert not (tmp_path / "out").exists()
