"""Writing outputs so that no input is overwritten and nothing half-written is ever seen.

Every write is staged in a folder ``.txcompile-<pid>-XXXX`` beside its targets and renamed
into place. Files that belong together (a model, its external data, its report) are renamed
only after a journal naming them is written into the staging folder: a process killed
between two renames leaves the journal behind, and the next write into that folder finishes
the renames (roll forward); a staging folder without a journal is deleted (roll back). So a
model, its data and its report appear together or not at all.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from txcompile.graph.errors import TxError

STAGING_PREFIX = ".txcompile-"
JOURNAL = ".commit.json"
LEGACY_STAGING_AGE_S = 3600


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    a, b = Path(a), Path(b)
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
        return a.resolve() == b.resolve()
    except (OSError, RuntimeError, ValueError):  # loops, over-long names, NUL bytes
        return os.path.abspath(a) == os.path.abspath(b)


def check_outputs(
    outputs: Iterable[str | os.PathLike | None],
    reads: Iterable[str | os.PathLike | None],
    *,
    models: bool = True,
) -> None:
    """Refuse an output that is a file this command reads, another output or a folder, or
    whose folder does not exist; before any work is done. With ``models=False`` (reports,
    pages, timings) a ``.onnx`` path is refused too: such a write would replace a model."""
    reads = [Path(r) for r in reads if r is not None]
    seen: list[Path] = []
    for output in (Path(o) for o in outputs if o is not None):
        for given in reads:
            if same_file(output, given):
                if same_file(output, reads[0]):
                    raise TxError(f"{output}: output path equals the input; choose another output")
                raise TxError(f"{output}: this command reads that file ({given}); choose another output")
        if not models and output.suffix.lower() in (".onnx", ".data"):
            raise TxError(f"{output}: a model's path; this output is not a model, choose another path")
        for other in seen:
            if same_file(output, other):
                raise TxError(f"{output}: named for two outputs of this command; choose another")
        seen.append(output)
        try:
            if output.is_dir():
                raise TxError(f"{output}: is a folder; an output is a file path")
            if len(output.name.encode()) > 240:  # staging adds a prefix; most file systems stop at 255
                raise TxError(f"{output}: file name too long")
            if not output.parent.resolve().is_dir():
                raise TxError(f"{output.parent}: output folder does not exist")
        except (OSError, RuntimeError, ValueError) as err:
            raise TxError(f"{output}: not a usable output path: {_reason(err)}") from None
        if not os.access(output.parent, os.W_OK):
            raise TxError(f"{output.parent}: output folder is not writable")


def _reason(err: BaseException) -> str:
    return getattr(err, "strerror", None) or str(err).splitlines()[0]


class Staging:
    """The staging folder of one write: ``file(name)`` is where to write the future ``name``."""

    def __init__(self, path: Path):
        self.path = path
        self.names: list[str] = []

    def file(self, name: str) -> Path:
        self.names.append(name)
        return self.path / name


@contextlib.contextmanager
def transaction(folder: str | os.PathLike) -> Iterator[Staging]:
    """Files written into the yielded staging folder replace their namesakes in ``folder``
    together when the block ends without an error, or not at all. Files the writer did not
    ask for by name (external data) are renamed first, the named ones in the order asked."""
    folder = Path(folder)
    recover(folder)
    try:
        staging = Staging(Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.getpid()}-", dir=folder)))
    except OSError as err:
        raise TxError(f"{folder}: cannot write there: {_reason(err)}") from None
    try:
        yield staging
        written = {p.name for p in staging.path.iterdir()}
        named = [n for n in staging.names if n in written]
        names = sorted(written - set(named)) + named
        journal = staging.path / JOURNAL
        journal.with_suffix(".tmp").write_text(json.dumps(names), encoding="utf-8")
        os.replace(journal.with_suffix(".tmp"), journal)
        _finish(staging.path)
    except OSError as err:
        if err.errno == errno.ENOSPC:
            raise TxError(f"{folder}: no space left on the device; nothing was written") from None
        raise TxError(f"{folder}: cannot write there ({_reason(err)}); nothing was written") from None
    finally:
        shutil.rmtree(staging.path, ignore_errors=True)


def _finish(staging: Path) -> None:
    """Rename what the journal names into the folder above; names already moved are skipped."""
    for name in json.loads((staging / JOURNAL).read_text(encoding="utf-8")):
        if (staging / name).exists():
            os.replace(staging / name, staging.parent / name)


def recover(folder: str | os.PathLike) -> None:
    """Finish or delete what a killed writer left in ``folder`` (staging of live processes is
    left alone)."""
    with contextlib.suppress(OSError):
        for entry in Path(folder).iterdir():
            if not entry.name.startswith(STAGING_PREFIX) or _live_writer(entry):
                continue
            with contextlib.suppress(OSError, ValueError):
                if entry.is_dir() and not entry.is_symlink():
                    if (entry / JOURNAL).is_file():
                        _finish(entry)
                    shutil.rmtree(entry)
                else:
                    entry.unlink()


def _live_writer(entry: Path) -> bool:
    """Whether the process that named ``entry`` may still be writing it. Staging named
    without a pid (by earlier versions) counts as abandoned once an hour old."""
    pid = entry.name[len(STAGING_PREFIX) :].partition("-")[0]
    if pid.isdigit():
        return process_alive(int(pid))
    return time.time() - entry.lstat().st_mtime < LEGACY_STAGING_AGE_S


def process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process
        return True
    return True


def write_text(path: str | os.PathLike, text: str) -> None:
    path = Path(path)
    with transaction(path.parent) as staging:
        staging.file(path.name).write_text(text, encoding="utf-8")


def write_npz(path: str | os.PathLike, arrays: dict) -> Path:
    """``np.savez`` staged and renamed; like numpy, a name without ``.npz`` gets it."""
    import numpy as np

    path = npz_path(path)
    with transaction(path.parent) as staging, open(staging.file(path.name), "wb") as out:
        np.savez(out, **arrays)
    return path


def npz_path(path: str | os.PathLike) -> Path:
    """Where :func:`write_npz` puts ``path``."""
    path = Path(path)
    return path if path.suffix == ".npz" else path.with_name(path.name + ".npz")


def digest(path: str | os.PathLike) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()
