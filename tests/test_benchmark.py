"""`cac-jax bench` end to end at a tiny size (the configs' :local variants), and its statistics."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
from scipy import stats

from cac_jax import benchmark
from cac_jax.cli import main
from cac_jax.ops import onednn_conv

HAS_TORCH = importlib.util.find_spec("torch") is not None


def _bench(tmp_path, *extra):
    out = tmp_path / "bench"
    argv = ["bench", "--local", "--size", "64", "--slices", "2", "--out", str(out), *extra]
    assert main(argv) == 0
    res = json.loads((out / "bench.json").read_text())
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return res, (out / "bench.md").read_text()


def test_bench_jax_end_to_end(tmp_path):
    res, md = _bench(tmp_path, "--models", "convlstm,unet_matched", "--samples", "3")
    m = res["machine"]
    for key in ("cpu_model", "logical_cores", "avx512", "accelerator", "threads", "jax"):
        assert key in m
    assert res["settings"]["samples"] == 3 and "3 samples of 2 consecutive slices" in res["protocol"]
    jax_res = res["results"]["jax"]
    assert set(jax_res) == {"convlstm", "unet_matched"}
    for r in jax_res.values():
        assert r["n"] == 3 and len(r["times_s"]) == 3
        assert r["median_s"] == pytest.approx(float(np.median(r["times_s"])))
        q1, q3 = np.percentile(r["times_s"], [25, 75])
        assert r["iqr_s"] == pytest.approx(q3 - q1)
        assert r["median_s"] > 0 and r["compile_s"] > 0 and r["warmup_s"] > 0
    p = res["wilcoxon_p"]["jax"]["convlstm_vs_unet_matched"]
    expected = stats.ranksums(jax_res["convlstm"]["times_s"], jax_res["unet_matched"]["times_s"])
    assert p == pytest.approx(expected.pvalue)
    assert res["preprocessing"]["per_study_s"] > 0
    assert res["preprocessing"]["study_shape_zyx"][1:] == [64, 64]
    assert "| jax_xla | convlstm |" in md and "train_step" not in res
    # The JAX variants by convolution library; "jax" is the faster one per model.
    variants = {"jax_xla", "jax_onednn"} if onednn_conv.available() else {"jax_xla"}
    assert {v for v in res["results"] if v.startswith("jax_")} == variants
    for name, r in jax_res.items():
        assert r["variant"] in variants
        assert r["median_s"] == min(res["results"][v][name]["median_s"] for v in variants)
    if onednn_conv.available():
        assert "| jax_onednn | convlstm |" in md
        assert res["ratios"]["onednn_speedup_vs_xla"]["convlstm"] == pytest.approx(
            res["results"]["jax_xla"]["convlstm"]["median_s"]
            / res["results"]["jax_onednn"]["convlstm"]["median_s"])


def test_bench_train_step_jax_and_torch(tmp_path):
    """Training step in both frameworks (JAX only when PyTorch is not installed)."""
    frameworks = "jax,torch" if HAS_TORCH else "jax"
    res, md = _bench(tmp_path, "--models", "unet_matched", "--samples", "2", "--frameworks",
                     frameworks, "--no-torch-compile", "--train-step", "--train-repeats", "1")
    t = res["train_step"]["jax"]["unet_matched"]
    assert t["step_s"] > 0 and t["forward_s"] > 0 and t["loss_finite"]
    assert t["step_over_forward"] == pytest.approx(t["step_s"] / t["forward_s"])
    assert t["peak_memory_bytes"] == t["xla_memory_analysis"]["total"] > 0
    assert t["rss_peak_bytes"] >= t["rss_before_bytes"] > 0
    assert "Training step" in md
    assert t["variant"] in {v for v in res["train_step"] if v.startswith("jax_")}
    if not HAS_TORCH:
        pytest.skip("PyTorch not installed (pip install -e .[torch]): JAX part checked")
    results = res["results"]
    assert {"jax", "torch_eager", "torch_channels_last", "torch"} <= set(results)
    best = results["torch"]["unet_matched"]
    assert best["variant"] in ("torch_eager", "torch_channels_last")
    assert best["median_s"] == min(results[v]["unet_matched"]["median_s"]
                                   for v in ("torch_eager", "torch_channels_last"))
    assert res["ratios"]["jax_speedup_vs_best_torch"]["unet_matched"] == pytest.approx(
        best["median_s"] / results["jax"]["unet_matched"]["median_s"])
    assert res["machine"]["torch_threads"] == res["machine"]["threads"]
    tt = res["train_step"]["torch"]["unet_matched"]
    assert tt["step_s"] > 0 and tt["loss_finite"]
    assert tt["variant"] in ("torch_eager", "torch_channels_last")
    assert "torch (best:" in md


@pytest.mark.parametrize("argv,message", [
    (["--models", "convlstm,resnet"], "unknown model"),
    (["--size", "72"], "multiple of 16"),
    (["--frameworks", "torch"], "must include jax"),
    (["--conv-impls", "mkl"], "--conv-impls"),
])
def test_bad_requests_exit_2_with_one_line(tmp_path, capsys, argv, message):
    assert main(["bench", "--local", "--out", str(tmp_path / "o"), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not (tmp_path / "o").exists()


def test_ratios_and_summary():
    s = benchmark._summary([1.0, 2.0, 3.0, 4.0, 10.0])
    assert s["median_s"] == 3.0 and s["iqr_s"] == pytest.approx(2.0) and s["n"] == 5
    results = {"jax": {"convlstm": {"median_s": 1.0}, "unet64": {"median_s": 5.0}},
               "torch_eager": {"convlstm": {"median_s": 2.0}, "unet64": {"median_s": 4.0}},
               "torch": {"convlstm": {"median_s": 2.0}, "unet64": {"median_s": 4.0}}}
    r = benchmark.ratios(results)
    assert r["jax"]["unet64_over_convlstm_time"] == 5.0
    assert r["torch_eager"]["unet64_over_convlstm_time"] == 2.0
    assert r["jax_speedup_vs_best_torch"] == {"convlstm": 2.0, "unet64": 0.8}


@pytest.mark.parametrize("argv,message", [
    (["--samples", "100000000"], "--samples must be at most 102400"),
    (["--size", "100000"], "--size must be at most 1024"),
    (["--slices", "1000"], "--slices must be at most 64"),
])
def test_sizes_are_bounded_with_one_line(tmp_path, capsys, argv, message):
    """Out-of-range sizes are refused before anything is built (not a crash in numpy)."""
    assert main(["bench", "--local", "--out", str(tmp_path / "o"), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_the_papers_n_at_512_px_runs_in_bounded_memory():
    """N = 1024 samples of 16 slices at 512 px (51 GB if built up front): each sample is built
    when it is used, so memory holds the study and one sample, whatever N."""
    import tracemalloc

    hu = np.full((74, 512, 512), -1000.0, np.float32)
    hu[:, 200:300, 200:300] = np.arange(74, dtype=np.float32)[:, None, None]
    tracemalloc.start()
    try:
        samples = benchmark.StudySamples(hu, slices=16, count=benchmark.PAPER_SAMPLES, seed=0)
        assert len(samples) == 1024
        sample_bytes = 16 * 3 * 512 * 512 * 4
        for k, x in enumerate(samples):
            assert x.shape == (16, 3, 512, 512, 1) and x.dtype == np.float32
            if k == 5:
                break
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # A few samples' worth (the one in use, the next one and model_inputs' intermediates), not
    # 1024 of them.
    assert peak < 5 * sample_bytes, peak
    # Deterministic: a sample is the same each time it is built, 16 consecutive slices.
    np.testing.assert_array_equal(samples[1000], samples[1000])
    first = int(samples.firsts[1000])
    assert np.unique(samples[1000][:, 1, 250, 250, 0]).size == 16 and 0 <= first <= 74 - 16
