"""How many more steps the demo and the study train with the oneDNN convolutions (docs/onednn.md).

    python benchmarks/bench_train_throughput.py                       # demo and study trainings
    python benchmarks/bench_train_throughput.py --runs demo --out /tmp/throughput

Runs the real `cac-jax train` commands of the demo (its four time-boxed models, with the demo's
own time boxes and settings: `cac_jax.demo.train_overrides`) and of the CPU study (its four
models, `configs/study.py` trainings, each for `--study-seconds`) once with
`model.conv_impl=xla` and once with `onednn`, the two back to back for each model so load from
other processes hits both alike. Each run trains on a small synthetic cohort made here at the
run's own matrix size (the demo's 128 px, the study's 256 px), with validation only at the end of
the box (outside the measured time), and reports:
- `steps`: steps trained inside the time box (the demo's box: what its models get);
- `steps_per_s`: the steady rate, from the training log (`metrics.jsonl`: steps between its first
  and last row over their `elapsed_s`), start-up and compilation excluded;
- `startup_s` (JSON only): `elapsed_s` of the first log row minus its steps at the steady rate
  (about 0: the time box starts after the model is built and compiled).
The study's trainings stop by early stopping, not a time box, so for them the gain is reported as
the time of the steps their reference runs took (`STUDY_STEPS`) at each rate.
Writes bench_train_throughput.json and .md under --out (benchmarks/results/bench_train_throughput
by default), with the machine and the matmul peak measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import sys
import time

RESULTS = pathlib.Path(__file__).resolve().parent / "results" / "bench_train_throughput"
IMPLS = ("xla", "onednn")
# Steps of the study's reference trainings (benchmarks/results/study_cpu/RUN.md): the calcium
# ConvLSTM stopped early at 5000, the heart ConvLSTM ran to 2050.
STUDY_STEPS = {"calcium_convlstm": 5000, "heart_convlstm": 2050, "calcium_unet": 5000,
               "heart_unet": 2050}


def _cohort(work: pathlib.Path, size: int, patients: int, seed: int) -> pathlib.Path:
    """A synthetic cohort at `size` px ingested as a TFDS dataset; returns its data_dir."""
    from cac_jax import demo

    folder, data_dir = work / f"cohort_{size}", work / f"tfds_{size}"
    if not (data_dir / "cac_ct").exists():
        shutil.rmtree(folder, ignore_errors=True)
        demo._cli("synth", "--out", str(folder), "--patients", str(patients), "--size",
                  str(size), "--seed", str(seed), "--workers", "2", stage=f"synth {size}")
        demo._cli("ingest", "--manifest", str(folder / "manifest.csv"), "--data-dir",
                  str(data_dir), "--seed", str(seed), "--overwrite", stage=f"ingest {size}")
    return data_dir


def _rate(workdir: pathlib.Path) -> tuple[float | None, float | None]:
    """(steady steps/s, seconds before the first step) from a run's metrics.jsonl."""
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()
            if line.strip()]
    rows = [r for r in rows if "elapsed_s" in r and "step" in r]
    if len(rows) < 3:
        return None, None
    # The last row is the box's end (its window may be partial): the rate is over whole windows.
    first, last = rows[0], rows[-2]
    rate = (last["step"] - first["step"]) / max(last["elapsed_s"] - first["elapsed_s"], 1e-9)
    return rate, first["elapsed_s"] - first["step"] / rate


def _train(config: str, overrides: dict, impl: str, workdir: pathlib.Path) -> dict:
    from cac_jax import demo

    shutil.rmtree(workdir, ignore_errors=True)
    args = ["train", "--config", config, "--workdir", str(workdir)]
    args += [f"--config.{k}={v}" for k, v in overrides.items()]
    args += [f"--config.model.conv_impl={impl}", "--config.train.progress=False"]
    t0 = time.perf_counter()
    demo._cli(*args, stage=f"train {workdir.name}")
    summary = json.loads((workdir / "summary.json").read_text())
    rate, startup = _rate(workdir)
    return {"steps": summary["steps"], "steps_per_s": rate, "startup_s": startup,
            "box_s": float(overrides["train.max_seconds"]),
            "process_s": time.perf_counter() - t0, "timed_out": summary["timed_out"]}


def demo_runs(work: pathlib.Path, patients: int) -> list[dict]:
    from cac_jax import demo
    from cac_jax.stages import _config_path

    s = demo.DemoSettings.full()
    data_dir = _cohort(work, s.size, patients, seed=1)
    rows = []
    for (task, arch), config in demo.TRAINED.items():
        overrides = demo.train_overrides(data_dir, s, task)
        # Validation only at the end of the box (the demo's own eval_every is already past it).
        overrides.update({"train.eval_every": 10**6, "train.checkpoint_every": 10**6})
        for impl in IMPLS:
            name = f"demo_{task}_{arch}"
            print(f"[throughput] {name} {impl} ({overrides['train.max_seconds']:.0f} s box)",
                  flush=True)
            row = _train(_config_path(config), overrides, impl, work / "runs" / f"{name}_{impl}")
            rows.append({"run": name, "impl": impl, **row})
    return rows


def study_runs(work: pathlib.Path, patients: int, seconds: float) -> list[dict]:
    from cac_jax.config_defaults import load_config_file
    from cac_jax.study import _config_file

    root = pathlib.Path(__file__).resolve().parents[1]
    config = load_config_file(root / "configs" / "study.py")
    data_dir = _cohort(work, int(config.size), patients, seed=2)
    rows = []
    for name in ("heart_convlstm", "calcium_convlstm", "heart_unet", "calcium_unet"):
        spec = config.trainings[name]
        overrides = dict(item.split("=", 1) for item in spec.overrides)
        overrides.update({"data.data_dir": str(data_dir), "data.name": "cac_ct",
                          "train.max_seconds": seconds, "train.eval_every": 10**6,
                          "train.checkpoint_every": 10**6, "train.log_every": 10})
        overrides.pop("train.progress", None)  # set by _train
        for impl in IMPLS:
            print(f"[throughput] study {name} {impl} ({seconds:.0f} s box)", flush=True)
            row = _train(_config_file(spec.config)[0], overrides, impl,
                         work / "runs" / f"study_{name}_{impl}")
            row["reference_steps"] = STUDY_STEPS[name]
            rows.append({"run": f"study_{name}", "impl": impl, **row})
    return rows


def _pairs(rows: list[dict]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for row in rows:
        out.setdefault(row["run"], {})[row["impl"]] = row
    return out


def write_results(out: pathlib.Path, result: dict) -> None:
    from cac_jax import train_support as support

    out.mkdir(parents=True, exist_ok=True)
    support.write_text(out / "bench_train_throughput.json", json.dumps(result, indent=2) + "\n")
    m = result["machine"]
    lines = ["# Training steps in the same time: XLA's convolutions against oneDNN's", "",
             f"Machine: {m['cpu']}, {m['cpus']} CPUs, JAX {m['jax']}; float32 matmul peak "
             f"{m['peak_before']:.0f} GFLOP/s before, {m['peak_after']:.0f} after; 1-minute "
             f"load average {m['load_before']:.1f} at the start, {m['load_after']:.1f} at the "
             "end. Each model's two runs ran back to back.", "",
             "| run | box s | steps (xla) | steps (onednn) | more steps | steps/s (xla) | "
             "steps/s (onednn) | rate ratio |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for run, pair in _pairs(result["rows"]).items():
        x, o = pair.get("xla"), pair.get("onednn")
        if not (x and o):
            continue
        ratio = (o["steps_per_s"] / x["steps_per_s"]
                 if o["steps_per_s"] and x["steps_per_s"] else float("nan"))
        lines.append(
            f"| {run} | {x['box_s']:.0f} | {x['steps']} | {o['steps']} | "
            f"{o['steps'] / max(x['steps'], 1):.2f}x | {x['steps_per_s'] or float('nan'):.2f} | "
            f"{o['steps_per_s'] or float('nan'):.2f} | {ratio:.2f}x |")
    study = [(run, pair) for run, pair in _pairs(result["rows"]).items()
             if run.startswith("study_") and {"xla", "onednn"} <= set(pair)]
    if study:
        lines += ["", "The study's trainings at these steady rates (steps of its reference runs, "
                  "validation excluded):", "",
                  "| training | steps | minutes (xla) | minutes (onednn) | steps per hour (xla) "
                  "| steps per hour (onednn) |", "|---|---:|---:|---:|---:|---:|"]
        for run, pair in study:
            x, o = pair["xla"], pair["onednn"]
            n = x["reference_steps"]
            if x["steps_per_s"] and o["steps_per_s"]:
                lines.append(f"| {run[len('study_'):]} | {n} | {n / x['steps_per_s'] / 60:.0f} | "
                             f"{n / o['steps_per_s'] / 60:.0f} | {3600 * x['steps_per_s']:.0f} | "
                             f"{3600 * o['steps_per_s']:.0f} |")
    lines += ["", f"Command: `{result['command']}`", ""]
    support.write_text(out / "bench_train_throughput.md", "\n".join(lines))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", default="demo,study", help="comma-separated: demo, study")
    p.add_argument("--study-seconds", type=float, default=60.0,
                   help="time box of each study training run (default 60)")
    p.add_argument("--patients", type=int, default=10, help="patients of each small cohort")
    p.add_argument("--work", type=pathlib.Path, default=pathlib.Path("/tmp/cac_jax_throughput"))
    p.add_argument("--out", type=pathlib.Path, default=RESULTS)
    args = p.parse_args(argv)
    runs = {r.strip() for r in args.runs.split(",") if r.strip()}
    if not runs or not runs <= {"demo", "study"}:
        p.error(f"--runs must name demo and/or study, got {args.runs!r}")

    from cac_jax.benchmark import machine_info, matmul_peak_gflops

    info = machine_info(("jax",))
    machine = {"cpu": info["cpu_model"], "cpus": info["logical_cores"], "jax": info["jax"],
               "peak_before": matmul_peak_gflops(), "load_before": os.getloadavg()[0]}
    args.work.mkdir(parents=True, exist_ok=True)
    rows = []
    if "demo" in runs:
        rows += demo_runs(args.work, args.patients)
    if "study" in runs:
        rows += study_runs(args.work, args.patients, args.study_seconds)
    machine.update(peak_after=matmul_peak_gflops(), load_after=os.getloadavg()[0])
    result = {"machine": machine, "rows": rows,
              "command": "python benchmarks/bench_train_throughput.py " + " ".join(sys.argv[1:])}
    write_results(args.out, result)
    print((args.out / "bench_train_throughput.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
