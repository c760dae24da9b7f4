"""Training speed: forward vs the real training step, per model, side by side in one run.

    python benchmarks/bench_training.py --quick     # 256 px, batch 2, 3 rounds (minutes on 2 cores)
    python benchmarks/bench_training.py             # 512 px, batch 2, 5 rounds
    python benchmarks/bench_training.py --curve --data-dir D --name N --seconds 240 \
        --eval-every 100 --heart-seconds 120 --heart-eval-every 50
        # learning curve of the demo's models (half-width ConvLSTM, width-matched UNet; calcium
        # and heart): validation kappa (all scans, CAC, CTAC) vs minutes of training (128 px),
        # validation included in the time; benchmarks/results/learning_curve.json and .md

For the ConvLSTM-attention (configs/convlstm_calcium.py), UNet-64 (configs/unet_calcium.py) and
the width-matched UNet (configs/unet_matched_calcium.py), calcium task, float32, on one device:
- `forward_s`: jit-compiled inference forward at the batch (warm, median of rounds);
- `step_s`: `cac_jax.steps.train_step` itself (focal loss with aux losses, gradients, pmean,
  Adam), pmapped on one device with the batch already on the device;
- `step_over_forward` (the target: <= 4, docs/benchmarks.md), `samples_per_s` (batch / step_s);
- `compiled_bytes`: XLA's memory analysis of the compiled step (temp + arguments + outputs -
  aliased); `peak_rss_bytes`: this process's peak resident memory after the model (cumulative,
  so only the first model's figure is its own; on accelerators `device_peak_bytes`);
- `outside_share`: the share of loop time spent outside the compiled step when each step takes a
  host numpy batch and fetches its metrics (what the training loop does at log_every=1, its
  worst case): 1 - (device-resident steps) / (host-fed steps with metrics), target <= 5%.
Rounds are interleaved (matmul, model A forward and step, model B, ...) so load from other
processes hits all models alike; a float32 matmul (2048) measures this machine's peak in the
same rounds. Writes benchmarks/results/bench_training.json and .md (atomically).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import pathlib
import platform
import resource
import statistics
import sys
import time

from cac_jax.benchmark import matmul_peak_gflops
from cac_jax.config_defaults import load_config_file

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"
MODELS = {"convlstm": "convlstm_calcium.py", "unet64": "unet_calcium.py",
          "unet_matched": "unet_matched_calcium.py"}


def load_config(name: str, conv_impl: str | None = None):
    """The config of benchmark model `name` (or of configs/<name>.py), float32 compute; with
    `conv_impl`, the library that runs its convolutions (docs/onednn.md)."""
    config = load_config_file(CONFIGS / MODELS.get(name, f"{name}.py"))
    config.model.dtype = "float32"
    if conv_impl is not None:
        config.model.conv_impl = conv_impl
    return config


def _timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    import jax

    jax.block_until_ready(out)
    return time.perf_counter() - t0, out


def _memory(compiled) -> int | None:
    try:
        m = compiled.memory_analysis()
        return int(m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes
                   - m.alias_size_in_bytes)
    except Exception:  # noqa: BLE001 (backends without a memory analysis)
        return None


class Bench:
    """One model's compiled forward and training step, ready to time."""

    def __init__(self, name: str, size: int, batch: int, conv_impl: str = "xla"):
        import jax
        import jax.numpy as jnp
        import numpy as np

        from cac_jax import train as train_lib

        self.name = name
        config = load_config(name, conv_impl)
        self.model = train_lib.model_for_training(config)
        tx = train_lib.make_optimizer(config)
        state = train_lib.init_state(config, self.model, tx, (1, 3, size, size, 1))
        rng = np.random.default_rng(0)
        self.host_batch = {
            "image": rng.uniform(0, 1, (1, batch, 3, size, size, 1)).astype(np.float32),
            "label": rng.integers(0, 3, (1, batch, size, size)).astype(np.int32),
            "weight": np.ones((1, batch, size, size), np.float32)}
        device = jax.local_devices()[:1]
        self.state = train_lib._replicate(state, device)
        self.scale = train_lib._replicate(jnp.asarray(1.0, jnp.float32), device)
        self.batch = train_lib._replicate({k: v[0] for k, v in self.host_batch.items()}, device)
        self.p_step = jax.pmap(functools.partial(train_lib.train_step, model=self.model, tx=tx,
                                                 config=config),
                               axis_name=train_lib.AXIS, devices=device, donate_argnums=(0,))
        variables = {"params": state.params}
        self.variables = jax.device_put(variables, jax.local_devices()[0])
        self.x = jax.device_put(self.host_batch["image"][0], jax.local_devices()[0])
        self.forward = jax.jit(lambda v, x: self.model.apply(v, x)[0])
        t0 = time.perf_counter()
        jax.block_until_ready(self.forward(self.variables, self.x))
        self.compile_forward_s = time.perf_counter() - t0
        try:
            self.compiled_bytes = _memory(self.p_step.lower(self.state, self.batch, self.scale)
                                          .compile())
        except Exception:  # noqa: BLE001
            self.compiled_bytes = None
        t0 = time.perf_counter()
        self.state, _ = self.p_step(self.state, self.batch, self.scale)
        jax.block_until_ready(self.state)
        self.compile_step_s = time.perf_counter() - t0
        self.forward_times, self.step_times, self.pure, self.fed = [], [], [], []

    def round(self, loop_steps: int) -> None:
        import jax

        self.forward_times.append(_timed(self.forward, self.variables, self.x)[0])
        t, (self.state, _) = _timed(self.p_step, self.state, self.batch, self.scale)
        self.step_times.append(t)
        # Device-resident batch, no metric fetches...
        t0 = time.perf_counter()
        for _ in range(loop_steps):
            self.state, metrics = self.p_step(self.state, self.batch, self.scale)
        jax.block_until_ready((self.state, metrics))
        self.pure.append(time.perf_counter() - t0)
        # ...against the loop's way: a host numpy batch in, metrics fetched every step.
        t0 = time.perf_counter()
        for _ in range(loop_steps):
            self.state, metrics = self.p_step(self.state, self.host_batch, self.scale)
            jax.device_get(jax.tree.map(lambda m: m[0], metrics))
        self.fed.append(time.perf_counter() - t0)


def conv_gradients(size: int, batch: int, channels: int = 64, repeats: int = 3,
                   onednn: bool = False) -> dict:
    """GFLOP/s of one 3x3, channels -> channels, stride-1 convolution at size x size (NHWC, as
    the models run it): forward, the input gradient and the weight gradient, each compiled
    alone (2 * B * H * W * 9 * C * C FLOPs each). Where the step / forward ratio exceeds the
    usual 2-3x, the weight gradient's rate shows why. `onednn`: the same convolution through
    oneDNN (cac_jax.ops.onednn_conv), its max relative difference to XLA's in `onednn_max_rel_diff`
    (no im2col variant)."""
    import jax
    import jax.numpy as jnp
    from jax import lax

    kx, kw = jax.random.split(jax.random.key(0))
    # Random values, so a transposed or shifted gradient would show in the im2col check below.
    x = jax.random.normal(kx, (batch, size, size, channels), jnp.float32)
    w = jax.random.normal(kw, (3, 3, channels, channels), jnp.float32) * 0.05
    dims = ("NHWC", "HWIO", "NHWC")

    def xla_conv(x, w):
        return lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=dims)

    if onednn:
        from cac_jax.ops.onednn_conv import conv_general_dilated

        def conv(x, w):
            return conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=dims)
    else:
        conv = xla_conv
    y = conv(x, w)
    _, vjp = jax.vjp(conv, x, w)
    functions = {
        "forward": (jax.jit(conv), (x, w)),
        "input_gradient": (jax.jit(lambda g: vjp(g)[0]), (y,)),
        "weight_gradient": (jax.jit(lambda g: vjp(g)[1]), (y,)),
    }
    # The reformulation tried for the weight gradient: an explicit im2col matrix P (B*H*W, 9*C)
    # of the padded input's nine shifts, and one matmul g^T (C, B*H*W) @ P, the layout in which
    # XLA:CPU's dot runs near its matmul rate. Timed apart: building P, the matmul, both.
    def patches(x):
        xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
        shifts = [xp[:, i:i + size, j:j + size, :] for i in range(3) for j in range(3)]
        return jnp.stack(shifts, axis=3).reshape(-1, 9 * channels)

    def matmul(g, p):
        return g.reshape(-1, channels).T @ p

    def im2col(x, g):
        return matmul(g, patches(x)).reshape(channels, 3, 3, channels).transpose(1, 2, 3, 0)

    flops = 2.0 * batch * size * size * 9 * channels * channels
    out = {"size": size, "batch": batch, "channels": channels}
    if onednn:
        _, xla_vjp = jax.vjp(xla_conv, x, w)
        diffs = [(y, xla_conv(x, w)), *zip(vjp(y), xla_vjp(y), strict=True)]
        out["onednn_max_rel_diff"] = max(float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
                                         for a, b in diffs)
    else:
        functions.update(im2col_functions(x, y, patches, matmul, im2col))
    for name, (fn, fn_args) in functions.items():
        jax.block_until_ready(fn(*fn_args))
        times = [_timed(fn, *fn_args)[0] for _ in range(repeats)]
        if name == "im2col_build":
            out["im2col_build_s"] = statistics.median(times)
        else:
            out[f"{name}_gflops"] = flops / statistics.median(times) / 1e9
    if not onednn:
        reference = functions["weight_gradient"][0](y)
        mine = functions["im2col_weight_gradient"][0](x, y)
        out["im2col_max_rel_diff"] = float(jnp.max(jnp.abs(mine - reference))
                                           / jnp.max(jnp.abs(reference)))
    return out


def im2col_functions(x, y, patches, matmul, im2col) -> dict:
    """The im2col reformulation's three timed functions and their arguments."""
    import jax

    p = jax.jit(patches)(x)
    return {
        "im2col_build": (jax.jit(patches), (x,)),
        "im2col_matmul": (jax.jit(matmul), (y, p)),
        "im2col_weight_gradient": (jax.jit(im2col), (x, y)),
    }


def run(args) -> dict:
    import jax

    from cac_jax.ops import onednn_conv

    impls = [i for i in args.conv_impls if onednn_conv.resolve_impl(i) == i]
    benches = {}
    for name in args.models:
        for impl in impls:
            # One row per model and convolution library: "convlstm" (XLA), "convlstm+onednn".
            key = name if impl == "xla" else f"{name}+{impl}"
            print(f"compiling {key} at {args.size} px, batch {args.batch}", flush=True)
            benches[key] = Bench(name, args.size, args.batch, impl)
            benches[key].rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    peaks = []
    for r in range(args.rounds):
        peaks.append(matmul_peak_gflops())
        for b in benches.values():
            b.round(args.loop_steps)
        print(f"round {r + 1}/{args.rounds} done", flush=True)
    models = {}
    for name, b in benches.items():
        forward = statistics.median(b.forward_times)
        step = statistics.median(b.step_times)
        pure, fed = statistics.median(b.pure), statistics.median(b.fed)
        stats = None
        try:
            stats = jax.local_devices()[0].memory_stats()
        except Exception:  # noqa: BLE001
            stats = None
        models[name] = {
            "forward_s": forward, "step_s": step, "step_over_forward": step / forward,
            "samples_per_s": args.batch / step, "compiled_bytes": b.compiled_bytes,
            "peak_rss_bytes": b.rss_after,
            "device_peak_bytes": (stats or {}).get("peak_bytes_in_use"),
            "outside_share": max(0.0, 1.0 - pure / fed),
            "compile_forward_s": b.compile_forward_s, "compile_step_s": b.compile_step_s,
            "forward_rounds_s": b.forward_times, "step_rounds_s": b.step_times,
        }
    return {
        "conv_3x3": conv_gradients(args.size, args.batch),
        **({"conv_3x3_onednn": conv_gradients(args.size, args.batch, onednn=True)}
           if "onednn" in impls else {}),
        "size": args.size, "batch": args.batch, "rounds": args.rounds,
        "loop_steps": args.loop_steps, "dtype": "float32",
        "matmul_gflops": statistics.median(peaks), "matmul_rounds_gflops": peaks,
        "machine": {"platform": platform.platform(), "processor": _cpu_name(),
                    "cpus": os.cpu_count(), "device": str(jax.devices()[0]),
                    "jax": jax.__version__, "load_avg_1m": os.getloadavg()[0]},
        "models": models,
    }


def _cpu_name() -> str:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                flags = pathlib.Path("/proc/cpuinfo").read_text()
                return line.split(":", 1)[1].strip() + (" (AVX-512)" if "avx512f" in flags
                                                        else "")
    except OSError:
        pass
    return platform.processor()


def markdown(res: dict) -> str:
    lines = [f"# Training step vs forward ({res['size']} px, batch {res['batch']}, float32)", "",
             f"Machine: {res['machine']['processor']}, {res['machine']['cpus']} CPUs, "
             f"{res['machine']['device']}, jax {res['machine']['jax']}; 1-minute load average "
             f"{res['machine']['load_avg_1m']:.1f} at the end (shared machine: compare ratios). "
             f"float32 matmul peak in the same run: {res['matmul_gflops']:.0f} GFLOP/s.", "",
             "| model | forward s | step s | step / forward | samples/s | compiled MB | "
             "outside compiled step |", "|---|---|---|---|---|---|---|"]
    for name, m in res["models"].items():
        mb = "" if m["compiled_bytes"] is None else f"{m['compiled_bytes'] / 2**20:.0f}"
        lines.append(f"| {name} | {m['forward_s']:.3f} | {m['step_s']:.3f} | "
                     f"{m['step_over_forward']:.1f} | {m['samples_per_s']:.2f} | {mb} | "
                     f"{100 * m['outside_share']:.1f}% |")
    conv = res.get("conv_3x3")
    if conv:
        lines += ["", f"One 3x3 convolution, {conv['channels']} -> {conv['channels']} channels, "
                      f"{conv['size']} px, batch {conv['batch']} (same run): forward "
                      f"{conv['forward_gflops']:.0f} GFLOP/s, input gradient "
                      f"{conv['input_gradient_gflops']:.0f}, weight gradient "
                      f"{conv['weight_gradient_gflops']:.0f} (matmul peak "
                      f"{res['matmul_gflops']:.0f})."]
        if "im2col_weight_gradient_gflops" in conv:
            lines += ["", "The weight gradient reformulated as im2col + one matmul (g^T @ P, "
                          "P = the nine shifts of the padded input, (B*H*W, 9*C)): the matmul "
                          f"alone runs at {conv['im2col_matmul_gflops']:.0f} GFLOP/s, but XLA:CPU "
                          f"takes {conv['im2col_build_s'] * 1e3:.0f} ms to build P, so the whole "
                          f"runs at {conv['im2col_weight_gradient_gflops']:.0f} GFLOP/s (max "
                          f"relative difference to XLA's gradient "
                          f"{conv['im2col_max_rel_diff']:.1e}): "
                          + ("no faster than the convolution's own weight gradient."
                             if conv["im2col_weight_gradient_gflops"]
                             <= 1.2 * conv["weight_gradient_gflops"] else
                             "faster than the convolution's own weight gradient on this "
                             "machine.")]
    dnn = res.get("conv_3x3_onednn")
    if dnn:
        lines += ["", f"The same convolution through oneDNN (docs/onednn.md): forward "
                      f"{dnn['forward_gflops']:.0f} GFLOP/s, input gradient "
                      f"{dnn['input_gradient_gflops']:.0f}, weight gradient "
                      f"{dnn['weight_gradient_gflops']:.0f} (max relative difference to XLA's "
                      f"{dnn['onednn_max_rel_diff']:.1e}). Rows `<model>+onednn` run every 3x3 "
                      "convolution of the model through it."]
    lines += ["", "Target (docs/benchmarks.md): step <= 4x forward for every model; <= 5% of loop time "
                  "outside the compiled step. The step is `cac_jax.steps.train_step` (focal loss, "
                  "ConvLSTM aux losses, gradients, Adam)."]
    return "\n".join(lines) + "\n"


# Learning curve (docs/training_notes.md): the ConvLSTM and the width-matched UNet, calcium and
# heart.
# The demo's models (configs/demo_*.py, cac_jax.demo.TRAINED): the ConvLSTM at half the configs'
# widths and the UNet width-matched to it (base 12), so the curve is the one the demo's time boxes
# are chosen from.
CURVE_RUNS = {
    "convlstm_calcium": "demo_convlstm_calcium",
    "unet_matched_calcium": "demo_unet_calcium",
    "convlstm_heart": "demo_convlstm_heart",
    "unet_matched_heart": "demo_unet_heart",
}


def curve(args) -> dict:
    """Train each curve run for `--seconds` on the dataset; validation kappa against time."""
    from cac_jax.train import train_and_evaluate

    runs = {}
    for run_name in args.curve_runs:
        config_name = CURVE_RUNS[run_name]
        config = load_config(config_name)
        config.model.dtype = "auto"
        config.data.data_dir = str(args.data_dir)
        config.data.name = args.name
        config.data.image_size = args.size
        # The demo's batches: whole slices for the heart, half-size crops (a quarter of the cost)
        # for the calcium model.
        batch = args.curve_batch or (4 if config.task == "heart" else 16)
        config.data.per_device_batch = batch
        config.train.batch_size = batch
        config.train.steps = 100000
        heart = config.task == "heart"
        seconds, eval_every = args.seconds, args.eval_every
        if heart:
            seconds = args.heart_seconds or seconds
            eval_every = args.heart_eval_every or eval_every
        config.train.max_seconds = float(seconds)
        config.train.eval_every = eval_every
        config.train.checkpoint_every = 100000
        config.train.log_every = 10
        config.train.early_stop_patience = 0
        config.train.progress = False
        workdir = args.workdir / run_name
        if workdir.exists():
            import shutil

            shutil.rmtree(workdir)
        print(f"curve: {run_name} for {seconds} s", flush=True)
        summary = train_and_evaluate(config, workdir)
        rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
        keys = ("step", "elapsed_s", "val_loss", "val_kappa", "val_kappa_naive", "val_exact",
                "val_dice_mean", "val_scans", "val_kappa_cac", "val_kappa_naive_cac",
                "val_exact_cac", "val_kappa_ctac", "val_kappa_naive_ctac", "val_exact_ctac")
        evals = [{k: r.get(k) for k in keys} for r in rows if "val_loss" in r]
        runs[run_name] = {"config": config_name, "evaluations": evals,
                          "batch": batch, "crop_size": int(config.data.crop_size or 0),
                          "steps": summary["steps"], "wall_time_s": summary["wall_time_s"]}
    import jax

    return {"size": args.size, "batch": args.curve_batch or "heart 4, calcium 16",
            "seconds": args.seconds, "heart_seconds": args.heart_seconds or args.seconds,
            "dataset": f"{args.data_dir}/{args.name}",
            "machine": {"processor": _cpu_name(), "cpus": os.cpu_count(),
                        "device": str(jax.devices()[0]), "load_avg_1m": os.getloadavg()[0]},
            "runs": runs}


def curve_markdown(res: dict) -> str:
    lines = [f"# Learning curve: validation kappa vs CPU training time ({res['size']} px, batch "
             f"{res['batch']})", "",
             f"Dataset {res['dataset']}; machine {res['machine']['processor']}, "
             f"{res['machine']['cpus']} CPUs, 1-minute load average "
             f"{res['machine']['load_avg_1m']:.1f} at the end (shared machine). val_kappa: "
             "linearly weighted kappa of the per-scan Agatston category (calcium model: "
             "predicted coronary class inside the reference heart; heart model: 130 HU threshold "
             "inside the predicted heart); naive: the 130 HU threshold inside the reference "
             "heart. CAC and CTAC: the same per protocol (4 validation patients each on the "
             "demo's cohort, so one scan moves a kappa by 0.2-0.5). Models: the demo's (the "
             "ConvLSTM at half the configs' widths, the UNet width-matched to it); minutes "
             "include the validations.", ""]
    for name, run in res["runs"].items():
        crop = f", {run['crop_size']} px crops" if run.get("crop_size") else ", whole slices"
        lines += [f"## {name} ({run['steps']} steps in {run['wall_time_s']:.0f} s, batch "
                  f"{run.get('batch', res['batch'])}{crop})", "",
                  "| step | minutes | val_loss | val_kappa | naive kappa | exact | CAC kappa "
                  "(naive) | CTAC kappa (naive) | Dice |",
                  "|---|---|---|---|---|---|---|---|---|"]

        def fmt(v, spec=".3f"):
            return "n/a" if v is None else format(v, spec)

        for e in run["evaluations"]:
            lines.append(f"| {e['step']} | {fmt(e['elapsed_s'] / 60, '.1f')} | "
                         f"{fmt(e['val_loss'], '.4f')} | {fmt(e['val_kappa'])} | "
                         f"{fmt(e['val_kappa_naive'])} | {fmt(e['val_exact'])} | "
                         f"{fmt(e.get('val_kappa_cac'))} ({fmt(e.get('val_kappa_naive_cac'))}) | "
                         f"{fmt(e.get('val_kappa_ctac'))} ({fmt(e.get('val_kappa_naive_ctac'))}) | "
                         f"{fmt(e['val_dice_mean'])} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="256 px, 3 rounds")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--loop-steps", type=int, default=3)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--conv-impls", nargs="+", default=["xla", "onednn"],
                   choices=["xla", "onednn", "onednn_direct"],
                   help="convolution libraries to time side by side (docs/onednn.md); oneDNN "
                        "is left out where its extension does not run")
    p.add_argument("--out", type=pathlib.Path, default=RESULTS)
    p.add_argument("--curve", action="store_true",
                   help="learning curve instead: train each run for --seconds on --data-dir")
    p.add_argument("--data-dir", type=pathlib.Path, help="TFDS data dir (curve)")
    p.add_argument("--name", default="cac_ct", help="TFDS dataset name (curve)")
    p.add_argument("--seconds", type=float, default=300.0, help="training time per run (curve)")
    p.add_argument("--eval-every", type=int, default=50, help="steps between evaluations (curve)")
    p.add_argument("--heart-seconds", type=float, default=0.0,
                   help="training time of the heart runs (curve; default: --seconds)")
    p.add_argument("--heart-eval-every", type=int, default=0,
                   help="steps between evaluations of the heart runs (default: --eval-every)")
    p.add_argument("--curve-batch", type=int, default=0,
                   help="batch of every curve run (0: heart 4 whole slices, calcium 16 crops)")
    p.add_argument("--curve-runs", nargs="+", default=list(CURVE_RUNS), choices=list(CURVE_RUNS))
    p.add_argument("--workdir", type=pathlib.Path, default=pathlib.Path("/tmp/cac_jax_curve"))
    args = p.parse_args(argv)
    if args.curve:
        if args.size == 512:
            args.size = 128
        res = curve(args)
        from data_pipeline.atomic import atomic_write_text

        md = curve_markdown(res)
        atomic_write_text(args.out / "learning_curve.json", json.dumps(res, indent=2) + "\n")
        atomic_write_text(args.out / "learning_curve.md", md)
        print(md)
        return 0
    if args.quick:
        args.size, args.rounds = 256, 3
    res = run(args)
    from data_pipeline.atomic import atomic_write_text

    md = markdown(res)
    atomic_write_text(args.out / "bench_training.json", json.dumps(res, indent=2) + "\n")
    atomic_write_text(args.out / "bench_training.md", md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
