"""Show a report: onnxsim-style op table, one row per pass, verification; terminal or HTML."""

from __future__ import annotations

import collections
import html
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table
from rich.text import Text


def _number(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    return f"{value:.{digits}g}"


def _rules(counts: dict[str, int]) -> str:
    return ", ".join(f"{name}×{n}" for name, n in counts.items()) or "-"


def op_rows(report: dict) -> list[tuple[str, int, int]]:
    before, after = report["ops"]["before"], report["ops"]["after"]
    names = sorted(set(before) | set(after), key=lambda op: (-before.get(op, 0), op))
    return [(op, before.get(op, 0), after.get(op, 0)) for op in names]


def pass_rows(report: dict) -> list[list[str]]:
    rows = []
    for record in report["passes"]:
        change = f"+{record['nodes_added']} -{record['nodes_removed']}"
        rows.append(
            [
                record["name"],
                record["status"],
                f"{record['seconds'] * 1000:.0f} ms",
                change,
                _rules(record["rule_counts"]),
                _number(record["max_diff"]),
                record["reason"] or _why_unchanged(record) or _exactness(record),
            ]
        )
    return rows


def _exactness(record: dict) -> str:
    """Exact or approximate, and the opset change a pass made (a user must know the graph's opset moved)."""
    label = "exact" if record["exact"] else "approximate"
    opset = (record.get("details") or {}).get("opset")
    return f"{label}; {opset}" if opset else label


def _why_unchanged(record: dict) -> str | None:
    """What a pass that changed nothing said about it (its refusal, or its note), so the table
    does not call a pass that did nothing merely "exact"."""
    if record["nodes_added"] or record["nodes_removed"]:
        return None
    details = record.get("details") or {}
    return details.get("refused") or details.get("note")


def resource_lines(report: dict) -> list[str]:
    resources = report.get("resources")
    if not isinstance(resources, dict) or not isinstance(resources.get("seconds"), dict):
        return []
    export = report.get("export") or {}
    seconds = {"export": export.get("seconds"), **resources["seconds"]}
    phases = ", ".join(
        f"{name} {value:.1f} s" for name, value in seconds.items() if isinstance(value, int | float)
    )
    peak = resources.get("peak_rss_mib")
    memory = f"; peak memory {peak / 1024:.2f} GiB" if isinstance(peak, int | float) else ""
    return [f"time: {phases}{memory}"]


def summary_lines(report: dict) -> list[str]:
    lines = [
        f"{report['source']} → {report['output']}  (target {report['target']}, device {report['device']})"
    ]
    export = report.get("export")
    if export:
        fallback = f"; fell back: {export['fallback_reason']}" if export.get("fallback_reason") else ""
        lines.append(
            f"exported with {export['exporter']} (opset {export['opset']}) in {export['seconds']:.1f} s, "
            f"max diff vs PyTorch {_number(export['max_diff'])}{fallback}"
        )
    check = report["verification"]
    if check.get("enabled"):
        verdict = {True: "passed", False: "FAILED", None: "reported"}[check.get("passed")]
        lines.append(
            f"verification {verdict}: max diff vs {check['reference']} {_number(check['max_diff'])} "
            f"(atol {check['atol']:g}) on {_shapes(check['inputs'])}"
        )
        steps = check.get("decode_steps")
        if isinstance(steps, dict) and isinstance(steps.get("max_diff"), int | float):
            lines.append(
                f"  and as it generates: prefill + {steps.get('steps')} decode steps feeding present back "
                f"as past, max diff {_number(steps['max_diff'])}"
            )
    else:
        lines.append("verification skipped (--no-verify)")
    analysis = report.get("analysis")
    if analysis:
        flops = (
            f", {analysis['flops'] / 1e6:.2f} MFLOPs at the verification shapes"
            if "flops" in analysis
            else ""
        )
        lines.append(
            f"{analysis['parameters']:,} parameters ({analysis['parameter_bytes'] / 2**20:.1f} MiB){flops}"
        )
    lines.extend(resource_lines(report))
    lines.extend(padding_lines(report))
    lines.extend(kernel_lines(report))
    lines.extend(f"warning: {w}" for w in report.get("warnings", []))
    return lines


def padding_lines(report: dict) -> list[str]:
    """What remove-padding did: how much runs on real tokens, where attention ran."""
    record = next((r for r in report["passes"] if r["name"] == "remove-padding"), None)
    if record is None or record["status"] != "applied":
        return []
    found = record["details"]
    sites = collections.Counter(found["attention"].values())
    return [
        f"padding removed: {found['nodes_on_real_tokens']} nodes run on real tokens only "
        f"({found['real_tokens']}); attention: "
        + ", ".join(f"{n}× {how}" for how, n in sites.items())
        + f"; outputs are 0 at positions where {found['mask']} is 0 (compared on real tokens)"
    ]


def kernel_lines(report: dict) -> list[str]:
    """What the kernel check found: every op that would fall back (CUDA) or fail (CPU)."""
    record = next((r for r in report["passes"] if r["name"] == "kernel-check" and r.get("details")), None)
    if record is None:
        return []
    found = record["details"]
    provider = found["provider"]
    if not found["missing"]:
        return [f"kernel check ({provider}): all {found['checked']} ops have a kernel at their dtype"]
    lines = [
        f"kernel check ({provider}): {found['missing']} of {found['checked']} ops have no kernel "
        f"and {found['consequence']}:"
    ]
    lines.extend(f"  {count}× {reason}" for reason, count in found["reasons"].items())
    return lines


def _shapes(inputs: dict) -> str:
    return ", ".join(f"{name} {'x'.join(map(str, info['shape']))}" for name, info in inputs.items()) or "-"


ATTENTION_PASS = "fuse-attention"


def attention_coverage(report: dict) -> list[dict]:
    """Every attention site the last fuse-attention run saw; a rolled-back run fused none."""
    records = [r for r in report.get("passes", []) if r["name"] == ATTENTION_PASS]
    if not records:
        return []
    record = records[-1]
    sites = (record.get("details") or {}).get("sites", [])
    if record["status"] != "rolled back":
        return sites
    reason = f"fuse-attention rolled back: {record['reason']}"
    return [{"site": s["site"], "status": "unfused", "reason": reason} for s in sites]


def _last_runs(report: dict) -> list[dict]:
    """The last run of each pass, in pipeline order: a pass run twice reports its final say."""
    last = {r["name"]: r for r in report.get("passes", [])}
    return list(last.values())


def family_coverage(report: dict) -> list[list[str]]:
    """Every rule family's site records, grouped: pass, rule, status, op, how many sites, reason.

    Any pass whose details hold ``sites`` (the shared record of passes/rules.py) shows here, so
    a new family needs no code in render. A rolled-back run's sites count as unfused.
    """
    rows: collections.Counter = collections.Counter()
    for record in _last_runs(report):
        sites = (record.get("details") or {}).get("sites")
        if not isinstance(sites, list):
            continue
        rolled_back = record["status"] == "rolled back"
        for site in sites:
            if not isinstance(site, dict) or "status" not in site:
                continue
            if rolled_back:
                key = (
                    record["name"],
                    site.get("rule") or "-",
                    "unfused",
                    "-",
                    f"rolled back: {record['reason']}",
                )
            else:
                key = (
                    record["name"],
                    site.get("rule") or "-",
                    site["status"],
                    site.get("op") or "-",
                    site.get("reason") or "-",
                )
            rows[key] += 1
    return [[name, rule, status, op, str(n), reason] for (name, rule, status, op, reason), n in rows.items()]


FAMILY_HEAD = ["pass", "rule", "status", "op", "sites", "reason"]


def coverage_rows(report: dict) -> list[list[str]]:
    return [
        [s["site"], s["status"], s.get("op") or "-", _mask_or_reason(s)] for s in attention_coverage(report)
    ]


def _mask_or_reason(site: dict) -> str:
    bias = site.get("bias")
    text = site.get("reason") or (", ".join(bias) if isinstance(bias, list) else "") or "-"
    return f"{text} ({site['note']})" if site.get("note") else text


COVERAGE_HEAD = ["attention site", "status", "op", "mask / reason"]


def print_report(report: dict, console: Console | None = None) -> None:
    console = console or Console()
    ops = Table(title="ops", show_edge=False)
    for column in ("op", "before", "after", "change"):
        ops.add_column(column, justify="left" if column == "op" else "right")
    for op, before, after in op_rows(report):
        style = None if before == after else "bold"
        ops.add_row(
            op, str(before), str(after), f"{after - before:+d}" if before != after else "", style=style
        )
    ops.add_row(
        "total",
        str(report["nodes"]["before"]),
        str(report["nodes"]["after"]),
        f"{report['nodes']['after'] - report['nodes']['before']:+d}",
        style="dim",
    )
    passes = Table(title="passes", show_edge=False)
    for column in ("pass", "status", "time", "nodes", "rules", "max diff", "note"):
        passes.add_column(column)
    for row in pass_rows(report):
        passes.add_row(*row, style="red" if row[1] == "rolled back" else None)
    lines = summary_lines(report)
    head = 2 if report.get("export") else 1
    for line in lines[:head]:
        console.print(line, highlight=False)
    console.print(ops)
    console.print(passes)
    if family_coverage(report):
        families = Table(title="fusion coverage", show_edge=False)
        for column in FAMILY_HEAD:
            families.add_column(column, justify="right" if column == "sites" else "left")
        for row in family_coverage(report):
            families.add_row(*row, style=None if row[2] == "fused" else "red")
        console.print(families)
    if coverage_rows(report):
        coverage = Table(title="attention coverage", show_edge=False)
        for column in COVERAGE_HEAD:
            coverage.add_column(column)
        for row in coverage_rows(report):
            coverage.add_row(*row, style=None if row[1] == "fused" else "red")
        console.print(coverage)
    for line in lines[head:]:
        console.print(line, highlight=False)


def to_html(report: dict) -> str:
    def table(head: list[str], rows: list[list]) -> str:
        cells = "".join(f"<th>{html.escape(h)}</th>" for h in head)
        body = "".join(
            "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows
        )
        return f"<table><thead><tr>{cells}</tr></thead><tbody>{body}</tbody></table>"

    ops = [[op, b, a, f"{a - b:+d}" if a != b else ""] for op, b, a in op_rows(report)]
    passes = table(["pass", "status", "time", "nodes", "rules", "max diff", "note"], pass_rows(report))
    lines = "".join(f"<p>{html.escape(line)}</p>" for line in summary_lines(report))
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>txcompile report</title>"
        "<style>body{font-family:sans-serif}table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #ccc;padding:2px 8px;text-align:left}</style></head><body>"
        f"<h1>txcompile report</h1>{lines}<h2>ops</h2>{table(['op', 'before', 'after', 'change'], ops)}"
        f"<h2>passes</h2>{passes}"
        f"<h2>fusion coverage</h2>{table(FAMILY_HEAD, family_coverage(report))}"
        f"<h2>attention coverage</h2>{table(COVERAGE_HEAD, coverage_rows(report))}"
        "</body></html>\n"
    )


class _Count(ProgressColumn):
    """``done/total`` for steps that have a total; nothing for the others."""

    def render(self, task) -> Text:
        return Text(f"{task.completed:.0f}/{task.total:.0f}" if task.total else "")


class ProgressDisplay:
    """The steps of a command (graph/progress.py) as rich progress bars on ``console``, gone
    when the step ends; the live display runs only while some step does."""

    def __init__(self, console: Console):
        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            _Count(),
            TimeElapsedColumn(),
            console=console,
            transient=True,
        )
        self.open = 0

    def begin(self, label: str, total: int | None):
        if self.open == 0:
            self.progress.start()
        self.open += 1
        return self.progress.add_task(label, total=total)

    def update(self, handle, label: str, done: int) -> None:
        self.progress.update(handle, description=label, completed=done)

    def end(self, handle) -> None:
        self.progress.remove_task(handle)
        self.open -= 1
        if self.open == 0:
            self.progress.stop()
