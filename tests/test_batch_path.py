"""The one batch path (issue 23): ``Predictor.predict`` decodes, batches, runs and answers per
item for the service, ``pneumonia predict``, ``score``, ``evaluate`` and ``recalibrate``; an
error in one image never loses the others."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from conftest import jpeg_bytes, make_split
from pneumonia.cli import main
from pneumonia.data import list_split, score_samples
from pneumonia.predictor import BATCH, ItemError, Prediction, Predictor
from pneumonia.preprocess import ImageError
from pneumonia.recalibrate import recalibrate_model
from pneumonia.score.rows import Item, score_items
from pneumonia.serve.app import create_app
from pneumonia.serve.inference import predict_job
from pneumonia.serve.settings import Settings

#: What makes the decoder itself fail (not a bad image): a bug must cost one item, not a batch.
EXPLODING = b"\xff\xd8\xff boom"


@pytest.fixture()
def predictor(tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> Predictor:
    p = Predictor(tiny_model, threads=1, refuse=False)
    real = Predictor.prepare

    def prepare(self: Predictor, data: bytes, view_side: int | None = None) -> Any:
        if data == EXPLODING:
            raise RuntimeError("decoder bug with /secret/path")
        return real(self, data, view_side)

    monkeypatch.setattr(Predictor, "prepare", prepare)
    return p


@pytest.fixture()
def spy(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Batch sizes of every call into ``Predictor.predict`` (the one batch path)."""
    calls: list[int] = []
    real = Predictor.predict

    def predict(self: Predictor, items: Any, **kw: Any) -> Iterator[Any]:
        items = list(items)
        calls.append(len(items))
        return real(self, items, **kw)

    monkeypatch.setattr(Predictor, "predict", predict)
    return calls


def _good(i: int) -> bytes:
    return jpeg_bytes(label=i % 2, seed=300 + i)


def test_each_item_gets_its_own_outcome_in_order(predictor: Predictor, tmp_path: Path) -> None:
    items = [_good(0), b"not an image", tmp_path / "missing.jpeg", EXPLODING, _good(1)]
    out = list(predictor.predict(items))
    assert [type(o).__name__ for o in out] == [
        "Prediction",
        "UnsupportedFormatError",
        "ItemError",
        "ItemError",
        "Prediction",
    ]
    assert isinstance(out[2], ItemError) and out[2].code == "unreadable_file"
    assert isinstance(out[3], ItemError) and out[3].code == "internal_error"
    assert "secret" not in out[3].message and "RuntimeError" not in out[3].message
    # The good images' answers are what they get alone: the bad ones cost nothing.
    for i, o in ((0, out[0]), (1, out[4])):
        assert isinstance(o, Prediction)
        assert o.p_pneumonia == predictor.predict_bytes(_good(i)).p_pneumonia


@pytest.mark.parametrize("batch", [BATCH, 4])
def test_more_items_than_a_batch_stream_in_order(tiny_model: Path, batch: int) -> None:
    predictor = Predictor(tiny_model, threads=1, refuse=False, batch=batch)
    n = batch * 2 + 3
    images = [_good(i % 5) for i in range(n)]
    images[batch] = b""  # an empty file at a batch boundary
    out = list(predictor.predict(iter(images)))  # any iterable, consumed a batch at a time
    assert len(out) == n and isinstance(out[batch], ImageError)
    alone = {i: predictor.predict_bytes(_good(i)).p_pneumonia for i in range(5)}
    for i, o in enumerate(out):
        if i != batch:
            assert isinstance(o, Prediction) and o.p_pneumonia == pytest.approx(alone[i % 5])


def test_arrays_and_decoded_images_take_the_same_path(predictor: Predictor) -> None:
    data = _good(0)
    pre = predictor.prepare(data)
    a, b = predictor.predict([data, pre])
    assert isinstance(a, Prediction) and isinstance(b, Prediction)
    assert a.p_pneumonia == b.p_pneumonia and a.check == b.check
    scores = predictor.scores(pre.input[None], [pre.stats])
    assert scores.probabilities[0] == a.p_pneumonia and scores.checks[0] == a.check


def test_refusal_is_per_item(predictor: Predictor) -> None:
    page = np.full((200, 200), 255, np.uint8)  # a blank page: refused by the image checks
    out = list(predictor.predict([_good(0), page, _good(1)], refuse=True))
    assert isinstance(out[0], Prediction) and isinstance(out[2], Prediction)
    assert isinstance(out[1], ImageError) and out[1].code == "not_a_chest_xray"
    (flagged,) = predictor.predict([page], refuse=False)
    assert isinstance(flagged, Prediction) and flagged.check is not None


def test_service_batch_keeps_the_others_when_one_breaks_the_decoder(
    predictor: Predictor, tiny_model: Path, spy: list[int]
) -> None:
    job = predict_job(predictor, [_good(0), EXPLODING, _good(1)])
    assert spy == [3]
    assert [type(o).__name__ for o in job.outcomes] == ["Prediction", "ItemError", "Prediction"]
    app = create_app(Settings(model_path=tiny_model))
    with TestClient(app) as c:
        for _ in range(200):
            if c.get("/ready").status_code == 200:
                break
        files = [
            ("files", (f"{i}.jpeg", d, "image/jpeg"))
            for i, d in enumerate([_good(0), EXPLODING, _good(1)])
        ]
        resp = c.post("/predict/batch", files=files)
        assert resp.status_code == 200
        results = resp.json()["results"]
        assert [("error" in r) for r in results] == [False, True, False]
        assert results[1]["error"]["code"] == "internal_error"
        assert "secret" not in resp.text
        one = c.post("/predict", files={"file": ("x.jpeg", EXPLODING, "image/jpeg")})
        assert one.status_code == 500 and one.json()["error"]["code"] == "internal_error"
        assert "secret" not in one.text


def test_score_rows_go_through_the_batch_path(predictor: Predictor, spy: list[int]) -> None:
    items = [
        Item("a", data=_good(0)),
        Item("b", data=EXPLODING),
        Item("c", pixels=np.full((64, 64), 90, np.uint8)),
        Item("d", error="not_a_frontal_chest_xray: a lateral view"),
    ]
    rows = score_items(predictor, items)
    assert spy == [3]  # the row with its error already never reaches the model
    assert [r.key for r in rows] == ["a", "b", "c", "d"]
    assert rows[0].error is None and rows[2].error is None
    assert rows[1].error_code == "internal_error" and rows[1].sha256 is not None
    assert rows[3].error_code == "not_a_frontal_chest_xray"


def test_evaluate_and_recalibrate_go_through_the_batch_path(
    tiny_model: Path, tmp_path: Path, spy: list[int]
) -> None:
    data = make_split(tmp_path / "data" / "test", 6, seed=7).parent
    broken = data / "test" / "NORMAL" / "IM-9999-0000.jpeg"
    broken.write_bytes(b"\xff\xd8\xff truncated")
    report = tmp_path / "eval.json"
    assert main(["evaluate", "--model", str(tiny_model), "--data", str(data), "--json",
                 str(report), "--no-progress"]) == 0  # fmt: skip
    assert spy == [13]
    got = json.loads(report.read_text())
    assert got["n"] == 12 and [p for p, _ in got["skipped"]] == [str(broken)]
    assert got["input_check"]["colour_checked"] is True

    spy.clear()
    samples = list_split(data / "test")
    scored = score_samples(Predictor(tiny_model), samples)
    assert spy == [13] and len(scored.predictions) == 12 and len(scored.skipped) == 1
    # Evaluation scores every film, refused or not: the input check only flags there.
    assert all(isinstance(p, Prediction) for p in scored.predictions)

    spy.clear()
    recalibrate_model(tiny_model, data, tmp_path / "site.onnx", split="test", folds=2, n_boot=5)
    assert spy == [13]


def test_the_service_calls_the_model_one_image_at_a_time(
    tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """onnxruntime's arena keeps the largest call's activations for good: a batch upload run
    as one call would grow the service's memory for the rest of its life."""
    from pneumonia.serve.settings import load_predictor

    p = load_predictor(Settings(model_path=tiny_model))
    sizes: list[int] = []
    real = p.session.run

    def run(names: Any, feed: dict[str, np.ndarray]) -> Any:
        sizes.append(len(feed["image"]))
        return real(names, feed)

    monkeypatch.setattr(p, "session", type("S", (), {"run": staticmethod(run)})())
    job = predict_job(p, [_good(i) for i in range(5)])
    assert sizes == [1] * 5 and all(isinstance(o, Prediction) for o in job.outcomes)
    with pytest.raises(ValueError, match="batch"):
        Predictor(tiny_model, batch=0)
