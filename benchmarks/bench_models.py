"""ConvLSTM-attention vs UNet-64 vs width-matched UNet, side by side in one run (CPU by default).

    python benchmarks/bench_models.py                 # 512 px, the full study (~5 min on 2 cores)
    python benchmarks/bench_models.py --quick         # 256 px, fewer repeats, smaller step
    python benchmarks/bench_models.py --size 384 --repeats 5 --batch 2

For each model (configs/convlstm_calcium.py, configs/unet_calcium.py,
configs/unet_matched_calcium.py, float32): parameters; FLOPs per 512 x 512 sample (XLA
`cost_analysis` of the compiled forward); compiled memory of one training step (loss on logits
and, for the ConvLSTM, both aux branches; gradients; Adam update) at `--batch` (XLA
`memory_analysis`: temp + argument + output - aliased bytes); the peak resident memory of that
step, measured in a fresh subprocess per model (so models do not pollute each other) by sampling
RSS while the compiled step runs; the forward time per sample at batch 1 (jit, warm, median of
`--repeats` rounds); and the achieved GFLOP/s against a float32 matmul peak measured in the same
rounds. Timing rounds are interleaved (matmul, model A, model B, model C, matmul, ...) so that load
from other processes on a shared machine hits all models alike; report the ratios.

Writes benchmarks/results/bench_models.json and .md (atomically).

    python benchmarks/bench_models.py --groupnorm     # GroupNorm formulations side by side

`--groupnorm` times the GroupNorm of cac_jax/models/layers.py (`x * mult + shift` in float32)
against the centred alternative `(x - mean) * mult + bias` (also float32), forward and gradient,
float32 compute, at the ConvLSTM's encoder shapes (512 px input, 3 slices), in interleaved rounds,
and writes benchmarks/results/bench_groupnorm.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import resource
import subprocess
import sys
import threading
import time

from cac_jax.benchmark import MATMUL_N, matmul_peak_gflops

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"
MODELS = {
    "convlstm": "convlstm_calcium.py",
    "unet64": "unet_calcium.py",
    "unet_matched": "unet_matched_calcium.py",
}
# The paper's CPU inference medians (6.18 s ConvLSTM vs 10.1 s UNet) and training memory
# (13.11 GB vs 22.31 GB), Results section.
PAPER_SPEEDUP = 10.1 / 6.18
PAPER_MEMORY_RATIO = 13.11 / 22.31


def load_config(name: str, norm: str):
    """The experiment config of benchmark model `name`, float32 compute, chosen norm, XLA's
    convolutions (XLA's cost analysis counts no FLOPs in oneDNN's custom calls, docs/onednn.md)."""
    from cac_jax.config_defaults import load_config_file

    config = load_config_file(CONFIGS / MODELS[name])
    config.model.dtype = "float32"
    config.model.norm = norm
    config.model.conv_impl = "xla"
    return config


def build(name: str, norm: str, size: int, batch: int):
    """(model, variables) for benchmark model `name` on (batch, 3, size, size, 1) inputs."""
    import jax
    import jax.numpy as jnp

    from cac_jax.models import build_model

    model = build_model(load_config(name, norm))
    x = jnp.zeros((batch, 3, size, size, 1), jnp.float32)
    # rbg keys: XLA:CPU compiles threefry-based init several times more slowly.
    variables = jax.jit(model.init)(jax.random.key(0, impl="rbg"), x)
    return model, variables


def make_train_step(model, num_classes: int):
    """A training step: cross-entropy on logits (+ aux branches), grads, Adam; state donated."""
    import jax
    import jax.numpy as jnp
    import optax

    tx = optax.adam(1e-3)

    def loss_fn(params, other, x, labels):
        if other:  # BatchNorm: batch statistics are updated (and discarded here)
            (logits, aux), _ = model.apply({"params": params, **other}, x, train=True,
                                           mutable=list(other))
        else:
            logits, aux = model.apply({"params": params}, x, train=True)
        onehot = jax.nn.one_hot(labels, num_classes)

        def ce(z):
            return -jnp.mean(jnp.sum(jax.nn.log_softmax(z) * onehot, axis=-1))

        loss = ce(logits)
        for key in ("temporal", "spatial"):
            if key in aux:
                loss = loss + 0.5 * ce(aux[key])
        return loss

    def step(params, opt_state, other, x, labels):
        loss, grads = jax.value_and_grad(loss_fn)(params, other, x, labels)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return tx, jax.jit(step, donate_argnums=(0, 1))


def train_inputs(variables, tx, size: int, batch: int):
    """(params, opt_state, other collections, x, labels) for one training step."""
    import jax

    params = variables["params"]
    other = {k: v for k, v in variables.items() if k != "params"}
    x = jax.random.uniform(jax.random.key(1), (batch, 3, size, size, 1))
    labels = jax.random.randint(jax.random.key(2), (batch, size, size), 0, 3)
    return params, tx.init(params), other, x, labels


def memory_bytes(compiled) -> dict:
    """XLA's compiled memory breakdown (bytes)."""
    m = compiled.memory_analysis()
    out = {
        "temp": int(m.temp_size_in_bytes),
        "argument": int(m.argument_size_in_bytes),
        "output": int(m.output_size_in_bytes),
        "alias": int(getattr(m, "alias_size_in_bytes", 0)),
    }
    out["total"] = out["temp"] + out["argument"] + out["output"] - out["alias"]
    return out


def flops_of(compiled) -> float:
    """FLOPs from XLA's cost analysis (a dict, or a list of one dict in older JAX)."""
    cost = compiled.cost_analysis()
    if isinstance(cost, list):
        cost = cost[0]
    return float(cost["flops"])


def child_rss(name: str, norm: str, size: int, batch: int) -> dict:
    """In this (fresh) process: compile one training step, then run it while sampling RSS."""
    import jax
    import psutil

    proc = psutil.Process()
    model, variables = build(name, norm, size, batch)
    tx, step = make_train_step(model, int(load_config(name, norm).model.num_classes))
    args = train_inputs(variables, tx, size, batch)
    del variables
    compiled = step.lower(*args).compile()
    baseline = proc.memory_info().rss
    peak = [baseline]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    out = compiled(*args)
    jax.block_until_ready(out)
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    device_stats = {}
    if jax.default_backend() != "cpu":  # accelerator: the device's own peak, when it reports one
        stats = jax.devices()[0].memory_stats() or {}
        device_stats = {k: int(stats[k]) for k in ("peak_bytes_in_use", "bytes_in_use")
                        if k in stats}
    return {
        **{f"device_{k}": v for k, v in device_stats.items()},
        "rss_before_step_bytes": int(baseline),
        "rss_peak_during_step_bytes": int(peak[0]),
        "rss_step_increase_bytes": int(peak[0] - baseline),
        "ru_maxrss_bytes": int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024),
        "train_step_s": seconds,
    }


def measure_rss(name: str, norm: str, size: int, batch: int) -> dict:
    """Run `child_rss` in a subprocess and return its JSON line."""
    cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), "--child", name, "--norm", norm,
           "--size", str(size), "--batch", str(batch)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"RSS child for {name} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(args) -> dict:
    """The whole side-by-side study; returns the results dict."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from cac_jax.models import count_params

    names = list(MODELS)
    results = {name: {} for name in names}
    compiled_fwd, inputs = {}, {}
    for name in names:
        print(f"[{name}] building and compiling", flush=True)
        model, variables = build(name, args.norm, args.size, 1)
        r = results[name]
        r["params"] = count_params(variables["params"])
        fwd = jax.jit(lambda v, x, m=model: m.apply(v, x)[0])
        x512 = jax.ShapeDtypeStruct((1, 3, 512, 512, 1), jnp.float32)
        r["gflop_per_512_sample"] = flops_of(fwd.lower(variables, x512).compile()) / 1e9
        x = jax.random.uniform(jax.random.key(3), (1, 3, args.size, args.size, 1))
        compiled = fwd.lower(variables, x).compile()
        r["gflop_per_sample_at_size"] = flops_of(compiled) / 1e9
        jax.block_until_ready(compiled(variables, x))  # warm-up
        compiled_fwd[name], inputs[name] = compiled, (variables, x)

        tx, step = make_train_step(model, int(load_config(name, args.norm).model.num_classes))
        train_args = train_inputs(variables, tx, args.size, args.batch)
        r["train_step_compiled_memory"] = memory_bytes(step.lower(*train_args).compile())
        del train_args

    # Interleaved timing rounds: matmul peak, then each model's forward pass (batch 1).
    matmul_gflops, times = [], {name: [] for name in names}
    for round_index in range(args.repeats):
        print(f"timing round {round_index + 1}/{args.repeats}", flush=True)
        # The matmul is short (~0.1 s): several samples per round.
        matmul_gflops.append(matmul_peak_gflops(repeats=3))
        for name in names:
            start = time.perf_counter()
            jax.block_until_ready(compiled_fwd[name](*inputs[name]))
            times[name].append(time.perf_counter() - start)
    peak = float(np.median(matmul_gflops))
    for name in names:
        r = results[name]
        r["forward_s_per_sample"] = float(np.median(times[name]))
        r["forward_s_all"] = times[name]
        r["gflops_per_s"] = r["gflop_per_sample_at_size"] / r["forward_s_per_sample"]
        r["fraction_of_matmul_peak"] = r["gflops_per_s"] / peak

    if not args.skip_rss:
        for name in names:
            print(f"[{name}] peak RSS of a training step (subprocess)", flush=True)
            results[name]["train_step_rss"] = measure_rss(name, args.norm, args.size, args.batch)

    c, u, m = results["convlstm"], results["unet64"], results["unet_matched"]
    ratios = {
        "speedup_vs_unet64": u["forward_s_per_sample"] / c["forward_s_per_sample"],
        "speedup_vs_unet_matched": m["forward_s_per_sample"] / c["forward_s_per_sample"],
        "flops_ratio_vs_unet64": c["gflop_per_512_sample"] / u["gflop_per_512_sample"],
        "params_ratio_vs_unet64": c["params"] / u["params"],
        "compiled_train_memory_ratio_vs_unet64": (
            c["train_step_compiled_memory"]["total"] / u["train_step_compiled_memory"]["total"]),
        "compiled_train_memory_ratio_vs_unet_matched": (
            c["train_step_compiled_memory"]["total"] / m["train_step_compiled_memory"]["total"]),
    }
    if not args.skip_rss:
        ratios["rss_train_step_increase_ratio_vs_unet64"] = (
            c["train_step_rss"]["rss_step_increase_bytes"]
            / u["train_step_rss"]["rss_step_increase_bytes"])
        ratios["rss_train_peak_ratio_vs_unet64"] = (
            c["train_step_rss"]["rss_peak_during_step_bytes"]
            / u["train_step_rss"]["rss_peak_during_step_bytes"])
    return {
        "command": "python benchmarks/bench_models.py " + " ".join(sys.argv[1:]),
        "settings": {"size": args.size, "batch": args.batch, "repeats": args.repeats,
                     "norm": args.norm, "dtype": "float32"},
        "machine": {"backend": jax.default_backend(), "devices": str(jax.devices()),
                    "cpu_count": os.cpu_count(), "platform": platform.platform(),
                    "load_average_at_end": os.getloadavg(), "jax": jax.__version__},
        "matmul_peak_gflops": peak,
        "matmul_gflops_all": matmul_gflops,
        "models": results,
        "ratios": ratios,
        "paper": {"cpu_speedup": PAPER_SPEEDUP, "training_memory_ratio": PAPER_MEMORY_RATIO},
    }


# The ConvLSTM encoder's GroupNorm inputs at 512 px: 3 slices, stages at H/2 .. H/16.
GROUPNORM_SHAPES = ((3, 256, 256, 32), (3, 128, 128, 64), (3, 64, 64, 128), (3, 32, 32, 256))


def centred_group_norm(x, scale, bias, num_groups: int, epsilon: float = 1e-6):
    """The centred alternative, (x - mean) * mult + bias in float32: the benchmark's baseline."""
    import jax
    import jax.numpy as jnp

    n, h, w, c = x.shape
    per_group = c // num_groups
    xf = x.astype(jnp.float32)
    sum1 = jnp.sum(xf, axis=(1, 2)).reshape(n, num_groups, per_group).sum(-1)
    sum2 = jnp.sum(xf * xf, axis=(1, 2)).reshape(n, num_groups, per_group).sum(-1)
    mean = sum1 / (h * w * per_group)
    var = jnp.maximum(sum2 / (h * w * per_group) - mean * mean, 0.0)
    mult = jnp.repeat(jax.lax.rsqrt(var + epsilon), per_group, axis=1) * scale
    centre = jnp.repeat(mean, per_group, axis=1)
    y = (xf - centre[:, None, None, :]) * mult[:, None, None, :] + bias
    return y.astype(x.dtype)


def run_groupnorm(args) -> dict:
    """Uncentred (current) vs centred GroupNorm, float32, forward and grad, interleaved rounds."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from cac_jax.models.layers import GroupNorm

    rows = []
    for shape in GROUPNORM_SHAPES:
        x = jax.random.normal(jax.random.key(0), shape) + 3.0
        c = shape[-1]
        params = {"scale": jnp.ones((c,)), "bias": jnp.zeros((c,))}
        module = GroupNorm(8)
        fns = {
            "uncentred": lambda p, x, m=module: m.apply({"params": p}, x),
            "centred": lambda p, x: centred_group_norm(x, p["scale"], p["bias"], 8),
        }
        compiled = {}
        for name, fn in fns.items():
            fwd = jax.jit(fn)
            grad = jax.jit(jax.grad(lambda p, x, f=fn: jnp.sum(f(p, x) ** 2), argnums=(0, 1)))
            compiled[name] = (fwd.lower(params, x).compile(), grad.lower(params, x).compile())
            for f in compiled[name]:
                jax.block_until_ready(f(params, x))
        times = {(name, kind): [] for name in fns for kind in ("forward", "grad")}
        for _ in range(args.repeats):
            for name in fns:
                for kind, f in zip(("forward", "grad"), compiled[name]):
                    start = time.perf_counter()
                    for _ in range(5):
                        jax.block_until_ready(f(params, x))
                    times[(name, kind)].append((time.perf_counter() - start) / 5)
        row = {"shape": list(shape)}
        for (name, kind), t in times.items():
            row[f"{name}_{kind}_ms"] = 1e3 * float(np.median(t))
        for kind in ("forward", "grad"):
            row[f"{kind}_ratio_centred_over_uncentred"] = (
                row[f"centred_{kind}_ms"] / row[f"uncentred_{kind}_ms"])
        rows.append(row)
        print(row, flush=True)
    return {
        "command": "python benchmarks/bench_models.py " + " ".join(sys.argv[1:]),
        "repeats": args.repeats,
        "machine": {"backend": jax.default_backend(), "cpu_count": os.cpu_count(),
                    "platform": platform.platform(), "jax": jax.__version__,
                    "load_average_at_end": os.getloadavg()},
        "rows": rows,
    }


def groupnorm_markdown(res: dict) -> str:
    """The GroupNorm comparison as a markdown table."""
    lines = [
        "# GroupNorm: uncentred (cac_jax, current) vs centred formulation, float32",
        "",
        f"Command: `{res['command']}`; median of {res['repeats']} interleaved rounds of 5 calls; "
        f"{res['machine']['cpu_count']} CPUs, JAX {res['machine']['jax']}.",
        "",
        "| shape (N, H, W, C) | forward ms centred / uncentred | ratio "
        "| grad ms centred / uncentred | ratio |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in res["rows"]:
        lines.append(
            f"| {tuple(r['shape'])} | {r['centred_forward_ms']:.2f} / {r['uncentred_forward_ms']:.2f} "
            f"| {r['forward_ratio_centred_over_uncentred']:.2f} "
            f"| {r['centred_grad_ms']:.2f} / {r['uncentred_grad_ms']:.2f} "
            f"| {r['grad_ratio_centred_over_uncentred']:.2f} |")
    return "\n".join(lines) + "\n"


def markdown(res: dict) -> str:
    """The results as a markdown report."""
    s = res["settings"]
    gib = 2.0**30
    lines = [
        "# bench_models: ConvLSTM-attention vs UNet (CPU, float32)",
        "",
        f"Command: `{res['command']}`  ",
        f"Input {s['size']} x {s['size']} (3 slices), forward at batch 1 (median of "
        f"{s['repeats']} interleaved rounds), training step at batch {s['batch']}, "
        f"norm = {s['norm']}. Machine: {res['machine']['cpu_count']} CPUs, "
        f"backend {res['machine']['backend']}, JAX {res['machine']['jax']}; "
        f"load average at the end {tuple(round(v, 1) for v in res['machine']['load_average_at_end'])}.",
        f"Measured float32 matmul peak ({MATMUL_N}^3, same rounds): "
        f"{res['matmul_peak_gflops']:.0f} GFLOP/s.",
        "",
        "| model | params (M) | GFLOP / 512 px sample | forward s / sample | GFLOP/s | % of matmul peak "
        "| train step compiled memory (GiB) | train step peak RSS (GiB) | RSS increase in step (GiB) "
        "| train step s (one run) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in res["models"].items():
        rss = r.get("train_step_rss")
        lines.append(
            f"| {name} | {r['params'] / 1e6:.2f} | {r['gflop_per_512_sample']:.1f} | "
            f"{r['forward_s_per_sample']:.3f} | {r['gflops_per_s']:.0f} | "
            f"{100 * r['fraction_of_matmul_peak']:.0f}% | "
            f"{r['train_step_compiled_memory']['total'] / gib:.2f} | "
            + (f"{rss['rss_peak_during_step_bytes'] / gib:.2f} | "
               f"{rss['rss_step_increase_bytes'] / gib:.2f} | {rss['train_step_s']:.1f} |"
               if rss else "- | - | - |"))
    q = res["ratios"]
    lines += [
        "",
        "| ratio | measured | paper / target |",
        "|---|---:|---:|",
        f"| CPU speed-up, UNet-64 time / ConvLSTM time | {q['speedup_vs_unet64']:.2f}x | "
        f"paper {res['paper']['cpu_speedup']:.2f}x; target >= 3x |",
        f"| CPU speed-up, width-matched UNet time / ConvLSTM time | "
        f"{q['speedup_vs_unet_matched']:.2f}x | target >= 1x |",
        f"| training memory (compiled), ConvLSTM / UNet-64 | "
        f"{q['compiled_train_memory_ratio_vs_unet64']:.2f} | paper "
        f"{res['paper']['training_memory_ratio']:.2f}; target <= 0.5 |",
        f"| training memory (compiled), ConvLSTM / width-matched UNet | "
        f"{q['compiled_train_memory_ratio_vs_unet_matched']:.2f} | |",
    ]
    if "rss_train_peak_ratio_vs_unet64" in q:
        lines += [
            f"| training peak RSS, ConvLSTM / UNet-64 | {q['rss_train_peak_ratio_vs_unet64']:.2f} | "
            f"paper {res['paper']['training_memory_ratio']:.2f} |",
            f"| RSS increase during the step, ConvLSTM / UNet-64 | "
            f"{q['rss_train_step_increase_ratio_vs_unet64']:.2f} | |",
        ]
    lines += [
        f"| FLOPs, ConvLSTM / UNet-64 | {q['flops_ratio_vs_unet64']:.3f} | |",
        f"| parameters, ConvLSTM / UNet-64 | {q['params_ratio_vs_unet64']:.3f} | |",
        "",
        "Training-step memory and time are for one step at the batch above, in a fresh process "
        "per model, after compilation (the time is a single run, not a median).",
        "",
        "Caveat: measured on a shared machine where other processes also ran; the interleaved "
        "rounds spread that load over all models, so ratios are more reliable than absolute "
        "times (per-round times are in the JSON).",
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    """Parse arguments; run the study (or, with --child, one model's RSS measurement)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=None, help="slice size in pixels (default 512)")
    p.add_argument("--batch", type=int, default=None, help="training-step batch (default 2)")
    p.add_argument("--repeats", type=int, default=None, help="timing rounds (default 3)")
    p.add_argument("--norm", choices=("group", "batch"), default="group")
    p.add_argument("--quick", action="store_true", help="256 px, 2 rounds, batch 1")
    p.add_argument("--skip-rss", action="store_true", help="skip the RSS subprocesses")
    p.add_argument("--out", type=pathlib.Path, default=RESULTS, help="results folder")
    p.add_argument("--render", type=pathlib.Path, default=None,
                   help="only re-render the markdown from a saved bench_models.json")
    p.add_argument("--groupnorm", action="store_true",
                   help="only time the GroupNorm formulations (bench_groupnorm.json/.md)")
    p.add_argument("--child", choices=tuple(MODELS), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    quick = dict(size=256, batch=1, repeats=2)
    full = dict(size=512, batch=2, repeats=3)
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.child:
        print(json.dumps(child_rss(args.child, args.norm, args.size, args.batch)))
        return 0

    from data_pipeline.atomic import atomic_write_text

    if args.render:
        res = json.loads(args.render.read_text())
        atomic_write_text(args.render.with_suffix(".md"), markdown(res))
        return 0
    if args.groupnorm:
        args.repeats = max(args.repeats, 5)
        res = run_groupnorm(args)
        args.out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out / "bench_groupnorm.json", json.dumps(res, indent=2) + "\n")
        md = groupnorm_markdown(res)
        atomic_write_text(args.out / "bench_groupnorm.md", md)
        print(md)
        return 0
    res = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "bench_models.json", json.dumps(res, indent=2) + "\n")
    md = markdown(res)
    atomic_write_text(args.out / "bench_models.md", md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
