"""Progress: a bar on a terminal, short lines in a log file (issue 19: under `nohup ... > log`
training wrote one ever-growing line, about 20 kB of carriage returns per epoch)."""

from __future__ import annotations

import io
import logging

import pytest

from pneumonia.progress import LineProgress, progress_bar


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_file_or_pipe_gets_a_line_every_tenth(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    err = io.StringIO()
    monkeypatch.setattr("sys.stderr", err)
    with caplog.at_level(logging.INFO, logger="pneumonia"):
        bar = progress_bar(range(1000), enabled=True, desc="epoch 1/4", unit="batch")
        assert isinstance(bar, LineProgress)
        for i in bar:
            bar.set_postfix(loss=f"{1 / (i + 1):.4f}")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 10 and lines[-1].startswith("epoch 1/4: 100% 1000/1000 batch")
    assert "loss 0.0010" in lines[-1] and "\r" not in "".join(lines) and err.getvalue() == ""


def test_updates_by_hand_and_without_a_total(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="pneumonia"):
        with LineProgress(total=7, desc="scoring", unit="img") as bar:
            for _ in range(7):
                bar.update(1)
        with LineProgress(desc="reading") as bar:
            bar.update(3)
    lines = [r.getMessage() for r in caplog.records]
    assert sum("scoring" in x for x in lines) == 7 and "100% 7/7 img" in lines[6]
    assert lines[-1].startswith("reading: 3 it")


def test_a_terminal_gets_the_bar(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("tqdm")
    monkeypatch.setattr("sys.stderr", Tty())
    bar = progress_bar(range(3), enabled=True, desc="x")
    assert type(bar).__module__.startswith("tqdm")
    bar.close()
    assert list(progress_bar(range(3), enabled=False)) == [0, 1, 2]
