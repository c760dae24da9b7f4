"""`cac-jax score`: Agatston score, volume, mass and category of one study from its label file.

Prints the JSON object of docs/contracts.md ("cac-jax score JSON") on stdout, writes it atomically
to `--json OUT` when given, and repeats its warnings on stderr for a reader at the terminal. The
JSON is strict (no NaN or Infinity: a result that overflows is refused); `--json` may not name an
input file; a standard output that is closed or full is an error (exit 2), not a lost result.
"""

from __future__ import annotations

import argparse
import math
import sys

from cac_jax.commands import non_negative_float

EPILOG = """\
IMAGE and LABELS are each a DICOM folder or a file SimpleITK reads (.mhd, .nii, .nii.gz, .nrrd).
Labels: 0 none, 1 LAD (with left main), 2 LCX, 3 RCA, 4 other coronary; 5 and above are
non-coronary and never scored (orCaScore format). Of several DICOM series in IMAGE the one whose
slice thickness is closest to 3 mm is scored (then the one with the most slices); --series picks
one by SeriesNumber or SeriesInstanceUID, and the warnings say which was chosen and why. Bad input
exits with code 2 and one line on stderr naming the file.

example:
  cac-jax score --image study/dicom --labels study/calcium_labels.nii.gz --json score.json
"""



def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return value


def register(subparsers: argparse._SubParsersAction) -> None:
    """Adds the `score` subcommand to the `cac-jax` parser."""
    parser = subparsers.add_parser(
        "score",
        help="Agatston score, volume, mass and CAC category of a study from its calcium labels",
        description="Scores coronary calcium by the Agatston rules (docs/agatston.md): voxels\n"
                    "labelled 1-4 at >= 130 HU; 2D 8-connected lesions per slice and label;\n"
                    "lesions of at least --min-area-mm2; weights 1-4 by each lesion's peak HU;\n"
                    "the sum scaled by slice spacing / 3 mm. Prints one JSON object (agatston,\n"
                    "volume_mm3, mass_mg, category, category_name, per_artery, lesions,\n"
                    "spacing_zyx_mm, warnings).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--image", required=True, metavar="IMAGE",
                        help="CT study: a DICOM folder or an image file (.mhd, .nii.gz, .nrrd)")
    parser.add_argument("--labels", required=True, metavar="LABELS",
                        help="calcium label image with the image's geometry (DICOM folder or file; "
                             "1 LAD, 2 LCX, 3 RCA, 4 other coronary, >= 5 ignored)")
    parser.add_argument("--series", metavar="S", default=None,
                        help="DICOM series to score: SeriesNumber or SeriesInstanceUID (default: "
                             "the series closest to 3 mm slices, then the most slices)")
    parser.add_argument("--json", metavar="OUT", default=None,
                        help="also write the JSON object to this file (atomically; never onto "
                             "an input)")
    parser.add_argument("--min-area-mm2", type=non_negative_float, default=1.0, metavar="A",
                        help="smallest lesion area that counts, in mm^2 (default: 1.0)")
    parser.add_argument("--calibration", type=_positive_float, default=None, metavar="F",
                        help="mass calibration factor in mg per (HU * mm^3), from a calibration "
                             "phantom (about 0.00075 at 120 kVp); without it mass_mg is null")
    parser.add_argument("--five-class", action="store_true",
                        help="categories 0, 1-10, 11-100, 101-400, >400 instead of the paper's "
                             "0, 1-100, 101-400, >400")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Scores the study, prints the JSON object and writes it to `--json` when given."""
    from cac_jax.scoring import score_study
    from data_pipeline.atomic import atomic_write_text, check_output_path
    from data_pipeline.errors import InputError

    if args.json is not None:
        # Before reading anything: an output must never replace the data it is computed from.
        check_output_path(args.json, [args.image, args.labels], option="--json")
    result = score_study(
        args.image, args.labels,
        min_area_mm2=args.min_area_mm2,
        calibration_mg_per_hu_mm3=args.calibration,
        five_class=args.five_class,
        series=args.series,
    )
    text = strict_json(result.to_json_dict(), args.image)
    if args.json:
        try:
            atomic_write_text(args.json, text + "\n")
        except OSError as err:
            raise InputError(args.json, f"cannot write the JSON output: {err.strerror or err}") \
                from err
    write_stdout(text + "\n", saved_to=args.json)
    for warning in result.warnings:
        print(f"cac-jax score: warning: {warning}", file=sys.stderr)
    return 0


def strict_json(payload: dict, source) -> str:
    """`payload` as indented JSON without NaN/Infinity (not JSON; many parsers reject them);
    a non-finite number is an `InputError` naming the field (e.g. an overflowing --calibration)."""
    import json

    from data_pipeline.errors import InputError

    bad = _non_finite(payload, "")
    if bad is not None:
        where, value = bad
        raise InputError(source, f"the result has a non-finite {where} ({value}); an option is "
                                 "out of range (e.g. --calibration too large)")
    return json.dumps(payload, indent=2, allow_nan=False)


def _non_finite(value, where: str):
    if isinstance(value, float) and not math.isfinite(value):
        return where.lstrip("."), value
    if isinstance(value, dict):
        items = ((f"{where}.{k}", v) for k, v in value.items())
    elif isinstance(value, list | tuple):
        items = ((f"{where}[{i}]", v) for i, v in enumerate(value))
    else:
        return None
    for key, item in items:
        found = _non_finite(item, key)
        if found is not None:
            return found
    return None


def write_stdout(text: str, saved_to: str | None = None) -> None:
    """Writes `text` to standard output and flushes it, so a closed or full stdout is reported
    as an `InputError` (exit 2) instead of a lost result and an exit-time traceback. A reader
    that went away (BrokenPipeError) is left to the CLI's SIGPIPE handling."""
    from data_pipeline.errors import InputError

    saved = f" (the result was saved to {saved_to})" if saved_to else ""
    stream = sys.stdout
    if stream is None or stream.closed:
        raise InputError("<stdout>", f"standard output is closed{saved}")
    try:
        stream.write(text)
        stream.flush()
    except BrokenPipeError:
        raise
    except (OSError, ValueError) as err:
        problem = getattr(err, "strerror", None) or str(err)
        _discard_stdout()
        raise InputError("<stdout>", f"cannot write to standard output: {problem}{saved}") \
            from None


def _discard_stdout() -> None:
    """Points file descriptor 1 at /dev/null so the interpreter's final flush of what could not
    be written does not fail again (a second message and exit code 120)."""
    import contextlib
    import os

    with contextlib.suppress(OSError, ValueError, AttributeError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
