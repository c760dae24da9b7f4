"""The layers written for XLA:CPU against flax's own, side by side: alone and inside the models.

    python benchmarks/bench_layer_rewrites.py            # 512 px forward (batch 4), 256 px gradient (batch 2)
    python benchmarks/bench_layer_rewrites.py --quick    # 64 px, tiny models, 1 round: checks the script

`cac_jax.models.layers` writes three layers differently from flax, with the same parameters and
outputs (tests/test_models.py): the UNet's 2x2 stride-2 upsampling (`TransposedConv2x2`: a matmul
and a pixel shuffle, for `nn.ConvTranspose`), the 1x1 heads (`Conv1x1`: a channel matmul, for
`nn.Conv`) and max pooling (`max_pool2x`: reshape + max, for `nn.max_pool`'s `reduce_window`).
This times each against flax's layer alone at the shapes where UNet-64 uses it (forward, and the
gradient of a random projection of the output), then whole models built with flax's layers
against ours (the model code's layer names swapped while it is traced): forward at `--size`,
`--batch` (a `cac-jax bench` sample) and the gradient of a loss on all outputs at
`--grad-size`, `--grad-batch`. Rounds interleave flax's and ours; medians; float32.

Writes benchmarks/results/bench_layer_rewrites.json and .md (atomically; `--out DIR` elsewhere).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

import cac_jax.models.attention as attention_mod
import cac_jax.models.unet as unet_mod
from cac_jax.benchmark import BenchSettings, load_config, machine_info, matmul_peak_gflops
from cac_jax.models import build_model
from cac_jax.models.layers import (
    Conv1x1,
    TransposedConv2x2,
    kaiming_normal,
    kaiming_normal_transposed,
    max_pool2x,
)
from data_pipeline.atomic import atomic_write_text

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def flax_upsample(features, dtype=jnp.float32, param_dtype=jnp.float32, name=None):
    """flax's layer that `TransposedConv2x2` replaces."""
    return nn.ConvTranspose(features, (2, 2), strides=(2, 2),
                            kernel_init=kaiming_normal_transposed((2, 2)), dtype=dtype,
                            param_dtype=param_dtype, name=name)


def flax_conv1x1(features, dtype, param_dtype, name=None, use_bias=True):
    """flax's layer that `Conv1x1` replaces."""
    return nn.Conv(features, (1, 1), use_bias=use_bias, kernel_init=kaiming_normal, dtype=dtype,
                   param_dtype=param_dtype, name=name)


def flax_max_pool(x):
    """flax's pooling that `max_pool2x` replaces."""
    return nn.max_pool(x, (2, 2), strides=(2, 2))


@contextlib.contextmanager
def flax_layers():
    """While tracing: the models' module-level layer names point at flax's layers."""
    saved = [(unet_mod, "TransposedConv2x2", unet_mod.TransposedConv2x2),
             (unet_mod, "max_pool2x", unet_mod.max_pool2x), (unet_mod, "conv1x1", unet_mod.conv1x1),
             (attention_mod, "conv1x1", attention_mod.conv1x1)]
    unet_mod.TransposedConv2x2 = flax_upsample
    unet_mod.max_pool2x = flax_max_pool
    unet_mod.conv1x1 = attention_mod.conv1x1 = flax_conv1x1
    try:
        yield
    finally:
        for module, name, value in saved:
            setattr(module, name, value)


def _grad_fn(apply, cotangent_seed: int = 0):
    """Gradient w.r.t. (params, input) of a random projection of apply's output."""
    def loss(params, x):
        y = apply(params, x)
        y = y[0] if isinstance(y, tuple) else y
        return jnp.sum(y * jax.random.normal(jax.random.key(cotangent_seed), y.shape, y.dtype))
    return jax.grad(loss, argnums=(0, 1))


def _interleaved(fns: dict, args, rounds: int) -> dict:
    """Median seconds of each compiled fn, rounds interleaved; and the largest relative difference."""
    outs = {name: jax.block_until_ready(fn(*args)) for name, fn in fns.items()}
    first, second = outs.values()
    diff = max(float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(a)) + 1e-30)) for a, b in
               zip(jax.tree.leaves(first), jax.tree.leaves(second)))
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[name].append(time.perf_counter() - start)
    res = {f"{name}_s": float(np.median(t)) for name, t in times.items()}
    res["times_s"] = times
    res["speedup"] = res["flax_s"] / res["ours_s"]
    res["max_rel_diff"] = diff
    return res


def layer_cases(size: int, batch: int, base: int) -> list[tuple[str, object, object, tuple]]:
    """(what, flax's layer, ours, input shape) at UNet's shapes for this size and base width."""
    cases = []
    for level in range(4):
        h, c = size // 2 ** (level + 1), base * 2 ** (level + 1)
        cases.append((f"upsample {c} -> {c // 2} at {h} -> {2 * h} px", flax_upsample(c // 2),
                      TransposedConv2x2(c // 2), (batch, h, h, c)))
    cases.append((f"head 1x1 {base} -> 3 at {size} px",
                  flax_conv1x1(3, jnp.float32, jnp.float32), Conv1x1(3), (batch, size, size, base)))
    for level in range(2):
        h, c = size // 2 ** level, base * 2 ** level
        cases.append((f"max pool {c} channels at {h} px", flax_max_pool, max_pool2x,
                      (batch, h, h, c)))
    return cases


def run(args) -> dict:
    rng = np.random.default_rng(0)
    res = {"machine": machine_info(("jax",)), "args": vars(args) | {"out": str(args.out)},
           "matmul_peak_gflops": [matmul_peak_gflops()], "layers": [], "models": {}}
    base = 8 if args.local else 64
    for what, theirs, ours, shape in layer_cases(args.size, args.batch, base):
        x = jnp.asarray(rng.standard_normal(shape, np.float32))
        if isinstance(ours, nn.Module):
            params = ours.init(jax.random.key(1), x)
            apply_f, apply_o = theirs.apply, ours.apply
        else:
            params = {}
            apply_f, apply_o = (lambda p, x, f=theirs: f(x)), (lambda p, x, f=ours: f(x))
        row = {"layer": what, "input": list(shape)}
        for kind, make in (("forward", lambda f: f), ("gradient", _grad_fn)):
            fns = {name: jax.jit(make(f)).lower(params, x).compile()
                   for name, f in (("flax", apply_f), ("ours", apply_o))}
            row[kind] = _interleaved(fns, (params, x), args.rounds)
        res["layers"].append(row)
        print(f"{what}: forward {row['forward']['speedup']:.2f}x, gradient "
              f"{row['gradient']['speedup']:.2f}x", flush=True)
    settings = BenchSettings(local=args.local, size=args.size)
    for name in args.models:
        config = load_config(name, settings)
        model = build_model(config)
        entry = {}
        for kind, size, batch in (("forward", args.size, args.batch),
                                  ("gradient", args.grad_size, args.grad_batch)):
            x = jnp.asarray(rng.random((batch, 3, size, size, 1), np.float32))
            params = jax.jit(model.init)(jax.random.key(0, impl="rbg"), x[:1])
            lowered = {}
            for variant in ("flax", "ours"):
                # A new function object per variant: jit's trace cache must not hand one
                # variant's trace to the other.
                fn = (lambda p, x, m=model: m.apply(p, x)) if kind == "forward" else _grad_fn(
                    lambda p, x, m=model: m.apply(p, x))
                with flax_layers() if variant == "flax" else contextlib.nullcontext():
                    lowered[variant] = jax.jit(fn).lower(params, x)
            convs = {k: v.as_text().count("stablehlo.convolution") for k, v in lowered.items()}
            if convs["flax"] <= convs["ours"]:
                raise RuntimeError(f"{name}: flax's layers were not swapped in ({convs})")
            fns = {k: v.compile() for k, v in lowered.items()}
            entry[kind] = _interleaved(fns, (params, x), args.rounds) | {
                "size": size, "batch": batch, "convolutions_in_program": convs}
            print(f"{name} {kind} ({size} px, batch {batch}): flax {entry[kind]['flax_s']:.3f} s, "
                  f"ours {entry[kind]['ours_s']:.3f} s ({entry[kind]['speedup']:.2f}x)", flush=True)
        res["models"][name] = entry
    res["matmul_peak_gflops"].append(matmul_peak_gflops())
    return res


def markdown(res: dict) -> str:
    a, m = res["args"], res["machine"]
    peaks = ", ".join(f"{p:.0f}" for p in res["matmul_peak_gflops"])
    lines = [
        "# Layers written for XLA:CPU vs flax's layers",
        "",
        f"`python benchmarks/bench_layer_rewrites.py{' --quick' if a['quick'] else ''}`: float32, "
        f"median of {a['rounds']} interleaved rounds. Machine: {m['cpu_model']}, "
        f"{m['logical_cores']} logical cores, AVX-512 {'yes' if m['avx512'] else 'no'}, JAX "
        f"{m['jax']}; float32 matmul peak {peaks} GFLOP/s (before and after).",
        "",
        f"## Each layer alone (batch {a['batch']}; gradient: of a random projection of the "
        "output, w.r.t. parameters and input)",
        "",
        "| layer | input | forward flax / ours ms | speed-up | gradient flax / ours ms | speed-up |",
        "|---|---|---|---:|---|---:|",
    ]
    for r in res["layers"]:
        f, g = r["forward"], r["gradient"]
        lines.append(f"| {r['layer']} | {tuple(r['input'])} | {f['flax_s'] * 1e3:.1f} / "
                     f"{f['ours_s'] * 1e3:.1f} | {f['speedup']:.2f}x | {g['flax_s'] * 1e3:.1f} / "
                     f"{g['ours_s'] * 1e3:.1f} | {g['speedup']:.2f}x |")
    lines += ["", "## Whole models, flax's layers vs ours", "",
              "| model | pass | size, batch | flax s | ours s | speed-up | max difference / max value |",
              "|---|---|---|---:|---:|---:|---:|"]
    for name, entry in res["models"].items():
        for kind, r in entry.items():
            lines.append(f"| {name} | {kind} | {r['size']} px, {r['batch']} | {r['flax_s']:.3f} | "
                         f"{r['ours_s']:.3f} | {r['speedup']:.2f}x | {r['max_rel_diff']:.1e} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="unet64,unet_matched,convlstm",
                        type=lambda s: [m for m in s.split(",") if m])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--grad-size", type=int, default=256)
    parser.add_argument("--grad-batch", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local", action="store_true", help="the tiny :local model variants")
    parser.add_argument("--quick", action="store_true", help="64 px, tiny models, 1 round")
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.quick:
        args.size, args.grad_size, args.batch, args.grad_batch = 64, 64, 2, 2
        args.rounds, args.local = 1, True
    res = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "bench_layer_rewrites.json", json.dumps(res, indent=1))
    atomic_write_text(args.out / "bench_layer_rewrites.md", markdown(res))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
