"""Outputs never destroy inputs or earlier results: --json onto an input, synth into a folder with
a user's files, replaced files keep their permissions, symbolic links are followed (loops and
dangling links refused), strict JSON, a full or closed standard output."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from io_fixtures import write_series
from test_inputs_dicom import snapshot

from cac_jax.cli import main
from data_pipeline import io
from data_pipeline.atomic import OutputPathError, atomic_write_text, check_output_path


@pytest.fixture
def study(tmp_path) -> tuple[Path, Path]:
    """A DICOM folder with air and one calcified lesion, and its labels as .mhd + .raw."""
    def air_and_plaque(k, ds):
        values = np.full((12, 10), 24, np.uint16)  # -1000 HU
        values[4:8, 3:7] = 1524 if k == 1 else 1064  # 500 HU plaque on slice 1, else 40 HU
        ds.PixelData = values.astype("<u2").tobytes()

    write_series(tmp_path / "dicom", [0.0, 3.0, 6.0], edit=air_and_plaque)
    volume = io.read_study(tmp_path / "dicom")
    labels = np.zeros(volume.shape, np.uint8)
    labels[1, 4:8, 3:7] = 1
    image = sitk.GetImageFromArray(labels)
    image.SetSpacing(tuple(reversed(volume.spacing_zyx_mm)))
    image.SetOrigin(volume.origin_xyz_mm)
    sitk.WriteImage(image, str(tmp_path / "labels.mhd"), useCompression=False)
    return tmp_path / "dicom", tmp_path / "labels.mhd"


def run_score(capsys, *argv) -> tuple[int, str, str]:
    code = main(["score", *map(str, argv)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("target", ["labels", "raw", "slice"])
def test_json_onto_an_input_is_refused_and_the_input_kept(study, capsys, target):
    dicom, labels = study
    out = {"labels": labels, "raw": labels.with_suffix(".raw"),
           "slice": dicom / "IM0002.dcm"}[target]
    before = snapshot(dicom, labels, labels.with_suffix(".raw"))
    code, stdout, stderr = run_score(capsys, "--image", dicom, "--labels", labels, "--json", out)
    assert code == 2 and stdout == "" and len(stderr.strip().splitlines()) == 1
    assert stderr.startswith(f"cac-jax score: error: {out}: --json is ")
    assert snapshot(dicom, labels, labels.with_suffix(".raw")) == before


def test_json_output_replacing_a_file_keeps_its_mode_and_follows_links(study, capsys, tmp_path):
    dicom, labels = study
    result = tmp_path / "results" / "score.json"
    result.parent.mkdir()
    result.write_text("old")
    result.chmod(0o640)
    link = tmp_path / "latest.json"
    link.symlink_to(result)
    code, stdout, _ = run_score(capsys, "--image", dicom, "--labels", labels, "--json", link)
    assert code == 0
    assert link.is_symlink() and json.loads(result.read_text()) == json.loads(stdout)
    assert json.loads(stdout)["agatston"] > 0
    assert stat.S_IMODE(result.stat().st_mode) == 0o640
    # A dangling link or a loop is refused, nothing created.
    (tmp_path / "dangling.json").symlink_to(tmp_path / "nowhere" / "x.json")
    code, _, stderr = run_score(capsys, "--image", dicom, "--labels", labels,
                                "--json", tmp_path / "dangling.json")
    assert code == 2 and "symbolic link to a missing file" in stderr
    assert not (tmp_path / "nowhere").exists()


def test_atomic_write_rules(tmp_path):
    target = tmp_path / "f.txt"
    target.write_text("a")
    target.chmod(0o600)
    atomic_write_text(target, "b")
    assert target.read_text() == "b" and stat.S_IMODE(target.stat().st_mode) == 0o600
    (tmp_path / "l1").symlink_to(tmp_path / "l2")
    (tmp_path / "l2").symlink_to(tmp_path / "l1")
    with pytest.raises(OutputPathError, match="symbolic link loop"):
        atomic_write_text(tmp_path / "l1", "x")
    with pytest.raises(OutputPathError, match="is a folder"):
        atomic_write_text(tmp_path, "x")
    with pytest.raises(OutputPathError, match="--out is the input"):
        check_output_path(target, [target], option="--out")
    assert check_output_path(tmp_path / "new.json", [target]) == tmp_path / "new.json"


def test_non_finite_result_is_refused_not_written_as_infinity(study, capsys, tmp_path):
    dicom, labels = study
    code, stdout, stderr = run_score(capsys, "--image", dicom, "--labels", labels,
                                     "--calibration", "1e308", "--json", tmp_path / "out.json")
    assert code == 2 and stdout == ""
    assert "non-finite mass_mg (inf)" in stderr and len(stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out.json").exists()


def _score_subprocess(study, stdout) -> subprocess.CompletedProcess:
    dicom, labels = study
    return subprocess.run([sys.executable, "-m", "cac_jax.cli", "score", "--image", str(dicom),
                           "--labels", str(labels)], stdout=stdout, stderr=subprocess.PIPE,
                          text=True, timeout=120, check=False)


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_full_standard_output_is_an_error_not_a_traceback(study):
    with open("/dev/full", "w") as full:
        done = _score_subprocess(study, full)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == ("cac-jax score: error: <stdout>: cannot write to standard "
                                   "output: No space left on device")


def test_closed_standard_output_is_an_error(study):
    dicom, labels = study
    code = ("import os, sys; os.close(1); sys.stdout = None; from cac_jax.cli import main; "
            f"sys.exit(main(['score', '--image', {str(dicom)!r}, '--labels', {str(labels)!r}]))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 2
    assert done.stderr.strip() == "cac-jax score: error: <stdout>: standard output is closed"


# --- synth ----------------------------------------------------------------------------------

def test_synth_refuses_a_folder_with_a_users_files(tmp_path, capsys):
    out = tmp_path / "cohort"
    out.mkdir()
    (out / "manifest.csv").write_text("patient_id,scan_id\nmine,mine\n")
    before = snapshot(out)
    code = main(["synth", "--out", str(out), "--patients", "1", "--size", "48",
                 "--protocols", "cac"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert err.startswith(f"cac-jax synth: error: {out}: --out already holds 1 entries "
                          "(manifest.csv)") and "--overwrite" in err
    assert snapshot(out) == before
    (tmp_path / "file").write_text("x")
    assert main(["synth", "--out", str(tmp_path / "file"), "--patients", "1"]) == 2
    assert "is an existing file" in capsys.readouterr().err


def test_synth_overwrite_writes_into_the_folder(tmp_path, capsys):
    out = tmp_path / "cohort"
    out.mkdir()
    (out / "notes.txt").write_text("kept")
    assert main(["synth", "--out", str(out), "--patients", "1", "--size", "48",
                 "--protocols", "cac", "--overwrite"]) == 0
    assert (out / "notes.txt").read_text() == "kept" and (out / "manifest.csv").exists()


def test_synth_size_limit_leaves_nothing_behind(tmp_path, capsys):
    out = tmp_path / "big"
    with pytest.raises(SystemExit) as exit_info:
        main(["synth", "--out", str(out), "--patients", "1", "--size", "100000"])
    assert exit_info.value.code == 2
    assert "must be <= 1024 pixels, got 100000" in capsys.readouterr().err
    assert not out.exists()


def test_output_onto_input_check_names_option(tmp_path):
    folder = tmp_path / "dicom"
    folder.mkdir()
    (folder / "IM1.dcm").write_bytes(b"x")
    with pytest.raises(OutputPathError, match="--json is a file inside the input folder"):
        check_output_path(folder / "IM1.dcm", [folder], option="--json")
    # A new file beside the slices is not an input and may be written.
    assert check_output_path(folder / "score.json", [folder], option="--json").name == \
        "score.json"
    assert os.path.exists(folder / "IM1.dcm")


def test_metaimage_pair_rewrite_keeps_modes_and_follows_a_link(study, tmp_path):
    dicom, _ = study
    volume = io.read_study(dicom)
    mask = np.zeros(volume.shape, np.uint8)
    out = tmp_path / "out" / "mask.mhd"
    io.write_labels(out, mask, like=volume)
    for path in (out, out.with_suffix(".zraw")):
        path.chmod(0o640)
    link = tmp_path / "mask_link.mhd"
    link.symlink_to(out)
    mask[1, 2, 3] = 1
    io.write_labels(link, mask, like=volume)
    assert link.is_symlink()
    np.testing.assert_array_equal(io.read_labels(out, like=volume), mask)
    assert {stat.S_IMODE(p.stat().st_mode) for p in (out, out.with_suffix(".zraw"))} == {0o640}
