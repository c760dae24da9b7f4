"""The UNet's 2x2 stride-2 transposed convolution through oneDNN (RUN.md).

The layer is the input gradient of a stride-2 2x2 convolution (the extension's backward-data
call), and its gradients are that convolution's forward and weight gradient, so the extension's
three calls run it with no new kernel. Timed against `TransposedConv2x2`'s matmul in XLA at the
UNets' upsampling shapes (256 px, batch 2): forward and both gradients in one jit-compiled
`jax.vjp`, the two variants alternating, 10 timed rounds each.

    python benchmarks/results/onednn_probes_avx2/tconv_probe.py
"""

from __future__ import annotations

import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[3]))
from cac_jax.ops import onednn_conv as oc  # noqa: E402

NO_PADS = ((0, 0), (0, 0))
# (N, H, W, in, out): the width-matched UNet's four upsamplings, then UNet-64's first and last.
SHAPES = [(2, 16, 16, 384, 192), (2, 32, 32, 192, 96), (2, 64, 64, 96, 48), (2, 128, 128, 48, 24),
          (2, 16, 16, 1024, 512), (2, 128, 128, 128, 64)]


def as_conv_kernel(kernel):
    """flax's (2, 2, in, out) transposed kernel -> the stride-2 convolution's HWIO (2, 2, out, in)."""
    return kernel[::-1, ::-1].transpose(0, 1, 3, 2)


@jax.custom_vjp
def tconv(x, kernel):
    n, h, w, _ = x.shape
    return oc._backward_data(x, as_conv_kernel(kernel), (2 * h, 2 * w), (2, 2), NO_PADS)


def tconv_fwd(x, kernel):
    return tconv(x, kernel), (x, kernel)


def tconv_bwd(residuals, dy):
    x, kernel = residuals
    conv_kernel = as_conv_kernel(kernel)
    dx = oc._forward(dy, conv_kernel, (2, 2), NO_PADS)
    d_conv_kernel = oc._backward_weights(dy, x, (2, 2), (2, 2), NO_PADS)
    return dx, d_conv_kernel.transpose(0, 1, 3, 2)[::-1, ::-1]


tconv.defvjp(tconv_fwd, tconv_bwd)


def matmul(x, kernel):
    """`TransposedConv2x2` without its bias (cac_jax/models/layers.py)."""
    n, h, w, _ = x.shape
    y = jnp.einsum("nhwc,abco->nhawbo", x, kernel[::-1, ::-1])
    return y.reshape(n, 2 * h, 2 * w, kernel.shape[-1])


def with_gradients(layer):
    def run(x, kernel, dy):
        y, vjp = jax.vjp(layer, x, kernel)
        return y, *vjp(dy)
    return jax.jit(run)


def main() -> None:
    assert oc.available(), "the oneDNN extension is not built (make setup)"
    rng = np.random.default_rng(0)
    for n, h, w, c, o in SHAPES:
        x = jnp.asarray(rng.standard_normal((n, h, w, c), np.float32))
        kernel = jnp.asarray(rng.standard_normal((2, 2, c, o), np.float32) / np.sqrt(c))
        dy = jnp.asarray(rng.standard_normal((n, 2 * h, 2 * w, o), np.float32))

        variants = {"xla": with_gradients(matmul), "onednn": with_gradients(tconv)}
        outs = {name: f(x, kernel, dy) for name, f in variants.items()}
        err = max(float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(a)))
                  for a, b in zip(outs["xla"], outs["onednn"]))
        times = {name: [] for name in variants}
        for r in range(12):
            for name in ("xla", "onednn") if r % 2 else ("onednn", "xla"):
                start = time.perf_counter()
                jax.block_until_ready(variants[name](x, kernel, dy))
                times[name].append(time.perf_counter() - start)
        xla, onednn = (np.median(times[name][2:]) for name in ("xla", "onednn"))
        print(f"{(n, h, w, c, o)}: XLA {1e3 * xla:.2f} ms, oneDNN {1e3 * onednn:.2f} ms, "
              f"speed-up {xla / onednn:.2f}x, max relative difference {err:.1e}", flush=True)


if __name__ == "__main__":
    main()
