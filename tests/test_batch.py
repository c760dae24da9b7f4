"""Batch scoring (`cac-jax infer`, `cac_jax.batch`, `cac_jax.results`): what a batch reports when
it cannot score, model identity on resume, append-only results, shards and merging, the output
folder lock, and outputs that cannot be written."""

from __future__ import annotations

import csv
import dataclasses
import errno
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_inference import (  # noqa: E402
    _write_cohort,
    threshold_model,
    tiny_study,
    volume_of,
)

from cac_jax import batch, inference, results  # noqa: E402
from cac_jax.cli import main  # noqa: E402
from data_pipeline.io import write_volume  # noqa: E402


@pytest.fixture(scope="module")
def scorer():
    """ThresholdNet models (fast, no compilation of real networks): heart and calcium where the
    centre slice is above 400 HU; every size of heart is scored (min_heart_ml=0)."""
    return inference.Scorer(threshold_model("heart", spacing=(0.6, 0.7, 0.8)),
                            threshold_model("calcium", spacing=(0.6, 0.7, 0.8)), batch_size=4,
                            min_heart_ml=0.0)


def _rows(out: Path) -> list[dict[str, str]]:
    with (out / "results.csv").open(newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == results.RESULT_COLUMNS
        return list(reader)


def _cli(monkeypatch, scorer, *argv: str) -> int:
    monkeypatch.setattr(inference.Scorer, "from_checkpoints",
                        classmethod(lambda cls, h, c, **kw: scorer))
    return main(["infer", "--heart-checkpoint", "H", "--calcium-checkpoint", "C",
                 "--no-progress", *argv])


# --------------------------------------------------------------------------- what is not scored


def test_no_heart_found_is_an_error_row(scorer, tmp_path):
    """A study where the heart model finds nothing is status=error with the reason, not 0 / ok."""
    path = tmp_path / "empty.nii.gz"
    hu = np.where(np.arange(64)[None, :, None] < 32, -1000.0, 40.0) * np.ones((5, 64, 64))
    write_volume(path, hu.astype(np.int16), volume_of(hu))
    summary = batch.run_batch(scorer, inference.studies_from_args([str(path)], None),
                              tmp_path / "out", progress=False)
    (row,) = _rows(tmp_path / "out")
    assert summary.failed == 1 and row["status"] == "error"
    assert "no heart found: predicted heart volume 0 ml" in row["error"]
    assert row["agatston"] == "" and row["category"] == ""
    assert not (tmp_path / "out" / "empty.json").exists()


def test_heart_smaller_than_the_bound_is_an_error(tmp_path):
    """The bound: a quarter of the smallest training heart where the checkpoint records the
    training heart volumes, else the documented default."""
    heart = threshold_model("heart", spacing=(0.6, 0.7, 0.8))
    calcium = threshold_model("calcium", spacing=(0.6, 0.7, 0.8))
    assert inference.min_heart_bound(heart) == inference.DEFAULT_MIN_HEART_ML == 50.0
    recorded = dataclasses.replace(heart)
    recorded.heart_volume_ml = {"min": 8.0, "median": 10.0, "max": 12.0}
    assert inference.min_heart_bound(recorded) == 2.0
    scorer = inference.Scorer(recorded, calcium, batch_size=4)
    hu = np.full((4, 64, 64), -1000.0, np.float32)
    hu[1:3, 10:20, 10:20] = 500.0  # 2 slices x 100 px x 0.7^2 mm^2 x 3 mm = 0.294 ml
    result = scorer.score(volume_of(hu))
    assert result.heart_volume_ml == pytest.approx(0.294)
    assert result.problems == ("no heart found: predicted heart volume 0.294 ml, below the "
                               "smallest plausible heart (2 ml)",)
    assert inference.Scorer(recorded, calcium, min_heart_ml=0.1).score(volume_of(hu)).problems == ()


@pytest.mark.parametrize("kind", ["uint16_plus_1024", "mr_like"])
def test_image_not_in_hu_is_an_error_row(scorer, tmp_path, kind, capsys):
    """The check `cac-jax score` warns with makes a batch row an error (not 'ok' with a score)."""
    hu, _, _ = tiny_study(2, size=64, slices=5)
    if kind == "uint16_plus_1024":
        stored = (np.round(hu) + 1024).astype(np.uint16)
    else:  # MR-like: non-negative intensities, bright blood
        stored = np.clip(hu + 1000, 0, None).astype(np.uint16) // 2
    path = tmp_path / f"{kind}.nii.gz"
    write_volume(path, stored, volume_of(hu))
    batch.run_batch(scorer, inference.studies_from_args([str(path)], None), tmp_path / "out",
                    progress=False)
    (row,) = _rows(tmp_path / "out")
    assert row["status"] == "error" and "Hounsfield units" in row["error"]
    assert str(path) in row["error"] and row["agatston"] == ""


def test_score_json_carries_the_score_command_warnings(scorer, tmp_path):
    """Header warnings `cac-jax score` gives (here a tube voltage other than 120 kVp) reach the
    batch's JSON too."""
    hu, _, _ = tiny_study(1, size=64, slices=5)
    volume = volume_of(hu)
    volume = dataclasses.replace(volume, metadata=dataclasses.replace(volume.metadata, kvp=100.0))
    result = scorer.score(volume)
    assert any("100 kVp" in w for w in result.score.warnings) and result.problems == ()


# --------------------------------------------------------------------------- results.csv


def test_numbers_keep_full_precision_and_categories(scorer, tmp_path, monkeypatch):
    """A score just above a category boundary keeps its category through results.csv."""
    from cac_jax import evaluation

    paths = _write_cohort(tmp_path, count=1)
    original = inference.Scorer.score_path

    def boundary(self, path, **kw):
        volume, result = original(self, path, **kw)
        score = dataclasses.replace(result.score, agatston=100.00000001, category=2,
                                    category_name="101-400")
        return volume, dataclasses.replace(result, score=score)

    monkeypatch.setattr(inference.Scorer, "score_path", boundary)
    batch.run_batch(scorer, inference.studies_from_args([str(paths[0])], None), tmp_path / "out",
                    progress=False)
    (row,) = _rows(tmp_path / "out")
    assert float(row["agatston"]) == 100.00000001
    assert float(row["heart_volume_ml"]) > 0
    predictions, _ = evaluation.read_predictions(tmp_path / "out" / "results.csv")
    from cac_jax.scoring import cac_category

    assert cac_category(predictions[row["scan_id"]].agatston) == int(row["category"]) == 2
    assert results.number(0.1 + 0.2) == "0.30000000000000004"


def test_rows_are_appended_not_the_file_rewritten(scorer, tmp_path, monkeypatch):
    """A batch of N studies rewrites results.csv at most once (at the start), then appends."""
    paths = _write_cohort(tmp_path, count=4)
    rewrites = []
    original = results.write_results
    monkeypatch.setattr(batch, "write_results",
                        lambda path, rows: (rewrites.append(path), original(path, rows)))
    studies = inference.studies_from_args([str(p) for p in paths], None)
    summary = batch.run_batch(scorer, studies, tmp_path / "out", progress=False)
    assert summary.scored == 4 and len(rewrites) == 1
    assert [r["scan_id"] for r in _rows(tmp_path / "out")] == ["s0", "s1", "s2", "s3"]
    # A rerun with nothing to redo does not rewrite it at all.
    assert batch.run_batch(scorer, studies, tmp_path / "out", progress=False).skipped == 4
    assert len(rewrites) == 1


def test_a_torn_last_line_is_left_out_and_rescored(scorer, tmp_path, capsys):
    """A crash mid-row leaves a last line without newline: readers leave it out, a resumed batch
    warns, rewrites the file without it and scores that study again."""
    paths = _write_cohort(tmp_path, count=3)
    studies = inference.studies_from_args([str(p) for p in paths], None)
    out = tmp_path / "out"
    batch.run_batch(scorer, studies, out, progress=False)
    text = (out / "results.csv").read_text()
    lines = text.splitlines(keepends=True)
    (out / "results.csv").write_text("".join(lines[:-1]) + lines[-1][:25])
    rows, torn = results.read_results(out / "results.csv")
    assert list(rows) == ["s0", "s1"] and torn == lines[-1][:25]
    warnings = []
    summary = batch.run_batch(scorer, studies, out, progress=False, log=warnings.append)
    assert (summary.scored, summary.skipped) == (1, 2)
    assert len(warnings) == 1 and "cut short" in warnings[0]
    assert (out / "results.csv").read_text().splitlines() == text.splitlines()[:-1] + [
        (out / "results.csv").read_text().splitlines()[-1]]
    assert [r["scan_id"] for r in _rows(out)] == ["s0", "s1", "s2"]


def test_a_failed_append_is_cut_back_to_whole_rows(tmp_path, monkeypatch):
    path = tmp_path / "results.csv"
    results.write_results(path, [{"scan_id": "a", "status": "ok"}])
    before = path.read_bytes()
    appender = results.ResultsAppender(path)
    real_write = os.write

    def short(fd, data):
        real_write(fd, data[:7])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", short)
    with pytest.raises(OSError, match="No space"):
        appender.append({"scan_id": "b", "status": "ok"})
    monkeypatch.undo()
    appender.close()
    assert path.read_bytes() == before


@pytest.mark.parametrize("code, stops", [(errno.ENOSPC, True), (errno.ECONNREFUSED, False)])
def test_a_full_disk_in_the_after_study_outputs_stops_the_batch(scorer, tmp_path, code, stops):
    # The DICOM outputs (after_study) hit a full disk: every later study would too, so the batch
    # stops with one line; a study's own failure there (a PACS refusing it) is that study's row.
    paths = _write_cohort(tmp_path, count=2)
    calls = []

    def after_study(out, name, study, volume, result):
        calls.append(name)
        raise OSError(code, os.strerror(code))

    studies = inference.studies_from_args([str(p) for p in paths], None)
    if stops:
        with pytest.raises(batch.OutputWriteError, match=r"cannot write the outputs of s0: "
                                                         r"No space left on device"):
            batch.run_batch(scorer, studies, tmp_path / "out", progress=False,
                            after_study=after_study)
        assert calls == ["s0"]
    else:
        batch.run_batch(scorer, studies, tmp_path / "out", progress=False,
                        after_study=after_study)
        assert calls == ["s0", "s1"]
        assert [r["status"] for r in _rows(tmp_path / "out")] == ["error", "error"]


def test_a_killed_writes_temporary_is_removed_by_the_next_run(scorer, tmp_path):
    # SIGKILL during an atomic write leaves its temporary (never the output itself); the next run,
    # holding the folder's lock, removes such files and nothing else.
    import tempfile

    paths = _write_cohort(tmp_path, count=1)
    out = tmp_path / "out"
    out.mkdir()
    fd, stale = tempfile.mkstemp(prefix=".s0.png.", suffix=".tmp.png", dir=out)
    os.close(fd)
    (out / ".keep.me").write_text("a user's file")
    batch.run_batch(scorer, inference.studies_from_args([str(paths[0])], None), out,
                    progress=False)
    assert not Path(stale).exists() and (out / ".keep.me").exists()
    assert [r["status"] for r in _rows(out)] == ["ok"]


def test_resuming_with_other_models_is_refused(scorer, tmp_path, monkeypatch, capsys):
    """Rows carry the models (checkpoint step folder and step): an --out scored by other models
    is refused with one line unless --overwrite, which rescores every study."""
    paths = _write_cohort(tmp_path, count=2)
    out = tmp_path / "out"
    assert _cli(monkeypatch, scorer, "--input", *map(str, paths), "--out", str(out)) == 0
    assert {r["heart_model"] for r in _rows(out)} == {"/models/threshold_heart"}
    other_heart = dataclasses.replace(scorer.heart, path=Path("/models/other_heart"), step=9)
    other = inference.Scorer(other_heart, scorer.calcium, batch_size=4, min_heart_ml=0.0)
    capsys.readouterr()
    assert _cli(monkeypatch, other, "--input", *map(str, paths), "--out", str(out)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "scored by other models" in err[0]
    assert "/models/threshold_heart step 1" in err[0] and "/models/other_heart step 9" in err[0]
    # Only the step differs: refused as well.
    later = inference.Scorer(dataclasses.replace(scorer.heart, step=2), scorer.calcium,
                             min_heart_ml=0.0)
    assert _cli(monkeypatch, later, "--input", str(paths[0]), "--out", str(out)) == 2
    assert _cli(monkeypatch, other, "--input", *map(str, paths), "--out", str(out),
                "--overwrite") == 0
    rows = _rows(out)
    assert [(r["heart_model"], r["heart_step"]) for r in rows] == [("/models/other_heart", "9")] * 2


# --------------------------------------------------------------------------- shards and merging


def test_shards_are_disjoint_and_cover_the_batch():
    studies = [inference.Study(f"scan{k:03d}", Path(f"/s/{k}.nii.gz")) for k in range(200)]
    parts = [batch.shard(studies, k, 7) for k in range(1, 8)]
    ids = [s.scan_id for part in parts for s in part]
    assert sorted(ids) == [s.scan_id for s in studies]  # each study once
    assert min(len(p) for p in parts) > 10  # spread over the shards
    # The same split whatever the order the studies come in.
    assert batch.shard(studies[::-1], 3, 7) == parts[2][::-1]
    for bad in ("0/4", "5/4", "2", "a/b", "1/0"):
        with pytest.raises(ValueError, match="K/N"):
            batch.parse_shard(bad)


def test_shard_runs_merge_into_the_whole_batch_once(scorer, tmp_path, monkeypatch, capsys):
    paths = _write_cohort(tmp_path, count=5)
    inputs = [str(p) for p in paths]
    assert _cli(monkeypatch, scorer, "--input", *inputs, "--out", str(tmp_path / "all")) == 0
    folders = [str(tmp_path / f"part{k}") for k in (1, 2, 3)]
    for k, folder in enumerate(folders, start=1):
        assert _cli(monkeypatch, scorer, "--input", *inputs, "--shard", f"{k}/3",
                    "--out", folder) == 0
    sizes = [len(_rows(Path(f))) for f in folders]
    assert sum(sizes) == 5 and max(sizes) < 5
    capsys.readouterr()
    merged = tmp_path / "merged"
    assert main(["infer", "--merge", *folders, "--input", *inputs, "--out", str(merged)]) == 0
    assert "merged 5 rows of 3 folders" in capsys.readouterr().out

    def strip(rows):
        return {r["scan_id"]: {k: v for k, v in r.items() if k != "seconds"} for r in rows}

    assert strip(_rows(merged)) == strip(_rows(tmp_path / "all"))
    # A missing shard, overlapping shards, or shards of other models: refused with one line.
    for argv, message in (
            ([*folders[:2], "--input", *inputs], "in no shard"),
            ([folders[0], folders[0] + "/../part1", *folders[1:]], "the shards overlap"),
            ([*folders, str(tmp_path / "all")], "the shards overlap")):
        assert main(["infer", "--merge", *argv, "--out", str(tmp_path / "m2")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    rows = _rows(Path(folders[0]))
    rows[0]["calcium_step"] = "7"
    results.write_results(Path(folders[0]) / "results.csv", rows)
    assert main(["infer", "--merge", *folders, "--out", str(tmp_path / "m3")]) == 2
    assert "other models" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["infer", "--merge", *folders, "--shard", "1/2", "--out", str(tmp_path / "m4")])
    assert "it takes no --shard" in capsys.readouterr().err
    # Without checkpoints and without --merge: argparse's usage error.
    with pytest.raises(SystemExit):
        main(["infer", "--input", *inputs, "--out", str(tmp_path / "x")])
    assert "--heart-checkpoint" in capsys.readouterr().err


# --------------------------------------------------------------------------- the output folder


HOLDER = textwrap.dedent("""
    import fcntl, os, sys, time
    fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.write(fd, b"pid %d on testhost since now" % os.getpid())
    print("locked", flush=True)
    time.sleep(60)
""")


def test_a_second_run_into_one_out_is_refused(scorer, tmp_path, monkeypatch, capsys):
    paths = _write_cohort(tmp_path, count=1)
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out / results.LOCK_NAME)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert _cli(monkeypatch, scorer, "--input", str(paths[0]), "--out", str(out)) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "another cac-jax infer is writing into this folder" in err[0]
        assert f"pid {holder.pid} on testhost" in err[0]
        assert not (out / "results.csv").exists()
    finally:
        holder.kill()
        holder.wait()
    # The holder died: its lock file is no lock.
    assert (out / results.LOCK_NAME).exists()
    assert _cli(monkeypatch, scorer, "--input", str(paths[0]), "--out", str(out)) == 0
    assert not (out / results.LOCK_NAME).exists() and len(_rows(out)) == 1


@pytest.mark.parametrize("failure", ["mkdir", "lock", "json", "append", "empty_mask"])
def test_unwritable_out_is_one_line_exit_2(scorer, tmp_path, monkeypatch, capsys, failure):
    """A read-only or full output folder stops the batch with one line (exit 2), not a
    traceback or a row per study."""
    import pathlib

    from data_pipeline import atomic

    paths = _write_cohort(tmp_path, count=2)
    out = tmp_path / "out"
    code = errno.EROFS if failure in ("mkdir", "lock") else errno.ENOSPC

    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    if failure == "mkdir":
        monkeypatch.setattr(pathlib.Path, "mkdir", fail)
    elif failure == "lock":
        out.mkdir()
        real_open = os.open
        monkeypatch.setattr(os, "open", lambda path, *a, **k: fail() if str(path).endswith(
            results.LOCK_NAME) else real_open(path, *a, **k))
    elif failure == "json":
        original = atomic.atomic_write_text
        monkeypatch.setattr(atomic, "atomic_write_text", lambda path, text: fail()
                            if str(path).endswith(".json") else original(path, text))
    elif failure == "append":
        monkeypatch.setattr(results.ResultsAppender, "append", fail)
    else:  # SimpleITK on a full disk: an empty .nii.gz and no error
        from data_pipeline import io as study_io

        monkeypatch.setattr(study_io, "write_labels",
                            lambda path, array, like: Path(path).write_bytes(b""))
    capsys.readouterr()
    assert _cli(monkeypatch, scorer, "--input", *map(str, paths), "--out", str(out),
                "--save-masks") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(out) in err[0], err
    if failure == "empty_mask":
        assert "came out empty or unreadable (is the disk full?)" in err[0]
        assert not list(out.glob("*.nii.gz")) and _rows(out) == []
    else:
        assert os.strerror(code) in err[0]
