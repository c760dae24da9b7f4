"""A/B: the JAX ConvLSTM's forward with the peeled first step (the current code) against the scan
over all 3 steps (the code before), same parameters and input, interleaved rounds (RUN.md).

    python benchmarks/results/bench_inf256_peeled/peel_ab.py onednn|xla
"""

from __future__ import annotations

import json
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[3]))
from cac_jax.config_defaults import get_base_config  # noqa: E402
from cac_jax.models import attention, build_model  # noqa: E402
from cac_jax.models import convlstm as cl  # noqa: E402


class Scan3ConvLSTM(cl.ConvLSTM):
    """The layer as it was: the cell scanned over all 3 steps from the zero state."""

    @nn.compact
    def __call__(self, x, windows=None):
        batch, steps, height, width, channels = x.shape
        x_gates = nn.Conv(4 * self.hidden, self.kernel_size, padding="SAME", use_bias=True,
                          kernel_init=cl.kaiming_normal, dtype=self.dtype,
                          param_dtype=self.param_dtype,
                          conv_general_dilated=cl.conv_impl_fn(self.conv_impl),
                          name="input_conv")(x.reshape(-1, height, width, channels))
        x_gates = x_gates.reshape(batch, steps, height, width, 4 * self.hidden)
        scan_cell = nn.scan(cl.ConvLSTMCell, variable_broadcast="params",
                            split_rngs={"params": False}, in_axes=1, out_axes=1,
                            reverse=self.reverse, unroll=cl.NUM_SLICES)
        carry = (jnp.zeros((batch, height, width, self.hidden), jnp.float32),
                 jnp.zeros((batch, height, width, self.hidden), self.dtype))
        _, hs = scan_cell(self.hidden, self.kernel_size, self.conv_impl, self.dtype,
                          self.param_dtype, name="cell")(carry, x_gates)
        return hs


def main(impl: str = "onednn", size: int = 256, batch: int = 16, rounds: int = 7) -> None:
    config = get_base_config("calcium", "convlstm")  # the full-width model cac-jax bench times
    config.model.conv_impl = impl
    model = build_model(config)
    x = jax.random.uniform(jax.random.key(0), (batch, 3, size, size, 1))
    variables = jax.jit(model.init)(jax.random.key(1), x[:1])
    fns = {}
    for name, layer in (("peeled", cl.ConvLSTM), ("scan3", Scan3ConvLSTM)):
        attention.ConvLSTM = layer  # traced under the patch, then restored
        fns[name] = jax.jit(lambda v, x: model.apply(v, x)[0]).lower(variables, x).compile()
    attention.ConvLSTM = cl.ConvLSTM
    outs = {name: np.asarray(fn(variables, x)) for name, fn in fns.items()}
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(variables, x))
            times[name].append(time.perf_counter() - start)
    median = {name: float(np.median(t)) for name, t in times.items()}
    print(json.dumps(dict(size=size, batch=batch, rounds=rounds, conv_impl=impl, median_s=median,
                          speedup=median["scan3"] / median["peeled"],
                          max_abs_diff=float(np.abs(outs["peeled"] - outs["scan3"]).max()),
                          times_s=times)))


if __name__ == "__main__":
    main(*sys.argv[1:2])
