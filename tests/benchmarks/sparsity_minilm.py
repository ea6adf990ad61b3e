"""Accuracy cost of pruning on real weights: all-MiniLM-L6-v2 sentence-embedding cosine to dense.

    .venv/bin/python tests/benchmarks/sparsity_minilm.py                  # 1x1 (per output, as Wanda)
    .venv/bin/python tests/benchmarks/sparsity_minilm.py --block 1x32     # the block shape that runs fast

Every encoder linear layer is pruned to each sparsity with the magnitude score and with the
activation-aware score (|W|·||x||, calibrated on 16 sentences distinct from the 60 evaluated);
the table gives the mean and the worst cosine between pruned and dense sentence embeddings.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, for tests.*

from tests.sparsity import minilm  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--block", default="1x1")
    parser.add_argument("--sparsities", default="0.3,0.5,0.7")
    args = parser.parse_args()
    sparsities = tuple(float(s) for s in args.sparsities.split(","))
    table = minilm.cosine_table(sparsities=sparsities, block=args.block)
    out = Table(
        title=f"all-MiniLM-L6-v2, {len(minilm.SENTENCES)} sentences, block {args.block} balanced: "
        "cosine to dense embeddings (mean / worst)"
    )
    out.add_column("sparsity", justify="right")
    for score in ("magnitude", "activation"):
        out.add_column(score, justify="right")
    for sparsity in sparsities:
        cells = [
            f"{table[(s, sparsity)][0]:.4f} / {table[(s, sparsity)][1]:.4f}"
            for s in ("magnitude", "activation")
        ]
        out.add_row(f"{sparsity:.0%}", *cells)
    Console(width=140).print(out)


if __name__ == "__main__":
    main()
