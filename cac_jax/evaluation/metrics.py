"""Metric assembly: every agreement metric of one or two models against the reference, per group
of cases, as a strict-JSON dict (`evaluate` reads, matches and computes)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from cac_jax.evaluation.inputs import (
    Case,
    EvaluationInputError,
    match_cases,
    read_predictions,
    read_reference,
)
from cac_jax.evaluation.statistics import (
    ZTest,
    bland_altman_log,
    bootstrap_kappa,
    concordance,
    icc_absolute_agreement,
    kappa_z_test,
    weighted_kappa,
)
from cac_jax.scoring import CATEGORY_NAMES, CATEGORY_NAMES_5, cac_category
from data_pipeline.constants import NUM_CATEGORIES


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
                  seed: int = 0, patients: np.ndarray | None = None) -> dict[str, Any]:
    """All agreement metrics of one model against the reference, as a strict-JSON dict.

    `reference_category` (4 classes) overrides the category derived from the reference score
    (an expert's category read directly); the 5-class variant always derives from the scores.
    `patients` (one label per case) makes the bootstrap resample patients, not cases.
    """
    reference_agatston = np.asarray(reference_agatston, dtype=np.float64)
    predicted_agatston = np.asarray(predicted_agatston, dtype=np.float64)
    ref_cat = (np.asarray(reference_category, dtype=np.int64) if reference_category is not None
               else np.array([cac_category(a) for a in reference_agatston], dtype=np.int64))
    pred_cat = np.array([cac_category(a) for a in predicted_agatston], dtype=np.int64)
    null_reasons: dict[str, str] = {}
    block: dict[str, Any] = {"n": int(reference_agatston.size),
                             "categories": list(CATEGORY_NAMES)}
    block.update(_kappa_block(ref_cat, pred_cat, NUM_CATEGORIES, CATEGORY_NAMES,
                              null_reasons))
    if n_bootstrap:
        boot = bootstrap_kappa(ref_cat, pred_cat, NUM_CATEGORIES, n_resamples=n_bootstrap,
                               seed=seed, clusters=patients)
        block["kappa_linear_bootstrap_ci95"] = _pair(boot.ci95)
        block["bootstrap"] = {"n_resamples": boot.n_resamples, "n_defined": boot.n_defined,
                              "seed": seed, "method": f"percentile, {_resampling(patients)}",
                              "n_resampled_units": boot.n_clusters}
        if boot.ci95 is None:
            null_reasons["kappa_linear_bootstrap_ci95"] = (
                f"kappa defined on {boot.n_defined} of {boot.n_resamples} resamples; a "
                "percentile CI needs at least 2")
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


def _resampling(patients: np.ndarray | None) -> str:
    """What the bootstrap draws with replacement."""
    if patients is None:
        return "cases resampled"
    return "patients resampled (all of a patient's scans together)"


def _comparison(cases: Sequence[Case], second: dict[str, Any], ref_cat: np.ndarray,
                patients: np.ndarray | None, n_bootstrap: int, seed: int) -> dict[str, Any]:
    """The two models' kappas compared: both tests on the reference categories the kappas use."""
    pred_cat = np.array([cac_category(c.agatston) for c in cases], dtype=np.int64)
    pred2_cat = np.array([cac_category(c.agatston_2) for c in cases], dtype=np.int64)
    k = NUM_CATEGORIES
    test = kappa_z_test(weighted_kappa(ref_cat, pred_cat, k), weighted_kappa(ref_cat, pred2_cat, k))
    out: dict[str, Any] = {
        "kappa_linear_2": second["kappa_linear"],
        "kappa_linear_2_ci95": second["kappa_linear_ci95"],
        "z_test_p": _num(test.p),
        "z_test": _ztest_json(test),
    }
    if n_bootstrap:
        boot = bootstrap_kappa(ref_cat, pred_cat, k, n_resamples=n_bootstrap, seed=seed,
                               predicted_2=pred2_cat, clusters=patients)
        out["z_test_paired_bootstrap"] = {**_ztest_json(boot.paired_test),
                                          "difference_ci95": _pair(boot.difference_ci95),
                                          "n_resamples": boot.n_resamples,
                                          "n_defined": boot.n_defined,
                                          "resampling": _resampling(patients)}
    return out


def _ztest_json(test: ZTest) -> dict[str, Any]:
    return {"difference": _num(test.difference), "se": _num(test.std_err), "z": _num(test.z),
            "p": _num(test.p), "assumption": test.method, "null_reason": test.null_reason}


def uses_category_column(cases: Sequence[Case]) -> bool:
    """Whether the reference categories are the reference CSV's `category` column: only when
    every case has one. A partly filled column is not used at all (each case's category from its
    reference agatston), so every kappa, test and group of one evaluation uses one set."""
    return all(c.reference_category is not None for c in cases)


def reference_categories(cases: Sequence[Case], category_column: bool) -> np.ndarray:
    """The 4-class reference category of each case: the given column's, or from the agatston."""
    return np.array([c.reference_category if category_column
                     else cac_category(c.reference_agatston) for c in cases], dtype=np.int64)


def patient_labels(cases: Sequence[Case]) -> np.ndarray | None:
    """One integer per case naming its patient, for the bootstrap; None when the reference gives
    no patient_id (cases are resampled). A case without a patient_id is a patient of its own."""
    if not any(c.patient_id for c in cases):
        return None
    ids: dict[tuple[str, str], int] = {}
    return np.array([ids.setdefault(("patient", c.patient_id) if c.patient_id
                                    else ("scan", c.scan_id), len(ids)) for c in cases])


def group_metrics(cases: Sequence[Case], *, two_models: bool, five_class: bool,
                  n_bootstrap: int, seed: int, volume_reason: str | None,
                  category_column: bool | None = None) -> dict[str, Any]:
    """Metrics of one group of cases (all, or one protocol): model 1, and model 2 with the tests.

    `category_column`: whether the reference categories are the CSV's column (`evaluate` decides
    it once over all cases; None: decided on this group's cases).
    """
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
    if category_column is None:
        category_column = uses_category_column(cases)
    ref_cat = reference_categories(cases, category_column)
    patients = patient_labels(cases)
    common = dict(reference_category=ref_cat, reference_volume=ref_volume, volume_reason=reason,
                  five_class=five_class, n_bootstrap=n_bootstrap, seed=seed, patients=patients)
    reference = np.array([c.reference_agatston for c in cases])
    first = model_metrics(reference, np.array([c.agatston for c in cases]),
                          predicted_volume=pred_volume, **common)
    if not two_models:
        return first
    second = model_metrics(reference, np.array([c.agatston_2 for c in cases]),
                           predicted_volume=pred2_volume, **common)
    first.update(_comparison(cases, second, ref_cat, patients, n_bootstrap, seed))
    first["model_2"] = second
    # The comparison's nulls explained where every other null is: the block's null_reasons.
    if first["kappa_linear_2"] is None:
        first["null_reasons"]["kappa_linear_2"] = second["null_reasons"].get(
            "kappa_linear", "undefined for the second model")
    if first["z_test_p"] is None:
        first["null_reasons"]["z_test_p"] = first["z_test"]["null_reason"]
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
                                   ref_path=inputs.ref,
                                   left_out={e.scan_id for e in excluded if e.source == "pred"})
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
    category_column = uses_category_column(cases)
    given = sum(c.reference_category is not None for c in cases)
    options = dict(two_models=pred2 is not None, five_class=inputs.five_class,
                   n_bootstrap=inputs.n_bootstrap, seed=inputs.seed, volume_reason=volume_reason,
                   category_column=category_column)
    metrics: dict[str, Any] = {
        "inputs": dataclasses.asdict(inputs),
        "kappa_ci_method": ("Wald: kappa +- 1.96 x asymptotic SE (Fleiss, Cohen & Everitt 1969), "
                            "truncated to [-1, 1]"),
        "reference_category": (
            "the reference CSV's category column" if category_column
            else "from the reference agatston" + (
                f" (the category column is filled for {given} of {len(cases)} cases, so it is "
                "not used)" if given else "")),
        "bootstrap_resampling": _resampling(patient_labels(cases)) if inputs.n_bootstrap else None,
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
    # read on another scale); a complete category column is still what the kappas use.
    metrics["warnings"] = [
        f"{c.reference_scan_id}: reference category {c.reference_category} "
        f"({CATEGORY_NAMES[c.reference_category]}) but its agatston {c.reference_agatston:g} is "
        f"category {cac_category(c.reference_agatston)}"
        for c in cases if c.reference_category is not None
        and c.reference_category != cac_category(c.reference_agatston)]
    return metrics, cases

