"""`pneumonia data download`: kagglehub is faked with a folder tree; nothing touches the network."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest

from conftest import SHARED_DATA
from pneumonia import download
from pneumonia.cli import main
from pneumonia.download import PUBLISHED_COUNTS, find_root, verify


def kaggle_tree(base: Path, counts: dict) -> Path:
    """The archive as kagglehub unpacks it: chest_xray/ with a nested duplicate and macOS junk."""
    root = base / "datasets" / "paultimothymooney" / "chest-xray-pneumonia" / "versions" / "2"
    for top in (
        root / "chest_xray",
        root / "chest_xray" / "chest_xray",
        root / "__MACOSX" / "chest_xray",
    ):
        for split, per in counts.items():
            for cls, n in per.items():
                d = top / split / cls
                d.mkdir(parents=True)
                for i in range(n if top == root / "chest_xray" else 2):
                    (d / f"f{i}.jpeg").touch()
    return root


def fake_kagglehub(monkeypatch: pytest.MonkeyPatch, fn: object) -> list[tuple]:
    calls: list[tuple] = []

    def dataset_download(handle: str, **kw: object) -> str:
        calls.append((handle, kw))
        return fn(handle) if callable(fn) else str(fn)

    monkeypatch.setitem(
        sys.modules, "kagglehub", types.SimpleNamespace(dataset_download=dataset_download)
    )
    return calls


def test_download_finds_the_root_and_verifies_published_counts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("KAGGLEHUB_CACHE", raising=False)
    # The published figures, scaled down: 5,856 empty files take seconds on a busy machine.
    small = {
        "train": {"NORMAL": 13, "PNEUMONIA": 38},
        "val": {"NORMAL": 8, "PNEUMONIA": 8},
        "test": {"NORMAL": 23, "PNEUMONIA": 39},
    }
    monkeypatch.setattr(download, "PUBLISHED_COUNTS", small)
    base = tmp_path / "cache"
    tree = kaggle_tree(base, small)
    calls = fake_kagglehub(monkeypatch, tree)
    assert main(["data", "download", "--to", str(base)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (
        out["data"] == str(tree / "chest_xray")
        and out["matches_published"]
        and out["differences"] == []
    )
    assert calls == [("paultimothymooney/chest-xray-pneumonia", {"force_download": False})]
    import os

    assert os.environ["KAGGLEHUB_CACHE"] == str(base.absolute())


def test_download_with_other_counts_reports_each_difference(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    counts = {"train": {"NORMAL": 3, "PNEUMONIA": 4}, "test": {"NORMAL": 234, "PNEUMONIA": 390}}
    fake_kagglehub(monkeypatch, kaggle_tree(tmp_path, counts))
    monkeypatch.delenv("KAGGLEHUB_CACHE", raising=False)
    assert main(["data", "download"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["differences"] == [
        "train NORMAL: 3 images, published 1,341 (-1,338)",
        "train PNEUMONIA: 4 images, published 3,875 (-3,871)",
        "val: missing (published: 8 NORMAL / 8 PNEUMONIA)",
    ]
    assert out["counts"]["val"] is None


def test_no_network_or_credentials_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def offline(handle: str) -> str:
        raise ConnectionError("Failed to resolve host")

    fake_kagglehub(monkeypatch, offline)
    assert main(["data", "download"]) == 2
    err = capsys.readouterr().err
    assert "ConnectionError: Failed to resolve host" in err
    assert "KAGGLE_USERNAME" in err and "KAGGLE_KEY" in err and "--verify DIR" in err


def test_missing_kagglehub_says_how_to_install(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "kagglehub", None)  # import fails
    assert main(["data", "download"]) == 2
    err = capsys.readouterr().err
    assert "pip install 'pneumonia-detection[download]'" in err and "--verify DIR" in err


def test_verify_a_copy_and_bad_layouts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tree = kaggle_tree(
        tmp_path / "a",
        {"train": {"NORMAL": 2, "PNEUMONIA": 2}, "test": {"NORMAL": 1, "PNEUMONIA": 1}},
    )
    assert find_root(tmp_path / "a") == tree / "chest_xray"
    assert verify(tree).root == tree / "chest_xray"
    (tmp_path / "b" / "train" / "NORMAL").mkdir(parents=True)
    assert main(["data", "download", "--verify", str(tmp_path / "b")]) == 2
    assert "no chest_xray root" in capsys.readouterr().err


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"real data not present at {SHARED_DATA}")
def test_verify_shared_copy_reports_its_smaller_train_split(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["data", "download", "--verify", str(SHARED_DATA)]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["counts"]["test"] == PUBLISHED_COUNTS["test"]
    assert "train NORMAL: 1,214 images, published 1,341 (-127)" in out["differences"]
    assert "val: missing (published: 8 NORMAL / 8 PNEUMONIA)" in out["differences"]
