"""Where the frameworks differ inside a forward pass: each model's convolutions, JAX vs PyTorch.

    python benchmarks/bench_layers.py                  # 512 px, a 4-slice sample (batch 4), 3 models
    python benchmarks/bench_layers.py --models convlstm --size 256 --batch 2
    python benchmarks/bench_layers.py --quick          # 64 px, tiny models, 1 round: checks the script
    python benchmarks/bench_layers.py --backward --size 256   # also both gradients of each convolution

For each model (the configs `cac-jax bench` uses, float32, untrained weights): the convolutions of
the forward pass are read from its jaxpr at the sample's shape (every `conv_general_dilated`; one
inside the ConvLSTM's slice scan counts once per step), grouped by shape, and each distinct
convolution is timed on its own: JAX under `jit` (XLA:CPU) against PyTorch's `F.conv2d` on
`channels_last` tensors under `inference_mode` (oneDNN), same input, same threads. A stride-2
convolution with XLA's asymmetric SAME padding (0 before, 1 after) is timed in PyTorch with
`padding=1`, the same output size and the same work. The whole forward is timed in both
frameworks too (the JAX model under `jit`, `cac_jax.torch_ref` with the same weights in
`channels_last` + `inference_mode`, the best variant of `cac-jax bench` on CPU); where the oneDNN
extension is built (docs/onednn.md) each convolution is also timed through it from JAX
(`cac_jax.ops.onednn_conv`, the `jax_onednn` variant's kernels: "oneDNN (FFI)"); what is not a
convolution (normalisation, activations, concatenations, upsampling and pooling, the LSTM gates,
heads) is the whole minus the convolutions' sum. Timing rounds are interleaved (JAX, PyTorch,
JAX, ...) and medians reported, with a float32 matmul peak measured in the same run, so the ratios
hold on a machine whose speed varies.

With `--backward`, each convolution's two gradients are timed too: the input gradient and the
weight gradient of JAX calling oneDNN through XLA FFI (`cac_jax.ops.onednn_conv`, what training
runs) against PyTorch's (`torch.nn.grad.conv2d_input` / `conv2d_weight` on `channels_last`
tensors: the kernels its autograd calls), interleaved, with a table per model ("which backward
kernel is slower"). Needs the extension.

Writes benchmarks/results/bench_layers.json and .md (atomically; `--out DIR` to write elsewhere).
Needs the `torch` extra (`pip install -e .[torch]`).
"""

from __future__ import annotations

import argparse
import collections
import json
import pathlib
import sys
import time

import numpy as np

from cac_jax.benchmark import (
    MODEL_CONFIGS,
    BenchSettings,
    JaxModel,
    TorchModel,
    machine_info,
    matmul_peak_gflops,
    threads,
)
from data_pipeline.atomic import atomic_write_text

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def _sub_jaxprs(eqn):
    """(jaxpr, multiplicity) of every jaxpr nested in an equation's parameters."""
    times = int(eqn.params.get("length", 1)) if eqn.primitive.name == "scan" else 1
    for value in eqn.params.values():
        for item in value if isinstance(value, (tuple, list)) else (value,):
            inner = getattr(item, "jaxpr", item)
            if hasattr(inner, "eqns"):
                yield inner, times


def model_convolutions(jaxpr, times: int = 1, found=None) -> collections.Counter:
    """Count the convolutions of a jaxpr by (lhs NHWC, kernel HWIO, strides, padding, dilations)."""
    found = collections.Counter() if found is None else found
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in ("cond", "while"):  # branches or trip counts: not countable here
            raise ValueError(f"{eqn.primitive.name} in the model: its convolutions cannot be counted")
        if eqn.primitive.name == "conv_general_dilated":
            p = eqn.params
            lhs_spec, rhs_spec, _ = p["dimension_numbers"]
            lhs, rhs = eqn.invars[0].aval.shape, eqn.invars[1].aval.shape
            n, c, h, w = (lhs[i] for i in lhs_spec)  # the spec lists batch, feature, spatial dims
            out_c, in_c, kh, kw = (rhs[i] for i in rhs_spec)
            if p["feature_group_count"] != 1 or p["batch_group_count"] != 1:
                raise ValueError(f"grouped convolution not supported: {eqn}")
            key = ((n, h, w, c), (kh, kw, in_c, out_c), tuple(p["window_strides"]),
                   tuple(tuple(pad) for pad in p["padding"]), tuple(p["lhs_dilation"]),
                   tuple(p["rhs_dilation"]))
            found[key] += times
        for inner, mult in _sub_jaxprs(eqn):
            model_convolutions(inner, times * mult, found)
    return found


def conv_flops(key) -> float:
    """Multiply-adds x 2 of one convolution (lhs dilation: the taps that meet real inputs only)."""
    (n, h, w, c), (kh, kw, _, out_c), strides, padding, lhs_dil, _ = key
    hd, wd = (h - 1) * lhs_dil[0] + 1, (w - 1) * lhs_dil[1] + 1
    ho = (hd + sum(padding[0]) - kh) // strides[0] + 1
    wo = (wd + sum(padding[1]) - kw) // strides[1] + 1
    return 2.0 * n * ho * wo * kh * kw * c * out_c / (lhs_dil[0] * lhs_dil[1])


def _seconds(fn, *args) -> float:
    """Wall time of one call."""
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def time_convolution(key, rounds: int, seed: int = 0, backward: bool = False) -> dict:
    """JAX and PyTorch channels_last time of one convolution, interleaved rounds; with the oneDNN
    extension built, also JAX calling oneDNN through XLA FFI (`onednn_s`); with `backward`, the
    input and weight gradients through oneDNN (FFI) and PyTorch (`*_dx_s`, `*_dw_s`)."""
    import jax
    import torch
    import torch.nn.functional as F

    from cac_jax.ops import onednn_conv

    (n, h, w, c), (kh, kw, in_c, out_c), strides, padding, lhs_dil, rhs_dil = key
    if lhs_dil != (1, 1):
        raise ValueError(f"input-dilated (transposed) convolution not timed: {key}")
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, h, w, c), np.float32)
    k = (rng.standard_normal((kh, kw, in_c, out_c)) / np.sqrt(kh * kw * in_c)).astype(np.float32)
    fn = jax.jit(lambda x, k: jax.lax.conv_general_dilated(
        x, k, strides, padding, rhs_dilation=rhs_dil, dimension_numbers=("NHWC", "HWIO", "NHWC")))
    xj, kj = jax.device_put(x), jax.device_put(k)
    y = jax.block_until_ready(fn(xj, kj))
    dnn = None
    if onednn_conv.available():
        dnn = jax.jit(lambda x, k: onednn_conv.conv_general_dilated(
            x, k, strides, padding, rhs_dilation=rhs_dil,
            dimension_numbers=("NHWC", "HWIO", "NHWC")))
        jax.block_until_ready(dnn(xj, kj))
    xt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
    wt = torch.from_numpy(k).permute(3, 2, 0, 1).contiguous(memory_format=torch.channels_last)
    # Same output size and work; symmetric padding where XLA's SAME is asymmetric (stride 2).
    pad = tuple((lo + hi + 1) // 2 for lo, hi in padding)
    with torch.inference_mode():
        yt = F.conv2d(xt, wt, stride=strides, padding=pad, dilation=rhs_dil)
        if tuple(yt.shape) != (y.shape[0], y.shape[3], y.shape[1], y.shape[2]):
            raise ValueError(f"PyTorch output {tuple(yt.shape)} does not match JAX's {y.shape}")
        jax_t, torch_t, dnn_t = [], [], []
        for _ in range(rounds):
            jax_t.append(_seconds(lambda: jax.block_until_ready(fn(xj, kj))))
            torch_t.append(_seconds(F.conv2d, xt, wt, None, strides, pad, rhs_dil))
            if dnn is not None:
                dnn_t.append(_seconds(lambda: jax.block_until_ready(dnn(xj, kj))))
    out = {"jax_s": float(np.median(jax_t)), "torch_s": float(np.median(torch_t))}
    if dnn_t:
        out["onednn_s"] = float(np.median(dnn_t))
    if backward:
        out.update(time_gradients(key, x, k, np.asarray(y), rounds, xt, wt, pad))
    return out


def time_gradients(key, x, k, y, rounds: int, xt, wt, pad) -> dict:
    """Input and weight gradient of one convolution: oneDNN through XLA FFI vs PyTorch's
    (`torch.nn.grad`, channels_last), interleaved rounds (seconds, medians)."""
    import jax
    import torch
    from torch.nn import grad as torch_grad

    from cac_jax.ops import onednn_conv

    if not onednn_conv.available():
        raise ValueError("--backward needs the oneDNN extension (python -m cac_jax.ops.build)")
    (_, h, w, _), (kh, kw, _, _), strides, padding, _, rhs_dil = key
    if rhs_dil != (1, 1):
        raise ValueError(f"dilated convolution: no oneDNN gradient to time: {key}")
    pads = tuple((int(lo), int(hi)) for lo, hi in padding)
    dy = np.random.default_rng(1).standard_normal(y.shape, np.float32)
    dx_fn = jax.jit(lambda dy, k: onednn_conv._backward_data(dy, k, (h, w), strides, pads))
    dw_fn = jax.jit(lambda x, dy: onednn_conv._backward_weights(x, dy, (kh, kw), strides, pads))
    xj, kj, dyj = jax.device_put(x), jax.device_put(k), jax.device_put(dy)
    jax.block_until_ready(dx_fn(dyj, kj))
    jax.block_until_ready(dw_fn(xj, dyj))
    dyt = torch.from_numpy(dy).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)

    def torch_dx():
        return torch_grad.conv2d_input(xt.shape, wt, dyt, strides, pad, rhs_dil)

    def torch_dw():
        return torch_grad.conv2d_weight(xt, wt.shape, dyt, strides, pad, rhs_dil)

    torch_dx(), torch_dw()  # warm-up (and a shape check: raises on a mismatch)
    times = {"onednn_dx_s": [], "torch_dx_s": [], "onednn_dw_s": [], "torch_dw_s": []}
    for _ in range(rounds):
        times["onednn_dx_s"].append(_seconds(lambda: jax.block_until_ready(dx_fn(dyj, kj))))
        times["torch_dx_s"].append(_seconds(torch_dx))
        times["onednn_dw_s"].append(_seconds(lambda: jax.block_until_ready(dw_fn(xj, dyj))))
        times["torch_dw_s"].append(_seconds(torch_dw))
    return {name: float(np.median(v)) for name, v in times.items()}


def run(args) -> dict:
    """Measure every model; returns the bench_layers.json dict."""
    import jax
    import torch

    torch.set_num_threads(threads())  # the same threads as XLA:CPU's pool
    settings = BenchSettings(models=tuple(args.models), frameworks=("jax", "torch"),
                             slices=args.batch, size=args.size, local=args.local)
    settings.check()
    rng = np.random.default_rng(0)
    x = rng.random((args.batch, 3, args.size, args.size, 1), np.float32)
    peaks = [matmul_peak_gflops()]
    res = {"machine": machine_info(("jax", "torch")), "size": args.size, "batch": args.batch,
           "rounds": args.rounds, "local": args.local, "backward": args.backward, "models": {}}
    for name in args.models:
        jm = JaxModel(name, settings)
        tm = TorchModel(jm, "torch_channels_last", settings)
        jm(x), tm(x)  # warm-up
        whole_jax, whole_torch = [], []
        for _ in range(args.rounds):
            whole_jax.append(_seconds(jm, x))
            whole_torch.append(_seconds(tm, x))
        closed = jax.make_jaxpr(jm.model.apply)(jm.variables, x)
        convs = model_convolutions(closed.jaxpr)
        rows = []
        for key, count in sorted(convs.items(), key=lambda kv: -conv_flops(kv[0]) * kv[1]):
            t = time_convolution(key, args.rounds, backward=args.backward)
            gflop = conv_flops(key) / 1e9
            rows.append({
                "input_nhwc": list(key[0]), "kernel_hwio": list(key[1]), "strides": list(key[2]),
                "padding": [list(p) for p in key[3]], "count": count, "gflop": gflop,
                "jax_s": t["jax_s"], "torch_s": t["torch_s"],
                "jax_gflops": gflop / t["jax_s"], "torch_gflops": gflop / t["torch_s"],
                "jax_over_torch_time": t["jax_s"] / t["torch_s"],
                **({"onednn_s": t["onednn_s"], "onednn_gflops": gflop / t["onednn_s"],
                    "onednn_over_torch_time": t["onednn_s"] / t["torch_s"]}
                   if "onednn_s" in t else {}),
                **{name: t[name] for name in ("onednn_dx_s", "torch_dx_s", "onednn_dw_s",
                                              "torch_dw_s") if name in t},
            })
            print(f"{name} {key[0]} -> {key[1][3]} stride {key[2][0]} x{count}: JAX "
                  f"{t['jax_s'] * 1e3:.1f} ms, PyTorch {t['torch_s'] * 1e3:.1f} ms", flush=True)
        conv_jax = sum(r["jax_s"] * r["count"] for r in rows)
        conv_torch = sum(r["torch_s"] * r["count"] for r in rows)
        fwd_jax, fwd_torch = float(np.median(whole_jax)), float(np.median(whole_torch))
        res["models"][name] = {
            "config": MODEL_CONFIGS[name], "convolutions": rows,
            "conv_gflop": sum(r["gflop"] * r["count"] for r in rows),
            "forward_s": {"jax": fwd_jax, "torch_channels_last": fwd_torch},
            "forward_times_s": {"jax": whole_jax, "torch_channels_last": whole_torch},
            "convolutions_s": {"jax": conv_jax, "torch_channels_last": conv_torch},
            "other_s": {"jax": fwd_jax - conv_jax, "torch_channels_last": fwd_torch - conv_torch},
            "jax_speedup_forward": fwd_torch / fwd_jax,
            "jax_speedup_convolutions": conv_torch / conv_jax,
        }
        peaks.append(matmul_peak_gflops())
    res["matmul_peak_gflops"] = peaks
    return res


def markdown(res: dict) -> str:
    m = res["machine"]
    peaks = ", ".join(f"{p:.0f}" for p in res["matmul_peak_gflops"])
    lines = [
        "# Convolutions inside the forward pass: JAX (XLA:CPU) vs PyTorch channels_last (oneDNN)",
        "",
        f"`python benchmarks/bench_layers.py --size {res['size']} --batch {res['batch']}"
        f"{' --local' if res['local'] else ''}`: float32, batch {res['batch']} (a "
        f"{res['batch']}-slice sample of `cac-jax bench`), {res['size']} px, median of "
        f"{res['rounds']} interleaved rounds. Machine: {m['cpu_model']}, {m['logical_cores']} "
        f"logical cores, AVX-512 {'yes' if m['avx512'] else 'no'}, {m['threads']} threads; "
        f"JAX {m['jax']}, PyTorch {m.get('torch')}; float32 matmul peak (JAX) {peaks} GFLOP/s "
        "(before the first model and after each).",
        "",
        "| model | forward JAX s | forward PyTorch s | JAX speed-up, forward | convolutions JAX s "
        "| convolutions PyTorch s | JAX speed-up, convolutions | rest JAX s | rest PyTorch s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in res["models"].items():
        lines.append(
            f"| {name} | {r['forward_s']['jax']:.3f} | {r['forward_s']['torch_channels_last']:.3f}"
            f" | {r['jax_speedup_forward']:.2f}x | {r['convolutions_s']['jax']:.3f} | "
            f"{r['convolutions_s']['torch_channels_last']:.3f} | "
            f"{r['jax_speedup_convolutions']:.2f}x | {r['other_s']['jax']:.3f} | "
            f"{r['other_s']['torch_channels_last']:.3f} |")
    lines += ["", "\"rest\": the forward minus its convolutions timed alone (normalisation, "
              "activations, concatenations, up/down-sampling, LSTM gates, heads).", ""]
    for name, r in res["models"].items():
        dnn = all("onednn_s" in c for c in r["convolutions"])
        extra = (" oneDNN (FFI) ms | oneDNN (FFI) / PyTorch time |", "---:|---:|") if dnn \
            else ("", "")
        lines += [f"## {name}", "",
                  "| input (N, H, W, C) | out C | kernel | stride | count | GFLOP each | JAX ms |"
                  " PyTorch ms | JAX GFLOP/s | PyTorch GFLOP/s | JAX / PyTorch time |" + extra[0],
                  "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|" + extra[1]]
        for c in r["convolutions"]:
            kh, kw, _, out_c = c["kernel_hwio"]
            lines.append(
                f"| {tuple(c['input_nhwc'])} | {out_c} | {kh}x{kw} | {c['strides'][0]} | "
                f"{c['count']} | {c['gflop']:.2f} | {c['jax_s'] * 1e3:.1f} | "
                f"{c['torch_s'] * 1e3:.1f} | {c['jax_gflops']:.0f} | {c['torch_gflops']:.0f} | "
                f"{c['jax_over_torch_time']:.2f} |"
                + (f" {c['onednn_s'] * 1e3:.1f} | {c['onednn_over_torch_time']:.2f} |"
                   if dnn else ""))
        lines.append("")
        grads = [c for c in r["convolutions"] if "onednn_dx_s" in c]
        if grads:
            lines += [f"### {name}: gradients, oneDNN through XLA FFI vs PyTorch (channels_last)",
                      "", "| input (N, H, W, C) | out C | stride | count | input grad FFI ms | "
                      "PyTorch ms | FFI / PyTorch | weight grad FFI ms | PyTorch ms | "
                      "FFI / PyTorch |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
            for c in grads:
                lines.append(
                    f"| {tuple(c['input_nhwc'])} | {c['kernel_hwio'][3]} | {c['strides'][0]} | "
                    f"{c['count']} | {c['onednn_dx_s'] * 1e3:.1f} | {c['torch_dx_s'] * 1e3:.1f} | "
                    f"{c['onednn_dx_s'] / c['torch_dx_s']:.2f} | {c['onednn_dw_s'] * 1e3:.1f} | "
                    f"{c['torch_dw_s'] * 1e3:.1f} | {c['onednn_dw_s'] / c['torch_dw_s']:.2f} |")
            total = {n: sum(c[n] * c["count"] for c in grads)
                     for n in ("onednn_dx_s", "torch_dx_s", "onednn_dw_s", "torch_dw_s")}
            lines += ["", f"All gradients, weighted by count: input gradient "
                      f"{total['onednn_dx_s']:.3f} s (FFI) vs {total['torch_dx_s']:.3f} s "
                      f"(PyTorch), weight gradient {total['onednn_dw_s']:.3f} s vs "
                      f"{total['torch_dw_s']:.3f} s.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=",".join(MODEL_CONFIGS),
                        type=lambda s: [m for m in s.split(",") if m])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4, help="windows per forward (slices)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local", action="store_true", help="the tiny :local model variants")
    parser.add_argument("--quick", action="store_true", help="64 px, tiny models, batch 2, 1 round")
    parser.add_argument("--backward", action="store_true",
                        help="also time each convolution's input and weight gradients (oneDNN FFI "
                             "vs PyTorch)")
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.quick:
        args.size, args.batch, args.rounds, args.local = 64, 2, 1, True
    res = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "bench_layers.json", json.dumps(res, indent=1))
    atomic_write_text(args.out / "bench_layers.md", markdown(res))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
