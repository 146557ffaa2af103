"""Metrics against scikit-learn on fixed arrays, the threshold rules, and the JSON report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from sklearn import metrics as skm

from pneumonia.card import comparison_table
from pneumonia.evaluate import (
    bootstrap_auc_ci,
    brier,
    choose_threshold,
    confusion,
    evaluate_predictions,
    expected_calibration_error,
    markdown_summary,
    precision_recall_curve,
    reliability,
    roc_auc,
    roc_curve,
    threshold_metrics,
)
from pneumonia.plots import plot_report

# Fixed arrays with ties inside and across classes.
y_ties = np.array([0, 0, 1, 1, 0, 1, 0, 1, 1, 0, 1, 1, 0, 0, 1])
p_ties = np.array([0.1, 0.4, 0.35, 0.8, 0.4, 0.4, 0.05, 0.9, 0.6, 0.6, 0.2, 0.99, 0.3, 0.7, 0.6])


def random_case(seed: int, n: int = 60, decimals: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Labels of both classes and scores rounded so that ties are common."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    y[:2] = [0, 1]
    p = np.round(np.clip(rng.normal(0.35 + 0.3 * y, 0.25), 0, 1), decimals)
    return y, p


@pytest.mark.parametrize("seed", range(5))
def test_roc_auc_matches_sklearn(seed: int) -> None:
    y, p = (y_ties, p_ties) if seed == 0 else random_case(seed, decimals=1)
    assert roc_auc(y, p) == pytest.approx(skm.roc_auc_score(y, p), abs=1e-12)


def test_roc_auc_extremes() -> None:
    y = np.array([0, 0, 1, 1])
    assert roc_auc(y, np.array([0.1, 0.2, 0.8, 0.9])) == 1.0
    assert roc_auc(y, np.array([0.9, 0.8, 0.2, 0.1])) == 0.0
    assert roc_auc(y, np.full(4, 0.5)) == 0.5


def test_roc_curve_matches_sklearn() -> None:
    fpr, tpr, thr = roc_curve(y_ties, p_ties)
    sk_fpr, sk_tpr, sk_thr = skm.roc_curve(y_ties, p_ties, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr)
    np.testing.assert_allclose(tpr, sk_tpr)
    np.testing.assert_allclose(thr[1:], sk_thr[1:])
    assert thr[0] == np.inf


def test_roc_curve_large_input_path_agrees() -> None:
    # Above 4M (scores x thresholds) roc_curve switches to a cumulative-sum path.
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 3000)
    p = np.round(rng.random(3000), 4)
    fpr, tpr, _ = roc_curve(y, p)
    sk_fpr, sk_tpr, _ = skm.roc_curve(y, p, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr)
    np.testing.assert_allclose(tpr, sk_tpr)


def test_precision_recall_curve_matches_sklearn() -> None:
    precision, recall = precision_recall_curve(y_ties, p_ties)
    sk_p, sk_r, _ = skm.precision_recall_curve(y_ties, p_ties)
    # ours runs from the highest threshold down; sklearn's from the lowest up, ending at
    # the (recall 0, precision 1) point that ours starts with.
    np.testing.assert_allclose(precision[::-1][: len(sk_p)], sk_p)
    np.testing.assert_allclose(recall[::-1][: len(sk_r)], sk_r)


@pytest.mark.parametrize("threshold", [0.0, 0.3, 0.4, 0.6, 0.95, 1.0])
def test_confusion_and_threshold_metrics_match_sklearn(threshold: float) -> None:
    pred = (p_ties >= threshold).astype(int)
    tn, fp, fn, tp = skm.confusion_matrix(y_ties, pred, labels=[0, 1]).ravel()
    assert confusion(y_ties, p_ties, threshold) == {"tn": tn, "fp": fp, "fn": fn, "tp": tp}
    m = threshold_metrics(y_ties, p_ties, threshold)
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y_ties, pred))
    assert m["sensitivity"] == pytest.approx(skm.recall_score(y_ties, pred))
    assert m["specificity"] == pytest.approx(skm.recall_score(y_ties, pred, pos_label=0))
    # PPV/NPV are undefined (None) when nothing is predicted on that side.
    sk_ppv = skm.precision_score(y_ties, pred, zero_division=np.nan)
    sk_npv = skm.precision_score(y_ties, pred, pos_label=0, zero_division=np.nan)
    assert m["ppv"] == (None if np.isnan(sk_ppv) else pytest.approx(sk_ppv))
    assert m["npv"] == (None if np.isnan(sk_npv) else pytest.approx(sk_npv))
    assert m["f1"] == pytest.approx(skm.f1_score(y_ties, pred, zero_division=0.0))


def test_brier_matches_sklearn() -> None:
    assert brier(y_ties, p_ties) == pytest.approx(skm.brier_score_loss(y_ties, p_ties))


def test_ece_by_hand() -> None:
    y = np.array([0, 1, 1, 0, 1])
    p = np.array([0.05, 0.15, 0.72, 0.78, 0.95])
    # bins of width 0.5: [0.05, 0.15] -> conf 0.10, freq 0.5; [0.72, 0.78, 0.95] -> 0.8167, 0.6667
    expected = 2 / 5 * abs(0.5 - 0.10) + 3 / 5 * abs(2 / 3 - (0.72 + 0.78 + 0.95) / 3)
    assert expected_calibration_error(y, p, bins=2) == pytest.approx(expected)
    r = reliability(y, p, bins=2)
    assert r["count"] == [2, 3]
    # a probability of exactly 1.0 belongs to the last bin
    assert reliability(np.array([1]), np.array([1.0]), bins=10)["count"][-1] == 1


def test_ece_is_zero_when_calibrated() -> None:
    y = np.array([0, 1, 0, 1, 1, 1])
    p = np.array([0.5, 0.5, 0.75, 0.75, 0.75, 0.75])  # freq 0.5 and 0.75 in their bins
    assert expected_calibration_error(y, p) == pytest.approx(0.0)


def test_bootstrap_ci_contains_the_estimate_and_is_deterministic() -> None:
    y, p = random_case(7, n=120)
    lo, hi = bootstrap_auc_ci(y, p, n_boot=200, seed=3)
    assert lo is not None and hi is not None
    assert lo < roc_auc(y, p) < hi
    assert (lo, hi) == bootstrap_auc_ci(y, p, n_boot=200, seed=3)
    assert (lo, hi) != bootstrap_auc_ci(y, p, n_boot=200, seed=4)


@pytest.mark.parametrize("seed", range(20))
def test_min_sensitivity_is_the_highest_threshold_meeting_the_target(seed: int) -> None:
    y, p = random_case(seed, n=int(np.random.default_rng(seed).integers(8, 120)))
    targets = [0.5, 0.8, 0.9, 0.95, 0.98, 1.0, float(np.random.default_rng(seed).uniform(0.5, 1))]
    for target in targets:
        t = choose_threshold(y, p, "min_sensitivity", target)
        # brute force over every candidate threshold (the distinct scores)
        ok = [c for c in np.unique(p) if (p[y == 1] >= c).mean() >= target]
        assert t == max(ok), target
        sensitivity = threshold_metrics(y, p, t)["sensitivity"]
        assert sensitivity is not None and sensitivity >= target


def test_min_sensitivity_example() -> None:
    y = np.array([0] * 5 + [1] * 10)
    p = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.05, 0.45, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9])
    assert choose_threshold(y, p, "min_sensitivity", 0.9) == 0.45  # one miss allowed
    assert choose_threshold(y, p, "min_sensitivity", 0.8) == 0.55  # two misses allowed
    assert choose_threshold(y, p, "min_sensitivity", 1.0) == 0.05


def test_youden_threshold_is_not_between_two_separate_optima() -> None:
    """Regression: the median of all best thresholds fell between two separate optima
    (0.9 and 0.42, J = 0.5), at 0.66 where J is only 0.25."""
    y = np.array([0, 0, 1, 0, 0, 1])
    p = np.array([0.1, 0.26, 0.42, 0.58, 0.74, 0.9])
    t = choose_threshold(y, p, "youden")
    m = threshold_metrics(y, p, t)
    assert t in (0.9, 0.42)
    assert m["sensitivity"] is not None and m["specificity"] is not None
    assert m["sensitivity"] + m["specificity"] - 1 == pytest.approx(0.5)


@pytest.mark.parametrize("seed", range(30))
def test_youden_threshold_reaches_the_best_j(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(6, 40))
    y = np.r_[0, 1, rng.integers(0, 2, n - 2)]
    p = np.round(rng.random(n), 1)
    fpr, tpr, _ = roc_curve(y, p)
    t = choose_threshold(y, p, "youden")
    m = threshold_metrics(y, p, t)
    assert m["sensitivity"] is not None and m["specificity"] is not None
    assert m["sensitivity"] + m["specificity"] - 1 == pytest.approx((tpr - fpr).max())
    assert 0.0 <= t <= 1.0


def test_youden_example() -> None:
    y = np.array([0, 0, 0, 1, 1, 1])
    p = np.array([0.1, 0.2, 0.3, 0.7, 0.8, 0.9])
    assert choose_threshold(y, p, "youden") == 0.7


@pytest.mark.parametrize("rule", ["min_sensitivity", "youden"])
@pytest.mark.parametrize("label", [0, 1])
def test_threshold_needs_both_classes(rule: str, label: int) -> None:
    with pytest.raises(ValueError, match="both classes"):
        choose_threshold(np.full(5, label), np.linspace(0, 1, 5), rule)


def test_unknown_threshold_rule() -> None:
    with pytest.raises(ValueError, match="unknown threshold rule 'f1'"):
        choose_threshold(y_ties, p_ties, "f1")


@pytest.mark.parametrize("target", [0.0, -0.1, 1.5])
def test_min_sensitivity_out_of_range(target: float) -> None:
    with pytest.raises(ValueError, match="min_sensitivity"):
        choose_threshold(y_ties, p_ties, "min_sensitivity", target)


def test_report_values_match_the_functions() -> None:
    r = evaluate_predictions(y_ties, p_ties, 0.5, n_boot=50).to_json()
    assert r["n"] == len(y_ties)
    assert r["class_counts"] == {"NORMAL": 7, "PNEUMONIA": 8}
    assert r["auc"] == roc_auc(y_ties, p_ties)
    assert r["confusion_matrix"] == confusion(y_ties, p_ties, 0.5)
    assert r["sensitivity"] == threshold_metrics(y_ties, p_ties, 0.5)["sensitivity"]
    assert r["brier"] == brier(y_ties, p_ties)
    assert r["threshold"] == 0.5
    json.dumps(r, allow_nan=False)


@pytest.mark.parametrize(
    ("y", "p"),
    [
        (np.ones(6, int), np.linspace(0.1, 0.9, 6)),  # no NORMAL
        (np.zeros(6, int), np.linspace(0.1, 0.9, 6)),  # no PNEUMONIA
        (np.array([0, 1, 0, 1]), np.array([0.1, 0.2, 0.3, 0.4])),  # nothing above threshold
        (np.zeros(0, int), np.zeros(0)),  # no images at all
    ],
)
def test_report_is_strict_json_when_values_are_undefined(
    y: np.ndarray, p: np.ndarray, tmp_path: Path
) -> None:
    """Regression: one-class sets gave NaN (AUC, reliability bins) and the bootstrap crashed;
    json.dumps wrote NaN, which is not JSON. Undefined values must be null, and the plots and
    the comparison table (which formatted them as floats) must still draw them."""
    r = evaluate_predictions(y, p, 0.5, n_boot=30).to_json()
    text = json.dumps(r, allow_nan=False)
    assert json.loads(text) == r
    if len(set(y.tolist())) < 2:
        assert r["auc"] is None and r["auc_ci95"] == [None, None]
    if not (y == 0).any():
        assert r["specificity"] is None
    if not (y == 1).any():
        assert r["sensitivity"] is None
    if not (p >= 0.5).any():
        assert r["ppv"] is None
    markdown_summary(r, "undefined values")  # must not fail on None
    assert len(plot_report(r, tmp_path / "plots")) == 5
    table = comparison_table([("this model", r)])
    if r["auc"] is None:
        assert "| this model | n/a |" in table


def test_bootstrap_on_one_class_is_none() -> None:
    assert bootstrap_auc_ci(np.ones(8, int), np.linspace(0, 1, 8), n_boot=20) == (None, None)


def test_markdown_summary_shows_undefined_as_na() -> None:
    r = evaluate_predictions(np.ones(6, int), np.linspace(0.1, 0.9, 6), 0.5, n_boot=20).to_json()
    md = markdown_summary(r, "only pneumonia")
    assert "| ROC-AUC (95% bootstrap CI) | n/a (n/a-n/a) |" in md
    assert "| specificity | n/a |" in md
