"""Atomic writes leave either the old file or the new one, never a partial one."""

import pytest

from data_pipeline.atomic import atomic_path, atomic_write_text


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path):
    target = tmp_path / "sub" / "out.json"
    atomic_write_text(target, "first")
    atomic_write_text(target, "second")
    assert target.read_text() == "second"
    assert [p.name for p in target.parent.iterdir()] == ["out.json"]


def test_failed_write_keeps_old_file(tmp_path):
    target = tmp_path / "mask.nii.gz"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        assert tmp.name.endswith(".nii.gz")  # writers that choose the format by suffix still work
        tmp.write_text("partial")
        raise RuntimeError("killed mid-write")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["mask.nii.gz"]


def test_written_file_has_umask_mode_not_private(tmp_path):
    import os
    import stat

    target = tmp_path / "result.json"
    atomic_write_text(target, "{}")
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~mask


def test_a_failed_write_names_the_output_not_its_temporary(tmp_path, monkeypatch):
    # A full disk while writing (an OSError without a file name, or naming the temporary file)
    # is reported for the file the caller asked for.
    import errno
    import os
    from pathlib import Path

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(OSError) as info:
        atomic_write_text(tmp_path / "report.html", "x")
    assert info.value.filename == str(tmp_path / "report.html")
    assert list(tmp_path.iterdir()) == []


def test_a_file_where_a_folder_is_needed_is_named(tmp_path):
    from data_pipeline.atomic import OutputPathError

    (tmp_path / "afile").write_text("x")
    with pytest.raises(OutputPathError, match=r"s\.json: cannot write it: .*afile is a file, "
                                              r"not a folder"):
        atomic_write_text(tmp_path / "afile" / "sub" / "s.json", "{}")
    assert (tmp_path / "afile").read_text() == "x"
