"""The one manifest reader (pneumonia.data.read_manifest / read_folder) and the metadata
shortcut screen of `pneumonia data audit`: synthetic manifests in tmp_path; the NIH site's
manifest when ../shared is present."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import SHARED_DATA, encode, synthetic_xray
from pneumonia.audit import SHORTCUT_WARN_AUC, audit, metadata_shortcuts, render_markdown
from pneumonia.cli import main
from pneumonia.data import (
    PATIENT_FROM_MANIFEST,
    ManifestError,
    grouped_split,
    list_split,
    patient_id,
    read_folder,
    read_labelled,
    read_manifest,
    split_samples,
    train_val_split,
)
from pneumonia.labels import LABELS
from pneumonia.score import ScoreError, open_input

NIH_SITE = SHARED_DATA.parent / "nih_site"


def _image(path: Path, label: int, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode(synthetic_xray(label, seed, size=64)))


def site(root: Path, patients: int = 40, films: int = 2, *, manifest: bool = True) -> Path:
    """A labelled folder of NIH-named films; ``manifest.csv`` with text labels, a patient id,
    a ``view`` that is a planted shortcut (PA for PNEUMONIA but one film in 10) and a ``coin``
    column drawn at random."""
    rng = np.random.default_rng(0)
    lines = ["relpath,label,patient_id,view,coin,age"]
    for p in range(patients):
        label = p % 2
        for k in range(films):
            rel = f"{LABELS[label]}/{p:08d}_{k:03d}.jpeg"
            _image(root / rel, label, p * 10 + k)
            view = ("PA" if label else "AP") if rng.random() > 0.1 else ("AP" if label else "PA")
            coin = rng.choice(["heads", "tails", "edge"])
            lines.append(
                f"{rel},{LABELS[label].lower()},{p:08d},{view},{coin},{rng.integers(20, 90)}"
            )
    if manifest:
        (root / "manifest.csv").write_text("\n".join(lines) + "\n")
    return root


def test_text_and_numeric_labels_path_and_relpath(tmp_path: Path) -> None:
    for i in range(5):
        _image(tmp_path / "img" / f"f{i}.png", 0, i)
    (tmp_path / "a.csv").write_text(
        "relpath,label,site,split,extra\n"
        "img/f0.png,0,A,train,x\nimg/f1.png,1,A,test,y\nimg/f2.png,NORMAL,B,,z\n"
        "img/f3.png,pneumonia,B,train,\nimg/f4.png, Pneumonia ,B,train,w\n"
    )
    m = read_manifest(tmp_path / "a.csv")
    assert [r.label for r in m.rows] == [0, 1, 0, 1, 1]
    assert [r.path for r in m.rows] == [tmp_path / "img" / f"f{i}.png" for i in range(5)]
    assert [r.site for r in m.rows] == ["A", "A", "B", "B", "B"]
    assert [r.split for r in m.rows] == ["train", "test", None, "train", "train"]
    assert m.metadata_columns == ("extra",) and m.rows[0].metadata == {"extra": "x"}
    assert [r.line for r in m.rows] == [2, 3, 4, 5, 6]

    absolute = tmp_path / "img" / "f0.png"
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.csv").write_text(f"path,label\n{absolute},NORMAL\n../img/f1.png,1\n")
    rows = read_manifest(tmp_path / "sub" / "b.csv").rows
    assert rows[0].path == absolute and rows[1].path == tmp_path / "sub" / "../img/f1.png"
    assert rows[1].path.is_file()


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("path,label\na.png,0\nb.png,2\n", r"line 3: label column: label '2' is not one of"),
        ("path,label\na.png,0\nb.png,Normal\nc.png,sick\n", r"line 4: .*'sick'"),
        ("path,label\na.png,1\n,0\n", r"line 3: empty 'path'"),
        ("path,label\na.png,1,extra\n", r"line 2: more fields"),
        ("path,diagnosis\na.png,1\n", r"needs a 'path' or 'relpath' column and a 'label'"),
        ("file,label\na.png,1\n", r"needs a 'path' or 'relpath' column.*\['file', 'label'\]"),
        ("path,label\n", r"has no rows"),
    ],
)
def test_bad_rows_and_missing_columns_are_named(tmp_path: Path, body: str, message: str) -> None:
    (tmp_path / "m.csv").write_text(body)
    with pytest.raises(ManifestError, match=message):
        read_manifest(tmp_path / "m.csv")


def test_cli_names_the_bad_row_without_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "m.csv").write_text("path,label\na.png,0\nb.png,maybe\n")
    assert main(["data", "audit", str(tmp_path / "m.csv"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "line 3" in err and "'maybe'" in err and "Traceback" not in err


def test_nih_file_names_group_by_patient() -> None:
    assert patient_id("00001280_004.png") == "00001280"
    assert patient_id("00001280_004.jpeg") == "00001280"
    assert patient_id("person12_bacteria_3.jpeg") == "person12"
    assert patient_id("12345_004.png") == "12345_004.png"  # not eight digits: its own patient


def test_folder_with_manifest_takes_its_patients_and_metadata(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = site(tmp_path / "site", patients=6)
    (root / "manifest.csv").write_text(
        (root / "manifest.csv").read_text().replace(",00000003,", ",P-three,")
        + "NORMAL/gone.jpeg,0,P9,AP,heads,40\n"
    )
    m = read_folder(root)
    assert "lists 1 film(s) that are not in NORMAL/ or PNEUMONIA/" in caplog.text
    assert len(m.rows) == 12 and m.metadata_columns == ("view", "coin", "age")
    assert {r.patient_from for r in m.rows} == {PATIENT_FROM_MANIFEST}
    assert "P-three" in {s.patient for s in list_split(root)}
    assert read_labelled(root).rows == m.rows

    # Without the manifest, the NIH file names still group each patient's two films.
    (root / "manifest.csv").unlink()
    assert len({s.patient for s in list_split(root)}) == 6


def test_folder_manifest_contradicting_a_class_folder_is_named(tmp_path: Path) -> None:
    root = site(tmp_path / "site", patients=4)
    text = (root / "manifest.csv").read_text()
    (root / "manifest.csv").write_text(
        text.replace("NORMAL/00000000_000.jpeg,normal", "NORMAL/00000000_000.jpeg,pneumonia")
    )
    with pytest.raises(ManifestError, match=r"line 2: labels NORMAL/00000000_000.jpeg PNEUMONIA"):
        read_folder(root)


@pytest.mark.parametrize("with_manifest", [True, False])
def test_patient_grouping_never_splits_a_patient(tmp_path: Path, with_manifest: bool) -> None:
    root = site(tmp_path / "site", patients=30, films=3, manifest=with_manifest)
    samples = list_split(root)
    assert len({s.patient for s in samples}) == 30
    for seed in range(5):
        train, val = grouped_split(samples, 0.3, seed)
        assert val and not {s.patient for s in train} & {s.patient for s in val}


def test_audit_of_a_text_label_manifest(tmp_path: Path) -> None:
    """Regression: `pneumonia data audit nih_site/manifest.csv` stopped with a ValueError
    traceback (int(label) on "NORMAL")."""
    site(tmp_path / "site", patients=8)
    out = tmp_path / "r.json"
    md = tmp_path / "r.md"
    args = ["data", "audit", str(tmp_path / "site" / "manifest.csv"), "--no-progress"]
    assert main([*args, "--json", str(out), "--markdown", str(md)]) == 0
    r = json.loads(out.read_text())
    assert r["counts"]["images"]["all"]["total"] == 16
    assert r["patients"]["rules"] == {"manifest patient_id column": 16}
    assert [m["column"] for m in r["metadata_shortcuts"]] == ["view", "coin", "age"]
    assert "## Shortcuts: manifest columns" in md.read_text()


def test_metadata_screen_finds_a_planted_shortcut_not_a_random_column(tmp_path: Path) -> None:
    rows = read_folder(site(tmp_path / "site", patients=60)).rows
    found = {m.column: m for m in metadata_shortcuts(rows)}
    assert found["view"].kind == "categorical" and found["view"].warning
    assert found["view"].auc is not None and found["view"].auc > 0.8
    assert found["view"].direction is not None and found["view"].direction.startswith("PA:")
    assert found["coin"].auc is not None and found["coin"].auc < SHORTCUT_WARN_AUC
    assert not found["coin"].warning
    assert found["age"].kind == "numeric" and not found["age"].warning


def test_metadata_screen_does_not_reward_a_column_unique_per_patient(tmp_path: Path) -> None:
    """A per-patient id or checksum scored in sample would predict every label (AUC 1)."""
    rows = read_folder(site(tmp_path / "site", patients=40, films=1)).rows
    unique = [
        type(r)(**{**r.__dict__, "metadata": {"md5": f"{i:032x}"}}) for i, r in enumerate(rows)
    ]
    (m,) = metadata_shortcuts(unique)
    assert m.kind == "categorical" and m.auc == 0.5 and not m.warning


def test_report_warns_on_the_planted_shortcut(tmp_path: Path) -> None:
    r = audit(site(tmp_path / "site", patients=40))
    assert any("manifest column view" in w for w in r["warnings"])
    assert not any("manifest column coin" in w for w in r["warnings"])
    assert "| view | categorical |" in render_markdown(r)


def test_score_reads_relpath_manifests_and_names_bad_rows(tmp_path: Path) -> None:
    root = site(tmp_path / "site", patients=2)
    source = open_input(root / "manifest.csv")
    assert next(iter(source.iter_keys())) == "NORMAL/00000000_000.jpeg"
    with pytest.raises(ScoreError, match=r"needs a 'film' column.*--path-column"):
        open_input(root / "manifest.csv", path_column="film")
    (tmp_path / "bad.csv").write_text("path\na.png\n\n  \n")
    with pytest.raises(ScoreError, match="line 4: empty 'path'"):
        list(open_input(tmp_path / "bad.csv").iter_keys())


@pytest.mark.skipif(not (NIH_SITE / "manifest.csv").is_file(), reason="needs ../shared nih_site")
def test_nih_site_manifest() -> None:
    m = read_manifest(NIH_SITE / "manifest.csv")
    assert len(m.rows) == 538 and len({r.patient for r in m.rows}) == 345
    assert {"age", "sex", "view"} <= set(m.metadata_columns)
    assert all(r.path.is_file() for r in m.rows)
    assert [r.patient for r in read_folder(NIH_SITE).rows] == [
        r.patient for r in sorted(m.rows, key=lambda r: (r.label or 0, r.key))
    ]
    view = {s.column: s for s in metadata_shortcuts(m.rows)}["view"]
    assert view.auc is not None and 0.6 < view.auc < SHORTCUT_WARN_AUC


def test_train_and_evaluate_take_a_manifests_split_column(tmp_path: Path) -> None:
    lines = ["path,label,patient_id,split"]
    for p in range(12):
        for k in range(2):
            _image(tmp_path / f"{p}_{k}.png", p % 2, p * 2 + k)
            lines.append(f"{p}_{k}.png,{p % 2},P{p},{'test' if p >= 8 else 'train'}")
    (tmp_path / "m.csv").write_text("\n".join(lines) + "\n")
    assert len(split_samples(tmp_path / "m.csv", "test")) == 8
    plan = train_val_split(tmp_path / "m.csv", 0.25, 0)
    assert len(plan.train) + len(plan.val) == 16
    assert not {s.patient for s in plan.train} & {s.patient for s in plan.val}
    with pytest.raises(
        ManifestError, match=r"no row of split 'val' \(its splits: \['test', 'train'\]\)"
    ):
        split_samples(tmp_path / "m.csv", "val")
    # Without split values every row belongs to every split asked for.
    (tmp_path / "all.csv").write_text("path,label\n0_0.png,0\n1_0.png,1\n")
    assert len(split_samples(tmp_path / "all.csv", "test")) == 2


def test_evaluate_reads_a_manifest(tmp_path: Path, tiny_model: Path) -> None:
    site(tmp_path / "site", patients=6)
    out = tmp_path / "eval.json"
    manifest = tmp_path / "site" / "manifest.csv"
    args = ["evaluate", "--model", str(tiny_model), "--data", str(manifest)]
    assert main([*args, "--json", str(out), "--no-progress"]) == 0
    report = json.loads(out.read_text())
    assert report["n"] == 12 and report["data"] == str(manifest)
