"""`cac-jax infer`: score CT studies with a trained heart model and a trained calcium model.

A thin loop over `cac_jax.inference.Scorer` (docs/commands.md): one row per study in
`OUT/results.csv`,
the scorer's JSON per study, optional masks and previews, a progress bar and a summary. One bad
study is reported in its row and the batch goes on; a rerun skips studies already scored.
"""

from __future__ import annotations

import argparse
import sys

from cac_jax.commands import positive_int

EPILOG = """\
H and C are each a training workdir (its best checkpoint is used) or a checkpoint folder in one.
Each PATH is a DICOM folder or an image file (.nii.gz, .mhd, .nrrd); a manifest is a CSV with at
least scan_id, image and protocol (see the README). Outputs in OUT: results.csv (one row per
study), <scan_id>.json (the `cac-jax score` JSON), with --save-masks <scan_id>_calcium_labels.nii.gz
(4 coronary calcium, 5 non-coronary calcium) and <scan_id>_heart_mask.nii.gz in the input's
geometry, with --save-previews <scan_id>.png. Exit code 0 when at least one study was scored or
skipped, 2 when every study failed (or on bad arguments or checkpoints).

example:
  cac-jax infer --heart-checkpoint runs/heart --calcium-checkpoint runs/calcium \\
      --manifest cohort/manifest.csv --out results --save-masks --save-previews
"""




def register(subparsers: argparse._SubParsersAction) -> None:
    """Adds the `infer` subcommand to the `cac-jax` parser."""
    parser = subparsers.add_parser(
        "infer",
        help="calcium scores of CT studies from trained heart and calcium models",
        description="Runs the heart and calcium models on each study (3-slice windows as in\n"
                    "training, resampled in-plane when the study's pixel spacing lies outside\n"
                    "what the models were trained on), keeps the coronary class inside the heart\n"
                    "silhouette at >= 130 HU and scores it by the Agatston contract.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--heart-checkpoint", required=True, metavar="H",
                        help="heart model: training workdir or checkpoint folder")
    parser.add_argument("--calcium-checkpoint", required=True, metavar="C",
                        help="calcium model: training workdir or checkpoint folder")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", nargs="+", metavar="PATH", help="studies to score")
    source.add_argument("--manifest", metavar="M.csv", help="manifest of studies to score")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder")
    parser.add_argument("--batch-size", type=positive_int, default=8, metavar="B",
                        help="slices per model call (default: 8)")
    parser.add_argument("--series", default=None, metavar="NUMBER_OR_UID",
                        help="DICOM series to read in each input folder (when the reader "
                             "supports choosing one)")
    parser.add_argument("--save-masks", action="store_true",
                        help="write the predicted calcium labels and heart mask (.nii.gz)")
    parser.add_argument("--save-previews", action="store_true",
                        help="write a PNG per study: calcium over the CT, heart outline, score")
    parser.add_argument("--overwrite", action="store_true",
                        help="score every study again, even those already in results.csv")
    parser.add_argument("--calcium-slices", choices=("heart", "all"), default="heart",
                        help="slices the calcium model runs on: those the dilated heart "
                             "silhouette reaches (default; the same score, faster) or all "
                             "(non-coronary calcium is then marked on every slice)")
    parser.add_argument("--five-class", action="store_true",
                        help="categories 0, 1-10, 11-100, 101-400, >400")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Loads both models, scores every study, writes the outputs and prints a summary."""
    from cac_jax import inference

    studies = inference.studies_from_args(args.input, args.manifest, args.series)
    scorer = inference.Scorer.from_checkpoints(args.heart_checkpoint, args.calcium_checkpoint,
                                               batch_size=args.batch_size,
                                               five_class=args.five_class,
                                               calcium_slices=args.calcium_slices)
    summary = inference.run_batch(
        scorer, studies, args.out, save_masks=args.save_masks,
        save_previews=args.save_previews, overwrite=args.overwrite,
        progress=not args.no_progress, log=lambda line: print(f"cac-jax infer: {line}",
                                                             file=sys.stderr))
    print(summary.text())
    return 2 if summary.all_failed else 0
