"""Inference preprocessing equals the tf.data pipeline's evaluation batches, array for array."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tensorflow")
tfds = pytest.importorskip("tensorflow_datasets")

sys.path.insert(0, str(Path(__file__).parent))
from test_tfds_builder import write_tiny_cohort  # noqa: E402

from cac_jax.inference import padded_inputs  # noqa: E402
from data_pipeline.config import DATASET_VERSION, data_config  # noqa: E402
from data_pipeline.input_pipeline import make_dataset  # noqa: E402
from data_pipeline.labels import neighbour_offset  # noqa: E402


def test_inference_inputs_equal_evaluation_batches(tmp_path):
    from data_pipeline.tfds_builder import build_dataset

    manifest = write_tiny_cohort(tmp_path, patients=6, split_column=True)
    build_dataset(manifest, tmp_path / "tfds", name="tiny", progress=False)
    loaded = tfds.builder_from_directory(str(tmp_path / "tfds" / "tiny" / DATASET_VERSION))
    hu = {ex["scan_id"].decode(): ex["hu"]
          for ex in tfds.as_numpy(loaded.as_dataset(split="validation"))}
    config = data_config("calcium", local=True)
    config.data_dir, config.name, config.image_size = str(tmp_path / "tfds"), "tiny", 64
    compared = set()
    for batch in make_dataset(config, "validation", local_devices=1):
        for b in np.flatnonzero(batch["valid"][0]):
            scan_id = batch["scan_id"][0, b].decode()
            scan = hu[scan_id]
            z = int(batch["slice_index"][0, b])
            # 3 mm slices, 3 mm neighbours (the tiny cohort's spacing; the pipeline's default).
            offset = neighbour_offset(3.0, 3.0)
            ours = padded_inputs(scan, np.array([z]), offset, (64, 64), batch_size=1)[0]
            np.testing.assert_array_equal(ours, batch["image"][0, b], err_msg=f"{scan_id} z={z}")
            compared.add((scan_id, z))
    # Every slice of every validation scan (32 and 64 px scans, edges included).
    assert compared == {(s, z) for s, v in hu.items() for z in range(v.shape[0])}
    assert {v.shape[1] for v in hu.values()} == {32, 64}
