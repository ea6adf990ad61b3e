"""Test models for the norm passes: tiny HF configs exported with every 1-D parameter randomized.

Hugging Face initializes biases to 0 and norm weights to 1, which would let a wrong fold of a
norm's affine or a missed bias centering pass unnoticed; random values make them count.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from txcompile.exporters import export_onnx, load_model_spec
from txcompile.graph import inputs as model_inputs
from txcompile.graph import ort as rt

HF = Path(__file__).resolve().parents[1] / "data" / "hf"
DIMS = {"batch": 2, "seq": 16}
CLEANUP = ["fold-constants", "simplify-shapes", "remove-identity", "eliminate-cse", "remove-unused"]


def randomize_vectors(module: torch.nn.Module, seed: int = 0) -> None:
    """Biases ~ N(0, 0.1), norm weights ~ 1 + N(0, 0.1), class/position tokens kept."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if param.dim() != 1:
                continue
            noise = torch.randn(param.shape, generator=generator) * 0.1
            param.copy_((1.0 if name.endswith("weight") else 0.0) + noise)


@functools.cache
def exported(family: str, exporter: str = "auto", opset: int | None = None) -> onnx.ModelProto:
    """``tests/data/hf/<family>`` exported with randomized vectors (cached per session)."""
    model = load_model_spec(str(HF / family))
    randomize_vectors(model.module)
    return export_onnx(model, exporter=exporter, dims=DIMS, opset=opset).model


def feeds(model: onnx.ModelProto, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs with padding (the masks pad the end of every row but the first)."""
    return model_inputs.make_feeds(model_inputs.read_specs(model), DIMS, seed)


def outputs(model: onnx.ModelProto, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return rt.run(rt.create_session(model, optimize=False), inputs)


def ops(model: onnx.ModelProto) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def _array(value) -> np.ndarray:
    array = np.asarray(value)
    return array.astype(np.int64 if np.issubdtype(array.dtype, np.integer) else np.float32)


def graph_model(nodes, inputs, outputs_, initializers, opset: int = 20) -> onnx.ModelProto:
    """A hand-built model (fp32 value infos from (name, shape) pairs)."""
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in outputs_],
        [numpy_helper.from_array(_array(v), k) for k, v in initializers.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model


def optimize(model: onnx.ModelProto, passes: list[str], cleanup: bool = True):
    """Run ``passes`` (after cleanup) with verification on padded inputs; records by pass name."""
    from txcompile import compiler

    settings = compiler.Settings(passes=(CLEANUP if cleanup else []) + passes, dims=DIMS)
    outcome = compiler.optimize(model, settings, source="test", output="unused.onnx")
    return outcome.model, {r["name"]: r for r in outcome.report["passes"]}


def sites(record: dict, status: str, *rules: str) -> list[dict]:
    """The pass's site records (details["sites"]) with ``status``, of ``rules`` when given."""
    found = record["details"]["sites"]
    return [s for s in found if s["status"] == status and (not rules or s["rule"] in rules)]


def unfused(record: dict, *rules: str) -> list[dict]:
    return sites(record, "unfused", *rules)


def fused(record: dict, *rules: str) -> list[dict]:
    return sites(record, "fused", *rules)
