"""benchmarks/foreign_cohort.py: the independently written phantom generator writes DICOM that
SimpleITK and the project's reader read, labels that overlay its calcium, and a manifest whose
truth score is the project's Agatston score of the written scan."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest
import SimpleITK as sitk
from script_loader import load_benchmark

from cac_jax.scoring import agatston_score
from data_pipeline.io import read_labels, read_study
from data_pipeline.manifest import read_manifest

ROOT = pathlib.Path(__file__).resolve().parents[1]
HEADER = ("patient_id,scan_id,protocol,image,calcium_labels,heart_mask,site,split,"
          "agatston,category,series")


def _module():
    return load_benchmark("foreign_cohort")


def _read_series(folder: pathlib.Path) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    return reader.Execute()


def _same_grid(a: sitk.Image, b: sitk.Image) -> None:
    assert a.GetSize() == b.GetSize()
    np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), rtol=1e-5)
    np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-3)
    np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), atol=1e-6)


def test_target_categories_follow_the_mix():
    fc = _module()
    cats = fc.target_categories(40, seed=7)
    assert np.bincount(cats, minlength=4).tolist() == [12, 10, 10, 8]
    assert fc.target_categories(3, seed=1, forced=[2]) == [2, 2, 2]


def test_one_patient_at_64_px(tmp_path):
    fc = _module()
    assert fc.main(["--out", str(tmp_path), "--patients", "1", "--size", "64", "--seed", "3",
                    "--categories", "3"]) == 0
    manifest = tmp_path / "manifest.csv"
    assert manifest.read_text().splitlines()[0] == HEADER
    rows = read_manifest(manifest)
    assert [r.protocol for r in rows] == ["cac", "ctac"]
    assert len({r.patient_id for r in rows}) == 1
    for row in rows:
        assert row.site == "foreign" and row.split == "test" and row.series is None
        assert row.scan_id == f"{row.patient_id}_{row.protocol}"
        image = _read_series(row.image)
        assert image.GetSize()[:2] == (64, 64)
        hu = sitk.GetArrayFromImage(image).astype(np.float32)
        assert hu.min() >= -3024 and hu.max() <= 3071
        assert np.percentile(hu, 5) < -800          # air and lung
        labels_img = sitk.ReadImage(str(row.calcium_labels))
        heart_img = sitk.ReadImage(str(row.heart_mask))
        _same_grid(labels_img, image)
        _same_grid(heart_img, image)
        labels = sitk.GetArrayFromImage(labels_img)
        heart = sitk.GetArrayFromImage(heart_img)
        assert set(np.unique(labels).tolist()) <= {0, 1, 2, 3, 5}
        assert set(np.unique(heart).tolist()) == {0, 1}
        assert -110 < float(np.median(hu[heart > 0])) < 80   # fat, blood and myocardium
        if row.protocol == "cac":
            coronary = np.isin(labels, (1, 2, 3))
            assert coronary.any()
            assert np.mean(hu[labels > 0] >= 130) >= 0.95
            assert np.mean(heart[coronary] > 0) >= 0.9
        # the manifest's truth is the project's score of the scan as the project reads it
        vol = read_study(row.image)
        assert vol.metadata.protocol == row.protocol
        lab = read_labels(row.calcium_labels, like=vol)
        result = agatston_score(vol.hu, lab, vol.spacing_zyx_mm)
        assert row.agatston == pytest.approx(result.agatston, abs=1e-3)
        assert row.category == result.category
    assert rows[0].agatston > 0


def test_probe_counts_every_truth_voxel(tmp_path):
    """benchmarks/foreign_probe.py on one 64 px patient with the reference models: a results.csv
    per scorer, and every coronary truth voxel at >= 130 HU counted once in the depth table."""
    fc = _module()
    cohort = tmp_path / "cohort"
    assert fc.main(["--out", str(cohort), "--patients", "1", "--size", "64", "--seed", "5",
                    "--categories", "2"]) == 0
    probe = load_benchmark("foreign_probe")
    out = tmp_path / "probe"
    assert probe.main(["--cohort", str(cohort), "--out", str(out)]) == 0
    for scorer in ("infer_naive", "infer_trueheart"):
        lines = (out / scorer / "results.csv").read_text().splitlines()
        assert len(lines) == 3 and ",ok," in lines[1] and ",ok," in lines[2]
    report = json.loads((out / "depth.json").read_text())
    rows = read_manifest(cohort / "manifest.csv")
    for row in rows:
        vol = read_study(row.image)
        lab = read_labels(row.calcium_labels, like=vol)
        expected = int((np.isin(lab, (1, 2, 3)) & (vol.hu >= 130)).sum())
        table = report["depth"][row.protocol]["coronary"]
        assert sum(r["voxels"] for r in table) == expected
        for r in table:
            if r["voxels"]:
                assert sum(r[c] for c in probe.CLASSES) == pytest.approx(1.0)
    visibility = report["lesion_visibility"][str(cohort / "manifest.csv")]
    assert visibility["cac"]["scans"] == 1 and visibility["cac"]["lesions"] >= 1
    assert 0.0 <= visibility["cac"]["lesions_at_least_3_sigmas"] <= 1.0
    text = (out / "foreign_probe.md").read_text()
    assert "Coronary calcium depth" in text and "against the noise" in text
