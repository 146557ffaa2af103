"""`pneumonia data audit`: synthetic folders with planted duplicates, a planted cross-split
patient, a planted shortcut and none; the real data when ../shared is present."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import SHARED_DATA, encode, synthetic_xray
from pneumonia.audit import (
    SHORTCUT_WARN_AUC,
    STATISTICS,
    audit,
    dhash,
    hamming,
    near_pairs,
    phash,
    render_html,
    shortcut_table,
    trainer_split_section,
)
from pneumonia.cli import main
from pneumonia.data import grouped_split, list_split, train_val_split


def _write(path: Path, arr: np.ndarray, **kw: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode(arr, "JPEG", **kw))
    return path


def build(root: Path, n: int = 24, *, shortcut: bool, informative: bool = False) -> Path:
    """train/ and test/ with Kermany names. ``shortcut``: PNEUMONIA films are stored 40%
    wider (stretched), as the Kermany originals' shapes differ by class. Images carry no
    label signal unless ``informative``."""
    for split, seed in (("train", 1), ("test", 2)):
        for label, cls in enumerate(("NORMAL", "PNEUMONIA")):
            for i in range(n):
                k = seed * 10_000 + label * 1000 + i
                arr = synthetic_xray(label if informative else 0, k).astype(np.float64)
                # A smooth random field per film: different children do not share one template.
                rng = np.random.default_rng(k)
                field = np.kron(rng.normal(0, 25, (4, 4)), np.ones((24, 24)))
                blur = np.asarray(
                    Image.fromarray(field.astype(np.float32), mode="F")
                    .resize((12, 12))
                    .resize((96, 96), Image.Resampling.BICUBIC)
                )
                arr = np.clip(arr + blur, 0, 255).astype(np.uint8)
                if shortcut and label:
                    arr = np.asarray(
                        Image.fromarray(arr).resize((134, 96), Image.Resampling.BILINEAR)
                    )
                name = (
                    f"person{seed}{label}{i:02d}_bacteria_{i}.jpeg"
                    if label
                    else f"IM-{seed}{i:03d}-0001.jpeg"
                )
                _write(root / split / cls / name, arr, quality=90)
    return root


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """A shortcut set plus: an exact duplicate within train, a near duplicate of a train
    patient's film in test under the same person number (true overlap), the same person
    number on a different film (id collision), and an unreadable file."""
    root = build(tmp_path_factory.mktemp("audit"), shortcut=True)
    train_p = root / "train" / "PNEUMONIA"
    src = sorted(train_p.iterdir())[3]  # person1103_bacteria_3.jpeg
    (train_p / "person1199_bacteria_99.jpeg").write_bytes(src.read_bytes())  # exact copy
    # The same film re-encoded harder, brighter and slightly smaller: a near duplicate.
    img = np.asarray(Image.open(src).convert("L"), dtype=np.float64)
    brighter = np.clip(img * 1.08 + 6, 0, 255).astype(np.uint8)
    smaller = np.asarray(Image.fromarray(brighter).resize((120, 86), Image.Resampling.LANCZOS))
    _write(root / "test" / "PNEUMONIA" / "person1103_bacteria_500.jpeg", smaller, quality=60)
    # Same person number, a different child's film.
    _write(root / "test" / "PNEUMONIA" / "person1105_virus_501.jpeg", synthetic_xray(0, 777))
    (root / "test" / "NORMAL" / "IM-9999-0001.jpeg").write_bytes(b"not an image")
    return root, audit(root)


def test_counts_and_unreadable(planted: tuple[Path, dict]) -> None:
    _, r = planted
    assert r["counts"]["images"]["train"] == {
        "NORMAL": 24,
        "PNEUMONIA": 25,
        "total": 49,
        "unreadable": 0,
    }
    assert r["counts"]["images"]["test"] == {
        "NORMAL": 25,
        "PNEUMONIA": 26,
        "total": 51,
        "unreadable": 1,
    }
    [bad] = r["counts"]["unreadable"]
    assert bad["path"] == "test/NORMAL/IM-9999-0001.jpeg" and bad["reason"].startswith(
        "unsupported_format"
    )


def test_duplicates_exact_and_near(planted: tuple[Path, dict]) -> None:
    _, r = planted
    d = r["duplicates"]
    assert d["exact"]["groups"] == 1 and d["exact"]["by_split"] == {"train": 1}
    assert sorted(d["exact"]["list"][0]["files"]) == [
        "train/PNEUMONIA/person1103_bacteria_3.jpeg",
        "train/PNEUMONIA/person1199_bacteria_99.jpeg",
    ]
    pairs = {(p["a"], p["b"]) for p in d["near"]["list"]}
    # The near copy matches both identical train files, and nothing else is near anything.
    assert pairs == {
        (
            "train/PNEUMONIA/person1103_bacteria_3.jpeg",
            "test/PNEUMONIA/person1103_bacteria_500.jpeg",
        ),
        (
            "train/PNEUMONIA/person1199_bacteria_99.jpeg",
            "test/PNEUMONIA/person1103_bacteria_500.jpeg",
        ),
    }
    assert d["near"]["by_split"] == {"across:test+train": 2} and d["near"]["label_conflicts"] == 0
    assert all(p["correlation"] >= 0.98 for p in d["near"]["list"])


def test_patients_true_overlap_apart_from_id_collisions(planted: tuple[Path, dict]) -> None:
    _, r = planted
    p = r["patients"]
    assert p["ids_parsed"] == 100  # every readable-or-not file name parsed
    [cross] = p["across_splits"]
    assert cross["splits"] == ["train", "test"] and cross["shared_ids"] == 2
    [overlap] = cross["true_overlap"]
    assert overlap["patient"] == "person1103"
    assert overlap["matching_images"][0] == [
        "train/PNEUMONIA/person1103_bacteria_3.jpeg",
        "test/PNEUMONIA/person1103_bacteria_500.jpeg",
    ]
    assert cross["id_collisions"] == ["person1105"]
    assert any("person" in w or "patient" in w for w in r["warnings"])


def test_trainer_split_is_the_trainers_and_shares_no_patient(planted: tuple[Path, dict]) -> None:
    root, r = planted
    ts = r["patients"]["trainer_split"]
    train, val = grouped_split(list_split(root / "train"), 0.2, 0)
    assert (ts["train_images"], ts["val_images"]) == (len(train), len(val))
    assert ts["method"] == "patient-grouped" and ts["shared_patients"] == 0


def test_planted_shortcut_is_flagged(planted: tuple[Path, dict]) -> None:
    _, r = planted
    flagged = {(x["statistic"], x["split"]) for x in r["shortcuts"] if x["warning"]}
    for stat in ("stretch_ratio", "width", "aspect"):
        assert (stat, "train") in flagged
    row = next(x for x in r["shortcuts"] if x["statistic"] == "width" and x["split"] == "train")
    assert row["auc"] == 1.0 and row["direction"] == "higher in PNEUMONIA"
    assert all(set(x) >= {"statistic", "split", "auc", "warning"} for x in r["shortcuts"])


def test_no_shortcut_no_warning(tmp_path: Path) -> None:
    root = build(tmp_path, n=20, shortcut=False)
    rows = shortcut_table(root)
    assert len(rows) == 2 * 9 and not any(x["warning"] for x in rows)
    assert all(x["auc"] is None or 0.5 <= x["auc"] <= SHORTCUT_WARN_AUC for x in rows)
    # On samples (as the trainer would pass them), the split is named by the caller.
    samples = list_split(root / "train")
    assert {x["split"] for x in shortcut_table(samples)} == {"train"}


def test_html_is_self_contained(planted: tuple[Path, dict]) -> None:
    _, r = planted
    page = render_html(r)
    assert page.startswith("<!doctype html>") and "<svg" in page and "<script" not in page
    assert "src=" not in page and "href=" not in page and "@import" not in page
    assert "person1103" in page and "stretch_ratio" in page
    json.dumps(r, allow_nan=False)  # strict JSON


def test_cli_writes_json_and_html(
    planted: tuple[Path, dict], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root, _ = planted
    out, page = tmp_path / "a.json", tmp_path / "a.html"
    assert (
        main(["data", "audit", str(root), "--json", str(out), "--html", str(page), "--no-progress"])
        == 0
    )
    summary = json.loads(capsys.readouterr().out)
    assert (
        summary["images"] == {"train": 49, "test": 51}
        and summary["trainer_split_shared_patients"] == 0
    )
    assert "train:stretch_ratio" in " ".join(summary["shortcut_warnings"])
    assert json.loads(out.read_text())["counts"]["images"]["train"]["total"] == 49
    assert page.read_text().startswith("<!doctype html>")


def test_npz_and_manifest_inputs(tmp_path: Path) -> None:
    from test_medmnist import medmnist_npz

    npz = medmnist_npz(tmp_path / "pneumoniamnist_64.npz", sizes={"train": 12, "val": 4, "test": 4})
    r = audit(npz)
    assert {k: v["total"] for k, v in r["counts"]["images"].items()} == {
        "train": 12,
        "val": 4,
        "test": 4,
    }
    assert r["patients"]["trainer_split"]["method"] == "medmnist-val"
    assert r["patients"]["trainer_split"]["shared_patients"] is None
    assert r["patients"]["across_splits"][0]["shared_ids"] == 0
    assert r["images"]["train"]["NORMAL"]["format"] == {"npz": 6}

    folder = tmp_path / "imgs"
    rows = ["path,label,split"]
    for i in range(6):
        _write(folder / f"f{i}.jpeg", synthetic_xray(i % 2, i))
        rows.append(f"imgs/f{i}.jpeg,{i % 2},{'a' if i < 4 else 'b'}")
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    r = audit(tmp_path / "m.csv")
    assert {k: v["total"] for k, v in r["counts"]["images"].items()} == {"a": 4, "b": 2}


def test_phash_dhash_match_imagehash() -> None:
    imagehash = pytest.importorskip("imagehash")
    for seed in range(6):
        img = Image.fromarray(synthetic_xray(seed % 2, seed, 128))
        assert phash(img) == int(str(imagehash.phash(img)), 16)
        assert dhash(img) == int(str(imagehash.dhash(img)), 16)


def test_banded_near_pairs_equal_brute_force() -> None:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 2**63, 40, dtype=np.uint64)
    flips = rng.integers(0, 64, (40, 3))
    noisy = base ^ np.bitwise_or.reduce(np.uint64(1) << flips.astype(np.uint64), axis=1)
    hashes = [int(x) for x in np.r_[base, noisy]]
    d = hamming(np.array(hashes, np.uint64)[:, None], np.array(hashes, np.uint64)[None, :])
    for t in (0, 3, 7):
        brute = [(i, j, int(d[i, j])) for i in range(80) for j in range(i + 1, 80) if d[i, j] <= t]
        assert near_pairs([*hashes, None], t) == brute
    with pytest.raises(ValueError):
        near_pairs(hashes, 8)


@pytest.mark.slow  # reads the whole real data set
@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"real data not present at {SHARED_DATA}")
def test_real_data_stretch_shortcut_and_trainer_split() -> None:
    samples = list_split(SHARED_DATA / "train")
    rng = np.random.default_rng(0)
    sub = [samples[i] for i in sorted(rng.choice(len(samples), 300, replace=False))]
    stretch = next(x for x in shortcut_table(sub) if x["statistic"] == "stretch_ratio")
    assert (
        stretch["warning"]
        and stretch["auc"] > 0.8
        and stretch["direction"] == "higher in PNEUMONIA"
    )
    ts = trainer_split_section([], SHARED_DATA, 0.2, 0, set())
    plan = train_val_split(SHARED_DATA)
    assert ts is not None and ts["shared_patients"] == 0
    assert (ts["train_images"], ts["val_images"]) == (len(plan.train), len(plan.val))


def test_model_card_shows_the_training_datas_shortcuts(tiny_card: dict, tiny_model: Path) -> None:
    rows = tiny_card["training"]["data"]["shortcuts"]
    assert [r["statistic"] for r in rows] == list(STATISTICS) and {r["split"] for r in rows} == {
        "train"
    }
    assert all(set(r) == {"statistic", "split", "auc", "warning", "direction"} for r in rows)
    assert "Shortcut check" in tiny_model.with_suffix(".card.md").read_text()
