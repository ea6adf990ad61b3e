"""Progress of a command's long steps: the library names each step as it starts, a display
shows it — the command line's when stderr is a terminal (render.ProgressDisplay) — and with
none installed nothing happens.

Steps nest (the passes inside a compile); a step with a total counts what it has finished.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from typing import Any, Protocol


class Display(Protocol):
    def begin(self, label: str, total: int | None) -> Any: ...

    def update(self, handle: Any, label: str, done: int) -> None: ...

    def end(self, handle: Any) -> None: ...


_DISPLAY: contextvars.ContextVar[Display | None] = contextvars.ContextVar("progress_display", default=None)


@contextlib.contextmanager
def showing(display: Display | None) -> Iterator[None]:
    """Steps inside the block go to ``display`` (None: nowhere)."""
    token = _DISPLAY.set(display)
    try:
        yield
    finally:
        _DISPLAY.reset(token)


@contextlib.contextmanager
def step(label: str, total: int | None = None) -> Iterator[Callable[[str], None]]:
    """One step; the yielded ``now(what)`` says which part of it runs (and, with a total, that
    the parts before it are done)."""
    display = _DISPLAY.get()
    if display is None:
        yield lambda what: None
        return
    handle = display.begin(label, total)
    done = -1

    def now(what: str) -> None:
        nonlocal done
        done += 1
        display.update(handle, f"{label}: {what}", done)

    try:
        yield now
    finally:
        display.end(handle)
