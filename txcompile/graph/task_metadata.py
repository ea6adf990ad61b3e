"""What a model is for, recorded in its metadata so it can be run on text later.

``compile`` writes the task (``txcompile.task``), the class labels of a classifier
(``txcompile.labels``) and the tokenizer of the folder it came from (``txcompile.tokenizer``,
the tokenizers library's JSON, with padding and truncation set) into the graph's metadata;
the model file then carries everything ``txcompile run --text`` needs. A downloaded model can
carry anything there, so every field is checked when read.
"""

from __future__ import annotations

import dataclasses
import json

import onnx

from txcompile.graph.errors import TxError

TASK_KEY = "txcompile.task"
LABELS_KEY = "txcompile.labels"
TOKENIZER_KEY = "txcompile.tokenizer"
TASK_NAMES = (
    "feature-extraction",
    "sentence-embedding",
    "text-classification",
    "token-classification",
    "question-answering",
    "image-classification",
    "text-generation",
)


@dataclasses.dataclass(frozen=True)
class TaskInfo:
    task: str | None
    labels: dict[int, str]
    tokenizer: str | None  # tokenizer.json text


def read(model: onnx.ModelProto, where: str) -> TaskInfo:
    props = {p.key: p.value for p in model.metadata_props}
    task = props.get(TASK_KEY)
    if task is not None and task not in TASK_NAMES:
        raise TxError(f"{where}: metadata {TASK_KEY} names no known task ({task[:40]!r})")
    labels = {}
    if LABELS_KEY in props:
        try:
            raw = json.loads(props[LABELS_KEY])
            labels = {int(k): str(v) for k, v in raw.items()}
        except (ValueError, TypeError, AttributeError, RecursionError):
            raise TxError(f"{where}: metadata {LABELS_KEY} is not a JSON object of index: label") from None
    return TaskInfo(task, labels, props.get(TOKENIZER_KEY))
