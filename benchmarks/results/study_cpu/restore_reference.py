"""Put committed reference models back into a study folder as its finished trainings.

    PYTHONPATH=. python benchmarks/results/study_cpu/restore_reference.py /work/study_out \
        heart_convlstm calcium_convlstm

Used after the study folder was lost (RUN.md, step 8): the cohorts and the dataset are rebuilt by
`cac-jax study --stages cohorts,dataset` (same seeds, same scans), and the ConvLSTM pair is taken
from models/synthetic/ instead of being trained again. For each name it checks that the reference
model was trained with exactly the config the study would train now (config.json against the
study's config file and overrides, the dataset folder aside), then copies its parameters and
config into OUT/models/NAME, with this record's summary and metrics log of that training, and
writes the training's stamp so that `--stages infer` and `export` take it as finished.
The inference of the restored pair must reproduce the committed eval/*_convlstm/results.csv.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from cac_jax import stages, study
from cac_jax.config_defaults import load_config_file
from cac_jax.main import parse_flags
from cac_jax.train import config_differences

ROOT = Path(__file__).resolve().parents[3]
RECORD = Path(__file__).resolve().parent


# Fields training derives (the per-device batch from the batch and the devices, the data seed from
# `seed`) and the dataset folder: not settings a user chose.
DERIVED = ("data.data_dir", "data.per_device_batch", "data.seed")


def restore(out: Path, name: str, study_config) -> None:
    reference = ROOT / "models" / "synthetic" / name
    config_path, overrides, wanted = study.training_stamp(out, study_config, name)
    parsed, _ = parse_flags(["--config", config_path, "--workdir", "w",
                             *(f"--config.{item}" for item in overrides)])
    trained = json.loads((reference / "config.json").read_text())
    differing = [d for d in config_differences(trained, parsed) if not d.startswith(DERIVED)]
    if differing:
        raise SystemExit(f"{reference}: trained with another config than the study's {name}: "
                         + "; ".join(differing))
    workdir = out / "models" / name
    if workdir.exists():
        raise SystemExit(f"{workdir}: exists; remove it to restore {name}")
    shutil.copytree(reference, workdir, ignore=shutil.ignore_patterns("MODEL.md"))
    summary = json.loads((RECORD / f"{name}_summary.json").read_text())
    summary["restored_from"] = str(reference.relative_to(ROOT))
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
    shutil.copy(RECORD / f"{name}_metrics.jsonl", workdir / "metrics.jsonl")
    stages._Stamps(out).mark(f"train_{name}", wanted)
    print(f"{name}: {reference} -> {workdir} (best step {summary['best_step']})")


def main(argv: list[str]) -> None:
    out, names = Path(argv[0]), argv[1:]
    study_config = load_config_file(str(ROOT / "configs" / "study.py"))
    for name in names:
        restore(out, name, study_config)


if __name__ == "__main__":
    main(sys.argv[1:])
