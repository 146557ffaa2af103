"""The frontal-chest check (pneumonia.frontal): its own outcome and 422 code on every path.

A head is fitted here on the tiny model's features of synthetic stand-ins (a frontal film, a
lateral view, a limb, a CT slice), then written into a copy of the model file, so that the
whole path runs: decode, features, the head, the service, batch, ``predict``, ``score`` and
``evaluate``. The DICOM header rule and the two escapes (flag only, ignore headers) too.
"""

from __future__ import annotations

import csv
import json
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from benchmarks.common import dicom_bytes
from conftest import encode, synthetic_xray
from pneumonia.card import CARD_METADATA_KEY, FRONTAL_METADATA_KEY, file_digests
from pneumonia.frontal import (
    CLASSES,
    FRONTAL_CHEST,
    LATERAL_CHEST,
    NOT_A_RADIOGRAPH,
    OTHER_BODY_PART,
    OTHER_MODALITY,
    FrontalCheck,
    FrontalVerdict,
    combine,
    fit_frontal_check,
    group_weights,
    header_reasons,
    write_frontal_check,
)
from pneumonia.guard import (
    NOT_A_CHEST_XRAY,
    NOT_A_FRONTAL_CHEST_XRAY,
    TYPICAL,
    UNLIKE_TRAINING,
    InputCheck,
    NotAFrontalChestXrayError,
)
from pneumonia.predictor import Predictor
from pneumonia.preprocess import DecodeStats, HeaderFacts, decode_image

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

SIZE = 96


def _soft(img: Image.Image, radius: float = 2.0) -> np.ndarray:
    return np.asarray(img.filter(ImageFilter.GaussianBlur(radius)), dtype=np.float32)


def _grain(arr: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.clip(arr + rng.normal(0, 6, arr.shape), 0, 255).astype(np.uint8)


def lateral(seed: int) -> np.ndarray:
    """A lateral chest stand-in: one wide lung field, the spine as a bright band at one side."""
    rng = np.random.default_rng(seed)
    img = Image.new("L", (SIZE, SIZE), 150)
    d = ImageDraw.Draw(img)
    x0 = int(rng.integers(12, 22))
    d.ellipse((x0, 14, x0 + 52, 84), fill=45)
    d.rectangle((78, 0, 92, SIZE), fill=225)
    for y in range(4, SIZE, 11):
        d.rectangle((76, y, 94, y + 3), fill=245)
    return _grain(_soft(img, 2.5), rng)


def limb(seed: int) -> np.ndarray:
    """Another body part: bright bones in a soft-tissue sleeve on a black background."""
    rng = np.random.default_rng(seed)
    img = Image.new("L", (SIZE, SIZE), 8)
    d = ImageDraw.Draw(img)
    cx = int(rng.integers(36, 60))
    d.rectangle((cx - 22, 0, cx + 22, SIZE), fill=90)
    d.rectangle((cx - 9, 0, cx - 2, SIZE), fill=235)
    d.rectangle((cx + 3, 0, cx + 8, SIZE), fill=215)
    d.ellipse((cx - 14, 40, cx + 14, 58), fill=240)
    return _grain(_soft(img, 1.5), rng)


def ct_slice(seed: int) -> np.ndarray:
    """Another modality: a round body section with a bright rim, black around it."""
    rng = np.random.default_rng(seed)
    img = Image.new("L", (SIZE, SIZE), 0)
    d = ImageDraw.Draw(img)
    r = int(rng.integers(34, 44))
    c = SIZE // 2
    d.ellipse((c - r, c - r, c + r, c + r), fill=230)
    d.ellipse((c - r + 5, c - r + 5, c + r - 5, c + r - 5), fill=110)
    d.ellipse((c - 16, c - 10, c - 4, c + 14), fill=30)
    d.ellipse((c + 4, c - 10, c + 16, c + 14), fill=30)
    return _grain(_soft(img, 1.0), rng)


STAND_INS = {
    FRONTAL_CHEST: lambda seed: synthetic_xray(seed % 2, seed),
    LATERAL_CHEST: lateral,
    OTHER_BODY_PART: limb,
    OTHER_MODALITY: ct_slice,
}


def png(arr: np.ndarray) -> bytes:
    return encode(arr, "PNG")


# --- the head and its verdicts, on features made here ---


def _check(dim: int = 3, refuse: float = -1.0, flag: float = 1.0) -> FrontalCheck:
    """Feature k (k < 3) votes for class k + 1 against frontal; all zero reads frontal."""
    w = np.zeros((len(CLASSES), dim), np.float32)
    for k in range(min(dim, len(CLASSES) - 1)):
        w[k + 1, k] = 1.0
    return FrontalCheck(
        mean=np.zeros(dim, np.float32),
        scale=np.ones(dim, np.float32),
        weights=w,
        bias=np.array([4.0, 0, 0, 0, -20], np.float32),
        refuse_logit=refuse,
        flag_logit=flag,
    )


def test_verdicts_name_the_most_likely_other_class_and_the_log_odds() -> None:
    check = _check()
    f = np.array([[0, 0, 0], [9, 0, 0], [0, 9, 0], [0, 0, 9], [3.5, 0, 0]], np.float32)
    v = check.verdicts(f)
    assert [x.looks_like for x in v[1:4]] == [LATERAL_CHEST, OTHER_BODY_PART, OTHER_MODALITY]
    assert v[0].logit > check.flag_logit
    assert v[1].logit < check.refuse_logit
    assert check.refuse_logit < v[4].logit < check.flag_logit  # the flag band
    # log-odds of p(frontal) against all others, as softmax probabilities give it
    z = check.class_logits(f)
    p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(check.frontal_logits(f), np.log(p[:, 0] / (1 - p[:, 0])), rtol=1e-6)


@pytest.mark.parametrize(
    ("looks_like", "outcome", "words"),
    [
        (LATERAL_CHEST, NOT_A_FRONTAL_CHEST_XRAY, "a lateral chest view"),
        (OTHER_BODY_PART, NOT_A_FRONTAL_CHEST_XRAY, "another body part"),
        (OTHER_MODALITY, NOT_A_FRONTAL_CHEST_XRAY, "another modality"),
        (NOT_A_RADIOGRAPH, NOT_A_CHEST_XRAY, "not a radiograph at all"),
    ],
)
def test_a_refusal_says_what_the_image_looks_like(
    looks_like: str, outcome: str, words: str
) -> None:
    check = _check()
    base = InputCheck(TYPICAL, 0.5, (), 0.3)
    out = combine(base, FrontalVerdict(-5.0, looks_like), check)
    assert out.outcome == outcome and out.refused
    assert words in out.message and out.score == 0.5 and out.refusal_score == 0.3
    err = out.error()
    assert err.code == outcome and err.message == out.message
    if outcome == NOT_A_FRONTAL_CHEST_XRAY:
        assert isinstance(err, NotAFrontalChestXrayError)
        assert "send a frontal (PA or AP) chest radiograph" in out.message


def test_the_flag_band_answers_with_a_warning_and_a_frontal_film_is_untouched() -> None:
    check = _check()
    base = InputCheck(TYPICAL, 0.5, (), 0.3)
    flagged = combine(base, FrontalVerdict(0.0, OTHER_BODY_PART), check)
    assert flagged.outcome == UNLIKE_TRAINING and not flagged.refused
    assert "may not be a frontal chest film" in flagged.message
    assert combine(base, FrontalVerdict(3.0, LATERAL_CHEST), check) is base
    # No head (a model without one): only the header can refuse.
    assert combine(base, None, None) is base


def test_what_the_input_check_refuses_as_no_chest_xray_stays_so() -> None:
    base = InputCheck(NOT_A_CHEST_XRAY, 3.0, ("it looks like noise",), 2.0)
    assert combine(base, FrontalVerdict(-9.0, LATERAL_CHEST), _check(), ["header"]) is base


def test_the_check_round_trips_and_corrupt_ones_are_refused() -> None:
    check = _check(dim=5)
    back = FrontalCheck.from_json(check.to_json())
    for a in ("mean", "scale", "weights", "bias"):
        np.testing.assert_array_equal(getattr(back, a), getattr(check, a))
    assert (back.refuse_logit, back.flag_logit, back.classes) == (-1.0, 1.0, CLASSES)
    d = check.to_dict()
    for bad, match in (
        ({**d, "format": 9}, "format"),
        ({**d, "dim": 4}, "values"),
        ({**d, "classes": ["lateral_chest", "frontal_chest"]}, "classes"),
        ({**d, "flag_logit": -2.0}, "thresholds"),
    ):
        with pytest.raises(ValueError, match=match):
            FrontalCheck.from_dict(bad)
    with pytest.raises(ValueError, match="not JSON"):
        FrontalCheck.from_json("{")
    with pytest.raises(ValueError, match="reads 5"):
        check.frontal_logits(np.zeros((1, 3)))


def test_the_fit_separates_classes_and_weights_each_group_alike() -> None:
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 3, (4, 12))
    x = np.concatenate(
        [c + rng.normal(0, 1, (n, 12)) for c, n in zip(centres, (200, 9, 9, 9), strict=True)]
    )
    y = np.repeat([0, 1, 2, 3], (200, 9, 9, 9))
    groups = ["a"] * 150 + ["b"] * 50 + ["lat"] * 9 + ["knee"] * 5 + ["skull"] * 4 + ["ct"] * 9
    w = group_weights(y.tolist(), groups)
    assert w[:150].sum() == pytest.approx(w[150:200].sum())  # two sources of one class
    assert w[:200].sum() == pytest.approx(w[200:209].sum())  # every class the same total
    check = fit_frontal_check(x, y.tolist(), groups, refuse_logit=0.0, flag_logit=1.0)
    test = np.concatenate([c + rng.normal(0, 1, (20, 12)) for c in centres])
    v = check.verdicts(test)
    assert all(x.logit > 0 for x in v[:20]) and all(x.logit < 0 for x in v[20:])
    assert [x.looks_like for x in v[20:40]] == [LATERAL_CHEST] * 20
    assert [x.looks_like for x in v[60:]] == [OTHER_MODALITY] * 20
    with pytest.raises(ValueError, match="under refuse_logit"):
        fit_frontal_check(x, y.tolist(), groups, refuse_logit=1.0, flag_logit=0.0)


# --- the DICOM header rule ---


def _dicom(**attrs: Any) -> bytes:
    return dicom_bytes(synthetic_xray(0, 5).astype(np.uint16) * 16, **attrs)


@pytest.mark.parametrize(
    ("attrs", "words"),
    [
        ({"BodyPartExamined": "KNEE"}, "BodyPartExamined KNEE"),
        ({"BodyPartExamined": "SKULL "}, "BodyPartExamined SKULL"),
        ({"ViewPosition": "LL"}, "ViewPosition LL, a lateral view"),
        ({"ViewPosition": "LATERAL"}, "a lateral view"),
        ({"Modality": "CT"}, "Modality CT"),
    ],
)
def test_a_dicom_header_naming_another_part_view_or_modality_is_a_reason(
    attrs: dict[str, str], words: str
) -> None:
    _, stats = decode_image(_dicom(**attrs))
    (reason,) = header_reasons(stats)
    assert words in reason


def test_a_chest_header_or_none_is_no_reason() -> None:
    _, stats = decode_image(_dicom(BodyPartExamined="CHEST", ViewPosition="PA"))
    assert stats.header == HeaderFacts("CHEST", "PA", "CR") and header_reasons(stats) == []
    # An unknown or local spelling is not held against the film; nor a format without headers.
    assert header_reasons(DecodeStats(0.0, HeaderFacts("TORAX", "AP", "DX"))) == []
    assert header_reasons(DecodeStats(0.0)) == [] and header_reasons(None) == []
    _, png_stats = decode_image(png(synthetic_xray(0, 5)))
    assert png_stats.header is None


# --- a fitted head in a model file, on every path ---


def _features(p: Predictor, images: list[np.ndarray]) -> np.ndarray:
    x = np.stack([p.prepare(png(a)).input for a in images])
    emb = p.scores(x).features
    assert emb is not None
    return emb


@pytest.fixture(scope="module")
def frontal_model(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the tiny model with a head fitted on its features of the stand-ins."""
    folder = tmp_path_factory.mktemp("frontal")
    out = folder / "model.onnx"
    shutil.copy(tiny_model, out)
    shutil.copy(tiny_model.with_suffix(".card.json"), out.with_suffix(".card.json"))
    p = Predictor(out)
    feats, classes, groups = [], [], []
    for cls, make in STAND_INS.items():
        n = 40 if cls == FRONTAL_CHEST else 16
        feats.append(_features(p, [make(100 + i) for i in range(n)]))
        classes += [CLASSES.index(cls)] * n
        groups += [cls] * n
    check = fit_frontal_check(
        np.concatenate(feats), classes, groups, refuse_logit=-1.0, flag_logit=-0.5, iterations=300
    )
    write_frontal_check(out, check)
    return out


def test_the_check_round_trips_through_the_model_file_untouched_otherwise(
    tiny_model: Path, frontal_model: Path
) -> None:
    import onnx

    p = Predictor(frontal_model)  # the sidecar card's sha256 was updated with the file
    assert p.frontal is not None and p.frontal.dim == _features(p, [lateral(1)]).shape[1]
    before, after = onnx.load(str(tiny_model)), onnx.load(str(frontal_model))
    assert before.graph.SerializeToString() == after.graph.SerializeToString()
    digests = file_digests(tiny_model), file_digests(frontal_model)
    assert digests[0].weights_sha256 == digests[1].weights_sha256
    assert digests[0].sha256 != digests[1].sha256
    meta = {e.key: e.value for e in after.metadata_props}
    old = {e.key: e.value for e in before.metadata_props}
    assert {k: v for k, v in old.items() if k != CARD_METADATA_KEY}.items() <= meta.items()
    # The card changes in one place only: it says the file carries the check.
    card_before, card_after = (
        json.loads(old[CARD_METADATA_KEY]),
        json.loads(meta[CARD_METADATA_KEY]),
    )
    assert card_after["input_check"].pop("frontal") == p.frontal.summary()
    assert card_after == card_before
    assert "the frontal-chest check" in frontal_model.with_suffix(".card.md").read_text()
    stored = FrontalCheck.from_json(meta[FRONTAL_METADATA_KEY])
    np.testing.assert_array_equal(stored.weights, p.frontal.weights)
    # Written twice: one entry, the latest.
    write_frontal_check(frontal_model, stored)
    keys = [e.key for e in onnx.load(str(frontal_model)).metadata_props]
    assert keys.count(FRONTAL_METADATA_KEY) == 1


def test_a_model_without_the_check_loads_and_a_mismatched_one_is_refused(
    tiny_model: Path, frontal_model: Path, tmp_path: Path
) -> None:
    from pneumonia.predictor import ModelLoadError

    assert Predictor(tiny_model).frontal is None
    bad = tmp_path / "bad.onnx"
    shutil.copy(tiny_model, bad)
    with pytest.raises(ValueError, match="width"):
        write_frontal_check(bad, _check(dim=3))
    import onnx

    proto = onnx.load(str(bad))
    entry = proto.metadata_props.add()
    entry.key, entry.value = FRONTAL_METADATA_KEY, _check(dim=3).to_json()
    onnx.save(proto, str(bad))
    with pytest.raises(ModelLoadError, match="frontal-chest check reads 3"):
        Predictor(bad)


@pytest.mark.parametrize("cls", list(STAND_INS))
def test_held_out_stand_ins_get_their_outcome(frontal_model: Path, cls: str) -> None:
    p = Predictor(frontal_model, refuse=False)
    preds = [p.predict_bytes(png(STAND_INS[cls](900 + i))) for i in range(6)]
    checks = [x.check for x in preds if x.check is not None]
    if cls == FRONTAL_CHEST:
        assert all(c.outcome in (TYPICAL, UNLIKE_TRAINING) for c in checks)
    else:
        assert [c.outcome for c in checks] == [NOT_A_FRONTAL_CHEST_XRAY] * 6
        words = {LATERAL_CHEST: "lateral", OTHER_BODY_PART: "body part"}.get(cls, "modality")
        assert all(words in c.message for c in checks)


def test_predictor_refuses_and_the_header_rule_and_escapes_hold(frontal_model: Path) -> None:
    p = Predictor(frontal_model)
    with pytest.raises(NotAFrontalChestXrayError, match="lateral chest view"):
        p.predict_bytes(png(lateral(7)))
    film = _dicom()
    assert p.predict_bytes(film).check.outcome in (TYPICAL, UNLIKE_TRAINING)  # type: ignore[union-attr]
    knee = _dicom(BodyPartExamined="KNEE")
    with pytest.raises(NotAFrontalChestXrayError, match="BodyPartExamined KNEE"):
        p.predict_bytes(knee)
    # Headers ignored: the same file is judged by its image, a frontal film.
    ignoring = Predictor(frontal_model, use_headers=False)
    assert ignoring.predict_bytes(knee).check.outcome in (TYPICAL, UNLIKE_TRAINING)  # type: ignore[union-attr]
    # Flag only: answered, with the outcome.
    flagging = Predictor(frontal_model, refuse=False)
    check = flagging.predict_bytes(_dicom(ViewPosition="RL")).check
    assert check is not None and check.outcome == NOT_A_FRONTAL_CHEST_XRAY


def serve(model: Path, **settings: Any) -> Any:
    from test_serve_api import serve as _serve

    return _serve(model, **settings)


@pytest.fixture(scope="module")
def client(frontal_model: Path) -> Iterator[TestClient]:
    with serve(frontal_model) as c:
        yield c


def test_service_answers_422_not_a_frontal_chest_xray(client: TestClient) -> None:
    r = client.post("/predict", files={"file": ("knee.png", png(limb(3)), "image/png")})
    assert r.status_code == 422
    body = r.json()
    assert set(body) == {"error"} and body["error"]["code"] == NOT_A_FRONTAL_CHEST_XRAY
    assert "another body part" in body["error"]["message"]
    r = client.post(
        "/predict", files={"file": ("film.png", png(synthetic_xray(1, 8)), "image/png")}
    )
    assert r.status_code == 200 and r.json()["input_check"]["outcome"] in (TYPICAL, UNLIKE_TRAINING)


def test_batch_gives_each_refused_file_its_code_and_metrics_count_them(
    frontal_model: Path,
) -> None:
    with serve(frontal_model) as c:
        files = [
            ("files", ("film.png", png(synthetic_xray(0, 9)), "image/png")),
            ("files", ("lateral.png", png(lateral(4)), "image/png")),
            ("files", ("knee.dcm", _dicom(BodyPartExamined="KNEE"), "application/dicom")),
        ]
        r = c.post("/predict/batch", files=files)
        assert r.status_code == 200
        film, lat, knee = r.json()["results"]
        metrics = c.get("/metrics").text
    assert film["input_check"]["outcome"] in (TYPICAL, UNLIKE_TRAINING)
    assert lat["error"]["code"] == knee["error"]["code"] == NOT_A_FRONTAL_CHEST_XRAY
    assert "BodyPartExamined KNEE" in knee["error"]["message"]
    line = 'pneumonia_input_check_total{outcome="not_a_frontal_chest_xray",action="refused"} 2'
    assert line in metrics
    assert 'pneumonia_image_errors_total{code="not_a_frontal_chest_xray"} 2' in metrics


def test_service_settings_flag_and_ignore_headers(frontal_model: Path) -> None:
    with serve(frontal_model, input_check="flag") as c:
        r = c.post("/predict", files={"file": ("ct.png", png(ct_slice(2)), "image/png")})
        assert r.status_code == 200, r.text
        assert r.json()["input_check"]["outcome"] == NOT_A_FRONTAL_CHEST_XRAY
        assert "another modality" in r.json()["input_check"]["message"]
    knee = _dicom(BodyPartExamined="KNEE")
    with serve(frontal_model, input_check_headers="ignore") as c:
        r = c.post("/predict", files={"file": ("knee.dcm", knee, "application/dicom")})
        assert r.status_code == 200, r.text
    from pydantic import ValidationError

    from pneumonia.serve.settings import Settings

    assert Settings(input_check_headers="IGNORE").input_check_headers == "ignore"
    with pytest.raises(ValidationError, match="input_check_headers"):
        Settings(input_check_headers="off")


def test_score_predict_and_evaluate_count_the_new_outcome(
    frontal_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from pneumonia.cli import main

    folder = tmp_path / "archive"
    folder.mkdir()
    (folder / "film.png").write_bytes(png(synthetic_xray(1, 11)))
    (folder / "lateral.png").write_bytes(png(lateral(5)))
    (folder / "knee.dcm").write_bytes(_dicom(BodyPartExamined="KNEE"))
    model = ["--model", str(frontal_model)]
    out = tmp_path / "scores.csv"
    assert main(["score", str(folder), "--out", str(out), *model, "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["errors"] == {NOT_A_FRONTAL_CHEST_XRAY: 2}
    rows = {r["path"]: r for r in csv.DictReader(out.open())}
    for name in ("lateral.png", "knee.dcm"):
        assert rows[name]["error"].startswith("not_a_frontal_chest_xray: ")
        assert rows[name]["input_check"] == NOT_A_FRONTAL_CHEST_XRAY
    # --ignore-headers with two workers: the knee DICOM is judged by its (frontal) image.
    ignored = tmp_path / "ignored.csv"
    args = ["score", str(folder), "--out", str(ignored), *model, "--workers", "2"]
    assert main([*args, "--ignore-headers", "--no-progress"]) == 0
    rows = {r["path"]: r for r in csv.DictReader(ignored.open())}
    assert rows["knee.dcm"]["error"] == "" and rows["lateral.png"]["error"] != ""
    capsys.readouterr()
    # --flag-only: scored, flagged, counted.
    flagged = tmp_path / "flagged.csv"
    args = ["score", str(folder), "--out", str(flagged), *model, "--flag-only", "--no-progress"]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["input_check"][NOT_A_FRONTAL_CHEST_XRAY] == 2 and summary["errors"] == {}

    lat = str(folder / "lateral.png")
    assert main(["predict", *model, lat]) == 1
    assert json.loads(capsys.readouterr().out)["error"]["code"] == NOT_A_FRONTAL_CHEST_XRAY
    assert main(["predict", *model, "--flag-only", lat]) == 0
    assert json.loads(capsys.readouterr().out)["input_check"]["outcome"] == (
        NOT_A_FRONTAL_CHEST_XRAY
    )
    knee = str(folder / "knee.dcm")
    assert main(["predict", *model, "--ignore-headers", knee]) == 0
    capsys.readouterr()

    data = tmp_path / "eval"
    for label in ("NORMAL", "PNEUMONIA"):
        (data / label).mkdir(parents=True)
        for i in range(3):
            (data / label / f"f{i}.png").write_bytes(
                png(synthetic_xray(label == "PNEUMONIA", 40 + i))
            )
    Image.fromarray(lateral(6)).save(data / "NORMAL" / "lateral.png")
    report = tmp_path / "report.json"
    args = ["evaluate", *model, "--data", str(data), "--json", str(report), "--no-progress"]
    assert main(args) == 0
    counts = json.loads(report.read_text())["input_check"]
    assert counts[NOT_A_FRONTAL_CHEST_XRAY] == 1 and counts["frontal_check"] is True


def test_the_api_schema_lists_every_outcome() -> None:
    from typing import get_args

    from pneumonia.guard import OUTCOMES
    from pneumonia.serve.schemas import InputCheckResult

    assert set(get_args(InputCheckResult.model_fields["outcome"].annotation)) == set(OUTCOMES)


NOT_FRONTAL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "not_frontal_chest"


@pytest.mark.skipif(not NOT_FRONTAL.is_dir(), reason="needs ../shared/data/not_frontal_chest")
def test_the_shipped_model_carries_the_check_and_refuses_a_knee_and_a_lateral_view() -> None:
    p = Predictor(Path(__file__).resolve().parents[1] / "artifacts" / "model.onnx")
    assert p.frontal is not None and p.frontal.refuse_logit < p.frontal.flag_logit
    for group, words in (("knee", "another body part"), ("lateral_chest", "lateral chest view")):
        image = sorted((NOT_FRONTAL / group).iterdir())[0]
        with pytest.raises(NotAFrontalChestXrayError, match=words):
            p.predict_bytes(image.read_bytes())
