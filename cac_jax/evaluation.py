"""Agreement between predicted and reference calcium scores: the paper's evaluation protocol.

Pieszko, Shanbhag et al. (SPIE 2022) report linearly weighted Cohen's kappa over four CAC categories
(0, 1-100, 101-400, >400) with a 95% CI, concordance matrices (rows: expert reference, columns:
model; counts and row percentages, their Figures 2 and 3) and a z-test between the kappas of two
models on the same cases. This module computes those and the usual companions for continuous
scores:

- `weighted_kappa`: kappa from scikit-learn (`cohen_kappa_score(weights="linear")`), its asymptotic
  standard error by Fleiss, Cohen & Everitt (1969) (the variance statsmodels' `cohens_kappa`
  computes) and the Wald 95% CI kappa +- 1.96 SE (truncated to [-1, 1]). `bootstrap_kappa` adds a
  percentile bootstrap CI (cases resampled with replacement).
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
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cac_jax.scoring import CATEGORY_NAMES, CATEGORY_NAMES_5, cac_category
from data_pipeline.atomic import atomic_path, atomic_write_text
from data_pipeline.errors import InputError

Z_95 = 1.959963984540054  # two-sided 95% normal quantile
# The part of results.csv (docs/contracts.md) that evaluation needs.
PRED_COLUMNS = ("scan_id", "status", "agatston")
REF_COLUMNS = ("scan_id", "agatston")


class EvaluationInputError(InputError):
    """A prediction or reference CSV is missing, malformed, or matches nothing."""


# ----------------------------------------------------------------------------- kappa


@dataclasses.dataclass(frozen=True)
class KappaResult:
    """Linearly weighted kappa with its asymptotic standard errors and Wald 95% CI."""

    n: int
    kappa: float | None
    std_err: float | None  # Fleiss, Cohen & Everitt (1969), for the CI
    std_err_null: float | None  # under H0: kappa = 0
    ci95: tuple[float, float] | None  # Wald, truncated to [-1, 1]
    null_reason: str | None = None


def agreement_weights(n_categories: int) -> np.ndarray:
    """Linear agreement weights w_ij = 1 - |i - j| / (k - 1) (Cicchetti & Allison 1971)."""
    index = np.arange(n_categories, dtype=np.float64)
    return 1.0 - np.abs(index[:, None] - index[None, :]) / max(n_categories - 1, 1)


def confusion_table(reference: Sequence[int], predicted: Sequence[int],
                    n_categories: int) -> np.ndarray:
    """Counts (k, k): rows reference category, columns predicted category."""
    from sklearn.metrics import confusion_matrix

    reference = np.asarray(reference, dtype=np.int64)
    predicted = np.asarray(predicted, dtype=np.int64)
    if reference.shape != predicted.shape or reference.ndim != 1:
        raise ValueError("reference and predicted must be 1-D and of equal length")
    if reference.size == 0:
        return np.zeros((n_categories, n_categories), dtype=np.int64)
    return confusion_matrix(reference, predicted, labels=list(range(n_categories)))


def kappa_from_tables(tables: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Weighted kappa of one table (k, k) or a stack (..., k, k); NaN where it is undefined.

    kappa_w = (p_o(w) - p_e(w)) / (1 - p_e(w)) with agreement weights w (linear by default).
    Vectorised so a bootstrap evaluates thousands of tables at once.
    """
    tables = np.asarray(tables, dtype=np.float64)
    k = tables.shape[-1]
    weights = agreement_weights(k) if weights is None else np.asarray(weights, np.float64)
    n = tables.sum(axis=(-2, -1))
    with np.errstate(invalid="ignore", divide="ignore"):
        p = tables / n[..., None, None]
        row = p.sum(axis=-1)
        col = p.sum(axis=-2)
        observed = (weights * p).sum(axis=(-2, -1))
        expected = np.einsum("...i,ij,...j->...", row, weights, col)
        kappa = (observed - expected) / (1.0 - expected)
    # p_e(w) = 1 happens when both raters use a single category: kappa is 0/0.
    return np.where(np.isclose(expected, 1.0) | (n == 0), np.nan, kappa)


def kappa_std_errors(table: np.ndarray, kappa: float,
                     weights: np.ndarray | None = None) -> tuple[float, float]:
    """Asymptotic SEs of weighted kappa: (SE, SE under H0 kappa = 0).

    Fleiss, Cohen & Everitt (1969), "Large sample standard errors of kappa and weighted kappa"
    (Psychol. Bull. 72:323), as written in Fleiss, Levin & Paik (2003), chapter 18:
        var = [sum_ij p_ij (w_ij - (wbar_i. + wbar_.j)(1 - k))^2 - (k - p_e(1 - k))^2]
              / (n (1 - p_e)^2)
    with wbar_i. = sum_j p_.j w_ij and wbar_.j = sum_i p_i. w_ij.
    """
    table = np.asarray(table, dtype=np.float64)
    weights = agreement_weights(table.shape[0]) if weights is None else weights
    n = table.sum()
    p = table / n
    row, col = p.sum(axis=1), p.sum(axis=0)
    wbar_row = weights @ col  # wbar_i.
    wbar_col = row @ weights  # wbar_.j
    expected = float(row @ weights @ col)
    spread = wbar_row[:, None] + wbar_col[None, :]
    factor = 1.0 / (n * (1.0 - expected) ** 2)
    var = ((p * (weights - spread * (1.0 - kappa)) ** 2).sum()
           - (kappa - expected * (1.0 - kappa)) ** 2) * factor
    var_null = ((row[:, None] * col[None, :] * (weights - spread) ** 2).sum()
                - expected ** 2) * factor
    # Rounding can leave -1e-17 for a perfect table; the variance is then 0.
    return math.sqrt(max(var, 0.0)), math.sqrt(max(var_null, 0.0))


def weighted_kappa(reference: Sequence[int], predicted: Sequence[int],
                   n_categories: int = 4) -> KappaResult:
    """Linearly weighted Cohen's kappa (scikit-learn) with asymptotic SE and Wald 95% CI."""
    from sklearn.metrics import cohen_kappa_score

    reference = np.asarray(reference, dtype=np.int64)
    predicted = np.asarray(predicted, dtype=np.int64)
    n = int(reference.size)
    if n < 2:
        return KappaResult(n, None, None, None, None, f"needs at least 2 cases, has {n}")
    table = confusion_table(reference, predicted, n_categories)
    if np.isnan(kappa_from_tables(table)):
        return KappaResult(n, None, None, None, None,
                           "undefined: reference and prediction each use one and the same "
                           "single category (chance agreement is 1)")
    kappa = float(cohen_kappa_score(reference, predicted, labels=list(range(n_categories)),
                                    weights="linear"))
    se, se0 = kappa_std_errors(table, kappa)
    # kappa <= 1: the Wald interval is truncated there (it can pass 1 for high kappa, small n).
    ci = (max(kappa - Z_95 * se, -1.0), min(kappa + Z_95 * se, 1.0))
    return KappaResult(n, kappa, se, se0, ci)


@dataclasses.dataclass(frozen=True)
class ZTest:
    """Two-sided z-test of the difference between two kappas on the same cases."""

    difference: float | None  # kappa_1 - kappa_2
    std_err: float | None
    z: float | None
    p: float | None
    method: str
    null_reason: str | None = None


INDEPENDENT_Z_ASSUMPTION = (
    "z = (kappa_1 - kappa_2) / sqrt(SE_1^2 + SE_2^2) with the asymptotic SEs, treating the two "
    "kappas as independent; on the same cases they are positively correlated, so this p is "
    "conservative (too large)")
PAIRED_Z_ASSUMPTION = (
    "paired bootstrap: both models' kappas on the same resampled cases; z = (kappa_1 - kappa_2) "
    "/ SD of the bootstrap differences, which keeps the dependence between the two kappas")


def _two_sided_p(z: float) -> float:
    from scipy.stats import norm

    return float(2.0 * norm.sf(abs(z)))


def kappa_z_test(first: KappaResult, second: KappaResult) -> ZTest:
    """The paper's z-test for two kappas, with the two treated as independent."""
    if first.kappa is None or second.kappa is None:
        return ZTest(None, None, None, None, INDEPENDENT_Z_ASSUMPTION,
                     "a kappa is undefined: " + (first.null_reason or second.null_reason or ""))
    difference = first.kappa - second.kappa
    se = math.sqrt(first.std_err ** 2 + second.std_err ** 2)
    if se == 0.0:
        return ZTest(difference, 0.0, None, None, INDEPENDENT_Z_ASSUMPTION,
                     "both kappas have zero standard error (perfect agreement)")
    z = difference / se
    return ZTest(difference, se, z, _two_sided_p(z), INDEPENDENT_Z_ASSUMPTION)


@dataclasses.dataclass(frozen=True)
class BootstrapResult:
    """Percentile bootstrap of kappa (and of the difference to a second model on the same cases)."""

    n_resamples: int
    n_defined: int  # resamples where kappa was defined (a resample can hold one category only)
    ci95: tuple[float, float] | None
    ci95_2: tuple[float, float] | None = None
    paired_test: ZTest | None = None
    difference_ci95: tuple[float, float] | None = None


def _bootstrap_tables(reference: np.ndarray, predicted: np.ndarray, draws: np.ndarray,
                      k: int) -> np.ndarray:
    codes = reference[draws] * k + predicted[draws]  # (B, n) cell of each drawn case
    offsets = np.arange(draws.shape[0])[:, None] * (k * k)
    counts = np.bincount((codes + offsets).ravel(), minlength=draws.shape[0] * k * k)
    return counts.reshape(draws.shape[0], k, k)


def bootstrap_kappa(reference: Sequence[int], predicted: Sequence[int], n_categories: int = 4, *,
                    n_resamples: int = 2000, seed: int = 0,
                    predicted_2: Sequence[int] | None = None) -> BootstrapResult:
    """Percentile 95% CI of linearly weighted kappa from `n_resamples` case resamples.

    With `predicted_2` (a second model on the same cases) each resample scores both models on the
    same drawn cases, giving the paired z-test of their difference and its percentile CI.
    Resamples where a kappa is undefined are left out and counted (`n_defined`).
    """
    reference = np.asarray(reference, dtype=np.int64)
    predicted = np.asarray(predicted, dtype=np.int64)
    n = reference.size
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    rng = np.random.default_rng(seed)
    kappas, kappas_2 = [], []
    chunk = max(1, min(n_resamples, 2_000_000 // max(n, 1)))  # bound the (B, n) index array
    done = 0
    while done < n_resamples:
        size = min(chunk, n_resamples - done)
        draws = rng.integers(0, n, size=(size, n))
        kappas.append(kappa_from_tables(_bootstrap_tables(reference, predicted, draws,
                                                          n_categories)))
        if predicted_2 is not None:
            second = np.asarray(predicted_2, dtype=np.int64)
            kappas_2.append(kappa_from_tables(_bootstrap_tables(reference, second, draws,
                                                                n_categories)))
        done += size
    kappa = np.concatenate(kappas)
    defined = np.isfinite(kappa)
    if predicted_2 is not None:
        kappa_2 = np.concatenate(kappas_2)
        defined &= np.isfinite(kappa_2)

    def interval(values: np.ndarray) -> tuple[float, float] | None:
        if values.size < 2:
            return None
        low, high = np.percentile(values, [2.5, 97.5])
        return float(low), float(high)

    result = BootstrapResult(n_resamples, int(defined.sum()), interval(kappa[defined]))
    if predicted_2 is None:
        return result
    first = weighted_kappa(reference, predicted, n_categories)
    second = weighted_kappa(reference, predicted_2, n_categories)
    differences = kappa[defined] - kappa_2[defined]
    if first.kappa is None or second.kappa is None or differences.size < 2:
        test = ZTest(None, None, None, None, PAIRED_Z_ASSUMPTION,
                     "a kappa is undefined on the cases or on too many resamples")
    else:
        difference = first.kappa - second.kappa
        se = float(np.std(differences, ddof=1))
        if se == 0.0:
            test = ZTest(difference, 0.0, None, None, PAIRED_Z_ASSUMPTION,
                         "the two models' kappas are equal on every resample")
        else:
            test = ZTest(difference, se, difference / se, _two_sided_p(difference / se),
                         PAIRED_Z_ASSUMPTION)
    return dataclasses.replace(result, ci95_2=interval(kappa_2[defined]), paired_test=test,
                               difference_ci95=interval(differences))


# ----------------------------------------------------------------------------- concordance


@dataclasses.dataclass(frozen=True)
class ConcordanceResult:
    """Concordance matrix (rows reference, columns prediction) and what follows from it."""

    counts: np.ndarray  # (k, k) int
    row_percent: list[list[float] | None]  # None for a reference category with no cases
    exact_agreement: float | None
    sensitivity: list[float | None]  # per reference category: diagonal / row total


def concordance(reference: Sequence[int], predicted: Sequence[int],
                n_categories: int = 4) -> ConcordanceResult:
    """Counts, row percentages, exact agreement and per-category sensitivity."""
    counts = confusion_table(reference, predicted, n_categories)
    totals = counts.sum(axis=1)
    row_percent = [None if total == 0 else [100.0 * c / total for c in row.tolist()]
                   for row, total in zip(counts, totals)]
    sensitivity = [None if total == 0 else float(counts[i, i] / total)
                   for i, total in enumerate(totals)]
    n = int(counts.sum())
    exact = float(np.trace(counts) / n) if n else None
    return ConcordanceResult(counts, row_percent, exact, sensitivity)


# ----------------------------------------------------------------------------- ICC


@dataclasses.dataclass(frozen=True)
class IccResult:
    """ICC(2,1): two-way random effects, absolute agreement, single measure."""

    n: int
    raters: int
    icc: float | None
    ci95: tuple[float, float] | None
    ms_rows: float | None = None
    ms_raters: float | None = None
    ms_error: float | None = None
    null_reason: str | None = None


def icc_absolute_agreement(ratings: np.ndarray) -> IccResult:
    """ICC(2,1) of an (n targets, k raters) array, with McGraw & Wong's (1996) 95% CI.

    Shrout & Fleiss (1979), Psychol. Bull. 86:420, case 2:
        ICC(2,1) = (MSR - MSE) / (MSR + (k - 1) MSE + k (MSC - MSE) / n)
    from the two-way ANOVA without replication (R rows = targets, C columns = raters, E error).
    The CI is McGraw & Wong's (1996, Psychol. Methods 1:30) Table 7 case 2A, with Satterthwaite's
    degrees of freedom.
    """
    from scipy.stats import f as f_dist

    ratings = np.asarray(ratings, dtype=np.float64)
    if ratings.ndim != 2:
        raise ValueError(f"ratings must be (targets, raters), got shape {ratings.shape}")
    n, k = ratings.shape
    if n < 2 or k < 2:
        return IccResult(n, k, None, None, null_reason=f"needs at least 2 targets and 2 raters, "
                                                         f"has {n} x {k}")
    if not np.isfinite(ratings).all():
        return IccResult(n, k, None, None, null_reason="ratings contain non-finite values")
    grand = ratings.mean()
    ss_rows = k * ((ratings.mean(axis=1) - grand) ** 2).sum()
    ss_raters = n * ((ratings.mean(axis=0) - grand) ** 2).sum()
    ss_total = ((ratings - grand) ** 2).sum()
    ss_error = max(ss_total - ss_rows - ss_raters, 0.0)
    msr = ss_rows / (n - 1)
    msc = ss_raters / (k - 1)
    mse = ss_error / ((n - 1) * (k - 1))
    denominator = msr + (k - 1) * mse + k * (msc - mse) / n
    scale = max(1.0, float(np.abs(ratings).max())) ** 2
    if denominator <= 1e-12 * scale:
        return IccResult(n, k, None, None, msr, msc, mse,
                         "undefined: every target has the same rating (no between-target "
                         "variance)")
    icc = (msr - mse) / denominator
    ci = None
    if mse > 1e-15 * scale and icc < 1.0:
        a = k * icc / (n * (1.0 - icc))
        b = 1.0 + k * icc * (n - 1) / (n * (1.0 - icc))
        v = (a * msc + b * mse) ** 2 / ((a * msc) ** 2 / (k - 1)
                                         + (b * mse) ** 2 / ((n - 1) * (k - 1)))
        f_low = f_dist.ppf(0.975, n - 1, v)
        f_high = f_dist.ppf(0.975, v, n - 1)
        low = n * (msr - f_low * mse) / (f_low * (k * msc + (k * n - k - n) * mse) + n * msr)
        high = n * (f_high * msr - mse) / (k * msc + (k * n - k - n) * mse + n * f_high * msr)
        if math.isfinite(low) and math.isfinite(high):
            ci = (float(low), float(high))
    elif mse <= 1e-15 * scale:
        # No residual disagreement at all: the ICC is exactly 1 when raters' means agree too.
        ci = (float(icc), float(icc))
    return IccResult(n, k, float(icc), ci, float(msr), float(msc), float(mse))


# ----------------------------------------------------------------------------- Bland-Altman


@dataclasses.dataclass(frozen=True)
class BlandAltmanResult:
    """Bland-Altman on log(Agatston + 1): prediction minus reference."""

    n: int
    bias: float | None
    sd: float | None
    loa95: tuple[float, float] | None
    bias_ci95: tuple[float, float] | None
    null_reason: str | None = None


def bland_altman_log(reference_agatston: Sequence[float],
                     predicted_agatston: Sequence[float]) -> BlandAltmanResult:
    """Bias, SD and 95% limits of agreement (bias +- 1.96 SD) of log(pred + 1) - log(ref + 1).

    Bland & Altman (1986), Lancet i:307. `bias_ci95` is the t-interval of the mean difference.
    A difference d on this scale means the prediction is about exp(d) times (reference + 1).
    """
    from scipy.stats import t as t_dist

    reference = np.log1p(np.asarray(reference_agatston, dtype=np.float64))
    predicted = np.log1p(np.asarray(predicted_agatston, dtype=np.float64))
    n = int(reference.size)
    if n < 2:
        return BlandAltmanResult(n, None, None, None, None, f"needs at least 2 cases, has {n}")
    difference = predicted - reference
    bias = float(difference.mean())
    sd = float(difference.std(ddof=1))
    half = float(t_dist.ppf(0.975, n - 1)) * sd / math.sqrt(n)
    return BlandAltmanResult(n, bias, sd, (bias - Z_95 * sd, bias + Z_95 * sd),
                             (bias - half, bias + half))


# ----------------------------------------------------------------------------- reading and matching


@dataclasses.dataclass(frozen=True)
class PredRow:
    """One study of a `results.csv` with status ok and a valid score."""

    scan_id: str
    agatston: float
    volume_mm3: float | None
    protocol: str
    row_number: int


@dataclasses.dataclass(frozen=True)
class RefRow:
    """One reference row (manifest or plain CSV)."""

    scan_id: str
    agatston: float | None
    category: int | None  # given category (4 classes) when the CSV has one
    volume_mm3: float | None
    patient_id: str | None
    protocol: str
    row_number: int
    problem: str | None = None  # why this row cannot serve as a reference


@dataclasses.dataclass(frozen=True)
class Excluded:
    """A row that was not used, and why (listed in metrics.json and the report)."""

    scan_id: str
    source: str  # "pred", "pred2" or "ref"
    reason: str

    def to_json(self) -> dict[str, str]:
        return dataclasses.asdict(self)


def _read_csv(path: str | os.PathLike, required: Sequence[str],
              what: str) -> tuple[list[str], list[dict[str, str]]]:
    path = Path(path)
    if not path.is_file():
        raise EvaluationInputError(path, f"{what} file not found")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise EvaluationInputError(path, f"cannot read the {what} CSV: {err}") from err
    reader = csv.DictReader(io.StringIO(text))
    if reader.fieldnames is None:
        raise EvaluationInputError(path, f"{what} CSV is empty (no header row)")
    fields = [(name or "").strip() for name in reader.fieldnames]
    missing = [c for c in required if c not in fields]
    if missing:
        raise EvaluationInputError(path, f"{what} CSV lacks column(s) {', '.join(missing)} "
                                         f"(has: {', '.join(fields)})")
    rows = [{(k or "").strip(): (v or "").strip() for k, v in raw.items() if k is not None}
            for raw in reader]
    if not rows:
        raise EvaluationInputError(path, f"{what} CSV has a header but no rows")
    return fields, rows


def _score(text: str, column: str) -> tuple[float | None, str | None]:
    """Parses a non-negative finite number; returns (value, problem)."""
    if not text:
        return None, f"empty {column}"
    try:
        value = float(text)
    except ValueError:
        return None, f"{column} {text!r} is not a number"
    if not math.isfinite(value) or value < 0:
        return None, f"{column} {text!r} is not a finite number >= 0"
    return value, None


def read_predictions(path: str | os.PathLike, source: str = "pred"
                     ) -> tuple[dict[str, PredRow], list[Excluded]]:
    """Reads a `results.csv`: the usable rows by scan_id, and every row left out with its reason.

    Rows with `status` other than ok (the inference's error rows), scores that are not numbers, and
    repeated scan_ids (the first is kept) are left out and listed.
    """
    _, records = _read_csv(path, PRED_COLUMNS, "prediction")
    rows: dict[str, PredRow] = {}
    excluded: list[Excluded] = []
    for number, record in enumerate(records, start=1):
        scan_id = record.get("scan_id", "")
        if not scan_id:
            excluded.append(Excluded(f"<row {number}>", source, "empty scan_id"))
            continue
        if scan_id in rows:
            excluded.append(Excluded(scan_id, source, f"duplicate scan_id (row {number}; the "
                                                      f"first row {rows[scan_id].row_number} "
                                                      "is used)"))
            continue
        status = record.get("status", "").lower()
        if status != "ok":
            error = record.get("error", "") or "no error message"
            excluded.append(Excluded(scan_id, source, f"status {status or '(empty)'}: {error}"))
            continue
        agatston, problem = _score(record.get("agatston", ""), "agatston")
        if problem:
            excluded.append(Excluded(scan_id, source, problem))
            continue
        volume, _ = _score(record.get("volume_mm3", ""), "volume_mm3")
        rows[scan_id] = PredRow(scan_id, agatston, volume, record.get("protocol", "").lower(),
                                number)
    return rows, excluded


def read_reference(path: str | os.PathLike) -> tuple[dict[str, RefRow], list[str]]:
    """Reads a manifest or any CSV with `scan_id` and `agatston`: rows by scan_id, and columns.

    A row whose score is missing or invalid is kept with its `problem`, so a prediction that
    matches it is listed with that reason rather than reported as unmatched. A repeated scan_id
    is bad input (which row would be the reference is ambiguous).
    """
    fields, records = _read_csv(path, REF_COLUMNS, "reference")
    rows: dict[str, RefRow] = {}
    for number, record in enumerate(records, start=1):
        scan_id = record.get("scan_id", "")
        if not scan_id:
            continue  # nothing can match it; blank lines of a spreadsheet export
        if scan_id in rows:
            raise EvaluationInputError(path, f"row {number}: duplicate scan_id {scan_id!r} (also "
                                             f"on row {rows[scan_id].row_number})")
        agatston, problem = _score(record.get("agatston", ""), "reference agatston")
        category = None
        if record.get("category"):
            try:
                category = int(record["category"])
            except ValueError:
                problem = problem or f"category {record['category']!r} is not an integer"
            else:
                if not 0 <= category < len(CATEGORY_NAMES):
                    problem = problem or f"category {category} is not one of 0-3"
                    category = None
        volume, _ = _score(record.get("volume_mm3", ""), "volume_mm3")
        rows[scan_id] = RefRow(scan_id, agatston, category, volume,
                               record.get("patient_id") or None,
                               record.get("protocol", "").lower(), number, problem)
    return rows, fields


@dataclasses.dataclass(frozen=True)
class Case:
    """One matched case: a prediction (or two) and its reference."""

    scan_id: str
    reference_scan_id: str
    protocol: str
    reference_agatston: float
    reference_category: int | None  # the reference CSV's own 4-class category, if given
    reference_volume: float | None
    agatston: float
    volume: float | None
    agatston_2: float | None = None
    volume_2: float | None = None


def match_cases(pred: dict[str, PredRow], ref: dict[str, RefRow], *,
                ref_protocol: str | None = None, pred2: dict[str, PredRow] | None = None,
                ref_path: str = "reference") -> tuple[list[Case], list[Excluded]]:
    """Pairs each prediction with its reference row; lists everything left out, with reasons.

    Same scan: a prediction's reference is the row with its scan_id. With `ref_protocol` (the
    paper's CTAC design) it is the row of the same patient with that protocol: the prediction's
    scan_id is looked up in the reference (a manifest with `patient_id` and `protocol`) for its
    patient. With `pred2`, only cases both models scored are kept, so both kappas are on the same
    cases.
    """
    by_patient: dict[str, list[RefRow]] = {}
    if ref_protocol is not None:
        for row in ref.values():
            if row.patient_id and row.protocol == ref_protocol:
                by_patient.setdefault(row.patient_id, []).append(row)
    cases: list[Case] = []
    excluded: list[Excluded] = []
    used_refs: set[str] = set()
    for scan_id, row in pred.items():
        own = ref.get(scan_id)
        if ref_protocol is None:
            target = own
            if target is None:
                excluded.append(Excluded(scan_id, "pred", f"no row with this scan_id in "
                                                          f"{ref_path}"))
                continue
        else:
            if own is None or not own.patient_id:
                excluded.append(Excluded(scan_id, "pred", f"scan_id not in {ref_path} (or no "
                                                          "patient_id there): its patient is "
                                                          "unknown"))
                continue
            if own.protocol == ref_protocol:
                target = own
            else:
                candidates = by_patient.get(own.patient_id, [])
                if len(candidates) != 1:
                    why = ("has no" if not candidates
                           else f"has {len(candidates)} (ambiguous)")
                    excluded.append(Excluded(scan_id, "pred", f"patient {own.patient_id!r} "
                                                              f"{why} {ref_protocol} scan in "
                                                              f"{ref_path}"))
                    continue
                target = candidates[0]
        used_refs.add(target.scan_id)
        if target.problem:
            excluded.append(Excluded(scan_id, "ref", f"reference row {target.row_number} "
                                                     f"({target.scan_id}): {target.problem}"))
            continue
        second = None
        if pred2 is not None:
            second = pred2.get(scan_id)
            if second is None:
                excluded.append(Excluded(scan_id, "pred2", "scored by the first model but not "
                                                           "(or not successfully) by the second"))
                continue
        protocol = (own.protocol if own is not None and own.protocol else row.protocol) or "unknown"
        cases.append(Case(scan_id, target.scan_id, protocol, target.agatston, target.category,
                          target.volume_mm3, row.agatston, row.volume_mm3,
                          None if second is None else second.agatston,
                          None if second is None else second.volume_mm3))
    if pred2 is not None:
        for scan_id in pred2:
            if scan_id not in pred:
                excluded.append(Excluded(scan_id, "pred2", "scored by the second model but not "
                                                           "(or not successfully) by the first"))
    for scan_id, row in ref.items():
        if scan_id in used_refs or scan_id in pred:
            continue
        if ref_protocol is not None and row.protocol != ref_protocol:
            continue  # a scan of another protocol is a lookup row, not a reference
        excluded.append(Excluded(scan_id, "ref", "no prediction for this reference row"))
    return cases, excluded


# ----------------------------------------------------------------------------- metrics


def _num(value: float | None) -> float | None:
    """A finite float for JSON, or None."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _pair(values: tuple[float, float] | None) -> list[float] | None:
    if values is None or any(_num(v) is None for v in values):
        return None
    return [float(values[0]), float(values[1])]


def _kappa_block(reference: np.ndarray, predicted: np.ndarray, n_categories: int,
                 names: Sequence[str], null_reasons: dict[str, str],
                 suffix: str = "") -> dict[str, Any]:
    kappa = weighted_kappa(reference, predicted, n_categories)
    agreement = concordance(reference, predicted, n_categories)
    if kappa.kappa is None:
        null_reasons[f"kappa_linear{suffix}"] = kappa.null_reason
    for name, value in zip(names, agreement.sensitivity):
        if value is None:
            null_reasons[f"sensitivity.{name}"] = "no reference case in this category"
    notes = []
    for who, ratings in (("reference", reference), ("prediction", predicted)):
        if kappa.kappa is not None and np.unique(ratings).size == 1:
            # Then kappa is 0 whatever the other rater does, and its asymptotic SE is 0 too:
            # the CI [0, 0] says nothing about uncertainty.
            notes.append(f"the {who} uses the single category {names[int(ratings[0])]}: kappa "
                         "is 0 by construction and its CI is degenerate")
    return {
        f"kappa_linear{suffix}_notes": notes,
        f"kappa_linear{suffix}": _num(kappa.kappa),
        f"kappa_linear{suffix}_se": _num(kappa.std_err),
        f"kappa_linear{suffix}_ci95": _pair(kappa.ci95),
        "exact_agreement": _num(agreement.exact_agreement),
        "concordance": agreement.counts.tolist(),
        "concordance_row_percent": agreement.row_percent,
        "sensitivity": dict(zip(names, agreement.sensitivity)),
    }


def model_metrics(reference_agatston: np.ndarray, predicted_agatston: np.ndarray, *,
                  reference_category: np.ndarray | None = None,
                  reference_volume: np.ndarray | None = None,
                  predicted_volume: np.ndarray | None = None,
                  volume_reason: str | None = None,
                  five_class: bool = False, n_bootstrap: int = 0,
                  seed: int = 0) -> dict[str, Any]:
    """All agreement metrics of one model against the reference, as a strict-JSON dict.

    `reference_category` (4 classes) overrides the category derived from the reference score
    (an expert's category read directly); the 5-class variant always derives from the scores.
    """
    reference_agatston = np.asarray(reference_agatston, dtype=np.float64)
    predicted_agatston = np.asarray(predicted_agatston, dtype=np.float64)
    ref_cat = (np.asarray(reference_category, dtype=np.int64) if reference_category is not None
               else np.array([cac_category(a) for a in reference_agatston], dtype=np.int64))
    pred_cat = np.array([cac_category(a) for a in predicted_agatston], dtype=np.int64)
    null_reasons: dict[str, str] = {}
    block: dict[str, Any] = {"n": int(reference_agatston.size),
                             "categories": list(CATEGORY_NAMES)}
    block.update(_kappa_block(ref_cat, pred_cat, len(CATEGORY_NAMES), CATEGORY_NAMES,
                              null_reasons))
    if n_bootstrap:
        boot = bootstrap_kappa(ref_cat, pred_cat, len(CATEGORY_NAMES), n_resamples=n_bootstrap,
                               seed=seed)
        block["kappa_linear_bootstrap_ci95"] = _pair(boot.ci95)
        block["bootstrap"] = {"n_resamples": boot.n_resamples, "n_defined": boot.n_defined,
                              "seed": seed, "method": "percentile, cases resampled"}
        if boot.ci95 is None:
            null_reasons["kappa_linear_bootstrap_ci95"] = "kappa undefined on the resamples"
    icc = icc_absolute_agreement(np.stack([reference_agatston, predicted_agatston], axis=1))
    block["icc_agatston"] = _num(icc.icc)
    block["icc_agatston_ci95"] = _pair(icc.ci95)
    if icc.icc is None:
        null_reasons["icc_agatston"] = icc.null_reason
    if reference_volume is not None and predicted_volume is not None:
        icc_v = icc_absolute_agreement(np.stack([reference_volume, predicted_volume], axis=1))
        block["icc_volume"] = _num(icc_v.icc)
        block["icc_volume_ci95"] = _pair(icc_v.ci95)
        if icc_v.icc is None:
            null_reasons["icc_volume"] = icc_v.null_reason
    else:
        block["icc_volume"] = None
        block["icc_volume_ci95"] = None
        null_reasons["icc_volume"] = volume_reason or "no volumes"
    ba = bland_altman_log(reference_agatston, predicted_agatston)
    block["bland_altman_log"] = {"n": ba.n, "bias": _num(ba.bias), "sd": _num(ba.sd),
                                 "loa95": _pair(ba.loa95), "bias_ci95": _pair(ba.bias_ci95),
                                 "scale": "log(Agatston + 1), prediction minus reference"}
    if ba.bias is None:
        null_reasons["bland_altman_log"] = ba.null_reason
    if five_class:
        ref5 = np.array([cac_category(a, five_class=True) for a in reference_agatston])
        pred5 = np.array([cac_category(a, five_class=True) for a in predicted_agatston])
        reasons5: dict[str, str] = {}
        block["five_class"] = {"categories": list(CATEGORY_NAMES_5),
                               **_kappa_block(ref5, pred5, len(CATEGORY_NAMES_5),
                                              CATEGORY_NAMES_5, reasons5),
                               "null_reasons": reasons5}
    block["null_reasons"] = null_reasons
    return block


def _comparison(cases: Sequence[Case], second: dict[str, Any], n_bootstrap: int,
                seed: int) -> dict[str, Any]:
    ref_cat = _reference_categories(cases)
    pred_cat = np.array([cac_category(c.agatston) for c in cases], dtype=np.int64)
    pred2_cat = np.array([cac_category(c.agatston_2) for c in cases], dtype=np.int64)
    k = len(CATEGORY_NAMES)
    test = kappa_z_test(weighted_kappa(ref_cat, pred_cat, k), weighted_kappa(ref_cat, pred2_cat, k))
    out: dict[str, Any] = {
        "kappa_linear_2": second["kappa_linear"],
        "kappa_linear_2_ci95": second["kappa_linear_ci95"],
        "z_test_p": _num(test.p),
        "z_test": _ztest_json(test),
    }
    if n_bootstrap:
        boot = bootstrap_kappa(ref_cat, pred_cat, k, n_resamples=n_bootstrap, seed=seed,
                               predicted_2=pred2_cat)
        out["z_test_paired_bootstrap"] = {**_ztest_json(boot.paired_test),
                                          "difference_ci95": _pair(boot.difference_ci95),
                                          "n_resamples": boot.n_resamples,
                                          "n_defined": boot.n_defined}
    return out


def _ztest_json(test: ZTest) -> dict[str, Any]:
    return {"difference": _num(test.difference), "se": _num(test.std_err), "z": _num(test.z),
            "p": _num(test.p), "assumption": test.method, "null_reason": test.null_reason}


def _reference_categories(cases: Sequence[Case]) -> np.ndarray:
    return np.array([c.reference_category if c.reference_category is not None
                     else cac_category(c.reference_agatston) for c in cases], dtype=np.int64)


def group_metrics(cases: Sequence[Case], *, two_models: bool, five_class: bool,
                  n_bootstrap: int, seed: int, volume_reason: str | None) -> dict[str, Any]:
    """Metrics of one group of cases (all, or one protocol): model 1, and model 2 with the test."""
    ref_volume = pred_volume = pred2_volume = None
    reason = volume_reason
    if reason is None:
        missing = [c.scan_id for c in cases
                   if c.reference_volume is None or c.volume is None
                   or (two_models and c.volume_2 is None)]
        if missing:
            reason = (f"{len(missing)} case(s) lack a volume_mm3 (first: {missing[0]})")
        else:
            ref_volume = np.array([c.reference_volume for c in cases])
            pred_volume = np.array([c.volume for c in cases])
            if two_models:
                pred2_volume = np.array([c.volume_2 for c in cases])
    has_category = all(c.reference_category is not None for c in cases)
    common = dict(reference_category=_reference_categories(cases) if has_category else None,
                  reference_volume=ref_volume, volume_reason=reason, five_class=five_class,
                  n_bootstrap=n_bootstrap, seed=seed)
    reference = np.array([c.reference_agatston for c in cases])
    first = model_metrics(reference, np.array([c.agatston for c in cases]),
                          predicted_volume=pred_volume, **common)
    if not two_models:
        return first
    second = model_metrics(reference, np.array([c.agatston_2 for c in cases]),
                           predicted_volume=pred2_volume, **common)
    first.update(_comparison(cases, second, n_bootstrap, seed))
    first["model_2"] = second
    return first


@dataclasses.dataclass(frozen=True)
class EvaluationInputs:
    """What `evaluate` was given (paths as the user wrote them)."""

    pred: str
    ref: str
    pred2: str | None = None
    by_protocol: bool = False
    ref_protocol: str | None = None
    n_bootstrap: int = 0
    five_class: bool = False
    seed: int = 0


def evaluate(inputs: EvaluationInputs) -> tuple[dict[str, Any], list[Case]]:
    """Reads, matches and computes every metric; returns (metrics dict, matched cases)."""
    pred, excluded = read_predictions(inputs.pred, "pred")
    pred2 = None
    if inputs.pred2 is not None:
        pred2, excluded2 = read_predictions(inputs.pred2, "pred2")
        excluded += excluded2
    ref, ref_fields = read_reference(inputs.ref)
    if inputs.ref_protocol is not None:
        missing = [c for c in ("patient_id", "protocol") if c not in ref_fields]
        if missing:
            raise EvaluationInputError(inputs.ref, f"--ref-protocol needs a manifest with "
                                                   f"{' and '.join(missing)} column(s)")
    cases, unmatched = match_cases(pred, ref, ref_protocol=inputs.ref_protocol, pred2=pred2,
                                   ref_path=inputs.ref)
    excluded += unmatched
    if not cases:
        # One example per kind (reference problem, prediction problem) says most in one line.
        examples = list({e.source: e for e in reversed(excluded)}.values())[::-1][:2]
        detail = "; ".join(f"{e.scan_id} ({e.source}): {e.reason}" for e in examples)
        raise EvaluationInputError(inputs.pred, f"no prediction row matched a usable reference "
                                                f"row of {inputs.ref}"
                                                + (f" ({len(excluded)} rows left out, e.g. "
                                                   f"{detail})" if excluded else ""))
    volume_reason = (None if "volume_mm3" in ref_fields
                     else "the reference has no volume_mm3 column (a manifest has none)")
    options = dict(two_models=pred2 is not None, five_class=inputs.five_class,
                   n_bootstrap=inputs.n_bootstrap, seed=inputs.seed, volume_reason=volume_reason)
    metrics: dict[str, Any] = {
        "inputs": dataclasses.asdict(inputs),
        "kappa_ci_method": ("Wald: kappa +- 1.96 x asymptotic SE (Fleiss, Cohen & Everitt 1969), "
                            "truncated to [-1, 1]"),
        "reference_category": ("the reference CSV's category column" if
                               all(c.reference_category is not None for c in cases)
                               else "from the reference agatston"),
        "matching": (f"the same patient's {inputs.ref_protocol} scan (through patient_id)"
                     if inputs.ref_protocol else "the same scan_id"),
    }
    metrics.update(group_metrics(cases, **options))
    if inputs.by_protocol:
        groups: dict[str, list[Case]] = {}
        for case in cases:
            groups.setdefault(case.protocol, []).append(case)
        metrics["by_protocol"] = {name: group_metrics(group, **options)
                                  for name, group in sorted(groups.items())}
    metrics["excluded"] = [e.to_json() for e in excluded]
    metrics["n_excluded"] = len(excluded)
    # A given category that contradicts the given score is worth a look (a typo, or a category
    # read on another scale); the category column is still what the kappa uses.
    metrics["warnings"] = [
        f"{c.reference_scan_id}: reference category {c.reference_category} "
        f"({CATEGORY_NAMES[c.reference_category]}) but its agatston {c.reference_agatston:g} is "
        f"category {cac_category(c.reference_agatston)}"
        for c in cases if c.reference_category is not None
        and c.reference_category != cac_category(c.reference_agatston)]
    return metrics, cases


# ----------------------------------------------------------------------------- figures


def _mpl():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_concordance(path: str | os.PathLike,
                     panels: Sequence[tuple[str, np.ndarray]],
                     names: Sequence[str]) -> None:
    """Heatmaps like the paper's Figures 2 and 3: rows reference, columns prediction.

    Each cell shows its count and row percentage; the colour is the row percentage, so
    categories of different sizes read alike. Written atomically as PNG.
    """
    plt = _mpl()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.4 * len(panels), 4.2), squeeze=False)
    for ax, (title, counts) in zip(axes[0], panels):
        counts = np.asarray(counts)
        totals = counts.sum(axis=1, keepdims=True)
        percent = np.divide(100.0 * counts, totals, out=np.zeros(counts.shape),
                            where=totals > 0)
        ax.imshow(percent, cmap="Blues", vmin=0, vmax=100)
        for i in range(counts.shape[0]):
            for j in range(counts.shape[1]):
                colour = "white" if percent[i, j] > 60 else "black"
                label = f"{counts[i, j]}\n({percent[i, j]:.0f}%)" if totals[i, 0] else "0"
                ax.text(j, i, label, ha="center", va="center", fontsize=9, color=colour)
        ax.set_xticks(range(len(names)), names)
        ax.set_yticks(range(len(names)), names)
        ax.set_xlabel("prediction (CAC category)")
        ax.set_ylabel("reference (CAC category)")
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


def plot_bland_altman(path: str | os.PathLike,
                      panels: Sequence[tuple[str, np.ndarray, np.ndarray, BlandAltmanResult]]
                      ) -> None:
    """Bland-Altman plots on log(Agatston + 1): difference against mean, bias and 95% limits."""
    plt = _mpl()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.0 * len(panels), 4.0), squeeze=False)
    for ax, (title, reference, predicted, result) in zip(axes[0], panels):
        ref_log = np.log1p(np.asarray(reference, dtype=np.float64))
        pred_log = np.log1p(np.asarray(predicted, dtype=np.float64))
        ax.scatter((ref_log + pred_log) / 2, pred_log - ref_log, s=12, alpha=0.7)
        if result.bias is not None:
            ax.axhline(result.bias, color="tab:red", label=f"bias {result.bias:.2f}")
            for limit in result.loa95:
                ax.axhline(limit, color="tab:red", linestyle="--", linewidth=0.8)
            ax.legend(loc="best", fontsize=8,
                      title=f"95% LoA {result.loa95[0]:.2f} to {result.loa95[1]:.2f}",
                      title_fontsize=8)
        ax.axhline(0.0, color="grey", linewidth=0.5)
        ax.set_xlabel("mean of log(Agatston + 1)")
        ax.set_ylabel("prediction - reference, log(Agatston + 1)")
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


# ----------------------------------------------------------------------------- report


def _fmt(value: float | None, digits: int = 3) -> str:
    # round(...) + 0.0 turns -0.0 into 0.0, so a tiny negative does not print as "-0.000".
    return "n/a" if value is None else f"{round(value, digits) + 0.0:.{digits}f}"


def format_p(value: float | None) -> str:
    """A p-value as papers print it: 3 decimals, or "<0.001"."""
    if value is None:
        return "n/a"
    return "<0.001" if value < 0.001 else f"{value:.3f}"


def _fmt_ci(values: list[float] | None, digits: int = 3) -> str:
    return "n/a" if values is None else f"{_fmt(values[0], digits)} to {_fmt(values[1], digits)}"


def _matrix_table(block: dict[str, Any], names: Sequence[str]) -> list[str]:
    lines = ["| reference \\ prediction | " + " | ".join(names) + " | sensitivity |",
             "|---" * (len(names) + 2) + "|"]
    for i, name in enumerate(names):
        percent = block["concordance_row_percent"][i]
        cells = [f"{count} ({percent[j]:.0f}%)" if percent is not None else str(count)
                 for j, count in enumerate(block["concordance"][i])]
        sensitivity = block["sensitivity"][name]
        lines.append(f"| **{name}** | " + " | ".join(cells)
                     + f" | {_fmt(None if sensitivity is None else 100 * sensitivity, 0)}"
                     + ("%" if sensitivity is not None else "") + " |")
    return lines


def _group_section(title: str, block: dict[str, Any], figures: dict[str, str],
                   labels: tuple[str, str]) -> list[str]:
    blocks = [(labels[0], block)]
    if "model_2" in block:
        blocks.append((labels[1], block["model_2"]))
    lines = [f"## {title}", "", f"n = {block['n']} cases.", "",
             "| model | kappa (linear) | 95% CI (asymptotic) | 95% CI (bootstrap) | exact "
             "agreement "
             "| ICC(2,1) Agatston (95% CI) | ICC(2,1) volume | Bland-Altman bias, log(A+1) "
             "(95% LoA) |",
             "|---|---|---|---|---|---|---|---|"]
    for label, b in blocks:
        ba = b["bland_altman_log"]
        lines.append(
            f"| {label} | {_fmt(b['kappa_linear'])} | {_fmt_ci(b['kappa_linear_ci95'])} | "
            f"{_fmt_ci(b.get('kappa_linear_bootstrap_ci95'))} | "
            f"{_fmt(None if b['exact_agreement'] is None else 100 * b['exact_agreement'], 1)}% | "
            f"{_fmt(b['icc_agatston'])} ({_fmt_ci(b['icc_agatston_ci95'])}) | "
            f"{_fmt(b['icc_volume'])} | {_fmt(ba['bias'])} ({_fmt_ci(ba['loa95'])}) |")
    if "z_test" in block:
        z = block["z_test"]
        lines += ["", f"Difference of kappas ({labels[0]} - {labels[1]}): "
                      f"{_fmt(z['difference'])}, z = {_fmt(z['z'], 2)}, "
                      f"p = {format_p(z['p'])}. Assumption: {z['assumption']}."]
        if z["null_reason"]:
            lines.append(f"(Not computed: {z['null_reason']}.)")
        paired = block.get("z_test_paired_bootstrap")
        if paired:
            lines += ["", f"Paired bootstrap ({paired['n_resamples']} resamples, "
                          f"{paired['n_defined']} with both kappas defined): difference 95% CI "
                          f"{_fmt_ci(paired['difference_ci95'])}, z = {_fmt(paired['z'], 2)}, "
                          f"p = {format_p(paired['p'])}. {paired['assumption']}."]
    for label, b in blocks:
        lines += ["", f"Concordance, {label} (rows reference, columns prediction; count and "
                      "row percentage):", ""]
        lines += _matrix_table(b, CATEGORY_NAMES)
        if "five_class" in b:
            five = b["five_class"]
            exact = five["exact_agreement"]
            lines += ["", f"Five categories, {label}: kappa {_fmt(five['kappa_linear'])} "
                          f"(95% CI {_fmt_ci(five['kappa_linear_ci95'])}), exact agreement "
                          f"{_fmt(None if exact is None else 100 * exact, 1)}%.", ""]
            lines += _matrix_table(five, CATEGORY_NAMES_5)
    for label, b in blocks:
        for note in b["kappa_linear_notes"]:
            lines += ["", f"Note for {label}: {note}."]
        if b["null_reasons"]:
            lines += ["", f"Not computed for {label}: "
                          + "; ".join(f"{k}: {v}" for k, v in b["null_reasons"].items()) + "."]
    lines.append("")
    for caption, name in figures.items():
        lines += [f"![{caption}]({name})", ""]
    return lines


def _model_labels(inputs: dict[str, Any]) -> tuple[str, str]:
    """How the report and figures name the two models: by their results file's folder."""

    def label(number: int, path: str | None) -> str:
        if not path:
            return f"model {number}"
        # `cac-jax infer --out convlstm` writes convlstm/results.csv: the folder names the model.
        name = Path(path).stem if Path(path).stem != "results" else \
            Path(path).resolve().parent.name
        return f"model {number} ({name or Path(path).name})"

    return label(1, inputs["pred"]), label(2, inputs["pred2"])


def render_report(metrics: dict[str, Any], figures: dict[str, dict[str, str]]) -> str:
    """The markdown report: method, every table, figures, and every row left out."""
    inputs = metrics["inputs"]
    labels = _model_labels(inputs)
    lines = ["# Agreement with the reference", "",
             f"Predictions: `{inputs['pred']}`" + (f" and `{inputs['pred2']}`"
                                                  if inputs["pred2"] else "")
             + f"; reference: `{inputs['ref']}`; each prediction is compared with "
               f"{metrics['matching']}.", "",
             "Method: linearly weighted Cohen's kappa over the four CAC categories (0, 1-100, "
             "101-400, >400; reference categories "
             f"{metrics['reference_category']}); 95% CI {metrics['kappa_ci_method']}"
             + ("; the bootstrap CI is the 2.5-97.5 percentile of kappa over resampled cases"
                if inputs["n_bootstrap"] else "")
             + ". ICC(2,1): two-way random effects, absolute agreement, single measure (Shrout & "
               "Fleiss 1979), 95% CI by McGraw & Wong (1996). Bland-Altman on log(Agatston + 1), "
               "prediction minus reference, limits bias +- 1.96 SD.", ""]
    lines += _group_section("All cases", metrics, figures["all"], labels)
    for name, block in metrics.get("by_protocol", {}).items():
        lines += _group_section(f"Protocol {name}", block, figures.get(name, {}), labels)
    if metrics["warnings"]:
        lines += ["## Warnings", ""] + [f"- {w}" for w in metrics["warnings"]] + [""]
    lines += ["## Rows left out", ""]
    if metrics["excluded"]:
        lines += [f"{metrics['n_excluded']} row(s) were not used:", "",
                  "| scan_id | file | reason |", "|---|---|---|"]
        for entry in metrics["excluded"]:
            reason = entry["reason"].replace("|", "\\|")
            lines.append(f"| {entry['scan_id']} | {entry['source']} | {reason} |")
    else:
        lines.append("None: every prediction and reference row was used.")
    return "\n".join(lines) + "\n"


def _figures_for(cases: Sequence[Case], block: dict[str, Any], out_dir: Path, tag: str,
                 labels: tuple[str, str], five_class: bool) -> dict[str, str]:
    two = "model_2" in block
    # Protocol names come from the CSVs: keep file names to a safe alphabet.
    suffix = "" if tag == "all" else "_" + re.sub(r"[^A-Za-z0-9_-]", "_", tag)
    figures: dict[str, str] = {}
    panels = [(f"{labels[0]}: kappa {_fmt(block['kappa_linear'], 2)}", block["concordance"])]
    if two:
        panels.append((f"{labels[1]}: kappa {_fmt(block['model_2']['kappa_linear'], 2)}",
                       block["model_2"]["concordance"]))
    name = f"concordance{suffix}.png"
    plot_concordance(out_dir / name, panels, CATEGORY_NAMES)
    figures["concordance matrix"] = name
    if five_class:
        panels5 = [(labels[0], block["five_class"]["concordance"])]
        if two:
            panels5.append((labels[1], block["model_2"]["five_class"]["concordance"]))
        name = f"concordance_5class{suffix}.png"
        plot_concordance(out_dir / name, panels5, CATEGORY_NAMES_5)
        figures["concordance matrix, five categories"] = name
    reference = np.array([c.reference_agatston for c in cases])
    ba_panels = [(labels[0], reference, np.array([c.agatston for c in cases]),
                  bland_altman_log(reference, [c.agatston for c in cases]))]
    if two:
        ba_panels.append((labels[1], reference, np.array([c.agatston_2 for c in cases]),
                          bland_altman_log(reference, [c.agatston_2 for c in cases])))
    name = f"bland_altman{suffix}.png"
    plot_bland_altman(out_dir / name, ba_panels)
    figures["Bland-Altman, log(Agatston + 1)"] = name
    return figures


def write_outputs(metrics: dict[str, Any], cases: Sequence[Case], out_dir: str | os.PathLike
                  ) -> None:
    """Writes the PNG figures, `report.md` and `metrics.json` (strict JSON) into `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    inputs = metrics["inputs"]
    labels = _model_labels(inputs)
    figures = {"all": _figures_for(cases, metrics, out_dir, "all", labels, inputs["five_class"])}
    for name, block in metrics.get("by_protocol", {}).items():
        group = [c for c in cases if c.protocol == name]
        figures[name] = _figures_for(group, block, out_dir, name, labels, inputs["five_class"])
    # allow_nan=False: a NaN anywhere is a bug here, never a silent non-standard token.
    text = json.dumps(metrics, indent=2, allow_nan=False)
    atomic_write_text(out_dir / "report.md", render_report(metrics, figures))
    atomic_write_text(out_dir / "metrics.json", text + "\n")
