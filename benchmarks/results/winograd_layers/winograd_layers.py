"""Winograd F(2x2, 3x3) against oneDNN's direct algorithm, one convolution at a time (docs/onednn.md).

Every 3x3 'same' forward convolution shape of the full-width ConvLSTM at 256 px (16 windows of
3 slices), through the project's FFI targets under `jax.jit`, float32: `conv2d(..., winograd=
False)` (the direct algorithm) and `winograd=True` with the channel threshold set to 1 so Winograd
runs every shape. Rounds interleaved (direct, Winograd, direct, ...), the best of 5 calls per round
and the best of `rounds` rounds; the largest difference to XLA's convolution relative to the
largest output. Prints a markdown table.

    python benchmarks/results/winograd_layers/winograd_layers.py [rounds]
"""

from __future__ import annotations

import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from cac_jax.ops import onednn_conv

# (N, H, W, C_in, C_out): the ConvLSTM's 3x3 'same' convolutions at 256 px.
SHAPES = [(48, 128, 128, 32, 32), (16, 128, 128, 64, 32), (16, 128, 128, 96, 32),
          (48, 64, 64, 32, 64), (48, 64, 64, 64, 64), (16, 64, 64, 192, 64),
          (16, 32, 32, 64, 256), (48, 32, 32, 128, 128), (16, 32, 32, 192, 128),
          (48, 32, 32, 128, 256), (16, 32, 32, 384, 128), (16, 16, 16, 128, 512),
          (48, 16, 16, 256, 256), (48, 16, 16, 256, 512)]


def best_of(fn, x, w, calls=5):
    fn(x, w).block_until_ready()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn(x, w).block_until_ready()
        times.append(time.perf_counter() - start)
    return min(times)


def main(rounds: int = 3) -> None:
    if not onednn_conv.available():
        sys.exit("the oneDNN extension is not built (python -m cac_jax.ops.build)")
    onednn_conv.WINOGRAD_MIN_CHANNELS = 1
    pads = ((1, 1), (1, 1))
    direct = jax.jit(lambda x, w: onednn_conv.conv2d(x, w, (1, 1), pads, False))
    winograd = jax.jit(lambda x, w: onednn_conv.conv2d(x, w, (1, 1), pads, True))
    xla = jax.jit(lambda x, w: lax.conv_general_dilated(
        x, w, (1, 1), pads, dimension_numbers=("NHWC", "HWIO", "NHWC")))
    rng = np.random.default_rng(0)
    print("| (N, H, W, C_in, C_out) | direct ms | GFLOP/s | Winograd ms | direct / Winograd "
          "| rel. diff direct | rel. diff Winograd |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for n, h, wd, c, o in SHAPES:
        x = jnp.asarray(rng.standard_normal((n, h, wd, c), np.float32))
        w = jnp.asarray(rng.standard_normal((3, 3, c, o), np.float32) / np.sqrt(9 * c))
        ref = np.asarray(xla(x, w))
        scale = float(np.abs(ref).max())
        diff = [float(np.abs(np.asarray(f(x, w)) - ref).max()) / scale for f in (direct, winograd)]
        t_direct = t_wino = float("inf")
        for _ in range(rounds):
            t_direct = min(t_direct, best_of(direct, x, w))
            t_wino = min(t_wino, best_of(winograd, x, w))
        gflop = 2 * n * h * wd * c * o * 9 / 1e9
        print(f"| {(n, h, wd, c, o)} | {t_direct * 1e3:.1f} | {gflop / t_direct:.0f} | "
              f"{t_wino * 1e3:.1f} | {t_direct / t_wino:.2f} | {diff[0]:.1e} | {diff[1]:.1e} |",
              flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 3)
