#!/usr/bin/env python
"""How much of each patient's gated CAC category the generator's CTAC scan still shows.

    python benchmarks/ctac_visibility.py --patients 60 --size 256 \
        --variants base,nomotion,motion0.5,window0.6,noise0.5,vis2,thick3

For every variant, renders the same patients (the study's held-out seeds and categories:
`patient_seed(SEED, k)`, equal category blocks) with both protocols and scores the CTAC truth
(the calcium the generator labels as visible in the CTAC scan) against the gated truth, with
scikit-learn's linearly weighted kappa over the four categories: the paper's CTAC design applied
to a reader who reads every CTAC scan's labels perfectly. A model can beat this number only by
calling plaques the CTAC labels leave out (`benchmarks/ctac_lesions.py`; docs/study.md).

A variant changes one thing in how the CTAC is imaged ('+' joins several); the gated scan and
the patients are unchanged:
- `base`: the generator as it is;
- `nomotion`: no cardiac motion; `motionK`: the motion amplitude times K;
- `windowW`: each slice averages the coronary's positions over a reconstruction window of W of
  the cardiac cycle from that slice's phase (`Protocol.motion_window`), instead of the whole
  cycle; `windowA-B`: W drawn per patient, uniform in [A, B], from the patient's own random
  stream after its CTAC protocol (as the generator would draw it);
- `noiseK`: the CTAC noise sigma times K;
- `visS`: a calcification is labelled when its peak excess reaches S noise sigmas (the generator:
  `render.VISIBLE_SIGMAS`, 3);
- `thick3`: 3 mm contiguous slices instead of the drawn 3/4/5 mm;
- `calibrated`: the generator's calibrated CTAC imaging (`cac-jax synth --ctac-imaging
  calibrated`, `acquisition.CTAC_IMAGING`), which is `window0.3-1.0+noise0.5` drawn the same way.

Writes OUT/ctac_visibility.json (per variant: kappa, exact agreement, the gated x CTAC category
table, every patient's two scores) and OUT/ctac_visibility.md, atomically. Each finished variant is
kept in the JSON, so a rerun with the same settings skips it (resumable).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cac_jax.benchmark import machine_info  # noqa: E402
from data_pipeline.atomic import atomic_write_text  # noqa: E402
from data_pipeline.phantom import cohort, render  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "ctac_visibility"
SEED = 10000   # the classic study's held-out default-site patients (configs/study.py)


def _ctac_change(part: str):
    """The (Protocol, rng) -> Protocol change of one variant part (None for `base` and `visS`);
    `rng` is the patient's random stream, just after its CTAC protocol was drawn."""
    if part in ("base", "calibrated") or part.startswith("vis"):
        return None
    if part == "nomotion":
        return lambda p, rng: dataclasses.replace(p, motion={})
    if part.startswith("motion"):
        k = float(part[len("motion"):])
        return lambda p, rng: dataclasses.replace(
            p, motion={a: (d, amp * k) for a, (d, amp) in p.motion.items()})
    if part.startswith("window"):
        lo, _, hi = part[len("window"):].partition("-")
        lo, hi = float(lo), float(hi or lo)
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"{part}: the window is a fraction of the cycle in (0, 1]")
        if lo == hi:
            return lambda p, rng: dataclasses.replace(p, motion_window=lo)
        return lambda p, rng: dataclasses.replace(p, motion_window=float(rng.uniform(lo, hi)))
    if part.startswith("noise"):
        k = float(part[len("noise"):])
        return lambda p, rng: dataclasses.replace(p, noise_sigma_hu=p.noise_sigma_hu * k)
    if part == "thick3":
        def thin(p, rng):
            n = int(round(p.n_slices * p.spacing_z_mm / 3.0))
            phase = np.random.default_rng(n).uniform(-1, 1, size=n)
            return dataclasses.replace(p, thickness_mm=3.0, spacing_z_mm=3.0, n_slices=n,
                                       slice_phase=phase)
        return thin
    raise ValueError(f"unknown variant part {part!r}")


@contextlib.contextmanager
def imaged_as(variant: str):
    """The generator with `variant`'s CTAC imaging for the duration of the block."""
    parts = variant.split("+")
    changes = [c for c in map(_ctac_change, parts) if c is not None]
    sigmas = [float(p[3:]) for p in parts if p.startswith("vis")]
    imaging = "calibrated" if "calibrated" in parts else None
    original_protocol, original_sigmas = render.sample_protocol, render.VISIBLE_SIGMAS

    def sample_protocol(name, anatomy, rng, **kwargs):
        if imaging is not None:
            kwargs["ctac_imaging"] = imaging
        protocol = original_protocol(name, anatomy, rng, **kwargs)
        if name == "ctac":
            for change in changes:
                protocol = change(protocol, rng)
        return protocol

    render.sample_protocol = sample_protocol
    if sigmas:
        render.VISIBLE_SIGMAS = sigmas[-1]
    try:
        yield
    finally:
        render.sample_protocol, render.VISIBLE_SIGMAS = original_protocol, original_sigmas


def run_variant(variant: str, patients: int, size: int) -> dict:
    from sklearn.metrics import cohen_kappa_score

    categories = cohort.assign_categories(SEED, patients)
    rows, start = [], time.perf_counter()
    with imaged_as(variant):
        for k in range(patients):
            scans = cohort.render_patient(cohort.patient_seed(SEED, k), size=size,
                                          category=categories[k])
            rows.append({"patient": k, "gated_category": scans["cac"].category,
                         "ctac_category": scans["ctac"].category,
                         "gated_agatston": round(scans["cac"].agatston, 1),
                         "ctac_agatston": round(scans["ctac"].agatston, 1)})
    gated = [r["gated_category"] for r in rows]
    ctac = [r["ctac_category"] for r in rows]
    table = [[sum(1 for g, c in zip(gated, ctac) if (g, c) == (i, j)) for j in range(4)]
             for i in range(4)]
    return {"variant": variant, "patients": patients, "size": size,
            "kappa": float(cohen_kappa_score(gated, ctac, weights="linear", labels=[0, 1, 2, 3])),
            "exact": float(np.mean(np.array(gated) == np.array(ctac))),
            "table_gated_x_ctac": table, "seconds": time.perf_counter() - start, "rows": rows}


def markdown(result: dict) -> str:
    lines = [f"# CTAC truth against the gated truth ({result['patients']} patients, "
             f"{result['size']} px)", "",
             f"`{result['command']}` on {result['machine']}.", "",
             "| variant | kappa (linear, 4 categories) | exact | gated 0 / 1 / 2 / 3 -> CTAC 0 |",
             "| --- | --- | --- | --- |"]
    for v in result["variants"].values():
        lost = " / ".join(f"{row[0]}/{sum(row)}" for row in v["table_gated_x_ctac"])
        lines.append(f"| {v['variant']} | {v['kappa']:.3f} | {v['exact']:.2f} | {lost} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=60)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--variants", default="base,nomotion,window0.6,noise0.5,vis2,thick3")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    variants = [v for v in args.variants.split(",") if v]
    for v in variants:   # unknown variants fail before any rendering: one line, exit code 2
        for part in v.split("+"):
            try:
                _ctac_change(part)
            except ValueError as err:
                parser.error(f"--variants: {err}")
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    path = out / "ctac_visibility.json"
    result = json.loads(path.read_text()) if path.exists() else {}
    if (result.get("patients"), result.get("size")) != (args.patients, args.size):
        result = {"patients": args.patients, "size": args.size, "variants": {}}
    result["command"] = "python benchmarks/ctac_visibility.py " + " ".join(sys.argv[1:])
    machine = machine_info(())
    result["machine"] = f"{machine['cpu_model']}, {machine['logical_cores']} cores"
    for variant in variants:
        if variant in result["variants"]:
            print(f"{variant}: kept from the last run")
            continue
        result["variants"][variant] = run_variant(variant, args.patients, args.size)
        v = result["variants"][variant]
        print(f"{variant}: kappa {v['kappa']:.3f}, exact {v['exact']:.2f} ({v['seconds']:.0f} s)",
              flush=True)
        atomic_write_text(path, json.dumps(result, indent=2) + "\n")
    atomic_write_text(out / "ctac_visibility.md", markdown(result))
    print(f"wrote {path} and {out / 'ctac_visibility.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
