"""A/B of the peeled first step in the PyTorch port (`cac_jax.torch_ref.ConvLSTM`), eager with
channels_last and under torch.compile, same weights and input (16 windows of 3 slices at 256
px), interleaved rounds (RUN.md).

    python benchmarks/results/bench_inf256_peeled/peel_ab_torch.py
"""

from __future__ import annotations

import json
import pathlib
import sys
import time

import jax
import numpy as np
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[3]))
from cac_jax import torch_ref  # noqa: E402
from cac_jax.config_defaults import get_base_config  # noqa: E402
from cac_jax.models import build_model  # noqa: E402
from cac_jax.torch_ref import from_flax  # noqa: E402

PEELED = torch_ref.ConvLSTM.forward


def scan3_forward(self, x):
    """The port's ConvLSTM as it was: the hidden convolution on every step, the first included."""
    b, steps, c, h, w = x.shape
    x_gates = self.input_conv(x.reshape(b * steps, c, h, w)).reshape(b, steps, -1, h, w)
    cell = x.new_zeros((b, self.hidden, h, w))
    hid = x.new_zeros((b, self.hidden, h, w))
    outs = [None] * steps
    for t in range(steps - 1, -1, -1) if self.reverse else range(steps):
        gates = x_gates[:, t] + self.cell.hidden_conv(hid)
        i, f, g, o = torch.chunk(gates, 4, dim=1)
        cell = torch.sigmoid(f) * cell + torch.sigmoid(i) * torch.tanh(g)
        hid = torch.sigmoid(o) * torch.tanh(cell)
        outs[t] = hid
    return torch.stack(outs, dim=1)


def main(rounds: int = 7, size: int = 256, batch: int = 16) -> None:
    torch.set_num_threads(2)
    config = get_base_config("calcium", "convlstm")
    config.model.conv_impl = "xla"
    model = build_model(config)
    x = np.random.default_rng(0).uniform(size=(batch, 3, size, size, 1)).astype(np.float32)
    params = jax.jit(model.init)(jax.random.key(1), x[:1])["params"]
    xt = torch.from_numpy(np.ascontiguousarray(x[..., 0])).contiguous(
        memory_format=torch.channels_last)
    models = {}
    for name, forward in (("peeled", PEELED), ("scan3", scan3_forward)):
        m = from_flax(config, params).eval().to(memory_format=torch.channels_last)
        models[f"eager_{name}"] = (m, forward)
        models[f"compile_{name}"] = (torch.compile(m), forward)
    times = {name: [] for name in models}
    outs = {}
    with torch.inference_mode():
        for name, (m, forward) in models.items():  # warm-up (torch.compile compiles here)
            torch_ref.ConvLSTM.forward = forward
            outs[name] = m(xt)[0].float().numpy()
        for _ in range(rounds):
            for name, (m, forward) in models.items():
                torch_ref.ConvLSTM.forward = forward
                start = time.perf_counter()
                m(xt)
                times[name].append(time.perf_counter() - start)
    torch_ref.ConvLSTM.forward = PEELED
    median = {name: float(np.median(t)) for name, t in times.items()}
    print(json.dumps(dict(median_s=median,
                          eager_speedup=median["eager_scan3"] / median["eager_peeled"],
                          compile_speedup=median["compile_scan3"] / median["compile_peeled"],
                          max_abs_diff_eager=float(np.abs(outs["eager_peeled"]
                                                          - outs["eager_scan3"]).max()),
                          times_s=times)))


if __name__ == "__main__":
    main()
