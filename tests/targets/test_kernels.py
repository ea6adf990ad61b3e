# ruff: noqa: E501  (MD_SNIPPET holds OperatorKernels.md rows verbatim)
"""The kernel tables: CPU agrees with the installed onnxruntime, CUDA with OperatorKernels.md."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from txcompile.graph import kernels

from .graphs import make, tensor

# (domain, op, opset, input dtypes): loaded in a real CPU session and compared with the table.
PROBES = [
    ("", "Add", 14, [TensorProto.FLOAT] * 2),
    ("", "Add", 14, [TensorProto.FLOAT16] * 2),
    ("", "Add", 14, [TensorProto.BFLOAT16] * 2),
    ("", "MatMul", 13, [TensorProto.FLOAT] * 2),
    ("", "MatMul", 13, [TensorProto.FLOAT16] * 2),
    ("", "Relu", 14, [TensorProto.FLOAT16]),
    ("", "Softmax", 13, [TensorProto.FLOAT16]),
    ("", "Gelu", 20, [TensorProto.FLOAT]),
    ("", "Erf", 13, [TensorProto.DOUBLE]),
    ("", "Neg", 13, [TensorProto.INT8]),
    ("", "Sqrt", 13, [TensorProto.DOUBLE]),
    ("com.microsoft", "BiasSoftmax", 1, [TensorProto.FLOAT] * 2),
    ("com.microsoft", "FastGelu", 1, [TensorProto.FLOAT]),
    ("com.microsoft", "FastGelu", 1, [TensorProto.FLOAT16]),
    ("com.microsoft", "BiasGelu", 1, [TensorProto.FLOAT] * 2),
    ("com.microsoft", "QuickGelu", 1, [TensorProto.DOUBLE]),
]

ATTRIBUTES = {"BiasSoftmax": {"is_inner_broadcast": 0}}
# How a CPU session says it has no kernel: plainly, or (contrib ops with a function body, e.g.
# fp16 FastGelu) by failing to inline the fp32 body it falls back to.
NO_KERNEL = ("NOT_IMPLEMENTED", "Could not find an implementation", "InsertedPrecisionFreeCast")


def _probe_loads(domain: str, op: str, opset: int, dtypes: list[int], tmp_path) -> bool:
    names = [f"i{k}" for k in range(len(dtypes))]
    node = helper.make_node(op, names, ["y"], domain=domain, **ATTRIBUTES.get(op, {}))
    model = make(
        [node],
        [tensor(n, [4, 4], t) for n, t in zip(names, dtypes, strict=True)],
        [tensor("y", None, dtypes[0])],
    )
    model.opset_import[0].version = opset
    if domain:
        model.opset_import.append(helper.make_opsetid(domain, 1))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 4
    options.optimized_model_filepath = str(tmp_path / "loaded.onnx")
    try:
        ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception as err:  # no kernel; any other failure means the probe itself is broken
        assert any(marker in str(err) for marker in NO_KERNEL), err
        return False
    # Without an fp16 kernel ORT's CPU EP wraps the op in Casts to fp32 instead of failing.
    loaded = onnx.load(tmp_path / "loaded.onnx")
    return not any(n.op_type == "Cast" for n in loaded.graph.node)


@pytest.mark.parametrize("domain,op,opset,dtypes", PROBES, ids=lambda p: str(p))
def test_cpu_table_matches_installed_runtime(domain, op, opset, dtypes, tmp_path):
    binding = {"T": kernels.dtype_name(dtypes[0])}
    runs_natively = _probe_loads(domain, op, opset, dtypes, tmp_path)
    assert kernels.cpu_table().has(domain, op, opset, binding) == runs_natively


def test_cpu_table_is_the_whole_registry():
    from onnxruntime.capi import _pybind_state

    registered = [k for k in _pybind_state.get_all_opkernel_def() if k.provider == "CPUExecutionProvider"]
    assert len(kernels.cpu_table()) == len(registered) > 1000


def test_cuda_table_knows_what_the_design_notes_say():
    cuda, cpu = kernels.cuda_table(), kernels.cpu_table()
    assert cuda.provider == "CUDAExecutionProvider"
    assert not cuda.has("com.microsoft", "GroupQueryAttention", 1, {"T": "float"})
    assert cuda.has("com.microsoft", "GroupQueryAttention", 1, {"T": "float16"})
    assert cuda.has("com.microsoft", "BiasSoftmax", 1, {"T": "float16"})
    assert not cpu.has("com.microsoft", "BiasSoftmax", 1, {"T": "float"})
    for op in ("RemovePadding", "RestorePadding", "PackedMultiHeadAttention", "MultiHeadAttention"):
        assert cuda.has("com.microsoft", op, 1, {"T": "float16"}), op
    assert cuda.has("", "MatMul", 13, {"T": "bfloat16"}) and not cuda.has("", "MatMul", 13, {"T": "int8"})
    assert not cuda.has("", "Upsample", 10, {"T": "float"})  # closed at opset 9
    assert "opset 10" in cuda.why_not("", "Upsample", 10, {"T": "float"})


# Rows copied verbatim from OperatorKernels.md (CUDA section) at the commit the table names.
MD_SNIPPET = """
## Operators implemented by CUDAExecutionProvider

| Op Name | Parameters | OpSet Version | Types Supported |
|---------|------------|---------------|-----------------|
|**Operator Domain:** *ai.onnx*||||
|Add|*in* A:**T**<br> *in* B:**T**<br> *out* C:**T**|14+|**T** = tensor(bfloat16), tensor(double), tensor(float), tensor(float16), tensor(int16), tensor(int32), tensor(int64), tensor(int8), tensor(uint16), tensor(uint32), tensor(uint64), tensor(uint8)|
|||13|**T** = tensor(bfloat16), tensor(double), tensor(float), tensor(float16), tensor(int32), tensor(int64), tensor(uint32), tensor(uint64)|
|||[7, 12]|**T** = tensor(double), tensor(float), tensor(float16), tensor(int32), tensor(int64), tensor(uint32), tensor(uint64)|
|IsNaN|*in* X:**T1**<br> *out* Y:**T2**|20+|**T1** = tensor(bfloat16), tensor(double), tensor(float), tensor(float16), tensor(float8e4m3fn), tensor(float8e4m3fnuz), tensor(float8e5m2), tensor(float8e5m2fnuz)<br/> **T2** = tensor(bool)|
|||[13, 19]|**T1** = tensor(bfloat16), tensor(double), tensor(float), tensor(float16)<br/> **T2** = tensor(bool)|
|||[9, 12]|**T1** = tensor(double), tensor(float), tensor(float16)<br/> **T2** = tensor(bool)|
|Upsample|*in* X:**T**<br> *in* scales:**tensor(float)**<br> *out* Y:**T**<br><br>or<br><br>*in* X:**T**<br> *out* Y:**T**|9|**T** = tensor(double), tensor(float), tensor(float16), tensor(int32), tensor(uint8)|
|||[7, 8]|**T** = tensor(double), tensor(float), tensor(float16), tensor(int32), tensor(uint8)|
| |
| |
|**Operator Domain:** *com.microsoft*||||
|GroupQueryAttention|*in* query:**T**<br> *in* key:**T**<br> *out* output:**T**|1+|**M** = tensor(int32)<br/> **T** = tensor(bfloat16), tensor(float16)<br/> **T_CACHE** = tensor(bfloat16), tensor(float16), tensor(float8e4m3fn), tensor(int8)<br/> **T_KV_SCALE** = tensor(float)|
|SequenceLength|*in* input_sequence:**S**<br> *out* length:**I**|11+|**I** = tensor(int64)<br/> **S** = seq(tensor(bool)), seq(tensor(float))|
| |
| |

## Operators implemented by DmlExecutionProvider
|**Operator Domain:** *ai.onnx*||||
|Add|*in* A:**T**<br> *in* B:**T**<br> *out* C:**T**|14+|**T** = tensor(float)|
"""


def test_generator_reproduces_the_checked_in_rows():
    checked_in = json.loads(kernels.CUDA_TABLE.read_text())
    parsed = kernels.parse_operator_kernels_md(MD_SNIPPET, "CUDAExecutionProvider")
    assert len(parsed["ai.onnx"]["Add"]) == 3  # the Dml section is not read
    compact = kernels.compact_table(parsed, checked_in["aliases"])
    for domain in ("ai.onnx", "com.microsoft"):
        for op, entry in compact[domain].items():
            if op in checked_in["kernels"][domain]:
                assert entry == checked_in["kernels"][domain][op], (domain, op)
    assert compact["com.microsoft"]["SequenceLength"] == [11, {"I": "int64"}]  # seq() types dropped


def test_generator_refuses_a_missing_section():
    with pytest.raises(kernels.TxError, match="no section"):
        kernels.parse_operator_kernels_md(MD_SNIPPET, "ROCMExecutionProvider")


def test_binding_follows_the_schema():
    schema = kernels.schema_for("com.microsoft", "SkipLayerNormalization", 1)
    assert kernels.bind(schema, ["float16", "float16", "float16"], [None]) == {"T": "float16"}
    cast = kernels.schema_for("", "Cast", 19)
    assert kernels.output_types(cast, {"to": onnx.TensorProto.FLOAT16}, ["float"], 1) == ["float16"]
    assert kernels.dtype_name(np.dtype("float32").num and TensorProto.FLOAT) == "float"
