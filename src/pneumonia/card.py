"""The model file's contract: the typed card, its place in the ONNX file, the rule table, Markdown.

Every exported model is one ONNX file whose ``metadata_props`` carry the model card (what the
model is, how it was made and chosen, how to turn its logit into an answer) and, where fitted,
the input check. This module is the one owner of that contract, on the lean side (numpy only),
so that every install (the service, ``pneumonia card``, ``adapt``) reads, validates, rewrites
and renders cards the same way:

- :class:`ModelCard`: the typed card with strict parsing (an unknown, missing or mistyped field
  is refused by name) and a schema version. Cards written before the schema (version 1) are
  read through :func:`upgrade_legacy`, which keeps what they recorded and marks the rest as not
  recorded, never guessed.
- The file: :func:`read_metadata` / :func:`with_metadata` rewrite ``metadata_props`` at the
  protobuf wire level (neither ``onnx`` nor torch needed; the graph's bytes are kept), and
  :func:`file_digests` gives the file's sha256 beside the *weights digest*: the sha256 of the
  file without its metadata, which a card rewrite leaves unchanged.
- :data:`RULES`: the one table of threshold rules (name, function, description, defaults).
- :func:`render_markdown`: the Markdown card. Every sentence in it comes from a field of the
  card, a dataset descriptor, an evaluation report or the test-look ledger
  (:mod:`pneumonia.ledger`); nothing about the protocol is typed as a constant.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from pneumonia.labels import LABELS

if TYPE_CHECKING:  # numpy and the metrics load when a rule runs: `pneumonia --help` stays light
    import numpy as np

#: Version of the card's JSON layout; :meth:`ModelCard.from_dict` refuses a newer one.
SCHEMA_VERSION = 2
#: Key of the model card JSON inside the ONNX file's metadata_props.
CARD_METADATA_KEY = "model_card"
#: Key of the fitted input check (pneumonia.guard.FeatureGuard.to_dict) in the same place.
GUARD_METADATA_KEY = "input_guard"
#: Key of the frontal-chest check (pneumonia.frontal.FrontalCheck.to_dict) in the same place:
#: an entry of its own, which a card rewrite or a site model carries over untouched.
FRONTAL_METADATA_KEY = "frontal_check"
#: What a card says of a record it never had (a legacy card's weights digest, date, ...).
NOT_RECORDED = "not recorded"
#: The sidecar's extra fields: the identity of the file it describes.
FILE_FIELDS = ("sha256", "file", "bytes")

#: The product's statement of use: a policy of this project, the same for every model it makes.
INTENDED_USE = (
    "Research and engineering use: triage support, dataset audits and benchmarking of pneumonia "
    "detection on chest X-rays like the films described under Training data. Not a diagnostic "
    "device; every output must be reviewed by a qualified clinician."
)


class CardError(ValueError):
    """A model card that does not follow the contract; the message names the field."""


# ----------------------------------------------------------------------------- threshold rules


@dataclass(frozen=True)
class ThresholdPick:
    """A threshold and which constraint set it: the rule's own optimum or the sensitivity floor."""

    threshold: float
    bound_by: str


#: ``bound_by`` values.
RULE_OPTIMUM = "rule optimum"
SENSITIVITY_FLOOR = "sensitivity floor"


def _pick_min_sensitivity(
    y: np.ndarray, p: np.ndarray, min_sensitivity: float, youden_y: Any, youden_p: Any
) -> ThresholdPick:
    from pneumonia.evaluate import choose_threshold

    return ThresholdPick(choose_threshold(y, p, "min_sensitivity", min_sensitivity), RULE_OPTIMUM)


def _pick_youden(
    y: np.ndarray, p: np.ndarray, min_sensitivity: float, youden_y: Any, youden_p: Any
) -> ThresholdPick:
    from pneumonia.evaluate import choose_threshold

    return ThresholdPick(choose_threshold(y, p, "youden"), RULE_OPTIMUM)


def _pick_capped_youden(
    y: np.ndarray,
    p: np.ndarray,
    min_sensitivity: float,
    youden_y: np.ndarray | None,
    youden_p: np.ndarray | None,
) -> ThresholdPick:
    from pneumonia.evaluate import choose_threshold

    # Youden's J (on youden_y/p: a training run's pooled stressed validation), never above the
    # highest threshold that keeps the sensitivity on (y, p) at least min_sensitivity.
    balanced = choose_threshold(
        y if youden_y is None else youden_y, p if youden_p is None else youden_p, "youden"
    )
    floor = choose_threshold(y, p, "min_sensitivity", min_sensitivity)
    if floor < balanced:
        return ThresholdPick(floor, SENSITIVITY_FLOOR)
    return ThresholdPick(balanced, RULE_OPTIMUM)


@dataclass(frozen=True)
class ThresholdRule:
    """One way of choosing the operating threshold on calibrated P(PNEUMONIA).

    ``template`` is its description with ``{on}`` (the films the sensitivity is kept on),
    ``{youden_on}`` (the films Youden's J is maximised on) and ``{min_sensitivity}``.
    """

    name: str
    template: str
    uses_min_sensitivity: bool
    choose: Callable[
        [np.ndarray, np.ndarray, float, np.ndarray | None, np.ndarray | None], ThresholdPick
    ]

    def describe(self, on: str, youden_on: str | None, min_sensitivity: float | None) -> str:
        return self.template.format(
            on=on, youden_on=youden_on or on, min_sensitivity=min_sensitivity
        )


#: The floor a screening tool keeps by default (the shipped v2 recipe's, TrainConfig's, and
#: recalibrate's when a model's card records none).
DEFAULT_MIN_SENSITIVITY = 0.97

#: Every threshold rule, once: training, calibrate, recalibrate and adapt choose through it.
RULES: dict[str, ThresholdRule] = {
    r.name: r
    for r in (
        ThresholdRule(
            "min_sensitivity",
            "the highest threshold whose sensitivity on {on} is at least {min_sensitivity}",
            True,
            _pick_min_sensitivity,
        ),
        ThresholdRule(
            "youden",
            "Youden's J (sensitivity + specificity - 1) maximised on {on}",
            False,
            _pick_youden,
        ),
        ThresholdRule(
            "stressed_youden",
            "Youden's J maximised on {youden_on}, lowered where needed so that the sensitivity "
            "on {on} stays at least {min_sensitivity}",
            True,
            _pick_capped_youden,
        ),
    )
}


def rule(name: str) -> ThresholdRule:
    """The rule called ``name``; raises CardError naming the known ones."""
    try:
        return RULES[name]
    except KeyError:
        raise CardError(
            f"unknown threshold rule {name!r}; expected one of {sorted(RULES)}"
        ) from None


def pick_threshold(
    name: str,
    y: np.ndarray,
    p: np.ndarray,
    min_sensitivity: float,
    youden_y: np.ndarray | None = None,
    youden_p: np.ndarray | None = None,
) -> ThresholdPick:
    """The threshold by rule ``name`` on labels ``y`` and calibrated scores ``p``.

    Args:
        youden_y / youden_p: Where Youden's J is maximised for ``stressed_youden`` (a training
            run: the pooled stressed validation); default ``y`` / ``p``.
    """
    import numpy

    return rule(name).choose(
        numpy.asarray(y), numpy.asarray(p, dtype=numpy.float64), min_sensitivity, youden_y, youden_p
    )


# ----------------------------------------------------------------------------- typed parts


def _check(
    d: Mapping[str, Any], where: str, required: Sequence[str], optional: Sequence[str]
) -> None:
    if not isinstance(d, Mapping):
        raise CardError(f"{where} must be a JSON object, got {type(d).__name__}")
    missing = [k for k in required if k not in d]
    if missing:
        raise CardError(
            f"{where} lacks {', '.join(f'{where}.{k}' if where != 'card' else k for k in missing)}"
        )
    unknown = sorted(set(d) - set(required) - set(optional))
    if unknown:
        raise CardError(
            f"{where} has unknown field(s) {unknown}; this package reads card schema "
            f"{SCHEMA_VERSION} (a newer pneumonia-detection may have written it)"
        )


def _num(
    d: Mapping[str, Any], key: str, where: str, lo: float = -math.inf, hi: float = math.inf
) -> float:
    v = d[key]
    if isinstance(v, bool) or not isinstance(v, int | float) or not lo <= float(v) <= hi:
        raise CardError(f"{where}.{key} must be a number in [{lo}, {hi}], got {v!r}")
    return float(v)


def _str(d: Mapping[str, Any], key: str, where: str, optional: bool = False) -> str | None:
    v = d.get(key)
    if v is None and optional:
        return None
    if not isinstance(v, str) or not v:
        raise CardError(f"{where}.{key} must be a non-empty string, got {v!r}")
    return v


def _obj(
    d: Mapping[str, Any], key: str, where: str, optional: bool = False
) -> dict[str, Any] | None:
    v = d.get(key)
    if v is None and optional:
        return None
    if not isinstance(v, dict):
        raise CardError(f"{where}.{key} must be a JSON object, got {type(v).__name__}")
    return v


@dataclass(frozen=True)
class Reference:
    """A published result on the same data's test set, quoted beside ours."""

    label: str
    auc: str
    accuracy: str = "-"
    sensitivity: str = "-"
    specificity: str = "-"


@dataclass(frozen=True)
class Dataset:
    """What the training films are: from a dataset descriptor (``dataset.json``), or undeclared.

    Attributes:
        name: Short stable name (``kermany-2018``); the test-look ledger keys on it.
        source: Where the films come from (institution, publication).
        licence: Their licence as the source states it.
        population: Who is in them (age, setting, views).
        citation / url: Where to read more.
        references: Published results on this data's official test set.
    """

    name: str
    source: str
    licence: str
    population: str
    citation: str | None = None
    url: str | None = None
    references: tuple[Reference, ...] = ()

    FIELDS = ("name", "source", "licence", "population")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "dataset") -> Dataset:
        _check(d, where, cls.FIELDS, ("citation", "url", "references"))
        refs = d.get("references") or []
        if not isinstance(refs, list):
            raise CardError(f"{where}.references must be a list")
        try:
            references = tuple(Reference(**r) for r in refs)
        except TypeError as exc:
            raise CardError(f"{where}.references: {exc}") from None
        return cls(
            **{k: str(_str(d, k, where)) for k in cls.FIELDS},
            citation=_str(d, "citation", where, optional=True),
            url=_str(d, "url", where, optional=True),
            references=references,
        )

    @classmethod
    def load(cls, path: Path) -> Dataset:
        """A descriptor file; raises CardError naming the file and the field."""
        try:
            d = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise CardError(f"dataset descriptor {path}: {exc}") from None
        try:
            return cls.from_dict(d)
        except CardError as exc:
            raise CardError(f"dataset descriptor {path}: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["references"] = [asdict(r) for r in self.references]
        return {k: v for k, v in d.items() if v not in (None, [])}


#: Name of the descriptor ``pneumonia train`` looks for beside the data.
DATASET_FILE = "dataset.json"


def find_dataset(data: Path, given: Path | None) -> Dataset | None:
    """The descriptor of a training folder: ``given``, else ``DATA/dataset.json``, else None."""
    if given is not None:
        return Dataset.load(given)
    beside = Path(data) / DATASET_FILE if Path(data).is_dir() else Path(data).parent / DATASET_FILE
    return Dataset.load(beside) if beside.is_file() else None


@dataclass(frozen=True)
class ThresholdChoice:
    """How the operating threshold was chosen.

    Attributes:
        rule: A key of :data:`RULES`.
        min_sensitivity: The rule's floor (None for rules without one).
        fitted_on: The films the rule was applied to (for ``stressed_youden``: where the
            sensitivity floor is kept).
        youden_on: Where Youden's J was maximised, when that differs from ``fitted_on``.
        bound_by: :data:`RULE_OPTIMUM` or :data:`SENSITIVITY_FLOOR`; None where the record
            predates it (not recorded).
    """

    rule: str
    min_sensitivity: float | None
    fitted_on: str
    youden_on: str | None = None
    bound_by: str | None = None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ThresholdChoice:
        w = "threshold_rule"
        _check(d, w, ("rule", "fitted_on"), ("min_sensitivity", "youden_on", "bound_by"))
        r = rule(str(d["rule"]))
        ms = d.get("min_sensitivity")
        if r.uses_min_sensitivity and ms is None:
            raise CardError(f"{w}.min_sensitivity is required by rule {r.name!r}")
        if d.get("bound_by") not in (None, RULE_OPTIMUM, SENSITIVITY_FLOOR):
            raise CardError(
                f"{w}.bound_by must be {RULE_OPTIMUM!r} or {SENSITIVITY_FLOOR!r}, got {d['bound_by']!r}"
            )
        return cls(
            rule=r.name,
            min_sensitivity=_num(d, "min_sensitivity", w, 0.0, 1.0) if ms is not None else None,
            fitted_on=str(_str(d, "fitted_on", w)),
            youden_on=_str(d, "youden_on", w, optional=True),
            bound_by=d.get("bound_by"),
        )

    def description(self) -> str:
        text = rule(self.rule).describe(self.fitted_on, self.youden_on, self.min_sensitivity)
        if self.bound_by == SENSITIVITY_FLOOR:
            text += "; the sensitivity floor set it (the rule's own optimum was higher)"
        elif self.bound_by == RULE_OPTIMUM and self.rule == "stressed_youden":
            text += "; Youden's optimum set it (the floor did not bind)"
        elif self.bound_by is None and rule(self.rule).uses_min_sensitivity:
            text += "; which constraint set it was not recorded"
        return text


@dataclass(frozen=True)
class Calibration:
    """``p = sigmoid(logit / temperature + bias)``, fitted on ``fitted_on``."""

    temperature: float
    bias: float
    fitted_on: str

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Calibration:
        w = "calibration"
        _check(d, w, ("temperature", "bias", "fitted_on"), ("method",))
        if d.get("method", "temperature_bias") != "temperature_bias":
            raise CardError(f"{w}.method must be 'temperature_bias', got {d['method']!r}")
        t = _num(d, "temperature", w)
        if t <= 0:
            raise CardError(f"{w}.temperature must be > 0, got {t}")
        return cls(t, _num(d, "bias", w), str(_str(d, "fitted_on", w)))

    def to_dict(self) -> dict[str, Any]:
        return {"method": "temperature_bias", **asdict(self)}


@dataclass(frozen=True)
class ModelRef:
    """Another model file this one comes from (a parent in its lineage)."""

    name: str
    version: str
    weights_sha256: str | None
    sha256: str | None = None
    relation: str | None = None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str) -> ModelRef:
        _check(d, where, ("name", "version", "weights_sha256"), ("sha256", "relation"))
        return cls(
            name=str(_str(d, "name", where)),
            version=str(_str(d, "version", where)),
            weights_sha256=_str(d, "weights_sha256", where, optional=True),
            sha256=_str(d, "sha256", where, optional=True),
            relation=_str(d, "relation", where, optional=True),
        )


# ----------------------------------------------------------------------------- the card


_REQUIRED = (
    "schema_version",
    "name",
    "version",
    "created",
    "labels",
    "positive_label",
    "threshold",
    "threshold_rule",
    "calibration",
    "preprocess",
    "input",
    "outputs",
    "architecture",
    "weights_sha256",
)
#: Optional sections: each has its owner (training, the input check, recalibrate, adapt, int8).
_OPTIONAL = (
    "dataset",
    "training",
    "validation_metrics",
    "stressed_validation",
    "input_check",
    "versions",
    "run_dir",
    "lineage",
    "site_recalibration",
    "site_adaptation",
    "quantization",
)


@dataclass(frozen=True)
class ModelCard:
    """The model card carried by every exported file (see the module docstring).

    Sections whose inner layout belongs to another module (the training record, the input
    check's summary, the site records) are JSON objects here; the fields every reader relies on
    are typed and checked.
    """

    name: str
    version: str
    created: str
    threshold: float
    threshold_rule: ThresholdChoice
    calibration: Calibration
    preprocess: dict[str, Any]
    input: dict[str, Any]
    outputs: dict[str, str]
    architecture: dict[str, Any]
    weights_sha256: str
    dataset: Dataset | None = None
    training: dict[str, Any] | None = None
    validation_metrics: dict[str, Any] | None = None
    stressed_validation: dict[str, Any] | None = None
    input_check: dict[str, Any] | None = None
    versions: dict[str, str] = field(default_factory=dict)
    run_dir: str | None = None
    lineage: tuple[ModelRef, ...] = ()
    site_recalibration: dict[str, Any] | None = None
    site_adaptation: dict[str, Any] | None = None
    quantization: dict[str, Any] | None = None
    labels: tuple[str, str] = LABELS
    positive_label: str = LABELS[1]
    schema_version: int = SCHEMA_VERSION

    # -- reading

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelCard:
        """Parse a card (a legacy one through :func:`upgrade_legacy`); raises CardError."""
        if not isinstance(d, Mapping):
            raise CardError(f"the model card must be a JSON object, got {type(d).__name__}")
        if "schema_version" not in d:
            d = upgrade_legacy(d)
        sv = d["schema_version"]
        if not isinstance(sv, int) or sv > SCHEMA_VERSION or sv < 2:
            raise CardError(
                f"card schema_version {sv!r} is not one this package reads ({SCHEMA_VERSION}); "
                "upgrade pneumonia-detection"
            )
        _check(d, "card", _REQUIRED, _OPTIONAL)
        if list(d["labels"]) != list(LABELS) or d["positive_label"] != LABELS[1]:
            raise CardError(
                f"labels must be {list(LABELS)} with positive_label {LABELS[1]!r}, got "
                f"{d['labels']!r} / {d['positive_label']!r}"
            )
        for key in ("preprocess", "input", "outputs", "architecture"):
            _obj(d, key, "card")
        for key in (
            "training",
            "validation_metrics",
            "stressed_validation",
            "input_check",
            "site_recalibration",
            "site_adaptation",
            "quantization",
        ):
            _obj(d, key, "card", optional=True)
        lineage = d.get("lineage") or []
        if not isinstance(lineage, list):
            raise CardError("lineage must be a list of model references")
        ds = d.get("dataset")
        return cls(
            name=str(_str(d, "name", "card")),
            version=str(_str(d, "version", "card")),
            created=str(_str(d, "created", "card")),
            threshold=_num(d, "threshold", "card", 0.0, 1.0),
            threshold_rule=ThresholdChoice.from_dict(_obj(d, "threshold_rule", "card") or {}),
            calibration=Calibration.from_dict(_obj(d, "calibration", "card") or {}),
            preprocess=dict(d["preprocess"]),
            input=dict(d["input"]),
            outputs=dict(d["outputs"]),
            architecture=dict(d["architecture"]),
            weights_sha256=str(_str(d, "weights_sha256", "card")),
            dataset=Dataset.from_dict(ds) if ds is not None else None,
            training=d.get("training"),
            validation_metrics=d.get("validation_metrics"),
            stressed_validation=d.get("stressed_validation"),
            input_check=d.get("input_check"),
            versions=dict(d.get("versions") or {}),
            run_dir=d.get("run_dir"),
            lineage=tuple(ModelRef.from_dict(r, f"lineage[{i}]") for i, r in enumerate(lineage)),
            site_recalibration=d.get("site_recalibration"),
            site_adaptation=d.get("site_adaptation"),
            quantization=d.get("quantization"),
        )

    @classmethod
    def from_json(cls, text: str) -> ModelCard:
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as exc:
            raise CardError(f"the model card is not JSON: {exc}") from None

    # -- writing

    def to_dict(self) -> dict[str, Any]:
        """The stored form (what goes into the file): records only, no derived sentences."""
        d: dict[str, Any] = {
            "schema_version": self.schema_version,
            "name": self.name,
            "version": self.version,
            "created": self.created,
            "labels": list(self.labels),
            "positive_label": self.positive_label,
            "threshold": self.threshold,
            "threshold_rule": {
                k: v for k, v in asdict(self.threshold_rule).items() if v is not None
            },
            "calibration": self.calibration.to_dict(),
            "preprocess": self.preprocess,
            "input": self.input,
            "outputs": self.outputs,
            "architecture": self.architecture,
            "weights_sha256": self.weights_sha256,
        }
        optional = {
            "dataset": self.dataset.to_dict() if self.dataset else None,
            "training": self.training,
            "validation_metrics": self.validation_metrics,
            "stressed_validation": self.stressed_validation,
            "input_check": self.input_check,
            "versions": self.versions or None,
            "run_dir": self.run_dir,
            "lineage": [{k: v for k, v in asdict(r).items() if v is not None} for r in self.lineage]
            or None,
            "site_recalibration": self.site_recalibration,
            "site_adaptation": self.site_adaptation,
            "quantization": self.quantization,
        }
        d.update({k: v for k, v in optional.items() if v is not None})
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    def public(self) -> dict[str, Any]:
        """The stored form plus the sentences derived from it (``GET /model``)."""
        d = self.to_dict()
        d["threshold_rule"]["description"] = self.threshold_rule.description()
        d["calibration"]["description"] = self.calibration_sentence()
        d["intended_use"] = INTENDED_USE
        d["limitations"] = self.limitations()
        return d

    def with_(self, **changes: Any) -> ModelCard:
        """A copy with ``changes`` (field names of this class)."""
        return replace(self, **changes)

    # -- derived sentences

    @property
    def temperature(self) -> float:
        return self.calibration.temperature

    @property
    def bias(self) -> float:
        return self.calibration.bias

    def calibration_sentence(self) -> str:
        c = self.calibration
        return (
            f"sigmoid(logit / {c.temperature:.4f} + {c.bias:.4f}), temperature and bias fitted "
            f"on {c.fitted_on}"
        )

    def limitations(self) -> list[str]:
        """What the records say the model was not shown to do."""
        out = []
        if self.site_adaptation is not None:
            s = self.site_adaptation.get("site", {})
            out.append(
                f"Fitted to one site's films ({s.get('n', '?')} films of {s.get('patients', '?')} "
                "patients, site_adaptation below); its figures are cross-validated on that site only."
            )
        if self.dataset is None:
            out.append(
                "The training data's source and population were not declared (no dataset "
                "descriptor): ask whoever trained it what the films were before relying on it."
            )
        else:
            out.append(f"Trained on {self.dataset.population} ({self.dataset.source}).")
        out += [
            "Validated only on films held out from its own training source"
            + (
                " and the site named above"
                if self.site_adaptation or self.site_recalibration
                else ""
            )
            + "; on other hospitals, scanners and populations its figures are unknown until "
            "measured there (`pneumonia adapt` fits and measures a site).",
            "Binary NORMAL vs PNEUMONIA only; it does not tell bacterial from viral pneumonia and "
            "says nothing about other findings.",
            "Not a diagnostic device; not cleared or approved by any regulator.",
        ]
        return out


def upgrade_legacy(d: Mapping[str, Any]) -> dict[str, Any]:
    """A schema-1 card (before this module: no ``schema_version``) in the schema-2 layout.

    Kept: every record it had. Not invented: the weights digest (the reader computes it from the
    file), which constraint set the threshold (``bound_by`` stays unrecorded) and the data's
    identity (no descriptor: undeclared).

    Raises:
        CardError: a field prediction needs is missing, named.
    """
    missing = [
        k
        for k in ("name", "labels", "threshold", "temperature", "bias", "preprocess")
        if k not in d
    ]
    if missing:
        raise CardError(
            f"card lacks {', '.join(missing)}; re-export the model with `pneumonia export`"
        )
    tr = d.get("threshold_rule") or {}
    calibrated_on = d.get("calibrated_on", "clean")
    site = d.get("site_recalibration")
    if site is not None:
        fitted_on, youden_on, cal_on = (
            "the site's films",
            None,
            "the site's films (site_recalibration)",
        )
    elif calibrated_on == "stressed":
        fitted_on = "the clean validation split"
        youden_on = (
            "the pooled stressed validation" if tr.get("rule") == "stressed_youden" else None
        )
        cal_on = "the pooled stressed validation (the validation split under fixed perturbations, clean included)"
    else:
        fitted_on, youden_on, cal_on = "the validation split", None, "the validation split"
    pre = d["preprocess"]
    out: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "name": d["name"],
        "version": d.get("version") or "unversioned",
        "created": d.get("created") or NOT_RECORDED,
        "labels": d["labels"],
        "positive_label": d.get("positive_label", LABELS[1]),
        "threshold": d["threshold"],
        "threshold_rule": {
            "rule": tr.get("rule", "min_sensitivity"),
            "min_sensitivity": tr.get("min_sensitivity"),
            "fitted_on": fitted_on,
            **({"youden_on": youden_on} if youden_on else {}),
        },
        "calibration": {"temperature": d["temperature"], "bias": d["bias"], "fitted_on": cal_on},
        "preprocess": pre,
        "input": d.get("input") or {"name": "image", "dtype": "float32"},
        "outputs": d.get("outputs") or {},
        "architecture": d.get("architecture") or {},
        "weights_sha256": d.get("weights_sha256") or NOT_RECORDED,
    }
    if out["threshold_rule"]["min_sensitivity"] is None:
        del out["threshold_rule"]["min_sensitivity"]
    for key in _OPTIONAL:
        if key in d and key not in ("dataset", "lineage"):
            out[key] = d[key]
    return out


def read_sidecar(path: Path) -> tuple[ModelCard, dict[str, Any]]:
    """A ``model.card.json``: the card and the file identity (sha256, file, bytes) beside it."""
    try:
        d = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CardError(f"{path}: {exc}") from None
    if not isinstance(d, dict):
        raise CardError(f"{path} is not a JSON object")
    ident = {k: d.pop(k) for k in FILE_FIELDS if k in d}
    # The sentences ModelCard.public() derives; the stored form holds only records.
    for derived in ("intended_use", "limitations"):
        d.pop(derived, None)
    if "schema_version" in d:
        for part in ("threshold_rule", "calibration"):
            if isinstance(d.get(part), dict):
                d[part] = {k: v for k, v in d[part].items() if k != "description"}
    try:
        return ModelCard.from_dict(d), ident
    except CardError as exc:
        raise CardError(f"{path}: {exc}") from None


def sidecar_card_path(model_path: Path) -> Path:
    """``model.onnx`` -> ``model.card.json``."""
    return Path(model_path).with_suffix(".card.json")


def markdown_card_path(model_path: Path) -> Path:
    """``model.onnx`` -> ``model.card.md``."""
    return Path(model_path).with_suffix(".card.md")


# ----------------------------------------------------------------------------- the ONNX file


def _varint(b: bytes, pos: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        if pos >= len(b):
            raise CardError("truncated protobuf varint: not an ONNX model")
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
            raise CardError(
                f"unsupported protobuf wire type {wire} at byte {start}: not an ONNX model"
            )
        if pos > len(b):
            raise CardError("truncated protobuf message: not an ONNX model")
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


def with_metadata(model: bytes, props: Mapping[str, str]) -> bytes:
    """``model`` with its metadata_props replaced by ``props``; every other byte is kept."""
    kept = b"".join(model[s:e] for n, _, s, e in _fields(model) if n != METADATA_FIELD)
    entries = b"".join(
        _len_field(METADATA_FIELD, _len_field(1, k.encode()) + _len_field(2, v.encode()))
        for k, v in props.items()
    )
    return kept + entries


def weights_digest(model: bytes) -> str:
    """sha256 of the model without its metadata_props: the graph and its weights.

    A card or input check rewritten into the file leaves it unchanged; any change of weights or
    graph changes it. The bytes hashed are the other top-level fields in file order.
    """
    h = hashlib.sha256()
    for n, _, s, e in _fields(model):
        if n != METADATA_FIELD:
            h.update(model[s:e])
    return h.hexdigest()


@dataclass(frozen=True)
class FileDigests:
    """sha256 of the whole file and of its weights (see :func:`weights_digest`)."""

    sha256: str
    weights_sha256: str


def _stream_varint(f: IO[bytes], first: bytes) -> tuple[int, bytes]:
    raw, shift, value, byte = first, 0, 0, first[0]
    while True:
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, raw
        shift += 7
        nxt = f.read(1)
        if not nxt:
            raise CardError("truncated protobuf varint: not an ONNX model")
        raw += nxt
        byte = nxt[0]


def _chunks(f: IO[bytes], n: int) -> Iterator[bytes]:
    while n > 0:
        chunk = f.read(min(n, 1 << 20))
        if not chunk:
            raise CardError("truncated protobuf message: not an ONNX model")
        n -= len(chunk)
        yield chunk


def file_digests(path: Path) -> FileDigests:
    """Both digests of an ONNX file in one pass, 1 MiB at a time (no copy of the file in memory)."""
    whole, weights = hashlib.sha256(), hashlib.sha256()
    with Path(path).open("rb") as f:
        while first := f.read(1):
            key, raw = _stream_varint(f, first)
            number, wire = key >> 3, key & 7
            keep = number != METADATA_FIELD
            parts: list[bytes] = [raw]
            if wire == 0:
                second = f.read(1)
                if not second:
                    raise CardError("truncated protobuf varint: not an ONNX model")
                parts.append(_stream_varint(f, second)[1])
                body: Iterator[bytes] = iter(())
            elif wire in (1, 5):
                body = _chunks(f, 8 if wire == 1 else 4)
            elif wire == 2:
                second = f.read(1)
                if not second:
                    raise CardError("truncated protobuf message: not an ONNX model")
                n, raw_n = _stream_varint(f, second)
                parts.append(raw_n)
                body = _chunks(f, n)
            else:
                raise CardError(f"unsupported protobuf wire type {wire}: not an ONNX model")
            for chunk in (*parts, *body):
                whole.update(chunk)
                if keep:
                    weights.update(chunk)
    return FileDigests(whole.hexdigest(), weights.hexdigest())


def write_model(
    out: Path, model: bytes, card: ModelCard, extra: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """Write ``model`` with ``card`` (and other metadata entries) into ``out`` with the sidecar
    ``model.card.json`` and the Markdown ``model.card.md`` beside it, each file atomically.

    The card's ``weights_sha256`` must be the model's: a card is never put on other weights.

    Args:
        model: A serialized ONNX model (its own metadata entries are replaced).
        extra: Metadata entries besides the card (the input check, ...), kept as given.

    Returns:
        The sidecar: the card's public form plus the file's sha256, name and size.
    """
    from pneumonia import atomic

    digest = weights_digest(model)
    if card.weights_sha256 != digest:
        raise CardError(
            f"card weights_sha256 {card.weights_sha256[:12]}... is not the model's ({digest[:12]}...)"
        )
    raw = with_metadata(model, {CARD_METADATA_KEY: card.to_json(), **(extra or {})})
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_bytes(out, raw)
    identity = {"sha256": hashlib.sha256(raw).hexdigest(), "file": out.name, "bytes": len(raw)}
    sidecar = {**card.public(), **identity}
    atomic.write_text(sidecar_card_path(out), json.dumps(sidecar, indent=2) + "\n")
    atomic.write_text(markdown_card_path(out), render_markdown(card, identity))
    return sidecar


def read_model_card(path: Path) -> tuple[ModelCard, dict[str, str], bytes]:
    """(card, the other metadata entries, the file's bytes) of an ONNX file; raises CardError.

    The other entries (the input check, ...) are what a rewrite of the card carries along."""
    raw = Path(path).read_bytes()
    extra = read_metadata(raw)
    if CARD_METADATA_KEY not in extra:
        raise CardError(f"{path} carries no model card; export it with `pneumonia export`")
    card = ModelCard.from_json(extra.pop(CARD_METADATA_KEY))
    if card.weights_sha256 == NOT_RECORDED:  # a card older than the digest
        card = card.with_(weights_sha256=weights_digest(raw))
    return card, extra, raw


def rewrite_card(
    model: Path, out: Path, change: Callable[[ModelCard], ModelCard]
) -> dict[str, Any]:
    """Rewrite a file's card (``out`` may be ``model``): graph, weights and the other metadata
    entries are kept byte for byte, so the weights digest stays.

    Returns:
        The new sidecar.
    """
    card, extra, raw = read_model_card(model)
    return write_model(out, raw, change(card), extra)


# ----------------------------------------------------------------------------- Markdown


def fmt(x: Any, digits: int = 4) -> str:
    """A metric for a table; ``n/a`` where it is undefined (e.g. AUC on one class)."""
    if x is None:
        return "n/a"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def _counts(by_label: Mapping[str, int]) -> str:
    return ", ".join(f"{n} {label}" for label, n in by_label.items())


def _describe_arch(arch: Mapping[str, Any]) -> str:
    kind = arch.get("arch")
    if kind == "effnet_lite0":
        start = "ImageNet weights" if arch.get("pretrained", True) else "random weights"
        text = f"EfficientNet-Lite0 (fine-tuned end to end from {start}, gray stem)"
    elif kind == "cnn":
        text = f"compact CNN (channels {arch.get('channels')})"
    elif kind == "logreg":
        text = f"logistic regression on a {arch.get('logreg_grid')}x{arch.get('logreg_grid')} thumbnail"
    else:
        text = f"architecture {kind!r} (not recorded in detail)"
    if "members" in arch and "parameters" in arch:
        text += f", ensemble of {arch['members']}, {arch['parameters']:,} parameters"
    return text


def _stress_lines(stress: Mapping[str, Any] | None) -> list[str]:
    if not stress:
        return []
    lines = [
        "## Stressed validation (the validation split under fixed perturbations)",
        f"At the operating threshold {stress['threshold']:.4f}:",
        "",
        "| perturbation | ROC-AUC | sensitivity | specificity | normals called PNEUMONIA |",
        "|---|---|---|---|---|",
    ]
    for name, r in stress["perturbations"].items():
        lines.append(
            f"| {name} | {fmt(r['auc'])} | {fmt(r['sensitivity'], 3)} | "
            f"{fmt(r['specificity'], 3)} | {fmt(r['fpr_normals'], 3)} |"
        )
    w = stress["worst"]
    lines += [
        "",
        "Worst case: "
        + ", ".join(f"{k} {fmt(v['value'], 3)} ({v['perturbation']})" for k, v in w.items())
        + ".",
        "",
    ]
    return lines


def _shortcut_lines(rows: Sequence[Mapping[str, Any]] | None) -> list[str]:
    if not rows:
        return []
    cells = [
        f"{r['statistic']} {fmt(r['auc'], 2)}{' **(warning)**' if r['warning'] else ''}"
        for r in rows
    ]
    return [
        "- Shortcut check (ROC-AUC of one nuisance statistic alone as a PNEUMONIA score, folded to "
        f">= 0.5; warning above 0.7; `pneumonia data audit`): {', '.join(cells)}."
    ]


def comparison_table(
    rows: Sequence[tuple[str, Mapping[str, Any]]], references: Sequence[Reference] = ()
) -> str:
    """Markdown table: test figures of our models, then published references on the same set."""
    lines = [
        "| model | test ROC-AUC | accuracy | sensitivity | specificity |",
        "|---|---|---|---|---|",
    ]
    for label, r in rows:
        cells = [fmt(r[k], 3) for k in ("auc", "accuracy", "sensitivity", "specificity")]
        lines.append("| " + " | ".join([label, *cells]) + " |")
    lines += [
        f"| {r.label} (published) | {r.auc} | {r.accuracy} | {r.sensitivity} | {r.specificity} |"
        for r in references
    ]
    return "\n".join(lines) + "\n"


def _training_lines(card: ModelCard) -> list[str]:
    lines = ["## Training data"]
    ds = card.dataset
    if ds is None:
        lines.append("- Source: undeclared (trained without a dataset descriptor).")
    else:
        lines.append(f"- Source: {ds.name}: {ds.source}; licence {ds.licence}.")
        lines.append(f"- Population: {ds.population}.")
        if ds.citation:
            lines.append(f"- Citation: {ds.citation}.")
    data = (card.training or {}).get("data")
    if data:
        lines += [
            f"- Training split: {_counts(data['train'])} ({data['train_patients']} patients); "
            f"validation split ({data.get('split_description', 'patient-grouped')}): "
            f"{_counts(data['validation'])}.",
            f"- Unreadable files skipped: {len(data.get('skipped', []))}.",
            *_shortcut_lines(data.get("shortcuts")),
        ]
    else:
        lines.append("- The training split was not recorded in this card.")
    return [*lines, ""]


def render_markdown(
    card: ModelCard,
    identity: Mapping[str, Any] | None = None,
    test: Mapping[str, Any] | None = None,
    baseline: Mapping[str, Any] | None = None,
    previous: tuple[str, Mapping[str, Any]] | None = None,
    input_check: Mapping[str, Any] | None = None,
    looks: Any = None,
) -> str:
    """The Markdown model card.

    Args:
        card: The model's card.
        identity: The file's sha256, name and size (the sidecar's file fields).
        test: Its evaluation report on a held-out test set.
        baseline: The baseline's report on the same set.
        previous: (label, report) of the model this one replaces, on the same set.
        input_check: ``benchmarks/bench_guard.py``'s JSON for this file.
        looks: The test-look ledger (:class:`pneumonia.ledger.Ledger`); with ``test`` it says
            which look at that set the figures are. Required with ``test``.
    """
    ident = identity or {}
    v = card.validation_metrics or {}
    pp = card.preprocess
    tr = card.threshold_rule
    lines = [
        f"# Model card: {card.name} {card.version}",
        "",
        "## Intended use",
        INTENDED_USE,
        "",
        "## Limits",
        *[f"- {x}" for x in card.limitations()],
        "",
        "## Model",
        f"- File: `{ident.get('file', '?')}`, sha256 `{ident.get('sha256', '?')}`; weights sha256 "
        f"`{card.weights_sha256}` (the file without its metadata: unchanged when only the card changes).",
        f"- Architecture: {_describe_arch(card.architecture)}.",
        f"- Input: {pp['size']}x{pp['size']} grayscale, float32 in {pp['value_range']}, aspect ratio "
        f"{pp['resize']}ed, {pp['interpolation']} resampling; {pp['normalization']}.",
        f"- Output: calibrated P(PNEUMONIA) = {card.calibration_sentence()}.",
        f"- Operating threshold: **{card.threshold:.4f}** on P(PNEUMONIA): {tr.description()}.",
    ]
    # The chain runs parent by parent; an inherited relation was written by its child's card,
    # so its "this file" is that child: quoted as that card's words, not this card's.
    for i, ref in enumerate(card.lineage):
        child = None if i == 0 else card.lineage[i - 1]
        digests = f"weights sha256 `{ref.weights_sha256 or 'not recorded'}`" + (
            f", file sha256 `{ref.sha256}`" if ref.sha256 else ""
        )
        relation = ref.relation or "relation not recorded"
        if child is None:
            lines.append(f"- Comes from {ref.name} {ref.version} ({digests}): {relation}.")
        else:
            lines.append(
                f"- {child.name} {child.version} comes from {ref.name} {ref.version} ({digests}); "
                f'in its card\'s words: "{relation}".'
            )
    q = card.quantization
    if q:
        films = q.get("calibration_films") or {}
        lines.append(
            f"- Quantized: {q.get('method', 'method not recorded')}; weights "
            f"{q.get('weight_type')}{' per channel' if q.get('per_channel') else ''}, "
            f"activations {q.get('activation_type')} ({q.get('calibrate_method')} ranges from "
            f"{films.get('n', '?')} films: {films.get('chosen', 'not recorded')}); onnxruntime "
            f"{q.get('onnxruntime', '?')}. Refitted on its own outputs: "
            f"{q.get('refitted', 'not recorded')}."
        )
    lines += ["", *_training_lines(card)]
    if v:
        lines += [
            "## Validation metrics (the split the checkpoint, calibration and threshold were chosen on)",
            "| metric | value |",
            "|---|---|",
            *[f"| {k} | {fmt(x)} |" for k, x in v.items()],
            "",
        ]
    lines += _stress_lines(card.stressed_validation)
    if test is not None:
        if looks is None:
            raise ValueError("a test report needs the test-look ledger to say which look it is")
        lines += _test_lines(card, test, baseline, previous, looks)
    lines += input_check_section(card.input_check)
    if input_check is not None:
        lines += input_check_measured(input_check, ident.get("sha256"))[1:]
    if card.site_recalibration:
        from pneumonia.recalibrate import render_site_section

        lines += ["", render_site_section(card)]
    if card.site_adaptation:
        from pneumonia.adapt import render_adaptation_section

        lines += ["", render_adaptation_section(card)]
    if card.versions:
        lines += ["## Versions", *[f"- {k}: {x}" for k, x in card.versions.items()], ""]
    return "\n".join(lines)


def _test_lines(
    card: ModelCard,
    test: Mapping[str, Any],
    baseline: Mapping[str, Any] | None,
    previous: tuple[str, Mapping[str, Any]] | None,
    looks: Any,
) -> list[str]:
    from pneumonia.ledger import describe_look

    rows: list[tuple[str, Mapping[str, Any]]] = [(f"{card.name} {card.version} (this model)", test)]
    if previous is not None:
        rows.append(previous)
    if baseline is not None:
        rows.append(("Logistic-regression baseline (same code)", baseline))
    cm = test["confusion_matrix"]
    lo, hi = test.get("auc_ci95") or (None, None)
    f = {
        k: fmt(test[k])
        for k in (
            "auc",
            "threshold",
            "accuracy",
            "sensitivity",
            "specificity",
            "ppv",
            "npv",
            "f1",
            "brier",
            "ece",
        )
    }
    heading, note = describe_look(looks, card, test)
    refs = card.dataset.references if card.dataset else ()
    return [
        f"## Test set: {test['n']} images; {heading}",
        f"ROC-AUC {f['auc']} (95% bootstrap CI {fmt(lo)}-{fmt(hi)}); at threshold {f['threshold']}: "
        f"accuracy {f['accuracy']}, sensitivity {f['sensitivity']}, specificity {f['specificity']}, "
        f"PPV {f['ppv']}, NPV {f['npv']}, F1 {f['f1']}, Brier {f['brier']}, ECE {f['ece']}; "
        f"confusion tn={cm['tn']} fp={cm['fp']} fn={cm['fn']} tp={cm['tp']}.",
        "",
        note,
        "",
        comparison_table(rows, refs),
    ]


def card_fields() -> tuple[str, ...]:
    """Every stored field name of the card (for tests and docs)."""
    return tuple(f.name for f in fields(ModelCard))


def input_check_measured(bench: Mapping[str, Any], sha256: str | None) -> list[str]:
    """The card's table of the input check's measured rates, from ``benchmarks/bench_guard.py``'s
    JSON (refused per kind of non-radiograph, refused and flagged chest films)."""
    from pneumonia.guard import rates_table

    if sha256 and bench.get("model", {}).get("sha256") != sha256:
        raise ValueError("the input check report was measured on another model file")
    lines = [
        "",
        "Measured on this file by `benchmarks/bench_guard.py` (refusal turned into a flag so that "
        "every outcome is counted; the non-radiographs are an evaluation set the check was not "
        "designed on, docs/input_check.md):",
        "",
        *rates_table(bench.get("kinds", {}), bench.get("films", {})),
    ]
    return [*lines, ""]


def input_check_section(check: Mapping[str, Any] | None) -> list[str]:
    """The card's account of the input check: how it was fitted, its thresholds and rates."""
    lines = ["## Input check (refuses what is not a chest X-ray)"]
    if not check:
        return [*lines, "This model carries no input check: every image is classified.", ""]
    limits = check.get("image_checks", {})
    lines += [
        "Every image first passes fixed image checks: more than "
        f"{limits.get('max_colour_fraction', 0):.0%} coloured pixels, contrast under "
        f"{limits.get('min_contrast')}, pixel noise over {limits.get('max_noise')} of the contrast, "
        f"or over {limits.get('max_flat_share', 0):.0%} of the image in one flat tone is refused as "
        "not a chest X-ray.",
    ]
    if "flag_distance" not in check:
        return [
            *lines,
            "No feature statistics were fitted for this model (`pneumonia guard fit` was not "
            "run): no distance check applies.",
            *(_frontal_lines(check["frontal"]) if check.get("frontal") else []),
            "",
        ]
    q = check.get("validation_distance_quantiles", {})
    lines += [
        f"- Then a {check['method']} ({check['dim']} features, {check['components']} principal "
        f"directions), fitted on {check.get('n_train')} films: "
        f"{check.get('fitted_on', 'not recorded')}.",
        f"- Flagged as unlike the training films above distance {check['flag_distance']:.4f} "
        f"({check.get('flag_rule')}).",
    ]
    if "mid_dim" in check:
        mq = check.get("mid_validation_distance_quantiles", {})
        lines.append(
            f"- And the same distance in the network's mid-level feature statistics "
            f"({check['mid_dim']} features, {check['mid_components']} principal directions): "
            f"flagged above {check['mid_flag_distance']:.4f} (the same rule), refused as not a "
            f"chest X-ray above {check['refuse_distance']:.4f} ({check.get('refuse_rule')}; set by "
            f"{check.get('refuse_set_by')}; validation median {mq.get('0.5', float('nan')):.4f})."
        )
    else:
        lines.append(
            f"- Refused as not a chest X-ray above {check['refuse_distance']:.4f} "
            f"({check.get('refuse_rule')})."
        )
    lines += [
        f"- Validation films ({check.get('n_validation')}): median distance "
        f"{q.get('0.5', float('nan')):.4f}, maximum {q.get('1.0', float('nan')):.4f}; "
        f"{check.get('validation_flagged', 0):.1%} flagged, "
        f"{check.get('validation_refused', 0):.1%} refused by the feature distance.",
        *_frontal_lines(check.get("frontal")),
        "- It is a screen, not a guarantee: an unusual film can be flagged or refused, and an "
        "image that is not a chest X-ray can pass. Operators can turn refusal into a flag "
        "(`INPUT_CHECK=flag`).",
        "",
    ]
    return lines


def _frontal_lines(frontal: Mapping[str, Any] | None) -> list[str]:
    """The frontal-chest check's line in the card (pneumonia.frontal's summary)."""
    if not frontal:
        return ["- No frontal-chest check: other radiographs are only flagged by the distances."]
    fitted_on = frontal.get("fitted_on") or {}
    cv = frontal.get("cross_validated") or {}
    counts = frontal.get("counts") or {}
    return [
        f"- Then the frontal-chest check, a {frontal.get('method')} over the classes "
        f"{', '.join(frontal.get('classes', []))}: refused as `not_a_frontal_chest_xray` when the "
        f"frontal class's log-odds are under {frontal['refuse_logit']:.3f}, flagged under "
        f"{frontal['flag_logit']:.3f} ({frontal.get('rule', 'rule not recorded')}).",
        f"- Fitted on frontal chest films of {fitted_on.get('frontal_chest', 'not recorded')} and "
        f"negatives from {fitted_on.get('negatives', 'not recorded')} "
        f"({', '.join(f'{k} {v}' for k, v in counts.items())}); cross-validated refusal of chest "
        f"films: {', '.join(f'{k} {v:.2%}' for k, v in cv.items())}. DICOM headers naming another "
        "body part, a lateral view or another modality are refused by the header alone "
        "(`INPUT_CHECK_HEADERS=ignore` turns that off).",
    ]
