"""``pneumonia adapt``: a site's own head on the base model's features, served as it is.

The base model here is a tiny ONNX graph built in the test: a feature map of four channels
(brightness, vertical stripes, horizontal stripes, brightness again) pooled into the
penultimate features, mid-level statistics of a second convolution, and a head that reads
brightness only. At the synthetic site, PNEUMONIA films carry vertical stripes: a label the
base head ignores and its features hold.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import threading
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from pneumonia.cli import main
from pneumonia.predictor import Predictor

onnx = pytest.importorskip("onnx")

SIZE = 64
HEAD_DIM = 4


def _film(label: int, seed: int, stripes: bool) -> np.ndarray:
    """A film-like uint8 image (tests/conftest.py's synthetic X-ray) at the model's size, with
    faint vertical stripes when ``stripes``."""
    from tests.conftest import synthetic_xray

    big = Image.fromarray(synthetic_xray(label, seed, 4 * SIZE))  # resized: less pixel noise
    img = np.asarray(big.resize((SIZE, SIZE), Image.Resampling.BOX), np.float32) / 255
    if stripes:
        img[:, ::4] += 0.03
        img[:, 1::4] += 0.03
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def _png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def _graph(extra_meta: dict[str, str], members: int = 1) -> bytes:
    """The tiny base graph (no card yet): image -> logit, cam, embedding. With two members
    the CAM is the mean of two maps (as an exported ensemble's is)."""
    from onnx import TensorProto, helper, numpy_helper

    k1 = np.zeros((HEAD_DIM, 1, 4, 4), np.float32)
    k1[0] = 1 / 16  # brightness
    k1[1, 0, :, [0, 1]] = 1 / 8  # vertical stripes: left half minus right half
    k1[1, 0, :, [2, 3]] = -1 / 8
    k1[2, 0, [0, 1], :] = 1 / 8  # horizontal stripes
    k1[2, 0, [2, 3], :] = -1 / 8
    k1[3] = 1 / 16
    # Mid-level: 4 x 4 windows that sum whole stripe periods, so they cannot see the stripes.
    k2 = np.zeros((3, 1, 4, 4), np.float32)
    k2[0] = 1 / 16
    k2[1, 0, :2, :], k2[1, 0, 2:, :] = 1 / 8, -1 / 8
    k2[2, 0, :2, :2], k2[2, 0, 2:, 2:] = 1 / 4, 1 / 4
    w_head = np.array([4.0, 0.0, 0.0, 0.0], np.float32)  # reads brightness only
    inits = [
        numpy_helper.from_array(k1, "k1"),
        numpy_helper.from_array(k2, "k2"),
        numpy_helper.from_array(w_head, "w_head"),
        numpy_helper.from_array(np.array(-2.0, np.float32), "b_head"),
        numpy_helper.from_array(np.array(0.5, np.float32), "half"),
    ]
    nodes = [
        helper.make_node("Conv", ["image", "k1"], ["conv1"], strides=[4, 4]),
        helper.make_node("Relu", ["conv1"], ["fmap"]),
        helper.make_node("Einsum", ["fmap", "w_head"], ["cam0"], equation="nchw,c->nhw"),
        *(
            [
                helper.make_node("Einsum", ["fmap", "w_head"], ["cam1"], equation="nchw,c->nhw"),
                helper.make_node("Add", ["cam0", "cam1"], ["cam2"]),
                helper.make_node("Mul", ["cam2", "half"], ["cam_m"]),
            ]
            if members == 2
            else [helper.make_node("Identity", ["cam0"], ["cam_m"])]
        ),
        helper.make_node("Add", ["cam_m", "b_head"], ["cam"]),
        helper.make_node("ReduceMean", ["cam"], ["logit"], axes=[1, 2], keepdims=0),
        helper.make_node("ReduceMean", ["fmap"], ["pen"], axes=[2, 3], keepdims=0),
        helper.make_node("Conv", ["image", "k2"], ["conv2"], strides=[4, 4]),
        helper.make_node("ReduceMean", ["conv2"], ["m2"], axes=[2, 3], keepdims=1),
        helper.make_node("Sub", ["conv2", "m2"], ["d2"]),
        helper.make_node("Mul", ["d2", "d2"], ["sq2"]),
        helper.make_node("ReduceMean", ["sq2"], ["v2"], axes=[2, 3], keepdims=0),
        helper.make_node("Sqrt", ["v2"], ["s2"]),
        helper.make_node("ReduceMean", ["conv2"], ["mean2"], axes=[2, 3], keepdims=0),
        helper.make_node("Concat", ["pen", "mean2", "s2"], ["embedding"], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny-base",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, SIZE, SIZE])],
        [
            helper.make_tensor_value_info("logit", TensorProto.FLOAT, ["N"]),
            helper.make_tensor_value_info("cam", TensorProto.FLOAT, ["N", SIZE // 4, SIZE // 4]),
            helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", HEAD_DIM + 6]),
        ],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    for k, v in extra_meta.items():
        model.metadata_props.add(key=k, value=v)
    return bytes(model.SerializeToString())


@pytest.fixture(scope="module")
def base_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny base model with a card and an input check fitted on stripe-free films."""
    return build_base(tmp_path_factory.mktemp("base") / "base.onnx")


def build_base(out: Path, members: int = 1) -> Path:
    """Write the tiny base model (``members`` as in :func:`_graph`) with its card and check."""
    from pneumonia.card import Calibration, ModelCard, ThresholdChoice, weights_digest, write_model
    from pneumonia.guard import fit_feature_guard
    from pneumonia.preprocess import PreprocessSpec, preprocess_bytes
    from pneumonia.shifts import SITE_SHIFTS, shifted_batches

    spec = PreprocessSpec(size=SIZE)
    raw = _graph({}, members)
    ort = pytest.importorskip("onnxruntime")
    sess = ort.InferenceSession(raw, providers=["CPUExecutionProvider"])

    def emb(x: np.ndarray) -> np.ndarray:
        return np.asarray(sess.run(["embedding"], {"image": x})[0])

    films = np.stack(
        [preprocess_bytes(_png(_film(i % 2, 500 + i, False)), spec) for i in range(80)]
    )
    shifted = {
        k: emb(np.concatenate(list(shifted_batches(films[60:], k, 0, table=SITE_SHIFTS))))
        for k in SITE_SHIFTS
    }
    guard = fit_feature_guard(emb(films[:60]), emb(films[60:]), head_dim=HEAD_DIM, shifted=shifted)
    card = ModelCard(
        name="tiny-base",
        version="0.1.0",
        created="2026-01-01T00:00:00+00:00",
        threshold=0.5,
        threshold_rule=ThresholdChoice("youden", None, "synthetic films"),
        calibration=Calibration(1.0, 0.0, "synthetic films"),
        preprocess=spec.to_dict(),
        input={"name": "image", "dtype": "float32", "shape": ["N", 1, SIZE, SIZE]},
        outputs={"logit": "raw logit", "cam": "map", "embedding": "features"},
        architecture={"arch": "tiny test graph"},
        weights_sha256=weights_digest(raw),
        input_check=guard.summary(),
    )
    extra = {
        "frontal_check": _frontal_check(emb, films).to_json(),
        "input_guard": json.dumps(guard.to_dict()),
    }
    write_model(out, raw, card, extra)
    return out


def _lateral(seed: int) -> np.ndarray:
    """A stand-in for a lateral view: a striped film turned a quarter (horizontal stripes)."""
    return np.ascontiguousarray(_film(0, seed, True).T)


def _frontal_check(emb: Any, films: np.ndarray) -> Any:
    """A frontal-chest check on the base's features: films with and without vertical stripes
    are frontal, films with horizontal stripes lateral views."""
    from pneumonia.frontal import CLASSES, LATERAL_CHEST, fit_frontal_check
    from pneumonia.preprocess import PreprocessSpec, preprocess_bytes

    spec = PreprocessSpec(size=SIZE)
    striped = [preprocess_bytes(_png(_film(i % 2, 700 + i, True)), spec) for i in range(30)]
    lateral = [preprocess_bytes(_png(_lateral(800 + i)), spec) for i in range(30)]
    f = np.concatenate([emb(films[:60]), emb(np.stack(striped)), emb(np.stack(lateral))])
    y = [0] * 90 + [CLASSES.index(LATERAL_CHEST)] * 30
    groups = ["plain"] * 60 + ["striped"] * 30 + ["lateral"] * 30
    return fit_frontal_check(f, y, groups, refuse_logit=0.0, flag_logit=0.0, iterations=300)


def make_site(folder: Path, n_per_class: int = 30, seed: int = 7) -> Path:
    """``folder/{NORMAL,PNEUMONIA}`` PNGs, two films per patient (Kermany-style names); the
    PNEUMONIA films carry the stripes, and both classes the same brightness."""
    for label, name in enumerate(("NORMAL", "PNEUMONIA")):
        d = folder / name
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            patient = 100 * (label + 1) + i // 2
            fname = f"person{patient}_virus_{i}.png"
            # Both classes drawn as NORMAL films: the base head (brightness) cannot tell them.
            (d / fname).write_bytes(_png(_film(0, seed * 1000 + label * 500 + i, bool(label))))
    return folder


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_site(tmp_path_factory.mktemp("site"))


@pytest.fixture(scope="module")
def adapted(
    base_model: Path, site: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("adapted") / "site.onnx"
    report = out.with_name("report.json")
    args = ["adapt", "--model", str(base_model), "--data", str(site), "--out", str(out)]
    assert main([*args, "--bootstrap", "50", "--report", str(report), "--no-progress"]) == 0
    return out, json.loads(report.read_text())


def test_adapt_recovers_a_label_the_base_head_ignores_and_recalibrate_cannot(
    adapted: tuple[Path, dict], base_model: Path, site: Path, tmp_path: Path
) -> None:
    _, report = adapted
    assert report["base_on_site"]["auc"] < 0.75
    assert report["cross_validated"]["auc"] > 0.95
    assert report["head"]["features"] in ("all", "penultimate")  # the stripes are penultimate
    # recalibrate keeps the base ranking: it cannot find the stripes.
    rec = tmp_path / "recal.onnx"
    assert main(["recalibrate", "--model", str(base_model), "--data", str(site), "--out", str(rec),
                 "--threshold-rule", "youden", "--bootstrap", "20", "--no-progress"]) == 0  # fmt: skip
    rec_auc = json.loads(rec.with_suffix(".card.json").read_text())["site_recalibration"]["auc"]
    assert rec_auc < 0.75
    assert Predictor(base_model, threads=1).card.name == "tiny-base"


def test_the_adapted_file_round_trips_with_a_heatmap_of_the_new_head(
    adapted: tuple[Path, dict], base_model: Path, site: Path
) -> None:
    from pneumonia.card import read_metadata

    out, report = adapted
    p = Predictor(out, threads=1)
    meta = read_metadata(out.read_bytes())
    # Keys adapt does not own travel along, the frontal-chest check among them.
    assert meta["frontal_check"] == read_metadata(base_model.read_bytes())["frontal_check"]
    assert p.card.site_adaptation is not None
    assert p.card.site_adaptation["fitted"]["threshold"] == p.threshold
    films = sorted(site.rglob("*.png"))
    x = np.stack([p.prepare(f.read_bytes()).input for f in films])
    got, base = p.scores(x, cams=True), Predictor(base_model, threads=1).scores(x)
    logits, cams, emb = got.logits, got.cams, got.features
    base_logits, base_emb = base.logits, base.features
    assert cams is not None
    np.testing.assert_array_equal(emb, base_emb)  # the features are the base model's
    np.testing.assert_allclose(cams.mean(axis=(1, 2)), logits, atol=1e-4)
    assert cams.shape[1:] == (SIZE // 4, SIZE // 4) and "penultimate" in report["heatmap"]
    y = np.array(["PNEUMONIA" in f.parts for f in films])
    assert logits[y].min() > logits[~y].max()  # the stripes separate them
    assert not np.allclose(logits, base_logits)


def test_the_card_holds_no_patient_id(
    adapted: tuple[Path, dict], site: Path, base_model: Path
) -> None:
    out, report = adapted
    text = out.with_suffix(".card.json").read_text() + out.with_suffix(".card.md").read_text()
    text += json.dumps(report)
    for f in site.rglob("*.png"):
        assert f.name.split("_")[0] not in text and f.name not in text
    rec = json.loads(out.with_suffix(".card.json").read_text())["site_adaptation"]
    assert (
        rec["site"]["counts"] == {"NORMAL": 30, "PNEUMONIA": 30} and rec["site"]["patients"] == 30
    )
    assert len(rec["site"]["files_sha256"]) == 64
    base = Predictor(base_model, threads=1)
    assert (
        rec["base"]["weights_sha256"] == base.weights_sha256
        and rec["base"]["sha256"] == base.sha256
    )
    assert [row["films"] for row in rec["learning_curve"]["rows"]][:1] == [25]


def test_the_adapted_model_serves(adapted: tuple[Path, dict], site: Path) -> None:
    from pneumonia.serve.app import create_app
    from pneumonia.serve.settings import Settings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from fastapi.testclient import TestClient

    out, _ = adapted
    film = next((site / "PNEUMONIA").glob("*.png")).read_bytes()
    with contextlib.ExitStack() as stack:
        client = stack.enter_context(TestClient(create_app(Settings(model_path=out))))
        for _ in range(200):
            if client.get("/ready").status_code == 200:
                break
            threading.Event().wait(0.02)
        card = client.get("/model").json()
        r = client.post("/predict?heatmap=true", files={"file": ("film.png", film, "image/png")})
    assert card["name"] == "tiny-base-site" and "site_adaptation" in card
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["prediction"] == "PNEUMONIA" and body["heatmap_png"]
    assert body["input_check"]["outcome"] in ("typical", "unlike_training")


def test_the_adapted_model_keeps_the_frontal_check(
    adapted: tuple[Path, dict], base_model: Path, site: Path
) -> None:
    from pneumonia.guard import NOT_A_FRONTAL_CHEST_XRAY, NotAFrontalChestXrayError

    out, _ = adapted
    p, base = Predictor(out, threads=1), Predictor(base_model, threads=1)
    assert p.frontal is not None and base.frontal is not None
    np.testing.assert_array_equal(p.frontal.weights, base.frontal.weights)
    lateral = _png(_lateral(9))
    for model in (p, base):
        with pytest.raises(NotAFrontalChestXrayError, match="lateral chest view"):
            model.predict_bytes(lateral)
    outcomes = [p.predict_bytes(f.read_bytes()).check for f in sorted(site.rglob("*.png"))]
    assert all(c is not None and c.outcome != NOT_A_FRONTAL_CHEST_XRAY for c in outcomes)


def test_the_refitted_input_check_keeps_site_films_and_refuses_a_non_radiograph(
    adapted: tuple[Path, dict], site: Path
) -> None:
    from pneumonia.guard import NOT_A_CHEST_XRAY, TYPICAL, image_reasons

    out, _ = adapted
    p = Predictor(out, threads=1, refuse=False)
    outcomes = [p.predict_bytes(f.read_bytes()).check.outcome for f in sorted(site.rglob("*.png"))]
    assert outcomes.count(TYPICAL) >= 0.9 * len(outcomes)
    assert NOT_A_CHEST_XRAY not in outcomes
    # A checkerboard passes the image checks; its mid-level features do not, by the site's own
    # refitted statistics as well as by the base model's inherited refusal.
    board = (np.indices((SIZE, SIZE)).sum(0) // 8 % 2) * 200.0 + 28
    odd = _png(
        np.clip(board + np.random.default_rng(3).normal(0, 8, board.shape), 0, 255).astype(np.uint8)
    )
    x = p.prepare(odd).input
    assert image_reasons(x) == []
    assert p.predict_bytes(odd).check.outcome == NOT_A_CHEST_XRAY
    assert p.guard is not None and p.guard.base_mid is not None
    site_only = dataclasses.replace(p.guard, base_mid=None, base_refuse_distance=None)
    (check,) = site_only.check(p.scores(x[None]).features, [[]])
    assert check.outcome == NOT_A_CHEST_XRAY


def test_errors_name_the_problem(
    base_model: Path, site: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def run(data: Path, out: Path, *extra: str) -> str:
        args = ["adapt", "--model", str(base_model), "--data", str(data), "--out", str(out)]
        assert main([*args, *extra, "--no-progress"]) == 2
        return capsys.readouterr().err

    out = tmp_path / "x.onnx"
    one = make_site(tmp_path / "one", 12)
    for f in (one / "PNEUMONIA").iterdir():
        f.unlink()
    assert "holds no images" in run(one, out)  # an empty class folder
    (one / "PNEUMONIA" / "notes.png").write_bytes(b"not an image")
    assert "could not be read" in run(one, out) and "notes.png" in run(one, out)
    (one / "PNEUMONIA" / "notes.png").unlink()
    few = make_site(tmp_path / "few", 6)
    assert "too few site films" in run(few, out)
    out.write_bytes(b"keep me")
    assert "already exist" in run(site, out) and out.read_bytes() == b"keep me"
    assert "is the base model" in run(site, base_model)
    assert "--min-sensitivity must be in (0, 1)" in run(
        site, tmp_path / "y.onnx", "--min-sensitivity", "1.5"
    )
    assert not (tmp_path / "y.onnx").exists()


def test_one_class_and_too_few_patients_are_refused() -> None:
    from pneumonia.adapt import AdaptError, check_site

    with pytest.raises(AdaptError, match="only one class"):
        check_site(np.ones(40, dtype=int), [str(i) for i in range(40)])
    y = np.array([0, 1] * 20)
    with pytest.raises(AdaptError, match="too few patients"):
        check_site(y, ["a" if v else f"n{i}" for i, v in enumerate(y)])
    assert check_site(y, [str(i) for i in range(40)])  # fine, with a warning: few films


def test_patient_grouping_never_splits_a_patient() -> None:
    from pneumonia.adapt import FOLDS, draw_patients, fit_site

    rng = np.random.default_rng(0)
    groups = [f"p{i // 3}" for i in range(150)]  # three films per patient
    y = np.array([int(g[1:]) % 2 for g in groups])
    x = rng.normal(size=(150, 12)) + y[:, None] * np.r_[np.zeros(6), np.ones(6)]
    fit = fit_site(
        x, y, groups, rng.normal(size=150), 6, original=(1.0, 0.0, 0.5), n_boot=20, curve=False
    )
    fold = fit["fold"]
    assert sorted(set(fold)) == list(range(FOLDS))
    for g in set(groups):
        assert len({fold[i] for i, h in enumerate(groups) if h == g}) == 1
    picked = draw_patients(y, groups, 25, np.random.default_rng(1))
    chosen = {groups[i] for i in picked}
    assert all(sum(h == g for h in np.array(groups)[picked]) == 3 for g in chosen)
    assert fit["calibration"]["auc"] > 0.9


def test_the_logistic_solver_matches_scikit_learn() -> None:
    sklearn = pytest.importorskip("sklearn.linear_model")
    from pneumonia.adapt import HeadSpec, fit_heads

    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 200)) * rng.uniform(0.1, 3, 200)
    y = (x[:, 0] / x[:, 0].std() + rng.normal(size=60) > 0).astype(int)
    spec = HeadSpec("penultimate", 0.01)
    head = fit_heads(x, y, [spec], 200)[spec]
    xs = (x - x.mean(0)) / x.std(0)
    ref = sklearn.LogisticRegression(C=0.01, tol=1e-10, max_iter=10_000).fit(xs, y)
    np.testing.assert_allclose(head.decision(x), ref.decision_function(xs), atol=1e-4)
    w, b = head.folded(200)
    np.testing.assert_allclose(x @ w + b, head.decision(x), atol=1e-8)


def test_a_manifest_with_text_or_numeric_labels_gives_the_same_site(
    base_model: Path, site: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from pneumonia.adapt import read_site
    from pneumonia.preprocess import PreprocessSpec

    films = sorted(site.rglob("*.png"))
    spec = PreprocessSpec(size=SIZE)
    sites = []
    for kind in ("text", "numeric"):
        lines = ["path,label,patient_id,view"]
        for i, f in enumerate(films):
            label = f.parent.name if kind == "text" else str(int(f.parent.name == "PNEUMONIA"))
            lines.append(f"{f},{label},pt{i // 3},{'AP' if i % 2 else 'PA'}")
        csv = tmp_path / f"{kind}.csv"
        csv.write_text("\n".join(lines) + "\n")
        sites.append(read_site(csv, spec))
    a, b = sites
    assert a.y.tolist() == b.y.tolist() and a.groups == b.groups and a.y.sum() == 30
    assert a.metadata["view"][:2] == ["PA", "AP"] and len(set(a.groups)) == 20
    assert [m["column"] for m in a.source["shortcuts"]] == ["view"]
    bad = tmp_path / "bad.csv"
    bad.write_text(f"path,diagnosis\n{films[0]},NORMAL\n")
    args = [
        "adapt",
        "--model",
        str(base_model),
        "--data",
        str(bad),
        "--out",
        str(tmp_path / "o.onnx"),
    ]
    assert main([*args, "--no-progress"]) == 2
    assert "label" in capsys.readouterr().err


def test_without_a_reachable_feature_map_the_heatmap_is_blank_and_says_so(
    site: Path, tmp_path: Path
) -> None:
    """A two-member base: its CAM averages two maps, so no single feature map carries the
    penultimate features the head reads, and the card says there is no heatmap."""
    from pneumonia.heatmap import class_map

    base = build_base(tmp_path / "base2.onnx", members=2)
    out = tmp_path / "site.onnx"
    args = ["adapt", "--model", str(base), "--data", str(site), "--out", str(out)]
    assert main([*args, "--bootstrap", "20", "--no-progress"]) == 0
    p = Predictor(out, threads=1)
    assert p.card.site_adaptation is not None
    assert p.card.site_adaptation["heatmap"].startswith("none")
    assert "heatmaps are blank" in p.card.outputs["cam"]
    films = sorted(site.rglob("*.png"))[:4]
    got = p.scores(np.stack([p.prepare(f.read_bytes()).input for f in films]), cams=True)
    logits, cams = got.logits, got.cams
    assert cams is not None
    assert cams.shape == (4, 1, 1) and np.allclose(cams[:, 0, 0], logits, atol=1e-5)
    assert not class_map(cams[0], "PNEUMONIA").any()  # drawn as the film alone


def test_a_head_on_mid_level_features_only_says_it_has_no_heatmap() -> None:
    """Regression: a head reading only the mid-level statistics (the NIH site's choice) had a
    'class activation map' statement over a map that is blank by construction."""
    from pneumonia.adapt import write_head

    weights = np.r_[np.zeros(HEAD_DIM), np.ones(6)]
    _, heatmap = write_head(_graph({}), weights, 0.5, HEAD_DIM)
    assert not heatmap["spatial"] and "mid-level" in heatmap["statement"]
    _, heatmap = write_head(_graph({}), np.ones(HEAD_DIM + 6), 0.5, HEAD_DIM)
    assert heatmap["spatial"] and heatmap["statement"].startswith("a class activation map")
