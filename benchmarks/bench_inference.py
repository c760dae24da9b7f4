"""Inference on one 512 x 512 study: ConvLSTM and UNet-64 pipelines side by side in one run.

    python benchmarks/bench_inference.py              # 512 x 512 x 64 study, both pipelines
    python benchmarks/bench_inference.py --quick      # 512 x 512 x 16 study (a few minutes)
    python benchmarks/bench_inference.py --pipelines convlstm --slices 64 --repeats 2

The study is a synthetic gated CAC scan (`data_pipeline.phantom.render_scan`, 512 px) cut or
reflected to `--slices` slices and written as a DICOM series, read back by `read_study` as a user's
study would be. Each pipeline is a heart model and a calcium model of the full configs
(configs/{convlstm,unet}_{heart,calcium}.py) with untrained He-normal weights: the time of a
forward pass does not depend on the weights. Per pipeline, after a warm-up study that compiles the
shape bucket: seconds per study split into reading, preprocessing (3-slice windows, HU window,
padding), heart model, calcium model, post-processing (heart silhouette, coronary labels) and
scoring (`Scorer.score_path` timings); everything outside the two models as a share of model
time (the target: <= 20%, docs/benchmarks.md; the paper spent 2.24 s on preprocessing alone);
the models'
achieved FLOP/s (XLA `cost_analysis` of the compiled batch function, padded samples included)
against a float32 matmul peak (`jnp.dot` at 2048) measured in the same run, before and after each
pipeline; and how many times each model compiles for a cohort of mixed sizes (ConvLSTM).
`convlstm_windows` is the ConvLSTM pipeline run on its 3-slice windows (`Scorer(share_slices=
False)`) instead of each batch's distinct slices: the time shared slices save.

Writes benchmarks/results/bench_inference.json and .md (atomically).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import platform
import resource
import sys
import tempfile
import time

from cac_jax.benchmark import MATMUL_N, matmul_peak_gflops

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"
PIPELINES = {"convlstm": ("convlstm_heart", "convlstm_calcium"),
             "convlstm_windows": ("convlstm_heart", "convlstm_calcium"),
             "unet64": ("unet_heart", "unet_calcium")}
# Pipelines run with `Scorer(share_slices=False)`: the ConvLSTM on its 3-slice windows (each
# slice encoded three times), as before shared slices (docs/benchmarks.md).
WINDOWS = ("convlstm_windows",)
PAPER_PREPROCESSING_S = 2.24  # the paper's preprocessing time per study (Results)
STAGES = ("read", "preprocess", "heart_model", "calcium_model", "postprocess", "scoring")
# Cohort of mixed sizes for the compilation count: (slices, rows, columns).
COHORT_SHAPES = ((4, 512, 512), (4, 500, 512), (4, 480, 480), (4, 256, 256), (4, 512, 512))


def load_config(name: str):
    """The full experiment config `configs/<name>.py`."""
    from cac_jax.config_defaults import load_config_file

    return load_config_file(CONFIGS / f"{name}.py")


def untrained(name: str, spacing_yx_mm: float, seed: int):
    """A `TrainedModel` of `configs/<name>.py` with He-normal weights drawn with numpy on
    `jax.eval_shape` shapes (an XLA:CPU init compile of the full models takes minutes)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from cac_jax.checkpoints import TrainedModel
    from cac_jax.models import build_model

    config = load_config(name)
    model = build_model(config)
    shapes = jax.eval_shape(model.init, jax.random.key(0),
                            jnp.zeros((1, 3, 64, 64, 1), jnp.float32))
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        key = str(getattr(path[-1], "key", path[-1]))
        if key == "scale":
            return np.ones(leaf.shape, leaf.dtype)
        if len(leaf.shape) < 2:
            return np.zeros(leaf.shape, leaf.dtype)
        fan_in = int(np.prod(leaf.shape[:-1]))
        return (rng.standard_normal(leaf.shape, np.float32) * math.sqrt(2.0 / fan_in)).astype(
            leaf.dtype)

    variables = jax.tree_util.tree_map_with_path(draw, shapes)
    spacing = {"min": spacing_yx_mm, "median": spacing_yx_mm, "max": spacing_yx_mm}
    return TrainedModel(config=config, model=model, variables=variables, step=0,
                        path=pathlib.Path(f"untrained:{name}"), workdir=pathlib.Path("."),
                        task=config.task, num_classes=int(config.model.num_classes),
                        pixel_spacing_mm=spacing, neighbour_mm=3.0, metrics={})


def make_study(folder: pathlib.Path, slices: int, seed: int):
    """Writes a 512 px synthetic CAC study of `slices` slices as DICOM; returns its volume."""
    import dataclasses

    import numpy as np

    from data_pipeline.io import write_dicom_series
    from data_pipeline.phantom import render_scan

    scan = render_scan(seed, "cac", size=512)
    hu = scan.volume.hu
    if hu.shape[0] < slices:
        hu = np.pad(hu, ((0, slices - hu.shape[0]), (0, 0), (0, 0)), mode="reflect")
    volume = dataclasses.replace(scan.volume, hu=hu[:slices])
    write_dicom_series(volume, folder, uid_seed=f"bench-inference-{seed}")
    return volume


def batch_flops(scorer, role: str, bucket_hw: tuple[int, int], offset: int) -> float:
    """FLOPs of one batch call of `role`'s model (XLA cost analysis): a batch of windows, or of
    distinct slices at neighbour `offset` where the model shares them. Counted on the model
    with XLA's convolutions: the oneDNN ones are custom calls, which the cost analysis omits."""
    import jax
    import jax.numpy as jnp

    runner = scorer._runners[role]
    model = runner.trained.model.clone(conv_impl="xla")
    if runner.share_slices:
        specs = (jax.ShapeDtypeStruct((runner._capacity(offset), *bucket_hw, 1), jnp.float32),
                 jax.ShapeDtypeStruct((runner.batch_size, 3), jnp.int32))
        fn = lambda v, x, w: model.apply(v, x, windows=w)[0]  # noqa: E731
    else:
        specs = (jax.ShapeDtypeStruct((runner.batch_size, 3, *bucket_hw, 1), jnp.float32),)
        fn = lambda v, x: model.apply(v, x)[0]  # noqa: E731
    compiled = jax.jit(fn).lower(runner._variables, *specs).compile()
    cost = compiled.cost_analysis()
    if isinstance(cost, list):  # older JAX returns one dict per computation
        cost = cost[0]
    return float(cost["flops"])


def run(args) -> dict:
    """The side-by-side study; returns the results dict."""
    import jax
    import numpy as np

    from cac_jax.inference import Scorer, iter_batches
    from data_pipeline.io import read_study

    results: dict = {"pipelines": {}}
    matmul_gflops: list[float] = []  # the matmul peak before and after each pipeline
    with tempfile.TemporaryDirectory(prefix="bench_inference_") as tmp:
        folder = pathlib.Path(tmp) / "study"
        print(f"rendering a 512 px study of {args.slices} slices", flush=True)
        volume = make_study(folder, args.slices, args.seed)
        spacing_yx = float(volume.spacing_zyx_mm[1])
        read_s = []
        for _ in range(3):
            start = time.perf_counter()
            read_study(folder)
            read_s.append(time.perf_counter() - start)
        results["study"] = {"shape_zyx": list(volume.shape),
                            "spacing_zyx_mm": list(volume.spacing_zyx_mm),
                            "read_s_median": float(np.median(read_s))}
        warm = dataclasses_replace_hu(volume, volume.hu[:args.batch_size])
        for name in args.pipelines:
            heart_name, calcium_name = PIPELINES[name]
            print(f"[{name}] building the models and compiling", flush=True)
            # Untrained heart models give an arbitrary silhouette, so the calcium model runs on
            # every slice here (`calcium_slices="all"`): the fixed, worst-case work; a trained
            # pipeline skips the slices outside the heart (about half on synthetic scans).
            scorer = Scorer(untrained(heart_name, spacing_yx, 1),
                            untrained(calcium_name, spacing_yx, 2), batch_size=args.batch_size,
                            calcium_slices="all", share_slices=name not in WINDOWS)
            start = time.perf_counter()
            scorer.score(warm)
            compile_s = time.perf_counter() - start
            matmul_gflops.append(matmul_peak_gflops(repeats=3))
            runs = []
            for k in range(args.repeats):
                print(f"[{name}] timed study {k + 1}/{args.repeats}", flush=True)
                start = time.perf_counter()
                _, result = scorer.score_path(folder)
                total = time.perf_counter() - start
                runs.append({"total_s": total, **{s: result.timings.get(s, 0.0) for s in STAGES}})
            matmul_gflops.append(matmul_peak_gflops(repeats=3))
            stages = {s: float(np.median([r[s] for r in runs])) for s in STAGES}
            total = float(np.median([r["total_s"] for r in runs]))
            model_s = stages["heart_model"] + stages["calcium_model"]
            bucket = scorer._runners["heart"].bucket(*volume.shape[1:])
            batches = len(list(iter_batches(volume.shape[0], args.batch_size)))
            flops = {role: batch_flops(scorer, role, bucket,
                                       result.neighbour_offsets[role]) * batches
                     for role in ("heart", "calcium")}
            results["pipelines"][name] = {
                "models": [heart_name, calcium_name],
                "warmup_compile_and_run_s": compile_s,
                "runs": runs,
                "stages_s": stages,
                "total_s": total,
                "outside_models_share_of_model_time": (total - model_s) / model_s,
                "outside_models_excl_read_share": (total - model_s - stages["read"]) / model_s,
                "gflop_per_study": {k: v / 1e9 for k, v in flops.items()},
                "model_gflops_per_s": {
                    role: flops[role] / stages[f"{role}_model"] / 1e9 for role in flops},
                "compilations": scorer.compilations,
                "agatston_untrained": result.score.agatston,
            }
            del scorer
        if "convlstm" in args.pipelines and not args.skip_cohort:
            print("[convlstm] cohort of mixed sizes: compilations", flush=True)
            heart_name, calcium_name = PIPELINES["convlstm"]
            scorer = Scorer(untrained(heart_name, spacing_yx, 1),
                            untrained(calcium_name, spacing_yx, 2), batch_size=args.batch_size,
                            calcium_slices="all")
            rng = np.random.default_rng(0)
            for shape in COHORT_SHAPES:
                hu = rng.normal(0, 200, shape).astype(np.float32)
                scorer.score(dataclasses_replace_hu(volume, hu))
            results["cohort"] = {
                "shapes_zyx": [list(s) for s in COHORT_SHAPES],
                "compilations": scorer.compilations,
                "buckets": sorted({tuple(s[-3:-1]) for s in scorer._runners["heart"].shapes}),
            }
    peak = float(np.median(matmul_gflops))
    for r in results["pipelines"].values():
        r["model_fraction_of_matmul_peak"] = {
            role: v / peak for role, v in r["model_gflops_per_s"].items()}
    results.update({
        "command": "python benchmarks/bench_inference.py " + " ".join(sys.argv[1:]),
        "settings": {"slices": args.slices, "batch_size": args.batch_size,
                     "repeats": args.repeats, "seed": args.seed},
        "machine": {"backend": jax.default_backend(), "devices": str(jax.devices()),
                    "cpu_count": os.cpu_count(), "platform": platform.platform(),
                    "load_average_at_end": os.getloadavg(), "jax": jax.__version__},
        "matmul_peak_gflops": peak,
        "matmul_gflops_all": matmul_gflops,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "paper_preprocessing_s": PAPER_PREPROCESSING_S,
    })
    return results


def dataclasses_replace_hu(volume, hu):
    """`volume` with other HU (and so possibly another shape), same spacing and metadata."""
    import dataclasses

    return dataclasses.replace(volume, hu=hu)


def markdown(res: dict) -> str:
    """The results as a markdown report."""
    study = res["study"]
    lines = [
        "# Inference benchmark (`benchmarks/bench_inference.py`)",
        "",
        f"Command: `{res['command']}`; backend {res['machine']['backend']}, "
        f"{res['machine']['cpu_count']} CPUs, load average at the end "
        f"{', '.join(f'{v:.1f}' for v in res['machine']['load_average_at_end'])}.",
        f"Study: {' x '.join(map(str, study['shape_zyx']))} (z, y, x) synthetic CAC scan as DICOM; "
        f"batch {res['settings']['batch_size']} slices; median of {res['settings']['repeats']} "
        "timed studies after a warm-up that compiles.",
        f"Float32 matmul peak measured in the same run ({MATMUL_N}^3, before and after each "
        f"pipeline): {res['matmul_peak_gflops']:.0f} GFLOP/s. Peak RSS of the run: "
        f"{res['peak_rss_bytes'] / 2**30:.2f} GiB.",
        "",
        "| pipeline | read | preprocess | heart model | calcium model | post-process | scoring "
        "| total s | outside models / model time (excl. read) | model GFLOP/s heart / calcium "
        "| % of matmul peak | compilations |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in res["pipelines"].items():
        s = r["stages_s"]
        lines.append(
            f"| {name} | {s['read']:.2f} | {s['preprocess']:.2f} | {s['heart_model']:.2f} | "
            f"{s['calcium_model']:.2f} | {s['postprocess']:.2f} | {s['scoring']:.3f} | "
            f"{r['total_s']:.2f} | {100 * r['outside_models_share_of_model_time']:.1f}% "
            f"({100 * r['outside_models_excl_read_share']:.1f}%) | "
            f"{r['model_gflops_per_s']['heart']:.0f} / {r['model_gflops_per_s']['calcium']:.0f} | "
            f"{100 * r['model_fraction_of_matmul_peak']['heart']:.0f}% / "
            f"{100 * r['model_fraction_of_matmul_peak']['calcium']:.0f}% | "
            f"{r['compilations']['heart']} / {r['compilations']['calcium']} |")
    if "convlstm" in res["pipelines"] and "unet64" in res["pipelines"]:
        c, u = res["pipelines"]["convlstm"], res["pipelines"]["unet64"]
        lines += ["", f"UNet-64 / ConvLSTM time per study: {u['total_s'] / c['total_s']:.2f}x."]
    if "convlstm" in res["pipelines"] and "convlstm_windows" in res["pipelines"]:
        c, w = res["pipelines"]["convlstm"], res["pipelines"]["convlstm_windows"]
        model = sum(c["stages_s"][f"{r}_model"] for r in ("heart", "calcium"))
        model_w = sum(w["stages_s"][f"{r}_model"] for r in ("heart", "calcium"))
        lines += ["", f"ConvLSTM on 3-slice windows / on shared slices: time per study "
                      f"{w['total_s'] / c['total_s']:.2f}x, model time {model_w / model:.2f}x, "
                      f"GFLOP per study {sum(w['gflop_per_study'].values()):.0f} / "
                      f"{sum(c['gflop_per_study'].values()):.0f}."]
    lines += ["", f"The paper's preprocessing alone: {res['paper_preprocessing_s']} s per study."]
    if "cohort" in res:
        co = res["cohort"]
        lines += ["", f"Cohort of {len(co['shapes_zyx'])} studies of sizes "
                      f"{', '.join('x'.join(map(str, s[1:])) for s in co['shapes_zyx'])} (ConvLSTM): "
                      f"{co['compilations']['heart']} compilations per model, buckets "
                      f"{', '.join('x'.join(map(str, b)) for b in co['buckets'])}."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    """Parse arguments, run the study, write the results."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--slices", type=int, default=None, help="slices of the study (default 64)")
    p.add_argument("--batch-size", type=int, default=8, help="slices per model call")
    p.add_argument("--repeats", type=int, default=1, help="timed studies per pipeline")
    p.add_argument("--pipelines", nargs="+", choices=tuple(PIPELINES), default=list(PIPELINES))
    p.add_argument("--seed", type=int, default=3, help="phantom patient seed")
    p.add_argument("--quick", action="store_true", help="a 16-slice study")
    p.add_argument("--skip-cohort", action="store_true", help="skip the compilation cohort")
    p.add_argument("--out", type=pathlib.Path, default=RESULTS, help="results folder")
    args = p.parse_args(argv)
    if args.slices is None:
        args.slices = 16 if args.quick else 64
    from data_pipeline.atomic import atomic_write_text

    res = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "bench_inference.json", json.dumps(res, indent=2) + "\n")
    md = markdown(res)
    atomic_write_text(args.out / "bench_inference.md", md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
