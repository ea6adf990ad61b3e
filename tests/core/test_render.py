"""The terminal pass table: a pass that changed nothing shows why, not merely "exact"."""

from __future__ import annotations

from txcompile import api, render


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
