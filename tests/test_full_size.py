"""Full-size checks (512 px): too long for the default suite, run by `make test-slow`."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from cac_jax.models import build_model
from cac_jax.models.config import model_config
from cac_jax.scoring import score_study
from data_pipeline.io import read_study
from data_pipeline.manifest import read_manifest
from data_pipeline.phantom import generate_cohort

pytestmark = pytest.mark.slow


def test_512_cohort_round_trips_through_dicom_and_the_scorer(tmp_path):
    """At the clinical matrix size, the written DICOM and labels reproduce the manifest scores."""
    rows = generate_cohort(tmp_path, patients=4, size=512, seed=11, workers=2)
    assert sorted(r.category for r in rows if r.protocol == "cac") == [0, 1, 2, 3]
    for row in read_manifest(tmp_path / "manifest.csv"):
        volume = read_study(row.image)
        assert volume.shape[1:] == (512, 512)
        assert volume.metadata.protocol == row.protocol
        result = score_study(row.image, row.calcium_labels)
        assert result.agatston == pytest.approx(row.agatston, abs=1e-3)
        assert result.category == row.category


@pytest.mark.parametrize("arch", ["convlstm", "unet"])
def test_default_models_run_at_512(arch):
    """The default (full-width) calcium models give finite logits of the right shape at 512 px."""
    model = build_model(model_config(arch, "calcium"))
    x = jax.random.uniform(jax.random.key(0), (1, 3, 512, 512, 1))
    variables = jax.jit(model.init)(jax.random.key(1, impl="rbg"), x)
    logits, aux = jax.jit(model.apply)(variables, x)
    assert logits.shape == (1, 512, 512, 3)
    assert np.isfinite(np.asarray(logits)).all()
    if arch == "convlstm":
        attention = np.asarray(aux["attention"])
        assert ((attention > 0) & (attention < 1)).all()
