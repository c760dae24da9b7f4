"""`cac-jax synth`: generate a synthetic cohort of paired gated CAC and ungated CTAC chest CTs.

Writes real DICOM series, calcium label maps and heart masks (.nii.gz), optional preview PNGs and
a manifest with the true Agatston scores (see data_pipeline.phantom).
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

from data_pipeline.phantom.acquisition import CTAC_IMAGING, DEFAULT_CTAC_IMAGING
from data_pipeline.phantom.cohort import ANATOMIES, DEFAULT_ANATOMY, MIN_SIZE
from data_pipeline.phantom.sites import SITES

EPILOG = """\
Layout: OUT/manifest.csv; OUT/<patient_id>/<protocol>/dicom/*.dcm;
OUT/<patient_id>/<protocol>/calcium_labels.nii.gz and heart_mask.nii.gz;
OUT/previews/<scan_id>.png with --preview. OUT must be new or empty: a folder that already holds
files (a manifest.csv, an earlier cohort, anything else) is refused unless --overwrite, so a
user's manifest or data is never replaced by accident. --size is 48..1024. Labels: 1 LAD (incl. left main), 2 LCX, 3 RCA,
5 aortic calcium, 6 valve calcium, 7 other non-coronary calcium (costal cartilage); bone is
not labelled. Deterministic per --seed; patient k is the same whatever --patients is.

Sites (--site): acquisition presets applied to both protocols; a non-default site images its
own patients (ids like syn0-site2-0000) and writes its name to the manifest's site column and
its Manufacturer, ConvolutionKernel and KVP to the DICOM headers.
{sites}

Anatomy (--anatomy): classic (default) is the anatomy the generator has always drawn: a uniform
6.5-11 mm epicardial fat layer, so every coronary lies 4-10 mm below the pericardial sac, and no
devices. grooved varies the fat over the heart (1.5-4 mm over the free walls, 6-20 mm in the
atrioventricular and interventricular grooves, with the coronaries on the groove floors: about
3-20 mm deep) and adds metal devices: a pacemaker/ICD lead in about 12% of patients and sternal
wires in about 18% (label 7). A grooved cohort has its own patients (ids like syn0-grooved-0000)
and records the anatomy in cohort.json.

CTAC imaging (--ctac-imaging): classic (default) is the CTAC the generator has always made: each
slice averages the coronaries over the whole cardiac cycle, noise sigma 40-90 HU at 512 px.
calibrated reconstructs each slice from a window of 0.3-1.0 of the cycle (half a rotation to a
whole one of 0.5-0.8 s, at 55-90 beats a minute) with noise sigma 20-45 HU. The patients and their
gated scans are the same; the CTAC shows more of the gated calcium (docs/synthetic_cohort.md). The
model is recorded in cohort.json.

examples:
  cac-jax synth --out demo_cohort --patients 40 --size 256 --seed 0 --preview --workers 2
  cac-jax synth --out site2_cohort --patients 12 --size 256 --seed 0 --site site2
  cac-jax synth --out grooved_cohort --patients 12 --size 256 --seed 0 --anatomy grooved
  cac-jax synth --out calibrated_cohort --patients 12 --size 256 --seed 0 --ctac-imaging calibrated
"""


def _int_at_least(minimum: int, unit: str = ""):
    """argparse type: an integer >= `minimum` (`unit` names it in the message)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}{unit}, got {value}")
        return value

    return parse


_positive_int = _int_at_least(1)
_seed = _int_at_least(0)


# 1024 px is the largest matrix of the paper's timing study; beyond it one scan needs gigabytes
# (a 100000 px request would fail with MemoryError after creating the folder).
MAX_SIZE = 1024


def _size(text: str) -> int:
    value = _int_at_least(MIN_SIZE, " pixels")(text)
    if value > MAX_SIZE:
        raise argparse.ArgumentTypeError(f"must be <= {MAX_SIZE} pixels, got {value}")
    return value


def _protocols(text: str) -> tuple[str, ...]:
    names = tuple(p.strip().lower() for p in text.split(",") if p.strip())
    if not names or any(n not in ("cac", "ctac") for n in names) or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"expected a comma-separated subset of cac,ctac, got {text!r}")
    return names


def _proportions(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 4 comma-separated numbers, got {text!r}") from None
    if len(values) != 4 or any(not (v >= 0) or v == float("inf") for v in values) or sum(values) <= 0:
        raise argparse.ArgumentTypeError(
            f"expected 4 non-negative numbers with a positive sum (categories 0, 1-100, 101-400, "
            f">400), got {text!r}")
    return values


def _site_table() -> str:
    """The presets for --help: name and description, wrapped."""
    import textwrap

    return "\n".join(textwrap.fill(p.description, width=96, initial_indent=f"  {p.name:9s}",
                                    subsequent_indent=" " * 11) for p in SITES.values())


def register(subparsers: argparse._SubParsersAction) -> None:
    """Adds the `synth` subcommand to the `cac-jax` parser."""
    parser = subparsers.add_parser(
        "synth",
        help="generate a synthetic cohort of paired gated CAC and ungated CTAC chest CT scans",
        description="Renders synthetic patients (anatomy, coronary plaques, aortic/valve/cartilage "
                    "calcium) imaged by an ECG-gated CAC protocol and an ungated low-dose CTAC "
                    "protocol, with ground-truth labels and true Agatston scores.",
        epilog=EPILOG.format(sites=_site_table()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder")
    parser.add_argument("--patients", type=_positive_int, required=True, help="number of patients")
    parser.add_argument("--protocols", type=_protocols, default=("cac", "ctac"),
                        help="comma-separated protocols to write (default cac,ctac)")
    parser.add_argument("--size", type=_size, default=512,
                        help="pixels per image side; the field of view is fixed, so smaller sizes "
                             "mean larger pixels (default 512)")
    parser.add_argument("--seed", type=_seed, default=0, help="cohort seed (default 0)")
    parser.add_argument("--preview", action="store_true", help="also write a preview PNG per scan")
    parser.add_argument("--workers", type=_positive_int, default=1,
                        help="parallel worker processes (default 1)")
    parser.add_argument("--proportions", type=_proportions, default=(0.25, 0.25, 0.25, 0.25),
                        metavar="P0,P1,P2,P3",
                        help="shares of CAC categories 0, 1-100, 101-400, >400 (default equal)")
    parser.add_argument("--overwrite", action="store_true",
                        help="write into an --out folder that already holds files (replacing "
                             "its manifest.csv and any earlier cohort files of the same names)")
    parser.add_argument("--ctac-overlap", action="store_true",
                        help="reconstruct CTAC as overlapping 5 mm slices every 2.5 mm")
    parser.add_argument("--site", choices=tuple(SITES), default="default",
                        help="acquisition-site preset (noise, field of view, slice thickness, "
                             "kernel, kVp; see below; default: default)")
    parser.add_argument("--anatomy", choices=tuple(ANATOMIES), default=DEFAULT_ANATOMY,
                        help="anatomy variant: classic (uniform epicardial fat, no devices) or "
                             "grooved (groove-dependent fat with the coronaries in the grooves, "
                             "pacemaker leads and sternal wires; see below; default: classic)")
    parser.add_argument("--ctac-imaging", choices=tuple(CTAC_IMAGING), default=DEFAULT_CTAC_IMAGING,
                        help="CTAC imaging model: classic (each slice averages the whole cardiac "
                             "cycle, noise sigma 40-90 HU) or calibrated (a reconstruction window "
                             "of 0.3-1.0 of the cycle, noise sigma 20-45 HU); the same patients "
                             "and gated scans either way (see below; default: classic)")
    parser.set_defaults(func=handler)


def handler(args: argparse.Namespace) -> int:
    """Generates the cohort and prints a one-line summary per category."""
    from collections import Counter

    from tqdm import tqdm

    from cac_jax.commands.score import write_stdout
    from data_pipeline.phantom import generate_cohort

    out = check_out_folder(args.out, overwrite=args.overwrite)
    created = not out.exists()
    try:
        with tqdm(total=args.patients, unit="patient", desc="synth") as bar:
            rows = generate_cohort(args.out, patients=args.patients, protocols=args.protocols,
                                   size=args.size, seed=args.seed, preview=args.preview,
                                   category_proportions=args.proportions, workers=args.workers,
                                   ctac_overlap=args.ctac_overlap, progress=bar.update,
                                   site=args.site, anatomy=args.anatomy,
                                   ctac_imaging=args.ctac_imaging)
    except BaseException:
        if created:  # leave no empty folder behind a failed run
            with contextlib.suppress(OSError):
                out.rmdir()
        raise
    lines = []
    for protocol in args.protocols:
        counts = Counter(row.category for row in rows if row.protocol == protocol)
        summary = ", ".join(f"category {c}: {counts.get(c, 0)}" for c in range(4))
        lines.append(f"{protocol}: {summary}\n")
    lines.append(f"wrote {len(rows)} scans and {args.out}/manifest.csv\n")
    write_stdout("".join(lines))
    return 0


def check_out_folder(out: str, *, overwrite: bool) -> Path:
    """The --out folder after checking it may be written: new, empty, or `overwrite` given.

    Nothing is created here, so a refused run leaves the file system as it was.
    """
    from data_pipeline.errors import InputError

    if out.strip() == "":
        raise InputError(None, "--out is empty")
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise InputError(path, "--out is an existing file, not a folder")
    if path.is_dir() and not overwrite:
        entries = sorted(p.name for p in path.iterdir())
        if entries:
            shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
            raise InputError(path, f"--out already holds {len(entries)} entries ({shown}); "
                                   "synth writes only into a new or empty folder, so nothing "
                                   "there (a manifest.csv, your data) is replaced; pass "
                                   "--overwrite to write into it anyway")
    return path
