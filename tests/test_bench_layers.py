"""benchmarks/bench_layers.py: the convolutions read from the models' jaxprs, and the script end to end."""

from __future__ import annotations

import importlib.util
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from script_loader import load_benchmark

from cac_jax.models import build_model
from cac_jax.models.config import model_config
from cac_jax.models.layers import TransposedConv2x2, max_pool2x

ROOT = pathlib.Path(__file__).resolve().parents[1]
HAS_TORCH = importlib.util.find_spec("torch") is not None


def _script(name: str = "bench_layers"):
    """Import benchmarks/<name>.py (the benchmarks are scripts, not a package)."""
    return load_benchmark(name)


def _convolutions(arch: str, batch: int = 2, size: int = 64):
    cfg = model_config(arch, "calcium", local=True)
    cfg.dtype = "float32"
    # The census reads XLA's convolutions from the jaxpr, as the script builds its models
    # (oneDNN's convolutions are custom calls there).
    cfg.conv_impl = "xla"
    model = build_model(cfg)
    x = jnp.zeros((batch, 3, size, size, 1), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    return model, _script().model_convolutions(jax.make_jaxpr(model.apply)(variables, x).jaxpr)


def test_unet_convolutions_are_all_found():
    model, convs = _convolutions("unet")
    # Two 3x3 convolutions per level down, at the bottleneck and per level up; the upsampling
    # and the 1x1 head are matmuls (no input-dilated or 1x1 convolution left).
    assert sum(convs.values()) == 2 * (2 * model.depth + 1)
    assert all(key[1][:2] == (3, 3) and key[4] == (1, 1) for key in convs)


def test_convlstm_hidden_convolutions_count_once_per_slice():
    model, convs = _convolutions("convlstm", batch=2)
    for hidden in model.lstm_features:
        # conv_h(h_{t-1}) on the batch (not batch x slices), for the 2 slices after the first:
        # the first step's h is 0, so it has none (cac_jax/models/convlstm.py).
        hidden_convs = [count for key, count in convs.items()
                        if key[1] == (3, 3, hidden, 4 * hidden) and key[0][0] == 2]
        assert hidden_convs == [2]
    # The encoder runs on batch x 3 slices; its later stages start with a stride-2 convolution.
    assert any(key[0][0] == 6 and key[2] == (2, 2) for key in convs)


@pytest.mark.parametrize("strides,padding", [((1, 1), ((1, 1), (1, 1))),
                                             ((2, 2), ((0, 1), (0, 1)))])
def test_conv_flops_match_xla_cost_analysis(strides, padding):
    # conv_flops counts every kernel tap of every output pixel, padding included (the usual
    # convention for GFLOP/s); XLA's cost analysis counts the same for the convolution of the
    # explicitly padded input with no padding of its own.
    x = jnp.zeros((2, 16 + sum(padding[0]), 12 + sum(padding[1]), 5), jnp.float32)
    k = jnp.zeros((3, 3, 5, 7), jnp.float32)
    fn = jax.jit(lambda x, k: jax.lax.conv_general_dilated(
        x, k, strides, "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")))
    cost = fn.lower(x, k).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    key = ((2, 16, 12, 5), (3, 3, 5, 7), strides, padding, (1, 1), (1, 1))
    assert _script().conv_flops(key) == pytest.approx(cost["flops"], rel=1e-6)


@pytest.mark.skipif(not HAS_TORCH, reason="needs the torch extra (pip install -e .[torch])")
def test_bench_layers_quick_end_to_end(tmp_path):
    script = _script()
    assert script.main(["--quick", "--models", "unet_matched", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "bench_layers.json").read_text())
    r = res["models"]["unet_matched"]
    rows = r["convolutions"]
    assert sum(row["count"] for row in rows) == 18
    for fw, key in (("jax", "jax_s"), ("torch_channels_last", "torch_s")):
        assert r["convolutions_s"][fw] == pytest.approx(sum(row[key] * row["count"] for row in rows))
        assert r["other_s"][fw] == pytest.approx(r["forward_s"][fw] - r["convolutions_s"][fw])
        assert r["forward_s"][fw] == pytest.approx(float(np.median(r["forward_times_s"][fw])))
    assert r["jax_speedup_forward"] == pytest.approx(
        r["forward_s"]["torch_channels_last"] / r["forward_s"]["jax"])
    assert all(row["jax_s"] > 0 and row["torch_s"] > 0 for row in rows)
    from cac_jax.ops import onednn_conv

    if onednn_conv.available():  # the oneDNN column (docs/onednn.md)
        assert all(row["onednn_s"] > 0 and row["onednn_over_torch_time"] == pytest.approx(
            row["onednn_s"] / row["torch_s"]) for row in rows)
    assert len(res["matmul_peak_gflops"]) == 2
    md = (tmp_path / "bench_layers.md").read_text()
    assert "| unet_matched |" in md and "## unet_matched" in md


@pytest.mark.skipif(not HAS_TORCH, reason="needs the torch extra")
def test_bench_layers_backward_times_both_gradients(tmp_path):
    from cac_jax.ops import onednn_conv

    if not onednn_conv.available():
        pytest.skip("needs the oneDNN extension")
    script = _script()
    assert script.main(["--quick", "--backward", "--models", "unet_matched",
                        "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "bench_layers.json").read_text())
    assert res["backward"] is True
    rows = res["models"]["unet_matched"]["convolutions"]
    keys = ("onednn_dx_s", "torch_dx_s", "onednn_dw_s", "torch_dw_s")
    assert rows and all(row[k] > 0 for row in rows for k in keys)
    md = (tmp_path / "bench_layers.md").read_text()
    assert "### unet_matched: gradients" in md
    assert md.count("| (") == 2 * len(rows)  # each convolution: a forward and a gradient row


@pytest.mark.slow  # the layers themselves are checked against flax's in test_models.py
def test_bench_layer_rewrites_quick_end_to_end(tmp_path):
    # flax's layers against ours, alone and in a whole model; the script itself refuses a model
    # program where flax's layers were not swapped in (fewer convolutions than ours).
    script = _script("bench_layer_rewrites")
    assert script.main(["--quick", "--models", "unet_matched", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "bench_layer_rewrites.json").read_text())
    assert [r["layer"].split()[0] for r in res["layers"]] == ["upsample"] * 4 + ["head"] + ["max"] * 2
    for row in res["layers"]:
        for kind in ("forward", "gradient"):
            r = row[kind]
            assert r["speedup"] == pytest.approx(r["flax_s"] / r["ours_s"])
            assert r["max_rel_diff"] < 1e-5  # the same layer, written differently
    entry = res["models"]["unet_matched"]
    for kind in ("forward", "gradient"):
        convs = entry[kind]["convolutions_in_program"]
        assert convs["flax"] > convs["ours"]
        assert entry[kind]["max_rel_diff"] < 1e-4
    assert "| unet_matched | gradient |" in (tmp_path / "bench_layer_rewrites.md").read_text()
    # The swap is undone afterwards: the models use our layers again.
    from cac_jax.models import unet

    assert unet.TransposedConv2x2 is TransposedConv2x2 and unet.max_pool2x is max_pool2x


def test_train_ops_census_matches_the_unet():
    """bench_train_ops.py times one GroupNorm + ReLU per 3x3 convolution of the UNet, at that
    convolution's output shape; each upsampling takes a convolution's output and each
    concatenation makes a convolution's input: the census read from the model's own jaxpr."""
    import collections

    from cac_jax.benchmark import BenchSettings, load_config

    script = _script("bench_train_ops")
    config = load_config("unet_matched", BenchSettings(models=("unet_matched",), local=True))
    ops = script.unet_ops(config, size=64, batch=2)
    config.model.conv_impl = "xla"  # the census reads XLA's convolutions from the jaxpr
    model = build_model(config)
    x = jnp.zeros((2, 3, 64, 64, 1), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    convs = _script().model_convolutions(jax.make_jaxpr(model.apply)(variables, x).jaxpr)
    outputs, inputs = collections.Counter(), set()
    for ((n, h, w, c), (kh, kw, _, out), strides, *_), count in convs.items():
        if (kh, kw) == (3, 3):
            outputs[(n, h // strides[0], w // strides[1], out)] += count
            inputs.add((n, h, w, c))
    norms = collections.Counter()
    for op in ops:
        if op["op"] == "norm_relu":
            norms[op["shape"]] += op["count"]
    assert norms == outputs
    depth = int(config.model.unet.depth)
    for kind in ("max_pool", "upsample", "concat"):
        assert sum(op["count"] for op in ops if op["op"] == kind) == depth
    for op in ops:
        if op["op"] in ("max_pool", "upsample"):
            assert op["shape"] in outputs, op
        if op["op"] == "concat":
            n, h, w, c = op["shape"]
            assert (n, h, w, 2 * c) in inputs, op
            assert (n, h // 2, w // 2, c) == next(
                (u["shape"][0], u["shape"][1], u["shape"][2], u["features"])
                for u in ops if u["op"] == "upsample" and u["features"] == c)
    head = next(op for op in ops if op["op"] == "head_loss")
    assert head["shape"] == (2, 64, 64, int(config.model.unet.base_width))
    assert head["classes"] == int(config.model.num_classes)


@pytest.mark.slow  # a benchmark script end to end; its op census is checked above
@pytest.mark.skipif(not HAS_TORCH, reason="needs the torch extra")
def test_bench_train_ops_quick_end_to_end(tmp_path):
    script = _script("bench_train_ops")
    assert script.main(["--quick", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "bench_train_ops.json").read_text())
    assert {r["op"] for r in res["ops"]} == set(script.OPS)
    assert all(r["jax_s"] > 0 and r["torch_s"] > 0 for r in res["ops"])
    for op, totals in res["totals_s"].items():
        for fw in ("jax", "torch"):
            assert totals[fw] == pytest.approx(sum(r[f"{fw}_s"] * r["count"]
                                                   for r in res["ops"] if r["op"] == op))
    assert res["total_s"]["jax"] == pytest.approx(sum(t["jax"] for t in res["totals_s"].values()))
    assert all(r["calls_per_round"] >= 1 for r in res["ops"])
    adam = next(r for r in res["ops"] if r["op"] == "adam")
    from cac_jax.benchmark import BenchSettings, load_config
    from cac_jax.models import build_model, count_params

    config = load_config("unet_matched", BenchSettings(models=("unet_matched",), local=True))
    variables = jax.eval_shape(build_model(config).init, jax.random.key(0),
                               jnp.zeros((1, 3, 32, 32, 1), jnp.float32))
    assert adam["parameters"] == count_params(variables["params"])
    assert "| norm_relu |" in (tmp_path / "bench_train_ops.md").read_text()
