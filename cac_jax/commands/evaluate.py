"""`cac-jax evaluate`: agreement of predicted calcium scores with a reference (the paper's design).

Reads a `results.csv` from `cac-jax infer` (optionally a second model's) and a reference CSV (a
manifest or any CSV with `scan_id` and `agatston`), and writes `OUT/metrics.json`, `OUT/report.md`
and PNG figures. The statistics are in `cac_jax.evaluation`.
"""

from __future__ import annotations

import argparse

EPILOG = """\
Kappa: linearly weighted Cohen's kappa over the categories 0, 1-100, 101-400, >400, with a Wald
95% CI from the asymptotic SE of Fleiss, Cohen & Everitt (1969); --bootstrap N adds a percentile
bootstrap CI. --pred2: z-test of the two kappas, treated as independent (the paper's test; on the
same cases it is conservative); with --bootstrap also a paired bootstrap test that keeps their
dependence. Rows that are errored, unmatched or lack a score are listed in metrics.json
("excluded") and the report, never dropped silently.

examples:
  cac-jax evaluate --pred convlstm/results.csv --ref cohort/manifest.csv --by protocol --out eval
  cac-jax evaluate --pred convlstm/results.csv --pred2 unet/results.csv --ref cohort/manifest.csv \\
      --ref-protocol cac --by protocol --bootstrap 2000 --out eval_ctac
"""


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text!r}")
    return value


def register(subparsers: argparse._SubParsersAction) -> None:
    """Adds the `evaluate` subcommand to the `cac-jax` parser."""
    parser = subparsers.add_parser(
        "evaluate",
        help="agreement of predicted scores with a reference: kappa, concordance, ICC, "
             "Bland-Altman",
        description="Agreement of predicted CAC scores (results.csv of cac-jax infer) with a\n"
                    "reference: linearly weighted kappa with 95% CI, concordance matrices (rows\n"
                    "reference), exact agreement, per-category sensitivity, ICC(2,1) on Agatston\n"
                    "and volume, Bland-Altman on log(Agatston + 1); with --pred2 the z-test\n"
                    "between two models. Writes OUT/report.md, OUT/metrics.json and PNG figures.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--pred", required=True, metavar="RESULTS_CSV",
                        help="predictions: results.csv of cac-jax infer (scan_id, status, "
                             "agatston, optionally volume_mm3 and protocol)")
    parser.add_argument("--ref", required=True, metavar="REF_CSV",
                        help="reference: a manifest or any CSV with scan_id and agatston "
                             "(category, volume_mm3, patient_id, protocol used when present)")
    parser.add_argument("--pred2", default=None, metavar="RESULTS_CSV",
                        help="a second model's results.csv, compared on the same cases")
    parser.add_argument("--by", choices=["protocol"], default=None,
                        help="also break every metric down by protocol (under by_protocol)")
    parser.add_argument("--ref-protocol", default=None, metavar="PROTOCOL",
                        type=str.lower,
                        help="compare each prediction with the same patient's scan of this "
                             "protocol (e.g. cac: CTAC predictions against the gated reference); "
                             "needs a manifest (patient_id, protocol) as --ref")
    parser.add_argument("--bootstrap", type=_non_negative_int, default=0, metavar="N",
                        help="N patient resamples (cases where there is no patient_id) for a "
                             "bootstrap kappa CI and, with --pred2, the "
                             "paired bootstrap test (default 0: none)")
    parser.add_argument("--seed", type=_non_negative_int, default=0,
                        help="bootstrap seed, a non-negative integer (default 0)")
    parser.add_argument("--five-class", action="store_true",
                        help="also the 5-category variant (0, 1-10, 11-100, 101-400, >400)")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="output folder (created): report.md, metrics.json, *.png")
    parser.add_argument("--report", action="store_true",
                        help="also write report.html: report.md with its figures embedded, "
                             "tables sortable (docs/clinical.md)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Evaluates and writes the outputs; prints a one-paragraph summary."""
    from cac_jax.evaluation import (
        EvaluationInputError,
        EvaluationInputs,
        evaluate,
        format_p,
        write_outputs,
    )

    inputs = EvaluationInputs(pred=args.pred, ref=args.ref, pred2=args.pred2,
                              by_protocol=args.by == "protocol", ref_protocol=args.ref_protocol,
                              n_bootstrap=args.bootstrap, five_class=args.five_class,
                              seed=args.seed)
    metrics, cases = evaluate(inputs)
    try:
        write_outputs(metrics, cases, args.out)
    except OSError as err:
        raise EvaluationInputError(args.out, f"cannot write the outputs: {err.strerror or err}") \
            from err

    def fmt(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.3f}"

    ci = metrics["kappa_linear_ci95"]
    line = (f"n={metrics['n']}  kappa={fmt(metrics['kappa_linear'])}"
            + (f" (95% CI {ci[0]:.3f} to {ci[1]:.3f})" if ci else "")
            + f"  exact agreement={fmt(metrics['exact_agreement'])}"
            + f"  ICC(Agatston)={fmt(metrics['icc_agatston'])}")
    if "z_test_p" in metrics:
        line += (f"  kappa_2={fmt(metrics['kappa_linear_2'])}"
                 f"  z-test p={format_p(metrics['z_test_p'])}")
    print(line)
    for name, block in metrics.get("by_protocol", {}).items():
        print(f"  {name}: n={block['n']}  kappa={fmt(block['kappa_linear'])}")
    if metrics["n_excluded"]:
        print(f"{metrics['n_excluded']} row(s) left out, listed in {args.out}/report.md and "
              "metrics.json")
    print(f"wrote {args.out}/report.md and metrics.json")
    if args.report:
        from cac_jax.html_report import write_evaluate_report

        print(f"wrote {write_evaluate_report(args.out)}")
    return 0
