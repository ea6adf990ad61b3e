"""Local Hugging Face folders as TorchModels: config.json plus weights when there are any.

Nothing is fetched from a hub and no repository code is run (no ``trust_remote_code``): the
class comes from ``config.architectures[0]`` when transformers has it, else from AutoModel.
A folder without weights is built from its config with seed 0, which is enough to compile
and verify the graph; the TorchModel says so in its warnings. What inputs the model takes is
read from its ``forward`` signature, so encoder-only parts (T5EncoderModel, WhisperEncoder)
work like whole models. A task (:mod:`.tasks`), given or inferred, picks the head class and the
outputs, and the folder's tokenizer is stored in the graph's metadata.
"""

from __future__ import annotations

import importlib
import inspect
import json
from pathlib import Path

import torch
from torch import nn

from txcompile.graph import task_metadata
from txcompile.graph.errors import TxError
from txcompile.graph.inputs import InputSpec

from . import decoder, tasks
from .model import TorchModel
from .quiet import captured, one_line

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
OUTPUT_KEYS = ("logits", "last_hidden_state")  # without a task: the head's output, else the encoder's
ATTN_IMPLEMENTATIONS = ("eager", "sdpa")


def load_hf_folder(
    folder: str | Path,
    *,
    task: str | None = None,
    attn_implementation: str | None = None,
    source: str | None = None,
) -> TorchModel:
    """The model in ``folder`` in eval mode, fp32, with use_cache off, returning the outputs of
    ``task`` (inferred when None); its tokenizer, task and labels go into the metadata."""
    folder = Path(folder)
    source = source or str(folder)
    wanted = tasks.task_named(task) if task is not None else None
    if not (folder / "config.json").is_file():
        raise TxError(f"{source}: no config.json in {folder} (not a Hugging Face model folder)")
    if attn_implementation not in (None, *ATTN_IMPLEMENTATIONS):
        raise TxError(
            f"unknown attn_implementation {attn_implementation!r}: choose {', '.join(ATTN_IMPLEMENTATIONS)}"
        )
    transformers = _transformers(source)
    warnings: list[str] = []
    try:
        with captured():
            config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    except Exception as err:
        raise TxError(f"{source}: cannot read config.json: {one_line(err)}") from None
    architectures = [str(a) for a in getattr(config, "architectures", None) or []]
    by_architecture = tasks.architecture_task(architectures)
    chosen = wanted or tasks.infer_task(folder, architectures, source)
    if chosen is None or chosen == by_architecture:
        model_class, note = _model_class(transformers, config, source)
        if note:
            warnings.append(note)
    else:
        model_class = _task_class(transformers, config, chosen, source)
    kwargs: dict = {"dtype": torch.float32}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        with captured():
            if any((folder / name).is_file() for name in WEIGHT_FILES):
                model, info = model_class.from_pretrained(
                    folder, local_files_only=True, output_loading_info=True, **kwargs
                )
                warnings.extend(_loading_warnings(info, folder))
            else:
                torch.manual_seed(0)
                model = model_class._from_config(config, **kwargs)
                warnings.append(f"no weights in {folder}: random init (seed 0)")
    except Exception as err:
        raise TxError(f"{source}: cannot build {model_class.__name__}: {one_line(err)}") from None
    model.eval()
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False
    model.config.return_dict = True
    inputs, dims = _input_specs(model, source)
    dims, window = _beyond_window(model.config, dims), _window(model.config)
    metadata = _task_metadata(folder, model.config, chosen, transformers, source, warnings)
    if chosen is not None and chosen.name == "text-generation":
        wrapper, inputs, outputs, dims = decoder.with_past(model, inputs, dims, source)
        limit = _limit(model.config, "max_position_embeddings", "n_positions")
        settings = decoder.generation(model, limit if limit < 1 << 20 else None, window or 0)
        metadata[task_metadata.GENERATION_KEY] = settings.to_json()
        return TorchModel(wrapper, inputs, outputs, source, dims, warnings, metadata, window)
    if chosen is not None and chosen.name == "question-answering":
        inputs += _segment_ids(model)  # the context's tokens are segment 1
    call_kwargs = _call_kwargs(model)
    names = [s.name for s in inputs]
    outputs = _outputs(model, inputs, dims, call_kwargs, source, chosen)
    if chosen is not None and chosen.name == "sentence-embedding":
        if "attention_mask" not in names:
            raise TxError(f"{source}: sentence-embedding needs a text encoder with an attention_mask input")
        wrapper = tasks.SentenceEmbedding(model, names, call_kwargs, tasks.pooling(folder, source))
        outputs = ["sentence_embedding"]
    else:
        wrapper = tasks.TaskOutputs(model, names, tuple(outputs), call_kwargs)
    return TorchModel(wrapper.eval(), inputs, outputs, source, dims, warnings, metadata, window)


def _transformers(source: str):
    try:
        return importlib.import_module("transformers")
    except ImportError:
        raise TxError(
            f"{source}: Hugging Face folders need transformers (pip install 'txcompile[hf]')"
        ) from None


def _model_class(transformers, config, source: str):
    """``architectures[0]`` from transformers (or its model's module), else AutoModel's class."""
    architectures = list(getattr(config, "architectures", None) or [])
    if architectures:
        name = architectures[0]
        found = getattr(transformers, name, None) or _from_modeling_module(config, name)
        if isinstance(found, type) and issubclass(found, nn.Module):
            return found, None
    try:
        model_class = transformers.AutoModel._model_mapping[type(config)]
    except (KeyError, AttributeError):
        raise TxError(f"{source}: transformers has no model for model_type {config.model_type!r}") from None
    note = None
    if architectures:
        note = f"transformers has no {architectures[0]}: using {model_class.__name__}"
    return model_class, note


def _from_modeling_module(config, name: str):
    """Classes transformers does not export at the top level, e.g. WhisperEncoder."""
    model_type = str(getattr(config, "model_type", "")).replace("-", "_")
    try:
        module = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    except ImportError:
        return None
    return getattr(module, name, None)


def _loading_warnings(info: dict, folder: Path) -> list[str]:
    warnings = []
    for key, what in (
        ("missing_keys", "not in the checkpoint, random init"),
        ("mismatched_keys", "of the wrong shape in the checkpoint, random init"),
    ):
        names = sorted(str(k if isinstance(k, str) else k[0]) for k in info.get(key) or [])
        if names:
            shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
            warnings.append(f"{folder}: {len(names)} weights {what}: {shown}")
    return warnings


def _input_specs(model: nn.Module, source: str) -> tuple[list[InputSpec], dict[str, int]]:
    """Inputs by what ``forward`` accepts: images, audio features, or token ids (+ decoder ids)."""
    config = model.config
    params = inspect.signature(model.forward).parameters
    vocab = int(getattr(config, "vocab_size", 0) or 0)
    specs: list[InputSpec] = []
    dims = {"batch": 2, "seq": 16}
    if "pixel_values" in params:
        size = getattr(config, "image_size", 224)
        height, width = (size, size) if isinstance(size, int) else tuple(size)[:2]
        channels = int(getattr(config, "num_channels", 3))
        specs.append(InputSpec("pixel_values", "float32", ("batch", channels, height, width), "normal"))
        dims = {"batch": 2}
    elif "input_features" in params:
        length = 2 * int(config.max_source_positions)
        shape = ("batch", int(config.num_mel_bins), length)
        specs.append(InputSpec("input_features", "float32", shape, "normal"))
        dims = {"batch": 2}
    elif "input_ids" in params:
        if not vocab:
            raise TxError(f"{source}: config has no vocab_size, cannot draw input_ids")
        specs.append(InputSpec("input_ids", "int64", ("batch", "seq"), "ids", 0, vocab))
        if "attention_mask" in params:
            specs.append(InputSpec("attention_mask", "int64", ("batch", "seq"), "mask"))
    else:
        names = ", ".join(list(params)[:6])
        raise TxError(f"{source}: cannot tell the inputs of {type(model).__name__} (forward takes {names})")
    if "decoder_input_ids" in params:
        if not vocab:
            raise TxError(f"{source}: config has no vocab_size, cannot draw decoder_input_ids")
        specs.append(InputSpec("decoder_input_ids", "int64", ("batch", "decoder_seq"), "ids", 0, vocab))
        dims["decoder_seq"] = min(8, _limit(config, "max_target_positions", "max_position_embeddings"))
    if "seq" in dims:
        dims["seq"] = min(
            16, _limit(config, "max_position_embeddings", "n_positions", "max_source_positions")
        )
    return specs, dims


def _segment_ids(model: nn.Module) -> list[InputSpec]:
    """token_type_ids, for models that tell a text pair's two parts apart by them."""
    types = int(getattr(model.config, "type_vocab_size", 0) or 0)
    if types < 2 or "token_type_ids" not in inspect.signature(model.forward).parameters:
        return []
    return [InputSpec("token_type_ids", "int64", ("batch", "seq"), "ids", 0, types)]


WINDOW_VERIFY_LIMIT = 512  # longest verification sequence chosen to pass a sliding window


def _beyond_window(config, dims: dict[str, int]) -> dict[str, int]:
    """A sliding-window model (Mistral, Gemma 2/3, ModernBERT's local layers) is verified past
    its window, where the window changes what a token sees, when that is cheap (api.export says
    so when it is not)."""
    window = _window(config)
    if window is None or "seq" not in dims or dims["seq"] > window:
        return dims
    limit = _limit(config, "max_position_embeddings", "n_positions")
    return {**dims, "seq": window + 8} if window + 8 <= min(WINDOW_VERIFY_LIMIT, limit) else dims


def _window(config) -> int | None:
    """The sliding window the config attends with, if any (of the text model, for multimodal)."""
    for part in (config, getattr(config, "text_config", None)):
        if part is None or getattr(part, "use_sliding_window", True) is False:
            continue
        for name in ("sliding_window", "local_attention"):
            value = getattr(part, name, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def _limit(config, *names: str) -> int:
    """The longest sequence the config allows (learned position tables), else a large number."""
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 2:
            return value
    return 1 << 20


def _call_kwargs(model: nn.Module) -> dict:
    params = inspect.signature(model.forward).parameters
    kwargs = {}
    if "use_cache" in params:
        kwargs["use_cache"] = False
    if "return_dict" in params:
        kwargs["return_dict"] = True
    return kwargs


def _task_class(transformers, config, task: tasks.Task, source: str):
    try:
        return getattr(transformers, task.auto_class)._model_mapping[type(config)]
    except (KeyError, AttributeError):
        raise TxError(
            f"{source}: a {config.model_type} model cannot serve {task.name} "
            f"(transformers has no {task.auto_class} for it)"
        ) from None


def _outputs(model, inputs, dims, kwargs, source: str, task: tasks.Task | None) -> list[str]:
    """The task's outputs, checked to be there by one forward; without a task, logits when
    the model has a head, else last_hidden_state."""
    keys = _output_keys(model, inputs, dims, kwargs, source)
    if task is None:
        return [next((k for k in OUTPUT_KEYS if k in keys), keys[0])]
    wanted = ("last_hidden_state",) if task.name == "sentence-embedding" else task.outputs
    missing = [k for k in wanted if k not in keys]
    if missing:
        raise TxError(f"{source}: {type(model).__name__} gives no {', '.join(missing)} for {task.name}")
    return list(task.outputs)


def _task_metadata(
    folder: Path, config, task, transformers, source: str, warnings: list[str]
) -> dict[str, str]:
    """What running the graph on text needs: the task, the labels, the tokenizer."""
    metadata = {}
    if task is not None:
        metadata[task_metadata.TASK_KEY] = task.name
    labels = getattr(config, "id2label", None) or {}
    if task is not None and task.name.endswith("classification") and labels:
        metadata[task_metadata.LABELS_KEY] = json.dumps({str(k): str(v) for k, v in labels.items()})
    tokenizer = tasks.tokenizer_json(folder, transformers, _max_length(folder, config), source)
    if tokenizer is not None:
        metadata[task_metadata.TOKENIZER_KEY] = tokenizer
    elif any((folder / name).is_file() for name in tasks.TOKENIZER_FILES):
        warnings.append(
            f"{folder}: its tokenizer has no fast (tokenizer.json) form; none saved with the model"
        )
    return metadata


def _max_length(folder: Path, config) -> int:
    """sentence-transformers' max_seq_length when set, else the position table's length."""
    try:
        return int(json.loads((folder / "sentence_bert_config.json").read_text())["max_seq_length"])
    except (OSError, ValueError, KeyError, TypeError):
        return min(512, _limit(config, "max_position_embeddings", "n_positions"))


def _output_keys(model, inputs: list[InputSpec], dims: dict, kwargs: dict, source: str) -> list[str]:
    """The names of the tensors a forward on example inputs returns."""
    probe = TorchModel(model, inputs, [], source, dims)
    feeds = probe.example_inputs()
    try:
        with torch.no_grad(), captured():
            outputs = model(**feeds, **kwargs)
    except Exception as err:
        raise TxError(f"{source}: forward fails on example inputs: {one_line(err)}") from None
    keys = list(outputs.keys()) if hasattr(outputs, "keys") else []
    tensors = [k for k in keys if isinstance(outputs[k], torch.Tensor)]
    if not tensors:
        raise TxError(f"{source}: {type(model).__name__} returns no named tensor output")
    return tensors
