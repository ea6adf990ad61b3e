"""Small Hugging Face folders for each task: a random-weight checkpoint saved by transformers
(so the reference model loads the very same weights) and a WordPiece tokenizer."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from .conftest import HF_DATA

WORDS = (
    "the a man woman cat dog is are was playing plays guitar street market fell sharply stock "
    "where does live in paris london who what city river bank money music loud quiet sleeps "
    "on warm window sun rain cold day night new old phone camera photo"
).split()
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
LABELS = {0: "negative", 1: "neutral", 2: "positive"}


def write_tokenizer(folder: Path) -> None:
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = SPECIAL + WORDS + letters + [f"##{c}" for c in letters] + list(".,?!'")
    (folder / "vocab.txt").write_text("\n".join(dict.fromkeys(vocab)) + "\n")
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "BertTokenizer", "do_lower_case": True, "model_max_length": 128})
    )


def task_folder(root: Path, task: str) -> Path:
    """A BERT (text tasks), ViT (images) or GPT-2 (generation) folder serving ``task``."""
    import transformers

    base, auto = {
        "feature-extraction": ("bert", "AutoModel"),
        "sentence-embedding": ("bert", "AutoModel"),
        "text-classification": ("bert", "AutoModelForSequenceClassification"),
        "token-classification": ("bert", "AutoModelForTokenClassification"),
        "question-answering": ("bert", "AutoModelForQuestionAnswering"),
        "image-classification": ("vit", "AutoModelForImageClassification"),
        "text-generation": ("gpt2", "AutoModelForCausalLM"),
    }[task]
    folder = root / task
    config = transformers.AutoConfig.from_pretrained(HF_DATA / base, local_files_only=True)
    if task.endswith("classification"):
        config.id2label, config.label2id = LABELS, {v: k for k, v in LABELS.items()}
    torch.manual_seed(0)
    model = getattr(transformers, auto).from_config(config)
    model.save_pretrained(folder)
    if base == "bert":
        write_tokenizer(folder)
    if task == "sentence-embedding":
        write_sentence_transformers(folder, pooling="mean_tokens", normalize=True)
    return folder


def write_sentence_transformers(folder: Path, pooling: str, normalize: bool) -> None:
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    if normalize:
        modules.append(
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}
        )
    (folder / "modules.json").write_text(json.dumps(modules))
    shutil.rmtree(folder / "1_Pooling", ignore_errors=True)
    (folder / "1_Pooling").mkdir()
    modes = ("cls_token", "max_tokens", "mean_tokens", "mean_sqrt_len_tokens")
    config = {"word_embedding_dimension": 64, **{f"pooling_mode_{m}": m == pooling for m in modes}}
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(config))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 64}))
