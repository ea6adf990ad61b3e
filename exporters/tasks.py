"""What a Hugging Face folder's model is for, and the head, outputs and pooling that serve it.

A task picks the transformers class (``AutoModelFor…``), the outputs the graph returns, and
for sentence embeddings the pooling and normalization that sentence-transformers would apply
after the encoder, so they run inside the graph. It is inferred from a sentence-transformers
``modules.json`` (a Pooling module means sentence-embedding), else from the ending of
``config.architectures[0]``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from txcompile.graph.errors import TxError
from txcompile.graph.task_metadata import TASK_NAMES

from .quiet import captured, one_line

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model")


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    auto_class: str  # the transformers Auto class whose mapping gives the model class
    outputs: tuple[str, ...]  # keys of the model's output, in graph order
    endings: tuple[str, ...] = ()  # architecture names ending so serve this task


TASKS = {
    task.name: task
    for task in (
        Task("feature-extraction", "AutoModel", ("last_hidden_state",), ("Model", "Encoder")),
        Task("sentence-embedding", "AutoModel", ("sentence_embedding",)),
        Task(
            "text-classification",
            "AutoModelForSequenceClassification",
            ("logits",),
            ("ForSequenceClassification",),
        ),
        Task(
            "token-classification",
            "AutoModelForTokenClassification",
            ("logits",),
            ("ForTokenClassification",),
        ),
        Task(
            "question-answering",
            "AutoModelForQuestionAnswering",
            ("start_logits", "end_logits"),
            ("ForQuestionAnswering",),
        ),
        Task(
            "image-classification",
            "AutoModelForImageClassification",
            ("logits",),
            ("ForImageClassification",),
        ),
        Task("text-generation", "AutoModelForCausalLM", ("logits",), ("ForCausalLM", "LMHeadModel")),
    )
}
assert tuple(TASKS) == TASK_NAMES
POOLING_MODES = (
    "cls_token",
    "max_tokens",
    "mean_tokens",
    "mean_sqrt_len_tokens",
)  # sentence-transformers' order


def task_named(name: str) -> Task:
    if name not in TASKS:
        raise TxError(f"unknown task {name!r}: choose {', '.join(TASKS)}")
    return TASKS[name]


def infer_task(folder: Path, architectures: list[str], source: str) -> Task | None:
    """sentence-embedding for a sentence-transformers folder, else the architecture's task."""
    if _pooling_module(_modules(folder, source)) is not None:
        return TASKS["sentence-embedding"]
    return architecture_task(architectures)


def architecture_task(architectures: list[str]) -> Task | None:
    """The task whose longest ending ``architectures[0]`` has ("GPT2LMHeadModel" generates)."""
    if not architectures:
        return None
    matches = [(len(e), t) for t in TASKS.values() for e in t.endings if architectures[0].endswith(e)]
    return max(matches, key=lambda m: m[0])[1] if matches else None


def tokenizer_json(folder: Path, transformers, max_length: int, source: str) -> str | None:
    """The folder's fast tokenizer as tokenizers' JSON, padding to the longest text of a batch
    and truncating at ``max_length``; None when the folder has no tokenizer."""
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        return None
    try:
        with captured():
            loaded = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as err:
        raise TxError(f"{source}: cannot read its tokenizer: {one_line(err)}") from None
    backend = getattr(loaded, "backend_tokenizer", None)
    if backend is None:
        return None
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str(backend.to_str())
    tokenizer.enable_truncation(max_length=min(max_length, int(loaded.model_max_length or max_length)))
    if loaded.pad_token is not None:
        tokenizer.enable_padding(pad_id=int(loaded.pad_token_id), pad_token=str(loaded.pad_token))
    else:
        tokenizer.enable_padding()
    return tokenizer.to_str()


@dataclasses.dataclass(frozen=True)
class Pooling:
    modes: tuple[str, ...]
    normalize: bool


def pooling(folder: Path, source: str) -> Pooling:
    """The folder's pooling modes and whether a Normalize module follows; mean without
    normalization (what sentence-transformers does for a plain encoder) when there is none."""
    modules = _modules(folder, source)
    if modules is None:
        return Pooling(("mean_tokens",), False)
    entry = _pooling_module(modules)
    normalize = any(str(m.get("type", "")).endswith("Normalize") for m in modules)
    if entry is None:
        return Pooling(("mean_tokens",), normalize)
    config_path = folder / str(entry.get("path", "")) / "config.json"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
        modes = tuple(m for m in POOLING_MODES if config.get(f"pooling_mode_{m}") is True)
    except (OSError, ValueError, AttributeError) as err:
        raise TxError(f"{source}: unreadable pooling config {config_path}: {_reason(err)}") from None
    unknown = sorted(
        k
        for k, v in config.items()
        if k.startswith("pooling_mode_") and v is True and k[13:] not in POOLING_MODES
    )
    if unknown or not modes:
        what = f"unsupported {', '.join(unknown)}" if unknown else "no pooling mode set"
        raise TxError(f"{source}: pooling config {config_path}: {what}")
    return Pooling(modes, normalize)


def _modules(folder: Path, source: str) -> list[dict] | None:
    path = folder / "modules.json"
    if not path.is_file():
        return None
    try:
        modules = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
            raise ValueError("not a list of modules")
    except (OSError, ValueError) as err:
        raise TxError(f"{source}: unreadable {path}: {_reason(err)}") from None
    return modules


def _pooling_module(modules: list[dict] | None) -> dict | None:
    return next((m for m in modules or [] if str(m.get("type", "")).endswith("Pooling")), None)


def _reason(err: BaseException) -> str:
    return getattr(err, "strerror", None) or str(err).splitlines()[0]


class TaskOutputs(nn.Module):
    """Takes the inputs positionally and returns the task's outputs as a tuple."""

    def __init__(self, model: nn.Module, input_names: list[str], outputs: tuple[str, ...], kwargs: dict):
        super().__init__()
        self.model = model
        self.input_names = list(input_names)
        self.outputs = tuple(outputs)
        self.kwargs = dict(kwargs)

    def forward(self, *args):
        result = self.model(**dict(zip(self.input_names, args, strict=True)), **self.kwargs)
        if isinstance(result, tuple) and not hasattr(result, "keys"):
            return tuple(result[: len(self.outputs)])  # a model that ignores return_dict
        return tuple(result[key] for key in self.outputs)


class SentenceEmbedding(TaskOutputs):
    """The encoder, then sentence-transformers' pooling over real tokens and normalization."""

    def __init__(self, model: nn.Module, input_names: list[str], kwargs: dict, how: Pooling):
        super().__init__(model, input_names, ("last_hidden_state",), kwargs)
        self.modes = how.modes
        self.normalize = how.normalize

    def forward(self, *args):
        feeds = dict(zip(self.input_names, args, strict=True))
        (hidden,) = super().forward(*args)
        mask = feeds.get("attention_mask")
        if mask is None:
            mask = torch.ones(hidden.shape[:2], dtype=torch.int64)
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        count = weights.sum(1).clamp(min=1e-9)
        pooled = []
        for mode in self.modes:
            if mode == "cls_token":
                pooled.append(hidden[:, 0])
            elif mode == "max_tokens":
                pooled.append(hidden.masked_fill(weights == 0, -1e9).max(1).values)
            elif mode == "mean_tokens":
                pooled.append((hidden * weights).sum(1) / count)
            else:
                pooled.append((hidden * weights).sum(1) / count.sqrt())
        embedding = pooled[0] if len(pooled) == 1 else torch.cat(pooled, 1)
        return (F.normalize(embedding, p=2.0, dim=1) if self.normalize else embedding,)
