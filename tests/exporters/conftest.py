"""Exporter tests never reach a model hub: every Hugging Face model comes from tests/data/hf."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

HF_DATA = Path(__file__).resolve().parents[1] / "data" / "hf"


def ort_vs_torch(result, torch_model, dims: dict[str, int], seed: int = 1) -> float:
    """Max |ORT - PyTorch| of an exported model on fresh inputs of the given sizes (a decoder's
    cache only at real tokens: what a query that sees no key computes is the exporter's choice)."""
    from txcompile.exporters.model import flatten_outputs
    from txcompile.graph.inputs import make_feeds, read_specs
    from txcompile.graph.ort import create_session, padded_rows, run

    feeds = make_feeds(torch_model.inputs, torch_model.resolved_dims(dims), seed)
    assert read_specs(result.model)  # the metadata is readable
    with torch.no_grad():
        expected = flatten_outputs(
            torch_model.module(*[torch.from_numpy(feeds[s.name]) for s in torch_model.inputs])
        )
    actual = run(create_session(result.model), feeds)
    assert list(actual) == torch_model.output_names
    rows = padded_rows(result.model, feeds)
    diffs = []
    for position, (got, want) in enumerate(zip(actual.values(), expected, strict=True)):
        assert got.shape == tuple(want.shape)
        want = want.numpy()
        if position in rows:  # [B, 1, total_seq] over [B, heads, total_seq, D]
            keep = rows[position][:, 0]
            got, want = np.moveaxis(got, 2, 1)[keep], np.moveaxis(want, 2, 1)[keep]
        diffs.append(float(np.abs(got - want).max()))
    return max(diffs)


@pytest.fixture
def hf_data() -> Path:
    return HF_DATA
