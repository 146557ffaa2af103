"""`pneumonia score`: inputs, one row per image, errors as rows, resume, both engines."""

from __future__ import annotations

import csv
import hashlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from benchmarks.common import damage_png, dicom_bytes
from conftest import encode, jpeg_bytes, make_split, synthetic_xray
from pneumonia.cli import main
from pneumonia.predictor import Predictor
from pneumonia.score import ScoreError, ScoreRow, open_input, score_archive
from pneumonia.score.output import format_for

GOOD = 11  # images in the archive that decode
ERRORS = {
    "broken.jpeg": "undecodable_image",
    "notes.jpg": "unsupported_format",
    "empty.png": "empty_file",
}


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A messy folder tree: nested JPEGs, a PNG, DICOM with and without suffix, bad files."""
    root = tmp_path_factory.mktemp("archive")
    make_split(root / "2019", 4, seed=3)
    deep = root / "2020" / "ward b"
    deep.mkdir(parents=True)
    (deep / "film.png").write_bytes(encode(synthetic_xray(1, 5), "PNG"))
    ramp = synthetic_xray(0, 6).astype(np.uint16) * 16
    (deep / "IM000001").write_bytes(dicom_bytes(ramp))  # DICOM archives often drop the suffix
    (deep / "scan.dcm").write_bytes(dicom_bytes(ramp, photometric="MONOCHROME1"))
    (root / "broken.jpeg").write_bytes(jpeg_bytes(seed=7)[:300])
    (root / "notes.jpg").write_bytes(b"not an image at all")
    (root / "empty.png").write_bytes(b"")
    (root / "README.txt").write_text("not scored: neither an image suffix nor DICOM")
    (root / ".hidden.jpeg").write_bytes(jpeg_bytes())
    return root


def read_rows(out: Path) -> list[ScoreRow]:
    _, batches = format_for(out).read(out)
    return [r for b in batches for r in b]


def run(source_path: Path, out: Path, model: Path, **kw: object) -> list[ScoreRow]:
    kw.setdefault("workers", 1)
    score_archive(open_input(source_path), out, model, **kw)  # type: ignore[arg-type]
    return read_rows(out)


def by_key(rows: list[ScoreRow]) -> dict[str, ScoreRow]:
    out = {r.key: r for r in rows}
    assert len(out) == len(rows), "duplicate keys"
    return out


def test_folder_gives_one_row_per_image_and_bad_files_as_error_rows(
    archive: Path, tiny_model: Path, tmp_path: Path
) -> None:
    rows = by_key(run(archive, tmp_path / "out.csv", tiny_model))
    assert "README.txt" not in rows and ".hidden.jpeg" not in rows
    assert "2020/ward b/IM000001" in rows and "2020/ward b/scan.dcm" in rows
    assert len(rows) == GOOD + len(ERRORS)
    predictor = Predictor(tiny_model)
    for key, row in rows.items():
        data = (archive / key).read_bytes()
        assert row.sha256 == hashlib.sha256(data).hexdigest()
        assert row.threshold == predictor.threshold and row.model_sha256 == predictor.sha256
        if key in ERRORS:
            assert (
                row.error_code == ERRORS[key] and row.prediction is None and row.p_pneumonia is None
            )
            continue
        assert row.error is None
        single = predictor.predict_bytes(data)  # the batched path must agree with one-by-one
        assert row.prediction == single.label
        assert row.p_pneumonia == pytest.approx(single.p_pneumonia, abs=1e-6)
        assert row.p_normal == pytest.approx(1.0 - row.p_pneumonia, abs=1e-12)


def test_pool_and_parquet_give_exactly_the_rows_of_one_process_and_csv(
    archive: Path, tiny_model: Path, tmp_path: Path
) -> None:
    pytest.importorskip("pyarrow", reason="Parquet output needs pyarrow (the `parquet` extra)")
    one = run(archive, tmp_path / "one.csv", tiny_model, workers=1, batch_size=4)
    pool = run(archive, tmp_path / "pool.parquet", tiny_model, workers=2, batch_size=4)
    assert pool == one  # same order, same floats: CSV keeps full precision


def test_damaged_files_are_error_rows_naming_the_check(tiny_model: Path, tmp_path: Path) -> None:
    """Issue 13: a damaged file is an error row (code corrupt_image), never a prediction."""
    png = encode(synthetic_xray(1, 5), "PNG")
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "good.png").write_bytes(png)
    (tmp_path / "in" / "bad-crc.png").write_bytes(damage_png(png, b"IDAT"))
    (tmp_path / "in" / "bad-adler.png").write_bytes(damage_png(png, b"IDAT", "adler"))
    (tmp_path / "in" / "cut.jpeg").write_bytes(jpeg_bytes()[:-2])
    rows = by_key(run(tmp_path / "in", tmp_path / "out.csv", tiny_model))
    assert rows["good.png"].error is None and rows["good.png"].prediction is not None
    for key, check in [
        ("bad-crc.png", "CRC"),
        ("bad-adler.png", "Adler-32"),
        ("cut.jpeg", "end-of-image"),
    ]:
        row = rows[key]
        assert row.error_code == "corrupt_image" and row.prediction is None, row
        assert check in (row.error or ""), row


def test_manifest_paths_are_keys_as_written_and_missing_files_are_error_rows(
    archive: Path, tiny_model: Path, tmp_path: Path
) -> None:
    manifest = archive / "manifest_test.csv"
    films = [
        "2019/NORMAL/IM-3000-0000.jpeg",
        str(archive / "2020/ward b/film.png"),
        "gone/missing.jpeg",
    ]
    with manifest.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["film", "site"])
        w.writerows([p, "A"] for p in films)
    try:
        with pytest.raises(ScoreError, match="--path-column"):
            open_input(manifest)
        score_archive(
            open_input(manifest, path_column="film"), tmp_path / "m.csv", tiny_model, workers=1
        )
    finally:
        manifest.unlink()
    rows = by_key(read_rows(tmp_path / "m.csv"))
    assert list(rows) == films
    assert (
        rows["gone/missing.jpeg"].error
        == "unreadable_file: cannot read the file: No such file or directory"
    )
    folder = by_key(run(archive, tmp_path / "f.csv", tiny_model))
    assert rows[films[0]].p_pneumonia == pytest.approx(folder[films[0]].p_pneumonia, abs=1e-6)


def write_bytes_parquet(
    path: Path, archive: Path, id_col: str = "film_id", bytes_col: str = "image"
) -> dict[str, str]:
    """A Parquet of (int id, bytes) for every file of the archive plus a null; id -> file key."""
    pa = pytest.importorskip("pyarrow", reason="Parquet input needs pyarrow (the `parquet` extra)")
    import pyarrow.parquet as pq

    files = sorted(
        p
        for p in archive.rglob("*")
        if p.is_file() and not p.name.startswith(".") and p.suffix != ".txt"
    )
    ids = [*range(100, 100 + len(files)), 999]
    blobs = [p.read_bytes() for p in files] + [None]
    table = pa.table(
        {
            id_col: pa.array(ids, pa.int64()),
            "site": ["A"] * len(ids),
            bytes_col: pa.array(blobs, pa.binary()),
        }
    )
    pq.write_table(table, path, row_group_size=5)
    return {str(i): p.relative_to(archive).as_posix() for i, p in zip(ids, files, strict=False)}


def test_parquet_of_bytes_is_keyed_by_id_and_matches_the_files(
    archive: Path, tiny_model: Path, tmp_path: Path
) -> None:
    src = tmp_path / "etl.parquet"
    id_to_key = write_bytes_parquet(src, archive)
    with pytest.raises(ScoreError, match="--id-column"):
        open_input(src)
    score_archive(open_input(src, id_column="film_id"), tmp_path / "etl.csv", tiny_model, workers=1)
    rows = by_key(read_rows(tmp_path / "etl.csv"))
    with (tmp_path / "etl.csv").open() as f:
        assert f.readline().startswith(
            "id,sha256,prediction,p_normal,p_pneumonia,threshold,model_sha256,input_check,error"
        )
    assert rows["999"].error_code == "empty_file"
    files = by_key(run(archive, tmp_path / "files.csv", tiny_model))
    for i, key in id_to_key.items():
        assert rows[i].sha256 == files[key].sha256 and rows[i].error_code == files[key].error_code
        if rows[i].error is None:
            assert rows[i].p_pneumonia == pytest.approx(files[key].p_pneumonia, abs=1e-6)


def test_parquet_with_two_binary_columns_asks_which(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(
        pa.table({"id": [1], "a": pa.array([b"x"]), "b": pa.array([b"y"])}), tmp_path / "x.parquet"
    )
    with pytest.raises(ScoreError, match="--bytes-column"):
        open_input(tmp_path / "x.parquet")
    assert open_input(tmp_path / "x.parquet", bytes_column="b").bytes_column == "b"  # type: ignore[union-attr]


class Interrupt:
    """Wraps score_items and raises KeyboardInterrupt on its ``n``-th call (a Ctrl-C mid-run)."""

    def __init__(self, real: object, n: int) -> None:
        self.real, self.n, self.calls = real, n, 0

    def __call__(self, *a: object) -> list[ScoreRow]:
        self.calls += 1
        if self.calls == self.n:
            raise KeyboardInterrupt
        return self.real(*a)  # type: ignore[operator]


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_rerun_after_interrupt_finishes_with_exactly_the_rows_of_an_uninterrupted_run(
    archive: Path, tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, suffix: str
) -> None:
    if suffix == ".parquet":
        pytest.importorskip("pyarrow")
    import pneumonia.score.local as local

    kw = {"batch_size": 2, "part_rows": 3}
    reference = tmp_path / f"ref{suffix}"
    run(archive, reference, tiny_model, **kw)
    out = tmp_path / f"out{suffix}"
    stop = Interrupt(local.score_items, 4)
    monkeypatch.setattr(local, "score_items", stop)
    with pytest.raises(KeyboardInterrupt):
        run(archive, out, tiny_model, **kw)
    monkeypatch.undo()
    assert not out.exists()
    parts = sorted(
        p.name for p in out.with_name(out.name + ".parts").iterdir() if p.suffix == suffix
    )
    assert parts == [f"part-00001{suffix}", f"part-00002{suffix}"]  # 6 rows: 3 batches of 2
    summary = score_archive(open_input(archive), out, tiny_model, workers=1, **kw)  # type: ignore[arg-type]
    assert (summary.resumed, summary.scored, summary.rows) == (
        6,
        GOOD + len(ERRORS) - 6,
        GOOD + len(ERRORS),
    )
    assert read_rows(out) == read_rows(reference)
    if suffix == ".csv":
        assert out.read_bytes() == reference.read_bytes()
    assert not out.with_name(out.name + ".parts").exists()


def test_crash_between_commit_and_cleanup_leaves_no_duplicates(
    archive: Path, tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Guards the window where OUT was renamed into place but OUT.parts/ still holds its rows."""
    import pneumonia.score.output as output

    reference = tmp_path / "ref.csv"
    run(archive, reference, tiny_model, part_rows=4)
    out = tmp_path / "out.csv"

    def crash(path: object) -> None:
        raise OSError("killed")

    monkeypatch.setattr(output.shutil, "rmtree", crash)
    with pytest.raises(OSError, match="killed"):
        run(archive, out, tiny_model, part_rows=4)
    monkeypatch.undo()
    parts = out.with_name(out.name + ".parts")
    assert out.read_bytes() == reference.read_bytes() and any(parts.glob("part-*.csv"))
    (parts / "part-00099.csv.tmp").write_text("half a part from a killed run")
    summary = score_archive(open_input(archive), out, tiny_model, workers=1)
    assert (summary.scored, summary.rows) == (0, GOOD + len(ERRORS))
    assert out.read_bytes() == reference.read_bytes()
    assert not parts.exists()


def test_output_of_another_model_is_refused(
    archive: Path, tiny_model: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out.csv"
    run(archive, out, tiny_model)
    sha = Predictor(tiny_model).sha256
    out.write_text(out.read_text().replace(sha, "0" * 64))
    with pytest.raises(ScoreError, match="another --out"):
        run(archive, out, tiny_model)


def test_output_keyed_differently_is_refused(
    archive: Path, tiny_model: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out.csv"
    out.write_text(
        "id,sha256,prediction,p_normal,p_pneumonia,threshold,model_sha256,input_check,error\n"
    )
    with pytest.raises(ScoreError, match="keyed by 'id'"):
        run(archive, out, tiny_model)


def test_output_of_an_older_version_is_refused_not_misread(
    archive: Path, tiny_model: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out.csv"  # the columns before input_check existed
    out.write_text("path,sha256,prediction,p_normal,p_pneumonia,threshold,model_sha256,error\n")
    with pytest.raises(ScoreError, match="another version"):
        run(archive, out, tiny_model)


def test_csv_works_without_pyarrow_and_parquet_says_how_to_get_it(
    archive: Path, tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("pyarrow", "pyarrow.parquet", "pyarrow.dataset"):
        monkeypatch.setitem(sys.modules, name, None)  # import now raises ImportError
    assert len(run(archive, tmp_path / "out.csv", tiny_model)) == GOOD + len(ERRORS)
    with pytest.raises(ScoreError, match=r"pip install 'pneumonia-detection\[parquet\]'"):
        run(archive, tmp_path / "out.parquet", tiny_model)


def test_unknown_inputs_and_outputs_are_refused(
    archive: Path, tiny_model: Path, tmp_path: Path
) -> None:
    with pytest.raises(ScoreError, match="does not exist"):
        open_input(tmp_path / "nowhere")
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(ScoreError, match="must be a folder"):
        open_input(tmp_path / "x.json")
    with pytest.raises(ScoreError, match=r"\.parquet or \.csv"):
        run(archive, tmp_path / "out.xlsx", tiny_model)


def test_cli_scores_prints_a_summary_and_a_rerun_does_nothing(
    archive: Path, tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out.csv"
    argv = [
        "score",
        str(archive),
        "--out",
        str(out),
        "--model",
        str(tiny_model),
        "--workers",
        "1",
        "--no-progress",
    ]
    assert main(argv) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["rows"] == first["scored"] == GOOD + len(ERRORS) and first["resumed"] == 0
    assert sum(first["labels"].values()) == GOOD
    assert first["errors"] == {"empty_file": 1, "undecodable_image": 1, "unsupported_format": 1}
    content = out.read_bytes()
    assert main(argv) == 0
    second = json.loads(capsys.readouterr().out)
    assert (second["scored"], second["resumed"], second["rows"]) == (
        0,
        GOOD + len(ERRORS),
        GOOD + len(ERRORS),
    )
    assert second["labels"] == first["labels"] and out.read_bytes() == content
    assert (
        main([*argv[:4], "--engine", "local", "--address", "x:1", "--model", str(tiny_model)]) == 2
    )


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_on_the_process_pool_then_rerun_completes_the_file(
    archive: Path, tiny_model: Path, tmp_path: Path, sig: signal.Signals
) -> None:
    """The first signal stops the job after the batch in hand; the rerun finishes it."""
    big = tmp_path / "big"
    files = sorted(p for p in (archive / "2019").rglob("*.jpeg"))
    for k in range(60):  # 480 links: long enough to interrupt, cheap to make
        d = big / f"copy{k:02d}"
        d.mkdir(parents=True)
        for p in files:
            (d / p.name).symlink_to(p)
    out = tmp_path / "out.csv"
    cmd = [
        sys.executable,
        "-m",
        "pneumonia.cli",
        "score",
        str(big),
        "--out",
        str(out),
        "--model",
        str(tiny_model),
    ]
    cmd += ["--workers", "2", "--batch-size", "4", "--part-rows", "8", "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    parts = out.with_name(out.name + ".parts")
    deadline = time.monotonic() + 60
    while not any(parts.glob("part-*.csv")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    if proc.returncode == 0:
        pytest.fail("the run finished before it could be interrupted; give it more images")
    assert proc.returncode == 130, err
    assert "rerun the same command" in err and not out.exists()
    done = sum(1 for p in parts.glob("part-*.csv") for _ in p.open()) - len(
        list(parts.glob("part-*.csv"))
    )
    assert 0 < done < len(files) * 60
    assert subprocess.run(cmd, capture_output=True, timeout=120).returncode == 0
    rows = read_rows(out)
    assert sorted(r.key for r in rows) == sorted(
        p.relative_to(big).as_posix() for p in big.rglob("*.jpeg")
    )
    assert len({r.key for r in rows}) == len(rows)
    reference = tmp_path / "ref.csv"
    score_archive(open_input(big), reference, tiny_model, workers=1, batch_size=4)
    assert rows == read_rows(reference)


# --- Ray engine ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_local() -> object:
    ray = pytest.importorskip(
        "ray",
        reason="Ray is not installed; `pip install '.[ray]'` to test the Ray engine",
    )
    ray.init(num_cpus=3, include_dashboard=False, logging_level="ERROR")  # 2 actors + 1 reader
    yield ray
    ray.shutdown()


@pytest.mark.slow
def test_ray_engine_gives_the_rows_of_the_local_engine(
    archive: Path, tiny_model: Path, tmp_path: Path, ray_local: object
) -> None:
    local = run(archive, tmp_path / "local.csv", tiny_model, batch_size=4)
    on_ray = run(
        archive, tmp_path / "ray.parquet", tiny_model, engine="ray", batch_size=4, workers=None
    )
    assert [r.key for r in on_ray] == [r.key for r in local]
    for a, b in zip(on_ray, local, strict=True):
        assert a._replace(p_normal=None, p_pneumonia=None) == b._replace(
            p_normal=None, p_pneumonia=None
        )
        if a.error is None:
            assert a.p_pneumonia == pytest.approx(b.p_pneumonia, abs=1e-6)


@pytest.mark.slow
def test_ray_engine_reads_parquet_bytes_and_resumes_a_local_run(
    archive: Path,
    tiny_model: Path,
    tmp_path: Path,
    ray_local: object,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import pneumonia.score.local as local

    src = tmp_path / "etl.parquet"
    write_bytes_parquet(src, archive, id_col="id", bytes_col="bytes")
    reference = run(src, tmp_path / "ref.csv", tiny_model, batch_size=3)
    out = tmp_path / "out.csv"
    monkeypatch.setattr(local, "score_items", Interrupt(local.score_items, 3))
    with pytest.raises(KeyboardInterrupt):
        run(src, out, tiny_model, batch_size=3, part_rows=2)
    monkeypatch.undo()
    summary = score_archive(open_input(src), out, tiny_model, engine="ray", batch_size=3)
    assert summary.resumed == 6 and summary.rows == len(reference)
    rows = read_rows(out)
    assert [r.key for r in rows] == [r.key for r in reference]
    for a, b in zip(rows, reference, strict=True):
        assert (a.sha256, a.prediction, a.error) == (b.sha256, b.prediction, b.error)
        if a.error is None:
            assert a.p_pneumonia == pytest.approx(b.p_pneumonia, abs=1e-6)
