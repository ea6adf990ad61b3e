"""The pass report: one JSON document next to every optimized model (schema in the README)."""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from txcompile.graph.errors import TxError, one_line
from txcompile.graph.writes import digest

SCHEMA = "txcompile-report/1"


def report_path(model_path: str | Path) -> Path:
    """``out.onnx`` → ``out.report.json``."""
    path = Path(model_path)
    return path.with_name(path.stem + ".report.json")


def build(
    *,
    source: str,
    output: str,
    target: str,
    device: str,
    pipeline,
    ops_before: dict[str, int],
    ops_after: dict[str, int],
    verification: dict[str, Any],
    export: dict[str, Any] | None = None,
    warnings: list[str] | None = None,
    resources: dict[str, Any] | None = None,
) -> dict[str, Any]:
    from txcompile import __version__

    records = [dataclasses.asdict(r) for r in pipeline.records]
    analysis = next((r["details"] for r in reversed(records) if r["name"] == "analyze"), None)
    return _finite(
        {
            "schema": SCHEMA,
            "txcompile": __version__,
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "source": source,
            "output": output,
            "target": target,
            "device": device,
            "export": export,
            "verification": verification,
            "ops": {"before": ops_before, "after": ops_after},
            "nodes": {"before": sum(ops_before.values()), "after": sum(ops_after.values())},
            "passes": records,
            "analysis": analysis,
            "warnings": warnings or [],
            "resources": resources,
            "files": {},  # filled when written: file name → sha256 of the model files described
        }
    )


class Phases:
    """Seconds per phase of a run, and the process's peak memory so far: a big model's cost
    shows in the report, not only in a benchmark."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._start = time.perf_counter()

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.seconds[phase] = round(now - self._start, 3)
        self._start = now

    def record(self) -> dict[str, Any]:
        return {"seconds": dict(self.seconds), "peak_rss_mib": peak_rss_mib()}


def peak_rss_mib() -> float | None:
    """This process's peak resident set, in MiB (Linux counts KiB, macOS bytes); None where
    the platform does not say (Windows)."""
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (2**20 if sys.platform == "darwin" else 2**10), 1)


def merged(before: dict[str, Any] | None, after: dict[str, Any]) -> dict[str, Any]:
    """Phases recorded later added to a report's ``resources``; the peak is the later one."""
    seconds = {**((before or {}).get("seconds") or {}), **after["seconds"]}
    return {"seconds": seconds, "peak_rss_mib": after["peak_rss_mib"]}


def dumps(report: dict[str, Any]) -> str:
    return json.dumps(report, indent=2) + "\n"


def load(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TxError(f"{path}: no such file") from None
    except (OSError, ValueError, RecursionError) as err:  # ValueError covers JSON and UTF-8 errors
        raise TxError(f"{path}: not a readable report: {one_line(err)}") from None
    if not isinstance(report, dict) or report.get("schema") != SCHEMA:
        raise TxError(f"{path}: not a txcompile report (schema {SCHEMA} expected)")
    return report


def mismatched_files(report: dict[str, Any], folder: Path) -> list[str]:
    """Files the report describes whose bytes beside it are not the ones it was written with."""
    files = report.get("files")
    if not isinstance(files, dict):
        return []
    mismatched = []
    for name, expected in files.items():
        path = folder / str(name)
        if Path(str(name)).name != name or not path.is_file() or digest(path) != expected:
            mismatched.append(str(name))
    return mismatched


def _finite(value: Any) -> Any:
    """JSON has no inf/nan: write them as strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value
