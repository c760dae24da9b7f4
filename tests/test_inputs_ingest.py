"""`cac-jax ingest` with bad or unusual input: validated before TensorFlow loads, quiet, a failed
`--overwrite` keeps the old dataset, an empty dataset folder is built into, a negative seed is
refused, `--skip-bad` skips malformed DICOM rows, and a manifest without the optional columns."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from io_fixtures import write_series
from test_inputs_dicom import patch, snapshot

from cac_jax.cli import main
from data_pipeline.config import DATASET_VERSION
from data_pipeline.manifest import read_manifest

pytest.importorskip("tensorflow_datasets")


def _write(path: Path, array: np.ndarray) -> str:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.7, 0.7, 3.0))
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))
    return path.name if path.parent.name == "" else str(path)


def tiny_manifest(root: Path, patients: int = 3, extra: str = "") -> Path:
    """A manifest with only the required columns (no site, split or heart_mask)."""
    lines = ["patient_id,scan_id,protocol,image,calcium_labels"]
    for p in range(patients):
        hu = np.full((3, 24, 24), -1000, np.int16)
        hu[:, 8:16, 8:16] = 40
        hu[1, 10:13, 10:13] = 300 + 10 * p
        labels = np.zeros(hu.shape, np.uint8)
        labels[1, 10:13, 10:13] = 1
        _write(root / f"p{p}" / "ct.nii.gz", hu)
        _write(root / f"p{p}" / "labels.nii.gz", labels)
        lines.append(f"P{p},S{p},cac,p{p}/ct.nii.gz,p{p}/labels.nii.gz")
    manifest = root / "manifest.csv"
    manifest.write_text("\n".join(lines) + "\n" + extra)
    return manifest


def ingest(capfd, *argv) -> tuple[int, str, str]:
    code = main(["ingest", "--quiet", *map(str, argv)])
    captured = capfd.readouterr()
    return code, captured.out, captured.err


def test_bad_input_fails_before_tensorflow_loads_with_one_line(tmp_path):
    (tmp_path / "m.csv").write_text("scan_id,image\nS,x.nii.gz\n")
    code = ("import sys; from cac_jax.cli import main; rc = main(['ingest', '--manifest', "
            f"{str(tmp_path / 'm.csv')!r}, '--data-dir', {str(tmp_path / 'd')!r}]); "
            "print('tensorflow' in sys.modules, rc)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.stdout.split() == ["False", "2"]
    assert done.stderr.strip().splitlines() == [
        f"cac-jax ingest: error: {tmp_path / 'm.csv'}: manifest lacks required column(s) "
        "patient_id, protocol, calcium_labels; expected at least patient_id, scan_id, protocol, "
        "image, calcium_labels (optional: heart_mask, site, split, agatston, category, series)"]
    assert not (tmp_path / "d").exists()


def test_negative_seed_is_refused(tmp_path, capfd):
    manifest = tiny_manifest(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["ingest", "--manifest", str(manifest), "--data-dir", str(tmp_path / "d"),
              "--seed", "-1"])
    assert exit_info.value.code == 2
    assert "argument --seed: must be >= 0, got -1" in capfd.readouterr().err


def test_overwrite_that_fails_keeps_the_old_dataset_and_empty_folder_is_built(tmp_path, capfd):
    manifest = tiny_manifest(tmp_path)
    data_dir = tmp_path / "tfds"
    (data_dir / "cac_ct" / DATASET_VERSION).mkdir(parents=True)  # left by an interrupted run
    code, out, err = ingest(capfd, "--manifest", manifest, "--data-dir", data_dir)
    assert code == 0, err
    assert out.startswith(f"dataset cac_ct {DATASET_VERSION} in "
                          f"{data_dir / 'cac_ct' / DATASET_VERSION}: scans")
    assert "Downloading" not in out + err and "oneDNN" not in err and "absl" not in err
    built = snapshot(data_dir)
    assert any(name.endswith("dataset_info.json") for name in built)

    # A rebuild whose scan turns out unreadable (a cut image file) fails ...
    broken = tmp_path / "p1" / "ct.nii.gz"
    broken.write_bytes(broken.read_bytes()[:40])
    code, out, err = ingest(capfd, "--manifest", manifest, "--data-dir", data_dir, "--overwrite")
    assert code == 2 and out == ""
    assert err.strip().splitlines()[-1].startswith(f"cac-jax ingest: error: {manifest}: row 2")
    # ... and leaves the dataset it was to replace exactly as it was, and nothing beside it.
    assert snapshot(data_dir) == built
    # (the build lock `.ingest.lock` stays: it guards the next build)
    assert sorted(p.name for p in (data_dir / "cac_ct").iterdir()
                  if p.name != ".ingest.lock") == [DATASET_VERSION]
    # Its own manifest copy cannot be the input of a rebuild that would replace it.
    copy = data_dir / "cac_ct" / DATASET_VERSION / "manifest.csv"
    code, _, err = ingest(capfd, "--manifest", copy, "--data-dir", data_dir, "--overwrite")
    assert code == 2 and err.strip() == (f"cac-jax ingest: error: {copy}: is inside the dataset "
                                         f"folder {copy.parent} that --overwrite would replace; "
                                         "copy it elsewhere first")
    assert snapshot(data_dir) == built
    # Without --overwrite an existing dataset is refused before TensorFlow is needed.
    code, _, err = ingest(capfd, "--manifest", manifest, "--data-dir", data_dir)
    assert code == 2 and "dataset already built here" in err


def test_skip_bad_skips_a_malformed_dicom_header(tmp_path, capfd):
    manifest = tiny_manifest(tmp_path, patients=3)
    _, paths = write_series(tmp_path / "bad" / "dicom", [0.0, 3.0, 6.0], shape=(24, 24),
                            pixel_spacing=(0.7, 0.7))
    patch(paths[0], b"0.7\\0.7", b"0,7\\0.7")
    manifest.write_text(manifest.read_text() + "P9,S9,cac,bad/dicom,p0/labels.nii.gz\n")
    code, _, err = ingest(capfd, "--manifest", manifest, "--data-dir", tmp_path / "d")
    assert code == 2 and "malformed PixelSpacing" in err and "IM0001.dcm" in err
    code, out, err = ingest(capfd, "--manifest", manifest, "--data-dir", tmp_path / "d",
                            "--skip-bad")
    assert code == 0, err
    assert "skipped row 4 (scan_id='S9')" in err and "malformed PixelSpacing" in err
    assert "skipped 1 row(s)" in out


def test_inference_manifest_needs_only_scan_image_protocol(tmp_path):
    (tmp_path / "a.nii.gz").write_bytes(b"x")
    (tmp_path / "m.csv").write_text("scan_id,image,protocol,series\nS1,a.nii.gz,CAC,3\n")
    (row,) = read_manifest(tmp_path / "m.csv", inference=True)
    assert (row.patient_id, row.scan_id, row.protocol, row.series) == ("S1", "S1", "cac", "3")
    assert row.calcium_labels is None and row.heart_mask is None and row.site == ""
    with pytest.raises(Exception, match="lacks required column"):
        read_manifest(tmp_path / "m.csv")


@pytest.mark.parametrize("case", ["repeated_column", "extra_fields", "patient_in_two_splits"])
def test_manifest_shape_problems_are_one_line_before_tensorflow(tmp_path, capfd, case):
    manifest = tiny_manifest(tmp_path)
    lines = manifest.read_text().splitlines()
    if case == "repeated_column":  # which `image` is meant? (the second one was used)
        lines[0] += ",image"
        lines[1:] = [line + ",p0/ct.nii.gz" for line in lines[1:]]
        expected = "column(s) image appear more than once in the header"
    elif case == "extra_fields":
        lines[2] += ",EXTRA,MORE"
        expected = "row 2 (scan_id='S1'), line 3: 7 fields where the header has 5"
    else:
        lines[0] += ",split"
        lines[1:] = [line + ",train" for line in lines[1:]]
        lines.append("P0,S0b,ctac,p0/ct.nii.gz,p0/labels.nii.gz,test")
        expected = "patient 'P0' is in more than one split"
    manifest.write_text("\n".join(lines) + "\n")
    code = ("import sys; from cac_jax.cli import main; rc = main(['ingest', '--manifest', "
            f"{str(manifest)!r}, '--data-dir', {str(tmp_path / 'd')!r}]); "
            "print('tensorflow' in sys.modules, rc)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.stdout.split() == ["False", "2"], done.stderr
    err = done.stderr.strip().splitlines()
    assert len(err) == 1 and f"{manifest}: " in err[0] and expected in err[0], err
    assert not (tmp_path / "d").exists()


def test_labels_that_belong_to_another_image_are_named_by_ingest(tmp_path, capfd):
    manifest = tiny_manifest(tmp_path)
    misplaced = np.zeros((3, 24, 24), np.uint8)
    misplaced[0, 2:8, 2:8] = 1  # 36 coronary voxels in air: nothing there is >= 130 HU
    _write(tmp_path / "p1" / "labels.nii.gz", misplaced)
    code, _, err = ingest(capfd, "--manifest", manifest, "--data-dir", tmp_path / "d")
    assert code == 0
    warned = [line for line in err.splitlines() if "belong to this image" in line]
    assert len(warned) == 1 and "row 2 (scan_id='S1')" in warned[0], err
    assert str(manifest) in warned[0]
