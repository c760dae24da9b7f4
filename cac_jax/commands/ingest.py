"""`cac-jax ingest`: build the versioned TFDS dataset of whole scans from a manifest (offline).

Writes DATA_DIR/NAME/VERSION: TFDS records and dataset_info.json, plus `splits.json`/`splits.csv`
(patient split assignment, for audit), `skipped.json` (rows left out with --skip-bad) and a copy of
the manifest. Training reads it with `data_pipeline.input_pipeline.make_dataset`.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import sys
from pathlib import Path

from cac_jax.commands import positive_int

EPILOG = """\
The manifest is a CSV with columns patient_id, scan_id, protocol (cac|ctac), image, calcium_labels
and optionally heart_mask, site, split, series, agatston, category (paths relative to the
manifest; a missing optional column means empty). An
empty split column assigns patients 80/10/10 with equal numbers of each CAC category in validation
and test (paper); --seed makes that assignment reproducible. A bad row (missing file, geometry
mismatch, unknown protocol) stops the build with an error naming the row, unless --skip-bad;
the manifest and --data-dir are checked before TensorFlow is loaded or anything is written.
--overwrite builds the new dataset first and replaces the old one only when the build succeeds. Validation and test get at least one patient
each from 3 patients to assign on; a split left empty is reported as a warning on stderr. With
--skip-bad, splits.json/splits.csv list only the scans in the dataset (skipped ones under
"skipped" in splits.json).

example:
  cac-jax synth --out cohort --patients 20
  cac-jax ingest --manifest cohort/manifest.csv --data-dir data/tfds --name cac_ct
"""


def _seed(text: str) -> int:
    """argparse type: a seed >= 0 (numpy's generators refuse negative seeds)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def register(subparsers: argparse._SubParsersAction) -> None:
    """Adds the `ingest` subcommand to the `cac-jax` parser."""
    parser = subparsers.add_parser(
        "ingest",
        help="build the TFDS dataset (whole scans, labels, splits) from a manifest",
        description="Reads every scan of the manifest (DICOM folders or image files), maps the "
                    "calcium labels to the 3 training classes and stores whole scans, heart masks, "
                    "spacing, protocol and reference scores as a versioned TFDS dataset.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--manifest", required=True, metavar="M.csv", help="the study manifest")
    parser.add_argument("--data-dir", required=True, metavar="D",
                        help="TFDS data directory; the dataset goes to D/NAME/VERSION")
    parser.add_argument("--name", default="cac_ct", metavar="N",
                        help="dataset name (lower_snake_case; default: cac_ct)")
    parser.add_argument("--seed", type=_seed, default=0, metavar="S",
                        help="seed of the patient split assignment (default: 0)")
    parser.add_argument("--skip-bad", action="store_true",
                        help="skip bad rows (listed on stderr and in skipped.json) instead of "
                             "stopping at the first")
    parser.add_argument("--overwrite", action="store_true",
                        help="rebuild when the dataset already exists")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--workers", type=positive_int, default=1, metavar="N",
                        help="processes reading the studies at once (default 1; the dataset is "
                             "the same whatever N)")
    parser.set_defaults(func=handler)


def handler(args: argparse.Namespace) -> int:
    """Builds the dataset; prints where it went, the split sizes and what was skipped."""
    target, n_rows = preflight(args)
    print(f"cac-jax ingest: building {args.name} from {n_rows} scan(s) of {args.manifest} "
          f"into {target}", file=sys.stderr)

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    with _quiet_native_stderr():
        # TensorFlow's C++ logging prints a few lines when it loads, whatever the log level.
        from data_pipeline.input_pipeline import _tf
        from data_pipeline.tfds_builder import build_dataset

        tf = _tf()  # keep TensorFlow off the GPUs
    tf.get_logger().setLevel("ERROR")
    with contextlib.suppress(ImportError):
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.ERROR)

    def on_skip(line: str) -> None:
        print(f"cac-jax ingest: {line}", file=sys.stderr)

    def on_warning(line: str) -> None:
        print(f"cac-jax ingest: warning: {line}", file=sys.stderr)

    # TFDS prints "Downloading and preparing dataset Unknown size ..." for this offline build;
    # our own lines (above and below) say what happens.
    with contextlib.redirect_stdout(io.StringIO()):
        builder = build_dataset(args.manifest, args.data_dir, name=args.name,
                                split_seed=args.seed, skip_bad=args.skip_bad,
                                overwrite=args.overwrite, progress=not args.quiet,
                                on_skip=on_skip, on_warning=on_warning,
                                workers=args.workers)
    from cac_jax.commands.score import write_stdout

    sizes = ", ".join(f"{name} {info.num_examples}" for name, info in builder.info.splits.items())
    text = f"dataset {args.name} {builder.info.version} in {builder.data_dir}: scans {sizes}\n"
    if builder.skipped:
        text += f"skipped {len(builder.skipped)} row(s); see {builder.data_dir}/skipped.json\n"
    write_stdout(text)
    return 0


_NAME_RE = re.compile(r"^[a-z_][a-z0-9_]*$")


def preflight(args: argparse.Namespace) -> tuple[Path, int]:
    """Checks what can be checked without TensorFlow (dataset name, --data-dir, the manifest,
    an existing dataset without --overwrite), so bad input fails fast and quietly.

    Returns (DATA_DIR/NAME/VERSION, number of usable rows). `build_dataset` repeats these checks.
    """
    from data_pipeline.config import DATASET_VERSION
    from data_pipeline.errors import InputError, ManifestError
    from data_pipeline.manifest import parse_manifest
    from data_pipeline.splits import given_splits

    if not _NAME_RE.match(args.name):
        raise InputError(None, f"dataset name {args.name!r} must be lower_snake_case "
                               "(letters, digits, underscores)")
    if args.data_dir.strip() == "":
        raise InputError(None, "--data-dir is empty")
    data_dir = Path(args.data_dir).expanduser()
    target = data_dir / args.name / DATASET_VERSION
    probe = target
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise InputError(probe, f"is a file, not a directory (the dataset goes to {target}); "
                                "--data-dir must be a directory (it is created when missing)")
    if args.overwrite and target.is_dir() and \
            Path(args.manifest).resolve().is_relative_to(target.resolve()):
        raise InputError(args.manifest, f"is inside the dataset folder {target} that --overwrite "
                                        "would replace; copy it elsewhere first")
    rows, errors = parse_manifest(args.manifest)
    if errors and not args.skip_bad:
        more = (f" (and {len(errors) - 1} more bad rows; --skip-bad skips them)"
                if len(errors) > 1 else " (--skip-bad skips bad rows)")
        raise ManifestError(errors[0].path, errors[0].problem + more)
    if not rows:
        raise ManifestError(args.manifest, "no usable rows in the manifest")
    by_patient: dict[str, list] = {}
    for row in rows:
        by_patient.setdefault(row.patient_id, []).append(row)
    given_splits(by_patient, args.manifest)  # a patient in two splits: refused here, before TF
    if args.overwrite and target.is_dir():
        # The old dataset is replaced only after a successful build, but its files must not be
        # the inputs of the new one (its manifest.csv copy, say).
        inside = [str(path) for row in rows
                  for path in (row.image, row.calcium_labels, row.heart_mask)
                  if path is not None and path.resolve().is_relative_to(target.resolve())]
        if inside:
            raise InputError(inside[0], f"is inside the dataset folder {target} that --overwrite "
                                        "would replace; copy it elsewhere first")
    if target.is_dir() and any(target.iterdir()) and not args.overwrite:
        what = ("dataset already built here" if (target / "dataset_info.json").exists()
                else "folder holds files but no finished dataset")
        raise InputError(target, f"{what}; pass --overwrite to rebuild it or --name to build "
                                 "another")
    return target, len(rows)


@contextlib.contextmanager
def _quiet_native_stderr():
    """Sends file descriptor 2 to /dev/null while native libraries load (their C++ logging
    bypasses Python's sys.stderr); Python exceptions still propagate and are reported."""
    try:
        saved = os.dup(2)
    except OSError:  # no usable stderr: nothing to quiet
        yield
        return
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
