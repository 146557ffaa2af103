"""One output row per image, and the function every engine uses to make them."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from pneumonia.guard import NotAChestXrayError
from pneumonia.predictor import Prediction, Predictor

log = logging.getLogger(__name__)

#: Columns after the key column ("path" or "id"), in file order.
VALUE_COLUMNS = (
    "sha256",
    "prediction",
    "p_normal",
    "p_pneumonia",
    "threshold",
    "model_sha256",
    "input_check",
    "error",
)


class ScoreError(ValueError):
    """A scoring job that cannot start or continue; the message says what to change."""


class Item(NamedTuple):
    """One image to score: its key and a file to read, the bytes themselves, or (a MedMNIST
    .npz image) its uint8 grayscale pixels; or, for what the source already knows it will not
    score (a lateral film from a PACS), the row's ``error`` ("code: message")."""

    key: str
    path: str | None = None
    data: bytes | None = None
    pixels: np.ndarray | None = None
    error: str | None = None


class ScoreRow(NamedTuple):
    """One image's result. ``error`` ("code: message") is set when it could not be scored.

    ``input_check`` is the input check's outcome (pneumonia.guard): ``typical``,
    ``unlike_training`` (scored, but unlike the films the model was validated on) or
    ``not_a_chest_xray`` or ``not_a_frontal_chest_xray`` (an error row, or scored and flagged
    with ``--flag-only``); empty for files that could not be read or decoded."""

    key: str
    sha256: str | None
    prediction: str | None
    p_normal: float | None
    p_pneumonia: float | None
    threshold: float
    model_sha256: str
    input_check: str | None
    error: str | None

    @property
    def error_code(self) -> str | None:
        return self.error.split(":", 1)[0] if self.error else None


def columns(key_name: str) -> tuple[str, ...]:
    """Column names of an output file keyed by ``key_name``."""
    return (key_name, *VALUE_COLUMNS)


def _error_row(
    predictor: Predictor,
    key: str,
    sha256: str | None,
    code: str,
    message: str,
    input_check: str | None = None,
) -> ScoreRow:
    return ScoreRow(
        key,
        sha256,
        None,
        None,
        None,
        predictor.threshold,
        predictor.sha256,
        input_check,
        f"{code}: {message}",
    )


def score_items(predictor: Predictor, items: Sequence[Item]) -> list[ScoreRow]:
    """Read, preprocess and classify ``items`` as one batch, in order.

    An image that cannot be read or decoded becomes a row with ``error`` set; nothing here
    raises for a bad file, so one broken film never stops an archive.
    """
    rows: list[ScoreRow | None] = [None] * len(items)
    inputs: list[bytes | np.ndarray] = []
    good: list[tuple[int, str]] = []
    for i, item in enumerate(items):
        if item.error is not None:
            code, _, message = item.error.partition(": ")
            rows[i] = _error_row(predictor, item.key, None, code, message)
            continue
        if item.pixels is not None:
            inputs.append(item.pixels)
            good.append((i, hashlib.sha256(item.pixels.tobytes()).hexdigest()))
            continue
        try:  # read here, not by the predictor: the row names the file's digest
            data = item.data if item.path is None else Path(item.path).read_bytes()
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            rows[i] = _error_row(
                predictor, item.key, None, "unreadable_file", f"cannot read the file: {reason}"
            )
            continue
        data = data or b""
        inputs.append(data)
        good.append((i, hashlib.sha256(data).hexdigest()))
    for (i, sha), p in zip(good, predictor.predict(inputs), strict=True):
        if not isinstance(p, Prediction):  # undecodable, or refused by the input check
            refused = p.code if isinstance(p, NotAChestXrayError) else None
            rows[i] = _error_row(predictor, items[i].key, sha, p.code, p.message, refused)
            continue
        rows[i] = ScoreRow(
            items[i].key,
            sha,
            p.label,
            p.p_normal,
            p.p_pneumonia,
            p.threshold,
            predictor.sha256,
            p.check.outcome if p.check is not None else None,
            None,
        )
    return [r for r in rows if r is not None]
