"""benchmarks/ctac_ceiling.py: the located 130 HU reader scores a CTAC scan with only the voxels
at >= 130 HU near the gated plaques, and reports how bright each plaque is on the CTAC."""

from __future__ import annotations

import csv
import json
import pathlib

import numpy as np
import pytest
from io_fixtures import write_image_file as _write
from script_loader import load_benchmark


@pytest.fixture(scope="module")
def script():
    return load_benchmark("ctac_ceiling")


def _cohort(root: pathlib.Path) -> pathlib.Path:
    """One patient. Gated scan (1 mm pixels, 3 mm slices): plaques A (world x=10, y=10, z=33) and
    B (x=30, y=30) at 400 HU, 3 x 3 pixels each. CTAC scan of the same world box (2 mm pixels,
    6 mm slices, shifted origin): A at 400 HU, B blurred to 100 HU, and a 400 HU spot at x=10,
    y=30, 20 mm from any plaque (not coronary calcium)."""
    grids = {"cac": ((12, 40, 40), (3.0, 1.0, 1.0), (0.0, 0.0, 0.0)),
             "ctac": ((6, 20, 20), (6.0, 2.0, 2.0), (0.0, 0.0, 9.0))}
    spots = {"cac": [(10, 10, 400, 1), (30, 30, 400, 1)],
             "ctac": [(10, 10, 400, 1), (30, 30, 100, 0), (10, 30, 400, 0)]}
    rows = []
    for protocol, (shape, spacing, origin) in grids.items():
        hu, labels = np.zeros(shape, np.int16), np.zeros(shape, np.int16)
        k = int(round((33 - origin[2]) / spacing[0]))
        for x, y, value, label in spots[protocol]:
            j, i = int(round(y / spacing[1])), int(round(x / spacing[2]))
            hu[k, j - 1:j + 2, i - 1:i + 2] = value
            labels[k, j - 1:j + 2, i - 1:i + 2] = label
        folder = root / "p0" / protocol
        _write(folder / "image.nii.gz", hu, spacing, origin)
        _write(folder / "labels.nii.gz", labels, spacing, origin)
        _write(folder / "heart.nii.gz", np.ones(shape, np.int16), spacing, origin)
        # Agatston = area x weight x (z spacing / 3 mm) (docs/contracts.md). Gated truth: 2
        # plaques x 9 mm^2 x 4 = 72 (category 1); CTAC truth: A alone on 2 mm pixels and 6 mm
        # slices, 36 mm^2 x 4 x 2 = 288 (category 2).
        agatston, category = (72.0, 1) if protocol == "cac" else (288.0, 2)
        rows.append({"patient_id": "p0", "scan_id": f"p0_{protocol}", "protocol": protocol,
                     "image": f"p0/{protocol}/image.nii.gz",
                     "calcium_labels": f"p0/{protocol}/labels.nii.gz",
                     "heart_mask": f"p0/{protocol}/heart.nii.gz", "agatston": agatston,
                     "category": category})
    manifest = root / "manifest.csv"
    with open(manifest, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return manifest


def test_the_ceiling_counts_only_the_plaques_the_ctac_shows_at_130_hu(script, tmp_path):
    out = tmp_path / "out"
    assert script.main(["--cohort", f"one={_cohort(tmp_path)}", "--radius", "5",
                        "--out", str(out)]) == 0
    result = json.loads((out / "ctac_ceiling.json").read_text())
    row, = result["patients"]["one"]
    # Plaque A only: the blurred plaque B is below 130 HU, the far spot is not near a plaque.
    assert row["ceiling_agatston"] == pytest.approx(288.0)
    assert row["ceiling"] == 2
    assert sorted(row["lesion_ctac_peaks_hu"]) == [100.0, 400.0]
    assert row["gated_self"] == row["gated"] == 1
    summary = result["cohorts"]["one"]
    assert (summary["gated_lesions"], summary["lesions_at_130_hu_in_ctac"]) == (2, 1)
    assert summary["ceiling_above_gated"] == 1
    assert "| one | 1 |" in (out / "ctac_ceiling.md").read_text()


def test_a_missing_manifest_is_one_line_and_exit_2(script, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        script.main(["--cohort", f"x={tmp_path / 'nope.csv'}", "--out", str(tmp_path / "o")])
    assert stop.value.code == 2
    assert "nope.csv: no such manifest" in capsys.readouterr().err
