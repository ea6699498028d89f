"""How ``send_file`` shows its progress: the ``progress`` argument turned into a reporter.

``True`` draws a bar on stderr with tqdm; a callable is called with ``(done, total)`` bytes.
Both the blocking API (from Rust, between its waits) and ``socketcomm.aio`` use this.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from tqdm import tqdm

if TYPE_CHECKING:
    from typing import Never


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
    """A tqdm bar, drawn from the first report on (so a transfer that fails at once, say on a
    missing file, draws nothing)."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._bar: tqdm[Never] | None = None

    def update(self, done: int, total: int) -> None:
        if self._bar is None:
            self._bar = tqdm(
                desc=self._name,
                total=total,
                initial=done,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                file=sys.stderr,
                dynamic_ncols=True,
                leave=True,
            )
            return
        if done != self._bar.n:
            self._bar.update(done - self._bar.n)

    def close(self) -> None:
        if self._bar is not None:
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
