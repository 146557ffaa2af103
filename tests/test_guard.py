"""The input check (pneumonia.guard): what it refuses, flags and lets through, on every path.

Synthetic radiograph-like films pass; colour photos, text pages, blank and noise images made
here are refused as not chest X-rays; a film far from the training films' features is flagged.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from conftest import encode, jpeg_bytes, synthetic_xray
from pneumonia.card import (
    read_model_card,
    read_sidecar,
    render_markdown,
    weights_digest,
    write_model,
)
from pneumonia.guard import (
    NOT_A_CHEST_XRAY,
    TYPICAL,
    UNLIKE_TRAINING,
    FeatureGuard,
    Ppca,
    fit_feature_guard,
    image_reasons,
)
from pneumonia.predictor import Predictor
from pneumonia.preprocess import PreprocessSpec, decode_image, resize_gray

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

SPEC = PreprocessSpec(size=64)


def colour_photo(seed: int = 0, size: int = 160) -> np.ndarray:
    """Smooth colourful blobs over a sky-like gradient: a stand-in for a holiday photo."""
    rng = np.random.default_rng(seed)
    noise = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    blobs = np.asarray(Image.fromarray(noise).filter(ImageFilter.GaussianBlur(6)), dtype=np.float32)
    blobs = (blobs - blobs.min((0, 1))) / np.ptp(blobs, axis=(0, 1)) * 255
    sky = np.linspace([90, 150, 230], [40, 120, 40], size)[:, None, :]
    return np.clip(0.5 * blobs + 0.5 * sky, 0, 255).astype(np.uint8)


def text_page(size: tuple[int, int] = (300, 400)) -> np.ndarray:
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    for y in range(20, size[1] - 20, 14):
        d.text((12, y), "Request for chest radiograph: patient, date, findings", fill="black")
    return np.asarray(img)


def png(arr: np.ndarray) -> bytes:
    return encode(arr, "PNG")


def model_input(data: bytes) -> tuple[np.ndarray, Any]:
    gray, stats = decode_image(data, draft_size=SPEC.size)
    return resize_gray(gray, SPEC), stats


def test_image_checks_pass_radiograph_like_films() -> None:
    for seed in range(12):
        x, stats = model_input(jpeg_bytes(label=seed % 2, seed=seed))
        assert stats.colour_fraction == 0.0
        assert image_reasons(x, stats) == []


@pytest.mark.parametrize(
    ("name", "make", "reason"),
    [
        ("colour photo", lambda: png(colour_photo()), ("coloured",)),
        ("colour photo as JPEG", lambda: encode(colour_photo(), "JPEG", quality=90), ("coloured",)),
        # Shrunk to the input size, lines of text are either one flat tone or a fine texture.
        ("text page", lambda: png(text_page()), ("flat tone", "noise")),
        ("blank", lambda: png(np.full((100, 100), 200, np.uint8)), ("blank",)),
        (
            "noise",
            lambda: png(np.random.default_rng(0).integers(0, 256, (128, 128), dtype=np.uint8)),
            ("noise",),
        ),
    ],
)
def test_image_checks_refuse_what_is_not_a_radiograph(
    name: str, make: Any, reason: tuple[str, ...]
) -> None:
    x, stats = model_input(make())
    reasons = image_reasons(x, stats)
    assert any(word in r for r in reasons for word in reason), (name, reasons)


def test_colour_is_counted_before_the_gray_conversion_and_a_gray_film_saved_as_rgb_has_none() -> (
    None
):
    film = synthetic_xray(1, 3, 96)
    rgb = np.repeat(film[..., None], 3, axis=-1)  # how the Kermany copies are saved
    for data in (encode(rgb, "JPEG"), png(rgb)):
        assert decode_image(data, draft_size=64)[1].colour_fraction == 0.0
    assert decode_image(png(colour_photo()), draft_size=64)[1].colour_fraction > 0.3
    # The gray image the model sees is unchanged by counting colour: a YCbCr draft's Y is
    # exactly libjpeg's gray decode, which the decoder used before.
    data = encode(colour_photo(), "JPEG", quality=90)
    gray, _ = decode_image(data, draft_size=64)
    img = Image.open(io.BytesIO(data))
    img.draft("L", (64, 64))
    np.testing.assert_array_equal(gray, np.asarray(img, dtype=np.float32) / 255)


def _features(rng: np.random.Generator, n: int, basis: np.ndarray) -> np.ndarray:
    return rng.normal(size=(n, basis.shape[0])) @ basis + 0.1 * rng.normal(size=(n, basis.shape[1]))


def _off_axis(g: Ppca, rng: np.random.Generator, distance: float) -> np.ndarray:
    """A point ``distance`` (in Ppca.distance units) from the mean, off its principal directions."""
    u = rng.normal(size=g.dim)
    u -= g.components.T @ (g.components @ u)
    u /= np.linalg.norm(u)
    out: np.ndarray = g.mean + distance * np.sqrt(g.dim * g.residual_variance) * u
    return out


def test_format1_guard_flags_unusual_and_refuses_far_features_and_round_trips() -> None:
    rng = np.random.default_rng(0)
    basis = rng.normal(size=(8, 40))
    train, val = _features(rng, 400, basis), _features(rng, 200, basis)
    g = fit_feature_guard(train, val, components=8, fitted={"fitted_on": "synthetic"})
    assert g.mid is None and g.dim == 40
    assert g.fitted["n_train"] == 400 and g.refuse_distance == pytest.approx(2 * g.flag_distance)
    d_val = g.head.distance(val)
    assert (d_val > g.flag_distance).mean() <= 0.01 and g.fitted["validation_flagged"] <= 0.01
    # A point 1.5 flag distances out, off the training films' principal directions: flagged.
    unusual = _off_axis(g.head, rng, 1.5 * g.flag_distance)
    far = 20 * rng.normal(size=(5, 40))
    typical = val[d_val < g.flag_distance][:5]
    checks = g.check(np.concatenate([typical, unusual[None], far]), [[]] * 11)
    assert [c.outcome for c in checks] == [TYPICAL] * 5 + [UNLIKE_TRAINING] + [NOT_A_CHEST_XRAY] * 5
    assert checks[5].score == pytest.approx(1.5, rel=1e-3)
    assert all(c.score is not None and c.score > 2 for c in checks[6:])
    assert all(c.refusal_score is not None and c.refusal_score > 1 for c in checks[6:])
    # Image-check reasons refuse whatever the features say.
    assert g.check(typical[:1], [["blank"]])[0].outcome == NOT_A_CHEST_XRAY
    back = FeatureGuard.from_dict(json.loads(json.dumps(g.to_dict())))
    np.testing.assert_allclose(back.head.distance(far), g.head.distance(far), rtol=1e-6)
    assert back.fitted == json.loads(json.dumps(g.fitted))
    # A file written by the first format (head statistics at the top level) still loads.
    old = {
        "format": 1,
        **g.head.to_dict(),
        **{k: v for k, v in g.to_dict().items() if k.endswith("distance")},
    }
    old_guard = FeatureGuard.from_dict(json.loads(json.dumps(old)))
    assert [c.outcome for c in old_guard.check(far, [[]] * 5)] == [NOT_A_CHEST_XRAY] * 5


def test_mid_level_distance_refuses_beyond_the_farthest_shifted_validation_film() -> None:
    rng = np.random.default_rng(3)
    head_basis, mid_basis = rng.normal(size=(6, 30)), rng.normal(size=(4, 20))

    def rows(n: int, mid_scale: float = 1.0) -> np.ndarray:
        return np.concatenate(
            [_features(rng, n, head_basis), mid_scale * _features(rng, n, mid_basis)], axis=1
        )

    train, val = rows(500), rows(200)
    shifted = {"wider": rows(200, 1.3), "blur": rows(200, 0.8)}
    g = fit_feature_guard(train, val, components=6, head_dim=30, shifted=shifted, mid_components=4)
    assert g.mid is not None and g.dim == 50 and g.head.dim == 30
    # The refusal distance is the farthest any validation film gets, shifted or not.
    every = np.concatenate([val, *shifted.values()])
    _, mid_all = g.distances(every)
    assert mid_all is not None and g.refuse_distance == pytest.approx(mid_all.max())
    assert g.fitted["refuse_set_by"] == "wider" and g.fitted["validation_refused"] == 0.0
    assert not any(c.outcome == NOT_A_CHEST_XRAY for c in g.check(every, [[]] * len(every)))
    # Far in the mid-level features: refused, whatever the head features say.
    typical_head = val[:1, :30]
    far_mid = _off_axis(g.mid, rng, 1.5 * g.refuse_distance)[None]
    c = g.check(np.concatenate([typical_head, far_mid], axis=1), [[]])[0]
    assert c.outcome == NOT_A_CHEST_XRAY and c.refusal_score == pytest.approx(1.5, rel=1e-3)
    assert "mid-level" in c.message
    # Far in the head features only: a radiograph unlike the training films, not refused.
    far_head = _off_axis(g.head, rng, 5 * g.flag_distance)[None]
    c = g.check(np.concatenate([far_head, val[:1, 30:]], axis=1), [[]])[0]
    assert c.outcome == UNLIKE_TRAINING and c.score == pytest.approx(5, rel=1e-3)
    # Between the mid-level flag and refusal distances: flagged.
    assert g.mid_flag_distance is not None and g.mid_flag_distance < g.refuse_distance
    between = _off_axis(g.mid, rng, (g.mid_flag_distance + g.refuse_distance) / 2)[None]
    c = g.check(np.concatenate([val[:1, :30], between], axis=1), [[]])[0]
    assert c.outcome == UNLIKE_TRAINING and 0 < (c.refusal_score or 0) < 1
    back = FeatureGuard.from_dict(json.loads(json.dumps(g.to_dict())))
    np.testing.assert_allclose(back.distances(every)[1], mid_all, rtol=1e-6)
    with pytest.raises(ValueError, match="shifted"):
        fit_feature_guard(train, val, head_dim=30)
    with pytest.raises(ValueError, match="reads 50"):
        g.check(train[:2, :30], [[], []])


def test_feature_guard_refuses_corrupt_statistics() -> None:
    rng = np.random.default_rng(1)
    d = fit_feature_guard(
        rng.normal(size=(30, 6)), rng.normal(size=(10, 6)), components=3
    ).to_dict()
    with pytest.raises(ValueError, match="input check"):
        FeatureGuard.from_dict({**d, "head": {**d["head"], "components_k": 4}})
    with pytest.raises(ValueError, match="input check"):
        FeatureGuard.from_dict({**d, "flag_distance": -1.0})
    with pytest.raises(ValueError, match="input check"):
        FeatureGuard.from_dict({**d, "format": 7})


# --- a tiny model with a fitted input check, through export, the service, score and the CLI ---


@pytest.fixture(scope="module")
def guarded_model(guarded_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pneumonia.training.export import export_run

    out = tmp_path_factory.mktemp("guarded-model") / "model.onnx"
    export_run(guarded_run, out, name="pneumonia-tiny-guarded")
    return out


def test_fitted_statistics_round_trip_through_export(
    guarded_run: Path, guarded_model: Path
) -> None:
    fitted = FeatureGuard.from_dict(json.loads((guarded_run / "guard.json").read_text()))
    p = Predictor(guarded_model)
    assert p.guard is not None
    np.testing.assert_array_equal(p.guard.head.components, fitted.head.components)
    assert p.guard.mid is not None and fitted.mid is not None
    np.testing.assert_array_equal(p.guard.mid.components, fitted.mid.components)
    assert p.guard.refuse_distance == fitted.refuse_distance
    assert p.guard.flag_distance == fitted.flag_distance
    card = json.loads(guarded_model.with_suffix(".card.json").read_text())
    check = card["input_check"]
    assert (
        check["n_train"] == fitted.fitted["n_train"]
        and check["flag_distance"] == fitted.flag_distance
    )
    assert "training split" in check["fitted_on"]
    assert "Input check" in guarded_model.with_suffix(".card.md").read_text()
    # The features the model gives are the ones the statistics were fitted on.
    x = np.stack([p.prepare(jpeg_bytes(label=i % 2, seed=100 + i)).input for i in range(6)])
    emb = p.scores(x).features
    assert emb is not None and emb.shape == (6, fitted.dim)


def test_stale_statistics_are_refused_at_export(guarded_run: Path, tmp_path: Path) -> None:
    from pneumonia.training.export import export_run

    run = tmp_path / "run"
    shutil.copytree(guarded_run, run)
    g = json.loads((run / "guard.json").read_text())
    g["fitted"]["members_sha256"] = ["0" * 64]
    (run / "guard.json").write_text(json.dumps(g))
    with pytest.raises(ValueError, match="guard fit"):
        export_run(run, tmp_path / "m.onnx")


def test_a_model_without_the_embedding_output_still_loads_with_image_checks_only(
    tiny_model: Path, tmp_path: Path
) -> None:
    import onnx

    proto = onnx.load(str(tiny_model))
    keep = [o for o in proto.graph.output if o.name != "embedding"]
    del proto.graph.output[:]
    proto.graph.output.extend(keep)
    old = tmp_path / "old.onnx"
    # The graph changed, so the card must name the new weights digest (pneumonia.card).
    card, extra, _ = read_model_card(tiny_model)
    raw = proto.SerializeToString()
    write_model(
        old,
        raw,
        card.with_(weights_sha256=weights_digest(raw)),
        extra,
    )
    p = Predictor(old)
    assert p.guard is None and p.output_names == ("logit", "cam")
    pred = p.predict_bytes(jpeg_bytes())
    assert pred.check is not None and pred.check.outcome == TYPICAL and pred.check.score is None
    with pytest.raises(Exception, match="chest X-ray"):
        p.predict_bytes(png(text_page()))


def serve(model: Path, **settings: Any) -> Any:
    from test_serve_api import serve as _serve

    return _serve(model, **settings)


@pytest.fixture(scope="module")
def guarded_client(guarded_model: Path) -> Iterator[TestClient]:
    with serve(guarded_model) as c:
        yield c


def test_predict_refuses_a_photo_with_422_not_a_chest_xray(guarded_client: TestClient) -> None:
    r = guarded_client.post(
        "/predict", files={"file": ("holiday.png", png(colour_photo()), "image/png")}
    )
    assert r.status_code == 422
    body = r.json()
    assert set(body) == {"error"} and body["error"]["code"] == "not_a_chest_xray"
    assert "does not look like a chest X-ray" in body["error"]["message"]
    assert "send a frontal chest radiograph" in body["error"]["message"]


def test_predict_answers_a_film_with_its_input_check(guarded_client: TestClient) -> None:
    r = guarded_client.post(
        "/predict", files={"file": ("film.jpeg", jpeg_bytes(label=1, seed=7), "image/jpeg")}
    )
    assert r.status_code == 200, r.text
    check = r.json()["input_check"]
    assert check["outcome"] in (TYPICAL, UNLIKE_TRAINING)
    assert isinstance(check["score"], float) and isinstance(check["message"], str)
    # Below 1: not refused; the mid-level distance it reads is in the exported graph.
    assert isinstance(check["refusal_score"], float) and 0 < check["refusal_score"] <= 1
    assert {"prediction", "probability", "probabilities", "threshold"} <= set(r.json())


def test_batch_gives_the_refused_file_its_error_and_metrics_count_both(guarded_model: Path) -> None:
    with serve(guarded_model) as c:
        files = [
            ("files", ("film.jpeg", jpeg_bytes(label=0, seed=3), "image/jpeg")),
            ("files", ("page.png", png(text_page()), "image/png")),
        ]
        r = c.post("/predict/batch", files=files)
        assert r.status_code == 200
        film, page = r.json()["results"]
        assert film["input_check"]["outcome"] in (TYPICAL, UNLIKE_TRAINING)
        assert page == {
            "filename": "page.png",
            "error": {"code": "not_a_chest_xray", "message": page["error"]["message"]},
        }
        metrics = c.get("/metrics").text
    assert 'pneumonia_input_check_total{outcome="not_a_chest_xray",action="refused"} 1' in metrics
    assert 'pneumonia_image_errors_total{code="not_a_chest_xray"} 1' in metrics
    assert any(
        line.startswith("pneumonia_input_check_total{outcome=") and 'action="answered"' in line
        for line in metrics.splitlines()
    )


def test_input_check_flag_setting_answers_instead_of_refusing(guarded_model: Path) -> None:
    with serve(guarded_model, input_check="flag") as c:
        r = c.post("/predict", files={"file": ("page.png", png(text_page()), "image/png")})
        assert r.status_code == 200, r.text
        assert r.json()["input_check"]["outcome"] == NOT_A_CHEST_XRAY
        assert "does not look like a chest X-ray" in r.json()["input_check"]["message"]
        metrics = c.get("/metrics").text
    assert 'pneumonia_input_check_total{outcome="not_a_chest_xray",action="answered"} 1' in metrics


def test_input_check_setting_is_validated() -> None:
    from pydantic import ValidationError

    from pneumonia.serve.settings import Settings

    assert Settings(input_check="FLAG").input_check == "flag"
    with pytest.raises(ValidationError, match="input_check"):
        Settings(input_check="off")


def test_score_rows_carry_the_refusal_as_their_error_or_flag_it(
    guarded_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from pneumonia.cli import main

    folder = tmp_path / "archive"
    folder.mkdir()
    (folder / "film.jpeg").write_bytes(jpeg_bytes(label=1, seed=11))
    (folder / "page.png").write_bytes(png(text_page()))
    (folder / "blank.png").write_bytes(png(np.zeros((80, 80), np.uint8)))
    out = tmp_path / "scores.csv"
    assert (
        main(
            [
                "score",
                str(folder),
                "--out",
                str(out),
                "--model",
                str(guarded_model),
                "--workers",
                "1",
                "--no-progress",
            ]
        )
        == 0
    )
    import csv

    rows = {r["path"]: r for r in csv.DictReader(out.open())}
    assert rows["film.jpeg"]["error"] == "" and rows["film.jpeg"]["prediction"] in (
        "NORMAL",
        "PNEUMONIA",
    )
    assert rows["film.jpeg"]["input_check"] in (TYPICAL, UNLIKE_TRAINING)
    for name in ("page.png", "blank.png"):
        assert (
            rows[name]["error"].startswith("not_a_chest_xray: ") and rows[name]["prediction"] == ""
        )
        assert rows[name]["input_check"] == NOT_A_CHEST_XRAY
    # --flag-only: the same images scored, flagged, in a fresh output; the summary counts them.
    flagged = tmp_path / "flagged.csv"
    args = ["score", str(folder), "--out", str(flagged), "--model", str(guarded_model)]
    assert main([*args, "--workers", "2", "--flag-only", "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["input_check"][NOT_A_CHEST_XRAY] == 2 and summary["errors"] == {}
    rows = {r["path"]: r for r in csv.DictReader(flagged.open())}
    for name in ("page.png", "blank.png"):
        assert rows[name]["error"] == "" and rows[name]["prediction"] in ("NORMAL", "PNEUMONIA")
        assert rows[name]["input_check"] == NOT_A_CHEST_XRAY


def test_cli_predict_refuses_or_flags(
    guarded_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from pneumonia.cli import main

    page = tmp_path / "page.png"
    page.write_bytes(png(text_page()))
    film = tmp_path / "film.jpeg"
    film.write_bytes(jpeg_bytes())
    assert main(["predict", "--model", str(guarded_model), str(film), str(page)]) == 1
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert "input_check" in lines[0] and lines[1]["error"]["code"] == "not_a_chest_xray"
    assert main(["predict", "--model", str(guarded_model), "--flag-only", str(page)]) == 0
    (line,) = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert line["input_check"]["outcome"] == NOT_A_CHEST_XRAY


def test_cli_evaluate_reports_how_many_it_would_refuse(
    guarded_model: Path, synthetic_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from pneumonia.cli import main

    data = tmp_path / "eval"
    shutil.copytree(synthetic_root / "test", data)
    (data / "NORMAL" / "page.png").write_bytes(png(text_page()))
    out = tmp_path / "report.json"
    assert (
        main(
            [
                "evaluate",
                "--model",
                str(guarded_model),
                "--data",
                str(data),
                "--json",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    counts = json.loads(out.read_text())["input_check"]
    assert counts["not_a_chest_xray"] >= 1 and counts["feature_check"] is True
    assert sum(counts[o] for o in (TYPICAL, UNLIKE_TRAINING, NOT_A_CHEST_XRAY)) == 25
    assert (
        json.loads(capsys.readouterr().out.splitlines()[-1])["input_check"]["not_a_chest_xray"] >= 1
    )


def test_card_shows_the_measured_rates_of_this_file_only(guarded_model: Path) -> None:
    card, ident = read_sidecar(guarded_model.with_suffix(".card.json"))
    rates = {"n": 4, "refused": 3, "flagged": 1, "refused_rate": 0.75, "flagged_rate": 0.25}
    bench = {
        "model": {"sha256": ident["sha256"]},
        "kinds": {"photo": rates, "all": rates},
        "films": {"validation": {**rates, "refused": 0, "refused_rate": 0.0}},
    }
    text = render_markdown(card, ident, input_check=bench)
    assert "| non-radiographs: photo | 4 | 3 (75.0%) | 1 |" in text
    assert "| validation films | 4 | 0 (0.00%) | 1 (25.00%) |" in text
    with pytest.raises(ValueError, match="another model file"):
        render_markdown(card, ident, input_check={**bench, "model": {"sha256": "0" * 64}})


def test_a_failed_export_leaves_the_previous_model_whole(
    guarded_run: Path, guarded_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pneumonia import atomic
    from pneumonia.training.export import export_run

    out = tmp_path / "served.onnx"
    shutil.copy(guarded_model, out)
    shutil.copy(guarded_model.with_suffix(".card.json"), out.with_suffix(".card.json"))
    before = out.read_bytes()
    real = atomic.replacing

    def fail_midway(path: Path) -> Any:
        with real(path) as f:
            f.write(b"half a model")
            raise OSError("disk full")
        yield  # pragma: no cover

    monkeypatch.setattr(atomic, "replacing", contextlib.contextmanager(fail_midway))
    with pytest.raises(OSError, match="disk full"):
        export_run(guarded_run, out)
    assert out.read_bytes() == before and Predictor(out).guard is not None
    assert [p.name for p in tmp_path.iterdir() if p.suffix == ".tmp"] == []
