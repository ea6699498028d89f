"""How ``send_file`` shows its progress: the ``progress`` argument turned into a reporter.

``True`` draws a bar on stderr with tqdm; a callable is called with ``(done, total)`` bytes.
Both the blocking API (from Rust, between its waits) and ``socketcomm.aio`` use this.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Protocol

from tqdm import tqdm


class Reporter(Protocol):
    def update(self, done: int, total: int) -> None: ...

    def close(self) -> None: ...


class _Callback:
    def __init__(self, callback: Callable[[int, int], object]) -> None:
        self._callback = callback
        self._last: tuple[int, int] | None = None

    def update(self, done: int, total: int) -> None:
        # Called about every 100 ms; the callback hears only of changes.
        if (done, total) != self._last:
            self._last = (done, total)
            self._callback(done, total)

    def close(self) -> None:
        pass


class _Bar:
    def __init__(self, name: str) -> None:
        self._bar = tqdm(
            desc=name,
            total=None,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            file=sys.stderr,
            dynamic_ncols=True,
            leave=True,
        )

    def update(self, done: int, total: int) -> None:
        if total and self._bar.total != total:
            self._bar.total = total
        if done != self._bar.n:
            self._bar.n = done
            self._bar.refresh()

    def close(self) -> None:
        self._bar.close()


def reporter(progress: object, name: str) -> Reporter | None:
    """The reporter for ``send_file``'s ``progress`` argument (None: report nothing)."""
    if progress is None or progress is False:
        return None
    if progress is True:
        return _Bar(name)
    if callable(progress):
        return _Callback(progress)
    raise TypeError(
        "progress must be a callable taking (done, total), True for a progress bar, or None; "
        f"got {type(progress).__name__}"
    )
