"""Agreement between predicted and reference calcium scores: the paper's evaluation protocol.

Pieszko, Shanbhag et al. (SPIE 2022) report linearly weighted Cohen's kappa over four CAC categories
(0, 1-100, 101-400, >400) with a 95% CI, concordance matrices (rows: expert reference, columns:
model; counts and row percentages, their Figures 2 and 3) and a z-test between the kappas of two
models on the same cases. This package computes those and the usual companions for continuous
scores:

- `weighted_kappa`: kappa from scikit-learn (`cohen_kappa_score(weights="linear")`), its asymptotic
  standard error by Fleiss, Cohen & Everitt (1969) (the variance statsmodels' `cohens_kappa`
  computes) and the Wald 95% CI kappa +- 1.96 SE (truncated to [-1, 1]). `bootstrap_kappa` adds a
  percentile bootstrap CI (cases resampled with replacement; where the reference has
  `patient_id`, patients, all of a patient's scans together).
- `kappa_z_test`: z = (k1 - k2) / sqrt(SE1^2 + SE2^2), which treats the two kappas as independent.
  On the same cases they are positively correlated, so this test is conservative (p too large);
  `bootstrap_kappa(..., predicted_2=...)` gives the paired alternative: both models' kappas on the
  same resampled cases, the SE of the difference from the bootstrap distribution.
- `concordance`: the confusion matrix, row percentages, exact agreement and per-category
  sensitivity (the share of each reference category the model puts in the same category).
- `icc_absolute_agreement`: ICC(2,1) of Shrout & Fleiss (1979) (two-way random effects, absolute
  agreement, single measure; McGraw & Wong's ICC(A,1)) with McGraw & Wong's (1996) F-based CI.
- `bland_altman_log`: Bland & Altman (1986) on log(Agatston + 1) (the score's spread grows with its
  size, so differences are taken on the log scale): bias, SD and 95% limits of agreement.
- `evaluate`: reads a `results.csv` (from `cac-jax infer`) and a reference CSV (a manifest, or any
  CSV with `scan_id` and `agatston`), matches the cases, lists every row that was not used and why,
  and returns the metrics as a strict-JSON dict; `write_outputs` writes `metrics.json`,
  `report.md` and the PNG figures.

Every value that cannot be computed is None, with the reason under the block's `null_reasons`.
One set of reference categories serves every kappa, test and group of an evaluation (see
docs/evaluation.md).

Modules: `statistics` (kappa, z-tests, bootstrap, concordance, ICC, Bland-Altman), `inputs` (reading
the CSVs and matching cases), `metrics` (the metrics dict, `evaluate`) and `report` (report.md,
metrics.json, figures). Importing it never imports JAX or TensorFlow.
"""

from cac_jax.evaluation.inputs import (
    PRED_COLUMNS,
    REF_COLUMNS,
    Case,
    EvaluationInputError,
    Excluded,
    PredRow,
    RefRow,
    match_cases,
    read_predictions,
    read_reference,
)
from cac_jax.evaluation.metrics import (
    EvaluationInputs,
    evaluate,
    group_metrics,
    model_metrics,
)
from cac_jax.evaluation.report import (
    format_p,
    plot_bland_altman,
    plot_concordance,
    render_report,
    write_outputs,
)
from cac_jax.evaluation.statistics import (
    INDEPENDENT_Z_ASSUMPTION,
    PAIRED_Z_ASSUMPTION,
    Z_95,
    BlandAltmanResult,
    BootstrapResult,
    ConcordanceResult,
    IccResult,
    KappaResult,
    ZTest,
    agreement_weights,
    bland_altman_log,
    bootstrap_kappa,
    concordance,
    confusion_table,
    icc_absolute_agreement,
    kappa_from_tables,
    kappa_std_errors,
    kappa_z_test,
    linear_kappa,
    weighted_kappa,
)

__all__ = [
    "INDEPENDENT_Z_ASSUMPTION", "PAIRED_Z_ASSUMPTION", "PRED_COLUMNS", "REF_COLUMNS", "Z_95",
    "BlandAltmanResult", "BootstrapResult", "Case", "ConcordanceResult", "EvaluationInputError",
    "EvaluationInputs", "Excluded", "IccResult", "KappaResult", "PredRow", "RefRow", "ZTest",
    "agreement_weights", "bland_altman_log", "bootstrap_kappa", "concordance", "confusion_table",
    "evaluate", "format_p", "group_metrics", "icc_absolute_agreement", "kappa_from_tables",
    "kappa_std_errors", "kappa_z_test", "linear_kappa", "match_cases", "model_metrics",
    "plot_bland_altman", "plot_concordance", "read_predictions", "read_reference",
    "render_report", "weighted_kappa", "write_outputs",
]
