"""A real export shared by the target tests (tiny BERT, dynamo, batch 2 × seq 16)."""

from __future__ import annotations

import onnx
import pytest

from txcompile.graph import inputs


@pytest.fixture(scope="session")
def tiny_bert() -> onnx.ModelProto:
    from txcompile.exporters import export_onnx, load_model_spec

    return export_onnx(load_model_spec("tiny-bert"), dims={"batch": 2, "seq": 16}).model


@pytest.fixture(scope="session")
def tiny_bert_feeds(tiny_bert):
    return inputs.make_feeds(inputs.read_specs(tiny_bert), {"batch": 2, "seq": 16})
