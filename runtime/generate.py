"""Generate tokens with a decoder graph that takes past keys/values and returns the present ones.

Prompts of different lengths are left-padded (the last position of every row is then a real
token, and the graph returns the logits of the last position only); position ids count the
real tokens, as transformers' ``generate`` does, so greedy ids match it exactly. Each step's
``present.*`` outputs stay ONNX Runtime values bound as the next step's ``past_key_values.*``
(I/O binding): the cache is never copied into numpy and back. Where every cache input feeds
GroupQueryAttention alone (``--attention-op gqa``), one buffer of the whole sequence's length
is bound as both past and present, and the op appends to it in place: no per-step copy at all.
A row that has produced an end-of-text id is padded from then on; the loop ends when every row
has, or after ``max_new_tokens``, or when the sequence reaches the model's last position.
:func:`compare_steps` checks a compiled decoder the way it is used: prefill, then decode steps.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from txcompile.graph import modelio, task_metadata
from txcompile.graph import ort as rt
from txcompile.graph.errors import TxError, one_line
from txcompile.graph.inputs import PAST_DIM, PAST_INPUT, make_feeds
from txcompile.graph.nodes import shape_axes
from txcompile.runtime.text import tokenizer_from_json

ELEMENT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


@dataclasses.dataclass(frozen=True)
class Sampling:
    """Sampling instead of greedy choice: temperature, then top-k, then nucleus (top-p)."""

    temperature: float = 1.0
    top_k: int = 0  # 0: no limit
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.temperature > 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise TxError("sampling needs temperature > 0, 0 < top-p <= 1 and top-k >= 0")


@dataclasses.dataclass
class Generated:
    """New token ids per prompt (up to and including an end-of-text id) and how long it took."""

    ids: list[list[int]]
    prefill_ms: float
    decode_seconds: float
    decode_tokens: int  # tokens the decode steps produced, summed over the batch
    stopped: str  # "eos", "max_new_tokens" or "positions"

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_seconds if self.decode_seconds > 0 else 0.0

    def to_json(self) -> dict:
        return {
            "ids": self.ids,
            "prefill_ms": round(self.prefill_ms, 3),
            "decode_tokens_per_s": round(self.decode_tokens_per_s, 2),
            "decode_tokens": self.decode_tokens,
            "stopped": self.stopped,
        }


@dataclasses.dataclass(frozen=True)
class _Past:
    input: str
    output: str
    heads: int
    head_dim: int
    dtype: type


class Generator:
    """A decoder graph with past/present I/O in an onnxruntime session: ``generate(prompt_ids)``,
    or ``generate_text(texts)`` with the tokenizer saved in the model or one given (a folder
    with tokenizer.json, or the file)."""

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        device: str = "cpu",
        threads: int | None = None,
        tokenizer: str | os.PathLike | None = None,
        share_cache: bool = True,
    ):
        model, self.files = modelio.load_model_and_files(path, weights=False)
        self.path, self.device = str(path), device
        info = task_metadata.read(model, self.path)
        self.settings = info.generation or task_metadata.Generation()
        self.tokenizer = None
        if tokenizer is not None:
            self.tokenizer = _tokenizer_file(tokenizer)
        elif info.tokenizer:
            self.tokenizer = tokenizer_from_json(info.tokenizer, self.path)[0]
        with rt.refusal(self.path):
            self.session = rt.create_session(path, device, threads)
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.past = self._past_inputs(inputs)
        missing = [n for n in ("input_ids", "attention_mask") if n not in inputs]
        if missing or "logits" not in self.outputs:
            raise TxError(
                f"{self.path}: a decoder graph takes input_ids and attention_mask and returns logits"
            )
        self.takes_positions = "position_ids" in inputs
        unknown = set(inputs) - {"input_ids", "attention_mask", "position_ids"} - {p.input for p in self.past}
        if unknown:
            raise TxError(f"{self.path}: takes {', '.join(sorted(unknown))}, which generate does not give")
        logits = self.session.get_outputs()[self.outputs.index("logits")]
        self.vocab = logits.shape[-1] if isinstance(logits.shape[-1], int) else None
        last_only = len(logits.shape) == 3 and logits.shape[1] == 1 and self.vocab is not None
        self.logits_type = ELEMENT_TYPES.get(logits.type) if last_only else None
        self.shares_cache = share_cache and _appends_in_place(model, self.past)

    def _past_inputs(self, inputs: dict) -> list[_Past]:
        found = {}
        for name, arg in inputs.items():
            match = PAST_INPUT.fullmatch(name)
            if match is None:
                continue
            output = f"present.{match[1]}.{match[2]}"
            shape = arg.shape
            if output not in self.outputs:
                raise TxError(f"{self.path}: has input {name} but no output {output}")
            if len(shape) != 4 or not all(isinstance(d, int) for d in (shape[1], shape[3])):
                raise TxError(f"{self.path}: {name} is not [batch, kv_heads, past_seq, head_dim] ({shape})")
            if arg.type not in ELEMENT_TYPES:
                raise TxError(f"{self.path}: {name} is {arg.type}; generate feeds float or float16 caches")
            found[(int(match[1]), match[2])] = _Past(
                name, output, shape[1], shape[3], ELEMENT_TYPES[arg.type]
            )
        if not found:
            raise TxError(
                f"{self.path}: the graph has no past_key_values inputs; export it with --task text-generation"
            )
        return [found[key] for key in sorted(found)]

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int = 32,
        *,
        sampling: Sampling | None = None,
        eos_ids: Sequence[int] | None = None,
    ) -> Generated:
        """Greedy (``sampling=None``) or sampled continuations of token-id prompts, batched."""
        prompts = [[int(t) for t in p] for p in prompts]
        self._check(prompts, max_new_tokens)
        eos = set(self.settings.eos_ids if eos_ids is None else eos_ids)
        pad, batch = self.settings.pad_id, len(prompts)
        longest = max(map(len, prompts))
        limit = self.settings.max_positions
        steps = max_new_tokens if limit is None else min(max_new_tokens, limit - longest)
        ids = np.full((batch, longest), pad, np.int64)
        mask = np.zeros((batch, longest), np.int64)
        for row, prompt in enumerate(prompts):
            ids[row, longest - len(prompt) :] = prompt
            mask[row, longest - len(prompt) :] = 1
        rng = np.random.default_rng(sampling.seed if sampling else 0)
        past = [self._empty(p, batch, longest + steps if self.shares_cache else 0) for p in self.past]
        binding = self._shared_binding(past, batch) if self.shares_cache else None
        new = np.zeros((batch, 0), np.int64)
        done = np.zeros(batch, bool)
        prefill = decode = 0.0
        for step in range(steps):
            start = time.perf_counter()
            logits, past = self._step(ids, mask, past, binding)
            choice = _choose(logits[:, -1].astype(np.float32), sampling, rng)
            choice = np.where(done, pad, choice)
            elapsed = time.perf_counter() - start
            if step == 0:
                prefill = elapsed
            else:
                decode += elapsed
            new = np.concatenate([new, choice[:, None]], axis=1)
            done |= np.isin(choice, list(eos))
            if done.all():
                break
            ids = choice[:, None]
            mask = np.concatenate([mask, np.ones((batch, 1), np.int64)], axis=1)
        stopped = "eos" if done.all() else "max_new_tokens" if steps == max_new_tokens else "positions"
        rows = [_until_eos(list(map(int, row)), eos) for row in new]
        produced = max(0, new.shape[1] - 1) * batch
        return Generated(rows, 1000 * prefill, decode, produced, stopped)

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise TxError(f"{self.path}: saved without a tokenizer; give prompt ids or a tokenizer folder")
        return list(self.tokenizer.encode(text).ids)

    def decode(self, ids: Sequence[int]) -> str:
        if self.tokenizer is None:
            raise TxError(f"{self.path}: saved without a tokenizer; give prompt ids or a tokenizer folder")
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def generate_text(self, texts: Sequence[str], max_new_tokens: int = 32, **options) -> list[str]:
        """The continuation of each text (the prompt itself not repeated)."""
        result = self.generate([self.encode(t) for t in texts], max_new_tokens, **options)
        return [self.decode(ids) for ids in result.ids]

    def _check(self, prompts: list[list[int]], max_new_tokens: int) -> None:
        if not prompts or not all(prompts):
            raise TxError("every prompt needs at least one token id")
        if max_new_tokens < 1:
            raise TxError(f"max new tokens must be at least 1, not {max_new_tokens}")
        high = max(max(p) for p in prompts)
        if min(min(p) for p in prompts) < 0 or (self.vocab is not None and high >= self.vocab):
            raise TxError(f"prompt ids must lie in [0, {self.vocab or '2^63'}); got {high}")
        limit = self.settings.max_positions
        longest = max(map(len, prompts))
        if limit is not None and longest >= limit:
            raise TxError(f"a prompt of {longest} tokens leaves no room: the model has {limit} positions")

    def _empty(self, past: _Past, batch: int, length: int) -> ort.OrtValue:
        zeros = np.zeros((batch, past.heads, length, past.head_dim), past.dtype)
        if self.device == "cpu":
            return ort.OrtValue.ortvalue_from_numpy(zeros)
        return ort.OrtValue.ortvalue_from_numpy(zeros, self.device, 0)

    def _shared_binding(self, past: list[ort.OrtValue], batch: int) -> _Shared:
        """One binding for a whole generation: each buffer is its layer's past and present at
        every step, so only the ids, the mask and the positions are bound again; the logits of
        the last position land in one array too when their shape is known."""
        binding = self.session.io_binding()
        logits = None
        if self.logits_type is not None:
            logits = np.empty((batch, 1, self.vocab), self.logits_type)
            binding.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(logits))
        else:
            binding.bind_output("logits", "cpu")  # the first output, as _step reads it
        for spec, value in zip(self.past, past, strict=True):
            binding.bind_ortvalue_input(spec.input, value)
            binding.bind_ortvalue_output(spec.output, value)  # appended in place
        return _Shared(binding, logits)

    def _step(self, ids: np.ndarray, mask: np.ndarray, past: list, shared: _Shared | None) -> tuple:
        binding = shared.binding if shared else self.session.io_binding()
        binding.bind_cpu_input("input_ids", np.ascontiguousarray(ids))
        binding.bind_cpu_input("attention_mask", mask)
        if self.takes_positions:
            positions = np.where(mask == 0, 1, np.cumsum(mask, axis=1) - 1)[:, -ids.shape[1] :]
            binding.bind_cpu_input("position_ids", np.ascontiguousarray(positions))
        if shared is None:
            for spec, value in zip(self.past, past, strict=True):
                binding.bind_ortvalue_input(spec.input, value)
            binding.bind_output("logits", "cpu")
            for spec in self.past:
                binding.bind_output(spec.output, self.device)
        with rt.refusal(self.path):
            self.session.run_with_iobinding(binding)
        if shared is not None:
            logits = shared.logits if shared.logits is not None else binding.get_outputs()[0].numpy()
            return logits, past
        outputs = binding.get_outputs()
        return outputs[0].numpy(), list(outputs[1:])


@dataclasses.dataclass(frozen=True)
class _Shared:
    binding: ort.IOBinding
    logits: np.ndarray | None  # bound as the logits output, when its shape is [batch, 1, vocab]


def _appends_in_place(model, past: list[_Past]) -> bool:
    """Whether one buffer may be a cache input and its present at once: GroupQueryAttention
    reads it as its past key or value (returning the matching present), and nothing else reads
    it but Shape nodes that leave out its length (the buffer's length is its capacity)."""
    readers: dict[str, list[tuple]] = {p.input: [] for p in past}
    for node in model.graph.node:
        for index, name in enumerate(node.input):
            if name in readers:
                readers[name].append((node, index))
    for spec in past:
        appends = [n for n, i in readers[spec.input] if n.op_type == "GroupQueryAttention" and i in (3, 4)]
        others = [n for n, _ in readers[spec.input] if n not in appends]
        if not appends or any(n.output[list(n.input).index(spec.input) - 2] != spec.output for n in appends):
            return False
        if not all(n.op_type == "Shape" and not _reads_length(n) for n in others):
            return False
    return True


def _reads_length(shape) -> bool:
    """Whether a Shape node of a 4-D cache includes its length (axis 2)."""
    bounds = {a.name: a.i for a in shape.attribute}
    return 2 in shape_axes(bounds.get("start"), bounds.get("end"), 4)


def _tokenizer_file(where: str | os.PathLike):
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise TxError("text prompts need the tokenizers package (pip install 'txcompile[hf]')") from None
    path = Path(where)
    file = path / "tokenizer.json" if path.is_dir() else path
    try:
        return Tokenizer.from_file(str(file))
    except Exception as err:  # tokenizers raises its own Exception for a missing or malformed file
        raise TxError(f"cannot read tokenizer {file}: {one_line(err)}") from None


def _choose(logits: np.ndarray, sampling: Sampling | None, rng: np.random.Generator) -> np.ndarray:
    if sampling is None:
        return logits.argmax(-1)
    scores = logits / sampling.temperature
    if sampling.top_k:
        kth = np.sort(scores, axis=-1)[:, -min(sampling.top_k, scores.shape[-1])][:, None]
        scores = np.where(scores < kth, -np.inf, scores)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    if sampling.top_p < 1:
        order = np.argsort(-probs, axis=-1)
        ranked = np.take_along_axis(probs, order, -1)
        outside = np.cumsum(ranked, -1) - ranked >= sampling.top_p  # keep the smallest set reaching top-p
        np.put_along_axis(probs, order, np.where(outside, 0.0, ranked), -1)
        probs /= probs.sum(-1, keepdims=True)
    return np.array([rng.choice(len(row), p=row) for row in probs], np.int64)


def _until_eos(row: list[int], eos: set[int]) -> list[int]:
    for index, token in enumerate(row):
        if token in eos:
            return row[: index + 1]
    return row


def compare_steps(
    run: Callable[[dict], dict],
    reference: Callable[[dict], dict],
    specs: list,
    steps: int = 3,
    padded_rows: Callable[[dict], dict] | None = None,
) -> float:
    """Max |run − reference| over a left-padded prefill (empty past) and ``steps`` decode steps,
    each side feeding its own present back as its past and both taking the reference's greedy
    token: how a decoder graph is used, which one forward on a random past does not show."""
    feeds = make_feeds(specs, {"batch": 2, "seq": 6, PAST_DIM: 0}, seed=5)
    ours, theirs = dict(feeds), dict(feeds)
    worst = 0.0
    for _ in range(steps + 1):
        got, want = run(ours), reference(theirs)
        rows = padded_rows(theirs) if padded_rows else None
        worst = max(worst, rt.max_abs_diff(got, want, rows))
        token = np.asarray(want["logits"])[:, -1].argmax(-1)[:, None].astype(np.int64)
        for side, outputs in ((ours, got), (theirs, want)):
            mask = np.concatenate([side["attention_mask"], np.ones_like(token)], axis=1)
            side["input_ids"], side["attention_mask"] = token, mask
            if "position_ids" in side:
                side["position_ids"] = side["position_ids"][:, -1:] + 1
            for name in [n for n in side if PAST_INPUT.fullmatch(n)]:
                side[name] = np.asarray(outputs[name.replace("past_key_values", "present")])
    return worst
