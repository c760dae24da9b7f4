"""`cac-jax infer --dicom`: the DICOM Segmentation and SR (docs/clinical.md), read back and
validated with dicom3tools' `dciodvfy` where it is installed."""

from __future__ import annotations

import csv
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_inference import threshold_model, tiny_study  # noqa: E402

from cac_jax import dicom_outputs, inference  # noqa: E402
from cac_jax.cli import main  # noqa: E402
from data_pipeline.io import (  # noqa: E402
    CTVolume,
    StudyMetadata,
    read_labels,
    read_study,
    write_dicom_series,
    write_volume,
)

# x runs right to left and the slices foot to head: the series' stored order is not the
# canonical one, so a mask that skipped the reorientation would not match.
FLIPPED = (-1, 0, 0, 0, 1, 0, 0, 0, -1)


def threshold_scorer(**kwargs):
    """ThresholdNet heart and calcium models; the tiny studies' hearts (a few ml) are scored
    (min_heart_ml 0), not reported as no heart found."""
    kwargs.setdefault("min_heart_ml", 0.0)
    return inference.Scorer(threshold_model("heart", spacing=(0.6, 0.7, 0.8)),
                            threshold_model("calcium", spacing=(0.6, 0.7, 0.8)), batch_size=4,
                            **kwargs)


def write_dicom_study(folder: Path, seed: int = 0, slices: int = 8, direction=FLIPPED,
                      study_uid: str | None = None) -> Path:
    """A tiny CT series (calcium lesions, heart disc) written as DICOM into `folder`."""
    hu, _, _ = tiny_study(seed, size=64, slices=slices)
    volume = CTVolume(hu, (3.0, 0.7, 0.7), (10.0, -20.0, 30.0), direction,
                      StudyMetadata(source="memory", patient_id=f"PAT{seed}^TEST",
                                    slice_thickness_mm=3.0, study_uid=study_uid))
    write_dicom_series(volume, folder, uid_seed=f"study-{seed}")
    return folder


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """(root, out, dicom folder, nifti path) after `cac-jax infer --dicom --save-masks` of one
    DICOM study and one NIfTI study."""
    root = tmp_path_factory.mktemp("dicom_outputs")
    dicom = write_dicom_study(root / "p1" / "ct")
    hu, _, _ = tiny_study(1, size=64, slices=6)
    nifti = root / "p2.nii.gz"
    write_volume(nifti, np.round(hu).astype(np.int16),
                 CTVolume(hu, (3.0, 0.7, 0.7), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1),
                          StudyMetadata(source="memory")))
    scorer = threshold_scorer()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(inference.Scorer, "from_checkpoints",
                   classmethod(lambda cls, h, c, **kw: scorer))
        out = root / "out"
        code = main(["infer", "--heart-checkpoint", "H", "--calcium-checkpoint", "C",
                     "--input", str(dicom), str(nifti), "--out", str(out), "--dicom",
                     "--save-masks", "--no-progress"])
    assert code == 0
    return root, out, dicom, nifti


def _rows(out: Path) -> dict[str, dict[str, str]]:
    with (out / "results.csv").open() as f:
        return {r["scan_id"]: r for r in csv.DictReader(f)}


def test_segmentation_equals_the_saved_masks_voxel_for_voxel(scored):
    _, out, dicom, _ = scored
    study = read_study(dicom)
    assert not study.stored_geometry.is_canonical  # the case where orientation matters
    scan_id = next(iter(_rows(out)))
    masks = dicom_outputs.segment_masks(out / f"{scan_id}.seg.dcm", study)
    labels = read_labels(out / f"{scan_id}_calcium_labels.nii.gz", like=study)
    heart = read_labels(out / f"{scan_id}_heart_mask.nii.gz", like=study)
    assert masks[1].sum() > 0 and np.array_equal(masks[1], labels == 4)
    assert np.array_equal(masks[2], labels == 5)
    assert masks[3].sum() > 0 and np.array_equal(masks[3], heart > 0)


def test_segmentation_references_the_source_series(scored):
    import highdicom as hd

    _, out, dicom, _ = scored
    scan_id = next(iter(_rows(out)))
    seg = hd.seg.segread(out / f"{scan_id}.seg.dcm")
    sources = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(dicom.glob("*.dcm"))]
    assert seg.FrameOfReferenceUID == sources[0].FrameOfReferenceUID
    assert seg.StudyInstanceUID == sources[0].StudyInstanceUID
    referenced = {item.ReferencedSOPInstanceUID
                  for series in seg.ReferencedSeriesSequence
                  for item in series.ReferencedInstanceSequence}
    assert referenced == {ds.SOPInstanceUID for ds in sources}
    labels = [d.SegmentLabel for d in seg.SegmentSequence]
    assert labels == ["coronary calcium (scored)", "non-coronary calcium", "heart"]
    algorithm = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    from cac_jax import __version__

    assert algorithm.AlgorithmVersion == __version__
    assert algorithm.AlgorithmParameters == "model=threshold_calcium,step=1"  # no local path


def test_report_score_equals_results_csv(scored):
    import highdicom as hd

    _, out, dicom, _ = scored
    scan_id, row = next(iter(_rows(out).items()))
    values = dicom_outputs.report_measurements(out / f"{scan_id}.sr.dcm")
    assert values["Coronary artery calcium score"] == pytest.approx(float(row["agatston"]),
                                                                    rel=1e-5)
    assert values["Calcium Volume"] == pytest.approx(float(row["volume_mm3"]), rel=1e-5)
    assert "Calcium Mass" not in values  # not calibrated
    sr = hd.sr.srread(out / f"{scan_id}.sr.dcm")
    seg = pydicom.dcmread(out / f"{scan_id}.seg.dcm", stop_before_pixels=True)
    assert sr.StudyInstanceUID == seg.StudyInstanceUID
    evidence = {item.ReferencedSOPInstanceUID
                for study in sr.CurrentRequestedProcedureEvidenceSequence
                for series in study.ReferencedSeriesSequence
                for item in series.ReferencedSOPSequence}
    assert seg.SOPInstanceUID in evidence and len(evidence) == 1 + len(list(dicom.glob("*.dcm")))
    (total,) = sr.content.get_volumetric_roi_measurement_groups()
    (category,) = total.get_qualitative_evaluations()
    assert category.value.meaning == row["category_name"]
    assert total.reference_type.meaning == "Referenced Segment"
    lesions = sr.content.get_image_measurement_groups()  # artery unknown: only lesion groups
    assert len(lesions) == int(row["n_lesions"]) > 0
    sources = {ds.SOPInstanceUID for ds in map(pydicom.dcmread, dicom.glob("*.dcm"))}
    assert all(g.source_images[0].referenced_sop_instance_uid in sources for g in lesions)
    agatston = [g.get_measurements(name=hd.sr.CodedConcept("450360000", "SCT", "x"))[0].value
                for g in lesions]
    assert sum(agatston) == pytest.approx(float(row["agatston"]), rel=1e-5)


def test_a_calibrated_score_reports_mass(tmp_path):
    folder = write_dicom_study(tmp_path / "ct", seed=2, direction=(1, 0, 0, 0, 1, 0, 0, 0, 1))
    scorer = threshold_scorer(calibration_mg_per_hu_mm3=0.8)
    volume, result = scorer.score_path(folder)
    heart = dicom_outputs.ModelInfo.of(scorer.heart, "heart")
    calcium = dicom_outputs.ModelInfo.of(scorer.calcium, "calcium")
    _, sr = dicom_outputs.write_dicom_outputs(tmp_path, "s", volume, result, heart, calcium)
    values = dicom_outputs.report_measurements(sr)
    assert result.score.mass_mg and values["Calcium Mass"] == pytest.approx(result.score.mass_mg)


def test_a_non_dicom_study_gets_no_dicom_files(scored):
    _, out, _, nifti = scored
    rows = _rows(out)
    assert rows["p2"]["status"] == "ok"
    assert not (out / "p2.seg.dcm").exists() and not (out / "p2.sr.dcm").exists()


def test_the_note_is_one_line(tmp_path, capsys):
    hu, _, _ = tiny_study(3, size=64, slices=5)
    path = tmp_path / "s.nii.gz"
    write_volume(path, np.round(hu).astype(np.int16),
                 CTVolume(hu, (3.0, 0.7, 0.7), (0, 0, 0), (1, 0, 0, 0, 1, 0, 0, 0, 1),
                          StudyMetadata(source="memory")))
    lines = []
    hook = dicom_outputs.after_study_writer(threshold_scorer(), lines.append)
    volume = read_study(path)
    hook(tmp_path, "s", inference.Study("s", path), volume, None)
    assert len(lines) == 1 and "no DICOM Segmentation or SR" in lines[0] and str(path) in lines[0]


@pytest.mark.skipif(shutil.which("dciodvfy") is None,
                    reason="dicom3tools' dciodvfy is not installed (Debian package dicom3tools; "
                           ".ci/run installs it)")
@pytest.mark.parametrize("suffix", ["seg", "sr"])
def test_dciodvfy_finds_no_error(scored, suffix):
    _, out, _, _ = scored
    scan_id = next(iter(_rows(out)))
    run = subprocess.run(["dciodvfy", str(out / f"{scan_id}.{suffix}.dcm")],
                         capture_output=True, text=True, timeout=60)
    text = run.stdout + run.stderr
    errors = [line for line in text.splitlines() if line.startswith("Error")]
    assert ("Segmentation" if suffix == "seg" else "Comprehensive3DSR") in text
    assert errors == [], "\n".join(errors)


def test_per_artery_groups_where_the_artery_is_known(tmp_path):
    """Labels that name the artery (1 LAD, 3 RCA, as reference annotations do) give one SR group
    per artery with its finding site, besides the lesion groups."""
    import dataclasses

    import highdicom as hd

    from cac_jax.scoring import agatston_score

    folder = write_dicom_study(tmp_path / "ct", seed=0, direction=(1, 0, 0, 0, 1, 0, 0, 0, 1))
    volume = read_study(folder)
    scorer = threshold_scorer()
    result = scorer.score(volume)
    _, labels, _ = tiny_study(0, size=64, slices=8)
    labels[labels >= 5] = 0
    result = dataclasses.replace(result, calcium_labels=labels,
                                 score=agatston_score(volume.hu, labels, volume.spacing_zyx_mm))
    heart = dicom_outputs.ModelInfo.of(scorer.heart, "heart")
    calcium = dicom_outputs.ModelInfo.of(scorer.calcium, "calcium")
    _, sr_path = dicom_outputs.write_dicom_outputs(tmp_path, "s", volume, result, heart, calcium)
    groups = hd.sr.srread(sr_path).content.get_image_measurement_groups()
    totals = {g.tracking_identifier: g for g in groups if g.tracking_identifier.endswith("total")}
    assert set(totals) == {"LAD total", "RCA total"}
    for artery, group in totals.items():
        value = group.get_measurements(name=hd.sr.CodedConcept("450360000", "SCT", "x"))[0].value
        assert float(value) == pytest.approx(result.score.per_artery[artery.split()[0]])
    assert totals["LAD total"].finding_sites[0].value.value == "59438005"
    assert len(groups) == 2 + len(result.score.lesions)


def test_an_enhanced_ct_source_is_referenced_frame_by_frame(tmp_path):
    """A series stored as one multi-frame file (highdicom's legacy conversion of a classic series,
    its frames then shuffled): the Segmentation's frames follow the file's frames, the
    lesion groups name their frame, and both read back onto the scored volume."""
    import dataclasses

    import highdicom as hd
    from io_fixtures import shuffle_frames

    from cac_jax.scoring import agatston_score

    classic = write_dicom_study(tmp_path / "classic", seed=0)
    legacy = [pydicom.dcmread(p) for p in sorted(classic.glob("*.dcm"))]
    enhanced = tmp_path / "enhanced" / "ct.dcm"
    enhanced.parent.mkdir()
    hd.legacy.LegacyConvertedEnhancedCTImage(
        legacy, series_instance_uid=hd.UID(), series_number=3, sop_instance_uid=hd.UID(),
        instance_number=1).save_as(enhanced)
    shuffle_frames(enhanced, seed=1)  # frame order is not slice order
    scorer = threshold_scorer()
    volume, result = scorer.score_path(enhanced.parent)
    # Masks that differ from slice to slice (the tiny study's are the same on every slice), so a
    # frame put on the wrong source frame shows.
    labels = np.array(result.calcium_labels)
    labels[:3] = 0
    labels[5, : labels.shape[1] // 2] = 0
    heart_mask = np.array(result.heart_mask)
    heart_mask[-2:] = 0
    result = dataclasses.replace(result, calcium_labels=labels, heart_mask=heart_mask,
                                 score=agatston_score(volume.hu, labels, volume.spacing_zyx_mm))
    assert volume.metadata.series_uid == pydicom.dcmread(enhanced).SeriesInstanceUID
    np.testing.assert_array_equal(volume.hu, read_study(classic).hu)
    heart = dicom_outputs.ModelInfo.of(scorer.heart, "heart")
    calcium = dicom_outputs.ModelInfo.of(scorer.calcium, "calcium")
    seg_path, sr_path = dicom_outputs.write_dicom_outputs(tmp_path / "out", "s", volume, result,
                                                          heart, calcium)
    masks = dicom_outputs.segment_masks(seg_path, volume)
    assert masks[1].sum() > 0 and np.array_equal(masks[1], labels == 4)
    assert np.array_equal(masks[3], heart_mask.astype(bool))

    source = pydicom.dcmread(enhanced, stop_before_pixels=True)
    seg = hd.seg.segread(seg_path)
    (series,) = seg.ReferencedSeriesSequence
    assert [i.ReferencedSOPInstanceUID for i in series.ReferencedInstanceSequence] == \
        [source.SOPInstanceUID]
    # Each Segmentation frame derives from the source frame at the same position.
    positions = {k: tuple(float(v) for v in f.PlanePositionSequence[0].ImagePositionPatient)
                 for k, f in enumerate(source.PerFrameFunctionalGroupsSequence, 1)}
    for frame in seg.PerFrameFunctionalGroupsSequence:
        image = frame.DerivationImageSequence[0].SourceImageSequence[0]
        assert image.ReferencedSOPInstanceUID == source.SOPInstanceUID
        position = tuple(float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient)
        assert positions[int(image.ReferencedFrameNumber)] == pytest.approx(position)
    lesions = hd.sr.srread(sr_path).content.get_image_measurement_groups()
    assert len(lesions) == len(result.score.lesions) > 0
    # The referenced frame is the lesion's slice: stored slice k is the k-th frame along the
    # slice normal.
    orientation = [float(v) for v in source.SharedFunctionalGroupsSequence[0]
                   .PlaneOrientationSequence[0].ImageOrientationPatient]
    normal = np.cross(orientation[:3], orientation[3:])
    along_normal = sorted(positions, key=lambda k: float(np.dot(normal, positions[k])))
    stored = volume.stored_geometry
    assert stored.flips[0]  # the canonical slice order is not the stored one here
    for group, lesion in zip(lesions, result.score.lesions, strict=True):
        (image,) = group.source_images
        assert image.referenced_sop_instance_uid == source.SOPInstanceUID
        assert image.referenced_frame_numbers == \
            [along_normal[stored.shape[0] - 1 - lesion.slice_index]]
    if shutil.which("dciodvfy"):
        for path in (seg_path, sr_path):
            run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True,
                                 timeout=60)
            errors = [line for line in (run.stdout + run.stderr).splitlines()
                      if line.startswith("Error")]
            assert errors == [], "\n".join(errors)


def test_an_enhanced_file_of_two_stacks_gets_a_one_line_error(tmp_path):
    import highdicom as hd

    classic = write_dicom_study(tmp_path / "classic", seed=0)
    enhanced = tmp_path / "enhanced" / "ct.dcm"
    enhanced.parent.mkdir()
    hd.legacy.LegacyConvertedEnhancedCTImage(
        [pydicom.dcmread(p) for p in sorted(classic.glob("*.dcm"))],
        series_instance_uid=hd.UID(), series_number=3, sop_instance_uid=hd.UID(),
        instance_number=1).save_as(enhanced)
    ds = pydicom.dcmread(enhanced)
    for k, frame in enumerate(ds.PerFrameFunctionalGroupsSequence):
        frame.FrameContentSequence[0].StackID = "1" if k < 4 else "2"
    ds.save_as(enhanced)
    scorer = threshold_scorer()
    volume, result = scorer.score_path(enhanced)
    assert volume.hu.shape[0] == 4  # one stack scored
    heart = dicom_outputs.ModelInfo.of(scorer.heart, "heart")
    calcium = dicom_outputs.ModelInfo.of(scorer.calcium, "calcium")
    with pytest.raises(dicom_outputs.DicomOutputError,
                       match=r"ct\.dcm.*several stacks \(StackID\)") as caught:
        dicom_outputs.write_dicom_outputs(tmp_path / "out", "s", volume, result, heart, calcium)
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "out" / "s.seg.dcm").exists()


def _outputs(tmp_path: Path, name: str, volume, result, scorer):
    heart = dicom_outputs.ModelInfo.of(scorer.heart, "heart")
    calcium = dicom_outputs.ModelInfo.of(scorer.calcium, "calcium")
    return dicom_outputs.write_dicom_outputs(tmp_path, name, volume, result, heart, calcium)


def test_artery_labels_and_every_non_coronary_code_go_to_their_segments(tmp_path):
    # Reference-style labels: 1 LAD, 3 RCA (coronary), 5 and 6 (non-coronary): segment 1 holds
    # every coronary voxel, segment 2 every non-coronary one, whatever the code.
    import dataclasses

    from cac_jax.scoring import agatston_score

    folder = write_dicom_study(tmp_path / "ct", seed=0, direction=(1, 0, 0, 0, 1, 0, 0, 0, 1))
    volume = read_study(folder)
    scorer = threshold_scorer()
    result = scorer.score(volume)
    _, labels, _ = tiny_study(0, size=64, slices=8)
    labels = labels.astype(np.int16)
    labels[labels == 5] = 6
    assert {1, 3, 6} <= set(np.unique(labels).tolist())
    result = dataclasses.replace(result, calcium_labels=labels,
                                 score=agatston_score(volume.hu, labels, volume.spacing_zyx_mm))
    seg_path, _ = _outputs(tmp_path, "s", volume, result, scorer)
    segments = dicom_outputs.segment_masks(seg_path, volume)
    np.testing.assert_array_equal(segments[1], (labels >= 1) & (labels <= 4))
    np.testing.assert_array_equal(segments[2], labels >= 5)
    heart = pydicom.dcmread(seg_path).SegmentSequence[2]
    assert heart.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "91723000"


def test_a_source_without_type_2_patient_and_study_attributes_still_gets_its_outputs(tmp_path):
    # De-identified series often lack these (Type 2: present, may be empty): the outputs carry
    # them empty instead of the study becoming an error row.
    folder = write_dicom_study(tmp_path / "ct", seed=2)
    for path in folder.iterdir():
        ds = pydicom.dcmread(path)
        for keyword in ("StudyID", "PatientName", "AccessionNumber", "StudyDate", "PatientSex"):
            if keyword in ds:
                delattr(ds, keyword)
        ds.save_as(path, enforce_file_format=True)
    volume = read_study(folder)
    scorer = threshold_scorer()
    seg_path, sr_path = _outputs(tmp_path, "s", volume, scorer.score(volume), scorer)
    for path in (seg_path, sr_path):
        written = pydicom.dcmread(path)
        assert written.StudyID == "" and written.PatientName == ""
        assert written.StudyInstanceUID == pydicom.dcmread(next(folder.iterdir())).StudyInstanceUID
    assert "StudyID" not in pydicom.dcmread(next(folder.iterdir()))  # the source is untouched


def test_different_content_never_shares_a_uid_and_the_category_code_names_its_range(tmp_path):
    import dataclasses

    folder = write_dicom_study(tmp_path / "ct", seed=0)
    volume = read_study(folder)
    scorer = threshold_scorer()
    result = scorer.score(volume)
    first = [pydicom.dcmread(p) for p in _outputs(tmp_path / "a", "s", volume, result, scorer)]
    again = [pydicom.dcmread(p) for p in _outputs(tmp_path / "b", "s", volume, result, scorer)]
    assert [d.SOPInstanceUID for d in first] == [d.SOPInstanceUID for d in again]
    # The same masks and score, reported in the five-category scheme: another SR content.
    five = dataclasses.replace(result, score=dataclasses.replace(
        result.score, category=2, category_name="11-100"))
    other = [pydicom.dcmread(p) for p in _outputs(tmp_path / "c", "s", volume, five, scorer)]
    assert first[1].SOPInstanceUID != other[1].SOPInstanceUID
    assert first[0].SOPInstanceUID != other[0].SOPInstanceUID
    assert dicom_outputs.category_code("11-100") == "CAC-11-100"
    assert dicom_outputs.category_code("101-400") == "CAC-101-400"
    assert dicom_outputs.category_code(">400") == "CAC-GT400"
    import highdicom as hd

    (total,) = hd.sr.srread(tmp_path / "c" / "s.sr.dcm").content \
        .get_volumetric_roi_measurement_groups()
    (category,) = total.get_qualitative_evaluations()
    assert (category.value.value, category.value.meaning) == ("CAC-11-100", "11-100")


def test_a_rerun_asking_for_dicom_outputs_names_the_ones_an_earlier_run_left_out(tmp_path,
                                                                                 capsys):
    dicom = write_dicom_study(tmp_path / "ct", seed=3)
    scorer = threshold_scorer()
    argv = ["infer", "--heart-checkpoint", "H", "--calcium-checkpoint", "C", "--input",
            str(dicom), "--out", str(tmp_path / "out"), "--no-progress"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(inference.Scorer, "from_checkpoints",
                   classmethod(lambda cls, h, c, **kw: scorer))
        assert main(argv) == 0
        capsys.readouterr()
        assert main([*argv, "--dicom", "--save-masks"]) == 0
        printed = capsys.readouterr()
        notes = [line for line in (printed.out + printed.err).splitlines() if "without" in line]
        assert len(notes) == 1, printed
        for name in ("_calcium_labels.nii.gz", "_heart_mask.nii.gz", ".seg.dcm", ".sr.dcm"):
            assert name in notes[0]
        assert "--overwrite" in notes[0]
        assert main([*argv, "--dicom", "--overwrite"]) == 0
        assert len(list((tmp_path / "out").glob("*.seg.dcm"))) == 1
        capsys.readouterr()
        assert main([*argv, "--dicom"]) == 0  # everything asked for is there: no note
        printed = capsys.readouterr()
        assert "without" not in printed.out + printed.err


def test_the_model_is_named_by_its_folder_not_its_path():
    def info(path):
        return dicom_outputs.ModelInfo("heart", "unet", path, 30)

    assert dicom_outputs._model_name(info("/home/someone/models/heart_unet")) == "heart_unet"
    assert dicom_outputs._model_name(info("/srv/runs/heart_unet/checkpoints/30")) == "heart_unet"
    assert dicom_outputs._model_name(info("")) == "unet"
    # The same model in another folder: the same UIDs.
    assert dicom_outputs._model_key(info("/a/heart_unet")) == \
        dicom_outputs._model_key(info("/b/heart_unet"))
