"""A compiled model in an onnxruntime session that takes text, or arrays, and returns outputs.

The tokenizer comes from the model's own metadata (``compile`` saves it there), so one .onnx
file is all that is needed. Lists of texts are tokenized once, sorted by length and run in
batches of similar length, so padding costs little; results come back in the caller's order.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

import numpy as np

from txcompile.graph import modelio, task_metadata
from txcompile.graph import ort as rt
from txcompile.graph.errors import TxError

Text = str | tuple[str, str]  # a text, or a (question, context) pair
NUMPY_TYPES = {"tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(float)": np.float32}


class LoadedModel:
    """``model(**arrays)`` or ``model(texts)``: outputs by name. ``encode(texts)``: the first
    output per text, batched by length (sentence embeddings, class logits)."""

    def __init__(self, path: str | os.PathLike, *, device: str = "cpu", threads: int | None = None):
        model, self.files = modelio.load_model_and_files(path, weights=False)  # the session reads the weights
        self.path = str(path)
        info = task_metadata.read(model, self.path)
        self.task, self.labels = info.task, info.labels
        self._tokenizer, self._pad_id = (
            tokenizer_from_json(info.tokenizer, self.path) if info.tokenizer else (None, 0)
        )
        with rt.refusal(self.path):
            self.session = rt.create_session(path, device, threads)
        self.input_types = {i.name: i.type for i in self.session.get_inputs()}
        self.output_names = [o.name for o in self.session.get_outputs()]

    @property
    def has_tokenizer(self) -> bool:
        return self._tokenizer is not None

    def __call__(
        self, texts: Text | Sequence[Text] | None = None, /, **arrays: np.ndarray
    ) -> dict[str, np.ndarray]:
        if texts is not None:
            if arrays:
                raise TxError("give texts or arrays, not both")
            arrays = self.tokenize(_as_list(texts))
        with rt.refusal(self.path):
            return rt.run(self.session, arrays)

    def tokenize(self, texts: Sequence[Text]) -> dict[str, np.ndarray]:
        """The graph's text inputs for ``texts``, padded to the longest."""
        return self._batch(self._encodings(texts))

    def encode(self, texts: Iterable[Text], batch_size: int = 32) -> np.ndarray:
        """The first output for each text, in order, computed in batches of similar length."""
        texts = _as_list(texts)
        if batch_size < 1:
            raise TxError(f"batch size must be at least 1, not {batch_size}")
        encodings = self._encodings(texts)
        order = sorted(range(len(texts)), key=lambda i: len(encodings[i].ids))
        results: list[np.ndarray | None] = [None] * len(texts)
        for start in range(0, len(order), batch_size):
            chosen = order[start : start + batch_size]
            batch = self._batch([encodings[i] for i in chosen])
            with rt.refusal(self.path):
                first = rt.run(self.session, batch)[self.output_names[0]]
            for row, index in enumerate(chosen):
                results[index] = first[row]
        return np.stack(results)

    def _encodings(self, texts: Sequence[Text]):
        if self._tokenizer is None:
            raise TxError(f"{self.path}: saved without a tokenizer; give arrays (--inputs) instead of text")
        if not texts:
            raise TxError("no text given")
        bad = [t for t in texts if not (isinstance(t, str) or _is_pair(t))]
        if bad:
            raise TxError(
                f"a text is a str or a (question, context) pair of str, not {type(bad[0]).__name__}"
            )
        return self._tokenizer.encode_batch([tuple(t) if _is_pair(t) else t for t in texts])

    def _batch(self, encodings) -> dict[str, np.ndarray]:
        """Right-padded ids, mask and token types, as the graph's inputs want them."""
        length = max(len(e.ids) for e in encodings)
        columns = {
            "input_ids": [e.ids for e in encodings],
            "attention_mask": [e.attention_mask for e in encodings],
            "token_type_ids": [e.type_ids for e in encodings],
        }
        feeds = {}
        for name, rows in columns.items():
            if name not in self.input_types:
                continue
            fill = self._pad_id if name == "input_ids" else 0
            array = np.full((len(rows), length), fill, NUMPY_TYPES.get(self.input_types[name], np.int64))
            for i, row in enumerate(rows):
                array[i, : len(row)] = row
            feeds[name] = array
        missing = [n for n in self.input_types if n not in feeds]
        if missing:
            raise TxError(f"{self.path}: takes {', '.join(missing)}, which text does not give")
        return feeds


def tokenizer_from_json(text: str, where: str) -> tuple:
    """The tokenizer saved in a model (without padding) and its padding id."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise TxError("running on text needs the tokenizers package (pip install 'txcompile[hf]')") from None
    try:
        tokenizer = Tokenizer.from_str(text)
    except Exception as err:
        raise TxError(f"{where}: metadata {task_metadata.TOKENIZER_KEY} is not a tokenizer: {err}") from None
    pad_id = int((tokenizer.padding or {}).get("pad_id", 0))
    tokenizer.no_padding()  # batches are padded here, to the longest text of each
    return tokenizer, pad_id


def _is_pair(text) -> bool:
    return isinstance(text, tuple | list) and len(text) == 2 and all(isinstance(t, str) for t in text)


def _as_list(texts) -> list:
    if isinstance(texts, str) or _is_pair(texts) and isinstance(texts, tuple):
        return [texts]
    return list(texts)


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(-1, keepdims=True))
    return shifted / shifted.sum(-1, keepdims=True)


def cosines(embeddings: np.ndarray) -> np.ndarray:
    unit = embeddings / np.maximum(np.linalg.norm(embeddings, axis=-1, keepdims=True), 1e-12)
    return unit @ unit.T


def top_labels(model: LoadedModel, logits: np.ndarray, k: int = 3) -> list[tuple[str, float]]:
    """The ``k`` most likely labels of one row of class logits, with their probabilities."""
    scores = softmax(logits.astype(np.float64))
    best = np.argsort(-scores)[:k]
    return [(model.labels.get(int(i), f"LABEL_{int(i)}"), float(scores[i])) for i in best]


def token_labels(model: LoadedModel, text: str, logits: np.ndarray) -> list[tuple[str, str, float]]:
    """Each real token of ``text`` with its most likely label and that label's probability."""
    (encoding,) = model._encodings([text])
    scores = softmax(logits[: len(encoding.ids)].astype(np.float64))
    return [
        (token, model.labels.get(int(row.argmax()), f"LABEL_{int(row.argmax())}"), float(row.max()))
        for token, row, special in zip(encoding.tokens, scores, encoding.special_tokens_mask, strict=True)
        if not special
    ]


def best_span(
    model: LoadedModel, question: str, context: str, start: np.ndarray, end: np.ndarray, max_tokens: int = 30
) -> tuple[str, float]:
    """The span of ``context`` with the highest start + end score (end not before start)."""
    (encoding,) = model._encodings([(question, context)])
    in_context = np.array([s == 1 for s in encoding.sequence_ids])
    if not in_context.any():
        return "", 0.0
    n = len(encoding.ids)
    start_p, end_p = (
        softmax(np.where(in_context, start[:n], -np.inf)),
        softmax(np.where(in_context, end[:n], -np.inf)),
    )
    scores = np.triu(np.outer(start_p, end_p)) - np.triu(np.outer(start_p, end_p), max_tokens)
    first, last = np.unravel_index(int(scores.argmax()), scores.shape)
    begin, finish = encoding.offsets[first][0], encoding.offsets[last][1]
    return context[begin:finish], float(scores[first, last])
