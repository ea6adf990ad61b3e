"""Generation with the KV cache: greedy ids equal to transformers' generate for every decoder
family (batch of two prompts of different lengths), every attention site fused, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from txcompile import api
from txcompile.graph import modelio
from txcompile.graph.errors import TxError
from txcompile.runtime.generate import Generator, Sampling

from .decoders import DECODERS, decoder_folder, torch_greedy, transformers_greedy

os.environ.setdefault("HF_HUB_OFFLINE", "1")
PROMPTS = [[5, 17, 33, 2, 9, 41, 7], [12, 99, 3]]
NEW_TOKENS = 32
NO_ROTARY = {"GPT2LMHeadModel", "OPTForCausalLM"}  # learned positions


def _compiled(tmp_path, architecture: str, exporter: str = "auto", **options):
    folder = decoder_folder(tmp_path, architecture)
    torch_model, exported, dims = api.export(folder, exporter=exporter)
    result = api.compile_exported(torch_model, exported, api.settings(dims=dims, **options))
    return folder, result, result.save(tmp_path / "decoder.onnx")


def _check_fused(report: dict, architecture: str) -> None:
    records = {r["name"]: r for r in report["passes"]}
    attention = records["fuse-attention"]["details"]
    assert (attention["fused"], attention["unfused"]) == (2, 0), attention["sites"]
    rotary = records["fuse-rotary"]["details"]
    if architecture in NO_ROTARY:
        assert rotary["sites"] == []
    else:
        assert (rotary["fused"], rotary["unfused"]) == (4, 0), rotary["sites"]


@pytest.mark.slow
@pytest.mark.parametrize("architecture", list(DECODERS))
def test_greedy_ids_match_transformers(tmp_path, architecture):
    folder, result, path = _compiled(tmp_path, architecture)
    assert result.passed is True
    _check_fused(result.report, architecture)
    steps = result.report["verification"]["decode_steps"]  # prefill, then present fed back as past
    assert steps["steps"] == 3 and steps["max_diff"] < 1e-4
    generator = Generator(path)
    generated = generator.generate(PROMPTS, NEW_TOKENS, eos_ids=[])
    expected = transformers_greedy(folder, PROMPTS, NEW_TOKENS, generator.settings.pad_id)
    assert generated.ids == expected
    assert generated.stopped == "max_new_tokens" and generated.decode_tokens == 2 * (NEW_TOKENS - 1)


@pytest.mark.slow
@pytest.mark.parametrize("architecture", ["LlamaForCausalLM", "MistralForCausalLM", "GPT2LMHeadModel"])
def test_group_query_attention_over_the_cache_generates_the_same(tmp_path, architecture):
    """--attention-op gqa: GroupQueryAttention appends to the past itself (its presents are the
    graph's outputs) and takes the site's mask as its bias: left padding and Mistral's window
    stay exact. The graph reads the past length from the mask, so generate binds one buffer as
    past and present; the same ids come out of the loop that passes each present on instead."""
    folder, result, path = _compiled(tmp_path, architecture, attention_op="gqa")
    assert result.passed is True
    details = next(r for r in result.report["passes"] if r["name"] == "fuse-attention")["details"]
    assert [s["op"] for s in details["sites"]] == ["com.microsoft.GroupQueryAttention"] * 2
    assert details["shared_cache"] is True
    model = modelio.load_model(path)
    producers = {o: n.op_type for n in model.graph.node for o in n.output}
    assert {producers[o.name] for o in model.graph.output if o.name.startswith("present.")} == {
        "GroupQueryAttention"
    }
    # Q, K and V reach the op as [B, S, hidden] straight from the projections (rotated there
    # when the model has rotary embeddings): no head split and merge around it
    reads = {
        producers.get(i) for n in model.graph.node if n.op_type == "GroupQueryAttention" for i in n.input[:3]
    }
    assert reads <= {"Split", "RotaryEmbedding", "MatMul", "Gemm", "Add"}, reads
    expected = transformers_greedy(folder, PROMPTS, NEW_TOKENS, 1)
    shared, passed_on = Generator(path), Generator(path, share_cache=False)
    assert shared.shares_cache and not passed_on.shares_cache
    assert shared.generate(PROMPTS, NEW_TOKENS, eos_ids=[]).ids == expected
    assert passed_on.generate(PROMPTS, NEW_TOKENS, eos_ids=[]).ids == expected


@pytest.mark.slow
@pytest.mark.parametrize("architecture", ["LlamaForCausalLM", "GPT2LMHeadModel"])
def test_the_torchscript_export_generates_the_same(tmp_path, architecture):
    folder, result, path = _compiled(tmp_path, architecture, exporter="torchscript")
    assert result.export.exporter == "torchscript" and result.passed is True
    _check_fused(result.report, architecture)
    generated = Generator(path).generate(PROMPTS, NEW_TOKENS, eos_ids=[])
    assert generated.ids == transformers_greedy(folder, PROMPTS, NEW_TOKENS, 1)


def test_the_built_in_decoder_generates_what_its_torch_loop_does(tmp_path):
    """tiny-llama with --task text-generation is the built-in decoder with a cache."""
    torch_model = api._exporters().load_model_spec("tiny-llama", task="text-generation")
    assert torch_model.source == "tiny-llama-decoder"
    result = api.compile("tiny-llama-decoder")
    assert result.passed is True
    _check_fused(result.report, "LlamaForCausalLM")
    generator = Generator(result.save(tmp_path / "tiny.onnx"))
    assert not generator.shares_cache  # MultiHeadAttention returns a new present each step
    assert generator.generate(PROMPTS, 16).ids == torch_greedy(torch_model, PROMPTS, 16)


def test_one_shared_cache_buffer_generates_what_passing_presents_on_does(tmp_path):
    """--attention-op gqa: the built-in decoder's cache is read by GroupQueryAttention alone, so
    generate appends to one buffer in place; same ids as the loop that passes presents on, and
    as the torch loop, for prompts of different lengths."""
    torch_model = api._exporters().load_model_spec("tiny-llama-decoder")
    result = api.compile("tiny-llama-decoder", attention_op="gqa")
    details = next(r for r in result.report["passes"] if r["name"] == "fuse-attention")["details"]
    assert result.passed is True and details["shared_cache"] is True
    path = result.save(tmp_path / "tiny.onnx")
    shared, passed_on = Generator(path), Generator(path, share_cache=False)
    assert shared.shares_cache and not passed_on.shares_cache
    expected = torch_greedy(torch_model, PROMPTS, 16)
    assert shared.generate(PROMPTS, 16).ids == passed_on.generate(PROMPTS, 16).ids == expected


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama")
    return _compiled(root, "LlamaForCausalLM")[2]


def test_sampling_is_seeded_and_stays_in_the_top_k(llama):
    generator = Generator(llama)
    first = generator.generate(PROMPTS, 8, sampling=Sampling(temperature=0.7, top_k=5, seed=3), eos_ids=[])
    again = generator.generate(PROMPTS, 8, sampling=Sampling(temperature=0.7, top_k=5, seed=3), eos_ids=[])
    other = generator.generate(PROMPTS, 8, sampling=Sampling(temperature=0.7, top_k=5, seed=4), eos_ids=[])
    assert first.ids == again.ids and first.ids != other.ids
    one = generator.generate(PROMPTS, 8, sampling=Sampling(top_k=1, seed=9), eos_ids=[])
    assert one.ids == generator.generate(PROMPTS, 8, eos_ids=[]).ids  # top-1 sampling is greedy


def test_rows_stop_at_their_end_of_text_id(llama):
    generator = Generator(llama)
    greedy = generator.generate(PROMPTS, 12, eos_ids=[])
    eos = greedy.ids[0][3]
    stopped = generator.generate(PROMPTS, 12, eos_ids=[eos])
    assert stopped.ids[0] == greedy.ids[0][: greedy.ids[0].index(eos) + 1]
    if eos not in greedy.ids[1]:
        assert stopped.ids[1] == greedy.ids[1]


def test_bad_prompts_are_refused(llama):
    generator = Generator(llama)
    assert generator.settings.max_positions == 2048 and generator.vocab == 300
    with pytest.raises(TxError, match="leaves no room: the model has 2048 positions"):
        generator.generate([[3] * 2048])
    with pytest.raises(TxError, match=r"prompt ids must lie in \[0, 300\); got 300"):
        generator.generate([[1, 300]])
    with pytest.raises(TxError, match="every prompt needs at least one token id"):
        generator.generate([[1], []])
    with pytest.raises(TxError, match="saved without a tokenizer"):
        generator.generate_text(["hello"])
    with pytest.raises(TxError, match="top-p"):
        Sampling(top_p=0)


def test_a_graph_without_past_inputs_is_refused(tmp_path):
    path = api.compile("tiny-bert", verify=False).save(tmp_path / "bert.onnx")
    with pytest.raises(TxError, match="no past_key_values inputs; export it with --task text-generation"):
        Generator(path)


def test_generate_cli_prints_ids_and_timings(llama):
    command = [
        sys.executable,
        "-m",
        "txcompile",
        "generate",
        str(llama),
        "--prompt-ids",
        "5,17,33",
        "--prompt-ids",
        "12",
        "--max-new-tokens",
        "6",
        "--eos-id",
        "299",
        "--json",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    printed = json.loads(done.stdout)
    expected = Generator(llama).generate([[5, 17, 33], [12]], 6, eos_ids=[299])
    assert printed["ids"] == expected.ids and len(printed["ids"][0]) == 6
    assert printed["prefill_ms"] > 0 and printed["decode_tokens"] == 10
    bad = subprocess.run([*command[:5], "--prompt", "hello"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "saved without a tokenizer" in bad.stderr
    sampled = subprocess.run(
        [*command, "--greedy", "--top-k", "3"], capture_output=True, text=True, timeout=120
    )
    assert sampled.returncode == 2 and "--greedy" in sampled.stderr


def test_the_step_check_feeds_each_side_its_own_present(llama):
    """A graph whose logits are right but whose cache is off shows only from the second step."""
    from txcompile.graph import inputs, modelio
    from txcompile.graph import ort as rt
    from txcompile.runtime.generate import compare_steps

    session = rt.create_session(llama)
    specs = inputs.read_specs(modelio.load_model(llama))

    def run(feeds):
        return rt.run(session, feeds)

    def stale_cache(feeds):
        return {k: v * 1.01 if k.startswith("present.") else v for k, v in run(feeds).items()}

    assert compare_steps(run, run, specs) == 0.0
    assert compare_steps(stale_cache, run, specs, steps=1) > 1e-3


@pytest.mark.slow
def test_int8_and_int4_graphs_generate(tmp_path):
    """Quantized decoders keep the cache I/O and generate; on random weights the first token (from
    the prefill) still agrees with fp32, and the report measures the drift over the decode steps."""
    folder = decoder_folder(tmp_path, "LlamaForCausalLM")
    fp32 = Generator(api.compile(folder).save(tmp_path / "fp32.onnx")).generate(PROMPTS, 16, eos_ids=[])
    for precision, rule, op in (
        ("int8", "int8-matmul", "MatMulInteger"),
        ("int4", "int4-matmul", "MatMulNBits"),
    ):
        result = api.compile(folder, precision=precision)
        quantize = next(r for r in result.report["passes"] if r["name"] == "quantize")
        assert (
            quantize["status"] == "applied" and quantize["rule_counts"][rule] == 9
        )  # q/k/v and gate/up packed: 4 products a layer, and the LM head
        assert result.report["ops"]["after"].get(op, 0) + result.report["ops"]["after"].get(
            f"com.microsoft.{op}", 0
        )
        assert result.report["verification"]["decode_steps"]["max_diff"] < 0.5
        generated = Generator(result.save(tmp_path / f"{precision}.onnx")).generate(PROMPTS, 16, eos_ids=[])
        assert [len(ids) for ids in generated.ids] == [16, 16]
        assert [ids[0] for ids in generated.ids] == [ids[0] for ids in fp32.ids]


def test_a_decoder_without_recorded_inputs_gets_fitting_ones(llama):
    """A with-past graph from another exporter records no specs: the inferred ones still fit
    together (cache over past_seq, mask over past_seq + seq), so optimize can verify it."""
    from txcompile.graph import inputs, modelio
    from txcompile.graph import ort as rt

    model = modelio.load_model(llama)
    del model.metadata_props[:]
    specs = {s.name: s for s in inputs.read_specs(model)}
    assert specs["attention_mask"].shape == ("batch", "total_seq")
    assert specs["past_key_values.0.key"].shape == ("batch", 2, "past_seq", 16)
    feeds = inputs.make_feeds(list(specs.values()), {"batch": 2, "seq": 5, "past_seq": 3})
    outputs = rt.run(rt.create_session(model), feeds)
    assert outputs["present.0.key"].shape == (2, 2, 8, 16)


@pytest.mark.slow
def test_int4_takes_gpt2s_gemms_and_its_tied_head(tmp_path):
    """GPT-2 exports its projections as Gemm and reads the LM head through a Transpose of the
    embedding table: int4 turns all nine products (four per layer, the head) into MatMulNBits,
    and the report counts what was converted, not what was offered."""
    folder = decoder_folder(tmp_path, "GPT2LMHeadModel")
    result = api.compile(folder, precision="int4")
    ops = result.report["ops"]["after"]
    assert ops.get("com.microsoft.MatMulNBits") == 9 and "Gemm" not in ops and "MatMul" not in ops
    quantize = next(r for r in result.report["passes"] if r["name"] == "quantize")
    assert quantize["rule_counts"]["int4-matmul"] == quantize["details"]["quantized"] == 9
    generated = Generator(result.save(tmp_path / "gpt2-int4.onnx")).generate(PROMPTS, 8, eos_ids=[])
    assert [len(ids) for ids in generated.ids] == [8, 8]


def _gqa_sites(result) -> list[dict]:
    return next(r for r in result.report["passes"] if r["name"] == "fuse-attention")["details"]["sites"]


def test_a_cached_site_takes_the_padding_alone_as_its_bias(tmp_path):
    """cache-padding-bias: the built-in decoder's mask is causal ∧ padding and it records no
    sliding window, so GroupQueryAttention gets a bias of the padding only (finite, so no NaN
    guard after it) and the exporter's mask subgraph goes; same ids as the torch loop."""
    torch_model = api._exporters().load_model_spec("tiny-llama-decoder")
    result = api.compile("tiny-llama-decoder", attention_op="gqa")
    assert result.passed is True and result.report["verification"]["decode_steps"]["max_diff"] < 1e-4
    assert [s["bias"] for s in _gqa_sites(result)] == ["padding only"] * 2
    model = result.model
    producers = {o: n for n in model.graph.node for o in n.output}
    attention = [n for n in model.graph.node if n.op_type == "GroupQueryAttention"]
    assert {producers[n.input[10]].op_type for n in attention} == {"Expand"}
    outputs = {a.output[0] for a in attention}
    assert not any(n.op_type == "Where" and set(n.input) & outputs for n in model.graph.node)
    assert "Trilu" not in {n.op_type for n in model.graph.node}  # the exporter's causal mask went
    path = result.save(tmp_path / "tiny.onnx")
    assert Generator(path).generate(PROMPTS, 16).ids == torch_greedy(torch_model, PROMPTS, 16)


def test_a_decoder_with_a_sliding_window_keeps_the_exporters_mask(tmp_path):
    """A window wider than the verification inputs would look like none on them: a recorded
    window keeps the exporter's mask, and the NaN guard with it."""
    folder, result, path = _compiled(tmp_path, "MistralForCausalLM", attention_op="gqa")
    window = json.loads((folder / "config.json").read_text())["sliding_window"]
    reasons = {s["bias"] for s in _gqa_sites(result)}
    assert reasons == {f"the exporter's mask: a {window}-token sliding window: the exporter's mask keeps it"}
    expected = transformers_greedy(folder, PROMPTS, NEW_TOKENS, 1)
    assert Generator(path).generate(PROMPTS, NEW_TOKENS, eos_ids=[]).ids == expected


def test_a_decoder_whose_window_is_not_recorded_keeps_the_exporters_mask(tmp_path):
    """A graph whose txcompile.generation metadata predates the sliding_window field (or comes
    from elsewhere) may hide a window: the exporter's mask stays, with the reason."""
    torch_model, exported, dims = api.export("tiny-llama-decoder")
    props = exported.ir_model.metadata_props
    fields = json.loads(props["txcompile.generation"])
    del fields["sliding_window"]
    props["txcompile.generation"] = json.dumps(fields)
    result = api.compile_exported(torch_model, exported, api.settings(dims=dims, attention_op="gqa"))
    assert result.passed is True
    assert {s["bias"] for s in _gqa_sites(result)} == {
        "the exporter's mask: the model's sliding window is not recorded (txcompile.generation metadata)"
    }


def test_the_generation_metadata_records_the_sliding_window():
    from txcompile.graph import task_metadata

    recorded = task_metadata.Generation((2,), 0, 64, sliding_window=8)
    props = {task_metadata.GENERATION_KEY: recorded.to_json()}
    assert task_metadata.generation_of(props, "m") == recorded
    older = task_metadata.Generation((2,), 0, 64)  # written before the field: not recorded
    assert "sliding_window" not in older.to_json()
    assert (
        task_metadata.generation_of({task_metadata.GENERATION_KEY: older.to_json()}, "m").sliding_window
        is None
    )
    bad = json.dumps({"eos_ids": [2], "pad_id": 0, "max_positions": 64, "sliding_window": -1})
    with pytest.raises(TxError, match="is not an object of eos_ids, pad_id, max_positions"):
        task_metadata.generation_of({task_metadata.GENERATION_KEY: bad}, "m")
