"""Progress for long commands: a tqdm bar on a terminal, a short line every tenth elsewhere.

A bar redraws one line with carriage returns: on a terminal that is what a user wants, but in a
log file (``nohup pneumonia train ... > log``) it became one ever-growing line, about 20 kB per
training epoch. So a bar is drawn only when stderr is a terminal; a file or pipe gets one log
line at every tenth of the work (and at the end). The lean install (serving,
`pneumonia predict|score|evaluate`) does not carry tqdm: on a terminal without it, a command
logs once how to get the bar and writes the lines instead.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator
from types import TracebackType
from typing import Any, Generic, TypeVar

log = logging.getLogger("pneumonia")

T = TypeVar("T")

#: How to get the bar; named in the message so the user knows which extra to install.
INSTALL_HINT = "pip install 'pneumonia-detection[progress]'"


class _NoBar(Generic[T]):
    """What tqdm offers the callers here (iterate, update, context manager), showing nothing."""

    def __init__(self, iterable: Iterable[T] | None) -> None:
        self._iterable = iterable

    def __iter__(self) -> Iterator[T]:
        return iter(self._iterable or ())

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **values: Any) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> _NoBar[T]:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        pass


class LineProgress(Generic[T]):
    """The tqdm calls used here (iterate, update, set_postfix, close, context manager), written as
    one log line at each tenth of ``total`` and at the end, for a log file or a pipe."""

    def __init__(
        self,
        iterable: Iterable[T] | None = None,
        *,
        total: int | None = None,
        desc: str = "",
        unit: str = "it",
        **_: Any,
    ) -> None:
        self._iterable = iterable
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.total, self.desc, self.unit = total, desc, unit
        self.n = 0
        self._next = self._step()
        self._start = time.monotonic()
        self._postfix = ""
        self._closed = False

    def _step(self) -> int:
        if not self.total:
            return -1
        tenth = max(1, self.total // 10)
        return min(self.total, (self.n // tenth + 1) * tenth)

    def __iter__(self) -> Iterator[T]:
        for item in self._iterable or ():
            yield item
            self.update(1)
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.total and self.n >= self._next:
            self._emit()
            self._next = self._step() if self.n < self.total else self.total + 1

    def set_postfix(self, **values: Any) -> None:
        self._postfix = ", ".join(f"{k} {v}" for k, v in values.items())

    def _emit(self) -> None:
        elapsed = max(1e-9, time.monotonic() - self._start)
        share = f" {100 * self.n / self.total:3.0f}%" if self.total else ""
        of = f"/{self.total}" if self.total else ""
        rate = f", {self.n / elapsed:.1f} {self.unit}/s"
        extra = f", {self._postfix}" if self._postfix else ""
        log.info(
            "%s:%s %d%s %s%s%s", self.desc or "progress", share, self.n, of, self.unit, rate, extra
        )

    def close(self) -> None:
        if not self._closed and not self.total and self.n:
            self._emit()  # without a total, one line at the end
        self._closed = True

    def __enter__(self) -> LineProgress[T]:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def progress_bar(iterable: Iterable[T] | None = None, *, enabled: bool, **kwargs: Any) -> Any:
    """Progress over ``iterable`` (or driven by ``update(n)``) when ``enabled``: a tqdm bar when
    stderr is a terminal and tqdm is installed, else :class:`LineProgress`.

    Args:
        iterable: What to iterate, as for tqdm; None for a bar driven by ``update(n)``.
        enabled: False gives a silent stand-in, as ``--no-progress`` asks.
        **kwargs: Passed to tqdm (total, desc, unit, ...).
    """
    if not enabled:
        return _NoBar(iterable)
    if sys.stderr.isatty():
        try:
            from tqdm import tqdm
        except ModuleNotFoundError:
            log.warning(
                "no progress bar: tqdm is not installed (%s); progress is logged instead",
                INSTALL_HINT,
            )
        else:
            return tqdm(iterable, **kwargs)
    return LineProgress(iterable, **kwargs)
