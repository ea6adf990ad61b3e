"""The terminal: the pass table (a pass that changed nothing shows why, not merely "exact")
and the progress of the long steps."""

from __future__ import annotations

import io

from rich.console import Console

from txcompile import api, render
from txcompile.graph import progress


def test_an_unchanged_pass_shows_its_refusal_or_note():
    report = api.compile("tiny-llama", passes=["preln-to-rmsnorm", "remove-padding", "fuse-norms"]).report
    rows = {row[0]: row for row in render.pass_rows(report)}
    assert rows["preln-to-rmsnorm"][1] == "unchanged"
    assert rows["preln-to-rmsnorm"][-1].startswith("no LayerNormalization in the graph")
    assert rows["remove-padding"][-1].startswith("off (--remove-padding")
    assert rows["fuse-norms"][1] != "unchanged"  # it changed the graph: exact, and the opset it raised
    assert rows["fuse-norms"][-1] == "exact; raised the ONNX opset from 20 to 23"


def test_a_pass_that_moved_the_opset_says_so():
    report = api.compile("tiny-llama", exporter="torchscript", opset=17, passes=["fuse-norms"]).report
    row = next(row for row in render.pass_rows(report) if row[0] == "fuse-norms")
    assert row[-1] == "exact; converted the graph from ONNX opset 17 to 23 (onnx version converter)"


class _Recorder:
    """A progress display that remembers what it was shown."""

    def __init__(self):
        self.shown: list[str] = []
        self.open = 0

    def begin(self, label, total):
        self.open += 1
        self.shown.append(label)
        return label

    def update(self, handle, label, done):
        self.shown.append(f"{label} ({done})")

    def end(self, handle):
        self.open -= 1


def test_optimize_shows_each_step_and_pass_as_it_starts(mlp_file, tmp_path):
    shown = _Recorder()
    with progress.showing(shown):
        result = api.optimize(mlp_file)
        result.save(tmp_path / "out.onnx")
    passes = [r["name"] for r in result.report["passes"]]
    assert shown.shown[:2] == ["reading the input", "passes"]
    assert shown.shown[2 : 2 + len(passes)] == [f"passes: {name} ({i})" for i, name in enumerate(passes)]
    assert shown.shown[2 + len(passes) :] == ["verifying", f"writing {tmp_path / 'out.onnx'}"]
    assert shown.open == 0  # every step ended
    with progress.step("outside") as now:
        now("part")  # nothing installed: nothing happens, nothing fails


def test_the_terminal_display_draws_the_steps_and_goes_when_they_end():
    screen = io.StringIO()
    display = render.ProgressDisplay(Console(file=screen, force_terminal=True, width=100))
    with progress.showing(display), progress.step("passes", total=2) as now:
        now("fuse-attention")
        display.progress.refresh()
    drawn = screen.getvalue()
    assert "passes: fuse-attention" in drawn and "0/2" in drawn
    assert not display.progress.live.is_started and not display.progress.tasks
