"""Fit a model's operating point to a new site without retraining: ``pneumonia recalibrate``.

A hospital with a few hundred labelled films of its own refits the calibration (temperature
and bias on the logit, :mod:`pneumonia.calibration`) and the threshold (the model's rule, or
another) on its films. The weights, and so the ranking of films (ROC-AUC), are unchanged by
design: only the mapping from logit to probability and the cut on it move.

The figures before and after are honest: "after" is cross-fitted (each film is scored by a
calibration and threshold fitted on the other folds, folds grouped by patient where the file
names give patient ids), with percentile bootstrap intervals that resample patients.

The new model file is the old one with its embedded card replaced (the ONNX protobuf is
rewritten at the wire level, so neither the ``onnx`` package nor torch is needed and the
graph's bytes stay as they were); the card keeps the original provenance and adds a
``site_recalibration`` record.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pneumonia.calibration import calibrated_probability, fit_calibration
from pneumonia.evaluate import (
    capped_youden_threshold,
    choose_threshold,
    expected_calibration_error,
    roc_auc,
)
from pneumonia.labels import LABELS

log = logging.getLogger(__name__)

SITE_RULES = ("min_sensitivity", "youden", "stressed_youden")
RULE_DESCRIPTIONS = {
    "min_sensitivity": (
        "highest threshold on calibrated P(PNEUMONIA) whose site sensitivity is at least min_sensitivity"
    ),
    "youden": "Youden's J on the site films",
    "stressed_youden": "Youden's J on the site films, lowered if needed so that the site sensitivity is at "
    "least min_sensitivity (the model's stressed_youden rule; the site's own films stand in for the "
    "synthetic perturbations of training)",
}
RANKING_NOTE = (
    "Ranking is unchanged by design: recalibration refits the temperature, bias and threshold "
    "only, never the weights, so ROC-AUC is the same before and after."
)
METRICS = ("sensitivity", "specificity", "accuracy", "ppv", "npv", "brier", "ece", "log_loss")


# ----------------------------------------------------------------------------- fitting


def site_threshold(y: np.ndarray, p: np.ndarray, rule: str, min_sensitivity: float) -> float:
    """The threshold by a site rule (see :data:`RULE_DESCRIPTIONS`)."""
    if rule == "stressed_youden":
        return capped_youden_threshold(y, p, min_sensitivity)
    if rule not in SITE_RULES:
        raise ValueError(f"unknown threshold rule {rule!r}; expected one of {SITE_RULES}")
    return choose_threshold(y, p, rule, min_sensitivity)


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


def _metrics(y: np.ndarray, p: np.ndarray, positive: np.ndarray) -> dict[str, float | None]:
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


def _bootstrap(
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
    t0, b0, thr0 = original
    p_before = calibrated_probability(z, t0, b0)
    pos_before = p_before >= thr0
    temperature, bias, threshold = refit(z, y, rule, min_sensitivity)

    def before(ix: np.ndarray) -> dict[str, float | None]:
        return {**_metrics(y[ix], p_before[ix], pos_before[ix]), "auc": roc_auc(y[ix], z[ix])}

    def after(ix: np.ndarray) -> dict[str, float | None]:
        return {**_metrics(y[ix], p_oof[ix], pos_oof[ix]), "auc": roc_auc(y[ix], z[ix])}

    auc = roc_auc(y, z)
    return {
        "n": len(y),
        "counts": {name: int((y == i).sum()) for i, name in enumerate(LABELS)},
        "patients": n_groups,
        "rule": {
            "rule": rule,
            "min_sensitivity": min_sensitivity,
            "description": RULE_DESCRIPTIONS[rule],
        },
        "original": {"temperature": t0, "bias": b0, "threshold": thr0},
        "fitted": {"temperature": temperature, "bias": bias, "threshold": threshold},
        "auc": auc,
        "folds": {"k": k, "grouped_by": "patient", "per_fold": per_fold},
        "before": {
            **_metrics(y, p_before, pos_before),
            "ci95": _bootstrap(y, groups, before, n_boot, seed),
        },
        "after": {
            **_metrics(y, p_oof, pos_oof),
            "ci95": _bootstrap(y, groups, after, n_boot, seed),
            "how": (
                "cross-fitted: each film scored by a calibration and threshold fitted on the other "
                f"{k - 1} of {k} patient-grouped folds"
            ),
        },
        "auc_ci95": _bootstrap(y, groups, lambda ix: {"auc": roc_auc(y[ix], z[ix])}, n_boot, seed)[
            "auc"
        ],
        "warnings": size_warnings(y, n_groups, rule, min_sensitivity, k),
        "ranking": RANKING_NOTE,
    }


# ----------------------------------------------------------------------------- the ONNX file


def _varint(b: bytes, pos: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        byte = b[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def _enc_varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _len_field(number: int, payload: bytes) -> bytes:
    return _enc_varint(number << 3 | 2) + _enc_varint(len(payload)) + payload


def _fields(b: bytes) -> list[tuple[int, int, int, int]]:
    """(field number, wire type, start, end) of each top-level field of a protobuf message."""
    out, pos = [], 0
    while pos < len(b):
        start = pos
        key, pos = _varint(b, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            _, pos = _varint(b, pos)
        elif wire == 1:
            pos += 8
        elif wire == 2:
            n, pos = _varint(b, pos)
            pos += n
        elif wire == 5:
            pos += 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire} at byte {start}")
        if pos > len(b):
            raise ValueError("truncated protobuf message")
        out.append((number, wire, start, pos))
    return out


#: ModelProto.metadata_props (repeated StringStringEntryProto: key = 1, value = 2), onnx.proto.
METADATA_FIELD = 14


def _payload(b: bytes, start: int) -> bytes:
    _, pos = _varint(b, start)
    n, pos = _varint(b, pos)
    return b[pos : pos + n]


def read_metadata(model: bytes) -> dict[str, str]:
    """The metadata_props of a serialized ONNX ModelProto."""
    props = {}
    for number, wire, start, _ in _fields(model):
        if number == METADATA_FIELD and wire == 2:
            entry = _payload(model, start)
            kv = {n: _payload(entry, s).decode() for n, w, s, _ in _fields(entry) if w == 2}
            props[kv.get(1, "")] = kv.get(2, "")
    return props


def with_metadata(model: bytes, props: dict[str, str]) -> bytes:
    """``model`` with its metadata_props replaced by ``props``; every other byte is kept."""
    kept = b"".join(model[s:e] for n, _, s, e in _fields(model) if n != METADATA_FIELD)
    entries = b"".join(
        _len_field(METADATA_FIELD, _len_field(1, k.encode()) + _len_field(2, v.encode()))
        for k, v in props.items()
    )
    return kept + entries


def files_digest(keys: Sequence[str]) -> str:
    """sha256 of the sorted file list, one name a line: which films the site fit used."""
    return hashlib.sha256("\n".join(sorted(keys)).encode()).hexdigest()


def site_card(
    card: dict[str, Any], result: dict[str, Any], site: dict[str, Any], model_sha256: str
) -> dict[str, Any]:
    """The recalibrated model's card: the original, with the refitted values and a
    ``site_recalibration`` record (the previous one, if any, nested in it)."""
    fitted = result["fitted"]
    record = {
        "date": dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat(),
        "refitted": ["temperature", "bias", "threshold"],
        "unchanged": "weights, preprocessing and labels; " + RANKING_NOTE,
        "original": {
            "sha256": model_sha256,
            "temperature": card["temperature"],
            "bias": card["bias"],
            "threshold": card["threshold"],
            "threshold_rule": card.get("threshold_rule"),
            "calibration": card.get("calibration"),
        },
        "site": site,
        **{
            k: result[k]
            for k in ("rule", "fitted", "auc", "auc_ci95", "folds", "before", "after", "warnings")
        },
        "previous": card.get("site_recalibration"),
    }
    return {
        **card,
        "temperature": fitted["temperature"],
        "bias": fitted["bias"],
        "threshold": fitted["threshold"],
        "threshold_rule": {**result["rule"], "fitted_on": "site films (site_recalibration)"},
        "calibration": "temperature and bias refitted on the site's films (see site_recalibration): "
        "p = sigmoid(logit / temperature + bias)",
        "site_recalibration": record,
    }


def _f(x: Any) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def render_site_section(card: dict[str, Any]) -> str:
    """Markdown: what the site recalibration refitted and its before/after figures."""
    r = card["site_recalibration"]
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
    from pneumonia.data import load_images, patient_id_rule, split_samples
    from pneumonia.predictor import Predictor, sha256_file, sidecar_card_path

    model, data, out = Path(model), Path(data), Path(out)
    if out.resolve() == model.resolve():
        raise ValueError(f"--out {out} is the input model; write the site model to a new file")
    predictor = Predictor(model)
    card = predictor.card
    old_rule = card.get("threshold_rule") or {}
    rule = rule or old_rule.get("rule") or "min_sensitivity"
    if min_sensitivity is None:
        min_sensitivity = float(old_rule.get("min_sensitivity") or 0.98)
    samples = split_samples(data, split)
    loaded = load_images(samples, predictor.spec, progress=progress)
    logits = (
        np.concatenate(
            [predictor.run(loaded.x[i : i + 32])[0] for i in range(0, len(loaded.x), 32)]
        )
        if len(loaded.x)
        else np.zeros(0)
    )
    ids = [
        patient_id_rule(s.path.name) if s.npz_index is None else (s.patient, None)
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
    new_card = site_card(card, result, site, predictor.sha256)
    raw = model.read_bytes()
    props = read_metadata(raw)
    props["model_card"] = json.dumps(new_card)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(with_metadata(raw, props))
    sidecar = {
        **new_card,
        "sha256": sha256_file(out),
        "file": out.name,
        "bytes": out.stat().st_size,
    }
    sidecar_card_path(out).write_text(json.dumps(sidecar, indent=2) + "\n")
    original_md = model.with_suffix(".card.md")
    md = (
        f"# Model card: {card['name']} {card.get('version', '')}, recalibrated for a site\n\n"
        + render_site_section(new_card)
    )
    if original_md.is_file():
        md += (
            "\n## The original model's card (before site recalibration; "
            "its threshold, temperature and bias are superseded above)\n\n"
        )
        md += ("\n" + original_md.read_text()).replace("\n#", "\n##")
    out.with_suffix(".card.md").write_text(md)
    Predictor(out, threads=1)  # the file must load as it will be served
    return {
        **result,
        "site": site,
        "model": str(model),
        "out": str(out),
        "sha256": sidecar["sha256"],
    }
