"""Synthetic cohort (data_pipeline.phantom): files round-trip, categories, determinism, geometry,
and that a plain 130 HU threshold inside the heart is a poor scorer (more so on CTAC)."""

from __future__ import annotations

import dataclasses
import json
from collections import Counter

import numpy as np
import pytest
from scipy import ndimage

from cac_jax.baselines import threshold_score
from cac_jax.cli import main as cli_main
from cac_jax.scoring import agatston_score, cac_category, score_study
from data_pipeline.io import read_labels, read_study
from data_pipeline.manifest import read_manifest
from data_pipeline.phantom import (
    assign_categories,
    generate_cohort,
    patient_seed,
    render_patient,
    render_scan,
)
from data_pipeline.phantom import cohort as cohort_lib
from data_pipeline.phantom.render import _ellipsoid_sdf, complete_lesions

SEED = 0


@pytest.fixture(scope="module")
def small_cohort():
    """8 patients (two of each designed category) at 96 px, both protocols, in memory."""
    categories = assign_categories(SEED, 8)
    return [render_patient(patient_seed(SEED, k), ("cac", "ctac"), 96, category=categories[k],
                           patient_id=f"p{k}") for k in range(8)]


def test_cli_writes_cohort_that_round_trips(tmp_path):
    out = tmp_path / "cohort"
    # Category 3, so that both protocols' files carry (visible) calcium through the round trip.
    code = cli_main(["synth", "--out", str(out), "--patients", "2", "--size", "128", "--seed", "3",
                     "--preview", "--proportions", "0,0,0,1"])
    assert code == 0
    rows = read_manifest(out / "manifest.csv")
    assert [r.scan_id for r in rows] == ["syn3-0000_cac", "syn3-0000_ctac", "syn3-0001_cac",
                                         "syn3-0001_ctac"]
    categories = assign_categories(3, 2, (0, 0, 0, 1))
    assert categories == [3, 3]
    assert all(row.agatston > 0 for row in rows), [(r.scan_id, r.agatston) for r in rows]
    for row in rows:
        assert row.site == "synthetic" and row.split is None
        assert (out / "previews" / f"{row.scan_id}.png").stat().st_size > 1000
        volume = read_study(row.image)
        k = int(row.patient_id.split("-")[1])
        expected = render_scan(patient_seed(3, k), row.protocol, 128, category=categories[k],
                               patient_id=row.patient_id)
        assert volume.hu.shape == expected.volume.hu.shape
        assert np.abs(volume.hu - expected.volume.hu).max() <= 0.5
        assert np.allclose(volume.spacing_zyx_mm, expected.volume.spacing_zyx_mm, atol=1e-4)
        assert np.allclose(volume.origin_xyz_mm, expected.volume.origin_xyz_mm, atol=1e-3)
        assert volume.metadata.protocol == row.protocol
        assert volume.metadata.ecg_gated is (row.protocol == "cac")
        labels = read_labels(row.calcium_labels, like=volume)
        assert np.array_equal(labels, expected.calcium_labels)
        mask = read_labels(row.heart_mask, like=volume)
        assert set(np.unique(mask)) == {0, 1}
        rescored = score_study(row.image, row.calcium_labels)
        assert rescored.agatston == pytest.approx(row.agatston, abs=1e-3)
        assert rescored.category == row.category
        if row.protocol == "cac":
            assert row.category == categories[k]


def test_rerun_into_same_folder_replaces_series(tmp_path):
    generate_cohort(tmp_path, patients=1, protocols=("cac",), size=64, seed=5)
    rows = generate_cohort(tmp_path, patients=1, protocols=("cac",), size=48, seed=5)
    volume = read_study(rows[0].image)
    assert volume.hu.shape[1:] == (48, 48)
    assert len(list(rows[0].image.glob("*.dcm"))) == volume.hu.shape[0]
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith(".")]


def test_cli_rejects_bad_proportions(tmp_path, capsys):
    with pytest.raises(SystemExit) as err:
        cli_main(["synth", "--out", str(tmp_path), "--patients", "2", "--proportions", "1,2"])
    assert err.value.code == 2
    assert "proportions" in capsys.readouterr().err


def test_category_assignment_is_exact_per_block_and_independent_of_n():
    assert Counter(assign_categories(SEED, 8)) == {0: 2, 1: 2, 2: 2, 3: 2}
    assert Counter(assign_categories(1, 10, (0.4, 0.2, 0.2, 0.2))) == {0: 4, 1: 2, 2: 2, 3: 2}
    assert Counter(assign_categories(1, 6, (0.5, 0.5, 0, 0))) == {0: 3, 1: 3}
    assert assign_categories(SEED, 5)[:2] == assign_categories(SEED, 2)
    with pytest.raises(ValueError, match="proportions"):
        assign_categories(SEED, 4, (1, -1, 0, 0))


def test_cac_scans_cover_requested_categories(small_cohort):
    cac = [patient["cac"] for patient in small_cohort]
    assert Counter(scan.category for scan in cac) == {0: 2, 1: 2, 2: 2, 3: 2}
    for scan in cac:
        assert scan.category == scan.target_category
        assert cac_category(scan.agatston) == scan.category


def test_coronary_labels_cover_whole_lesions(small_cohort):
    """As a reader marks them: every in-slice >= 130 HU region holding a coronary label is
    labelled throughout (no unlabelled rim or touching noise left to be called non-coronary)."""
    in_slice_8 = np.zeros((3, 3, 3), bool)
    in_slice_8[1] = True
    coronary_voxels = 0
    for patient in small_cohort:
        for scan in patient.values():
            labels = scan.calcium_labels
            component, _ = ndimage.label(scan.volume.hu >= 130, structure=in_slice_8)
            coronary = (labels >= 1) & (labels <= 3)
            lesion_ids = np.unique(component[coronary])
            assert 0 not in lesion_ids  # coronary labels only at >= 130 HU
            in_lesions = np.isin(component, lesion_ids)
            assert not np.any(in_lesions & (labels == 0)), scan.scan_id
            coronary_voxels += int(coronary.sum())
    assert coronary_voxels > 0


def test_complete_lesions_grows_seeds_by_majority_and_keeps_other_labels():
    hu = np.full((1, 5, 8), 40.0, np.float32)
    hu[0, 1:4, 1:4] = 300.0   # one lesion: seeds 1 (two voxels) and 2 (one voxel)
    hu[0, 1, 6] = 500.0       # a separate bright voxel with a non-coronary label
    hu[0, 2, 6] = 500.0       # unlabelled, touching it
    labels = np.zeros(hu.shape, np.int16)
    labels[0, 1, 1] = labels[0, 1, 2] = 1
    labels[0, 3, 3] = 2
    labels[0, 1, 6] = 6
    grown = complete_lesions(hu, labels)
    lesion = grown[0, 1:4, 1:4]
    assert (lesion == 1).sum() == 8 and lesion[2, 2] == 2  # majority fills, seeds stay
    assert grown[0, 1, 6] == 6 and grown[0, 2, 6] == 0    # non-coronary regions untouched
    assert np.all(grown[hu < 130] == 0)


def test_ctac_images_the_same_calcium_differently(small_cohort):
    """Paired design: same plaques in both scans, but the CTAC's own score can differ."""
    for patient in small_cohort:
        assert patient["ctac"].calcifications == patient["cac"].calcifications
    changed = [p["ctac"].category != p["cac"].category for p in small_cohort]
    assert 1 <= sum(changed) < len(changed)


def test_same_seed_same_scan_and_patient_independent_of_cohort_size(tmp_path):
    a = render_scan(patient_seed(7, 1), "ctac", 48, category=2)
    b = render_scan(patient_seed(7, 1), "ctac", 48, category=2)
    assert np.array_equal(a.volume.hu, b.volume.hu)
    assert np.array_equal(a.calcium_labels, b.calcium_labels)
    small = generate_cohort(tmp_path / "n2", patients=2, protocols=("cac",), size=48, seed=7)
    large = generate_cohort(tmp_path / "n3", patients=3, protocols=("cac",), size=48, seed=7)
    provenance = json.loads((tmp_path / "n3" / "cohort.json").read_text())
    assert provenance == {"generator_version": cohort_lib.GENERATOR_VERSION, "patients": 3,
                          "seed": 7, "size": 48, "protocols": ["cac"], "site": "default",
                          "category_proportions": [0.25, 0.25, 0.25, 0.25],
                          "ctac_overlap": False}
    assert small[1].scan_id == large[1].scan_id
    assert small[1].agatston == large[1].agatston
    vol_small, vol_large = read_study(small[1].image), read_study(large[1].image)
    assert np.array_equal(vol_small.hu, vol_large.hu)
    other = render_scan(patient_seed(8, 1), "cac", 48, category=small[1].category)
    assert other.volume.hu.shape != vol_small.hu.shape or not np.array_equal(other.volume.hu,
                                                                             vol_small.hu)


def test_ctac_overlapping_reconstruction():
    scan = render_scan(patient_seed(SEED, 3), "ctac", 48, category=3, ctac_overlap=True)
    assert scan.volume.spacing_zyx_mm[0] == 2.5
    assert scan.volume.metadata.slice_thickness_mm == 5.0
    assert 60 <= scan.volume.hu.shape[0] <= 100
    result = agatston_score(scan.volume.hu, scan.calcium_labels, scan.volume.spacing_zyx_mm,
                            slice_thickness_mm=5.0)
    assert result.agatston == pytest.approx(scan.agatston)


def test_geometry_and_densities(small_cohort):
    for patient in small_cohort:
        cac, ctac = patient["cac"], patient["ctac"]
        for scan in (cac, ctac):
            assert scan.calcium_labels.dtype == np.int16 and scan.heart_mask.dtype == np.uint8
            assert set(np.unique(scan.calcium_labels)) <= {0, 1, 2, 3, 5, 6, 7}
            assert np.all(scan.volume.hu[scan.calcium_labels > 0] >= 130)
            hu = scan.volume.hu
            # Air outside the body, lungs around -850, bone cortex 700-1200 HU (+ noise).
            assert np.median(hu[:, 0, :]) < -900
            assert 400 < np.percentile(hu, 99.95) < 1600
        dz, dy, dx = cac.volume.spacing_zyx_mm
        assert dz == 3.0 and cac.volume.metadata.slice_thickness_mm == 3.0
        assert 60 <= cac.volume.hu.shape[0] <= 100
        assert ctac.volume.metadata.slice_thickness_mm in (3.0, 4.0, 5.0)
        assert 0.39 <= dy * 96 / 512 <= 0.71 and dx == dy    # 0.4-0.7 mm pixels at 512
        assert ctac.volume.spacing_zyx_mm[1] > 1.4 * dy
        # Gated scan: coronary labels lie inside the heart silhouette without any clipping.
        coronary = (cac.calcium_labels >= 1) & (cac.calcium_labels <= 3)
        assert np.all(cac.heart_mask[coronary] == 1)
        heart_calcs = [c for c in cac.calcifications if c.coronary]
        assert (len(heart_calcs) > 0) == (cac.target_category > 0)
    heart_mask_fraction = np.mean([p["cac"].heart_mask.mean() for p in small_cohort])
    assert 0.01 < heart_mask_fraction < 0.25


def test_plaque_centres_inside_sac():
    from data_pipeline.phantom.anatomy import sample_anatomy
    from data_pipeline.phantom.cohort import _streams
    from data_pipeline.phantom.plaques import coronary_candidates

    for k in range(4):
        streams = _streams(patient_seed(SEED, k))
        anat = sample_anatomy(streams["anatomy"])
        plaques = coronary_candidates(anat, 3, streams["coronary"])
        centers = np.array([p.center for p in plaques])
        u, v, w = anat.heart.to_local(centers[:, 0], centers[:, 1], centers[:, 2])
        sdf = _ellipsoid_sdf(u, v, w, anat.heart.radii)
        assert np.all(sdf < -1.0)
        # LAD and LCX run in the epicardial fat, outside the myocardium (the left main and the
        # ostial RCA leave the aortic root, which lies deeper).
        on_surface = np.array([p.artery in ("LAD", "LCX") for p in plaques])
        assert on_surface.sum() > 10
        assert np.all(sdf[on_surface] > -anat.heart.fat_mm - 1.0)


def test_naive_threshold_is_badly_wrong_more_so_on_ctac(small_cohort):
    """HU >= 130 inside the true heart mask, all counted as coronary (the naive baseline)."""
    from sklearn.metrics import cohen_kappa_score

    wrong = {"cac": 0, "ctac": 0}
    truth = {"cac": [], "ctac": []}
    naive = {"cac": [], "ctac": []}
    for patient in small_cohort:
        for name, scan in patient.items():
            score = threshold_score(scan.volume.hu, scan.heart_mask,
                                    scan.volume.spacing_zyx_mm).agatston
            truth[name].append(scan.category)
            naive[name].append(cac_category(score))
            wrong[name] += cac_category(score) != scan.category
    assert wrong["cac"] >= 1              # bone/valve calcium fools it even on gated scans
    assert wrong["ctac"] >= 4             # noise and motion make it useless on CTAC
    assert wrong["ctac"] > wrong["cac"]
    kappa = {name: cohen_kappa_score(truth[name], naive[name], weights="linear")
             for name in truth}
    assert kappa["ctac"] < kappa["cac"]


def test_calibrated_ctac_images_the_same_patient_with_a_window_and_less_noise(tmp_path, capsys):
    """`--ctac-imaging calibrated` (acquisition.CTAC_IMAGING): the same patient and gated scan;
    the CTAC protocol differs only by a reconstruction window drawn in 0.3-1.0 of the cycle and
    half the noise sigma; cohorts record it, and an unknown model is one line, exit 2."""
    from data_pipeline.phantom import acquisition
    from data_pipeline.phantom.anatomy import sample_anatomy

    anatomy = sample_anatomy(np.random.default_rng(3))
    windows = []
    for seed in range(20):
        classic = acquisition.sample_protocol("ctac", anatomy, np.random.default_rng(seed))
        calibrated = acquisition.sample_protocol("ctac", anatomy, np.random.default_rng(seed),
                                                 ctac_imaging="calibrated")
        assert classic.motion_window is None
        assert calibrated.noise_sigma_hu == pytest.approx(0.5 * classic.noise_sigma_hu)
        windows.append(calibrated.motion_window)
        rest = dataclasses.replace(calibrated, motion_window=None,
                                   noise_sigma_hu=classic.noise_sigma_hu)
        for field in dataclasses.fields(acquisition.Protocol):
            a, b = getattr(rest, field.name), getattr(classic, field.name)
            if field.name == "motion":   # artery -> (direction array, amplitude)
                assert a.keys() == b.keys()
                assert all(np.array_equal(a[k][0], b[k][0]) and a[k][1] == b[k][1] for k in a)
            else:
                assert np.array_equal(a, b) if isinstance(a, np.ndarray) else a == b, field.name
    assert 0.3 <= min(windows) and max(windows) <= 1.0 and np.ptp(windows) > 0.3
    with pytest.raises(ValueError, match="unknown CTAC imaging 'sharp'; expected one of classic"):
        acquisition.sample_protocol("ctac", anatomy, np.random.default_rng(0), ctac_imaging="sharp")

    seed = patient_seed(SEED, 2)
    classic = render_patient(seed, size=48, category=2)
    calibrated = render_patient(seed, size=48, category=2, ctac_imaging="calibrated")
    assert np.array_equal(classic["cac"].volume.hu, calibrated["cac"].volume.hu)
    pairs = list(zip(calibrated["ctac"].calcifications, classic["ctac"].calcifications,
                     strict=True))
    assert pairs and all(np.array_equal(getattr(a, f.name), getattr(b, f.name))
                         for a, b in pairs for f in dataclasses.fields(a))
    assert calibrated["ctac"].volume.hu.shape == classic["ctac"].volume.hu.shape
    assert not np.array_equal(calibrated["ctac"].volume.hu, classic["ctac"].volume.hu)

    generate_cohort(tmp_path / "c", patients=1, size=48, seed=SEED, ctac_imaging="calibrated")
    provenance = json.loads((tmp_path / "c" / "cohort.json").read_text())
    assert provenance["ctac_imaging"] == "calibrated"
    assert provenance["generator_identity"] == f"{cohort_lib.GENERATOR_VERSION}+calibrated1"
    assert cohort_lib.generator_identity("grooved", "calibrated") == (
        f"{cohort_lib.GENERATOR_VERSION}+grooved1+calibrated1")
    assert cohort_lib.generator_identity("classic", "classic") == cohort_lib.GENERATOR_VERSION
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["synth", "--out", str(tmp_path / "d"), "--patients", "1",
                  "--ctac-imaging", "sharp"])
    assert exit_info.value.code == 2
    assert "--ctac-imaging: invalid choice: 'sharp'" in capsys.readouterr().err


def test_ctac_motion_window_smears_by_where_the_slice_falls_in_the_cycle():
    """A coronary plaque in an ungated slice: the whole-cycle model (generator version 2) smears
    it over the artery's path; a short reconstruction window in diastasis leaves it nearly
    still, and one over systole smears it more than diastasis does."""
    from data_pipeline.phantom import acquisition, render
    from data_pipeline.phantom.plaques import Calcification

    # 40 mm field, 1 mm slices at z = 0 only, no noise or kernel blur to speak of.
    protocol = acquisition.Protocol(
        name="ctac", fov_mm=40.0, center_xy_mm=(0.0, 0.0), z_first_mm=0.0, n_slices=1,
        spacing_z_mm=1.0, thickness_mm=1.0, noise_sigma_hu=1.0, psf_mm=0.05, heart_blur_mm=0.0,
        motion={"RCA": (np.array([1.0, 0.0, 0.0]), 10.0)}, slice_phase=np.array([0.0]),
        kvp=120.0, ecg_gated=False, series_description="test")
    grid = acquisition.make_grid(protocol, 80)
    plaque = Calcification(label=3, artery="RCA", center=np.zeros(3), axes=np.eye(3),
                           half_mm=np.full(3, 1.0), density_hu=600.0)
    anatomy = np.zeros((1, 80, 80), np.float32)

    def peak(window, phase):
        p = dataclasses.replace(protocol, motion_window=window, slice_phase=np.array([phase]))
        return render.calcification_patch(plaque, grid, p, anatomy).peak

    still = render.calcification_patch(plaque, grid, dataclasses.replace(protocol, motion={}),
                                       anatomy).peak
    whole_cycle = peak(None, 0.0)
    diastasis = peak(0.1, 2 * 0.7 - 1)     # t = 0.70-0.80: displacement -0.32..-0.34
    systole = peak(0.1, 2 * 0.15 - 1)      # t = 0.15-0.25: displacement -0.22..0.14
    assert whole_cycle < 0.5 * still
    assert diastasis > 0.9 * still
    assert systole < 0.8 * diastasis
    # The window's mean position moves the plaque (misregistration between slices).
    assert acquisition.cardiac_displacement(np.array([0.35]))[0] == pytest.approx(0.5)
