"""What the training step spends outside the convolutions: the UNet's other ops, JAX vs PyTorch.

    python benchmarks/bench_train_ops.py                 # width-matched UNet, 256 px, batch 2
    python benchmarks/bench_train_ops.py --model unet64 --rounds 7
    python benchmarks/bench_train_ops.py --quick         # 64 px, 1 round: checks the script

`benchmarks/bench_layers.py --backward` times each convolution's forward and both gradients; this
script times the rest of the UNet's training step, op by op, at the shapes the step runs them
(the model's config, `--size`, `--batch`): each op's forward and backward together, on the same
inputs and cotangent (JAX: one jit-compiled `jax.vjp` that returns the forward's output and the
gradients with respect to the inputs and parameters, as the training step needs both; PyTorch:
the forward and `backward(dy)` on `channels_last` tensors, eager, as `cac-jax bench --train-step`
times it), and the optimiser update over all the model's parameters (optax.adam against
torch.optim.Adam):
- `norm_relu`: GroupNorm + ReLU after every convolution (`cac_jax.models.layers.GroupNorm`;
  `nn.GroupNorm`), two per DoubleConv;
- `max_pool`: the encoder's 2x2 max pooling (`max_pool2x`; `F.max_pool2d`);
- `upsample`: the decoder's 2x2 stride-2 transposed convolution (`TransposedConv2x2`, a matmul
  and a pixel shuffle; `nn.ConvTranspose2d`, oneDNN's deconvolution);
- `concat`: the skip connections (the skip and the upsampled tensor, gradients to both);
- `head_loss`: the 1x1 head and the focal loss (`cac_jax.losses`; the same formula in PyTorch);
- `adam`: the update of every parameter.
Rounds are interleaved (JAX, PyTorch, JAX, ...) with the same threads, medians reported, and a
float32 matmul peak measured in the same run; an op shorter than 20 ms is called several times
per round and its time per call reported. The per-op sums say which framework's ops outside
the convolutions are slower and by how much.

Writes benchmarks/results/bench_train_ops.json and .md (atomically; `--out DIR` to write
elsewhere). Needs the `torch` extra (`pip install -e .[torch]`).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import numpy as np

from cac_jax.benchmark import BenchSettings, load_config, machine_info, matmul_peak_gflops, threads
from data_pipeline.atomic import atomic_write_text

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
OPS = ("norm_relu", "max_pool", "upsample", "concat", "head_loss", "adam")
MIN_ROUND_S = 0.02  # small ops are called this long per round (several calls)


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def unet_ops(config, size: int, batch: int) -> list[dict]:
    """Every non-convolution op of the UNet's training step: name, shapes and count."""
    from cac_jax.models.layers import num_groups_for

    cfg = config.model.unet
    base, depth, groups = int(cfg.base_width), int(cfg.depth), int(config.model.groups)
    widths = [base * 2**level for level in range(depth + 1)]
    ops = []
    for level in range(depth + 1):
        side, width = size // 2**level, widths[level]
        # Down and up DoubleConvs at this level (the bottleneck has one).
        count = 2 if level == depth else 4
        ops.append({"op": "norm_relu", "shape": (batch, side, side, width), "count": count,
                    "groups": num_groups_for(width, groups)})
        if level < depth:
            ops.append({"op": "max_pool", "shape": (batch, side, side, width), "count": 1})
            ops.append({"op": "upsample", "shape": (batch, side // 2, side // 2,
                                                    widths[level + 1]),
                        "features": width, "count": 1})
            ops.append({"op": "concat", "shape": (batch, side, side, width), "count": 1})
    ops.append({"op": "head_loss", "shape": (batch, size, size, base),
                "classes": int(config.model.num_classes), "count": 1})
    return ops


def _inputs(op: dict, rng) -> list[np.ndarray]:
    """The op's inputs: one activation, or for `concat` the skip and the upsampled tensor."""
    count = 2 if op["op"] == "concat" else 1
    return [rng.standard_normal(op["shape"], np.float32) for _ in range(count)]


def _jax_op(op: dict, config, inputs: list[np.ndarray], labels: np.ndarray, rng):
    """(a call that runs one op's forward and backward in JAX, jit-compiled, the forward's output
    kept as the training step keeps it, and the numpy cotangent)."""
    import jax
    import jax.numpy as jnp

    from cac_jax.losses import focal_loss
    from cac_jax.models.layers import Conv1x1, GroupNorm, TransposedConv2x2, max_pool2x

    kind = op["op"]
    if kind == "norm_relu":
        module = GroupNorm(op["groups"])
        fn = lambda p, x: jax.nn.relu(module.apply(p, x))  # noqa: E731
    elif kind == "max_pool":
        module, fn = None, lambda p, x: max_pool2x(x)
    elif kind == "upsample":
        module = TransposedConv2x2(op["features"])
        fn = module.apply
    elif kind == "concat":
        module, fn = None, lambda p, skip, up: jnp.concatenate([skip, up], axis=-1)
    else:  # head_loss
        module = Conv1x1(op["classes"])
        alpha = jnp.asarray([float(a) for a in config.train.focal_alpha], jnp.float32)
        labels_j = jnp.asarray(labels)

        def fn(p, x):
            logits = module.apply(p, x)
            return focal_loss(logits, labels_j, alpha=alpha,
                              gamma=float(config.train.focal_gamma))
    xs = [jnp.asarray(x) for x in inputs]
    params = module.init(jax.random.key(0), xs[0]) if module is not None else {}
    y = jax.eval_shape(fn, params, *xs)
    dy = jnp.asarray(rng.standard_normal(y.shape, np.float32))

    @jax.jit
    def forward_backward(p, *xs):
        out, vjp = jax.vjp(fn, p, *xs)
        return out, vjp(dy)

    return (lambda: jax.block_until_ready(forward_backward(params, *xs))), np.array(dy)


def _torch_op(op: dict, config, inputs: list[np.ndarray], labels: np.ndarray, dy: np.ndarray):
    """One op's forward + backward in PyTorch (channels_last, eager) on the same inputs,
    cotangent and labels; its modules keep their own initial weights (the time does not depend
    on the values)."""
    import torch
    import torch.nn.functional as F

    cl = torch.channels_last
    xts = [torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(memory_format=cl).requires_grad_()
           for x in inputs]
    channels = inputs[0].shape[-1]
    kind = op["op"]
    if kind == "norm_relu":
        module = torch.nn.GroupNorm(op["groups"], channels, eps=1e-6)
        fn = lambda x: F.relu(module(x))  # noqa: E731
    elif kind == "max_pool":
        module, fn = None, lambda x: F.max_pool2d(x, 2)
    elif kind == "upsample":
        module = torch.nn.ConvTranspose2d(channels, op["features"], 2, stride=2)
        module = module.to(memory_format=cl)
        fn = module
    elif kind == "concat":
        module, fn = None, lambda skip, up: torch.cat([skip, up], dim=1)
    else:
        module = torch.nn.Conv2d(channels, op["classes"], 1).to(memory_format=cl)
        labels_t = torch.from_numpy(labels).long()
        alpha = torch.tensor([float(a) for a in config.train.focal_alpha])
        gamma = float(config.train.focal_gamma)

        def fn(x):
            log_pt = F.log_softmax(module(x).float(), dim=1).gather(1, labels_t[:, None])[:, 0]
            return torch.mean(-torch.pow(-torch.expm1(log_pt), gamma) * log_pt * alpha[labels_t])
    y = fn(*xts)
    dyt = torch.from_numpy(dy)
    dyt = dyt.permute(0, 3, 1, 2).contiguous(memory_format=cl) if dyt.ndim == 4 else dyt
    if tuple(y.shape) != tuple(dyt.shape):
        raise ValueError(f"{kind}: PyTorch output {tuple(y.shape)}, cotangent {tuple(dyt.shape)}")

    def step():
        for xt in xts:
            xt.grad = None
        if module is not None:
            module.zero_grad(set_to_none=True)
        fn(*xts).backward(dyt)

    return step


def _interleaved(jax_fn, torch_fn, rounds: int) -> dict:
    """Median seconds per call of each, in interleaved rounds after a warm-up. An op shorter than
    MIN_ROUND_S is called several times per round, so the per-call dispatch does not dominate."""
    jax_fn(), torch_fn()  # warm-up
    calls = max(1, int(MIN_ROUND_S / max(_seconds(jax_fn), _seconds(torch_fn))))
    times = {"jax": [], "torch": []}
    for _ in range(rounds):
        for name, fn in (("jax", jax_fn), ("torch", torch_fn)):
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            times[name].append((time.perf_counter() - start) / calls)
    return {"calls_per_round": calls, "jax_s": float(np.median(times["jax"])),
            "torch_s": float(np.median(times["torch"]))}


def _adam(config, rng):
    """optax.adam and torch.optim.Adam updating the model's parameters (the same tree)."""
    import jax
    import jax.numpy as jnp
    import optax
    import torch

    from cac_jax.models import build_model

    model = build_model(config)
    params = jax.jit(model.init)(jax.random.key(0, impl="rbg"),
                                 jnp.zeros((1, 3, 32, 32, 1), jnp.float32))["params"]
    leaves = jax.tree_util.tree_leaves(params)
    tx = optax.adam(1e-3)
    grads = jax.tree_util.tree_map(lambda p: jnp.asarray(rng.standard_normal(p.shape),
                                                         p.dtype), params)
    state = {"params": params, "opt": tx.init(params)}

    def update(params, opt_state, grads):
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    update = jax.jit(update, donate_argnums=(0, 1))

    def jax_step():
        state["params"], state["opt"] = update(state["params"], state["opt"], grads)
        jax.block_until_ready(state["params"])

    tparams = [torch.nn.Parameter(torch.from_numpy(np.array(p))) for p in leaves]
    for p, g in zip(tparams, jax.tree_util.tree_leaves(grads)):
        p.grad = torch.from_numpy(np.array(g))
    opt = torch.optim.Adam(tparams, lr=1e-3)
    return jax_step, opt.step, sum(int(p.size) for p in leaves)


def run(args) -> dict:
    import torch

    torch.set_num_threads(threads())
    settings = BenchSettings(models=(args.model,), frameworks=("jax", "torch"), size=args.size,
                             local=args.quick)
    config = load_config(args.model, settings)
    if config.model.arch != "unet":
        raise ValueError(f"{args.model}: only the UNets' ops are timed (got {config.model.arch})")
    rng = np.random.default_rng(0)
    peaks = [matmul_peak_gflops()]
    rows = []
    for op in unet_ops(config, args.size, args.batch):
        inputs = _inputs(op, rng)
        n, h, w, _ = op["shape"]
        labels = rng.integers(0, int(config.model.num_classes), (n, h, w))
        jax_fn, dy = _jax_op(op, config, inputs, labels, rng)
        torch_fn = _torch_op(op, config, inputs, labels, dy)
        rows.append({**{k: v for k, v in op.items() if k != "shape"}, "shape": list(op["shape"]),
                     **_interleaved(jax_fn, torch_fn, args.rounds)})
        print(f"{op['op']} {op['shape']} x{op['count']}: JAX {rows[-1]['jax_s'] * 1e3:.2f} ms, "
              f"PyTorch {rows[-1]['torch_s'] * 1e3:.2f} ms", flush=True)
    jax_adam, torch_adam, n_params = _adam(config, rng)
    rows.append({"op": "adam", "parameters": n_params, "count": 1,
                 **_interleaved(jax_adam, torch_adam, args.rounds)})
    peaks.append(matmul_peak_gflops())
    totals = {op: {fw: sum(r[f"{fw}_s"] * r["count"] for r in rows if r["op"] == op)
                   for fw in ("jax", "torch")} for op in OPS}
    return {"machine": machine_info(("jax", "torch")), "model": args.model, "size": args.size,
            "batch": args.batch, "rounds": args.rounds, "ops": rows, "totals_s": totals,
            "total_s": {fw: sum(t[fw] for t in totals.values()) for fw in ("jax", "torch")},
            "matmul_peak_gflops": peaks}


def markdown(res: dict) -> str:
    peaks = ", ".join(f"{p:.0f}" for p in res["matmul_peak_gflops"])
    lines = [f"# The {res['model']} training step outside the convolutions: JAX vs PyTorch", "",
             f"{res['size']} px, batch {res['batch']}, forward + backward per op, median of "
             f"{res['rounds']} interleaved rounds; matmul peak {peaks} GFLOP/s. "
             f"Machine: {res['machine'].get('cpu_model', '')}.", "",
             "| op | shape (NHWC) | count | JAX ms | PyTorch ms | JAX / PyTorch |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in res["ops"]:
        shape = "x".join(map(str, r.get("shape", []))) or f"{r.get('parameters')} parameters"
        lines.append(f"| {r['op']} | {shape} | {r['count']} | {r['jax_s'] * 1e3:.2f} | "
                     f"{r['torch_s'] * 1e3:.2f} | {r['jax_s'] / r['torch_s']:.2f} |")
    lines += ["", "Per op, times the count:", "", "| op | JAX ms | PyTorch ms | JAX / PyTorch |",
              "| --- | --- | --- | --- |"]
    for op, t in {**res["totals_s"], "all": res["total_s"]}.items():
        lines.append(f"| {op} | {t['jax'] * 1e3:.1f} | {t['torch'] * 1e3:.1f} | "
                     f"{t['jax'] / t['torch']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="unet_matched", help="unet_matched or unet64")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="64 px, tiny model, 1 round")
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.quick:
        args.size, args.rounds = 64, 1
    res = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "bench_train_ops.json", json.dumps(res, indent=2) + "\n")
    atomic_write_text(args.out / "bench_train_ops.md", markdown(res))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
