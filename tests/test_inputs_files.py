"""Image and label files that SimpleITK reads wrongly or reports unclearly, and paths that are not
what they seem: truncated NIfTI (zero-filled by ITK), MetaImage without its data, corrupt
compressed DICOM, symbolic link loops, dangling links and an empty path. Each: exit code 2, one
line naming the file, inputs unchanged."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from io_fixtures import write_series
from test_inputs_dicom import assert_cli_error, snapshot

from cac_jax.cli import main
from data_pipeline import io
from data_pipeline.errors import LabelError, StudyReadError


def write_image(path: Path, array: np.ndarray) -> Path:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.5, 0.5, 3.0))
    sitk.WriteImage(image, str(path), useCompression=path.suffix == ".gz")
    return path


@pytest.fixture
def study(tmp_path) -> tuple[Path, Path]:
    hu = np.full((4, 16, 16), -1000, np.int16)
    hu[:, 4:12, 4:12] = 200
    labels = np.zeros(hu.shape, np.uint8)
    labels[1, 5:8, 5:8] = 1
    return (write_image(tmp_path / "ct.nii", hu),
            write_image(tmp_path / "labels.nii.gz", labels))


@pytest.mark.parametrize("which", ["image", "labels"])
@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
@pytest.mark.parametrize("keep", [0.5, 0.98])
def test_truncated_nifti_is_refused_not_zero_filled(tmp_path, study, capsys, which, suffix, keep):
    image, labels = study
    source = image if which == "image" else labels
    array = sitk.GetArrayFromImage(sitk.ReadImage(str(source)))
    whole = write_image(tmp_path / f"whole{suffix}", array)
    data = whole.read_bytes()
    cut = data[:int(len(data) * keep)]  # an interrupted copy (of the compressed file for .gz)
    cut_path = tmp_path / f"cut_{which}{suffix}"
    cut_path.write_bytes(cut)
    argv = ["--image", cut_path if which == "image" else image,
            "--labels", cut_path if which == "labels" else labels]
    assert_cli_error(capsys, argv, cut_path, "truncated")


def test_nifti_whose_gzip_stream_is_whole_but_short_is_refused(tmp_path, study):
    """A .nii.gz made by compressing a cut .nii: the gzip stream is valid, the payload short."""
    image, _ = study
    cut = image.read_bytes()[:-64]
    (tmp_path / "short.nii.gz").write_bytes(gzip.compress(cut))
    with pytest.raises(StudyReadError, match=r"short\.nii\.gz: truncated NIfTI file"):
        io.read_study(tmp_path / "short.nii.gz")
    # The whole file compressed the same way reads.
    (tmp_path / "fine.nii.gz").write_bytes(gzip.compress(image.read_bytes()))
    assert io.read_study(tmp_path / "fine.nii.gz").shape == (4, 16, 16)


def test_metaimage_with_missing_or_short_data_file(tmp_path, study, capsys):
    image, labels = study
    array = sitk.GetArrayFromImage(sitk.ReadImage(str(image)))
    mhd = tmp_path / "ct.mhd"
    sitk.WriteImage(sitk.ReadImage(str(image)), str(mhd))  # uncompressed: ct.mhd + ct.raw
    raw = tmp_path / "ct.raw"
    assert raw.stat().st_size == array.nbytes
    raw.write_bytes(raw.read_bytes()[:-10])
    assert_cli_error(capsys, ["--image", mhd, "--labels", labels], mhd,
                     "data file ct.raw is short", f"declares {array.nbytes}")
    raw.unlink()
    line = assert_cli_error(capsys, ["--image", mhd, "--labels", labels], mhd,
                            "data file ct.raw (ElementDataFile) is missing")
    assert "ITK" not in line


def test_corrupt_jpeg2000_slice_gives_one_line(tmp_path, capsys):
    from pydicom.uid import JPEG2000Lossless
    if not pydicom.pixels.get_encoder(JPEG2000Lossless).is_available:
        pytest.skip("no JPEG 2000 encoder installed")
    write_series(tmp_path / "good", [0.0, 2.5], shape=(64, 48))
    labels = tmp_path / "labels.nii.gz"
    volume = io.read_study(tmp_path / "good")
    io.write_labels(labels, np.zeros(volume.shape, np.uint8), like=volume)
    _, paths = write_series(tmp_path / "bad", [0.0, 2.5], shape=(64, 48))
    ds = pydicom.dcmread(paths[1])
    ds.compress(JPEG2000Lossless)
    ds.save_as(paths[1])
    data = bytearray(paths[1].read_bytes())
    start = data.index(b"\xff\x4f\xff\x51")  # the JPEG 2000 codestream's SOC + SIZ markers
    data[start + 2:start + 40] = b"\x00" * 38  # the image size header
    paths[1].write_bytes(bytes(data))
    assert_cli_error(capsys, ["--image", tmp_path / "bad", "--labels", labels], paths[1],
                     "cannot read pixel data", "JPEG 2000")


def test_symbolic_link_loop_dangling_link_and_empty_path(tmp_path, study, capsys):
    image, labels = study
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    assert_cli_error(capsys, ["--image", tmp_path / "a", "--labels", labels], tmp_path / "a",
                     "symbolic link loop")
    assert_cli_error(capsys, ["--image", image, "--labels", tmp_path / "a"], tmp_path / "a",
                     "symbolic link loop")
    (tmp_path / "gone.nii").symlink_to(tmp_path / "missing.nii")
    assert_cli_error(capsys, ["--image", tmp_path / "gone.nii", "--labels", labels],
                     tmp_path / "gone.nii", "symbolic link to a missing file")
    # An empty --image must not walk the current folder.
    before = snapshot(labels)
    assert main(["score", "--image", "", "--labels", str(labels)]) == 2
    assert capsys.readouterr().err.strip() == "cac-jax score: error: the image path is empty"
    assert snapshot(labels) == before
    with pytest.raises(LabelError, match="the labels path is empty"):
        io.read_labels("", like=io.read_study(image))


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_label_file_is_not_called_missing(tmp_path, study, capsys):
    image, labels = study
    labels.chmod(0)
    assert_cli_error(capsys, ["--image", image, "--labels", labels], labels, "permission denied")


@pytest.mark.parametrize("suffix, keyword", [(".mha", "its voxel data is short"),
                                             (".nrrd", "expected 2048 bytes but received")])
def test_truncated_single_file_formats_give_one_line_with_the_reason(tmp_path, study, capsys,
                                                                      suffix, keyword):
    image, labels = study
    volume = io.read_study(image)
    path = tmp_path / f"labels{suffix}"
    io.write_labels(path, np.ones(volume.shape, np.uint16), like=volume)
    path.write_bytes(path.read_bytes()[:-12])
    assert_cli_error(capsys, ["--image", image, "--labels", path], path, keyword)


def test_unreadable_label_file_message(tmp_path, study, monkeypatch):
    """What a user without read permission sees (simulated: the tests may run as root)."""
    image, labels = study
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != labels and real_access(p, mode))
    with pytest.raises(LabelError, match=r"labels\.nii\.gz: cannot read: permission denied"):
        io.read_labels(labels)


def _nifti_with_forms(path: Path, sform_shift_mm: float = 0.0, pixdim_x: float | None = None):
    """A NIfTI-1 written by SimpleITK (qform and sform both set, equal), then its sform's origin
    moved by `sform_shift_mm` along x, or its pixdim[1] (the qform's x voxel size) replaced."""
    import struct

    image = sitk.GetImageFromArray(np.full((4, 5, 6), -1000, np.int16))
    image.SetSpacing((0.7, 0.8, 2.5))
    image.SetOrigin((1.0, 2.0, 3.0))
    plain = path.with_suffix("") if path.name.endswith(".gz") else path
    sitk.WriteImage(image, str(plain))
    data = bytearray(plain.read_bytes())
    assert struct.unpack("<hh", data[252:256]) == (1, 1)
    struct.pack_into("<f", data, 292, struct.unpack("<f", data[292:296])[0] + sform_shift_mm)
    if pixdim_x is not None:
        struct.pack_into("<f", data, 80, pixdim_x)
    if path.name.endswith(".gz"):
        plain.unlink()
        path.write_bytes(gzip.compress(bytes(data)))
    else:
        plain.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("shift, warned", [(0.0, False), (0.005, False), (5.0, True)])
def test_a_nifti_whose_qform_and_sform_disagree_is_read_with_a_warning(tmp_path, shift, warned):
    path = _nifti_with_forms(tmp_path / "ct.nii.gz", sform_shift_mm=shift)
    warnings = io.read_study(path).metadata.warnings
    assert any("qform and sform disagree" in w for w in warnings) == warned, warnings
    if warned:
        assert warnings[0].startswith(f"{path}: its NIfTI qform and sform disagree (origin")


def test_itk_warnings_do_not_reach_stderr(tmp_path, capfd):
    # A negative pixdim[1] makes ITK print a dozen lines naming the temporary inflated copy; the
    # reader keeps them off stderr and says what matters in one warning naming the user's file.
    path = _nifti_with_forms(tmp_path / "neg.nii.gz", pixdim_x=-0.7)
    volume = io.read_study(path)
    assert capfd.readouterr().err == ""
    assert [w for w in volume.metadata.warnings if "qform and sform" in w][0].startswith(str(path))
