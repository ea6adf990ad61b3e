"""Keep torch's export chatter off the terminal without hiding failures.

The exporters print progress lines, graph dumps, log warnings and emit Python warnings even
when they succeed. Prints and warnings are captured into a buffer callers can inspect, log
records below ERROR are muted; exceptions propagate untouched, so no failure is hidden here.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import logging
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Iterator

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


@contextlib.contextmanager
def captured(buffer: io.StringIO | None = None) -> Iterator[io.StringIO]:
    """Capture stdout, stderr and warnings in buffer; mute torch's / transformers' logs below ERROR.

    Warnings are appended when the block ends, so read the buffer after leaving it.
    """
    buffer = buffer if buffer is not None else io.StringIO()
    loggers = [logging.getLogger("torch")] + [
        logging.getLogger(name)
        for name in list(logging.Logger.manager.loggerDict)
        if name.startswith(("torch.", "onnxscript", "onnx_ir", "transformers"))
    ]
    levels = [logger.level for logger in loggers]
    with contextlib.ExitStack() as stack:
        stack.enter_context(_file_descriptors(buffer))
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


@contextlib.contextmanager
def _file_descriptors(buffer: io.StringIO) -> Iterator[None]:
    """Redirect fds 1 and 2 too: torch's C++ side prints graph dumps straight to them."""
    _flush()
    try:
        saved = [os.dup(1), os.dup(2)]
    except OSError:  # no usable stdout/stderr: nothing to redirect
        yield
        return
    with tempfile.TemporaryFile() as sink:
        try:
            os.dup2(sink.fileno(), 1)
            os.dup2(sink.fileno(), 2)
            yield
        finally:
            _flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            sink.seek(0)
            buffer.write(sink.read().decode(errors="replace"))


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        with contextlib.suppress(Exception):
            stream.flush()
    with contextlib.suppress(Exception):  # C stdio buffers (printf from native code)
        ctypes.CDLL(None).fflush(None)


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
