"""The model file's contract (pneumonia.card, issue 19): strict parsing, the file round trip, the
weights digest, the rule table, sentences derived from records, the test-look ledger."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest

from pneumonia.card import (
    CARD_METADATA_KEY,
    RULE_OPTIMUM,
    RULES,
    SENSITIVITY_FLOOR,
    CardError,
    Dataset,
    ModelCard,
    ThresholdChoice,
    file_digests,
    pick_threshold,
    read_metadata,
    read_model_card,
    read_sidecar,
    render_markdown,
    rewrite_card,
    weights_digest,
    with_metadata,
)
from pneumonia.cli import main
from pneumonia.evaluate import evaluate_predictions
from pneumonia.ledger import Ledger, LedgerError, Look, describe_look
from pneumonia.predictor import Prediction, Predictor

REPO = Path(__file__).resolve().parents[1]
#: What a card about someone else's data must never say (the Kermany set's own text).
FOREIGN = ("Kermany", "Guangzhou", "MedMNIST", "published", "children")


def stored(tiny_model: Path) -> dict:
    return json.loads(read_metadata(tiny_model.read_bytes())[CARD_METADATA_KEY])


def test_card_round_trips_through_the_onnx_file(tiny_model: Path, tmp_path: Path) -> None:
    card, props, raw = read_model_card(tiny_model)
    assert ModelCard.from_dict(card.to_dict()) == card
    out = tmp_path / "copy.onnx"
    sidecar = rewrite_card(tiny_model, out, lambda c: c)
    again, props2, raw2 = read_model_card(out)
    assert again == card and props2 == props and raw2 == raw  # nothing else moved
    assert read_sidecar(out.with_suffix(".card.json"))[0] == card
    assert sidecar["sha256"] == hashlib.sha256(raw2).hexdigest()
    assert Predictor(out).card == card


def test_rewriting_a_card_keeps_the_weights_digest(tiny_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "renamed.onnx"
    before = file_digests(tiny_model)
    rewrite_card(tiny_model, out, lambda c: c.with_(version="9.9.9"))
    after = file_digests(out)
    assert after.sha256 != before.sha256 and after.weights_sha256 == before.weights_sha256
    assert after.weights_sha256 == weights_digest(out.read_bytes())  # streaming == in memory
    p = Predictor(out)
    assert p.version == "9.9.9" and p.weights_sha256 == before.weights_sha256


def test_a_card_on_other_weights_is_refused(tiny_model: Path, tmp_path: Path) -> None:
    raw = tiny_model.read_bytes()
    props = read_metadata(raw)
    card = json.loads(props[CARD_METADATA_KEY])
    card["weights_sha256"] = "0" * 64
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(with_metadata(raw, {**props, CARD_METADATA_KEY: json.dumps(card)}))
    from pneumonia.predictor import ModelLoadError

    with pytest.raises(ModelLoadError, match="describes other weights"):
        Predictor(bad)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.pop("threshold_rule"), "lacks threshold_rule"),
        (lambda d: d["threshold_rule"].pop("fitted_on"), r"threshold_rule\.fitted_on"),
        (lambda d: d.update(threshold="high"), r"card\.threshold must be a number"),
        (lambda d: d.update(threshold=1.5), r"card\.threshold must be a number in \[0.0, 1.0\]"),
        (
            lambda d: d["calibration"].update(temperature=-1),
            r"calibration\.temperature must be > 0",
        ),
        (lambda d: d.update(surprise=1), r"unknown field\(s\) \['surprise'\]"),
        (lambda d: d["threshold_rule"].update(rule="f1"), "unknown threshold rule 'f1'"),
        (lambda d: d.update(schema_version=99), "schema_version 99"),
        (lambda d: d.update(labels=["A", "B"]), "labels must be"),
        (lambda d: d.update(dataset={"name": "x"}), r"dataset lacks dataset\.source"),
    ],
)
def test_a_malformed_card_is_refused_naming_the_field(
    tiny_model: Path, edit: object, message: str
) -> None:
    d = stored(tiny_model)
    edit(d)  # type: ignore[operator]
    with pytest.raises(CardError, match=message):
        ModelCard.from_dict(d)


def test_every_threshold_rule_has_one_description_and_one_function() -> None:
    from pneumonia.training.config import TrainConfig

    rng = np.random.default_rng(0)
    y = np.arange(200) % 2
    p = np.clip(rng.normal(0.3 + 0.4 * y, 0.2), 0, 1)
    assert set(RULES) == {"min_sensitivity", "youden", "stressed_youden"}
    descriptions = set()
    for name, r in RULES.items():
        text = ThresholdChoice(
            name, 0.9 if r.uses_min_sensitivity else None, "films F"
        ).description()
        assert "films F" in text and text not in descriptions
        descriptions.add(text)
        pick = pick_threshold(name, y, p, 0.9)
        assert 0.0 <= pick.threshold <= 1.0 and pick.bound_by in (RULE_OPTIMUM, SENSITIVITY_FLOOR)
        TrainConfig(threshold_rule=name)  # training accepts every rule of the table
    with pytest.raises(ValueError, match="threshold_rule must be one of"):
        TrainConfig(threshold_rule="f1")
    # No module but the table spells out the rule list.
    for path in (REPO / "src").rglob("*.py"):
        if path.name != "card.py":
            assert not re.search(
                r"\(\s*\"stressed_youden\",\s*\"min_sensitivity\"", path.read_text()
            ), path


def test_the_capped_rule_says_which_constraint_set_the_threshold() -> None:
    rng = np.random.default_rng(1)
    y = np.arange(400) % 2
    p = np.clip(rng.normal(0.35 + 0.3 * y, 0.15), 0, 1)
    loose = pick_threshold("stressed_youden", y, p, 0.55)
    strict = pick_threshold("stressed_youden", y, p, 0.995)
    assert loose.bound_by == RULE_OPTIMUM and strict.bound_by == SENSITIVITY_FLOOR
    assert strict.threshold == pick_threshold("min_sensitivity", y, p, 0.995).threshold
    assert loose.threshold == pick_threshold("youden", y, p, 0.55).threshold
    text = ThresholdChoice("stressed_youden", 0.995, "V", "S", SENSITIVITY_FLOOR).description()
    assert "the sensitivity floor set it" in text


def test_a_card_trained_without_a_descriptor_says_nothing_about_kermany(
    tiny_model: Path,
) -> None:
    """The tiny run trains on a synthetic folder with no dataset.json: its card must not carry
    another data set's population or literature (the old card hard-coded them)."""
    card, _, _ = read_model_card(tiny_model)
    assert card.dataset is None
    texts = [
        tiny_model.with_suffix(".card.md").read_text(),
        tiny_model.with_suffix(".card.json").read_text(),
        json.dumps(card.public()),
    ]
    for text in texts:
        for word in FOREIGN:
            assert word not in text, word
    assert "undeclared" in texts[0]


def test_a_descriptor_names_the_source_and_its_references(tiny_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "declared.onnx"
    desc = REPO / "datasets" / "kermany-2018.json"
    rewrite_card(tiny_model, out, lambda c: c.with_(dataset=Dataset.load(desc)))
    card = read_model_card(out)[0]
    assert card.dataset is not None and card.dataset.name == "kermany-2018"
    assert any("Guangzhou" in x for x in card.limitations())
    assert "Kermany" in out.with_suffix(".card.md").read_text()


def report_for(p: Predictor, n: int = 40) -> dict:
    y = np.arange(n) % 2
    r = evaluate_predictions(y, np.linspace(0.05, 0.95, n), p.threshold, n_boot=10).to_json()
    return {**r, "dataset": "synthetic", "split": "test", "model": p.identity()}


def test_a_lineage_with_two_looks_never_says_never_used(tiny_model: Path, tmp_path: Path) -> None:
    p = Predictor(tiny_model)
    book = Ledger(tmp_path / "looks.json")
    look = Look(
        "synthetic", "test", 40, p.identity(), "pneumonia evaluate ...", "2026-01-01T00:00:00+00:00"
    )
    book.append(look)
    first = render_markdown(p.card, {"sha256": p.sha256}, test=report_for(p), looks=book)
    assert "the first look at this test set" in first
    book.append(Look("synthetic", "test", 40, p.identity(), "again", "2026-01-02T00:00:00+00:00"))
    second = render_markdown(
        p.card, {"sha256": p.sha256}, test=report_for(p), looks=Ledger.load(book.path)
    )
    assert "look 2 at this test set" in second and "2 time(s)" in second
    for text in (first, second):
        assert "never used for any choice" not in text and "Chosen before any test-set" not in text


def test_a_report_the_ledger_does_not_hold_is_refused(tiny_model: Path, tmp_path: Path) -> None:
    p = Predictor(tiny_model)
    with pytest.raises(LedgerError, match="no look"):
        describe_look(Ledger(tmp_path / "none.json"), p.card, report_for(p))
    with pytest.raises(ValueError, match="ledger"):
        render_markdown(p.card, {}, test=report_for(p))


def test_evaluate_records_its_look_in_the_ledger(
    tiny_model: Path, synthetic_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ledger = tmp_path / "looks.json"
    desc = tmp_path / "ds.json"
    desc.write_text(
        json.dumps(
            {"name": "synthetic", "source": "tests", "licence": "none", "population": "shapes"}
        )
    )
    args = [
        "evaluate",
        "--model",
        str(tiny_model),
        "--data",
        str(synthetic_root),
        "--json",
        str(tmp_path / "r.json"),
        "--no-progress",
    ]
    assert main([*args, "--ledger", str(ledger)]) == 2  # no descriptor: a look must say what it saw
    assert "pass --dataset" in capsys.readouterr().err and not ledger.exists()
    assert main([*args, "--ledger", str(ledger), "--dataset", str(desc)]) == 0
    (look,) = Ledger.load(ledger).looks
    p = Predictor(tiny_model)
    assert (look.dataset, look.split, look.n, look.model) == ("synthetic", "test", 24, p.identity())
    assert look.command.startswith("pneumonia evaluate") and look.date
    md = tmp_path / "card.md"
    report = tmp_path / "r.json"
    assert (
        main(["card", "--model", str(tiny_model), "--report", str(report), "--out", str(md)]) == 2
    )
    assert (
        main(
            [
                "card",
                "--model",
                str(tiny_model),
                "--report",
                str(report),
                "--ledger",
                str(ledger),
                "--out",
                str(md),
            ]
        )
        == 0
    )
    assert "the first look at this test set" in md.read_text()


def test_probability_is_p_pneumonia_for_every_answer(tiny_model: Path) -> None:
    """Regression (issue 19): a film with P(PNEUMONIA) 0.6 under a threshold of 0.69 was
    answered NORMAL with probability 0.4."""
    p = Predictor(tiny_model)
    rng = np.random.default_rng(0)
    films = [rng.integers(0, 256, (64, 64), dtype=np.uint8) for _ in range(16)]
    for pred in p.predict(films, refuse=False):
        assert isinstance(pred, Prediction)
        assert pred.probability == pred.p_pneumonia
        assert (pred.label == "PNEUMONIA") == (pred.p_pneumonia >= pred.threshold)
        assert pred.to_dict()["probability"] == pred.p_pneumonia


def test_shipped_cards_read_and_carry_their_identity() -> None:
    """Every committed model file loads and its sidecar names it (sha256 and weights digest)."""
    for model in (
        REPO / "artifacts" / "model.onnx",
        REPO / "artifacts" / "baseline" / "model.onnx",
    ):
        p = Predictor(model)
        card, ident = read_sidecar(model.with_suffix(".card.json"))
        assert ident["sha256"] == p.sha256 and card.weights_sha256 == p.weights_sha256
        assert card == p.card


def test_committed_cards_are_rendered_from_records(tmp_path: Path) -> None:
    """artifacts/*.card.md are what `make cards` renders from the files, reports and ledger:
    nothing in them is typed by hand."""
    art = REPO / "artifacts"
    ledger = ["--ledger", str(art / "test_looks.json")]
    cases = {
        art / "model.card.md": [
            "--model",
            str(art / "model.onnx"),
            "--report",
            str(art / "eval" / "test.json"),
            "--baseline",
            str(art / "baseline" / "eval" / "test.json"),
            "--previous",
            str(art / "v2" / "eval" / "test.json"),
            "--previous-label",
            "pneumonia-effnet_lite0 2.0.0 (v2, float32)",
        ],
        art / "baseline" / "model.card.md": [
            "--model",
            str(art / "baseline" / "model.onnx"),
            "--report",
            str(art / "baseline" / "eval" / "test.json"),
        ],
    }
    for committed, args in cases.items():
        out = tmp_path / committed.name
        assert main(["card", *args, *ledger, "--out", str(out)]) == 0
        assert out.read_text() == committed.read_text(), committed
