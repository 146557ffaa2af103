"""`pneumonia score dicomweb:URL` against a real PACS: Orthanc and its DICOMweb plugin, started
here from the Debian packages (skipped, saying how to install them, where they are absent;
failed instead in CI, CI=true). Films are uploaded, scored over DICOMweb, reports written back
and read back; the connection's failures each give their own clear error.

The unit tests at the top need no server.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from benchmarks.common import Orthanc, film_dicom, find_orthanc, free_port
from conftest import SHARED_DATA, synthetic_xray
from pneumonia.cli import main
from pneumonia.predictor import Predictor, shipped_model_path
from pneumonia.score import ScoreError, ScoreRow, open_input, score_archive
from pneumonia.score.dicomweb import (
    RETRIEVE_FAILED,
    SKIPPED,
    DicomWebSettings,
    DicomWebSource,
    Instance,
    Query,
    _multipart_parts,
)
from pneumonia.score.output import format_for
from pneumonia.score.pacs import _since, score_pacs, study_rows, watch_pacs
from pneumonia.score.report import (
    ModelIdentity,
    derived_uid,
    heatmap_uid,
    model_identity,
    report_uids,
)

PATIENT = ("Quixotlewaite^Zebrandine", "PID-7QX3-ZEBRA-5512")
SECRETS = (PATIENT[0], *PATIENT[0].split("^"), PATIENT[1])


def read_rows(out: Path) -> list[ScoreRow]:
    _, batches = format_for(out).read(out)
    return [r for b in batches for r in b]


# --- no server -------------------------------------------------------------------------------


LATERAL = "its DICOM header says ViewPosition LL, a lateral view"
HAND = "its DICOM header says BodyPartExamined HAND, not the chest"


@pytest.mark.parametrize(
    ("body", "view", "reason"),
    [
        ("CHEST", "PA", None),
        ("chest", "ap", None),
        ("", "", None),  # the PACS records neither: retrieved, the image check judges it
        ("THORAX", "", None),  # not named as another part: not held against it
        ("", "PA", None),
        ("CHEST", "LL", LATERAL),
        ("HAND", "PA", HAND),
        ("ABDOMEN", "", "its DICOM header says BodyPartExamined ABDOMEN, not the chest"),
    ],
)
def test_what_the_pacs_records_as_not_frontal_chest_is_skipped(
    body: str, view: str, reason: str | None
) -> None:
    """By the frontal-chest check's own header rule (pneumonia.frontal), its one owner."""
    assert Instance("1", "2", "3", body_part=body, view=view).skip_reason() == reason


@pytest.mark.parametrize("bad", ["2026-01-01", "202601", "-", "", "20260101-2026"])
def test_a_bad_study_date_is_refused_naming_the_forms(bad: str) -> None:
    with pytest.raises(ScoreError, match="YYYYMMDD-YYYYMMDD"):
        Query(study_date=bad)


def test_settings_are_checked_at_the_boundary(tmp_path: Path) -> None:
    with pytest.raises(ScoreError, match="not a DICOMweb base URL"):
        DicomWebSettings("pacs.example.org/dicom-web")
    with pytest.raises(ScoreError, match="the URL holds credentials") as err:
        DicomWebSettings("https://alice:hunter2@pacs/dicom-web")
    assert "hunter2" not in str(err.value)
    with pytest.raises(ScoreError, match="not both"):
        DicomWebSettings("https://pacs", user="a", password="b", token="t")
    with pytest.raises(ScoreError, match="go together"):
        DicomWebSettings("https://pacs", user="a")
    with pytest.raises(ScoreError, match="is not a file"):
        DicomWebSettings("https://pacs", ca_bundle=str(tmp_path / "missing.pem"))
    env = {"DICOMWEB_TOKEN": "tok", "DICOMWEB_CA_BUNDLE": ""}
    s = DicomWebSettings.from_env("https://pacs/dicom-web/", env)
    assert (s.url, s.token, s.user, s.ca_bundle) == ("https://pacs/dicom-web", "tok", None, None)
    assert "tok" not in repr(s)  # secrets stay out of logs and tracebacks
    session = s.session()
    assert session.headers["Authorization"] == "Bearer tok"
    assert session.verify is True  # TLS verified by default, and no switch turns it off


def test_multipart_answer_is_split_into_its_parts() -> None:
    body = (
        b"--XyZ\r\nContent-Type: application/dicom\r\n\r\nDICM-one\r\n"
        b"--XyZ\r\nContent-Type: application/dicom\r\n\r\n\r\nbytes--XyZ\r\n--XyZ--\r\n"
    )
    ctype = 'multipart/related; type="application/dicom"; boundary="XyZ"'
    assert _multipart_parts(ctype, body) == [b"DICM-one", b"\r\nbytes--XyZ"]
    assert _multipart_parts(ctype, b"--XyZ\r\n\r\n\r\n--XyZ--") == [b""]
    with pytest.raises(ValueError, match="boundary"):
        _multipart_parts("multipart/related", body)
    with pytest.raises(ValueError, match="cut short"):
        _multipart_parts(ctype, body[: body.rindex(b"\r\n--XyZ--")])


def test_report_uids_depend_on_the_weights_operating_point_and_film_only() -> None:
    header = pydicom.Dataset()
    header.SeriesInstanceUID, header.SOPInstanceUID = "1.2.3", "1.2.3.4"
    a = ModelIdentity("m", "1", "a" * 64, "1.0/0.0/0.5")
    assert report_uids(a, header) == report_uids(
        ModelIdentity("renamed", "2", "a" * 64, "1.0/0.0/0.5"), header
    )
    assert report_uids(a, header) != report_uids(
        ModelIdentity("m", "1", "b" * 64, "1.0/0.0/0.5"), header
    )
    # A site model recalibrated on the same weights answers differently: its own reports.
    assert report_uids(a, header) != report_uids(
        ModelIdentity("m", "1", "a" * 64, "1.2/0.3/0.6"), header
    )
    series, sop = report_uids(a, header)
    assert series != sop and sop.startswith("2.25.") and len(sop) <= 64
    assert derived_uid("x", "y") == derived_uid("x", "y") != derived_uid("xy")


def test_reports_keep_their_uids_when_only_the_card_changes(
    tiny_model: Path, tmp_path: Path
) -> None:
    """The UIDs come from the weights digest (pneumonia.card), not the file's sha256, which a
    card rewrite changes: a re-carded model rewrites the same reports instead of adding more."""
    from pneumonia.card import CARD_METADATA_KEY, ModelCard, read_metadata, with_metadata

    data = tiny_model.read_bytes()
    props = read_metadata(data)
    card = ModelCard.from_json(props[CARD_METADATA_KEY]).with_(version="9.9.9")
    recarded = tmp_path / "recarded.onnx"
    recarded.write_bytes(with_metadata(data, {**props, CARD_METADATA_KEY: card.to_json()}))
    before, after = Predictor(tiny_model), Predictor(recarded)
    assert before.sha256 != after.sha256
    a, b = model_identity(before), model_identity(after)
    assert (a.weights_sha256, a.version, b.version) == (
        before.weights_sha256,
        before.version,
        "9.9.9",
    )
    header = pydicom.Dataset()
    header.SeriesInstanceUID, header.SOPInstanceUID = "1.2.3", "1.2.3.4"
    assert report_uids(a, header) == report_uids(b, header)


def test_a_model_without_a_weights_digest_writes_no_report() -> None:
    class Undigested:
        path = Path("old.onnx")

        def identity(self) -> dict[str, str]:
            return {
                "name": "m",
                "version": "1",
                "sha256": "a" * 64,
                "weights_sha256": "not recorded",
            }

    with pytest.raises(ScoreError, match=r"has no weights digest .* re-export"):
        model_identity(Undigested())  # type: ignore[arg-type]


def test_watch_asks_only_for_studies_from_the_newest_date_seen() -> None:
    assert _since(Query(), "") == Query()
    assert _since(Query(), "20260105101010") == Query(study_date="20260105-")
    assert _since(Query(study_date="20260101-20260131"), "20260105") == Query(
        study_date="20260105-20260131"
    )
    assert _since(Query(study_date="20260110-"), "20260105") == Query(study_date="20260110-")


@pytest.fixture()
def tls_server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """An HTTPS server with a self-signed certificate for 127.0.0.1 that answers every QIDO
    search with no instances: (its DICOMweb URL, the certificate's PEM file)."""
    import http.server
    import ssl
    import threading

    if shutil.which("openssl") is None:
        pytest.skip("no openssl to make a certificate with")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subject = ["-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"]
    files = ["-keyout", str(key), "-out", str(cert)]
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            *subject,
            *files,
        ],
        check=True,
        capture_output=True,
    )

    class Qido(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/dicom+json")
            self.end_headers()
            self.wfile.write(b"[]")

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Qido)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{server.server_address[1]}/dicom-web", cert
    finally:
        server.shutdown()
        server.server_close()


def test_tls_is_verified_and_a_private_ca_is_named_by_the_environment(
    tls_server: tuple[str, Path],
) -> None:
    url, cert = tls_server
    with pytest.raises(ScoreError, match=r"could not be verified .* set DICOMWEB_CA_BUNDLE"):
        DicomWebSource.open(DicomWebSettings(url, timeout=5))
    trusted = DicomWebSettings.from_env(url, {"DICOMWEB_CA_BUNDLE": str(cert)}, timeout=5)
    assert DicomWebSource.open(trusted).instances == []


# --- a real PACS -----------------------------------------------------------------------------


def require(tool: str, found: str | None) -> None:
    """Skip without ``tool``, saying how to get it; fail in CI, which must run these."""
    if found is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"{found}; CI must run the PACS tests (.ci/run installs {tool})")
    pytest.skip(found)


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    found = find_orthanc()
    require("orthanc orthanc-dicomweb", found if isinstance(found, str) else None)
    with Orthanc(tmp_path_factory.mktemp("orthanc")) as server:
        yield server


def settings(pacs: Orthanc, **kw: Any) -> DicomWebSettings:
    kw.setdefault("user", pacs.user)
    kw.setdefault("password", pacs.password)
    return DicomWebSettings(pacs.dicomweb, **kw)


def film(seed: int, **kw: Any) -> bytes:
    return film_dicom(synthetic_xray(seed % 2, seed, 128), patient=PATIENT, **kw)


@pytest.fixture(scope="module")
def study(pacs: Orthanc, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """One study on the PACS (and each file in a folder too): five frontal films (CR and DX, one
    without body part or view), a lateral, a hand, and a CR instance without pixel data."""
    uid = generate_uid()
    folder = tmp_path_factory.mktemp("study")
    films = [
        film(1, study=uid),
        film(2, study=uid),
        film(3, study=uid, modality="DX", view="AP"),
        film(4, study=uid, modality="DX"),
        film(5, study=uid, body_part=None, view=None),
        film(6, study=uid, view="LL"),
        film(7, study=uid, body_part="HAND"),
        film_dicom(None, study=uid, patient=PATIENT),
    ]
    for data in films:
        pacs.upload(data)
        sop = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).SOPInstanceUID
        (folder / f"{sop}.dcm").write_bytes(data)
    return uid, folder


pacs_test = pytest.mark.slow


@pacs_test
def test_films_from_the_pacs_score_like_the_same_files_from_a_folder(
    pacs: Orthanc, study: tuple[str, Path], tiny_model: Path, tmp_path: Path
) -> None:
    uid, folder = study
    summary = score_pacs(
        settings(pacs), Query(study_uid=uid), tmp_path / "pacs.csv", tiny_model, workers=1
    )
    assert summary.found == 8 and summary.job.rows == 8
    rows = {r.key.split("/")[2]: r for r in read_rows(tmp_path / "pacs.csv")}
    assert all(r.key.split("/")[0] == uid for r in rows.values())
    score_archive(open_input(folder), tmp_path / "folder.csv", tiny_model, workers=1)
    local = {r.key.removesuffix(".dcm"): r for r in read_rows(tmp_path / "folder.csv")}
    reasons = {}
    for sop, row in rows.items():
        if row.error_code == SKIPPED:
            reasons[sop] = row.error
            continue
        # The very bytes the PACS was given, decoded and scored alike (up to the float noise
        # of another batch composition, as between any two runs of `pneumonia score`).
        same = local[sop]
        assert row._replace(key="", p_normal=0, p_pneumonia=0) == same._replace(
            key="", p_normal=0, p_pneumonia=0
        ), sop
        assert row.p_pneumonia == pytest.approx(same.p_pneumonia, abs=1e-6), sop
    assert sorted(reasons.values()) == [f"{SKIPPED}: {HAND}", f"{SKIPPED}: {LATERAL}"]
    scored = [r for r in rows.values() if r.prediction is not None]
    failed = [r for r in rows.values() if r.error and r.error_code != SKIPPED]
    assert len(scored) == 5 and len(failed) == 1  # the instance that is not an image
    assert failed[0].sha256 is not None and "pixel" in failed[0].error.lower()
    (per_study,) = study_rows(tmp_path / "pacs.csv")
    assert per_study["study"] == uid
    assert {k: per_study[k] for k in ("instances", "scored", "skipped", "refused", "errors")} == {
        "instances": 8,
        "scored": 5,
        "skipped": 2,
        "refused": 0,
        "errors": 1,
    }
    assert per_study["max_p_pneumonia"] == max(r.p_pneumonia for r in scored if r.p_pneumonia)
    assert summary.studies.read_text().splitlines()[1].startswith(uid + ",8,5,")


def content_items(ds: Any) -> Iterator[Any]:
    """Every content item of an SR tree, depth first."""
    for item in ds.get("ContentSequence", []):
        yield item
        yield from content_items(item)


def concept(item: Any) -> str:
    return str(item.ConceptNameCodeSequence[0].CodeValue)


def sr_instances(pacs: Orthanc, study: str) -> list[Any]:
    client = settings(pacs).client()
    found = client.search_for_instances(study_instance_uid=study, search_filters={"Modality": "SR"})
    return [
        client.retrieve_instance(study, r["0020000E"]["Value"][0], r["00080018"]["Value"][0])
        for r in found
    ]


def check_report(report: Any, row: ScoreRow, source: Any, model: ModelIdentity) -> None:
    """``report`` says what ``row`` says about ``source``'s film, and which model said it."""
    assert report.Modality == "SR" and report.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.33"
    assert (report.SeriesInstanceUID, report.SOPInstanceUID) == report_uids(model, source)
    assert report.StudyInstanceUID == source.StudyInstanceUID
    assert (str(report.PatientName), report.PatientID) == PATIENT  # filed with the patient
    assert report.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    assert report.VerificationFlag == "UNVERIFIED"
    evidence = report.CurrentRequestedProcedureEvidenceSequence[0]
    ref = evidence.ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert ref.ReferencedSOPInstanceUID == source.SOPInstanceUID
    items = list(content_items(report))
    images = [i for i in items if i.ValueType == "IMAGE"]
    assert [i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for i in images] == [
        source.SOPInstanceUID
    ]
    nums = {
        concept(i): float(i.MeasuredValueSequence[0].NumericValue)
        for i in items
        if i.ValueType == "NUM"
    }
    assert nums["p-pneumonia"] == pytest.approx(row.p_pneumonia, abs=1e-9)
    assert nums["threshold"] == pytest.approx(row.threshold, abs=1e-9)
    codes = {concept(i): i.ConceptCodeSequence[0].CodeValue for i in items if i.ValueType == "CODE"}
    present = {"PNEUMONIA": "52101004", "NORMAL": "2667000"}[row.prediction or ""]
    assert codes["233604007"] == present  # Pneumonia: present / absent
    assert codes["input-check"] == row.input_check
    texts = {concept(i): str(i.TextValue) for i in items if i.ValueType == "TEXT"}
    assert texts["111001"] == model.name  # Algorithm Name
    assert texts["111003"] == model.version  # Algorithm Version
    params = [str(i.TextValue) for i in items if i.ValueType == "TEXT" and concept(i) == "111002"]
    assert f"weights sha256 {model.weights_sha256}" in params


def dciodvfy_errors(report: Any, folder: Path) -> list[str]:
    require(
        "dicom3tools",
        None if shutil.which("dciodvfy") else "no dciodvfy (apt-get install dicom3tools)",
    )
    path = folder / f"{report.SOPInstanceUID}.dcm"
    report.save_as(path, enforce_file_format=True)
    out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, check=False)
    return [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]


@pacs_test
def test_write_back_stores_one_report_per_scored_film_once(
    pacs: Orthanc, tiny_model: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    uid = generate_uid()
    films = [film(11, study=uid), film(12, study=uid, modality="DX", view="AP")]
    films += [film(13, study=uid, view="LATERAL"), film_dicom(None, study=uid, patient=PATIENT)]
    for data in films:
        pacs.upload(data)
    headers = {
        h.SOPInstanceUID: h
        for h in (pydicom.dcmread(io.BytesIO(d), stop_before_pixels=True) for d in films)
    }
    out = tmp_path / "scores.parquet"
    first = score_pacs(
        settings(pacs), Query(study_uid=uid), out, tiny_model, write_back=True, workers=1
    )
    assert (first.job.rows, first.reports_stored) == (4, 2)
    rows = {r.key.split("/")[2]: r for r in read_rows(out)}
    model = model_identity(Predictor(tiny_model))
    reports = sr_instances(pacs, uid)
    assert len(reports) == 2  # none for the lateral film or the instance that is not an image
    for report in reports:
        (image,) = [i for i in content_items(report) if i.ValueType == "IMAGE"]
        sop = image.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        check_report(report, rows[sop], headers[sop], model)
    assert dciodvfy_errors(reports[0], tmp_path) == []

    count = pacs.instance_count()
    again = score_pacs(
        settings(pacs), Query(study_uid=uid), out, tiny_model, write_back=True, workers=1
    )
    assert (again.job.scored, again.job.resumed, again.reports_stored) == (0, 4, 0)
    # A fresh OUT scores and stores everything again, under the same UIDs: nothing new.
    fresh = score_pacs(
        settings(pacs),
        Query(study_uid=uid),
        tmp_path / "fresh.csv",
        tiny_model,
        write_back=True,
        workers=1,
    )
    assert fresh.reports_stored == 2
    assert pacs.instance_count() == count
    assert sorted(r.SOPInstanceUID for r in sr_instances(pacs, uid)) == sorted(
        r.SOPInstanceUID for r in reports
    )
    leaked = [s for s in SECRETS if s in caplog.text]
    assert not leaked, f"patient data in the logs: {leaked}"


@pacs_test
def test_wrong_password_dead_server_and_missing_instance_each_say_so(
    pacs: Orthanc, tiny_model: Path, tmp_path: Path
) -> None:
    with pytest.raises(
        ScoreError, match=r"answered 401 Unauthorized to DICOMWEB_USER/DICOMWEB_PASSWORD"
    ):
        score_pacs(
            settings(pacs, password="wrong"), Query(), tmp_path / "a.csv", tiny_model, workers=1
        )
    with pytest.raises(ScoreError, match="answered 401 Unauthorized to no credentials"):
        score_pacs(
            settings(pacs, user=None, password=None),
            Query(),
            tmp_path / "a.csv",
            tiny_model,
            workers=1,
        )
    dead = DicomWebSettings(f"http://127.0.0.1:{free_port()}/dicom-web", timeout=2)
    with pytest.raises(ScoreError, match=r"is unreachable \(tried 4 times\); check the URL"):
        score_pacs(dead, Query(), tmp_path / "a.csv", tiny_model, workers=1)

    # An instance gone between the search and its retrieval: its row says so, the others score.
    uid = generate_uid()
    for seed in (21, 22, 23):
        pacs.upload(film(seed, study=uid))
    source = DicomWebSource.open(settings(pacs), Query(study_uid=uid))
    gone = source.instances[1]
    pacs.delete_instance(gone.sop)
    score_archive(source, tmp_path / "b.csv", tiny_model, workers=1)
    rows = {r.key: r for r in read_rows(tmp_path / "b.csv")}
    assert rows[gone.key].error == f"{RETRIEVE_FAILED}: WADO-RS answered HTTP 404 Not Found"
    assert sum(r.prediction is not None for r in rows.values()) == 2


@pacs_test
def test_cli_scores_a_pacs_with_credentials_from_the_environment(
    pacs: Orthanc,
    study: tuple[str, Path],
    tiny_model: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    uid, _ = study
    monkeypatch.setenv("DICOMWEB_USER", pacs.user)
    monkeypatch.setenv("DICOMWEB_PASSWORD", pacs.password)
    out = tmp_path / "scores.csv"
    argv = ["score", f"dicomweb:{pacs.dicomweb}", "--out", str(out), "--model", str(tiny_model)]
    argv += ["--workers", "1", "--no-progress", "--study-uid", uid, "--study-date", "20260101"]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["found"], summary["rows"], summary["reports_stored"]) == (8, 8, 0)
    assert summary["errors"][SKIPPED] == 2
    assert Path(summary["studies"]).is_file()
    monkeypatch.setenv("DICOMWEB_PASSWORD", "wrong")
    assert main([*argv[:4], "--out", str(tmp_path / "x.csv"), "--model", str(tiny_model)]) == 2
    err = capsys.readouterr().err
    assert "pneumonia score: error: cannot search for instances (QIDO-RS)" in err
    assert "401 Unauthorized" in err and "wrong" not in err
    assert main(["score", str(tmp_path), "--out", str(tmp_path / "y.csv"), "--write-back"]) == 2
    assert "--write-back only apply to a dicomweb: input" in capsys.readouterr().err


@pacs_test
def test_watch_scores_new_studies_at_each_poll(
    pacs: Orthanc, tiny_model: Path, tmp_path: Path
) -> None:
    accession = "WATCH-" + generate_uid()[-8:]
    first, second = generate_uid(), generate_uid()
    pacs.upload(film(31, study=first, study_date="20300101", AccessionNumber=accession))
    out = tmp_path / "watch.csv"
    polls = watch_pacs(
        settings(pacs),
        Query(accession=accession),
        out,
        tiny_model,
        interval=0,
        max_polls=2,
        workers=1,
    )
    one = next(polls)
    assert (one.found, one.job.scored) == (1, 1)
    pacs.upload(film(32, study=second, study_date="20300102", AccessionNumber=accession))
    two = next(polls)
    assert (two.found, two.job.scored, two.job.resumed) == (2, 1, 1)
    assert next(polls, None) is None
    assert {r.key.split("/")[0] for r in read_rows(out)} == {first, second}
    with pytest.raises(ScoreError, match="needs a bound"):
        next(watch_pacs(settings(pacs), Query(), out, tiny_model))


@pacs_test
def test_real_films_through_the_pacs_with_the_shipped_model(pacs: Orthanc, tmp_path: Path) -> None:
    """Real films (the training split, converted with pydicom) score alike from the PACS and
    from a folder, and their reports by the shipped model validate."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"no {SHARED_DATA}")
    from PIL import Image

    uid = generate_uid()
    folder = tmp_path / "films"
    folder.mkdir()
    for label in ("NORMAL", "PNEUMONIA"):
        for path in sorted((SHARED_DATA / "train" / label).glob("*.jpeg"))[:2]:
            pixels = np.asarray(Image.open(path).convert("L"))
            data = film_dicom(pixels, study=uid, patient=PATIENT, bits=8)
            pacs.upload(data)
            (folder / f"{path.stem}.dcm").write_bytes(data)
    out = tmp_path / "scores.csv"
    model = shipped_model_path()
    summary = score_pacs(
        settings(pacs), Query(study_uid=uid), out, model, write_back=True, workers=1
    )
    score_archive(open_input(folder), tmp_path / "folder.csv", model, workers=1)
    by_sha = {r.sha256: r for r in read_rows(tmp_path / "folder.csv")}
    rows = read_rows(out)
    assert len(rows) == 4
    for row in rows:
        same = by_sha[row.sha256]
        assert (row.prediction, row.input_check) == (same.prediction, same.input_check)
        assert row.p_pneumonia == pytest.approx(same.p_pneumonia, abs=1e-6)
    assert summary.reports_stored == sum(r.prediction is not None for r in rows) > 0
    reports = sr_instances(pacs, uid)
    assert len(reports) == summary.reports_stored
    assert all(dciodvfy_errors(r, tmp_path) == [] for r in reports)


@pacs_test
def test_write_heatmap_stores_a_secondary_capture_beside_each_report(
    pacs: Orthanc, tiny_model: Path, tmp_path: Path
) -> None:
    uid = generate_uid()
    data = film(41, study=uid)
    pacs.upload(data)
    header = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    summary = score_pacs(
        settings(pacs),
        Query(study_uid=uid),
        tmp_path / "s.csv",
        tiny_model,
        write_back=True,
        heatmaps=True,
        workers=1,
    )
    assert summary.reports_stored == 2  # the report and the heatmap
    model = model_identity(Predictor(tiny_model))
    series, _ = report_uids(model, header)
    sc = settings(pacs).client().retrieve_instance(uid, series, heatmap_uid(model, header))
    assert sc.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7" and sc.Modality == "OT"
    assert sc.PhotometricInterpretation == "RGB" and sc.pixel_array.shape[2] == 3
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == header.SOPInstanceUID
    assert (str(sc.PatientName), sc.PatientID) == PATIENT
    assert dciodvfy_errors(sc, tmp_path) == []
    # Neither the report nor the heatmap is a CR/DX film to score next time.
    again = score_pacs(
        settings(pacs), Query(study_uid=uid), tmp_path / "t.csv", tiny_model, workers=1
    )
    assert again.found == 1


def test_a_film_header_is_read_within_the_decoders_bounds() -> None:
    """Regression: the header for a report was first read with a plain pydicom.dcmread, which
    inflates a Deflated dataset whole, past the bound the decoder keeps (tests/test_hostile.py)."""
    from benchmarks.common import dicom_bytes
    from pneumonia.score.dicomweb import read_header
    from test_hostile import dicom_deflate_bomb

    pixels = synthetic_xray(1, 3, 64).astype(np.uint16) * 16
    header = read_header(dicom_bytes(pixels, transfer_syntax="1.2.840.10008.1.2.1.99"))
    assert header is not None and header.PatientID == "PATIENT-SECRET-0042"
    assert "PixelData" not in header and header.Rows == 64
    assert read_header(dicom_deflate_bomb(128)) is None
    assert read_header(b"DICM but not really") is None


@pacs_test
def test_ignore_headers_retrieves_every_film(
    pacs: Orthanc, study: tuple[str, Path], tiny_model: Path, tmp_path: Path
) -> None:
    uid, _ = study
    out = tmp_path / "all.csv"
    score_pacs(settings(pacs), Query(study_uid=uid), out, tiny_model, workers=1, use_headers=False)
    rows = read_rows(out)
    assert len(rows) == 8 and not [r for r in rows if r.error_code == SKIPPED]
    assert sum(r.prediction is not None for r in rows) == 7  # all but the one without pixels
