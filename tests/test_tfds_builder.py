"""TFDS builder: builds from tiny cohorts (own fixture and the phantom), errors name the row."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from data_pipeline import labels as labels_lib
from data_pipeline.config import DATASET_VERSION
from data_pipeline.errors import ManifestError
from data_pipeline.manifest import ManifestRow, write_manifest

tfds = pytest.importorskip("tensorflow_datasets")


def _write(path: Path, array: np.ndarray, spacing_zyx=(3.0, 0.7, 0.7)) -> Path:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(tuple(float(s) for s in reversed(spacing_zyx)))
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))
    return path


def tiny_scan(seed: int, size: int, slices: int):
    """(hu int16, labels int16, heart uint8) with calcium on known slices.

    Coronary label 1 on slice 1 and label 3 on the last slice (edge), aorta label 5 on slice 2,
    a bone column (HU 500, unlabelled) in every slice, heart disc in the middle slices.
    """
    rng = np.random.default_rng(seed)
    hu = rng.normal(40.0, 10.0, (slices, size, size)).astype(np.int16)
    labels = np.zeros_like(hu)
    heart = np.zeros(hu.shape, np.uint8)
    yy, xx = np.mgrid[:size, :size]
    disc = (yy - size // 2) ** 2 + (xx - size // 2) ** 2 < (size // 4) ** 2
    heart[1:slices - 1][:, disc] = 1
    hu[:, size - 6:size - 2, size // 2 - 2:size // 2 + 2] = 500  # spine: class 2 via HU rule
    c = size // 2 + (seed % 5)
    hu[1, c:c + 3, c:c + 3] = 300
    labels[1, c:c + 3, c:c + 3] = 1
    hu[-1, c - 4:c - 1, c:c + 3] = 450
    labels[-1, c - 4:c - 1, c:c + 3] = 3
    hu[2, 4:7, 4:7] = 700
    labels[2, 4:7, 4:7] = 5
    return hu, labels, heart


def write_tiny_cohort(root: Path, patients: int = 8, *, split_column: bool = False,
                      ctac_spacing_z: float = 3.0, agatston: bool = True,
                      heart_slices: slice | None = None) -> Path:
    """Manifest + NIfTI files: patients alternate 64 and 32 px and 5..7 slices; some have ctac.

    Slices are 3 mm apart (`ctac_spacing_z` for the ctac scans); without `agatston` the manifest
    gives no reference score or category, so the builder scores the labels. `heart_slices` keeps
    the heart mask on those slices only (default: every slice but the first and the last).
    """
    rows = []
    for p in range(patients):
        pid = f"P{p:03d}"
        protocols = ("cac", "ctac") if p % 3 == 0 else ("cac",)
        for protocol in protocols:
            size = 64 if (p + len(protocol)) % 2 else 32
            slices = 5 + (p % 3)
            hu, labels, heart = tiny_scan(p * 7 + len(protocol), size, slices)
            if heart_slices is not None:
                kept = np.zeros_like(heart)
                kept[heart_slices] = heart[heart_slices]
                heart = kept
            folder = root / pid / protocol
            spacing = (ctac_spacing_z if protocol == "ctac" else 3.0, 0.7, 0.7)
            rows.append(ManifestRow(
                patient_id=pid, scan_id=f"{pid}_{protocol}", protocol=protocol,
                image=_write(folder / "image.nii.gz", hu, spacing),
                calcium_labels=_write(folder / "calcium_labels.nii.gz", labels, spacing),
                heart_mask=_write(folder / "heart_mask.nii.gz", heart, spacing), site="test",
                split=(["train", "validation", "test"][p % 3] if split_column else None),
                agatston=float(10 * p) if agatston else None,
                category=p % 4 if agatston else None))
    manifest = root / "manifest.csv"
    write_manifest(manifest, rows)
    return manifest


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    from data_pipeline.tfds_builder import build_dataset

    root = tmp_path_factory.mktemp("cohort")
    manifest = write_tiny_cohort(root, patients=10)
    data_dir = root / "tfds"
    builder = build_dataset(manifest, data_dir, name="tiny", split_seed=3, progress=False)
    return root, manifest, data_dir, builder


def test_builds_whole_scans_with_metadata(built):
    root, manifest, data_dir, builder = built
    path = data_dir / "tiny" / DATASET_VERSION
    assert (path / "dataset_info.json").exists()
    loaded = tfds.builder_from_directory(str(path))
    total = sum(info.num_examples for info in loaded.info.splits.values())
    assert total == 14  # 10 patients, 4 with a ctac scan too
    examples = {}
    for split in loaded.info.splits:
        for ex in tfds.as_numpy(loaded.as_dataset(split=split)):
            examples[ex["scan_id"].decode()] = ex
    ex = examples["P001_cac"]
    hu, labels, heart = tiny_scan(1 * 7 + 3, 32, 6)
    np.testing.assert_array_equal(ex["hu"], hu)
    np.testing.assert_array_equal(ex["calcium_class"], labels_lib.calcium_classes(labels, hu))
    np.testing.assert_array_equal(ex["heart_mask"], heart)
    np.testing.assert_array_equal(ex["annotated_calcium_slice"], [False, True, True, False, False, True])
    np.testing.assert_allclose(ex["spacing_zyx_mm"], [3.0, 0.7, 0.7], rtol=1e-6)
    assert ex["protocol"] == b"cac" and ex["patient_id"] == b"P001"
    assert math.isclose(float(ex["agatston"]), 10.0) and int(ex["category"]) == 1
    # Varying sizes and slice counts in one dataset.
    assert {e["hu"].shape[1] for e in examples.values()} == {32, 64}
    assert len({e["hu"].shape[0] for e in examples.values()}) == 3


def test_split_audit_written_and_patient_disjoint(built):
    root, manifest, data_dir, builder = built
    path = data_dir / "tiny" / DATASET_VERSION
    audit = json.loads((path / "splits.json").read_text())
    assert audit["seed"] == 3
    splits_of = {}
    for record in audit["patients"]:
        splits_of[record["patient_id"]] = record["split"]
    assert len(splits_of) == 10
    loaded = tfds.builder_from_directory(str(path))
    for split in loaded.info.splits:
        for ex in tfds.as_numpy(loaded.as_dataset(split=split)):
            assert splits_of[ex["patient_id"].decode()] == split
    assert (path / "splits.csv").read_text().startswith("scan_id,patient_id,split")
    assert json.loads((path / "skipped.json").read_text()) == []


def test_existing_dataset_needs_overwrite(built):
    from data_pipeline.errors import InputError
    from data_pipeline.tfds_builder import build_dataset

    root, manifest, data_dir, builder = built
    with pytest.raises(InputError, match="already built"):
        build_dataset(manifest, data_dir, name="tiny", progress=False)


def test_a_killed_overwrite_gets_its_old_dataset_back(built):
    # A rebuild killed after it set the old dataset aside (renamed beside it) and before the new
    # one was in place: the next ingest puts the old one back, and says so.
    from data_pipeline.errors import InputError
    from data_pipeline.tfds_builder import build_dataset

    root, manifest, data_dir, builder = built
    target = data_dir / "tiny" / DATASET_VERSION
    files = sorted(p.relative_to(target) for p in target.rglob("*"))
    aside = target.with_name(f".{target.name}.replaced-99999")
    target.rename(aside)
    warnings = []
    with pytest.raises(InputError, match="already built"):
        build_dataset(manifest, data_dir, name="tiny", progress=False, on_warning=warnings.append)
    assert sorted(p.relative_to(target) for p in target.rglob("*")) == files
    assert not aside.exists()
    assert warnings == [f"restored {target}: the dataset an interrupted --overwrite rebuild had "
                        "set aside"]
    # Killed again, leaving an empty dataset folder in its place: still the old one comes back.
    target.rename(aside)
    target.mkdir()
    with pytest.raises(InputError, match="already built"):
        build_dataset(manifest, data_dir, name="tiny", progress=False, on_warning=warnings.append)
    assert sorted(p.relative_to(target) for p in target.rglob("*")) == files
    assert not aside.exists()


def test_a_full_disk_while_building_is_one_line_and_keeps_the_dataset(built, monkeypatch):
    # TFDS reports a full disk as a RuntimeError around TensorFlow's ResourceExhaustedError.
    from data_pipeline import tfds_builder
    from data_pipeline.errors import InputError

    root, manifest, data_dir, builder = built
    target = data_dir / "tiny" / DATASET_VERSION
    files = sorted(p.relative_to(target) for p in target.rglob("*"))

    def full(self, **kwargs):
        raise RuntimeError('ResourceExhaustedError: Failed to finalize writing of split "train": '
                           "/x/tiny-train.tfrecord; No space left on device")

    monkeypatch.setattr(tfds_builder.CacCtBuilder, "download_and_prepare", full)
    with pytest.raises(InputError, match=r"cannot write the dataset: No space left on device; "
                                         r"the dataset built before is kept"):
        tfds_builder.build_dataset(manifest, data_dir, name="tiny", overwrite=True,
                                   progress=False)
    assert sorted(p.relative_to(target) for p in target.rglob("*")) == files


def test_overwrite_with_bad_manifest_keeps_the_dataset(built, tmp_path):
    from data_pipeline.tfds_builder import build_dataset

    root, manifest, data_dir, builder = built
    bad = tmp_path / "bad.csv"
    bad.write_text("patient_id,scan_id\nP0,P0_cac\n")
    with pytest.raises(ManifestError, match="lacks required column"):
        build_dataset(bad, data_dir, name="tiny", overwrite=True, progress=False)
    assert (data_dir / "tiny" / DATASET_VERSION / "dataset_info.json").exists()


@pytest.mark.parametrize("problem", ["no file", "no columns", "bad row"])
def test_bad_manifest_creates_nothing(tmp_path, problem):
    from data_pipeline.tfds_builder import build_dataset

    manifest = tmp_path / "manifest.csv"
    if problem == "no columns":
        manifest.write_text("patient_id,scan_id\nP0,P0_cac\n")
    elif problem == "bad row":
        manifest = _bad_manifest(tmp_path / "cohort", "missing")
    data_dir = tmp_path / "tfds"
    with pytest.raises(ManifestError):
        build_dataset(manifest, data_dir, name="bad", progress=False)
    assert not data_dir.exists()  # no TFDS "downloads/" or half-made dataset folder


def test_data_dir_that_is_a_file(tmp_path, capsys):
    from cac_jax import cli
    from data_pipeline.errors import InputError
    from data_pipeline.tfds_builder import build_dataset

    manifest = write_tiny_cohort(tmp_path / "cohort", patients=1)
    not_a_dir = tmp_path / "data.txt"
    not_a_dir.write_text("x")
    with pytest.raises(InputError, match="data.txt: is a file, not a directory"):
        build_dataset(manifest, not_a_dir, progress=False)
    with pytest.raises(InputError, match="data.txt: is a file"):
        build_dataset(manifest, not_a_dir / "sub", progress=False)
    assert cli.main(["ingest", "--manifest", str(manifest), "--data-dir", str(not_a_dir),
                     "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"{not_a_dir}: is a file, not a directory" in err and "Traceback" not in err


def _bad_manifest(root: Path, problem: str) -> Path:
    manifest = write_tiny_cohort(root, patients=3)
    text = manifest.read_text().splitlines()
    header, rows = text[0], text[1:]
    fields = rows[1].split(",")  # data row 2
    if problem == "missing":
        fields[3] = "nowhere/image.nii.gz"
    elif problem == "protocol":
        fields[2] = "mri"
    elif problem == "geometry":
        small = np.zeros((2, 8, 8), np.int16)
        _write(root / "small.nii.gz", small)
        fields[4] = "small.nii.gz"
    rows[1] = ",".join(fields)
    manifest.write_text("\n".join([header, *rows]) + "\n")
    return manifest


@pytest.mark.parametrize("problem,expected", [
    ("missing", "image file not found"), ("protocol", "unknown protocol"),
    ("geometry", "calcium_labels: ")])
def test_bad_row_error_names_row_and_skip_bad(tmp_path, problem, expected):
    from data_pipeline.tfds_builder import build_dataset

    manifest = _bad_manifest(tmp_path, problem)
    with pytest.raises(ManifestError) as info:
        build_dataset(manifest, tmp_path / "tfds", name="bad", progress=False)
    message = str(info.value)
    assert "row 2" in message and "P000_ctac" in message and expected in message
    skipped_lines = []
    builder = build_dataset(manifest, tmp_path / "tfds", name="bad", skip_bad=True,
                            progress=False, on_skip=skipped_lines.append)
    assert len(skipped_lines) == 1 and "row 2" in skipped_lines[0]
    path = tmp_path / "tfds" / "bad" / DATASET_VERSION
    skipped = json.loads((path / "skipped.json").read_text())
    assert len(skipped) == 1 and "P000_ctac" in skipped[0]["problem"]
    total = sum(info.num_examples for info in builder.info.splits.values())
    assert total == 3  # 4 scans (P000 has ctac too) minus the bad one
    # The audit lists exactly the scans in the dataset, and which rows were skipped.
    stored = {ex["scan_id"].decode(): split for split in builder.info.splits
              for ex in tfds.as_numpy(builder.as_dataset(split=split))}
    lines = (path / "splits.csv").read_text().splitlines()[1:]
    assert {line.split(",")[0]: line.split(",")[2] for line in lines} == stored
    audit = json.loads((path / "splits.json").read_text())
    assert sum(c["scans"] for c in audit["counts"].values()) == 3
    assert len(audit["skipped"]) == 1 and "row 2" in audit["skipped"][0]["row"]
    # 3 patients: validation and test get one each (round(10%) alone would give none).
    assert audit["empty_splits"] == [] and set(builder.info.splits) == {"train", "validation",
                                                                         "test"}


def test_skipped_scans_leave_audit_and_empty_split_warns(tmp_path, capsys):
    from data_pipeline.tfds_builder import build_dataset

    # Split column: P000 train, P001 validation, P002 test; P001's only scan fails to read.
    manifest = write_tiny_cohort(tmp_path, patients=3, split_column=True)
    _write(tmp_path / "small.nii.gz", np.zeros((2, 8, 8), np.int16))
    lines = manifest.read_text().splitlines()
    index = next(i for i, line in enumerate(lines) if line.startswith("P001,P001_cac,"))
    fields = lines[index].split(",")
    fields[4] = "small.nii.gz"
    lines[index] = ",".join(fields)
    manifest.write_text("\n".join(lines) + "\n")
    warnings = []
    builder = build_dataset(manifest, tmp_path / "tfds", name="skip", skip_bad=True,
                            progress=False, on_warning=warnings.append)
    assert "validation" not in builder.info.splits
    assert len(warnings) == 1 and "'validation' is empty" in warnings[0]
    audit = json.loads((Path(builder.data_dir) / "splits.json").read_text())
    assert "P001" not in {record["patient_id"] for record in audit["patients"]}
    assert audit["counts"]["validation"]["patients"] == 0
    assert audit["empty_splits"] == ["validation"]
    assert [entry["scan_id"] for entry in audit["skipped"]] == ["P001_cac"]
    assert "P001_cac" not in (Path(builder.data_dir) / "splits.csv").read_text()
    # Default: the warning goes to stderr.
    build_dataset(manifest, tmp_path / "tfds", name="skip", skip_bad=True, overwrite=True,
                  progress=False)
    assert "warning: split 'validation' is empty" in capsys.readouterr().err


def test_row_failing_while_written_leaves_audit(tmp_path, monkeypatch):
    from data_pipeline import tfds_builder

    # P000 (train) has a cac and a ctac scan; the ctac one passes the check but fails when written.
    manifest = write_tiny_cohort(tmp_path, patients=3, split_column=True)
    read_row = tfds_builder.read_row

    def flaky(row, manifest_path="", **kwargs):
        if row.scan_id == "P000_ctac":
            raise ManifestError(manifest_path, f"{row.where}: changed on disk")
        return read_row(row, manifest_path, **kwargs)

    monkeypatch.setattr(tfds_builder, "read_row", flaky)
    builder = tfds_builder.build_dataset(manifest, tmp_path / "tfds", name="flaky",
                                         skip_bad=True, progress=False)
    assert builder.info.splits["train"].num_examples == 1
    audit = json.loads((Path(builder.data_dir) / "splits.json").read_text())
    assert {r["patient_id"]: r["scan_ids"] for r in audit["patients"]}["P000"] == ["P000_cac"]
    assert audit["counts"]["train"]["scans"] == 1
    assert [entry["scan_id"] for entry in audit["skipped"]] == ["P000_ctac"]
    assert "P000_ctac" not in (Path(builder.data_dir) / "splits.csv").read_text()


def test_ingest_warns_about_empty_splits(tmp_path, capsys):
    manifest = write_tiny_cohort(tmp_path, patients=2)  # too few patients for validation/test
    assert _ingest(["--manifest", str(manifest), "--data-dir", str(tmp_path / "tfds"),
                    "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "cac-jax ingest: warning: split 'validation' is empty" in err
    assert "cac-jax ingest: warning: split 'test' is empty" in err


def _ingest(argv):
    import argparse

    from cac_jax.commands import ingest

    parser = argparse.ArgumentParser(prog="cac-jax")
    ingest.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["ingest", *argv])
    return args.func(args)


def test_ingest_command(tmp_path, capsys):
    manifest = _bad_manifest(tmp_path, "geometry")
    data_dir = tmp_path / "tfds"
    with pytest.raises(ManifestError,
                       match=r"row 2 \(scan_id='P000_ctac'\) calcium_labels: .*small.nii.gz: shape"):
        _ingest(["--manifest", str(manifest), "--data-dir", str(data_dir), "--quiet"])
    assert _ingest(["--manifest", str(manifest), "--data-dir", str(data_dir), "--name", "cli",
                    "--seed", "4", "--skip-bad", "--quiet"]) == 0
    out, err = capsys.readouterr()
    assert "skipped row 2 (scan_id='P000_ctac')" in err
    assert f"dataset cli {DATASET_VERSION}" in out and "skipped 1 row(s)" in out
    audit = json.loads((data_dir / "cli" / DATASET_VERSION / "splits.json").read_text())
    assert audit["seed"] == 4


def test_builds_from_generated_phantom_cohort(tmp_path):
    """The synthetic cohort (DICOM series + NIfTI labels) goes through ingest and the pipeline."""
    phantom = pytest.importorskip("data_pipeline.phantom")
    from data_pipeline import io as io_lib
    from data_pipeline.config import data_config
    from data_pipeline.input_pipeline import make_dataset
    from data_pipeline.tfds_builder import build_dataset

    rows = phantom.generate_cohort(tmp_path / "cohort", patients=3, size=64, seed=0)
    builder = build_dataset(tmp_path / "cohort" / "manifest.csv", tmp_path / "tfds",
                            name="phantom", progress=False)
    stored = {}
    for split in builder.info.splits:
        for ex in tfds.as_numpy(builder.as_dataset(split=split)):
            stored[ex["scan_id"].decode()] = ex
    assert set(stored) == {row.scan_id for row in rows}
    for row in rows:
        ex = stored[row.scan_id]
        volume = io_lib.read_study(row.image)
        labels = io_lib.read_labels(row.calcium_labels, like=volume)
        np.testing.assert_array_equal(ex["hu"], np.rint(volume.hu).astype(np.int16))
        np.testing.assert_array_equal(ex["calcium_class"],
                                      labels_lib.calcium_classes(labels, volume.hu))
        assert ex["protocol"].decode() == row.protocol
        assert math.isclose(float(ex["agatston"]), row.agatston, rel_tol=1e-4, abs_tol=1e-3)
        assert int(ex["category"]) == row.category
        assert ex["heart_slice"].any()
    # A patient's cac and ctac scans share a split.
    audit = json.loads((Path(builder.data_dir) / "splits.json").read_text())
    assert all(len(record["scan_ids"]) == 2 for record in audit["patients"])
    config = data_config("calcium", local=True)
    config.data_dir, config.name, config.seed = str(tmp_path / "tfds"), "phantom", 0
    batch = next(make_dataset(config, "train", local_devices=2))
    assert batch["image"].shape == (2, 2, 3, 64, 64, 1)
    assert set(np.unique(batch["label"])) <= {0, 1, 2}


def test_scans_are_scored_once_and_neighbours_recorded(tmp_path, monkeypatch):
    """Without reference scores in the manifest each scan's labels are scored once (for the
    splits; the record reuses it), and the metadata records the neighbour distance and offsets."""
    from data_pipeline import agatston, scan_rows, tfds_builder

    manifest = write_tiny_cohort(tmp_path, patients=4, agatston=False, ctac_spacing_z=1.25)
    scored = []
    real = agatston.agatston_score

    def counting(hu, labels, spacing, **kwargs):
        scored.append(hu.shape)
        return real(hu, labels, spacing, **kwargs)

    monkeypatch.setattr(scan_rows, "agatston_score", counting)
    builder = tfds_builder.build_dataset(manifest, tmp_path / "tfds", name="once", progress=False)
    assert len(scored) == 6  # 4 cac + 2 ctac scans, each scored exactly once
    loaded = tfds.builder_from_directory(builder.data_dir)
    by_id = {}
    for split in loaded.info.splits:
        for ex in tfds.as_numpy(loaded.as_dataset(split=split)):
            by_id[ex["scan_id"].decode()] = ex
    assert len(by_id) == 6
    for ex in by_id.values():  # the stored score is the scorer's, category from it
        assert np.isfinite(ex["agatston"]) and ex["category"] >= 0
        assert tuple(ex["shape_zyx"]) == ex["hu"].shape
    metadata = json.loads((Path(builder.data_dir) / "metadata.json").read_text())
    assert metadata["neighbour_mm"] == 3.0
    # 3 mm cac slices: offset 1; 1.25 mm ctac slices: round(3 / 1.25) = 2.
    assert metadata["neighbour_offsets"] == {"cac": {"1": 4}, "ctac": {"2": 2}}


def test_killed_ingest_leftovers_removed_and_a_concurrent_ingest_refused(tmp_path, capsys):
    """A killed build leaves TFDS's `incomplete.*` folder: the next ingest removes it (and says
    so); while one ingest builds a dataset, a second into the same one is refused."""
    import fcntl

    from data_pipeline.errors import InputError
    from data_pipeline.tfds_builder import build_dataset

    manifest = write_tiny_cohort(tmp_path / "cohort", patients=3)
    data_dir = tmp_path / "tfds"
    stale = data_dir / "tiny" / f"incomplete.ABC123_{DATASET_VERSION}"
    (stale / "train").mkdir(parents=True)
    with open(data_dir / "tiny" / ".ingest.lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(InputError, match="another `cac-jax ingest` is building"):
            build_dataset(manifest, data_dir, name="tiny", progress=False)
    assert stale.exists()  # nothing touched while the other build held the lock
    build_dataset(manifest, data_dir, name="tiny", progress=False)
    assert not stale.exists()
    assert (data_dir / "tiny" / DATASET_VERSION / "dataset_info.json").exists()
    assert "unfinished build of an interrupted ingest" in capsys.readouterr().err


def test_workers_read_the_studies_into_the_same_dataset(tmp_path):
    from data_pipeline.tfds_builder import build_dataset

    # No reference scores in the manifest: the split assignment scores every row first (also in
    # the workers), then the records are written from the workers' reads, in the rows' order.
    manifest = write_tiny_cohort(tmp_path, patients=6, agatston=False)
    built = {workers: build_dataset(manifest, tmp_path / "tfds", name=f"w{workers}",
                                    progress=False, workers=workers) for workers in (1, 2)}
    splits = {workers: json.loads((Path(b.data_dir) / "splits.json").read_text())["patients"]
              for workers, b in built.items()}
    assert splits[1] == splits[2]
    for split in built[1].info.splits:
        one, two = (list(tfds.as_numpy(b.as_dataset(split=split, shuffle_files=False)))
                    for b in built.values())
        assert [ex["scan_id"] for ex in one] == [ex["scan_id"] for ex in two] and one
        for a, b in zip(one, two, strict=True):
            assert a.keys() == b.keys()
            for key in a:
                np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_a_bad_row_read_by_a_worker_is_named_or_skipped(tmp_path):
    from data_pipeline.tfds_builder import build_dataset

    manifest = _bad_manifest(tmp_path, "geometry")
    with pytest.raises(ManifestError) as info:  # the worker's error, rebuilt in this process
        build_dataset(manifest, tmp_path / "tfds", name="bad", progress=False, workers=2)
    assert "row 2" in str(info.value) and "calcium_labels: " in str(info.value)
    assert info.value.path == str(manifest)
    skipped = []
    builder = build_dataset(manifest, tmp_path / "tfds", name="bad", skip_bad=True,
                            progress=False, on_skip=skipped.append, workers=2)
    assert len(skipped) == 1 and "row 2" in skipped[0]
    assert sum(info.num_examples for info in builder.info.splits.values()) == 3


def test_a_worker_that_dies_is_one_line_naming_its_study(tmp_path, monkeypatch):
    import importlib

    from data_pipeline.errors import InputError
    from data_pipeline.scan_rows import map_rows

    # A reader that kills its own process, as the out-of-memory killer would (spawned workers
    # import it by name: its folder is on the path they inherit).
    (tmp_path / "dying_reader.py").write_text("import os\n\ndef read(row, **kwargs):\n"
                                              "    os._exit(9)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    dying = importlib.import_module("dying_reader")
    rows = [ManifestRow(patient_id="P0", scan_id="P0_cac", protocol="cac",
                        image=tmp_path / "p0.nii.gz", calcium_labels=None, heart_mask=None,
                        site="default", split=None, row_number=2)]
    with pytest.raises(InputError, match="p0.nii.gz: row 2.*died") as info:
        list(map_rows(dying.read, rows, workers=2))
    assert "\n" not in str(info.value)
