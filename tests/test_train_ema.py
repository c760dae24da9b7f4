"""Parameter averaging (`train.ema_decay`, docs/training.md "Parameter averaging"): the step's
moving average, validation and checkpoints on it, an exact resume, and the config's refusals."""

from __future__ import annotations

import pathlib
import sys

import jax
import numpy as np
import pytest

pytest.importorskip("tensorflow_datasets")

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from test_train import (  # noqa: E402
    build_tiny_dataset,
    fixed_step_inputs,
    tiny_config,
)

from cac_jax import checkpoints as ckpt  # noqa: E402
from cac_jax import train as train_lib  # noqa: E402
from cac_jax.steps import eval_step, init_state  # noqa: E402

COMMON = dict(log_every=1, eval_every=2, checkpoint_every=2, ema_decay=0.5)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return build_tiny_dataset(tmp_path_factory.mktemp("ema_data"))


def leaves(tree) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_the_step_keeps_the_moving_average_and_validation_scores_it():
    config, model, tx, _, batch = fixed_step_inputs()
    config.train.ema_decay = 0.9
    state = init_state(config, model, tx, (1, 3, 32, 32, 1))
    assert state.ema_params is not None
    one = jax.local_devices()[:1]
    p_step = jax.pmap(lambda s, b, lr: train_lib.train_step(s, b, lr, model=model, tx=tx,
                                                            config=config),
                      axis_name=train_lib.AXIS, devices=one)
    feed = {k: v[None] for k, v in batch.items()}
    rate = train_lib._replicate(np.float32(1.0), one)
    s1 = p_step(train_lib._replicate(state, one), feed, rate)[0]
    s2 = train_lib._unreplicate(p_step(s1, feed, rate)[0])
    s1 = train_lib._unreplicate(s1)
    # The warm-up: decay min(0.9, (1 + n) / (10 + n)) at the run's n-th step.
    d1, d2 = 2 / 11, 3 / 12
    for p0, p1, p2, e2 in zip(leaves(state.params), leaves(s1.params), leaves(s2.params),
                              leaves(s2.ema_params), strict=True):
        e1 = d1 * p0 + (1 - d1) * p1
        np.testing.assert_allclose(e2, d2 * e1 + (1 - d2) * p2, rtol=1e-5, atol=1e-7)
    assert max(float(np.abs(a - b).max()) for a, b in zip(leaves(s2.params),
                                                          leaves(s2.ema_params))) > 1e-5

    p_eval = jax.pmap(lambda s, b: eval_step(s, b, model=model, config=config),
                      axis_name=train_lib.AXIS, devices=one)

    def sums(s):
        return float(train_lib._unreplicate(p_eval(train_lib._replicate(s, one), feed))[1][
            "loss_sum"])
    averaged = s2.replace(params=s2.ema_params, ema_params=None)
    raw = s2.replace(ema_params=None)
    assert sums(s2) == pytest.approx(sums(averaged), rel=1e-6)
    assert sums(s2) != pytest.approx(sums(raw), rel=1e-6)

    config.train.ema_decay = 0.0  # off: no average, the state as before the option existed
    assert init_state(config, model, tx, (1, 3, 32, 32, 1)).ema_params is None


def test_checkpoints_hand_the_average_to_inference_and_keep_the_parameters(data_dir, tmp_path,
                                                                           capsys):
    config = tiny_config("unet_heart", data_dir, steps=2, **COMMON)
    train_lib.train_and_evaluate(config, tmp_path / "run")
    template = init_state(config, train_lib.model_for_training(config),
                          train_lib.make_optimizer(config), (1, 3, 32, 32, 1))
    items = ckpt.restore_training(ckpt.make_manager(tmp_path / "run", config), template, 2)
    average, params = items["variables"]["params"], items["train_state"]["params"]
    assert max(float(np.abs(a - b).max()) for a, b in zip(leaves(average), leaves(params))) > 0
    # What inference, export and init_from read is the average.
    for a, b in zip(leaves(ckpt.load_trained(tmp_path / "run").variables["params"]),
                    leaves(average), strict=True):
        np.testing.assert_array_equal(a, b)
    # The average is part of the run's config: another decay is a different run.
    with pytest.raises(train_lib.ConfigError, match="train.ema_decay"):
        train_lib.train_and_evaluate(
            tiny_config("unet_heart", data_dir, steps=4, **{**COMMON, "ema_decay": 0.0}),
            tmp_path / "run")
    for bad in (1.0, -0.1):
        with pytest.raises(train_lib.ConfigError, match=r"ema_decay=.* must be in \[0, 1\)"):
            train_lib.check_config(tiny_config("unet_heart", data_dir, ema_decay=bad))


@pytest.mark.slow
def test_an_averaged_run_resumes_to_the_same_average(data_dir, tmp_path):
    straight = tmp_path / "straight"
    train_lib.train_and_evaluate(tiny_config("unet_heart", data_dir, steps=4, **COMMON),
                                 straight)
    resumed = tmp_path / "resumed"
    train_lib.train_and_evaluate(tiny_config("unet_heart", data_dir, steps=2, **COMMON), resumed)
    summary = train_lib.train_and_evaluate(
        tiny_config("unet_heart", data_dir, steps=4, **COMMON), resumed)
    assert summary["resumed_from"] == 2
    config = tiny_config("unet_heart", data_dir, steps=4, **COMMON)
    template = init_state(config, train_lib.model_for_training(config),
                          train_lib.make_optimizer(config), (1, 3, 32, 32, 1))
    a, b = (ckpt.restore_training(ckpt.make_manager(w, config), template, 4)
            for w in (straight, resumed))
    for item in ("variables", "train_state"):
        for x, y in zip(leaves(a[item]), leaves(b[item]), strict=True):
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7)
