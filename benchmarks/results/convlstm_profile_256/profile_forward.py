"""Where the JAX ConvLSTM's forward spends its time: a `jax.profiler` trace of the compiled
forward (the full-width calcium model `cac-jax bench` times, 16 windows of 3 slices at 256 px),
each XLA:CPU thunk's time summed over 3 forwards, and per oneDNN convolution its shape, GFLOP and
GFLOP/s (RUN.md).

    python benchmarks/results/convlstm_profile_256/profile_forward.py [onednn|xla] [OUT_DIR]
"""

from __future__ import annotations

import collections
import pathlib
import re
import sys
import tempfile
import time

import jax
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[3]))
from cac_jax.config_defaults import get_base_config  # noqa: E402
from cac_jax.models import build_model  # noqa: E402

ROUNDS = 3


def thunk_times(trace_dir: str) -> collections.Counter:
    """Milliseconds per forward of each XLA thunk (by HLO name) in the trace's host plane."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    path, = pathlib.Path(trace_dir).glob("plugins/profile/*/*.xplane.pb")
    space = xplane_pb2.XSpace()
    space.ParseFromString(path.read_bytes())
    plane, = [p for p in space.planes if p.name == "/host:CPU"]
    times = collections.Counter()
    for line in plane.lines:
        if not line.name.startswith("tf_XLA"):
            continue
        for event in line.events:
            name = plane.event_metadata[event.metadata_id].name
            if not name.startswith("ThunkExecutor"):
                times[name] += event.duration_ps / 1e9 / ROUNDS
    return times


CONV = re.compile(r"%(ffi_call\.\d+) = f32\[(\d+),(\d+),(\d+),(\d+)\].*?custom_call_target="
                  r"\"cac_onednn_conv_forward\".*?operand_layout_constraints=\{f32\[[\d,]+\]"
                  r"\{[\d,]+\}, f32\[(\d+),(\d+),(\d+),(\d+)\]")


def main(impl: str = "onednn", out: str | None = None) -> None:
    config = get_base_config("calcium", "convlstm")
    config.model.conv_impl = impl
    model = build_model(config)
    x = jax.random.uniform(jax.random.key(0), (16, 3, 256, 256, 1))
    variables = jax.jit(model.init)(jax.random.key(1), x[:1])
    forward = jax.jit(lambda v, x: model.apply(v, x)[0]).lower(variables, x).compile()
    for _ in range(2):
        forward(variables, x).block_until_ready()
    untraced = []
    for _ in range(ROUNDS):
        t0 = time.perf_counter()
        forward(variables, x).block_until_ready()
        untraced.append(time.perf_counter() - t0)
    trace_dir = out or tempfile.mkdtemp()
    with jax.profiler.trace(trace_dir):
        for _ in range(ROUNDS):
            forward(variables, x).block_until_ready()
    times = thunk_times(trace_dir)
    hlo = forward.as_text()
    print(f"forward ({impl}), untraced median {1e3 * np.median(untraced):.0f} ms")
    rows = []
    for m in CONV.finditer(hlo):
        n, h, w, o = map(int, m.group(2, 3, 4, 5))
        kh, kw, c, _ = map(int, m.group(6, 7, 8, 9))
        gflop = 2 * n * h * w * o * c * kh * kw / 1e9
        rows.append((times.get(m.group(1), 0.0), m.group(1), (n, h, w, c, o), gflop))
    conv_ms = sum(r[0] for r in rows)
    other = {k: v for k, v in times.items() if not k.startswith("ffi_call")}
    print(f"thunks summed over threads: convolutions {conv_ms:.0f} ms ({sum(r[3] for r in rows):.1f}"
          f" GFLOP), everything else {sum(other.values()):.0f} ms per forward")
    print("\n| convolution | (N, H, W, C_in, C_out) | GFLOP | ms | GFLOP/s |\n|---|---|---:|---:|---:|")
    for ms, name, shape, gflop in sorted(rows, reverse=True):
        print(f"| {name} | {shape} | {gflop:.2f} | {ms:.1f} | {gflop / ms * 1e3 if ms else 0:.0f} |")
    print("\n| other thunk | ms |\n|---|---:|")
    for name, ms in sorted(other.items(), key=lambda t: -t[1])[:15]:
        print(f"| {name} | {ms:.2f} |")


if __name__ == "__main__":
    main(*sys.argv[1:])
