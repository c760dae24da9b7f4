"""`cac-jax ingest`: build the versioned TFDS dataset of whole scans from a manifest (offline).

Writes DATA_DIR/NAME/VERSION: TFDS records and dataset_info.json, plus `splits.json`/`splits.csv`
(patient split assignment, for audit), `skipped.json` (rows left out with --skip-bad) and a copy of
the manifest. Training reads it with `data_pipeline.input_pipeline.make_dataset`.
"""

from __future__ import annotations

import argparse
import sys

EPILOG = """\
The manifest is a CSV with columns patient_id, scan_id, protocol (cac|ctac), image, calcium_labels,
heart_mask, site, split and optionally agatston, category (paths relative to the manifest). An
empty split column assigns patients 80/10/10 with equal numbers of each CAC category in validation
and test (paper); --seed makes that assignment reproducible. A bad row (missing file, geometry
mismatch, unknown protocol) stops the build with an error naming the row, unless --skip-bad;
the manifest is checked before anything is written. Validation and test get at least one patient
each from 3 patients to assign on; a split left empty is reported as a warning on stderr. With
--skip-bad, splits.json/splits.csv list only the scans in the dataset (skipped ones under
"skipped" in splits.json).

example:
  cac-jax synth --out cohort --patients 20
  cac-jax ingest --manifest cohort/manifest.csv --data-dir data/tfds --name cac_ct
"""


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
    parser.add_argument("--seed", type=int, default=0, metavar="S",
                        help="seed of the patient split assignment (default: 0)")
    parser.add_argument("--skip-bad", action="store_true",
                        help="skip bad rows (listed on stderr and in skipped.json) instead of "
                             "stopping at the first")
    parser.add_argument("--overwrite", action="store_true",
                        help="rebuild when the dataset already exists")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=handler)


def handler(args: argparse.Namespace) -> int:
    """Builds the dataset; prints where it went, the split sizes and what was skipped."""
    import os

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from data_pipeline.input_pipeline import _tf
    from data_pipeline.tfds_builder import build_dataset

    _tf()  # keep TensorFlow off the GPUs

    def on_skip(line: str) -> None:
        print(f"cac-jax ingest: {line}", file=sys.stderr)

    def on_warning(line: str) -> None:
        print(f"cac-jax ingest: warning: {line}", file=sys.stderr)

    # build_dataset checks --data-dir and the manifest before it creates anything.
    builder = build_dataset(args.manifest, args.data_dir, name=args.name, split_seed=args.seed,
                            skip_bad=args.skip_bad, overwrite=args.overwrite,
                            progress=not args.quiet, on_skip=on_skip, on_warning=on_warning)
    sizes = ", ".join(f"{name} {info.num_examples}" for name, info in builder.info.splits.items())
    print(f"dataset {args.name} {builder.info.version} in {builder.data_dir}: scans {sizes}")
    if builder.skipped:
        print(f"skipped {len(builder.skipped)} row(s); see {builder.data_dir}/skipped.json")
    return 0
