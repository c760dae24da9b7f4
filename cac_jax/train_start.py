"""Where a training run starts (docs/training.md, its "Faults" and "Fine-tuning" items).

- `resumed_state(items)`: the training state saved in a checkpoint's items (what
  `cac_jax.checkpoints.load_state_if_possible` restores), with parameter averaging undone: when
  `train.ema_decay` is on, the checkpoint's `variables` hold the average and its `train_state`
  the optimizer's own parameters;
- `warm_start_state(config, fresh, tx)`: a fresh run's state with the parameters of the trained
  model named by `train.init_from`, read by every host (one that cannot read it stops them all
  with one line) and checked to be the same step everywhere.
"""

from __future__ import annotations

import jax.numpy as jnp

from cac_jax import checkpoints as ckpt_lib
from cac_jax import distributed as dist
from cac_jax.steps import TrainState
from data_pipeline.errors import InputError


def resumed_state(items: dict) -> TrainState:
    """The TrainState held by a restored checkpoint's `variables` and `train_state` items."""
    v, ts = items["variables"], items["train_state"]
    ema = v["params"] if "params" in ts else None  # train.ema_decay: variables is the average
    return TrainState(step=jnp.asarray(ts["step"], jnp.int32),
                      params=v["params"] if ema is None else ts["params"],
                      batch_stats=v.get("batch_stats", {}), opt_state=ts["opt_state"],
                      ema_params=ema)


def warm_start_state(config, fresh: TrainState, tx) -> tuple[TrainState, dict]:
    """`fresh` with the parameters of the trained model `config.train.init_from`, a new optimizer
    state for them, and the record of where they came from (kept in every checkpoint's meta)."""
    variables = {"params": fresh.params}
    if fresh.batch_stats:
        variables["batch_stats"] = fresh.batch_stats
    source = str(config.train.init_from)
    # Every host must read the same model: one that cannot would leave the others waiting in the
    # restore's barrier.
    step_dir, problem = None, None
    try:
        step_dir = ckpt_lib.check_init_source(source)
    except InputError as err:
        problem = err
    if dist.any_process(problem is not None):
        raise problem or InputError(source, "train.init_from: another host cannot read this "
                                            "model; every host must see it")
    variables, record = ckpt_lib.warm_start_variables(step_dir, variables, config)
    dist.agree_on_step(record["step"], source)
    params = variables["params"]
    state = TrainState(step=fresh.step, params=params,
                       batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params),
                       ema_params=None if fresh.ema_params is None else params)
    return state, record
