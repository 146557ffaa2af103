"""Progress bars for long commands, from tqdm when it is installed (the `progress` extra).

The lean install (serving, `pneumonia predict|score|evaluate`) does not carry tqdm: without it a
command that asked for progress logs once how to get the bar, then runs without one.
"""

from __future__ import annotations

import logging
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

    def __enter__(self) -> _NoBar[T]:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        pass


def progress_bar(iterable: Iterable[T] | None = None, *, enabled: bool, **kwargs: Any) -> Any:
    """A tqdm bar over ``iterable`` (or one to ``update`` by hand) when ``enabled``.

    Args:
        iterable: What to iterate, as for tqdm; None for a bar driven by ``update(n)``.
        enabled: False gives a silent stand-in, as ``--no-progress`` asks.
        **kwargs: Passed to tqdm (total, desc, unit, ...).
    """
    if enabled:
        try:
            from tqdm import tqdm
        except ModuleNotFoundError:
            log.warning(
                "no progress bar: tqdm is not installed (%s); --no-progress silences this",
                INSTALL_HINT,
            )
        else:
            return tqdm(iterable, **kwargs)
    return _NoBar(iterable)
