"""benchmarks/bench_train_throughput.py: the steady rate read from a training log, and the report."""

from __future__ import annotations

import json
import pathlib

import pytest
from script_loader import load_benchmark

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def script():
    return load_benchmark("bench_train_throughput")


def _log(workdir: pathlib.Path, rows: list[dict]) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_the_rate_is_over_whole_log_windows(script, tmp_path):
    # 10 steps per row at 2 steps/s after a 7 s start; the last (partial) window is ignored.
    rows = [{"step": 10 * k, "elapsed_s": 7.0 + 5.0 * k, "loss": 1.0} for k in range(1, 6)]
    rows.append({"step": 53, "elapsed_s": 40.0})
    rows.insert(2, {"step": 20, "val_kappa": 0.5})  # a validation row has no elapsed_s
    _log(tmp_path, rows)
    rate, startup = script._rate(tmp_path)
    assert rate == pytest.approx(2.0)
    assert startup == pytest.approx(7.0)
    _log(tmp_path / "short", rows[:2])
    assert script._rate(tmp_path / "short") == (None, None)


def test_the_report_pairs_the_two_implementations(script, tmp_path):
    def row(run, impl, steps, rate, reference=None):
        out = {"run": run, "impl": impl, "steps": steps, "steps_per_s": rate, "startup_s": 1.0,
               "box_s": 60.0, "process_s": 80.0, "timed_out": True}
        if reference:
            out["reference_steps"] = reference
        return out

    result = {"machine": {"cpu": "test cpu", "cpus": 2, "jax": "x", "peak_before": 100.0,
                          "peak_after": 101.0, "load_before": 0.1, "load_after": 0.2},
              "rows": [row("demo_heart_convlstm", "xla", 100, 2.0),
                       row("demo_heart_convlstm", "onednn", 150, 3.0),
                       row("study_calcium_convlstm", "xla", 60, 1.0, 3600),
                       row("study_calcium_convlstm", "onednn", 90, 1.5, 3600)],
              "command": "python benchmarks/bench_train_throughput.py"}
    script.write_results(tmp_path, result)
    md = (tmp_path / "bench_train_throughput.md").read_text()
    assert "| demo_heart_convlstm | 60 | 100 | 150 | 1.50x | 2.00 | 3.00 | 1.50x |" in md
    # 3600 steps: 60 min at 1 step/s, 40 min at 1.5 steps/s.
    assert "| calcium_convlstm | 3600 | 60 | 40 | 3600 | 5400 |" in md
    assert json.loads((tmp_path / "bench_train_throughput.json").read_text()) == result


def test_runs_must_be_demo_or_study(script):
    with pytest.raises(SystemExit) as err:
        script.main(["--runs", "demo,nonsense"])
    assert err.value.code == 2
