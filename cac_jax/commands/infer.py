"""`cac-jax infer`: score CT studies with a trained heart model and a trained calcium model.

A thin layer over `cac_jax.batch.run_batch` (a `cac_jax.inference.Scorer` over the studies): one
row per study in `OUT/results.csv`, the scorer's JSON per study, optional masks and previews, a
progress bar and a summary. One bad study is reported in its row and the batch goes on; a rerun
skips studies already scored. `--shard K/N` scores one of N parts; `--merge` joins the parts.
"""

from __future__ import annotations

import argparse
import sys

from cac_jax.commands import non_negative_float, positive_int

EPILOG = """\
H and C are each a training workdir (its best checkpoint is used) or a checkpoint folder in one.
Each PATH is a DICOM folder or an image file (.nii.gz, .mhd, .nrrd); a manifest is a CSV with at
least scan_id, image and protocol (see the README). Outputs in OUT: results.csv (one row per
study), <scan_id>.json (the `cac-jax score` JSON), with --save-masks <scan_id>_calcium_labels.nii.gz
(4 coronary calcium, 5 non-coronary calcium) and <scan_id>_heart_mask.nii.gz in the input's
geometry, with --save-previews <scan_id>.png, with --dicom <scan_id>.seg.dcm (DICOM Segmentation)
and <scan_id>.sr.dcm (DICOM SR measurement report) for studies read from DICOM, with --report
report.html (docs/clinical.md). A study whose image is not in HU or where no heart is found
(--min-heart-ml) is an error row, not a score. A rerun skips studies scored by the same models and
refuses an OUT scored by others (unless --overwrite); one run per OUT at a time. Exit code 0 when
at least one study was scored or skipped, 2 when every study failed (or on bad arguments, damaged
checkpoints, or an OUT that cannot be written). See docs/data_flow.md.

examples:
  cac-jax infer --heart-checkpoint runs/heart --calcium-checkpoint runs/calcium \\
      --manifest cohort/manifest.csv --out results --save-masks --save-previews
  cac-jax infer --heart-checkpoint runs/heart --calcium-checkpoint runs/calcium \\
      --manifest archive.csv --shard 3/8 --out parts/3      # one of 8 shards
  cac-jax infer --merge parts/1 parts/2 ... parts/8 --manifest archive.csv --out all
  cac-jax infer --heart-checkpoint runs/heart --calcium-checkpoint runs/calcium \\
      --dicomweb http://pacs:8042/dicom-web --query ModalitiesInStudy=CT --push --out results
"""


def _shard(text: str) -> tuple[int, int]:
    from cac_jax.batch import parse_shard

    try:
        return parse_shard(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None



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
    parser.add_argument("--heart-checkpoint", metavar="H",
                        help="heart model: training workdir or checkpoint folder (required "
                             "unless --merge)")
    parser.add_argument("--calcium-checkpoint", metavar="C",
                        help="calcium model: training workdir or checkpoint folder (required "
                             "unless --merge)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--input", nargs="+", metavar="PATH", help="studies to score")
    source.add_argument("--manifest", metavar="M.csv", help="manifest of studies to score")
    source.add_argument("--dicomweb", metavar="URL",
                        help="pull the studies from this DICOMweb server (QIDO-RS, WADO-RS); "
                             "select them with --study or --query")
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
    parser.add_argument("--dicom", action="store_true",
                        help="also write a DICOM Segmentation (<scan_id>.seg.dcm) and a DICOM "
                             "SR measurement report (<scan_id>.sr.dcm) per DICOM study")
    parser.add_argument("--report", action="store_true",
                        help="also write report.html: results table and previews (implies "
                             "--save-previews)")
    web = parser.add_argument_group("DICOMweb (with --dicomweb URL; docs/clinical.md)")
    select = web.add_mutually_exclusive_group()
    select.add_argument("--study", nargs="+", metavar="UID", help="StudyInstanceUIDs to score")
    select.add_argument("--query", action="append", metavar="KEY=VALUE",
                        help="QIDO-RS study search term, repeatable (e.g. ModalitiesInStudy=CT, "
                             "StudyDate=20260101-20261231)")
    web.add_argument("--push", action="store_true",
                     help="store the Segmentation and SR back into each study (STOW-RS; "
                          "implies --dicom)")
    web.add_argument("--credentials", metavar="FILE", default=None,
                     help="file with username=/password= or token= lines (else the "
                          "environment: CAC_JAX_DICOMWEB_USER and CAC_JAX_DICOMWEB_PASSWORD, or "
                          "CAC_JAX_DICOMWEB_TOKEN)")
    web.add_argument("--timeout", type=float, default=60.0, metavar="S",
                     help="seconds per HTTP request (default 60)")
    web.add_argument("--retries", type=int, default=3, metavar="N",
                     help="retries of a failed connection or 5xx answer (default 3)")
    parser.add_argument("--five-class", action="store_true",
                        help="categories 0, 1-10, 11-100, 101-400, >400")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--shard", type=_shard, default=None, metavar="K/N",
                        help="score only part K of N (1 <= K <= N) of the studies, split by "
                             "scan_id: N runs (a SLURM array, N machines) with the same studies "
                             "and K = 1..N score each study exactly once; join their --out "
                             "folders with --merge")
    parser.add_argument("--merge", nargs="+", default=None, metavar="DIR",
                        help="instead of scoring: join the results.csv of these shard --out "
                             "folders into OUT/results.csv (refused if they overlap or come "
                             "from different models; with --input/--manifest, also if a study "
                             "is in none of them)")
    parser.add_argument("--min-heart-ml", type=non_negative_float, default=None, metavar="ML",
                        help="smallest predicted heart (ml) a study is scored with; below it "
                             "the study is an error row, 'no heart found' (default: a quarter "
                             "of the smallest training heart where the checkpoint records "
                             "them, else 50 ml; 0: only an empty heart)")
    parser.set_defaults(func=run, parser=parser)


def run(args: argparse.Namespace) -> int:
    """Loads both models, scores every study, writes the outputs and prints a summary (or, with
    --merge, joins shard results)."""
    from cac_jax import batch, inference
    from data_pipeline.errors import InputError

    log = lambda line: print(f"cac-jax infer: {line}", file=sys.stderr)  # noqa: E731
    has_source = (args.input is not None or args.manifest is not None
                  or args.dicomweb is not None)
    if args.merge is not None:
        extra = [flag for flag, value in (("--heart-checkpoint", args.heart_checkpoint),
                                          ("--calcium-checkpoint", args.calcium_checkpoint),
                                          ("--shard", args.shard),
                                          ("--dicomweb", args.dicomweb)) if value is not None]
        if extra:
            args.parser.error(f"--merge joins finished results; it takes no {', '.join(extra)}")
        return _merge(args, log, has_source)
    missing = [flag for flag, value in (("--heart-checkpoint", args.heart_checkpoint),
                                        ("--calcium-checkpoint", args.calcium_checkpoint))
               if value is None]
    if not has_source:
        missing.append("--input, --manifest or --dicomweb")
    if missing:
        args.parser.error(f"the following arguments are required: {', '.join(missing)}")
    web = None
    if args.dicomweb is not None:
        from cac_jax import dicomweb

        if not (args.study or args.query):
            raise InputError(None, "--dicomweb needs --study UID ... or --query KEY=VALUE")
        web = dicomweb.Pacs(args.dicomweb, credentials=args.credentials, timeout=args.timeout,
                            retries=args.retries)
        studies = web.studies(args.study, args.query, args.out, series=args.series)
    elif args.study or args.query or args.push:
        raise InputError(None, "--study, --query and --push need --dicomweb URL")
    else:
        studies = inference.studies_from_args(args.input, args.manifest, args.series)
    if args.shard is not None:
        studies = batch.shard(studies, *args.shard)
    scorer = inference.Scorer.from_checkpoints(args.heart_checkpoint, args.calcium_checkpoint,
                                               batch_size=args.batch_size,
                                               five_class=args.five_class,
                                               calcium_slices=args.calcium_slices,
                                               min_heart_ml=args.min_heart_ml)
    after_study = None
    if args.dicom or args.push:
        from cac_jax.dicom_outputs import after_study_writer

        after_study = after_study_writer(scorer, log, push=web.push if args.push else None)
    summary = batch.run_batch(
        web.pulling(scorer) if web is not None else scorer, studies, args.out,
        save_masks=args.save_masks, save_previews=args.save_previews or args.report,
        overwrite=args.overwrite, progress=not args.no_progress, log=log,
        after_study=after_study)
    print(summary.text())
    if args.report:
        from cac_jax.html_report import write_infer_report

        print(f"wrote {write_infer_report(args.out)}")
    return 2 if summary.all_failed else 0


def _merge(args: argparse.Namespace, log, has_source: bool) -> int:
    from cac_jax import batch, inference

    expected = None
    if has_source:
        expected = [s.scan_id for s in inference.studies_from_args(args.input, args.manifest)]
    count = batch.merge_results(args.merge, args.out, expected=expected, log=log)
    print(f"merged {count} rows of {len(args.merge)} folders into {args.out}/results.csv")
    return 0
