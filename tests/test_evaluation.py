"""Agreement statistics against independent implementations, and `cac-jax evaluate` end to end.

Independent references: statsmodels' `cohens_kappa` (weighted kappa and its Fleiss-Cohen-Everitt
standard errors), scikit-learn's `cohen_kappa_score` (kappa from raw ratings), Shrout & Fleiss's
(1979) worked example (their Table 2 ratings, ICC(2,1) = 0.29 in their Table 4) and pingouin's
`intraclass_corr` (ICC(A,1) and its McGraw & Wong CI).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import cohen_kappa_score

from cac_jax import evaluation as ev
from cac_jax.cli import main
from cac_jax.scoring import cac_category

# Shrout & Fleiss (1979), Table 2: 6 targets rated by 4 judges.
SHROUT_FLEISS = np.array([[9, 2, 5, 8], [6, 1, 3, 2], [8, 4, 6, 8],
                          [7, 1, 2, 6], [10, 5, 6, 9], [6, 2, 4, 7]], dtype=float)


def _random_tables(count: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    tables = []
    for index in range(count):
        table = rng.integers(0, 25, size=(4, 4)) + np.diag(rng.integers(5, 60, size=4))
        if index % 3 == 1:
            table[rng.integers(4)] = 0  # a reference category nobody has
        if index % 3 == 2:
            table[:, rng.integers(4)] = 0  # a category the model never predicts
        tables.append(table)
    return tables


def _ratings_from_table(table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    rows, cols = np.nonzero(table)
    counts = table[rows, cols]
    return np.repeat(rows, counts), np.repeat(cols, counts)


# ----------------------------------------------------------------------------- kappa


def test_kappa_and_standard_errors_match_statsmodels():
    from statsmodels.stats.inter_rater import cohens_kappa

    for table in _random_tables(12, seed=1):
        reference, predicted = _ratings_from_table(table)
        ours = ev.weighted_kappa(reference, predicted, 4)
        theirs = cohens_kappa(table, wt="linear")
        assert ours.kappa == pytest.approx(theirs.kappa, abs=1e-12)
        assert ours.std_err == pytest.approx(theirs.std_kappa, abs=1e-12)
        assert ours.std_err_null == pytest.approx(theirs.std_kappa0, abs=1e-12)
        assert ours.ci95[0] == pytest.approx(max(theirs.kappa_low, -1.0), abs=1e-9)
        assert ours.ci95[1] == pytest.approx(min(theirs.kappa_upp, 1.0), abs=1e-9)


def test_vectorised_kappa_matches_sklearn():
    tables = _random_tables(9, seed=2)
    stacked = ev.kappa_from_tables(np.stack(tables))
    for table, ours in zip(tables, stacked):
        reference, predicted = _ratings_from_table(table)
        expected = cohen_kappa_score(reference, predicted, labels=[0, 1, 2, 3], weights="linear")
        assert ours == pytest.approx(expected, abs=1e-12)


def test_linear_kappa_of_a_table_is_sklearns_and_training_uses_it():
    # One linear kappa for training's validation and `cac-jax evaluate`: the table's kappa equals
    # scikit-learn's on the expanded ratings, NaN where it is undefined.
    from cac_jax import validation

    assert validation.linear_kappa is ev.linear_kappa
    for table in _random_tables(9, seed=4):
        reference, predicted = _ratings_from_table(table)
        assert ev.linear_kappa(table) == pytest.approx(
            cohen_kappa_score(reference, predicted, labels=[0, 1, 2, 3], weights="linear"),
            abs=1e-12)
    assert math.isnan(ev.linear_kappa(np.zeros((4, 4), int)))
    single = np.zeros((4, 4), int)
    single[2, 2] = 5  # both raters use one and the same category: chance agreement 1
    assert math.isnan(ev.linear_kappa(single))
    single[2, 3] = 1
    assert ev.linear_kappa(single) == pytest.approx(0.0, abs=1e-12)


def test_kappa_perfect_and_undefined():
    perfect = ev.weighted_kappa([0, 1, 2, 3, 3], [0, 1, 2, 3, 3])
    assert perfect.kappa == pytest.approx(1.0)
    assert perfect.std_err == pytest.approx(0.0, abs=1e-9)
    assert perfect.ci95 == pytest.approx((1.0, 1.0), abs=1e-9)
    single = ev.weighted_kappa([2, 2, 2], [2, 2, 2])
    assert single.kappa is None and "single category" in single.null_reason
    assert ev.weighted_kappa([1], [1]).null_reason.startswith("needs at least 2")


def test_single_category_prediction_is_flagged():
    # The naive scorer on CTAC calls every scan > 400: kappa 0 by construction, SE 0.
    block = ev.model_metrics(np.array([0.0, 50.0, 200.0, 900.0]),
                             np.array([800.0, 1200.0, 3000.0, 5000.0]))
    assert block["kappa_linear"] == pytest.approx(0.0, abs=1e-12)
    assert block["kappa_linear_ci95"] == pytest.approx([0.0, 0.0], abs=1e-9)
    assert "single category >400" in block["kappa_linear_notes"][0]
    assert block["sensitivity"] == {"0": 0.0, "1-100": 0.0, "101-400": 0.0, ">400": 1.0}


def test_bootstrap_agrees_with_asymptotic_ci_and_is_seeded():
    rng = np.random.default_rng(3)
    reference = rng.integers(0, 4, 400)
    predicted = np.clip(reference + rng.choice([-1, 0, 0, 0, 1], 400), 0, 3)
    asymptotic = ev.weighted_kappa(reference, predicted)
    boot = ev.bootstrap_kappa(reference, predicted, n_resamples=1500, seed=7)
    assert boot.n_defined == 1500
    assert boot.ci95[0] < asymptotic.kappa < boot.ci95[1]
    # For n = 400 the two 95% intervals should nearly coincide.
    assert boot.ci95 == pytest.approx(asymptotic.ci95, abs=0.02)
    assert ev.bootstrap_kappa(reference, predicted, n_resamples=1500, seed=7) == boot


def test_paired_bootstrap_keeps_the_dependence_the_independent_test_ignores():
    rng = np.random.default_rng(4)
    n = 300
    reference = rng.integers(0, 4, n)
    first = np.clip(reference + rng.choice([-1, 0, 0, 0, 1], n), 0, 3)
    second = first.copy()
    changed = rng.choice(n, 25, replace=False)  # the two models differ on a few cases only
    second[changed] = np.clip(reference[changed] + rng.choice([-1, 1], 25), 0, 3)
    k1, k2 = ev.weighted_kappa(reference, first), ev.weighted_kappa(reference, second)
    independent = ev.kappa_z_test(k1, k2)
    assert independent.difference == pytest.approx(k1.kappa - k2.kappa)
    assert independent.std_err == pytest.approx(math.hypot(k1.std_err, k2.std_err))
    assert independent.p == pytest.approx(math.erfc(abs(independent.z) / math.sqrt(2)))
    boot = ev.bootstrap_kappa(reference, first, n_resamples=1000, seed=0, predicted_2=second)
    paired = boot.paired_test
    assert paired.difference == pytest.approx(independent.difference)
    # Highly correlated kappas: the difference varies far less than independence assumes.
    assert paired.std_err < 0.5 * independent.std_err
    assert paired.p < independent.p
    same = ev.bootstrap_kappa(reference, first, n_resamples=50, seed=0, predicted_2=first)
    assert same.paired_test.p is None and "equal on every resample" in \
        same.paired_test.null_reason


# ----------------------------------------------------------------------------- concordance, ICC


def test_concordance_rows_are_reference():
    reference = [0, 0, 0, 1, 1, 3, 3, 3, 3]
    predicted = [0, 0, 1, 1, 2, 3, 3, 2, 3]
    result = ev.concordance(reference, predicted, 4)
    assert result.counts.tolist() == [[2, 1, 0, 0], [0, 1, 1, 0], [0, 0, 0, 0], [0, 0, 1, 3]]
    assert result.row_percent[0] == pytest.approx([200 / 3, 100 / 3, 0, 0])
    assert result.row_percent[2] is None
    assert result.sensitivity[2] is None  # no reference case in 101-400
    assert [result.sensitivity[i] for i in (0, 1, 3)] == pytest.approx([2 / 3, 0.5, 0.75])
    assert result.exact_agreement == pytest.approx(6 / 9)


@pytest.mark.filterwarnings("ignore:The inplace keyword")  # pingouin's own pandas call
def test_icc_shrout_fleiss_worked_example_and_pingouin():
    pingouin = pytest.importorskip("pingouin")
    import pandas as pd

    result = ev.icc_absolute_agreement(SHROUT_FLEISS)
    assert round(result.icc, 2) == 0.29  # Shrout & Fleiss (1979), Table 4, ICC(2,1)

    def pingouin_icc(ratings):
        n, k = ratings.shape
        frame = pd.DataFrame({"target": np.repeat(np.arange(n), k),
                              "rater": np.tile(np.arange(k), n), "rating": ratings.ravel()})
        table = pingouin.intraclass_corr(frame, targets="target", raters="rater",
                                         ratings="rating").set_index("Type")
        return table.loc["ICC(A,1)", "ICC"], table.loc["ICC(A,1)", "CI95"]

    rng = np.random.default_rng(5)
    truth = rng.gamma(0.8, 200.0, size=40)
    two_raters = np.stack([truth, truth * 1.1 + rng.normal(0, 60, 40)], axis=1)
    for ratings in (SHROUT_FLEISS, two_raters):
        ours = ev.icc_absolute_agreement(ratings)
        icc, ci = pingouin_icc(ratings)
        assert ours.icc == pytest.approx(icc, abs=1e-9)
        assert ours.ci95 == pytest.approx(tuple(ci), abs=0.005 + 1e-9)  # pingouin rounds to 0.01


def test_icc_degenerate_cases():
    constant = ev.icc_absolute_agreement(np.full((5, 2), 7.0))
    assert constant.icc is None and "same rating" in constant.null_reason
    identical = ev.icc_absolute_agreement(np.stack([np.arange(5.0)] * 2, axis=1))
    assert identical.icc == pytest.approx(1.0) and identical.ci95 == pytest.approx((1.0, 1.0))
    assert ev.icc_absolute_agreement(np.ones((1, 2))).null_reason.startswith("needs")


def test_icc_ci_keeps_its_width_when_raters_differ_by_a_constant():
    # No residual (prediction = reference + 30) but the raters' means differ: the ICC is below
    # 1 and its CI is the formula's limit (Satterthwaite's v = k - 1), which a prediction off by
    # 0.001 more reaches too; only full agreement gives the zero-width (1, 1).
    reference = np.array([0.0, 10.0, 50.0, 120.0, 500.0])
    offset = ev.icc_absolute_agreement(np.stack([reference, reference + 30.0], axis=1))
    nudged = reference + 30.0
    nudged[-1] += 0.001
    near = ev.icc_absolute_agreement(np.stack([reference, nudged], axis=1))
    assert offset.icc < 1.0
    assert offset.ci95 == pytest.approx(near.ci95, abs=1e-4)
    assert offset.ci95[0] < 0.2 and offset.ci95[1] > offset.icc


def test_categories_outside_the_table_are_refused():
    # sklearn's confusion_matrix(labels=...) would drop the case, np.add.at would wrap -1 into the
    # last cell: either way a disagreement would be counted as agreement.
    with pytest.raises(ValueError, match=r"reference categories must be 0\.\.3; got \[7\]"):
        ev.weighted_kappa([0, 1, 2, 3, 7], [0, 1, 2, 3, 0])
    with pytest.raises(ValueError, match=r"reference categories must be 0\.\.3; got \[-1\]"):
        ev.bootstrap_kappa([0, 1, 2, -1], [0, 1, 2, 3], n_resamples=20)
    with pytest.raises(ValueError, match="predicted categories"):
        ev.concordance([0, 1], [0, 4])


def test_kappa_stays_defined_on_a_large_nearly_single_category_table():
    table = np.zeros((4, 4))
    table[0, 0], table[1, 1], table[1, 0] = 99998, 1, 1
    assert ev.kappa_from_tables(table) == pytest.approx(ev.linear_kappa(table), rel=1e-9)


def test_protocol_figures_never_overwrite_each_other_or_all_cases(tmp_path):
    from cac_jax.evaluation.report import protocol_suffixes

    assert protocol_suffixes(["all", "ct ac", "ct_ac", "cac"]) == {
        "all": "_all", "ct ac": "_ct_ac", "ct_ac": "_ct_ac_2", "cac": "_cac"}
    ref = _write_csv(tmp_path / "ref.csv", ["scan_id", "protocol", "agatston"],
                     [[f"s{i}", "all" if i % 2 else "cac", str(50 * i)] for i in range(8)])
    pred = _write_csv(tmp_path / "results.csv", ["scan_id", "protocol", "status", "agatston"],
                      [[f"s{i}", "all" if i % 2 else "cac", "ok", str(40 * i)]
                       for i in range(8)])
    out = tmp_path / "eval"
    assert main(["evaluate", "--pred", str(pred), "--ref", str(ref), "--by", "protocol",
                 "--out", str(out)]) == 0
    report = (out / "report.md").read_text()
    all_cases, by_protocol = report.split("## Protocol", 1)
    assert "(concordance.png)" in all_cases and "concordance_all.png" not in all_cases
    assert "(concordance_all.png)" in by_protocol and "(concordance_cac.png)" in by_protocol
    assert {p.name for p in out.glob("concordance*.png")} == {
        "concordance.png", "concordance_all.png", "concordance_cac.png"}


def test_two_models_null_reasons_sit_in_the_blocks_null_reasons(tmp_path):
    # Everyone in category 0, both models too: both kappas and the z-test are undefined, and
    # each null is explained under the block's null_reasons, as every other null.
    ref = _write_csv(tmp_path / "ref.csv", ["scan_id", "agatston"],
                     [[f"s{i}", "0"] for i in range(4)])
    pred = _write_csv(tmp_path / "one.csv", ["scan_id", "status", "agatston"],
                      [[f"s{i}", "ok", "0"] for i in range(4)])
    pred2 = _write_csv(tmp_path / "two.csv", ["scan_id", "status", "agatston"],
                       [[f"s{i}", "ok", "0"] for i in range(4)])
    out = tmp_path / "eval"
    assert main(["evaluate", "--pred", str(pred), "--pred2", str(pred2), "--ref", str(ref),
                 "--bootstrap", "1", "--out", str(out)]) == 0
    metrics = _strict_json(out / "metrics.json")
    assert metrics["kappa_linear_2"] is None and metrics["z_test_p"] is None
    reasons = metrics["null_reasons"]
    assert reasons["kappa_linear_2"] == metrics["model_2"]["null_reasons"]["kappa_linear"]
    assert reasons["z_test_p"] == metrics["z_test"]["null_reason"]
    assert reasons["kappa_linear_bootstrap_ci95"].startswith("kappa defined on 0 of 1 resamples")


def test_bland_altman_on_log_scale():
    reference = np.array([0.0, 10.0, 100.0, 400.0, 1000.0])
    predicted = np.expm1(np.log1p(reference) + np.array([0.1, 0.3, 0.2, 0.0, 0.4]))
    result = ev.bland_altman_log(reference, predicted)
    difference = np.array([0.1, 0.3, 0.2, 0.0, 0.4])
    assert result.bias == pytest.approx(difference.mean())
    assert result.sd == pytest.approx(difference.std(ddof=1))
    assert result.loa95 == pytest.approx((0.2 - 1.96 * result.sd, 0.2 + 1.96 * result.sd),
                                         abs=1e-4)
    assert result.bias_ci95[0] < result.bias < result.bias_ci95[1]


# ----------------------------------------------------------------------------- CLI end to end


def _write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


RESULT_COLUMNS = ["scan_id", "image", "protocol", "status", "error", "agatston", "volume_mm3",
                  "category", "category_name", "n_lesions", "heart_volume_ml", "heart_model",
                  "calcium_model", "heart_step", "calcium_step", "seconds"]
MANIFEST_COLUMNS = ["patient_id", "scan_id", "protocol", "image", "calcium_labels", "heart_mask",
                    "site", "split", "agatston", "category"]


def _cohort(tmp_path: Path, n_patients: int = 24, seed: int = 0):
    """A paired cohort's manifest and two models' results: CTAC scores noisier than CAC."""
    rng = np.random.default_rng(seed)
    truth = np.concatenate([np.zeros(n_patients // 4),
                            rng.uniform(1, 100, n_patients // 4),
                            rng.uniform(101, 400, n_patients // 4),
                            rng.uniform(401, 2000, n_patients - 3 * (n_patients // 4))])
    manifest, results, results2 = [], [], []
    for index, score in enumerate(truth):
        patient = f"p{index:02d}"
        for protocol, noise in (("cac", 0.15), ("ctac", 0.6)):
            scan = f"{patient}-{protocol}"
            # The CTAC reference is scored on the CTAC scan itself: lower than the gated one.
            reference = score * (0.7 if protocol == "ctac" else 1.0)
            manifest.append([patient, scan, protocol, f"{scan}/dicom", "", "", "site", "test",
                             f"{reference:.4f}", ""])
            for rows, model_noise in ((results, noise), (results2, noise * 1.5)):
                predicted = reference * float(np.exp(rng.normal(0, model_noise))) \
                    if reference > 0 else float(rng.choice([0.0, 0.0, 5.0]))
                rows.append([scan, f"{scan}/dicom", protocol, "ok", "", f"{predicted:.4f}",
                             f"{predicted * 1.2:.4f}", cac_category(predicted), "", 1, 600.0,
                             "convlstm", "convlstm", 10, 10, 1.5])
    results.append(["p99-cac", "broken/dicom", "cac", "error", "", "", "", "", "", "", "", "",
                    "", "", "", ""])
    results[-1][4] = "broken/dicom: no DICOM files"
    results.append(["stray-scan", "stray", "cac", "ok", "", "12.0", "14.4", 1, "", 1, 600.0,
                    "convlstm", "convlstm", 10, 10, 1.5])
    ref = _write_csv(tmp_path / "manifest.csv", MANIFEST_COLUMNS, manifest)
    pred = _write_csv(tmp_path / "convlstm_results.csv", RESULT_COLUMNS, results)
    pred2 = _write_csv(tmp_path / "unet_results.csv", RESULT_COLUMNS, results2)
    return ref, pred, pred2, manifest, results, results2


def _strict_json(path: Path) -> dict:
    def reject(token):
        raise AssertionError(f"non-standard JSON token {token} in {path}")

    return json.loads(path.read_text(), parse_constant=reject)


def test_cli_end_to_end(tmp_path, capsys):
    ref, pred, pred2, manifest, results, results2 = _cohort(tmp_path)
    # The second model failed on one scan the first one scored.
    pred2 = _write_csv(tmp_path / "unet_results.csv", RESULT_COLUMNS,
                       [row for row in results2 if row[0] != "p05-cac"])
    out = tmp_path / "eval"
    code = main(["evaluate", "--pred", str(pred), "--pred2", str(pred2), "--ref", str(ref),
                 "--by", "protocol", "--bootstrap", "200", "--five-class", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    metrics = _strict_json(out / "metrics.json")
    # Everything scored by both models and present in the reference: 47 scans.
    assert metrics["n"] == 47
    ref_scores = {row[1]: float(row[8]) for row in manifest}
    ok = [row for row in results if row[3] == "ok" and row[0] in ref_scores
          and row[0] != "p05-cac"]
    reference = [cac_category(ref_scores[row[0]]) for row in ok]
    predicted = [cac_category(float(row[5])) for row in ok]
    assert metrics["kappa_linear"] == pytest.approx(
        cohen_kappa_score(reference, predicted, weights="linear"), abs=1e-12)
    low, high = metrics["kappa_linear_ci95"]
    assert low < metrics["kappa_linear"] < high
    assert len(metrics["kappa_linear_bootstrap_ci95"]) == 2
    assert np.array(metrics["concordance"]).shape == (4, 4)
    assert np.array(metrics["concordance"]).sum() == 47
    assert np.array(metrics["concordance"]).sum(axis=1).tolist() == np.bincount(
        reference, minlength=4).tolist()  # rows are the reference
    assert metrics["exact_agreement"] == pytest.approx(np.mean(np.equal(reference, predicted)))
    assert -1 <= metrics["icc_agatston"] <= 1
    assert metrics["icc_volume"] is None and "volume_mm3" in metrics["null_reasons"]["icc_volume"]
    assert 0 <= metrics["z_test_p"] <= 1 and metrics["kappa_linear_2"] is not None
    assert metrics["z_test_paired_bootstrap"]["n_resamples"] == 200
    assert np.array(metrics["five_class"]["concordance"]).shape == (5, 5)
    assert set(metrics["by_protocol"]) == {"cac", "ctac"}
    assert [metrics["by_protocol"][name]["n"] for name in ("cac", "ctac")] == [23, 24]
    for name, block in metrics["by_protocol"].items():
        for key in ("kappa_linear", "kappa_linear_ci95", "exact_agreement", "concordance",
                    "icc_agatston", "kappa_linear_2", "z_test_p"):
            assert key in block, (name, key)
    # The noisier protocol agrees less (the data were made so).
    assert metrics["by_protocol"]["ctac"]["kappa_linear"] < \
        metrics["by_protocol"]["cac"]["kappa_linear"]
    excluded = {(e["scan_id"], e["source"]): e["reason"] for e in metrics["excluded"]}
    assert "no DICOM files" in excluded[("p99-cac", "pred")]
    assert "no row with this scan_id" in excluded[("stray-scan", "pred")]
    assert "not (or not successfully) by the second" in excluded[("p05-cac", "pred2")]
    assert len(metrics["excluded"]) == metrics["n_excluded"] == 3
    report = (out / "report.md").read_text()
    for text in ("p99-cac", "stray-scan", "Protocol ctac", "concordance.png", "bland_altman.png",
                 "Fleiss, Cohen & Everitt", "independent"):
        assert text in report
    for name in ("concordance.png", "concordance_ctac.png", "concordance_5class.png",
                 "bland_altman.png", "bland_altman_cac.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert "kappa=" in capsys.readouterr().out


def test_cli_ref_protocol_matches_each_ctac_scan_to_the_patients_gated_reference(tmp_path,
                                                                                  capsys):
    ref, pred, _, manifest, results, _ = _cohort(tmp_path, seed=1)
    ctac_only = [row for row in results if row[2] == "ctac"]
    ctac_only.append(["orphan-ctac", "x", "ctac", "ok", "", "3.0", "", 1, "", 1, 1.0, "", "", 1,
                      1, 1.0])
    pred = _write_csv(tmp_path / "ctac_results.csv", RESULT_COLUMNS, ctac_only)
    # A patient whose gated scan is missing from the manifest.
    manifest = [row for row in manifest if row[1] != "p03-cac"]
    ref = _write_csv(tmp_path / "manifest_no_p03.csv", MANIFEST_COLUMNS, manifest)
    out = tmp_path / "eval"
    assert main(["evaluate", "--pred", str(pred), "--ref", str(ref), "--ref-protocol", "cac",
                 "--out", str(out)]) == 0, capsys.readouterr().err
    metrics = _strict_json(out / "metrics.json")
    gated = {row[0]: float(row[8]) for row in manifest if row[2] == "cac"}
    used = [row for row in ctac_only if row[0].split("-")[0] in gated]
    reference = [cac_category(gated[row[0].split("-")[0]]) for row in used]
    predicted = [cac_category(float(row[5])) for row in used]
    assert metrics["n"] == len(used) == 23
    assert metrics["kappa_linear"] == pytest.approx(
        cohen_kappa_score(reference, predicted, weights="linear"), abs=1e-12)
    reasons = {e["scan_id"]: e["reason"] for e in metrics["excluded"]}
    assert "has no cac scan" in reasons["p03-ctac"]
    assert "patient is unknown" in reasons["orphan-ctac"]


def test_partly_filled_category_column_one_set_of_reference_categories(tmp_path):
    # The category column is filled (and contradicts the scores) for the CAC scans only: it is
    # not used, and the kappas, both z-tests and the CAC group all use the categories from the
    # reference agatston.
    ref, pred, pred2, manifest, _, _ = _cohort(tmp_path)
    for row in manifest:
        if row[2] == "cac":
            row[9] = 3 - cac_category(float(row[8]))
    ref = _write_csv(tmp_path / "manifest.csv", MANIFEST_COLUMNS, manifest)
    metrics, cases = ev.evaluate(ev.EvaluationInputs(str(pred), str(ref), str(pred2),
                                                     by_protocol=True, n_bootstrap=200))
    assert "filled for 24 of 48 cases, so it is not used" in metrics["reference_category"]
    assert metrics["warnings"]  # the contradicting categories are still listed
    for block in (metrics, *metrics["by_protocol"].values()):
        difference = block["kappa_linear"] - block["kappa_linear_2"]
        assert block["z_test"]["difference"] == pytest.approx(difference, abs=1e-12)
        assert block["z_test_paired_bootstrap"]["difference"] == pytest.approx(difference,
                                                                               abs=1e-12)
    cac = [c for c in cases if c.protocol == "cac"]
    assert metrics["by_protocol"]["cac"]["kappa_linear"] == pytest.approx(cohen_kappa_score(
        [cac_category(c.reference_agatston) for c in cac],
        [cac_category(c.agatston) for c in cac], labels=[0, 1, 2, 3], weights="linear"),
        abs=1e-12)


def test_bootstrap_resamples_whole_clusters():
    # Every patient has two scans with the same ratings: drawing patients gives exactly the
    # case bootstrap of one scan per patient (same seed); drawing scans would not.
    rng = np.random.default_rng(8)
    reference = rng.integers(0, 4, 30)
    first = np.clip(reference + rng.choice([-1, 0, 0, 1], 30), 0, 3)
    second = np.clip(reference + rng.choice([-2, -1, 0, 1, 2], 30), 0, 3)
    one_scan = ev.bootstrap_kappa(reference, first, n_resamples=400, seed=3, predicted_2=second)
    patients = np.repeat(np.arange(30), 2)
    two_scans = [np.repeat(values, 2) for values in (reference, first, second)]
    clustered = ev.bootstrap_kappa(two_scans[0], two_scans[1], n_resamples=400, seed=3,
                                   predicted_2=two_scans[2], clusters=patients)
    assert clustered.n_clusters == 30
    assert clustered.ci95 == one_scan.ci95 and clustered.ci95_2 == one_scan.ci95_2
    assert clustered.difference_ci95 == one_scan.difference_ci95
    assert clustered.paired_test == one_scan.paired_test
    scans = ev.bootstrap_kappa(two_scans[0], two_scans[1], n_resamples=400, seed=3)
    assert scans.n_clusters == 60
    # Scans drawn as if independent: a narrower interval than the patients' own.
    assert scans.ci95[1] - scans.ci95[0] < clustered.ci95[1] - clustered.ci95[0]
    with pytest.raises(ValueError, match="one label per case"):
        ev.bootstrap_kappa(reference, first, clusters=patients)


def test_evaluate_bootstrap_resamples_patients(tmp_path):
    ref, pred, pred2, _, _, _ = _cohort(tmp_path)  # every patient has a CAC and a CTAC scan
    metrics, cases = ev.evaluate(ev.EvaluationInputs(str(pred), str(ref), str(pred2),
                                                     n_bootstrap=300, seed=4))
    assert {c.patient_id for c in cases} == {f"p{i:02d}" for i in range(24)}
    patients = [c.patient_id for c in cases]
    reference = [cac_category(c.reference_agatston) for c in cases]
    first = [cac_category(c.agatston) for c in cases]
    second = [cac_category(c.agatston_2) for c in cases]
    expected = ev.bootstrap_kappa(reference, first, n_resamples=300, seed=4,
                                  predicted_2=second, clusters=patients)
    assert metrics["kappa_linear_bootstrap_ci95"] == pytest.approx(list(expected.ci95),
                                                                   abs=1e-12)
    assert metrics["bootstrap"]["method"].startswith("percentile, patients resampled")
    assert metrics["bootstrap"]["n_resampled_units"] == 24
    paired = metrics["z_test_paired_bootstrap"]
    assert paired["resampling"].startswith("patients resampled")
    assert paired["difference_ci95"] == pytest.approx(list(expected.difference_ci95), abs=1e-12)
    assert paired["se"] == pytest.approx(expected.paired_test.std_err, abs=1e-12)
    by_case = ev.bootstrap_kappa(reference, first, n_resamples=300, seed=4)
    assert metrics["kappa_linear_bootstrap_ci95"] != pytest.approx(list(by_case.ci95), abs=1e-6)


def test_cli_small_group_gives_nulls_with_reasons(tmp_path, capsys):
    # b's given category (2: 101-400) contradicts its score (50: 1-100): used, with a warning.
    # a is listed twice with the same score: the repeat is left out and listed.
    ref = _write_csv(tmp_path / "ref.csv", ["scan_id", "agatston", "volume_mm3", "category"],
                     [["a", "0", "0", "0"], ["b", "50", "60", "2"], ["c", "500", "550", "3"],
                      ["d", "20", "25", ""]])
    pred = _write_csv(tmp_path / "results.csv", ["scan_id", "status", "agatston", "protocol",
                                                 "volume_mm3"],
                      [["a", "ok", "0", "cac", "0"], ["b", "ok", "60", "cac", "70"],
                       ["c", "ok", "450", "ctac", "500"], ["a", "ok", "0", "cac", "1"]])
    out = tmp_path / "eval"
    assert main(["evaluate", "--pred", str(pred), "--ref", str(ref), "--by", "protocol",
                 "--out", str(out)]) == 0, capsys.readouterr().err
    metrics = _strict_json(out / "metrics.json")
    assert metrics["kappa_linear"] == pytest.approx(
        cohen_kappa_score([0, 2, 3], [0, 1, 3], weights="linear"))
    assert len(metrics["warnings"]) == 1 and metrics["warnings"][0].startswith("b: ")
    reasons = {(e["scan_id"], e["source"]): e["reason"] for e in metrics["excluded"]}
    assert reasons == {("a", "pred"): "duplicate scan_id (row 4; the first row 1 is used)",
                       ("d", "ref"): "no prediction for this reference row"}
    assert metrics["icc_volume"] is not None  # the reference has volumes here
    ctac = metrics["by_protocol"]["ctac"]
    assert ctac["n"] == 1 and ctac["kappa_linear"] is None and ctac["icc_agatston"] is None
    assert "at least 2" in ctac["null_reasons"]["kappa_linear"]
    assert ctac["null_reasons"]["icc_agatston"]


def test_a_full_disk_under_the_report_is_one_line(tmp_path, capsys, monkeypatch):
    # What the file system refuses where no command named it (here the HTML report's write) is
    # one line naming the file, exit 2, no traceback.
    import errno
    import os

    from data_pipeline import atomic

    real = atomic.atomic_write_text

    def full(path, text):
        if str(path).endswith(".html"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real(path, text)

    monkeypatch.setattr(atomic, "atomic_write_text", full)
    ref = _write_csv(tmp_path / "ref.csv", ["scan_id", "agatston"], [["a", "0"], ["b", "50"]])
    pred = _write_csv(tmp_path / "results.csv", ["scan_id", "status", "agatston"],
                      [["a", "ok", "0"], ["b", "ok", "60"]])
    out = tmp_path / "eval"
    assert main(["evaluate", "--pred", str(pred), "--ref", str(ref), "--out", str(out),
                 "--report"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"cac-jax evaluate: error: {out / 'report.html'}: No space left on device"]


def test_a_left_out_prediction_is_listed_once(tmp_path, capsys):
    # An error row and an unusable score are each left out once, for what they are, not a second
    # time as a reference row "with no prediction"; a reference row truly without one still is.
    ref = _write_csv(tmp_path / "ref.csv", ["scan_id", "agatston"],
                     [["a", "0"], ["b", "50"], ["c", "500"], ["d", "20"], ["e", "5"]])
    pred = _write_csv(tmp_path / "results.csv", ["scan_id", "status", "agatston", "error"],
                      [["a", "ok", "0", ""], ["b", "ok", "60", ""], ["c", "error", "", "bad"],
                       ["d", "ok", "nan", ""]])
    out = tmp_path / "eval"
    assert main(["evaluate", "--pred", str(pred), "--ref", str(ref), "--out", str(out)]) == 0
    excluded = _strict_json(out / "metrics.json")["excluded"]
    assert sorted((e["scan_id"], e["source"]) for e in excluded) == [
        ("c", "pred"), ("d", "pred"), ("e", "ref")]
    assert "3 row(s) left out" in capsys.readouterr().out


@pytest.mark.parametrize("case", ["missing_file", "missing_column", "nothing_matches",
                                  "ref_protocol_without_manifest", "extra_fields",
                                  "conflicting_duplicate", "negative_seed"])
def test_cli_bad_input_exits_2_with_one_line(tmp_path, capsys, case):
    ref = _write_csv(tmp_path / "ref.csv", ["scan_id", "agatston"], [["a", "10"], ["b", "0"]])
    pred = _write_csv(tmp_path / "results.csv", ["scan_id", "status", "agatston"],
                      [["a", "ok", "12"], ["b", "ok", "0"]])
    args = ["evaluate", "--pred", str(pred), "--ref", str(ref), "--out", str(tmp_path / "o")]
    named = pred
    if case == "missing_file":
        args[4] = named = str(tmp_path / "nope.csv")
    elif case == "missing_column":
        named = _write_csv(tmp_path / "bad.csv", ["scan_id", "score"], [["a", "1"]])
        args[4] = str(named)
    elif case == "nothing_matches":
        named = _write_csv(tmp_path / "other.csv", ["scan_id", "status", "agatston"],
                           [["x", "ok", "1"]])
        args[2] = str(named)
    elif case == "extra_fields":  # an unquoted thousands separator: "1,234" read as 1
        named = tmp_path / "ragged.csv"
        named.write_text("scan_id,agatston\na,1,234\nb,0\n")
        args[4] = str(named)
    elif case == "conflicting_duplicate":
        named = _write_csv(tmp_path / "twice.csv", ["scan_id", "status", "agatston"],
                           [["a", "ok", "12"], ["b", "ok", "0"], ["a", "ok", "999"]])
        args[2] = str(named)
    elif case == "ref_protocol_without_manifest":
        named = ref
        args += ["--ref-protocol", "cac"]
    else:
        named = "--seed"
        args += ["--bootstrap", "10", "--seed", "-1"]
    if case == "negative_seed":  # argparse's refusal: its usage line, then one error line
        with pytest.raises(SystemExit) as stop:
            main(args)
        assert stop.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert "--seed: must be >= 0" in err[-1] and "Traceback" not in "".join(err), err
        return
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(named) in err[0], err
    assert not (tmp_path / "o" / "metrics.json").exists()


def test_evaluate_imports_neither_jax_nor_tensorflow():
    """Evaluation runs on a statistician's laptop: no JAX, no TensorFlow (docs/commands.md)."""
    import subprocess
    import sys

    code = ("import sys, cac_jax.cli, cac_jax.evaluation, cac_jax.commands.evaluate; "
            "cac_jax.cli.build_parser(); "
            "print('tensorflow' in sys.modules, 'jax' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip() == "False False"
