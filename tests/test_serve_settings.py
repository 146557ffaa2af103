"""Service settings from the environment, refused when bad; the serving path stays lean."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from pneumonia.predictor import shipped_model_path
from pneumonia.serve.settings import Settings, settings_error_message

ENV_NAMES = [name.upper() for name in Settings.model_fields]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ENV_NAMES:
        monkeypatch.delenv(name, raising=False)


def test_defaults_match_the_contract() -> None:
    s = Settings()
    assert (s.host, s.port, s.max_upload_mb) == ("0.0.0.0", 8000, 20.0)
    assert s.model_path == shipped_model_path()
    assert s.api_key is None
    assert s.max_upload_bytes == 20 * 1024 * 1024


def test_environment_is_read(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MODEL_PATH", str(tmp_path / "m.onnx"))
    monkeypatch.setenv("PORT", "9001")
    monkeypatch.setenv("HOST", "127.0.0.1")
    monkeypatch.setenv("API_KEY", "k")
    monkeypatch.setenv("MAX_UPLOAD_MB", "5")
    monkeypatch.setenv("LOG_LEVEL", "debug")
    s = Settings()
    assert (s.model_path, s.port, s.host, s.max_upload_mb, s.log_level) == (
        tmp_path / "m.onnx",
        9001,
        "127.0.0.1",
        5.0,
        "DEBUG",
    )
    assert s.api_key is not None and s.api_key.get_secret_value() == "k"
    assert Settings(port=9002).port == 9002  # flags (init values) override the environment


def test_empty_api_key_means_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("API_KEY", "  ")
    assert Settings().api_key is None


@pytest.mark.parametrize(
    ("env", "value"),
    [
        ("PORT", "0"),
        ("PORT", "http"),
        ("MAX_UPLOAD_MB", "-1"),
        ("MAX_BATCH_FILES", "0"),
        ("MAX_CONCURRENCY", "0"),
        ("QUEUE_SIZE", "-1"),
        ("LOG_LEVEL", "loud"),
    ],
)
def test_bad_values_are_refused_with_their_name(
    monkeypatch: pytest.MonkeyPatch, env: str, value: str
) -> None:
    monkeypatch.setenv(env, value)
    with pytest.raises(ValidationError) as info:
        Settings()
    message = settings_error_message(info.value)
    assert env in message and repr(value).lower() in message.lower() and "\n" not in message


def test_api_key_never_appears_in_errors() -> None:
    with pytest.raises(ValidationError) as info:
        Settings(api_key=12345, port=-1)  # type: ignore[arg-type]
    assert "12345" not in settings_error_message(info.value)


def test_cli_refuses_bad_settings_with_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from pneumonia.cli import main

    monkeypatch.setenv("MAX_UPLOAD_MB", "lots")
    assert main(["serve", "--port", "8123"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "MAX_UPLOAD_MB" in err


def test_cli_refuses_a_missing_model_with_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from pneumonia.cli import main

    assert main(["serve", "--model", str(tmp_path / "absent.onnx")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "absent.onnx" in err and "does not exist" in err


def test_heap_threshold_is_fixed_unless_the_operator_set_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The serve command fixes glibc's mmap threshold (the fix for ~40 MB of heap growth under
    load); an operator's own MALLOC_MMAP_THRESHOLD_ wins."""
    import ctypes
    import types

    from pneumonia.serve import heap

    calls: list[tuple[int, int]] = []

    def mallopt(param: int, value: int) -> int:
        calls.append((param, value))
        return 1

    monkeypatch.setattr(ctypes, "CDLL", lambda name: types.SimpleNamespace(mallopt=mallopt))
    monkeypatch.delenv(heap.ENV_OVERRIDE, raising=False)
    assert heap.fix_mmap_threshold() is True
    assert calls == [(heap.M_MMAP_THRESHOLD, 65536)]
    monkeypatch.setenv(heap.ENV_OVERRIDE, "131072")
    assert heap.fix_mmap_threshold() is False
    assert len(calls) == 1


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt is Linux-only")
def test_heap_threshold_applies_on_this_libc(monkeypatch: pytest.MonkeyPatch) -> None:
    from pneumonia.serve import heap

    monkeypatch.delenv(heap.ENV_OVERRIDE, raising=False)
    assert heap.fix_mmap_threshold() is True
