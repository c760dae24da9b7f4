"""Agreement statistics: weighted kappa and its standard errors, the z-tests, the bootstrap,
concordance, ICC(2,1) and Bland-Altman (see `cac_jax.evaluation` for the methods and references).

`linear_kappa` is the one linearly weighted kappa of a count table, shared by training's
validation and `cac-jax evaluate`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

Z_95 = 1.959963984540054  # two-sided 95% normal quantile

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


def _categories(values: Sequence[int], n_categories: int, name: str) -> np.ndarray:
    """`values` as int64 after checking every one is a category 0..n_categories - 1 (a case
    outside them would be left out of a table, or counted in the wrong cell)."""
    values = np.asarray(values, dtype=np.int64)
    bad = values[(values < 0) | (values >= n_categories)]
    if bad.size:
        raise ValueError(f"{name} categories must be 0..{n_categories - 1}; got "
                         f"{sorted(set(bad.tolist()))[:5]}")
    return values


def confusion_table(reference: Sequence[int], predicted: Sequence[int],
                    n_categories: int) -> np.ndarray:
    """Counts (k, k): rows reference category, columns predicted category."""
    from sklearn.metrics import confusion_matrix

    reference = _categories(reference, n_categories, "reference")
    predicted = _categories(predicted, n_categories, "predicted")
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
    # p_e(w) = 1 happens when both raters use a single category: kappa is 0/0. (Tested to
    # rounding only: a table of 100000 cases with two off the diagonal is still defined.)
    return np.where((np.abs(1.0 - expected) <= 1e-12) | (n == 0), np.nan, kappa)


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


def linear_kappa(table: np.ndarray) -> float:
    """Linearly weighted Cohen's kappa of one (reference x predicted) count table; NaN where it
    is undefined (no cases, or both raters use one and the same single category).

    scikit-learn's `cohen_kappa_score(weights="linear")` on the table's cells, each weighted by
    its count. Training's validation kappa and `weighted_kappa` both use it; `kappa_from_tables`
    is its vectorised form for stacks of bootstrap tables (tested equal).
    """
    from sklearn.metrics import cohen_kappa_score

    table = np.asarray(table, dtype=np.int64)
    n = int(table.sum())
    if n == 0 or int(table.diagonal().max()) == n:  # chance agreement 1: kappa is 0/0
        return math.nan
    reference, predicted = np.indices(table.shape).reshape(2, -1)
    return float(cohen_kappa_score(reference, predicted, labels=list(range(table.shape[0])),
                                   weights="linear", sample_weight=table.ravel()))


def weighted_kappa(reference: Sequence[int], predicted: Sequence[int],
                   n_categories: int = 4) -> KappaResult:
    """Linearly weighted Cohen's kappa (`linear_kappa`) with asymptotic SE and Wald 95% CI."""
    reference = np.asarray(reference, dtype=np.int64)
    predicted = np.asarray(predicted, dtype=np.int64)
    n = int(reference.size)
    if n < 2:
        return KappaResult(n, None, None, None, None, f"needs at least 2 cases, has {n}")
    table = confusion_table(reference, predicted, n_categories)
    kappa = linear_kappa(table)
    if math.isnan(kappa):
        return KappaResult(n, None, None, None, None,
                           "undefined: reference and prediction each use one and the same "
                           "single category (chance agreement is 1)")
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
    n_clusters: int | None = None  # what each resample draws: cases, or clusters (patients)


def _cluster_cells(reference: np.ndarray, predicted: np.ndarray, cluster: np.ndarray,
                   n_clusters: int, k: int) -> np.ndarray:
    """(n_clusters, k * k): each cluster's counts per (reference, predicted) cell."""
    cells = np.zeros((n_clusters, k * k))
    np.add.at(cells, (cluster, reference * k + predicted), 1.0)
    return cells


def _bootstrap_tables(cells: np.ndarray, multiplicity: np.ndarray, k: int) -> np.ndarray:
    """(B, k, k) tables of B resamples: each drawn cluster's counts, as often as it was drawn."""
    return (multiplicity @ cells).reshape(-1, k, k)  # sums of integers: exact in float64


def bootstrap_kappa(reference: Sequence[int], predicted: Sequence[int], n_categories: int = 4, *,
                    n_resamples: int = 2000, seed: int = 0,
                    predicted_2: Sequence[int] | None = None,
                    clusters: Sequence | None = None) -> BootstrapResult:
    """Percentile 95% CI of linearly weighted kappa from `n_resamples` resamples.

    Each resample draws, with replacement, as many clusters as there are: the cases themselves,
    or with `clusters` (one label per case, e.g. its patient) whole clusters, all their cases
    together, so the scans of one patient (correlated) are not treated as independent.
    With `predicted_2` (a second model on the same cases) each resample scores both models on the
    same drawn cases, giving the paired z-test of their difference and its percentile CI.
    Resamples where a kappa is undefined are left out and counted (`n_defined`).
    """
    reference = _categories(reference, n_categories, "reference")
    predicted = _categories(predicted, n_categories, "predicted")
    if reference.shape != predicted.shape or reference.ndim != 1:
        raise ValueError("reference and predicted must be 1-D and of equal length")
    n = reference.size
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    if clusters is None:
        cluster = np.arange(n)
    else:
        labels = np.asarray(clusters)
        if labels.shape != reference.shape:
            raise ValueError(f"clusters must have one label per case ({n}), got {labels.shape}")
        _, cluster = np.unique(labels, return_inverse=True)
        cluster = cluster.reshape(-1)
    n_clusters = int(cluster.max()) + 1 if n else 0
    k = n_categories
    cells = _cluster_cells(reference, predicted, cluster, n_clusters, k)
    cells_2 = None
    if predicted_2 is not None:
        second = _categories(predicted_2, n_categories, "predicted_2")
        if second.shape != reference.shape:
            raise ValueError("predicted_2 must have one category per case")
        cells_2 = _cluster_cells(reference, second, cluster, n_clusters, k)
    rng = np.random.default_rng(seed)
    kappas, kappas_2 = [], []
    # Bound the (B, clusters) draw and multiplicity arrays.
    chunk = max(1, min(n_resamples, 2_000_000 // max(n_clusters, 1)))
    done = 0
    while done < n_resamples:
        size = min(chunk, n_resamples - done)
        draws = rng.integers(0, n_clusters, size=(size, n_clusters))
        offsets = np.arange(size)[:, None] * n_clusters
        multiplicity = np.bincount((draws + offsets).ravel(), minlength=size * n_clusters)
        multiplicity = multiplicity.reshape(size, n_clusters).astype(np.float64)
        kappas.append(kappa_from_tables(_bootstrap_tables(cells, multiplicity, k)))
        if cells_2 is not None:
            kappas_2.append(kappa_from_tables(_bootstrap_tables(cells_2, multiplicity, k)))
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

    result = BootstrapResult(n_resamples, int(defined.sum()), interval(kappa[defined]),
                             n_clusters=n_clusters)
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
    if mse <= 1e-15 * scale and msc <= 1e-15 * scale:
        # No disagreement at all (no residual, and the raters' means agree): exactly 1.
        ci = (float(icc), float(icc))
    elif icc < 1.0:
        # With no residual but a constant offset between raters (mse = 0, msc > 0) the
        # formula's limit holds (Satterthwaite's v = k - 1), so the CI keeps its width.
        mse = max(mse, 0.0)
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

