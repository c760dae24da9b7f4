"""The synthetic cohort's `grooved` anatomy (data_pipeline.phantom, `--anatomy grooved`): the
default cohort is what it was before the variant existed; the variant's coronaries span a
wider depth below the pericardial sac; its metal devices are labelled non-coronary; the switch is
recorded where a cohort's provenance is."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import ndimage

from cac_jax.cli import main as cli_main
from data_pipeline.io import read_labels, read_study
from data_pipeline.labels import calcium_classes
from data_pipeline.phantom import cohort as cohort_lib
from data_pipeline.phantom import generate_cohort, patient_id_for, patient_seed, render_patient
from data_pipeline.phantom.anatomy import grooved_anatomy, sample_anatomy
from data_pipeline.phantom.devices import Wire, device_wires

# Computed with the generator as it was before the anatomy variants (commit afbd64e): a 4-patient
# cohort (seed 11, 48 px, both protocols), per scan: id, HU mean and SD, voxels per label, heart
# mask voxels, true Agatston, category, spacing. Compared with tolerances, not bytes, so a numpy
# build or CPU whose transcendental functions round the last bit differently still passes, while
# a shifted random stream (other anatomy, other plaques) fails.
CLASSIC_FINGERPRINT = [
    ["syn11-0000_cac", -439.1122, 438.8755, {0: 147453, 1: 3}, 3925, 272.4699, 2, [3.0, 6.238932, 6.238932]],
    ["syn11-0000_ctac", -736.3487, 400.9109, {0: 96768}, 894, 0.0, 0, [5.0, 10.150624, 10.150624]],
    ["syn11-0001_cac", -559.826, 455.7267, {0: 147456}, 2266, 0.0, 0, [3.0, 6.573485, 6.573485]],
    ["syn11-0001_ctac", -846.3151, 330.0779, {0: 117504}, 545, 0.0, 0, [4.0, 11.621233, 11.621233]],
    ["syn11-0002_cac", -587.997, 456.7731, {0: 142825, 1: 8, 2: 2, 3: 4, 5: 1, 6: 8}, 3854, 804.358, 3, [3.0, 6.506507, 6.506507]],
    ["syn11-0002_ctac", -840.2711, 336.1872, {0: 147456}, 1473, 0.0, 0, [3.0, 10.529962, 10.529962]],
    ["syn11-0003_cac", -413.8481, 435.9173, {0: 140541, 1: 1, 6: 2}, 4847, 36.7677, 1, [3.0, 6.063638, 6.063638]],
    ["syn11-0003_ctac", -783.3447, 377.3788, {0: 115200}, 1142, 0.0, 0, [4.0, 10.783301, 10.783301]]
]


def _fingerprint(root, rows) -> list:
    out = []
    for row in rows:
        volume = read_study(root / row.image)
        labels = read_labels(root / row.calcium_labels, like=volume)
        mask = read_labels(root / row.heart_mask, like=volume)
        values, counts = np.unique(labels, return_counts=True)
        out.append([row.scan_id, float(volume.hu.astype(np.float64).mean()), float(volume.hu.std()),
                    dict(zip(values.tolist(), counts.tolist())), int((mask > 0).sum()),
                    float(row.agatston), row.category, [float(s) for s in volume.spacing_zyx_mm]])
    return out


def test_default_cohort_is_what_it_was(tmp_path):
    rows = generate_cohort(tmp_path, patients=4, protocols=("cac", "ctac"), size=48, seed=11)
    got = _fingerprint(tmp_path, rows)
    assert [g[0] for g in got] == [e[0] for e in CLASSIC_FINGERPRINT]
    for g, e in zip(got, CLASSIC_FINGERPRINT):
        assert g[1] == pytest.approx(e[1], abs=0.01) and g[2] == pytest.approx(e[2], abs=0.01), g[0]
        assert set(g[3]) == set(e[3]), g[0]
        for label, count in e[3].items():
            assert abs(g[3][label] - count) <= 2, (g[0], label)
        assert abs(g[4] - e[4]) <= 2, g[0]
        assert g[5] == pytest.approx(e[5], rel=1e-3, abs=1e-3) and g[6] == e[6], g[0]
        assert g[7] == pytest.approx(e[7], rel=1e-6), g[0]
    manifest = (tmp_path / "manifest.csv").read_text()
    assert "grooved" not in manifest and "anatomy" not in (tmp_path / "cohort.json").read_text()
    # Naming the default changes nothing: same seeds, ids and stamp.
    assert patient_seed(11, 2, anatomy="classic") == patient_seed(11, 2)
    assert patient_id_for(11, 2, anatomy="classic") == "syn11-0002"
    assert cohort_lib.generator_identity() == cohort_lib.generator_identity("classic") == 2


def _coronary_depths(anatomy: str, patients: int = 8, size: int = 64) -> np.ndarray:
    """Depth (mm) below the heart-mask surface of every coronary truth voxel of the gated scans
    of the same patient seeds, category 3 (the most plaques); checks them on the way."""
    depths = []
    for k in range(patients):
        scan = render_patient(patient_seed(0, k), ("cac",), size, category=3,
                              anatomy=anatomy)["cac"]
        assert scan.category == 3   # the requested category is met on the gated scan
        coronary = (scan.calcium_labels >= 1) & (scan.calcium_labels <= 3)
        assert coronary.any()
        assert np.all(scan.heart_mask[coronary] == 1)
        assert np.all(scan.volume.hu[coronary] >= 130)
        depth = ndimage.distance_transform_edt(scan.heart_mask,
                                               sampling=scan.volume.spacing_zyx_mm)
        depths.append(depth[coronary])
    return np.concatenate(depths)


def test_grooved_coronaries_span_a_wider_depth_below_the_sac():
    classic = np.percentile(_coronary_depths("classic"), [10, 90])
    grooved_all = _coronary_depths("grooved")
    grooved = np.percentile(grooved_all, [10, 90])
    # Classic: a uniform 6.5-11 mm fat layer puts every coronary 4-10 mm deep (a little more at
    # 64 px, and the left main). Grooved: 3-20 mm.
    assert classic[1] < 12.5
    assert grooved[1] > 14.0
    assert grooved[1] - grooved[0] > classic[1] - classic[0] + 3.0
    assert grooved_all.max() > 17.0 and grooved[0] < 6.0


def test_groove_fat_is_thin_on_free_walls_and_deep_in_the_grooves():
    for k in range(6):
        streams = cohort_lib._streams(patient_seed(0, k))
        classic = sample_anatomy(streams["anatomy"])
        anat = grooved_anatomy(classic, streams["grooves"])
        g, layout = anat.heart.grooves, anat.coronary_layout
        assert 1.5 <= g.free_mm <= 4.0 and g.av_mm >= anat.heart.coronary_offset_mm + 2.5
        # On the groove lines the fat is the groove's depth; far from them, the free wall's.
        assert g.fat_mm(layout.groove, 1.0) == pytest.approx(g.av_mm, rel=1e-6)
        assert g.fat_mm(layout.lad_start, layout.lad_phi) >= g.aiv_mm[0] - 1e-6
        free = g.fat_mm(0.4 * np.pi, layout.lad_phi - 1.4)   # the free wall, between the grooves
        assert free == pytest.approx(g.free_mm, abs=0.3)
        # Only the heart and its coronaries change: the body and the valves stay where they were.
        assert np.array_equal(anat.aortic_root, classic.aortic_root)
        assert np.array_equal(anat.mitral_center, classic.mitral_center)
        assert anat.body_axes == classic.body_axes and anat.heart.fat_mm == classic.heart.fat_mm
        # The left main leaves the aortic root (its ostium on the root's wall).
        ostium = anat.coronaries["LM"].points[0]
        assert np.linalg.norm(ostium - anat.aortic_root) == pytest.approx(layout.root_radius_mm)


def _device_draws(seed: int, k: int):
    streams = cohort_lib._streams(patient_seed(seed, k, anatomy="grooved"))
    category = int(streams["category"].integers(0, 4))
    anat = grooved_anatomy(sample_anatomy(streams["anatomy"]), streams["grooves"])
    return device_wires(anat, category, streams["devices"])


def test_device_prevalence():
    names = [{w.name for w in _device_draws(0, k)} for k in range(200)]
    lead = np.mean([any("lead" in n for n in s) for s in names])
    sternal = np.mean(["sternal wire" in s for s in names])
    assert 0.08 <= lead <= 0.2 and 0.12 <= sternal <= 0.26
    assert all(("generator can" in s) == any("lead" in n for n in s) for s in names)


def test_device_metal_is_labelled_non_coronary():
    k = next(k for k in range(100)
             if any(w.name in ("pacing lead", "ICD lead") for w in _device_draws(0, k)))
    scans = render_patient(patient_seed(0, k, anatomy="grooved"), ("cac", "ctac"), 128,
                           category=2, anatomy="grooved")
    assert scans["cac"].category == 2
    for scan in scans.values():
        wires = [c for c in scan.calcifications if isinstance(c, Wire)]
        assert wires and not any(w.coronary for w in wires)
        hu, labels = scan.volume.hu, scan.calcium_labels
        metal = hu > 1500
        assert metal.sum() >= 5
        assert np.all(labels[metal] == 7)
        assert np.all(calcium_classes(labels, hu)[metal] == 2)
        # The lead runs through the heart (label 7 inside the heart mask); no metal is coronary.
        assert ((labels == 7) & (scan.heart_mask == 1)).any()
        assert not np.any((labels[hu > 1000] >= 1) & (labels[hu > 1000] <= 4))
    gated = scans["cac"]
    assert ((gated.volume.hu > 1500) & (gated.heart_mask == 1)).any()


def test_grooved_cohort_is_its_own_and_says_so(tmp_path, capsys):
    assert patient_seed(7, 0, anatomy="grooved") != patient_seed(7, 0)
    assert patient_id_for(7, 0, anatomy="grooved") == "syn7-grooved-0000"
    assert patient_id_for(7, 0, "site2", "grooved") == "syn7-site2-grooved-0000"
    assert cohort_lib.generator_identity("grooved") == "2+grooved1"
    with pytest.raises(ValueError, match="unknown anatomy"):
        cohort_lib.generator_identity("smooth")
    out = tmp_path / "grooved"
    assert cli_main(["synth", "--out", str(out), "--patients", "1", "--size", "48", "--seed", "7",
                     "--protocols", "cac", "--anatomy", "grooved"]) == 0
    provenance = json.loads((out / "cohort.json").read_text())
    assert provenance["anatomy"] == "grooved"
    assert provenance["generator_identity"] == "2+grooved1"
    assert (out / "syn7-grooved-0000" / "cac" / "dicom").is_dir()
    capsys.readouterr()
