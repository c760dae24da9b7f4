"""`cac-jax study`: the paper's experiment end to end on a multi-site synthetic cohort.

See `cac_jax.study` for the stages and docs/study.md for the results and how to read them.
"""

from __future__ import annotations

import argparse

EPILOG = """\
Every stage is resumable: run the same command again to continue (a training run continues from
its last checkpoint; finished stages with the same settings are reused).

examples:
  cac-jax study --out study_out                                  # the CPU study (hours)
  cac-jax study --config configs/study.py:gpu --out study_gpu    # the GPU variant
  cac-jax study --config configs/study.py:local --out /tmp/s     # a few minutes' check
  cac-jax study --out study_out --only heart_convlstm,calcium_convlstm   # one system first
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Adds the `study` subcommand to the `cac-jax` parser."""
    from cac_jax import study

    parser = subparsers.add_parser(
        "study",
        help="the paper's experiment: multi-site cohort, training to convergence, held-out and "
             "unseen-site evaluation, timing",
        description="Synthesises the cohorts, builds the dataset, trains the heart and calcium "
                    "models of each architecture to convergence, scores the held-out patients "
                    "and an unseen site, evaluates them as the paper does and times the models.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    study.add_arguments(parser)
    parser.set_defaults(func=study.run_from_args)
