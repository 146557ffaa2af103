"""Fit the model to a new site from its own labelled films: ``pneumonia adapt``.

The shipped model ranks another hospital's films no better than a coin, and ``pneumonia
recalibrate`` keeps the ranking. Its features know more than its head: a new linear head on
the base model's ``embedding`` output (the pooled penultimate features, then the mid-level
feature statistics), fitted on a few hundred of the site's films, ranks them well. This
module fits that head and writes one complete ONNX model for the site:

1. The base model's ``embedding`` of every site film (onnxruntime; no torch).
2. Candidate heads (L2 logistic regression on all features, the penultimate ones, the
   mid-level ones; a small grid of C), compared by patient-grouped cross-validation on the
   site films. The figures reported are *nested*: each outer fold's head is chosen by an
   inner cross-validation on the other folds, so the choice is inside the estimate.
3. The winner refitted on all the site films and written into the graph with its
   standardisation folded into the weights; the heatmap (``cam``) becomes the new head's
   penultimate weights applied to the feature map before pooling, where the graph has it.
4. Calibration (temperature and bias) and the operating point (Youden's J, or a sensitivity
   floor) fitted on the chosen head's out-of-fold site logits; the figures cross-fitted on the
   nested ones, with patient-bootstrap intervals
   (:func:`pneumonia.recalibrate.recalibrate_scores`).
5. The input check refitted on the site films, thresholds cross-fitted, the refusal distance
   from the films under the simulated site shifts (:func:`pneumonia.guard.fit_site_guard`).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import itertools
import json
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pneumonia.calibration import calibrated_probability, fit_calibration
from pneumonia.card import (
    CARD_METADATA_KEY,
    GUARD_METADATA_KEY,
    Calibration,
    ModelCard,
    ModelRef,
    ThresholdChoice,
    pick_threshold,
    read_model_card,
    weights_digest,
    with_metadata,
    write_model,
)
from pneumonia.evaluate import roc_auc
from pneumonia.guard import EMBEDDING_OUTPUT, FeatureGuard, fit_site_guard
from pneumonia.labels import LABELS
from pneumonia.predictor import BATCH
from pneumonia.recalibrate import (
    cross_fit,
    files_digest,
    grouped_folds,
    patient_bootstrap,
    recalibrate_scores,
    site_metrics,
    site_version,
)
from pneumonia.shifts import SITE_SHIFTS, shifted_batches

log = logging.getLogger(__name__)

#: Feature sets a candidate head reads: the penultimate features, the mid-level statistics,
#: or both (see guard.py: the ``embedding`` output is the first, then the second).
FEATURE_SETS = ("all", "penultimate", "mid")
#: Inverse L2 strengths compared (sklearn's C: C * sum of log losses + |w|^2 / 2).
C_GRID = (0.001, 0.003, 0.01, 0.03, 0.1)
#: Cross-validation folds (patient-grouped, stratified), outer and inner.
FOLDS = 5
#: Films per class below which adapt refuses: too few to fit, cross-validate and calibrate.
MIN_PER_CLASS = 10
#: Films per class below which adapt warns that the figures are rough.
WARN_PER_CLASS = 50
#: Learning-curve sizes (films drawn, whole patients, half of each class); "all" is appended.
CURVE_SIZES = (25, 50, 100, 200)
#: Random draws per learning-curve size.
CURVE_DRAWS = 5
#: Films the simulated shifts are applied to for the input check's refusal distance (each
#: shift costs one forward pass per film; a deterministic draw of the site's films).
SHIFT_FILMS = 96
#: Age bands of the figures by subgroup (years; the last is open).
AGE_BANDS = (0, 18, 40, 60, 80)
#: Films a subgroup needs (and 5 of each class) for its own figures.
MIN_SUBGROUP = 20

#: Operating-point rules of pneumonia.card.RULES that adapt offers: Youden's J by default,
#: a sensitivity floor with --min-sensitivity.
ADAPT_RULES = ("youden", "min_sensitivity")
#: Where the site's rule and calibration are fitted (the card's ``fitted_on``).
SITE_SCORES = "the cross-fitted scores of the site's films (site_adaptation)"


class AdaptError(ValueError):
    """The site data or the arguments cannot give an adapted model; the message says why."""


# ----------------------------------------------------------------------------- heads


@dataclass(frozen=True)
class HeadSpec:
    """One candidate head: which features and how much L2."""

    features: str
    c: float

    @property
    def name(self) -> str:
        return f"logistic, {self.features} features, C={self.c:g}"

    def columns(self, head_dim: int, dim: int) -> slice:
        return {
            "all": slice(0, dim),
            "penultimate": slice(0, head_dim),
            "mid": slice(head_dim, dim),
        }[self.features]


def candidates(head_dim: int, dim: int) -> list[HeadSpec]:
    """The heads compared (no mid-level set for a base model without one)."""
    sets = [s for s in FEATURE_SETS if head_dim < dim or s == "penultimate"]
    return [HeadSpec(s, c) for s in sets for c in C_GRID]


@dataclass(frozen=True)
class LinearHead:
    """A fitted head: ``logit = coef . (x[cols] - mean) / scale + intercept``."""

    spec: HeadSpec
    start: int
    stop: int
    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray
    intercept: float

    def decision(self, features: np.ndarray) -> np.ndarray:
        x = np.asarray(features, dtype=np.float64)[:, self.start : self.stop]
        out: np.ndarray = ((x - self.mean) / self.scale) @ self.coef + self.intercept
        return out

    def folded(self, dim: int) -> tuple[np.ndarray, float]:
        """(weights over all ``dim`` embedding values, bias) with the standardisation folded
        in: ``logit = weights . embedding + bias``."""
        w = np.zeros(dim)
        w[self.start : self.stop] = self.coef / self.scale
        return w, float(self.intercept - np.sum(self.coef * self.mean / self.scale))


class _Basis:
    """Standardised features of some films in their own row space (thin SVD), shared by every
    C of one feature set: an L2 logistic regression's weights lie in the span of the training
    rows (representer theorem), so fitting on ``U S`` (n x n) instead of the (n x D) matrix
    gives the same weights, far faster when D exceeds n."""

    def __init__(self, x: np.ndarray) -> None:
        self.mean = x.mean(axis=0)
        sd = x.std(axis=0)
        self.scale = np.where(sd > 1e-8 * max(1.0, float(sd.max(initial=0.0))), sd, 1.0)
        _, s, self.vt = np.linalg.svd((x - self.mean) / self.scale, full_matrices=False)
        self.z = (((x - self.mean) / self.scale) @ self.vt.T).astype(np.float64)
        self.s = s

    def fit(
        self, y: np.ndarray, c: float, start: np.ndarray | None = None
    ) -> tuple[np.ndarray, float, np.ndarray]:
        """(weights over the features, intercept, the solution in the row space for a warm start)."""
        beta, b = fit_logistic(self.z, y, c, start=start)
        return self.vt.T @ beta, b, np.append(beta, b)


def fit_logistic(
    z: np.ndarray, y: np.ndarray, c: float, iters: int = 50, start: np.ndarray | None = None
) -> tuple[np.ndarray, float]:
    """L2 logistic regression by Newton's method: minimises ``c * sum(log loss) + |w|^2 / 2``
    (the intercept unpenalised, as in scikit-learn's lbfgs). Returns (w, intercept).

    Args:
        start: (w, intercept) to start from (a neighbouring C's solution), else zero weights
            and the log odds of the labels.
    """
    n, d = z.shape
    a = np.hstack([z, np.ones((n, 1))])
    pen = np.ones(d + 1)
    pen[-1] = 0.0
    prior = float(np.clip(y.mean(), 1e-3, 1 - 1e-3))
    theta = np.zeros(d + 1)
    theta[-1] = math.log(prior / (1 - prior))
    if start is not None:
        theta = np.array(start, dtype=np.float64)

    def objective(t: np.ndarray) -> float:
        m = a @ t
        return float(c * np.sum(np.logaddexp(0.0, m) - y * m) + 0.5 * np.sum(pen * t * t))

    current = objective(theta)
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(-(a @ theta)))
        grad = c * (a.T @ (p - y)) + pen * theta
        hess = c * (a.T * (p * (1 - p))) @ a + np.diag(pen + 1e-10)
        step = np.linalg.solve(hess, grad)
        t = 1.0
        while t > 1e-4:  # Newton with step halving: the objective is convex, but not quadratic
            cand = theta - t * step
            value = objective(cand)
            if value <= current:
                break
            t /= 2
        theta, improvement, current = cand, current - value, value
        if improvement < 1e-10 * max(1.0, abs(current)):
            break
    return theta[:-1], float(theta[-1])


def fit_heads(
    x: np.ndarray, y: np.ndarray, specs: Sequence[HeadSpec], head_dim: int, scale: float = 1.0
) -> dict[HeadSpec, LinearHead]:
    """Every candidate fitted on these films (one SVD per feature set).

    Args:
        scale: Multiplies each candidate's C: (k - 1) / k when refitting on all the films of a
            k-fold cross-validation, so that C times the number of films (the balance of the
            data term against the penalty) is the one the candidate was judged and calibrated
            at; with C as it is, the refitted head's logits come out larger than the
            cross-validated ones its calibration was fitted on.
    """
    dim = x.shape[1]
    out = {}
    for features in dict.fromkeys(s.features for s in specs):
        cols = specs[[s.features for s in specs].index(features)].columns(head_dim, dim)
        basis = _Basis(np.asarray(x[:, cols], dtype=np.float64))
        warm = None
        for spec in sorted((s for s in specs if s.features == features), key=lambda s: s.c):
            w, b, warm = basis.fit(y.astype(np.float64), spec.c * scale, warm)
            out[spec] = LinearHead(spec, cols.start, cols.stop, basis.mean, basis.scale, w, b)
    return out


def cross_validated(
    x: np.ndarray, y: np.ndarray, fold: np.ndarray, specs: Sequence[HeadSpec], head_dim: int
) -> dict[HeadSpec, np.ndarray]:
    """Out-of-fold logits of every candidate (each fold scored by heads fitted on the others)."""
    oof = {s: np.zeros(len(y)) for s in specs}
    for f in np.unique(fold):
        held = fold == f
        for spec, head in fit_heads(x[~held], y[~held], specs, head_dim).items():
            oof[spec][held] = head.decision(x[held])
    return oof


def choose(oof: dict[HeadSpec, np.ndarray], y: np.ndarray) -> tuple[HeadSpec, dict[str, float]]:
    """The candidate with the highest out-of-fold ROC-AUC (ties: fewer features, more L2)."""
    aucs = {s: roc_auc(y, z) or 0.0 for s, z in oof.items()}
    order = {name: i for i, name in enumerate(("mid", "penultimate", "all"))}
    best = max(aucs, key=lambda s: (round(aucs[s], 6), -order[s.features], -s.c))
    return best, {s.name: aucs[s] for s in aucs}


def nested_oof(
    x: np.ndarray,
    y: np.ndarray,
    groups: Sequence[str],
    fold: np.ndarray,
    specs: Sequence[HeadSpec],
    head_dim: int,
    seed: int,
) -> tuple[np.ndarray, list[str]]:
    """Out-of-fold logits where each outer fold's head is also *chosen* on the other folds
    (inner patient-grouped cross-validation), and the head chosen per outer fold."""
    out = np.zeros(len(y))
    chosen = []
    g = np.asarray(groups)
    for f in np.unique(fold):
        held = fold == f
        xi, yi = x[~held], y[~held]
        inner = grouped_folds(yi, list(g[~held]), max(2, FOLDS - 1), seed + 1)
        best, _ = choose(cross_validated(xi, yi, inner, specs, head_dim), yi)
        chosen.append(best.name)
        out[held] = fit_heads(xi, yi, [best], head_dim)[best].decision(x[held])
    return out, chosen


def draw_patients(
    y: np.ndarray, groups: Sequence[str], n: int, rng: np.random.Generator
) -> np.ndarray:
    """Indices of about ``n`` films, whole patients, half of each class (by majority label)."""
    members: dict[str, list[int]] = {}
    for i, gid in enumerate(groups):
        members.setdefault(gid, []).append(i)
    picked: list[int] = []
    for label in (0, 1):
        pats = sorted(p for p, ix in members.items() if round(float(np.mean(y[ix]))) == label)
        taken = 0
        for j in rng.permutation(len(pats)):
            if taken >= n // 2 + (n % 2) * label:
                break
            picked += members[pats[j]]
            taken += len(members[pats[j]])
    return np.array(sorted(picked), dtype=np.int64)


def learning_curve(
    x: np.ndarray,
    y: np.ndarray,
    groups: Sequence[str],
    fold: np.ndarray,
    spec: HeadSpec,
    head_dim: int,
    seed: int,
    sizes: Sequence[int] = CURVE_SIZES,
    draws: int = CURVE_DRAWS,
) -> list[dict[str, Any]]:
    """Cross-validated ROC-AUC of ``spec`` fitted on ``n`` films of each outer fold's training
    part (whole patients, half of each class, ``draws`` random draws), scored on the held-out
    fold; the last row fits on the whole training part."""
    g = np.asarray(groups)
    train_n = min(int((fold != f).sum()) for f in np.unique(fold))
    rows: list[dict[str, Any]] = []
    for n in [s for s in sizes if s < train_n]:
        aucs = []
        for d in range(draws):
            rng = np.random.default_rng([seed, n, d])
            z = np.zeros(len(y))
            for f in np.unique(fold):
                held = fold == f
                tr = np.flatnonzero(~held)
                pick = tr[draw_patients(y[tr], list(g[tr]), n, rng)]
                if len(np.unique(y[pick])) < 2:
                    continue
                z[held] = fit_heads(x[pick], y[pick], [spec], head_dim)[spec].decision(x[held])
            aucs.append(roc_auc(y, z) or 0.0)
        rows.append(
            {
                "films": n,
                "auc_mean": float(np.mean(aucs)),
                "auc_min": float(np.min(aucs)),
                "auc_max": float(np.max(aucs)),
                "draws": draws,
            }
        )
    z_all = cross_validated(x, y, fold, [spec], head_dim)[spec]
    rows.append(
        {
            "films": f"all ({train_n}+ per fit)",
            "auc_mean": roc_auc(y, z_all),
            "auc_min": None,
            "auc_max": None,
            "draws": 1,
        }
    )
    return rows


# ----------------------------------------------------------------------------- subgroups


def age_band(age: Any) -> str | None:
    """``"40-59"``-style band of an age in years; None when missing or unreadable."""
    try:
        a = float(age)
    except (TypeError, ValueError):
        return None
    if not math.isfinite(a) or a < 0:
        return None
    edges = [*AGE_BANDS, math.inf]
    for lo, hi in itertools.pairwise(edges):
        if lo <= a < hi:
            return f"{lo}+" if hi == math.inf else f"{lo}-{hi - 1}"
    return None


def subgroup_figures(
    y: np.ndarray,
    logits: np.ndarray,
    p: np.ndarray,
    positive: np.ndarray,
    groups: Sequence[str],
    metadata: Mapping[str, Sequence[Any]],
    n_boot: int,
    seed: int,
) -> dict[str, list[dict[str, Any]]]:
    """Cross-fitted figures by view, sex and age band where the manifest has those columns."""
    columns: dict[str, list[str | None]] = {}
    for key in ("view", "sex"):
        if key in metadata:
            columns[key] = [str(v).strip() or None for v in metadata[key]]
    if "age" in metadata:
        columns["age_band"] = [age_band(v) for v in metadata["age"]]
    g = np.asarray(groups)
    out: dict[str, list[dict[str, Any]]] = {}
    for key, values in columns.items():
        rows = []
        arr = np.array([v or "" for v in values])
        for value in sorted(set(arr) - {""}):
            ix = np.flatnonzero(arr == value)
            n_pos = int(y[ix].sum())
            row: dict[str, Any] = {
                "value": value,
                "n": len(ix),
                "counts": {LABELS[0]: len(ix) - n_pos, LABELS[1]: n_pos},
            }
            if len(ix) >= MIN_SUBGROUP and min(n_pos, len(ix) - n_pos) >= 5:
                m = site_metrics(y[ix], p[ix], positive[ix])
                ci = patient_bootstrap(
                    y[ix],
                    list(g[ix]),
                    _subset_figures(y[ix], logits[ix], p[ix], positive[ix]),
                    n_boot,
                    seed,
                )
                row.update(
                    {
                        "auc": roc_auc(y[ix], logits[ix]),
                        "sensitivity": m["sensitivity"],
                        "specificity": m["specificity"],
                        "ci95": {k: ci[k] for k in ("auc", "sensitivity", "specificity")},
                    }
                )
            rows.append(row)
        out[key] = rows
    return out


def _subset_figures(
    y: np.ndarray, logits: np.ndarray, p: np.ndarray, positive: np.ndarray
) -> Callable[[np.ndarray], dict[str, float | None]]:
    """The figures of a bootstrap draw ``j`` (indices into these arrays)."""

    def fig(j: np.ndarray) -> dict[str, float | None]:
        return {**site_metrics(y[j], p[j], positive[j]), "auc": roc_auc(y[j], logits[j])}

    return fig


# ----------------------------------------------------------------------------- the graph


def write_head(
    base: bytes, weights: np.ndarray, bias: float, head_dim: int
) -> tuple[bytes, dict[str, Any]]:
    """The base model with its ``logit`` and ``cam`` outputs replaced by the new head's.

    ``logit = weights . embedding + bias``. The heatmap: where the graph has the feature map
    the penultimate features are pooled from (the base model's CAM reads it through one
    ``Einsum`` with a vector of ``head_dim`` weights), ``cam`` is the new head's penultimate
    weights applied to that map, plus the rest of the logit (mid-level part and bias) spread
    evenly, so that its spatial mean is the logit as before; else (no such map, or a head that
    reads only the mid-level statistics) ``cam`` is the logit as a 1 x 1 map (no spatial
    information: heatmaps come out blank).

    Returns:
        (the serialized model, a statement of what ``cam`` is for the card).

    Raises:
        AdaptError: the base graph lacks the outputs the Predictor needs.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load_model_from_string(base)
    graph = model.graph
    names = [o.name for o in graph.output]
    if names != ["logit", "cam", EMBEDDING_OUTPUT]:
        raise AdaptError(
            f"the base model gives {names}; adapt needs ['logit', 'cam', '{EMBEDDING_OUTPUT}'] "
            "(a model exported with its input check, `pneumonia guard fit` then `pneumonia export`)"
        )
    producer = {o: n for n in graph.node for o in n.output}
    inits = {i.name: i for i in graph.initializer}
    feature_map = None
    seen, stack = set(), ["cam"]
    while stack:  # the Einsum(s) the base CAM is made of, and their feature maps
        node = producer.get(stack.pop())
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if node.op_type == "Einsum" and len(node.input) == 2 and node.input[1] in inits:
            w = numpy_helper.to_array(inits[node.input[1]])
            feature_map = node.input[0] if w.shape == (head_dim,) and feature_map is None else ""
        stack += list(node.input)
    reads_penultimate = bool(np.any(weights[:head_dim] != 0))
    spatial = bool(feature_map) and reads_penultimate

    def const(name: str, value: np.ndarray) -> None:
        graph.initializer.append(numpy_helper.from_array(value, name))

    def add(op: str, inputs: list[str], output: str, **attrs: Any) -> None:
        graph.node.append(helper.make_node(op, inputs, [output], name=f"adapt/{output}", **attrs))

    for node in graph.node:  # the base head's outputs become internal names, pruned below
        node.output[:] = [
            {"logit": "adapt/base_logit", "cam": "adapt/base_cam"}.get(o, o) for o in node.output
        ]
    const("adapt/W", weights.astype(np.float32).reshape(-1, 1))
    const("adapt/b", np.array([bias], np.float32))
    add("MatMul", [EMBEDDING_OUTPUT, "adapt/W"], "adapt/logit_2d")
    add("Add", ["adapt/logit_2d", "adapt/b"], "adapt/logit_col")
    const("adapt/axis1", np.array([1], np.int64))
    add("Squeeze", ["adapt/logit_col", "adapt/axis1"], "logit")
    if spatial:
        assert feature_map is not None
        const("adapt/W_map", weights[:head_dim].astype(np.float32))
        add("Einsum", [feature_map, "adapt/W_map"], "adapt/map", equation="nchw,c->nhw")
        const("adapt/axes12", np.array([1, 2], np.int64))
        opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 17)
        if opset >= 18:  # ReduceMean's axes became an input in opset 18
            add("ReduceMean", ["adapt/map", "adapt/axes12"], "adapt/map_mean", keepdims=0)
        else:
            add("ReduceMean", ["adapt/map"], "adapt/map_mean", axes=[1, 2], keepdims=0)
        add("Sub", ["logit", "adapt/map_mean"], "adapt/rest")
        add("Unsqueeze", ["adapt/rest", "adapt/axes12"], "adapt/rest_3d")
        add("Add", ["adapt/map", "adapt/rest_3d"], "cam")
        statement = (
            "a class activation map of the adapted head: its weights on the penultimate features "
            "applied to the base network's last feature map before pooling, plus the rest of the "
            "logit (the mid-level features' part and the bias) spread evenly; its spatial mean is "
            "the logit"
        )
    else:
        const("adapt/shape", np.array([-1, 1, 1], np.int64))
        add("Reshape", ["logit", "adapt/shape"], "cam")
        why = (
            "the head reads only the mid-level feature statistics, which keep no map of where"
            if not reads_penultimate
            else "the base graph does not expose the one feature map its penultimate features "
            "are pooled from"
        )
        statement = f"none: {why}; 'cam' is the logit as a 1 x 1 map and heatmaps are blank"
    emb = next(o for o in graph.output if o.name == EMBEDDING_OUTPUT)
    h: int | str = 1
    wd: int | str = 1
    if spatial:
        cam_out = next(o for o in graph.output if o.name == "cam")
        dims = cam_out.type.tensor_type.shape.dim
        h, wd = dims[1].dim_value or "h", dims[2].dim_value or "w"
    batch = emb.type.tensor_type.shape.dim[0]
    n = batch.dim_param or batch.dim_value or "N"
    outputs = [
        helper.make_tensor_value_info("logit", TensorProto.FLOAT, [n]),
        helper.make_tensor_value_info("cam", TensorProto.FLOAT, [n, h, wd]),
        emb,
    ]
    del graph.output[:]
    graph.output.extend(outputs)
    _prune(graph)
    onnx.checker.check_model(model)
    return model.SerializeToString(), {"spatial": spatial, "statement": statement}


def _prune(graph: Any) -> None:
    """Drop nodes and initializers no output depends on (the base head)."""
    producer = {o: n for n in graph.node for o in n.output}
    need, stack = set(), [o.name for o in graph.output]
    while stack:
        name = stack.pop()
        if name in need:
            continue
        need.add(name)
        if name in producer:
            stack += list(producer[name].input)
    keep = [n for n in graph.node if any(o in need for o in n.output)]
    del graph.node[:]
    graph.node.extend(keep)
    inits = [i for i in graph.initializer if i.name in need]
    del graph.initializer[:]
    graph.initializer.extend(inits)


# ----------------------------------------------------------------------------- the site's films


@dataclass
class SiteFilms:
    """A site's labelled films, read and preprocessed.

    Attributes:
        x: Model inputs (N, C, H, W).
        y: Labels (1 = PNEUMONIA).
        groups: Patient id per film (a film without one: its own id).
        keys: Each film's name relative to the data (for the file-list digest).
        metadata: Manifest columns other than path and label, one value per film.
        source: What was read, for the card (no patient ids).
    """

    x: np.ndarray
    y: np.ndarray
    groups: list[str]
    keys: list[str]
    metadata: dict[str, list[Any]]
    source: dict[str, Any]


def read_site(data: Path, spec: Any, progress: bool = False) -> SiteFilms:
    """The labelled films of a site: a folder (``NORMAL/``, ``PNEUMONIA/``, optional
    ``manifest.csv``) or a CSV manifest, read by :func:`pneumonia.data.read_labelled`, with the
    audit's shortcut screen of the manifest's columns.

    Raises:
        AdaptError: no such data, a malformed manifest (its line named), or an unreadable film.
    """
    from pneumonia.audit import metadata_shortcuts
    from pneumonia.data import DatasetLayoutError, load_images, read_labelled

    data = Path(data)
    try:
        manifest = read_labelled(data)
    except DatasetLayoutError as exc:  # a ManifestError too
        raise AdaptError(str(exc)) from None
    rows = manifest.rows
    loaded = load_images([r.sample for r in rows], spec, progress=progress)
    if loaded.skipped:
        listed = "; ".join(f"{p}: {why}" for p, why in loaded.skipped[:5])
        raise AdaptError(
            f"{len(loaded.skipped)} of {len(rows)} site films could not be read ({listed}"
            f"{'; ...' if len(loaded.skipped) > 5 else ''}); fix or remove them and run again"
        )
    from_manifest = sum(r.patient_from != "file name" for r in rows)
    return SiteFilms(
        x=loaded.x,
        y=loaded.y,
        groups=[r.patient for r in rows],
        keys=[r.key for r in rows],
        metadata={c: [r.metadata.get(c) for r in rows] for c in manifest.metadata_columns},
        source={
            "data": data.name,
            "patient_ids_from": f"the manifest or a file-name rule for {from_manifest} of "
            f"{len(rows)} films (the rest: one patient per film)",
            "shortcuts": [m.to_dict() for m in metadata_shortcuts(rows)],
        },
    )


def check_site(y: np.ndarray, groups: Sequence[str]) -> list[str]:
    """Refuse a site set that cannot be cross-validated; warn about a small one.

    Raises:
        AdaptError: one class only, fewer than :data:`MIN_PER_CLASS` films or :data:`FOLDS`
            patients of a class.
    """
    counts = {name: int((y == i).sum()) for i, name in enumerate(LABELS)}
    if min(counts.values()) == 0:
        missing = [k for k, v in counts.items() if v == 0]
        raise AdaptError(
            f"the site films hold only one class ({counts}); label films of both "
            f"{list(LABELS)} (missing: {missing})"
        )
    if min(counts.values()) < MIN_PER_CLASS:
        raise AdaptError(
            f"too few site films: {counts}; adapt needs at least {MIN_PER_CLASS} of each class "
            f"to fit and cross-validate a head (about {WARN_PER_CLASS * 2} or more for usable figures)"
        )
    g = np.asarray(groups)
    patients = {name: len(set(g[y == i])) for i, name in enumerate(LABELS)}
    if min(patients.values()) < FOLDS:
        raise AdaptError(
            f"too few patients: {patients} per class; patient-grouped {FOLDS}-fold "
            f"cross-validation needs at least {FOLDS} patients of each class"
        )
    out = []
    if min(counts.values()) < WARN_PER_CLASS:
        out.append(
            f"few site films ({counts}): below {WARN_PER_CLASS} of a class the head, the "
            "threshold and the calibration are rough; see the learning curve"
        )
    return out


def embed(predictor: Any, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(the base model's logits (N,), its ``embedding`` rows (N, D + M)) of model inputs."""
    out = predictor.scores(x)
    if out.features is None:
        raise AdaptError(f"model {predictor.path} has no '{EMBEDDING_OUTPUT}' output")
    return out.logits, out.features.astype(np.float32)


def shift_sample(keys: Sequence[str], n: int = SHIFT_FILMS) -> np.ndarray:
    """Indices of the ``n`` films the site shifts are applied to: the first by a hash of their
    names (deterministic, no choice by anyone)."""
    order = sorted(range(len(keys)), key=lambda i: hashlib.sha256(keys[i].encode()).hexdigest())
    return np.array(sorted(order[:n]), dtype=np.int64)


def shifted_embeddings(
    predictor: Any, x: np.ndarray, ix: np.ndarray, seed: int
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The ``embedding`` of films ``ix`` under each of :data:`pneumonia.shifts.SITE_SHIFTS`."""
    out = {}
    for name in SITE_SHIFTS:
        batches = shifted_batches(x[ix], name, seed, BATCH, table=SITE_SHIFTS)
        out[name] = (ix, np.concatenate([embed(predictor, b)[1] for b in batches]))
    return out


# ----------------------------------------------------------------------------- the fit


def fit_site(
    features: np.ndarray,
    y: np.ndarray,
    groups: Sequence[str],
    base_logits: np.ndarray,
    head_dim: int,
    *,
    original: tuple[float, float, float],
    rule: str = "youden",
    min_sensitivity: float = 0.9,
    metadata: Mapping[str, Sequence[Any]] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    curve: bool = True,
) -> dict[str, Any]:
    """Choose, cross-validate and fit the site head on ``embedding`` rows; arrays only.

    Args:
        features: ``embedding`` rows (N, D + M) of the site films.
        y: Labels (1 = PNEUMONIA).
        groups: Patient id per film.
        base_logits: The base model's logits (for the "before" figures).
        head_dim: D, the penultimate width.
        original: The base model's (temperature, bias, threshold).
        rule / min_sensitivity: The operating point (``youden`` or ``min_sensitivity``).
        metadata: Manifest columns (view, sex, age) for the figures by subgroup.
        curve: Also compute the learning curve.

    Returns:
        ``head`` (the :class:`LinearHead` fitted on all films), ``fold``, ``oof`` (nested
        out-of-fold logits), ``candidates``, ``chosen``, ``calibration`` (the cross-fitted
        figures, :func:`pneumonia.recalibrate.recalibrate_scores`), ``fitted`` (the file's
        temperature, bias and threshold, on the chosen head's out-of-fold scores),
        ``base_auc``, ``learning_curve``, ``subgroups``.
    """
    if rule not in ADAPT_RULES:
        raise AdaptError(f"unknown operating-point rule {rule!r}; expected one of {ADAPT_RULES}")
    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(y).astype(np.int64)
    groups = list(groups)
    check_site(y, groups)
    fold = grouped_folds(y, groups, FOLDS, seed)
    specs = candidates(head_dim, x.shape[1])
    cv = cross_validated(x, y, fold, specs, head_dim)
    best, cv_aucs = choose(cv, y)
    oof, per_fold = nested_oof(x, y, groups, fold, specs, head_dim, seed)
    head = fit_heads(x, y, [best], head_dim, scale=(FOLDS - 1) / FOLDS)[best]
    # What the file carries is fitted on the chosen head's own out-of-fold scores (the nested
    # ones mix heads of other C, whose logits spread differently); the figures stay nested.
    temperature, bias = fit_calibration(cv[best], y)
    pick = pick_threshold(
        rule, y, calibrated_probability(cv[best], temperature, bias), min_sensitivity
    )
    fitted = {
        "temperature": temperature,
        "bias": bias,
        "threshold": pick.threshold,
        "bound_by": pick.bound_by,
        "on": f"the out-of-fold scores of {best.name} ({FOLDS} patient-grouped folds)",
    }
    calib = recalibrate_scores(
        oof,
        y,
        groups,
        original=original,
        base_logits=base_logits,
        rule=rule,
        min_sensitivity=min_sensitivity,
        folds=FOLDS,
        n_boot=n_boot,
        seed=seed,
    )
    # The same cross-fitted probabilities and calls, for the figures by subgroup.
    p_oof, positive, _ = cross_fit(oof, y, groups, rule, min_sensitivity, FOLDS, seed)
    return {
        "head": head,
        "fold": fold,
        "oof": oof,
        "candidates": cv_aucs,
        "chosen": best,
        "chosen_per_outer_fold": per_fold,
        "calibration": calib,
        "fitted": fitted,
        "base_auc": roc_auc(y, np.asarray(base_logits, dtype=np.float64)),
        "learning_curve": learning_curve(x, y, groups, fold, best, head_dim, seed) if curve else [],
        "subgroups": subgroup_figures(
            y, oof, p_oof, positive, groups, metadata or {}, min(n_boot, 400), seed
        ),
    }


# ----------------------------------------------------------------------------- the card


def adaptation_record(
    base_card: ModelCard,
    base_sha256: str,
    site: SiteFilms,
    fit: dict[str, Any],
    guard: FeatureGuard,
    heatmap: dict[str, Any],
    warnings: Sequence[str],
    rule: str,
    min_sensitivity: float | None,
) -> dict[str, Any]:
    """The ``site_adaptation`` record of the adapted model's card. It holds counts and a
    digest of the file list, never a patient id or a file name."""
    calib = fit["calibration"]
    head: LinearHead = fit["head"]
    counts = {name: int((site.y == i).sum()) for i, name in enumerate(LABELS)}
    keep = ("sensitivity", "specificity", "accuracy", "ppv", "npv", "brier", "ece", "log_loss")
    return {
        "date": dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat(),
        "base": {
            "name": base_card.name,
            "version": base_card.version,
            "sha256": base_sha256,
            "weights_sha256": base_card.weights_sha256,
            "created": base_card.created,
            "threshold": base_card.threshold,
            "temperature": base_card.temperature,
            "bias": base_card.bias,
        },
        "site": {
            "data": site.source.get("data"),
            "n": len(site.y),
            "counts": counts,
            "patients": len(set(site.groups)),
            "patient_ids_from": site.source.get("patient_ids_from", "file names"),
            "metadata_columns": sorted(site.metadata),
            "files_sha256": files_digest(site.keys),
        },
        "head": {
            "chosen": head.spec.name,
            "features": head.spec.features,
            "c": head.spec.c,
            "inputs": f"embedding[{head.start}:{head.stop}] of the base model, standardised "
            "(folded into the weights)",
            "how_chosen": (
                f"highest out-of-fold ROC-AUC among {len(fit['candidates'])} candidates (L2 "
                f"logistic regression on {', '.join(FEATURE_SETS)} features, C in "
                f"{list(C_GRID)}) in {FOLDS}-fold patient-grouped cross-validation on the site "
                "films; refitted on all of them"
            ),
            "candidates_cv_auc": fit["candidates"],
        },
        "cross_validated": {
            "how": (
                f"nested: each film scored by a head chosen and fitted on the other {FOLDS - 1} of "
                f"{FOLDS} patient-grouped folds (inner {FOLDS - 1}-fold cross-validation), then "
                "calibrated and thresholded by a fit on the other folds' scores"
            ),
            "chosen_per_outer_fold": fit["chosen_per_outer_fold"],
            "auc": calib["auc"],
            "auc_ci95": calib["auc_ci95"],
            **{k: calib["after"][k] for k in keep},
            "ci95": calib["after"]["ci95"],
            "rule": {
                "rule": rule,
                "min_sensitivity": min_sensitivity if rule == "min_sensitivity" else None,
            },
        },
        "base_on_site": {
            "how": "the base model as it was (its head, calibration and threshold) on all site films",
            "auc": fit["base_auc"],
            **{k: calib["before"][k] for k in keep},
            "ci95": calib["before"]["ci95"],
        },
        "fitted": fit["fitted"],
        "calibration_folds": calib["folds"],
        "learning_curve": {
            "how": (
                f"cross-validated ROC-AUC of the chosen head fitted on N films (whole patients, half "
                f"of each class) of each outer fold's training part, {CURVE_DRAWS} random draws; "
                "scored on the held-out fold"
            ),
            "rows": fit["learning_curve"],
        },
        "subgroups": fit["subgroups"],
        "shortcuts": list(site.source.get("shortcuts", [])),
        "input_check": {
            "refitted_on": "the site films (thresholds cross-fitted by patient)",
            "flag_distance": guard.flag_distance,
            "mid_flag_distance": guard.mid_flag_distance,
            "refuse_distance": guard.refuse_distance,
            "refuse_set_by": guard.fitted.get("refuse_set_by"),
            "shifted_films": SHIFT_FILMS,
            "site_flagged_cross_fitted": guard.fitted.get("validation_flagged"),
            "site_refused_cross_fitted": guard.fitted.get("validation_refused"),
            "site_refused_by_base": guard.fitted.get("site_refused_by_base"),
            "inherited_refusal": guard.fitted.get("inherited_refusal"),
        },
        "heatmap": heatmap["statement"],
        "warnings": list(warnings),
    }


def adapted_card(
    base_card: ModelCard,
    record: dict[str, Any],
    guard: FeatureGuard,
    weights_sha256: str,
    base_sha256: str,
) -> ModelCard:
    """The adapted model's card: the base network's identity and training record, the site's
    head, operating point, calibration and input check, the base file in its lineage and the
    ``site_adaptation`` record. The base head's validation figures are not the new model's and
    are left out."""
    fitted = record["fitted"]
    rule = record["cross_validated"]["rule"]
    outputs = dict(base_card.outputs)
    outputs["logit"] = "raw logit of PNEUMONIA from the site head, shape (N,)"
    outputs["cam"] = f"shape (N, h, w): {record['heatmap']}"
    return base_card.with_(
        name=f"{base_card.name}-site",
        version=site_version(base_card.version, record["site"]["files_sha256"]),
        created=record["date"],
        threshold=fitted["threshold"],
        threshold_rule=ThresholdChoice(
            rule["rule"], rule["min_sensitivity"], SITE_SCORES, bound_by=fitted["bound_by"]
        ),
        calibration=Calibration(fitted["temperature"], fitted["bias"], SITE_SCORES),
        outputs=outputs,
        weights_sha256=weights_sha256,
        validation_metrics=None,
        stressed_validation=None,
        # The base's frontal-chest check reads the same embedding and travels with the file.
        input_check={
            **guard.summary(),
            **{k: v for k, v in (base_card.input_check or {}).items() if k == "frontal"},
        },
        lineage=(
            ModelRef(
                base_card.name,
                base_card.version,
                base_card.weights_sha256,
                base_sha256,
                "adapted to a site: the same network, a new head, operating point, calibration and "
                "input check fitted on the site's films (site_adaptation)",
            ),
            *base_card.lineage,
        ),
        site_recalibration=None,
        site_adaptation=record,
    )


def _f(x: Any) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _ci(pair: Sequence[Any] | None) -> str:
    return "" if not pair or pair[0] is None else f" ({_f(pair[0])}-{_f(pair[1])})"


def render_adaptation_section(card: ModelCard) -> str:
    """Markdown: the site adaptation, its cross-validated figures and learning curve."""
    r = card.site_adaptation
    assert r is not None
    b, s, h, cv, base = r["base"], r["site"], r["head"], r["cross_validated"], r["base_on_site"]
    weights = f"`{b['weights_sha256']}`"
    lines = [
        "## Site adaptation",
        f"Adapted on {r['date']} from {b['name']} {b['version']} (file sha256 `{b['sha256']}`; "
        f"weights sha256 {weights}) to {s['n']} films of `{s['data']}` "
        f"({s['counts']['NORMAL']} NORMAL, {s['counts']['PNEUMONIA']} PNEUMONIA; {s['patients']} "
        f"patients, ids from {s['patient_ids_from']}); file list sha256 `{s['files_sha256']}`.",
        "",
        f"- Head: {h['chosen']} on {h['inputs']}; chosen by {h['how_chosen']}.",
        f"- Operating point: threshold {r['fitted']['threshold']:.4f} on calibrated P(PNEUMONIA) "
        f"({card.threshold_rule.description()}); temperature {r['fitted']['temperature']:.4f}, "
        f"bias {r['fitted']['bias']:.4f}.",
        f"- Heatmap: {r['heatmap']}.",
        f"- Input check: refitted on {r['input_check']['refitted_on']}; refusal distance "
        f"{r['input_check']['refuse_distance']:.3f} (set by {r['input_check']['refuse_set_by']}); "
        f"cross-fitted on the site films {_f(r['input_check']['site_flagged_cross_fitted'])} "
        f"flagged, {_f(r['input_check']['site_refused_cross_fitted'])} refused; "
        f"{r['input_check'].get('inherited_refusal') or 'no inherited refusal'} "
        f"(refuses {_f(r['input_check'].get('site_refused_by_base'))} of the site films).",
        "",
        f"Figures on the site's films (95% patient-bootstrap intervals). Adapted: {cv['how']}.",
        "",
        "| on the site's films | base model as it was | adapted (cross-validated) |",
        "|---|---|---|",
        f"| ROC-AUC | {_f(base['auc'])} | {_f(cv['auc'])}{_ci(cv['auc_ci95'])} |",
    ]
    for m in ("sensitivity", "specificity", "ppv", "npv", "ece", "brier"):
        lines.append(
            f"| {m} | {_f(base[m])}{_ci(base['ci95'][m])} | {_f(cv[m])}{_ci(cv['ci95'][m])} |"
        )
    lines += [
        "",
        "Heads compared (out-of-fold ROC-AUC):",
        "",
        "| head | CV ROC-AUC |",
        "|---|---|",
        *[f"| {k} | {v:.3f} |" for k, v in h["candidates_cv_auc"].items()],
        "",
        f"Learning curve: {r['learning_curve']['how']}.",
        "",
        "| films | ROC-AUC mean | worst | best |",
        "|---|---|---|---|",
        *[
            f"| {row['films']} | {_f(row['auc_mean'])} | {_f(row['auc_min'])} "
            f"| {_f(row['auc_max'])} |"
            for row in r["learning_curve"]["rows"]
        ],
    ]
    for col, rows in r["subgroups"].items():
        lines += [
            "",
            f"By {col} (cross-validated; figures only where a group has {MIN_SUBGROUP}+ films and "
            "5+ of each class):",
            "",
            "| value | films (NORMAL / PNEUMONIA) | ROC-AUC | sensitivity | specificity |",
            "|---|---|---|---|---|",
        ]
        for row in rows:
            ci = row.get("ci95", {})
            lines.append(
                f"| {row['value']} | {row['n']} ({row['counts']['NORMAL']} / {row['counts']['PNEUMONIA']}) "
                f"| {_f(row.get('auc'))}{_ci(ci.get('auc'))} "
                f"| {_f(row.get('sensitivity'))}{_ci(ci.get('sensitivity'))} "
                f"| {_f(row.get('specificity'))}{_ci(ci.get('specificity'))} |"
            )
    if r.get("shortcuts"):
        lines += [
            "",
            "Shortcut screen: how well each manifest column alone predicts the label "
            "(`pneumonia data audit`):",
            "",
            "| column | kind | ROC-AUC | warning |",
            "|---|---|---|---|",
            *[
                f"| {x['column']} | {x['kind']} | {_f(x['auc'])} | {'yes' if x['warning'] else ''} |"
                for x in r["shortcuts"]
            ],
        ]
    lines.append("")
    lines += [f"- Warning: {w}" for w in r["warnings"]]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- the command


def _blas_one_thread() -> Any:
    """Single-threaded BLAS for the many small solves (on a busy 2-core machine OpenBLAS'
    threads contend and the fit takes ten times as long); a no-op without threadpoolctl."""
    import contextlib

    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(1, user_api="blas")


def adapt_model(
    model: Path,
    data: Path,
    out: Path,
    *,
    min_sensitivity: float | None = None,
    force: bool = False,
    n_boot: int = 1000,
    seed: int = 0,
    progress: bool = False,
    site: SiteFilms | None = None,
) -> dict[str, Any]:
    """Adapt ``model`` to the labelled films of ``data`` and write ``out`` (ONNX) with its card
    JSON and Markdown beside it. The base file is only read.

    Args:
        model: The base model (exported with its input check: ``embedding`` output).
        data: The site's labelled films.
        out: The adapted model to write; must not exist unless ``force``.
        min_sensitivity: Operating point with at least this cross-fitted sensitivity instead of
            Youden's J.
        site: The films already read (benchmarks: a subset); default read from ``data``.

    Returns:
        The report: the card's ``site_adaptation`` record plus ``out``, ``sha256``, ``seconds``.

    Raises:
        AdaptError: bad arguments or site data, naming the fix.
    """
    from pneumonia.card import markdown_card_path, sidecar_card_path
    from pneumonia.predictor import ModelLoadError, Predictor

    start = time.perf_counter()
    model, data, out = Path(model), Path(data), Path(out)
    if out.resolve() == model.resolve():
        raise AdaptError(f"--out {out} is the base model; write the site model to a new file")
    written = [out, sidecar_card_path(out), markdown_card_path(out)]
    if not force and (existing := [str(p) for p in written if p.exists()]):
        raise AdaptError(f"{', '.join(existing)} already exist(s); pass --force to replace")
    if min_sensitivity is not None and not 0.0 < min_sensitivity < 1.0:
        raise AdaptError(f"--min-sensitivity must be in (0, 1), got {min_sensitivity}")
    try:
        predictor = Predictor(model)
    except ModelLoadError as exc:
        raise AdaptError(str(exc)) from None
    if predictor.guard is None or predictor.guard.mid is None:
        raise AdaptError(
            f"model {model} carries no input check with mid-level features; adapt needs a model "
            "exported after `pneumonia guard fit` (format 2)"
        )
    head_dim = predictor.guard.head.dim
    rule = "youden" if min_sensitivity is None else "min_sensitivity"
    site = site or read_site(data, predictor.spec, progress)
    warnings = check_site(site.y, site.groups)
    for m in site.source.get("shortcuts", []):
        if m["warning"]:
            warnings.append(
                f"the manifest column {m['column']!r} alone predicts the label (ROC-AUC "
                f"{m['auc']:.2f}{', ' + m['direction'] if m['direction'] else ''}): the head can "
                "learn such a shortcut from the films (a view, a marker) and the site figures "
                "cannot tell; check the figures by that column"
            )
    log.info("embedding %d site films with the base model", len(site.y))
    base_logits, features = embed(predictor, site.x)
    log.info("embedded in %.0f s; fitting the head", time.perf_counter() - start)
    with _blas_one_thread():
        fit = fit_site(
            features,
            site.y,
            site.groups,
            base_logits,
            head_dim,
            original=(predictor.temperature, predictor.bias, predictor.threshold),
            rule=rule,
            min_sensitivity=0.9 if min_sensitivity is None else min_sensitivity,
            metadata=site.metadata,
            n_boot=n_boot,
            seed=seed,
        )
        log.info(
            "head fitted at %.0f s; embedding %d films under %d site shifts",
            time.perf_counter() - start,
            SHIFT_FILMS,
            len(SITE_SHIFTS),
        )
        shifted = shifted_embeddings(predictor, site.x, shift_sample(site.keys), seed)
        guard = fit_site_guard(
            features,
            fit["fold"],
            head_dim,
            shifted,
            fitted={"fitted_on": f"site films of {site.source.get('data')} (pneumonia adapt)"},
            base=predictor.guard,
        )
    by_base = guard.fitted.get("site_refused_by_base") or 0.0
    if by_base > 0.01:
        warnings.append(
            f"the base model's input check refuses {by_base:.1%} of the site films as not chest "
            "X-rays, and the adapted model inherits that refusal: check those films"
        )
    warnings += fit["calibration"]["warnings"]
    log.info("input check refitted at %.0f s; writing the model", time.perf_counter() - start)
    raw = model.read_bytes()  # the base file is only read
    weights, bias = fit["head"].folded(features.shape[1])
    graph, heatmap = write_head(raw, weights, bias, head_dim)
    record = adaptation_record(
        predictor.card, predictor.sha256, site, fit, guard, heatmap, warnings, rule, min_sensitivity
    )
    card = adapted_card(predictor.card, record, guard, weights_digest(graph), predictor.sha256)
    # Every metadata entry the base carries (other checks on its features too) travels along;
    # the card and the input check are the site's.
    _, extra, _ = read_model_card(model)
    extra[GUARD_METADATA_KEY] = json.dumps(guard.to_dict())
    blob = with_metadata(graph, {CARD_METADATA_KEY: card.to_json(), **extra})
    out.parent.mkdir(parents=True, exist_ok=True)
    _verify(blob, out, fit["head"], features[:BATCH], site.x[:BATCH])
    sidecar = write_model(out, graph, card, extra)
    seconds = time.perf_counter() - start
    log.info("adapted model written to %s in %.0f s", out, seconds)
    return {**record, "out": str(out), "sha256": sidecar["sha256"], "seconds": seconds}


def _verify(blob: bytes, out: Path, head: LinearHead, features: np.ndarray, x: np.ndarray) -> None:
    """Load the new file as it will be served and check its logits against the fitted head.

    Raises:
        AdaptError: the written graph disagrees with the head (a bug, never the user's data).
    """
    from pneumonia.predictor import Predictor

    tmp = out.with_name(f".{out.name}.check.onnx")
    try:
        tmp.write_bytes(blob)
        p = Predictor(tmp, threads=1)
        out_ = p.scores(x, cams=True)
        logits, cams = out_.logits, out_.cams
        assert cams is not None
    finally:
        tmp.unlink(missing_ok=True)
    want = head.decision(features)
    gap = float(np.max(np.abs(logits - want))) if len(want) else 0.0
    cam_gap = float(np.max(np.abs(cams.mean(axis=(1, 2)) - logits))) if len(want) else 0.0
    if gap > 1e-3 * max(1.0, float(np.abs(want).max())) or cam_gap > 1e-3 * max(1.0, gap + 1):
        raise AdaptError(
            f"the written graph's logits differ from the fitted head by {gap:.2e} (cam mean by "
            f"{cam_gap:.2e}); please report this"
        )
