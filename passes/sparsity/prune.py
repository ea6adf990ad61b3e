"""prune: zero whole blocks of each linear weight down to a target sparsity (approximate).

Blocks are ``bk x bn`` (input rows x output columns) or whole neurons (structured: a channel
between two layers, both sides zeroed so sparse-matmul can cut it out). Blocks are ranked by
magnitude, or by the activation-aware score |W_ij|·||x_i|| (Wanda) from calibration inputs.
Each layer reaches the same sparsity; ``balanced`` gives every group of bn output columns the
same number of blocks, which is what the column-group form runs fastest. Embedding tables and
the final projection are left alone unless asked. The report gives each layer's result and
the accuracy cost against the unpruned graph, computed on the verification inputs.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np
import onnx_ir as ir

from txcompile.graph import ort as rt
from txcompile.graph import workspace
from txcompile.graph.errors import TxError
from txcompile.passes.base import TxPass
from txcompile.passes.rules import FUSED, UNFUSED, SiteRecord

from . import blocks, calibration, structured
from .linears import INNER, Linear, find_linears

SCORES = ("magnitude", "activation")


@dataclasses.dataclass(frozen=True)
class PruneOptions:
    sparsity: str | float | None = None  # a fraction, or per-layer NAME=FRACTION pairs
    block: str | None = None  # K×N, e.g. 1x32; None: the best shape per layer
    prune_score: str = "magnitude"
    balanced: bool = False
    prune_final: bool = False  # prune the final (LM head / classifier) linear too
    calib: str | None = None

    def __post_init__(self) -> None:
        if self.prune_score not in SCORES:
            raise TxError(f"--prune-score {self.prune_score!r}: choose one of {', '.join(SCORES)}")
        if self.calib and not os.path.isfile(self.calib):
            raise TxError(f"--calib {self.calib}: no such file")
        if self.sparsity is not None:
            blocks.parse_sparsity(self.sparsity)  # bad input fails before any pass runs


class Prune(TxPass):
    name = "prune"
    summary = "zero the lowest-scoring weight blocks to --sparsity (magnitude or activation-aware)"
    exact = False
    Options = PruneOptions

    def __init__(self, context=None) -> None:
        super().__init__(context)
        options = self.options
        self.sparsity = options.sparsity
        self.block = blocks.parse_block(options.block)
        self.score = options.prune_score
        self.balanced = options.balanced
        self.include_final = options.prune_final
        self.calib = options.calib

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        if self.sparsity is None:
            raise TxError("prune needs a target: --sparsity 0.9")
        sparsity = blocks.parse_sparsity(self.sparsity)
        before = workspace.serialize(model) if self.context.feeds else None
        linears = find_linears(model.graph)
        norms: dict[str, np.ndarray] = {}
        calibrated_on = None
        if self.score == "activation":
            feeds, calibrated_on = calibration.calibration_feeds(before, self.calib, self.context.feeds)
            norms = calibration.input_norms(model, linears, feeds)
        if self.block.structured:
            layers = self._prune_neurons(model.graph, linears, sparsity, norms)
        else:
            layers = [self._prune_blocks(linear, sparsity, norms) for linear in linears]
        zeroed = sum(layer.get("zeroed", 0) for layer in layers)
        self.details = {
            "sparsity": sparsity,
            "block": str(self.block),
            "score": self.score,
            "balanced": self.balanced,
            "calibrated_on": calibrated_on,
            "layers": layers,
            "params_zeroed": zeroed,
            "sites": _sites(layers, "neurons" if self.block.structured else f"blocks-{self.block}", linears),
        }
        if before is not None and zeroed:
            self.details["accuracy"] = accuracy(before, workspace.serialize(model), self.context.feeds)
        return ir.passes.PassResult(model, zeroed > 0)

    def _skip(self, linear: Linear) -> str | None:
        if linear.role != INNER and not self.include_final:
            return f"{linear.role}: not pruned unless asked (--prune-final)"
        return None

    def _scores(self, linear: Linear, weight: np.ndarray, norms: dict) -> np.ndarray:
        magnitude = np.abs(weight.astype(np.float64))
        if self.score == "activation":
            return magnitude * norms[linear.name][:, None]
        return magnitude

    def _prune_blocks(self, linear: Linear, sparsity: float, norms: dict) -> dict[str, Any]:
        weight = linear.matrix()
        k, n = weight.shape
        entry: dict[str, Any] = {"layer": linear.name, "shape": [k, n], "role": linear.role}
        reason = self._skip(linear)
        if reason is None and not self.block.fits(k, n):
            reason = f"block {self.block} does not tile [{k}, {n}]"
        if reason:
            entry["skipped"] = reason
            return entry
        scores = blocks.block_sums(self._scores(linear, weight, norms), self.block)  # [K/bk, N/bn]
        keep = select(scores, sparsity, balanced=self.balanced)
        mask = np.repeat(np.repeat(keep, self.block.rows, axis=0), self.block.cols, axis=1)
        pruned = np.where(mask, weight, 0).astype(weight.dtype)
        linear.set_matrix(pruned)
        self.tag([linear.node], f"prune-{self.block}")
        self.rule_counts[f"blocks-{self.block}"] += 1
        entry["sparsity_before"] = round(float((weight == 0).mean()), 4)
        entry["sparsity_after"] = round(float((pruned == 0).mean()), 4)
        entry["zeroed"] = int(((weight != 0) & (pruned == 0)).sum())
        return entry

    def _prune_neurons(self, graph: ir.Graph, linears: list[Linear], sparsity: float, norms: dict):
        regions, reasons = structured.find_regions(graph, linears)
        in_region = {s.name for r in regions for s in r.sources} | {r.sink.name for r in regions}
        layers = [
            {
                "layer": lin.name,
                "skipped": f"no neuron structure: {reasons.get(lin.name, 'feeds no layer pair')}",
            }
            for lin in linears
            if lin.name not in in_region
        ]
        for region in regions:
            entry: dict[str, Any] = {
                "layer": region.sink.name,
                "sources": [s.name for s in region.sources],
                "channels": region.channels,
            }
            layers.append(entry)
            reason = next((r for r in map(self._skip, [*region.sources, region.sink]) if r), None)
            if reason:
                entry["skipped"] = reason
                continue
            sink = region.sink.matrix()
            outgoing = np.linalg.norm(sink.astype(np.float64), axis=1)  # [channels]
            if self.score == "activation":
                score = outgoing * norms[region.sink.name]
            else:
                incoming = sum(np.linalg.norm(s.matrix().astype(np.float64), axis=0) for s in region.sources)
                score = outgoing * incoming
            keep = select(score[:, None], sparsity, balanced=False)[:, 0]
            zeroed = int((sink[~keep] != 0).sum())
            region.sink.set_matrix(np.where(keep[:, None], sink, 0).astype(sink.dtype))
            for source in region.sources:
                matrix = source.matrix()
                zeroed += int((matrix[:, ~keep] != 0).sum())
                source.set_matrix(np.where(keep[None, :], matrix, 0).astype(matrix.dtype))
            self.tag([region.sink.node, *(s.node for s in region.sources)], "prune-neuron")
            self.rule_counts["neurons"] += 1
            entry.update(kept_channels=int(keep.sum()), zeroed=zeroed)
        return layers


def _sites(layers: list[dict[str, Any]], rule: str, linears: list[Linear]) -> list[dict[str, Any]]:
    """Each layer as a shared site record: pruned (its op keeps its kind), or skipped with why."""
    ops = {lin.name: lin.node.op_type for lin in linears}
    records = []
    for layer in layers:
        skipped = layer.get("skipped")
        status, op = (UNFUSED, None) if skipped else (FUSED, ops.get(layer["layer"]))
        records.append(SiteRecord(layer["layer"], rule, status, op=op, reason=skipped).as_dict())
    return records


def select(scores: np.ndarray, sparsity: float, balanced: bool) -> np.ndarray:
    """Boolean keep-mask over blocks [R, G]: the top (1 - sparsity) by score, per column if balanced."""
    rows, cols = scores.shape
    if balanced:
        keep_count = max(1, int(round((1.0 - sparsity) * rows)))
        order = np.argsort(-scores, axis=0, kind="stable")[:keep_count]
        keep = np.zeros_like(scores, dtype=bool)
        np.put_along_axis(keep, order, True, axis=0)
        return keep
    keep_count = max(1, int(round((1.0 - sparsity) * scores.size)))
    order = np.argsort(-scores, axis=None, kind="stable")[:keep_count]
    keep = np.zeros(scores.size, dtype=bool)
    keep[order] = True
    return keep.reshape(rows, cols)


def accuracy(before, after, feeds: dict) -> dict[str, float]:
    """Pruned against unpruned on the same inputs: max abs diff, and cosine per output row."""
    reference = rt.run(rt.create_session(before), feeds)
    pruned = rt.run(rt.create_session(after), feeds)
    worst, cosines = 0.0, []
    for a, b in zip(reference.values(), pruned.values(), strict=True):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        worst = max(worst, float(np.abs(a - b).max()))
        rows_a, rows_b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
        cosines.extend(cosine_rows(rows_a, rows_b))
    return {
        "max_abs_diff": worst,
        "mean_cosine": float(np.mean(cosines)),
        "min_cosine": float(np.min(cosines)),
    }


def cosine_rows(a: np.ndarray, b: np.ndarray) -> list[float]:
    norms = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    dots = (a * b).sum(axis=-1)
    return list(np.where(norms > 0, dots / np.maximum(norms, 1e-30), 1.0))
