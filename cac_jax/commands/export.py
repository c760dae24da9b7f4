"""`cac-jax export`: a trained model without its optimizer state, for sharing and inference.

See `cac_jax.checkpoints.export_parameters`.
"""

from __future__ import annotations

import argparse

EPILOG = """\
The exported folder is a training workdir with one step (the source's best, else its latest):
config.json and checkpoints/STEP/{variables,meta,config,metrics}. It loads with cac-jax infer
exactly as the source does, at about a third of its size (no optimizer state).

example:
  cac-jax export runs/calcium_convlstm models/calcium_convlstm
  cac-jax infer --heart-checkpoint models/heart_convlstm \\
      --calcium-checkpoint models/calcium_convlstm --manifest cohort/manifest.csv --out results
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Adds the `export` subcommand to the `cac-jax` parser."""
    parser = subparsers.add_parser(
        "export", help="copy a trained model's parameters and config (no optimizer state)",
        description="Copies the best (else latest) checkpoint of a training workdir, or one step "
                    "folder, into a new folder without its optimizer state; the copy is loaded "
                    "back and compared before it is put in place.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", metavar="WORKDIR", help="training workdir or step folder")
    parser.add_argument("out", metavar="OUT", help="folder to create")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    parser.set_defaults(func=run)


def run(args) -> int:
    from cac_jax.checkpoints import export_parameters

    step = export_parameters(args.source, args.out, overwrite=args.overwrite)
    print(f"exported step {step.name} to {args.out}")
    return 0
