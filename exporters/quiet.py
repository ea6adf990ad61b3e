"""Keep torch's export chatter off the terminal without hiding failures.

The exporters print progress lines, graph dumps, log warnings and emit Python warnings even
when they succeed. All of it is captured into a buffer that callers can inspect; exceptions
still propagate untouched, so a failure is never swallowed here.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import warnings
from collections.abc import Iterator

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


@contextlib.contextmanager
def captured() -> Iterator[io.StringIO]:
    """Capture stdout, stderr, warnings and torch's log records (WARNING and below)."""
    buffer = io.StringIO()
    loggers = [logging.getLogger("torch")] + [
        logging.getLogger(name)
        for name in list(logging.Logger.manager.loggerDict)
        if name.startswith(("torch.", "onnxscript", "onnx_ir"))
    ]
    levels = [logger.level for logger in loggers]
    with contextlib.ExitStack() as stack:
        stack.enter_context(contextlib.redirect_stdout(buffer))
        stack.enter_context(contextlib.redirect_stderr(buffer))
        caught = stack.enter_context(warnings.catch_warnings(record=True))
        warnings.simplefilter("always")
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        try:
            yield buffer
        finally:
            for logger, level in zip(loggers, levels, strict=True):
                logger.setLevel(level)
            for item in caught:
                buffer.write(f"{item.category.__name__}: {item.message}\n")


def one_line(error: BaseException) -> str:
    """The most specific single line describing ``error`` (its cause when torch wraps it)."""
    chain = [error]
    while chain[-1].__cause__ is not None and len(chain) < 8:
        chain.append(chain[-1].__cause__)
    for err in reversed(chain):
        line = _first_line(str(err))
        if line:
            return f"{type(err).__name__}: {line}"
    return type(error).__name__


def _first_line(text: str) -> str:
    for line in _ANSI.sub("", text).splitlines():
        line = line.strip()
        if line:
            return line[:300]
    return ""
