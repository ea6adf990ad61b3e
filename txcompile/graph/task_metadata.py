"""What a model is for, recorded in its metadata so it can be run on text later.

``compile`` writes the task (``txcompile.task``), the class labels of a classifier
(``txcompile.labels``) and the tokenizer of the folder it came from (``txcompile.tokenizer``,
the tokenizers library's JSON, with padding and truncation set) into the graph's metadata;
the model file then carries everything ``txcompile run --text`` needs. A decoder's end-of-text
and padding ids and the longest sequence it has positions for go in ``txcompile.generation``.
A downloaded model can carry anything there, so every field is checked when read.
"""

from __future__ import annotations

import dataclasses
import json

import onnx

from txcompile.graph.errors import TxError

TASK_KEY = "txcompile.task"
LABELS_KEY = "txcompile.labels"
TOKENIZER_KEY = "txcompile.tokenizer"
GENERATION_KEY = "txcompile.generation"  # a decoder's eos and pad ids and its longest sequence
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
    generation: Generation | None = None


@dataclasses.dataclass(frozen=True)
class Generation:
    eos_ids: tuple[int, ...] = ()
    pad_id: int = 0
    max_positions: int | None = None  # None: no learned or configured limit
    sliding_window: int | None = None  # keys a token sees at most; 0: all of them; None: not recorded

    def to_json(self) -> str:
        fields = {"eos_ids": list(self.eos_ids), "pad_id": self.pad_id, "max_positions": self.max_positions}
        if self.sliding_window is not None:
            fields["sliding_window"] = self.sliding_window
        return json.dumps(fields)


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
    generation = generation_of(props, where)
    return TaskInfo(task, labels, props.get(TOKENIZER_KEY), generation)


def _generation(text: str, where: str) -> Generation:
    def is_id(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**31

    try:
        raw = json.loads(text)
        eos, pad, limit = raw["eos_ids"], raw["pad_id"], raw["max_positions"]
        if not (isinstance(eos, list) and all(map(is_id, eos)) and is_id(pad)):
            raise ValueError("ids are not integers in [0, 2^31)")
        if limit is not None and not (is_id(limit) and limit > 0):
            raise ValueError("max_positions is not a positive integer")
        window = raw.get("sliding_window")
        if window is not None and not is_id(window):
            raise ValueError("sliding_window is not an integer in [0, 2^31)")
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError):
        raise TxError(
            f"{where}: metadata {GENERATION_KEY} is not an object of eos_ids, pad_id, max_positions"
        ) from None
    return Generation(tuple(eos), pad, limit, window)


def generation_of(props: dict[str, str], where: str) -> Generation | None:
    """The decoder settings recorded in metadata properties, if any."""
    return _generation(props[GENERATION_KEY], where) if GENERATION_KEY in props else None
