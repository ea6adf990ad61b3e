"""remove-padding: per-token work on real tokens only; packed attention for the GPU.

The CPU form runs here end to end in ORT. The GPU form (PackedAttention, PackedMultiHeadAttention)
has only CUDA kernels, so here it is checked two ways: every emitted op has a CUDA kernel at its
dtype (fp32, and fp16 after the precision pass), and the graph is evaluated with ONNX's
reference evaluator, the packed ops being the numpy reading of ORT's documented contract
(token_offset scatters the packed tokens into a right-padded [B, S] layout,
cumulative_sequence_length gives each row's length).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun

from txcompile import compiler, pipelines
from txcompile.cli import main
from txcompile.graph import inputs, kernels
from txcompile.graph import ort as rt
from txcompile.pass_manager import PassManager
from txcompile.passes.attention.remove_padding import RemovePadding
from txcompile.passes.base import PassContext
from txcompile.passes.targets.kernel_check import missing_kernels
from txcompile.passes.targets.precision import Precision


def optimized(model, passes=None, **options):
    settings = compiler.Settings(target="cpu", passes=passes, dims={"batch": 2, "seq": 16}, flags=options)
    outcome = compiler.optimize(model, settings, source="tiny-bert", output="x.onnx")
    assert outcome.passed is not False
    return outcome


def record(outcome, name="remove-padding"):
    return next(r for r in outcome.report["passes"] if r["name"] == name)


def feeds_for(model, batch, seq, keep):
    feeds = inputs.make_feeds(inputs.read_specs(model), {"batch": batch, "seq": seq}, seed=3)
    feeds["attention_mask"] = keep.astype(feeds["attention_mask"].dtype)
    return feeds


# right-padded, left-padded and unpadded rows, and one row that is all padding
MASKS = np.array([[1] * 11 + [0] * 5, [0] * 6 + [1] * 10, [1] * 16, [0] * 16], dtype=bool)


def test_cpu_graph_skips_padding_and_matches_on_real_tokens(tiny_bert):
    outcome = optimized(tiny_bert, remove_padding=True)
    step = record(outcome)
    assert step["status"] == "applied", step["reason"]
    rules = step["rule_counts"]
    # the CPU keeps each residual LayerNorm as Add + LayerNormalization: two per-token ops
    assert rules["attention-on-restored-layout"] == 2 and rules["per-token-on-real-tokens"] == 20
    assert set(step["details"]["attention"].values()) == {"restored layout"}
    assert step["max_diff"] <= 1e-5  # judged on real tokens only

    feeds = feeds_for(tiny_bert, 4, 16, MASKS)
    expected = rt.run(rt.create_session(tiny_bert), feeds)["last_hidden_state"]
    got = rt.run(rt.create_session(outcome.model), feeds)["last_hidden_state"]
    assert np.abs(got[MASKS] - expected[MASKS]).max() < 1e-4
    assert not got[~MASKS].any()  # padded positions are zero, not stale values
    assert rt.padded_rows(outcome.model, feeds)[0] is not None


def test_off_by_default_on_cpu(tiny_bert):
    step = record(optimized(tiny_bert))
    assert step["status"] == "unchanged" and "off" in step["details"]["note"]


def test_an_intermediate_graph_output_is_restored_too(tiny_bert):
    fused = optimized(tiny_bert, passes=["fuse-norms", "fuse-attention"]).model
    working = ir.serde.deserialize_model(fused)
    inner = next(n for n in working.graph if n.op_type == "LayerNormalization").outputs[0]
    working.graph.outputs.append(inner)  # a second reader of an intermediate: it needs [B, S, H]
    with_inner = ir.serde.serialize_model(working)
    outcome = optimized(with_inner, passes=["remove-padding"], remove_padding=True)
    assert record(outcome)["status"] == "applied"
    assert json.loads(dict((p.key, p.value) for p in outcome.model.metadata_props)[rt.PADDED_OUTPUTS_KEY])[
        "outputs"
    ] == [0, 1]
    feeds = feeds_for(tiny_bert, 4, 16, MASKS)
    before, after = (rt.run(rt.create_session(m), feeds) for m in (with_inner, outcome.model))
    for x, y in zip(before.values(), after.values(), strict=True):
        assert x.shape == y.shape and np.abs(x[MASKS] - y[MASKS]).max() < 1e-4 and not y[~MASKS].any()


def test_a_reader_of_padded_positions_rolls_the_pass_back(tiny_bert):
    """An unmasked mean over the sequence sees zeros where it saw padded tokens' values: the
    outputs change, verification catches it, and the model is left as it was."""
    fused = optimized(tiny_bert, passes=["fuse-norms", "fuse-attention"]).model
    working = ir.serde.deserialize_model(fused)
    inner = next(n for n in working.graph if n.op_type == "LayerNormalization").outputs[0]
    axes = ir.val("mean_axes", const_value=ir.tensor(np.array([1])))
    working.graph.register_initializer(axes)
    mean = ir.node("ReduceMean", [inner, axes], {"keepdims": 0})
    working.graph.append(mean)
    working.graph.outputs.append(mean.outputs[0])
    mean.outputs[0].name = "unmasked_mean"
    mean.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
    mean.outputs[0].shape = ir.Shape(["batch", 64])
    proto = ir.serde.serialize_model(working)
    step = record(optimized(proto, passes=["remove-padding"], remove_padding=True))
    assert step["status"] == "rolled back" and "drifted" in step["reason"]


def test_no_mask_input_no_change():
    model = onnx.parser.parse_model(
        """<ir_version: 9, opset_import: ["": 18]>
        g (float[2, 4, 8] x) => (float[2, 4, 8] y) { y = Relu(x) }"""
    )
    tx_pass = RemovePadding(PassContext("gpu", "cuda", {"x": np.ones((2, 4, 8), np.float32)}))
    assert not tx_pass(ir.serde.deserialize_model(model)).modified
    assert tx_pass.details["note"] == "no 2-D attention-mask input"


def test_unpadded_verification_inputs_cannot_check_the_masks(tiny_bert, tiny_bert_feeds):
    feeds = dict(tiny_bert_feeds, attention_mask=np.ones_like(tiny_bert_feeds["attention_mask"]))
    tx_pass = RemovePadding(PassContext("gpu", "cuda", feeds))
    assert not tx_pass(ir.serde.deserialize_model(tiny_bert)).modified
    assert "do not pad attention_mask" in tx_pass.details["note"]


def test_causal_decoder_keeps_its_mask_on_the_restored_layout(tiny_gpt2):
    """GPT-2's bias is causal ∧ padding: the packed kernels (padding only) cannot take it, so
    the gpu default leaves the decoder alone; asked for, attention runs on the restored layout
    and the MLPs skip padding."""
    model, feeds = tiny_gpt2
    fused = optimized(model, passes=["fuse-norms", "fuse-attention"]).model
    default = RemovePadding(PassContext("gpu", "cuda", feeds))
    assert not default(ir.serde.deserialize_model(fused)).modified
    assert "no attention site fits the packed kernels" in default.details["note"]
    tx_pass = RemovePadding(PassContext("gpu", "cuda", feeds, {"remove_padding": True}))
    working = ir.serde.deserialize_model(fused)
    tx_pass(working)
    assert tx_pass.rule_counts["attention-on-restored-layout"] >= 1
    assert not any(n.op_type.startswith("Packed") for n in working.graph)
    out = ir.serde.serialize_model(working)
    keep = feeds["attention_mask"].astype(bool)
    expected = list(rt.run(rt.create_session(fused), feeds).values())[0]
    got = list(rt.run(rt.create_session(out), feeds).values())[0]
    assert np.abs(got[keep] - expected[keep]).max() < 1e-4


# ---------------------------------------------------------------------------------------------
# GPU form


class PackedAttention(OpRun):
    """ORT's com.microsoft.PackedAttention contract, in numpy."""

    op_domain = "com.microsoft"

    def _run(self, x, weights, bias, token_offset, cumulative, attention_bias=None, **attributes):
        heads = attributes["num_heads"]
        batch, seq = token_offset.shape
        tokens, hidden = x.shape[0], weights.shape[1] // 3
        projected = x @ weights + bias
        padded = np.zeros((batch * seq, 3 * hidden), x.dtype)
        padded[token_offset.reshape(-1)[:tokens]] = projected
        q, k, v = (
            padded.reshape(batch, seq, 3, heads, hidden // heads)[:, :, i].transpose(0, 2, 1, 3)
            for i in range(3)
        )
        scale = attributes.get("scale") or 1 / np.sqrt(hidden // heads)
        scores = (q @ k.transpose(0, 1, 3, 2)) * scale
        lengths = np.diff(cumulative)
        scores = np.where(np.arange(seq)[None, None, None, :] < lengths[:, None, None, None], scores, -np.inf)
        with np.errstate(invalid="ignore"):  # an all-padding row has no keys; its rows are dropped
            weights_ = np.exp(scores - scores.max(-1, keepdims=True))
            out = (weights_ / weights_.sum(-1, keepdims=True)) @ v
        out = out.transpose(0, 2, 1, 3).reshape(batch * seq, hidden)
        return (out[token_offset.reshape(-1)[:tokens]].astype(x.dtype),)


class PackedMultiHeadAttention(OpRun):
    """ORT's com.microsoft.PackedMultiHeadAttention contract (separate Q, K, V), in numpy."""

    op_domain = "com.microsoft"

    def _run(self, query, key, value, bias, token_offset, cumulative, attention_bias=None, **attributes):
        weights = np.eye(query.shape[1], dtype=query.dtype)
        packed = np.concatenate([query, key, value], axis=1)  # as if projected by an identity
        return PackedAttention._run(
            self, packed, np.kron(np.eye(3, dtype=query.dtype), weights), bias, token_offset, cumulative,
            num_heads=attributes["num_heads"], scale=attributes.get("scale"),
        )  # fmt: skip


def as_multihead(model: onnx.ModelProto) -> onnx.ModelProto:
    """Each packed-QKV Attention rewritten as three MatMuls + MultiHeadAttention (what fusion
    emits when the projections cannot be packed)."""
    working = ir.serde.deserialize_model(model)
    graph = working.graph
    for node in [n for n in graph if n.op_type == "Attention"]:
        x, weights, bias, *_, attention_bias = node.inputs
        parts = np.split(weights.const_value.numpy(), 3, axis=1)
        projected = []
        for i, part in enumerate(parts):
            w = ir.val(f"{node.name}_w{i}", const_value=ir.tensor(part))
            graph.register_initializer(w)
            matmul = ir.node("MatMul", [x, w])
            graph.insert_before(node, matmul)
            projected.append(matmul.outputs[0])
        attributes = {a.name: a.value for a in node.attributes.values()}  # num_heads, scale
        mha = ir.node(
            "MultiHeadAttention", [*projected, bias, None, attention_bias], attributes, domain="com.microsoft"
        )
        graph.insert_before(node, mha)
        ir.convenience.replace_all_uses_with(node.outputs[0], mha.outputs[0], replace_graph_outputs=True)
        graph.remove(node, safe=True)
    return ir.serde.serialize_model(working)


def test_gpu_form_of_multihead_attention(tiny_bert, tiny_bert_feeds):
    fused = as_multihead(optimized(tiny_bert, passes=["fuse-attention"]).model)
    feeds = feeds_for(tiny_bert, 4, 16, MASKS)
    expected = rt.run(rt.create_session(fused), feeds)["last_hidden_state"]
    tx_pass = RemovePadding(PassContext("gpu", "cuda", tiny_bert_feeds))
    working = ir.serde.deserialize_model(fused)
    tx_pass(working)
    assert tx_pass.rule_counts["packed-PackedMultiHeadAttention"] == 2
    assert missing_kernels(working, kernels.cuda_table())[1] == []
    packed = ir.serde.serialize_model(working)
    names = {i.name for i in packed.graph.input}
    evaluator = ReferenceEvaluator(packed, new_ops=[PackedMultiHeadAttention])
    got = evaluator.run(None, {k: v for k, v in feeds.items() if k in names})[0]
    assert np.abs(got[MASKS] - expected[MASKS]).max() < 1e-4


def gpu_form(tiny_bert, feeds):
    """Attention fused, norms left as plain ops (the reference evaluator runs them), then packed."""
    fused = optimized(tiny_bert, passes=["fuse-attention"]).model
    tx_pass = RemovePadding(PassContext("gpu", "cuda", feeds))
    working = ir.serde.deserialize_model(fused)
    assert tx_pass(working).modified
    return fused, tx_pass, working


def test_gpu_form_uses_packed_attention_with_cuda_kernels(tiny_bert, tiny_bert_feeds):
    fused, tx_pass, working = gpu_form(tiny_bert, tiny_bert_feeds)
    ops = [n.op_type for n in working.graph]
    assert ops.count("PackedAttention") == 2 and "Attention" not in ops
    assert tx_pass.details["attention"] == {n: "packed op" for n in tx_pass.details["attention"]}
    assert missing_kernels(working, kernels.cuda_table())[1] == []
    Precision(PassContext("gpu", "cuda", {}, {"precision": "fp16"}))(working)
    assert missing_kernels(working, kernels.cuda_table())[1] == []
    assert (
        sum(
            n.op_type == "PackedAttention" and n.outputs[0].dtype == ir.DataType.FLOAT16
            for n in working.graph
        )
        == 2
    )


def test_gpu_form_matches_on_real_tokens_by_the_documented_contract(tiny_bert, tiny_bert_feeds):
    fused, _, working = gpu_form(tiny_bert, tiny_bert_feeds)
    packed = ir.serde.serialize_model(working)
    feeds = feeds_for(tiny_bert, 4, 16, MASKS)
    expected = rt.run(rt.create_session(fused), feeds)["last_hidden_state"]
    names = {i.name for i in packed.graph.input}
    got = ReferenceEvaluator(packed, new_ops=[PackedAttention]).run(
        None, {k: v for k, v in feeds.items() if k in names}
    )
    assert np.abs(got[0][MASKS] - expected[MASKS]).max() < 1e-4
    assert not got[0][~MASKS].any()


def test_pass_manager_compares_real_tokens_only(tiny_bert, tiny_bert_feeds):
    """The manager's diff ignores padded positions of recorded outputs, and only those."""
    fused = optimized(tiny_bert, passes=["fuse-attention"]).model
    manager = PassManager(
        [RemovePadding(PassContext("cpu", "cpu", tiny_bert_feeds, {"remove_padding": True}))]
    )
    result = manager.run(fused, tiny_bert_feeds)
    assert result.records[0].status == "applied" and result.records[0].max_diff < 1e-5
    keep = tiny_bert_feeds["attention_mask"].astype(bool)
    a = {"y": np.zeros((2, 16, 3))}
    b = {"y": np.where(keep[..., None], 0.0, np.full((2, 16, 3), 7.0))}
    assert rt.max_abs_diff(a, b) == 7.0
    assert rt.max_abs_diff(a, b, rt.padded_rows(result.model, tiny_bert_feeds)) == 0.0


def test_cli_remove_padding(tmp_path, tiny_bert, capsys):
    source = tmp_path / "plain.onnx"
    onnx.save(tiny_bert, source)
    out = tmp_path / "out.onnx"
    assert (
        main(["optimize", str(source), "-o", str(out), "--remove-padding", "--batch", "2", "--seq", "16"])
        == 0
    )
    assert "remove-padding" in capsys.readouterr().out
    assert main(["run", str(out), "--compare", str(source), "--batch", "3", "--seq", "12"]) == 0
    assert "max diff vs" in capsys.readouterr().out
    assert main(["run", str(source), "--compare", str(out), "--batch", "3", "--seq", "12"]) == 0


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory):
    """A 2-layer GPT-2 from a config (random weights), exported with its attention mask."""
    transformers = pytest.importorskip("transformers")
    from txcompile.exporters import export_onnx, load_model_spec

    folder = tmp_path_factory.mktemp("gpt2")
    transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=100, n_positions=64).save_pretrained(
        folder
    )
    model = export_onnx(load_model_spec(str(folder)), dims={"batch": 2, "seq": 16}).model
    feeds = inputs.make_feeds(inputs.read_specs(model), {"batch": 2, "seq": 16})
    return model, feeds


def test_whole_gpu_pipeline_packs_attention_and_every_op_has_a_cuda_kernel(tiny_bert, tiny_bert_feeds):
    """The gpu pipeline as `--target gpu` runs it (verification needs CUDA, so it is off here):
    fused norms and activations on real tokens, PackedAttention, fp16, kernel-checked."""
    context = PassContext("gpu", "cuda", tiny_bert_feeds, {})
    manager = PassManager(pipelines.build(pipelines.pass_names("gpu"), context), device="cuda", verify=False)
    result = manager.run(tiny_bert, tiny_bert_feeds)
    steps = {r.name: r for r in result.records}
    assert steps["remove-padding"].status == "applied"
    assert steps["remove-padding"].rule_counts["packed-PackedAttention"] == 2
    assert steps["kernel-check"].details["missing"] == 0
    ops = {n.op_type: n for n in result.model.graph.node}
    assert {"PackedAttention", "EmbedLayerNormalization", "SkipLayerNormalization", "BiasGelu"} <= set(ops)
    assert steps["precision"].details["low_ops"]["com.microsoft.PackedAttention"] == 2  # fp16


HF = Path(__file__).resolve().parents[1] / "data" / "hf"
# (family, exporter, attention) → (sites on the restored layout on the CPU, sites packed for the GPU)
FAMILIES = {
    ("roberta", "auto", None): (2, 2),
    ("distilbert", "auto", None): (2, 2),
    ("t5-encoder", "auto", None): (2, 0),  # relative position bias: not for the packed kernels
    ("bart", "auto", None): (2, 2),  # the encoder; the decoder (its own rows) and cross-attention stay
    ("bert", "torchscript", "sdpa"): (2, 2),  # fused as MultiHeadAttention: PackedMultiHeadAttention
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(FAMILIES, key=str), ids=lambda c: "-".join(filter(None, c)))
def test_families_on_real_tokens(case):
    """Encoders (and BART's encoder) skip their padding; outputs match on real tokens, left
    padding included; everything else — decoder rows, cross-attention — matches everywhere."""
    from txcompile.exporters import export_onnx, load_model_spec

    family, exporter, attention = case
    spec = load_model_spec(str(HF / family), attn_implementation=attention)
    model = export_onnx(spec, exporter=exporter, dims={"batch": 2, "seq": 16}).model
    outcome = optimized(model, remove_padding=True)
    step = record(outcome)
    assert step["status"] == "applied", step["reason"] or step["details"]
    restored, packed = FAMILIES[case]
    assert step["rule_counts"]["attention-on-restored-layout"] == restored
    feeds = feeds_for(model, 3, 16, MASKS[:3])  # right-padded, left-padded, unpadded
    before, after = (rt.run(rt.create_session(m), feeds) for m in (model, outcome.model))
    real_rows = rt.padded_rows(outcome.model, feeds)
    assert bool(real_rows) == (family != "bart")  # BART's output is the decoder's: compared everywhere
    assert rt.max_abs_diff(before, after, real_rows) < 1e-4
    verification = inputs.make_feeds(inputs.read_specs(model), {"batch": 2, "seq": 16})
    gpu = RemovePadding(PassContext("gpu", "cuda", verification))
    working = ir.serde.deserialize_model(optimized(model).model)
    gpu(working)
    assert sum(n.op_type.startswith("Packed") for n in working.graph) == packed
    assert missing_kernels(working, kernels.cuda_table())[1] == []


def test_int8_form_packs_the_qkv_projection_too(tiny_bert):
    """With --precision int8 attention reads Q, K, V from one MatMul + Split: that projection
    runs on real tokens as well, and quantize then works on the packed MatMuls."""
    outcome = optimized(tiny_bert, remove_padding=True, precision="int8")
    step = record(outcome)
    # the 20 of fp32, and per layer the packed projection's MatMul, its bias Add and the Split
    # before ONNX Attention (the CPU's int8 form; at fp32 com.microsoft.Attention projects inside)
    assert step["status"] == "applied" and step["rule_counts"]["per-token-on-real-tokens"] == 26
    assert set(step["details"]["attention"].values()) == {"restored layout"}
    assert record(outcome, "quantize")["status"] == "applied"
    feeds = feeds_for(tiny_bert, 4, 16, MASKS)
    expected = rt.run(rt.create_session(tiny_bert), feeds)["last_hidden_state"]
    got = rt.run(rt.create_session(outcome.model), feeds)["last_hidden_state"]
    assert np.abs(got[MASKS] - expected[MASKS]).max() < 0.5 and not got[~MASKS].any()  # int8 error
