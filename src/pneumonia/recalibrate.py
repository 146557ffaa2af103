"""Fit a model's operating point to a new site without retraining: ``pneumonia recalibrate``.

A hospital with a few hundred labelled films of its own refits the calibration (temperature
and bias on the logit, :mod:`pneumonia.calibration`) and the threshold (the model's rule, or
another) on its films. The weights, and so the ranking of films (ROC-AUC), are unchanged by
design: only the mapping from logit to probability and the cut on it move.

The figures before and after are honest: "after" is cross-fitted (each film is scored by a
calibration and threshold fitted on the other folds, folds grouped by patient where the file
names give patient ids), with percentile bootstrap intervals that resample patients.

The new model file is the old one with its embedded card replaced (pneumonia.card rewrites the
ONNX protobuf at the wire level, so neither the ``onnx`` package nor torch is needed and the
graph's bytes, hence the weights digest, stay as they were); the card keeps the original
provenance, names the original file in its lineage and adds a ``site_recalibration`` record.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pneumonia.calibration import calibrated_probability, fit_calibration
from pneumonia.card import (
    DEFAULT_MIN_SENSITIVITY,
    RULES,
    Calibration,
    ModelCard,
    ModelRef,
    ThresholdChoice,
    pick_threshold,
    read_model_card,
    write_model,
)
from pneumonia.evaluate import expected_calibration_error, roc_auc
from pneumonia.labels import LABELS

log = logging.getLogger(__name__)

#: Where a site rule is applied (the ThresholdChoice's fitted_on).
SITE_FILMS = "the site's films"
RANKING_NOTE = (
    "Ranking is unchanged by design: recalibration refits the temperature, bias and threshold "
    "only, never the weights, so ROC-AUC is the same before and after."
)
METRICS = ("sensitivity", "specificity", "accuracy", "ppv", "npv", "brier", "ece", "log_loss")


# ----------------------------------------------------------------------------- fitting


def site_threshold(y: np.ndarray, p: np.ndarray, rule: str, min_sensitivity: float) -> float:
    """The threshold by a rule of :data:`pneumonia.card.RULES`, all of it on the site's films."""
    return pick_threshold(rule, y, p, min_sensitivity).threshold


def refit(
    logits: np.ndarray, y: np.ndarray, rule: str, min_sensitivity: float
) -> tuple[float, float, float]:
    """(temperature, bias, threshold) fitted on these films."""
    temperature, bias = fit_calibration(logits, y)
    p = calibrated_probability(logits, temperature, bias)
    return temperature, bias, site_threshold(y, p, rule, min_sensitivity)


def grouped_folds(y: np.ndarray, groups: Sequence[str], k: int, seed: int = 0) -> np.ndarray:
    """Fold index per film: whole patients per fold, each label's patients dealt round-robin
    (largest first after a seeded shuffle) so that the folds are stratified."""
    y = np.asarray(y)
    members: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    rng = np.random.default_rng(seed)
    fold = np.zeros(len(y), dtype=np.int64)
    for label in (0, 1):
        pats = sorted(g for g, ix in members.items() if round(float(np.mean(y[ix]))) == label)
        pats = [pats[i] for i in rng.permutation(len(pats))]
        pats.sort(key=lambda g: -len(members[g]))  # stable: shuffled order within a size
        load = np.zeros(k)
        for g in pats:
            f = int(np.argmin(load))
            fold[members[g]] = f
            load[f] += len(members[g])
    return fold


def cross_fit(
    logits: np.ndarray,
    y: np.ndarray,
    groups: Sequence[str],
    rule: str,
    min_sensitivity: float,
    k: int,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, list[dict[str, Any]]]:
    """Cross-fitted (calibrated P(PNEUMONIA), calls, per-fold fits): each film scored by a
    calibration and threshold fitted on the other ``k - 1`` patient-grouped folds.

    Raises:
        ValueError: a fold's fitting part lacks a class.
    """
    z = np.asarray(logits, dtype=np.float64)
    fold = grouped_folds(y, groups, k, seed)
    p_oof = np.zeros(len(y))
    pos_oof = np.zeros(len(y), dtype=bool)
    per_fold = []
    for f in range(k):
        fit, held = fold != f, fold == f
        if len(np.unique(y[fit])) < 2:
            raise ValueError(
                f"fold {f}'s fitting part lacks a class; the site set is too small to cross-fit"
            )
        t, b, thr = refit(z[fit], y[fit], rule, min_sensitivity)
        p_oof[held] = calibrated_probability(z[held], t, b)
        pos_oof[held] = p_oof[held] >= thr
        per_fold.append(
            {"temperature": t, "bias": b, "threshold": thr, "n_held_out": int(held.sum())}
        )
    return p_oof, pos_oof, per_fold


def site_metrics(y: np.ndarray, p: np.ndarray, positive: np.ndarray) -> dict[str, float | None]:
    """:data:`METRICS` of probabilities ``p`` and calls ``positive`` against labels ``y``."""
    y = y.astype(bool)
    tp, fn = int((positive & y).sum()), int((~positive & y).sum())
    tn, fp = int((~positive & ~y).sum()), int((positive & ~y).sum())

    def ratio(a: int, b: int) -> float | None:
        return a / b if b else None

    pc = np.clip(p, 1e-12, 1 - 1e-12)
    return {
        "sensitivity": ratio(tp, tp + fn),
        "specificity": ratio(tn, tn + fp),
        "accuracy": ratio(tp + tn, len(y)),
        "ppv": ratio(tp, tp + fp),
        "npv": ratio(tn, tn + fn),
        "brier": float(np.mean((p - y) ** 2)),
        "ece": expected_calibration_error(y.astype(int), p),
        "log_loss": float(-np.mean(y * np.log(pc) + (~y) * np.log(1 - pc))),
    }


def patient_bootstrap(
    y: np.ndarray, groups: Sequence[str], fn: Any, n_boot: int, seed: int
) -> dict[str, list[float | None]]:
    """95% percentile intervals of each metric of ``fn(indices)``, resampling patients."""
    members: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    blocks = [np.array(ix) for ix in members.values()]
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {}
    for _ in range(n_boot):
        pick = rng.integers(0, len(blocks), len(blocks))
        idx = np.concatenate([blocks[j] for j in pick])
        for k, v in fn(idx).items():
            if v is not None and np.isfinite(v):
                draws.setdefault(k, []).append(v)
    keys = (*METRICS, "auc")
    return {
        k: [float(np.quantile(v, 0.025)), float(np.quantile(v, 0.975))]
        if (v := draws.get(k))
        else [None, None]
        for k in keys
    }


def size_warnings(
    y: np.ndarray, n_groups: int, rule: str, min_sensitivity: float, folds: int
) -> list[str]:
    """Why this site set may be too small for the rule and the calibration."""
    n_pos, n_neg = int(np.sum(y == 1)), int(np.sum(y == 0))
    fit_pos = math.floor(n_pos * (folds - 1) / folds)
    out = []
    if rule in ("min_sensitivity", "stressed_youden"):
        miss = 1.0 - min_sensitivity
        need_one, need_five = math.ceil(1 / miss - 1e-9), math.ceil(5 / miss - 1e-9)
        if n_pos < need_one:
            out.append(
                f"too small for the rule: min_sensitivity {min_sensitivity} allows one missed PNEUMONIA film "
                f"in {need_one}; with {n_pos} the threshold falls to the lowest PNEUMONIA score "
                "(every positive kept), so it says nothing about the site's specificity at that sensitivity"
            )
        elif n_pos < need_five:
            half = 1.96 * math.sqrt(min_sensitivity * miss / max(1, fit_pos))
            out.append(
                f"small for the rule: {n_pos} PNEUMONIA films (fewer than {need_five}, i.e. 5 allowed "
                f"misses at min_sensitivity {min_sensitivity}); the sensitivity the threshold keeps on new "
                f"films is uncertain by about ±{half:.2f}"
            )
    if rule in ("youden", "stressed_youden") and min(n_pos, n_neg) < 50:
        out.append(
            f"small for Youden's J: {n_neg} NORMAL / {n_pos} PNEUMONIA films (fewer than 50 in a class)"
        )
    if min(n_pos, n_neg) < 20 or n_pos + n_neg < 100:
        out.append(
            f"small for calibration: {n_neg} NORMAL / {n_pos} PNEUMONIA films; temperature and bias "
            "are poorly determined below about 100 films with 20 of each class"
        )
    if n_groups < 2 * folds:
        out.append(
            f"only {n_groups} patient groups for {folds} folds; the cross-fitted figures are unstable"
        )
    return out


def recalibrate_scores(
    logits: np.ndarray,
    y: np.ndarray,
    groups: Sequence[str],
    *,
    original: tuple[float, float, float],
    base_logits: np.ndarray | None = None,
    rule: str,
    min_sensitivity: float,
    folds: int = 5,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Refit on the site's logits and measure before and (cross-fitted) after.

    Args:
        logits: The model's raw logits on the site films.
        y: Their labels (1 = PNEUMONIA).
        groups: Patient id per film (a film without one: its own id).
        original: The model's (temperature, bias, threshold).
        base_logits: The original model's logits on these films when ``logits`` are another
            head's (``pneumonia adapt``): "before" is then that model as it was; default
            ``logits``.
        rule / min_sensitivity: The threshold rule to refit.
        folds: Cross-fitting folds (grouped by patient, stratified).

    Returns:
        ``fitted`` (temperature, bias, threshold on all films: what the new model carries),
        ``before`` and ``after`` (figures with ``ci95``), ``auc``, ``warnings``, ``folds``.

    Raises:
        ValueError: a class is missing, or a fold's fitting part lacks one.
    """
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(y).astype(np.int64)
    groups = list(groups)
    if len(np.unique(y)) < 2:
        raise ValueError("the site films must hold both NORMAL and PNEUMONIA films")
    n_groups = len(set(groups))
    k = max(2, min(folds, n_groups))
    p_oof, pos_oof, per_fold = cross_fit(z, y, groups, rule, min_sensitivity, k, seed)
    t0, b0, thr0 = original
    z0 = z if base_logits is None else np.asarray(base_logits, dtype=np.float64)
    p_before = calibrated_probability(z0, t0, b0)
    pos_before = p_before >= thr0
    temperature, bias = fit_calibration(z, y)
    pick = pick_threshold(rule, y, calibrated_probability(z, temperature, bias), min_sensitivity)
    threshold = pick.threshold

    def before(ix: np.ndarray) -> dict[str, float | None]:
        return {**site_metrics(y[ix], p_before[ix], pos_before[ix]), "auc": roc_auc(y[ix], z0[ix])}

    def after(ix: np.ndarray) -> dict[str, float | None]:
        return {**site_metrics(y[ix], p_oof[ix], pos_oof[ix]), "auc": roc_auc(y[ix], z[ix])}

    auc = roc_auc(y, z)
    return {
        "n": len(y),
        "counts": {name: int((y == i).sum()) for i, name in enumerate(LABELS)},
        "patients": n_groups,
        "rule": {
            "rule": rule,
            "min_sensitivity": min_sensitivity,
            "description": ThresholdChoice(rule, min_sensitivity, SITE_FILMS).description(),
        },
        "original": {"temperature": t0, "bias": b0, "threshold": thr0},
        "fitted": {"temperature": temperature, "bias": bias, "threshold": threshold},
        "bound_by": pick.bound_by,
        "auc": auc,
        "folds": {"k": k, "grouped_by": "patient", "per_fold": per_fold},
        "before": {
            **site_metrics(y, p_before, pos_before),
            "ci95": patient_bootstrap(y, groups, before, n_boot, seed),
        },
        "after": {
            **site_metrics(y, p_oof, pos_oof),
            "ci95": patient_bootstrap(y, groups, after, n_boot, seed),
            "how": (
                "cross-fitted: each film scored by a calibration and threshold fitted on the other "
                f"{k - 1} of {k} patient-grouped folds"
            ),
        },
        "auc_ci95": patient_bootstrap(
            y, groups, lambda ix: {"auc": roc_auc(y[ix], z[ix])}, n_boot, seed
        )["auc"],
        "warnings": size_warnings(y, n_groups, rule, min_sensitivity, k),
        "ranking": RANKING_NOTE,
    }


# ----------------------------------------------------------------------------- the site model


def files_digest(keys: Sequence[str]) -> str:
    """sha256 of the sorted file list, one name a line: which films the site fit used."""
    return hashlib.sha256("\n".join(sorted(keys)).encode()).hexdigest()


def site_version(version: str, files_sha256: str) -> str:
    """A site model's version: its base's, with the site's file-list digest as semver build
    metadata (``2.0.0+site.1a2b3c4d``), so two sites' files never share a version. The base's
    own build tag stays in front (an int8 base: ``2.0.0+int8.site.1a2b3c4d``); an earlier
    site's tag is replaced."""
    core, _, build = version.partition("+")
    kept = build.split("site.")[0].rstrip(".")
    return f"{core}+{kept + '.' if kept else ''}site.{files_sha256[:8]}"


def site_card(
    card: ModelCard, result: dict[str, Any], site: dict[str, Any], model_sha256: str
) -> ModelCard:
    """The recalibrated model's card: the original, with the refitted values, the original file
    in its lineage and a ``site_recalibration`` record (the previous one, if any, nested in it)."""
    fitted = result["fitted"]
    record = {
        "date": dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat(),
        "refitted": ["temperature", "bias", "threshold"],
        "unchanged": "weights, preprocessing and labels; " + RANKING_NOTE,
        "original": {
            "sha256": model_sha256,
            "temperature": card.temperature,
            "bias": card.bias,
            "threshold": card.threshold,
            "threshold_rule": card.to_dict()["threshold_rule"],
            "calibration": card.calibration.to_dict(),
        },
        "site": site,
        **{
            k: result[k]
            for k in ("rule", "fitted", "auc", "auc_ci95", "folds", "before", "after", "warnings")
        },
        "previous": card.site_recalibration,
    }
    rule = result["rule"]
    return card.with_(
        version=site_version(card.version, site["files_sha256"]),
        threshold=fitted["threshold"],
        threshold_rule=ThresholdChoice(
            rule["rule"],
            rule["min_sensitivity"] if RULES[rule["rule"]].uses_min_sensitivity else None,
            f"{SITE_FILMS} (site_recalibration)",
            bound_by=result["bound_by"],
        ),
        calibration=Calibration(
            fitted["temperature"], fitted["bias"], f"{SITE_FILMS} (site_recalibration)"
        ),
        lineage=(
            ModelRef(
                card.name,
                card.version,
                card.weights_sha256,
                model_sha256,
                "recalibrated for a site: the same weights, temperature, bias and threshold refitted",
            ),
            *card.lineage,
        ),
        site_recalibration=record,
    )


def _f(x: Any) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def render_site_section(card: ModelCard) -> str:
    """Markdown: what the site recalibration refitted and its before/after figures."""
    r = card.site_recalibration
    assert r is not None
    o, s, fitted = r["original"], r["site"], r["fitted"]
    lines = [
        "## Site recalibration",
        f"Refitted on {s['n']} films of `{s['data']}` ({s['counts']['NORMAL']} NORMAL, {s['counts']['PNEUMONIA']} "
        f"PNEUMONIA; {s['patients']} patients, ids parsed for {s['ids_parsed']}) on {r['date']}; "
        f"file list sha256 `{s['files_sha256']}`.",
        "",
        f"- Refitted: {', '.join(r['refitted'])}. Temperature {o['temperature']:.4f} -> {fitted['temperature']:.4f}, "
        f"bias {o['bias']:.4f} -> {fitted['bias']:.4f}, threshold {o['threshold']:.4f} -> {fitted['threshold']:.4f} "
        f"({r['rule']['description']}; min_sensitivity {r['rule']['min_sensitivity']}).",
        f"- Unchanged: {r['unchanged']} Site ROC-AUC {_f(r['auc'])} "
        f"(95% CI {_f(r['auc_ci95'][0])}-{_f(r['auc_ci95'][1])}).",
        f"- Original model file sha256 `{o['sha256']}`; its training provenance is kept below.",
        "",
        f"| on the site's films | before (original) | after ({r['after']['how']}) |",
        "|---|---|---|",
    ]
    for m in METRICS:
        b, a = r["before"], r["after"]
        lines.append(
            f"| {m} | {_f(b[m])} ({_f(b['ci95'][m][0])}-{_f(b['ci95'][m][1])}) "
            f"| {_f(a[m])} ({_f(a['ci95'][m][0])}-{_f(a['ci95'][m][1])}) |"
        )
    lines.append("")
    lines += [f"- Warning: {w}" for w in r["warnings"]]
    return "\n".join(lines) + "\n"


def recalibrate_model(
    model: Path,
    data: Path,
    out: Path,
    *,
    split: str = "train",
    rule: str | None = None,
    min_sensitivity: float | None = None,
    folds: int = 5,
    n_boot: int = 1000,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """Recalibrate ``model`` on the labelled films of ``data`` and write ``out`` (ONNX) with
    its card JSON and Markdown beside it.

    Returns:
        The report: :func:`recalibrate_scores`' result plus ``site`` and ``model``/``out``.
    """
    from pneumonia.data import patient_id_rule, score_samples, split_samples
    from pneumonia.predictor import Predictor

    model, data, out = Path(model), Path(data), Path(out)
    if out.resolve() == model.resolve():
        raise ValueError(f"--out {out} is the input model; write the site model to a new file")
    predictor = Predictor(model)
    card = predictor.card
    rule = rule or card.threshold_rule.rule
    if min_sensitivity is None:
        min_sensitivity = card.threshold_rule.min_sensitivity
        if min_sensitivity is None:
            min_sensitivity = DEFAULT_MIN_SENSITIVITY
            if RULES[rule].uses_min_sensitivity:
                log.info(
                    "the model's rule has no sensitivity floor; rule %s uses the default %s "
                    "(--min-sensitivity sets another)",
                    rule,
                    min_sensitivity,
                )
    samples = split_samples(data, split)
    loaded = score_samples(predictor, samples, progress=progress)
    logits = loaded.logits
    ids = [
        (s.patient, "manifest")
        if s.manifest_patient is not None
        else (patient_id_rule(s.path.name) if s.npz_index is None else (s.patient, None))
        for s in loaded.samples
    ]
    result = recalibrate_scores(
        logits,
        loaded.y,
        [pid for pid, _ in ids],
        original=(predictor.temperature, predictor.bias, predictor.threshold),
        rule=rule,
        min_sensitivity=min_sensitivity,
        folds=folds,
        n_boot=n_boot,
        seed=seed,
    )
    keys = [
        s.path.relative_to(data).as_posix() if s.path.is_relative_to(data) else str(s.path)
        for s in loaded.samples
    ]
    site = {
        "data": data.name,
        "split": split,
        "n": result["n"],
        "counts": result["counts"],
        "patients": result["patients"],
        "ids_parsed": sum(rule_ is not None for _, rule_ in ids),
        "files_sha256": files_digest(keys),
        "skipped": len(loaded.skipped),
    }
    _, extra, raw = read_model_card(model)
    new_card = site_card(card, result, site, predictor.sha256)
    sidecar = write_model(out, raw, new_card, extra)
    Predictor(out, threads=1)  # the file must load as it will be served
    return {
        **result,
        "site": site,
        "model": str(model),
        "out": str(out),
        "sha256": sidecar["sha256"],
    }
