"""Validation time of a calcium model: every slice against the slices near the heart.

    python benchmarks/bench_validation.py --checkpoint models/synthetic/calcium_convlstm \
        --data-dir study_out/tfds --rounds 2

Training validates every `eval_every` steps: the calcium model runs on every slice of every
validation scan, and each scan is scored as inference scores it. With
`config.data.eval_slices="heart"` it runs only on the slices within 3 mm of the reference heart,
where the scorer counts calcium (docs/training.md). This loads a trained calcium model,
runs `cac_jax.validation.evaluate` (the function training calls) on the dataset's validation
split with "all", "heart" and "heart_windows" in alternating rounds ("heart_windows": the heart
slab with a ConvLSTM run on each 3-slice window instead of each batch's distinct slices, as
validation ran before it shared slices), and reports per mode the seconds per pass
(median over the rounds, the iterator built outside the timing), the slices run, and the
validation metrics: every category metric (`val_kappa*`, `val_exact*`, `val_scans`) must be equal,
and the script exits 1 where one is not. Writes bench_validation.json and .md under --out
(benchmarks/results/bench_validation by default) with the machine.
"""

from __future__ import annotations

import argparse
import functools
import json
import pathlib
import statistics
import sys
import time

RESULTS = pathlib.Path(__file__).resolve().parent / "results" / "bench_validation"
# "heart_windows": the heart slab with the model on each 3-slice window, as validation ran before
# a ConvLSTM's batches went to it as distinct slices (`evaluate(share_slices=...)`).
MODES = ("all", "heart", "heart_windows")
CATEGORY_KEYS = ("val_kappa", "val_exact", "val_scans")


def _pass(config, p_eval, state, mode: str, share: bool) -> tuple[float, int, dict]:
    """(seconds, slices run, metrics) of one validation pass in `mode` (see MODES); `share`:
    whether the model takes distinct slices (training passes `shares_slices(model)`)."""
    from cac_jax.validation import _reference_heart_masks, evaluate
    from data_pipeline.input_pipeline import make_dataset

    config.data.eval_slices = "heart" if mode == "heart_windows" else mode
    iterator = make_dataset(config, "validation", train=False, local_devices=1)
    masks = _reference_heart_masks(config.data, "validation", {s.scan_id for s in iterator.scans})
    start = time.perf_counter()
    metrics = evaluate(config, p_eval, state, iterator, masks,
                       share_slices=share and mode != "heart_windows")
    return time.perf_counter() - start, int(iterator.samples_per_epoch), metrics


def run(checkpoint: str, data_dir: str, rounds: int) -> dict:
    import jax

    from cac_jax import distributed as dist
    from cac_jax.benchmark import machine_info
    from cac_jax.checkpoints import load_trained
    from cac_jax.distributed import AXIS
    from cac_jax.models import shares_slices
    from cac_jax.steps import TrainState, eval_step

    trained = load_trained(checkpoint)
    if trained.task != "calcium":
        raise SystemExit(f"{checkpoint}: a {trained.task} model; validation by heart slab is for "
                         "calcium models")
    config = trained.config
    config.data.data_dir = str(data_dir)
    device = jax.local_devices()[:1]
    state = TrainState(step=jax.numpy.zeros((), jax.numpy.int32),
                       params=trained.variables["params"],
                       batch_stats=trained.variables.get("batch_stats", {}), opt_state=())
    state = dist.replicate(state, device)
    p_eval = jax.pmap(functools.partial(eval_step, model=trained.model, config=config),
                      axis_name=AXIS, devices=device)
    share = shares_slices(trained.model)
    for mode in MODES[1:] if share else MODES[1:2]:  # compile each batch structure
        _pass(config, p_eval, state, mode, share)
    seconds = {mode: [] for mode in MODES}
    slices, metrics = {}, {}
    for _ in range(rounds):
        for mode in MODES:
            took, slices[mode], metrics[mode] = _pass(config, p_eval, state, mode, share)
            seconds[mode].append(took)
            print(f"{mode}: {took:.1f} s, {slices[mode]} slices", flush=True)
    same = {k: tuple(metrics[mode][k] for mode in MODES) for k in metrics["all"]
            if k.startswith(CATEGORY_KEYS)}
    return {
        "checkpoint": str(checkpoint), "step": trained.step, "data_dir": str(data_dir),
        "rounds": rounds, "machine": machine_info(("jax",)),
        "seconds": seconds,
        "median_s": {m: statistics.median(v) for m, v in seconds.items()},
        "slices": slices, "metrics": metrics,
        "categories_equal": all(len(set(v)) == 1 for v in same.values()),
        "speedup": statistics.median(seconds["all"]) / statistics.median(seconds["heart"]),
        "shared_slices": share,
        "shared_speedup": (statistics.median(seconds["heart_windows"])
                           / statistics.median(seconds["heart"])),
    }


def markdown(result: dict) -> str:
    m = result["metrics"]
    lines = [
        "# Validation pass: every slice, the slices near the heart, and those as windows", "",
        f"Checkpoint `{result['checkpoint']}` (step {result['step']}), the validation split of "
        f"`{result['data_dir']}`, {result['rounds']} alternating rounds; "
        f"{result['machine'].get('cpu_model', '?')}.", "",
        "| eval_slices | slices run | seconds per pass (median) | val_kappa | val_kappa_cac | "
        "val_kappa_ctac | val_loss |",
        "| --- | --- | --- | --- | --- | --- | --- |"]
    for mode in MODES:
        lines.append(
            f"| {mode} | {result['slices'][mode]} | {result['median_s'][mode]:.1f} | "
            f"{m[mode].get('val_kappa', float('nan')):.3f} | "
            f"{m[mode].get('val_kappa_cac', float('nan')):.3f} | "
            f"{m[mode].get('val_kappa_ctac', float('nan')):.3f} | "
            f"{m[mode].get('val_loss', float('nan')):.5f} |")
    lines += ["", f"Speed-up of a pass: {result['speedup']:.2f}x (heart slab over every slice); "
                  f"{result['shared_speedup']:.2f}x (the heart slab's windows over its distinct "
                  f"slices; the model shares slices: {result['shared_slices']}); every category "
                  f"metric equal: {'yes' if result['categories_equal'] else 'NO'}.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a calcium model (workdir or step)")
    parser.add_argument("--data-dir", required=True, help="TFDS data_dir with its validation split")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    result = run(args.checkpoint, args.data_dir, args.rounds)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_validation.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "bench_validation.md").write_text(markdown(result))
    print(markdown(result))
    return 0 if result["categories_equal"] else 1


if __name__ == "__main__":
    sys.exit(main())
