"""Finding images, patient ids, the patient-grouped split, layout errors, unreadable files."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from benchmarks.common import damage_png
from conftest import encode, jpeg_bytes, make_split, synthetic_xray
from pneumonia.data import (
    DatasetLayoutError,
    Sample,
    grouped_split,
    list_split,
    load_images,
    patient_id,
    resolve_split,
)
from pneumonia.preprocess import PreprocessSpec

SPEC = PreprocessSpec(size=32)


@pytest.mark.parametrize(
    ("filename", "patient"),
    [
        ("person123_bacteria_456.jpeg", "person123"),
        ("person1_virus_7.jpeg", "person1"),
        ("person1946_bacteria_4874.jpeg", "person1946"),
        ("IM-0115-0001.jpeg", "IM-0115"),
        ("NORMAL2-IM-1427-0001.jpeg", "NORMAL2-IM-1427"),
        # files matching no rule are their own group
        ("scan_0007.png", "scan_0007.png"),
        ("personA_bacteria_1.jpeg", "personA_bacteria_1.jpeg"),
        ("IM-0115.jpeg", "IM-0115.jpeg"),
        ("xperson12_virus_3.jpeg", "xperson12_virus_3.jpeg"),
    ],
)
def test_patient_id(filename: str, patient: str) -> None:
    assert patient_id(filename) == patient


def test_two_films_of_one_patient_share_an_id() -> None:
    assert patient_id("IM-0115-0001.jpeg") == patient_id("IM-0115-0002.jpeg")
    assert patient_id("person5_bacteria_10.jpeg") == patient_id("person5_virus_11.jpeg")
    assert patient_id("NORMAL2-IM-1427-0001.jpeg") != patient_id("IM-1427-0001.jpeg")


def fake_samples(seed: int = 0) -> list[Sample]:
    """About 3:1 PNEUMONIA:NORMAL, 1-4 films per patient, plus loose files with no patient."""
    rng = np.random.default_rng(seed)
    out: list[Sample] = []
    for p in range(150):
        for k in range(int(rng.integers(1, 5))):
            out.append(Sample(Path(f"PNEUMONIA/person{p}_bacteria_{p * 10 + k}.jpeg"), 1))
    for p in range(60):
        for k in range(int(rng.integers(1, 4))):
            out.append(Sample(Path(f"NORMAL/IM-{p:04d}-{k:04d}.jpeg"), 0))
    for p in range(25):
        out.append(Sample(Path(f"NORMAL/NORMAL2-IM-{p:04d}-0001.jpeg"), 0))
    for i in range(10):
        out.append(Sample(Path(f"NORMAL/loose_{i}.png"), 0))
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_grouped_split_keeps_patients_on_one_side(seed: int) -> None:
    samples = fake_samples()
    train, val = grouped_split(samples, 0.2, seed)
    assert {s.patient for s in train}.isdisjoint({s.patient for s in val})
    # every sample kept exactly once
    assert Counter(train) + Counter(val) == Counter(samples)
    assert len(train) + len(val) == len(samples)


@pytest.mark.parametrize("val_fraction", [0.1, 0.2, 0.35])
def test_grouped_split_is_stratified(val_fraction: float) -> None:
    samples = fake_samples()
    _, val = grouped_split(samples, val_fraction, 0)
    for label in (0, 1):
        n = sum(s.label == label for s in samples)
        n_val = sum(s.label == label for s in val)
        # over the target by at most one patient's films (<= 4 here)
        assert val_fraction <= n_val / n <= val_fraction + 4 / n


def test_grouped_split_is_deterministic_for_a_seed() -> None:
    samples = fake_samples()
    assert grouped_split(samples, 0.2, 7) == grouped_split(samples, 0.2, 7)
    # and does not depend on the order the files were listed in
    shuffled = [samples[i] for i in np.random.default_rng(0).permutation(len(samples))]
    assert set(grouped_split(shuffled, 0.2, 7)[1]) == set(grouped_split(samples, 0.2, 7)[1])
    assert set(grouped_split(samples, 0.2, 8)[1]) != set(grouped_split(samples, 0.2, 7)[1])


def test_patient_with_films_in_both_classes_stays_on_one_side() -> None:
    samples = fake_samples()
    samples += [Sample(Path(f"NORMAL/person{p}_bacteria_9999.jpeg"), 0) for p in range(150)]
    for seed in range(3):
        train, val = grouped_split(samples, 0.2, seed)
        assert {s.patient for s in train}.isdisjoint({s.patient for s in val})


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.1, 1.5])
def test_grouped_split_refuses_bad_fraction(bad: float) -> None:
    with pytest.raises(ValueError, match="val_fraction"):
        grouped_split(fake_samples(), bad, 0)


# --- layouts -----------------------------------------------------------------------------


def test_kaggle_root_and_split_folder_both_resolve(synthetic_root: Path) -> None:
    assert resolve_split(synthetic_root, "train") == synthetic_root / "train"
    assert resolve_split(synthetic_root, "test") == synthetic_root / "test"
    assert resolve_split(synthetic_root / "test", "test") == synthetic_root / "test"
    samples = list_split(synthetic_root / "test")
    assert Counter(s.label for s in samples) == {0: 12, 1: 12}
    assert all(s.path.parent.name == ("NORMAL", "PNEUMONIA")[s.label] for s in samples)


def test_list_split_finds_images_by_suffix_in_any_case_and_subfolder(tmp_path: Path) -> None:
    make_split(tmp_path, 2, seed=3, size=40)
    (tmp_path / "NORMAL" / "sub").mkdir()
    (tmp_path / "NORMAL" / "sub" / "IM-9999-0001.JPG").write_bytes(jpeg_bytes(0, 1, 40))
    (tmp_path / "NORMAL" / "x.png").write_bytes(encode(synthetic_xray(0, 2, 40), "PNG"))
    (tmp_path / "NORMAL" / ".hidden.jpeg").write_bytes(jpeg_bytes(0, 1, 40))
    (tmp_path / "NORMAL" / "notes.txt").write_text("not an image")
    names = {s.path.name for s in list_split(tmp_path) if s.label == 0}
    assert names == {"IM-3000-0000.jpeg", "IM-3000-0001.jpeg", "IM-9999-0001.JPG", "x.png"}


@pytest.mark.parametrize("missing", ["NORMAL", "PNEUMONIA"])
def test_missing_class_folder(tmp_path: Path, missing: str) -> None:
    make_split(tmp_path, 2, seed=3, size=40)
    for f in (tmp_path / missing).iterdir():
        f.unlink()
    (tmp_path / missing).rmdir()
    with pytest.raises(DatasetLayoutError) as e:
        list_split(resolve_split(tmp_path, "train"))
    msg = str(e.value)
    assert f"no {missing}/ folder" in msg
    assert "NORMAL/" in msg and "PNEUMONIA/" in msg  # says what was expected


def test_lowercase_class_folders_are_not_accepted(tmp_path: Path) -> None:
    (tmp_path / "normal").mkdir()
    (tmp_path / "pneumonia").mkdir()
    with pytest.raises(DatasetLayoutError, match="NORMAL/ and PNEUMONIA/"):
        resolve_split(tmp_path, "train")


@pytest.mark.parametrize("empty", ["NORMAL", "PNEUMONIA"])
def test_empty_class_folder(tmp_path: Path, empty: str) -> None:
    make_split(tmp_path, 2, seed=3, size=40)
    for f in (tmp_path / empty).iterdir():
        f.unlink()
    (tmp_path / empty / "readme.txt").write_text("no images here")
    with pytest.raises(DatasetLayoutError) as e:
        list_split(tmp_path)
    assert f"{empty} holds no images" in str(e.value)
    assert ".jpeg" in str(e.value)  # names the file types it looked for


@pytest.mark.parametrize("kind", ["file", "missing"])
def test_path_that_is_not_a_folder(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "data"
    if kind == "file":
        path.write_bytes(jpeg_bytes())
    for call in (lambda: list_split(path), lambda: resolve_split(path, "train")):
        with pytest.raises(DatasetLayoutError) as e:
            call()
        assert "is not a folder" in str(e.value)
        assert "NORMAL" in str(e.value)


def test_root_with_neither_split_nor_class_folders(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    with pytest.raises(DatasetLayoutError) as e:
        resolve_split(tmp_path, "test")
    msg = str(e.value)
    assert "neither test/ nor NORMAL/ and PNEUMONIA/" in msg
    assert "ROOT/{train,test}/{NORMAL,PNEUMONIA}/" in msg


# --- loading -------------------------------------------------------------------------------


def _split_with_bad_files(folder: Path) -> Path:
    make_split(folder, 3, seed=4, size=48)
    (folder / "PNEUMONIA" / "person9999_bacteria_1.jpeg").write_bytes(b"this is not a JPEG")
    (folder / "NORMAL" / "IM-9999-0001.png").write_bytes(b"")
    jpeg = jpeg_bytes(0, 5, 48)
    (folder / "NORMAL" / "IM-9998-0001.jpeg").write_bytes(jpeg[: len(jpeg) // 3])
    return folder


def test_unreadable_files_are_listed_and_skipped(tmp_path: Path) -> None:
    folder = _split_with_bad_files(tmp_path)
    samples = list_split(folder)
    loaded = load_images(samples, SPEC)
    assert len(samples) == 9
    assert {p.name: why for p, why in loaded.skipped}.keys() == {
        "person9999_bacteria_1.jpeg",
        "IM-9999-0001.png",
        "IM-9998-0001.jpeg",
    }
    reasons = " ".join(why for _, why in loaded.skipped)
    assert "empty" in reasons and "not a recognised image" in reasons and "decoded" in reasons
    assert loaded.x.shape == (6, *SPEC.input_shape)
    assert loaded.x.dtype == np.float32
    assert loaded.y.tolist() == [s.label for s in loaded.samples] == [0, 0, 0, 1, 1, 1]


def test_unreadable_files_are_counted_in_the_log(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = _split_with_bad_files(tmp_path)
    with caplog.at_level("WARNING", logger="pneumonia.data"):
        load_images(list_split(folder), SPEC)
    assert "skipped 3 unreadable image(s) of 9" in caplog.text


def test_nothing_readable_gives_an_empty_batch(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jpeg"
    bad.write_bytes(b"garbage")
    loaded = load_images([Sample(bad, 0), Sample(tmp_path / "gone.jpeg", 1)], SPEC)
    assert loaded.x.shape == (0, *SPEC.input_shape) and loaded.y.shape == (0,)
    assert [p.name for p, _ in loaded.skipped] == ["bad.jpeg", "gone.jpeg"]


def test_format_comes_from_the_bytes_not_the_name(tmp_path: Path) -> None:
    img = synthetic_xray(1, 3, 48)
    png_named_jpeg = tmp_path / "a.jpeg"
    png_named_jpeg.write_bytes(encode(img, "PNG"))
    reference = tmp_path / "b.png"
    reference.write_bytes(encode(img, "PNG"))
    loaded = load_images([Sample(png_named_jpeg, 1), Sample(reference, 1)], SPEC)
    assert loaded.skipped == []
    np.testing.assert_array_equal(loaded.x[0], loaded.x[1])


# --- the commands report skipped files ------------------------------------------------------


@pytest.mark.slow  # trains
def test_train_command_reports_skipped_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from pneumonia.cli import main

    folder = make_split(tmp_path / "data" / "train", 12, seed=6, size=40)
    (folder / "NORMAL" / "IM-9999-0001.jpeg").write_bytes(b"broken")
    run = tmp_path / "run"
    args = ["train", "--data", str(tmp_path / "data"), "--out", str(run), "--arch", "logreg"]
    args += ["--size", "32", "--epochs", "1", "--threads", "1", "--no-augment", "--no-progress"]
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["skipped"] == 1
    data = json.loads((run / "data.json").read_text())
    assert [Path(p).name for p, _ in data["skipped"]] == ["IM-9999-0001.jpeg"]


def test_evaluate_command_reports_skipped_files(
    tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from pneumonia.cli import main

    folder = make_split(tmp_path / "test", 3, seed=8)
    (folder / "PNEUMONIA" / "person9999_virus_1.jpeg").write_bytes(b"broken")
    out = tmp_path / "report.json"
    args = ["evaluate", "--data", str(folder), "--json", str(out), "--model", str(tiny_model)]
    assert main([*args, "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["skipped"] == 1
    report = json.loads(out.read_text())
    assert report["n"] == 6
    assert [Path(p).name for p, _ in report["skipped"]] == ["person9999_virus_1.jpeg"]


def test_evaluate_command_skips_and_counts_damaged_files(
    tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 13: a damaged file is skipped and counted by evaluate, as an unreadable one is."""
    from pneumonia.cli import main

    folder = make_split(tmp_path / "test", 3, seed=8)
    png = encode(synthetic_xray(0, 9, 48), "PNG")
    (folder / "NORMAL" / "IM-9999-0001.png").write_bytes(damage_png(png, b"IHDR"))
    out = tmp_path / "report.json"
    args = ["evaluate", "--data", str(folder), "--json", str(out), "--model", str(tiny_model)]
    assert main([*args, "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["skipped"] == 1
    report = json.loads(out.read_text())
    assert report["n"] == 6
    [(path, why)] = report["skipped"]
    assert Path(path).name == "IM-9999-0001.png" and "CRC of its IHDR chunk" in why


def test_commands_stop_with_the_layout_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from pneumonia.cli import main

    (tmp_path / "empty").mkdir()
    args = ["train", "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "run")]
    assert main(args) == 2
    assert "expected the Kaggle layout" in capsys.readouterr().err
