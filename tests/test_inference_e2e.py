"""End to end: a tiny training run of both models, then `cac-jax infer` on their checkpoints.

Slow (two training runs compile and train for a few minutes on 2 cores): `pytest -m slow`.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tensorflow")
pytest.importorskip("tensorflow_datasets")

sys.path.insert(0, str(Path(__file__).parent))
from test_inference import ROOT  # noqa: E402
from test_tfds_builder import write_tiny_cohort  # noqa: E402

from cac_jax import inference  # noqa: E402
from cac_jax.cli import main  # noqa: E402
from cac_jax.results import RESULT_COLUMNS  # noqa: E402
from data_pipeline.io import read_labels, read_study  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def workdirs(tmp_path_factory):
    """(cohort root, heart workdir, calcium workdir) after `cac-jax train` of 4 steps of each
    UNet :local model on a tiny ingested cohort."""
    from data_pipeline.tfds_builder import build_dataset

    root = tmp_path_factory.mktemp("e2e")
    manifest = write_tiny_cohort(root, patients=6, split_column=True)
    build_dataset(manifest, root / "tfds", name="tiny", progress=False)
    for task in ("heart", "calcium"):
        assert main(["train", f"--config={ROOT / 'configs' / f'unet_{task}.py'}:local",
                     f"--workdir={root / task}", f"--config.data.data_dir={root / 'tfds'}",
                     "--config.data.name=tiny", "--config.train.steps=4",
                     "--config.train.eval_every=4", "--config.train.checkpoint_every=4",
                     "--config.train.log_every=2", "--config.train.progress=False",
                     "--config.train.num_devices=1"]) == 0
    return root, root / "heart", root / "calcium"


def ct_like_copies(root: Path) -> list[Path]:
    """Copies of the tiny cohort's scans with a 2-pixel frame of air (-1000 HU) around them.

    The cohort's scans are soft tissue to the edges; `infer` refuses an image without air as not
    in HU (as `cac-jax score` warns), and a chest CT has air around the body.
    """
    from data_pipeline.io import write_volume

    copies = []
    for image in sorted(root.glob("P00*/*/image.nii.gz")):
        study = read_study(image)
        hu = np.array(study.hu, dtype=np.int16)
        hu[:, :2], hu[:, -2:], hu[:, :, :2], hu[:, :, -2:] = -1000, -1000, -1000, -1000
        copy = root / "ct_like" / f"{image.parent.parent.name}_{image.parent.name}.nii.gz"
        copy.parent.mkdir(exist_ok=True)
        write_volume(copy, hu, study)
        copies.append(copy)
    return copies


def test_infer_with_trained_checkpoints(workdirs, capsys):
    root, heart, calcium = workdirs
    images = ct_like_copies(root)
    corrupt = root / "corrupt.nii.gz"
    corrupt.write_bytes(b"\x1f\x8b truncated")
    out = root / "out"
    argv = ["infer", "--heart-checkpoint", str(heart), "--calcium-checkpoint",
            str(calcium / "checkpoints" / "4"), "--input", *map(str, images), str(corrupt),
            "--out", str(out), "--save-masks", "--no-progress", "--batch-size", "4",
            "--min-heart-ml", "0"]  # 32-64 px scans: smaller than any real heart
    assert main(argv) == 0
    with (out / "results.csv").open() as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == RESULT_COLUMNS
        rows = {r["scan_id"]: r for r in reader}
    assert rows["corrupt"]["status"] == "error" and "corrupt.nii.gz" in rows["corrupt"]["error"]
    good = [r for r in rows.values() if r["scan_id"] != "corrupt"]
    assert len(good) == len(images) and all(r["status"] == "ok" for r in good)
    assert all(r["heart_step"] == "4" and r["calcium_step"] == "4" for r in good)
    assert all(r["heart_model"].endswith("checkpoints/4") for r in good)
    for image in images:
        row = next(r for r in good if r["image"] == str(image))
        study = read_study(image)
        labels = read_labels(out / f"{row['scan_id']}_calcium_labels.nii.gz", like=study)
        assert labels.shape == study.shape and set(np.unique(labels)) <= {0, 4, 5}
    # A rerun skips everything that was scored and retries only the failure.
    capsys.readouterr()
    assert main(argv) == 0
    assert f"scored 0, failed 1, skipped {len(images)}" in capsys.readouterr().out


def test_scorer_from_checkpoints_compiles_once_per_bucket(workdirs):
    root, heart, calcium = workdirs
    scorer = inference.Scorer.from_checkpoints(heart, calcium, batch_size=4)
    images = sorted(root.glob("P00*/*/image.nii.gz"))
    shapes = set()
    for image in images:  # 32 and 64 px scans of 5-7 slices: one 64 px bucket
        volume, result = scorer.score_path(image)
        shapes.add(volume.shape)
        assert result.heart_mask.shape == volume.shape
    assert len(shapes) > 1 and scorer.compilations == {"heart": 1, "calcium": 1}


def test_heart_checkpoint_as_calcium_is_refused(workdirs, capsys):
    root, heart, _ = workdirs
    code = main(["infer", "--heart-checkpoint", str(heart), "--calcium-checkpoint", str(heart),
                 "--input", str(root / "P000" / "cac" / "image.nii.gz"), "--out",
                 str(root / "refused")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "given as the calcium model, but it is a heart model" in err[0]
    assert "it has 2 classes" in err[0] and "a calcium model has 3" in err[0]
