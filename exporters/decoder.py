"""Causal LMs as one graph for prefill and decode: flat past key/value tensors in, present out.

The graph takes ``input_ids``, ``attention_mask`` (over past and new tokens: ``total_seq``),
``position_ids`` where the model takes them, and ``past_key_values.{i}.key`` / ``.value``
shaped [batch, kv_heads, past_seq, head_dim] (past_seq may be 0); it returns ``logits`` of the
last position only (all a generate loop reads) and ``present.{i}.key`` / ``.value``, the past
with the new tokens appended. Transformers' cache object is built from the flat tensors inside
the wrapper, so either exporter sees tensors only. How many layers, KV heads and head sizes the
cache has is read from one forward with ``use_cache=True``, not guessed from the config.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from txcompile.graph import task_metadata
from txcompile.graph.errors import TxError
from txcompile.graph.inputs import PAST_DIM, TOTAL_DIM, InputSpec, make_feeds

from .quiet import captured, one_line

EXAMPLE_PAST = 4  # traced with this past, so no exporter treats its length as the constant 0 or 1
CACHE_ARGUMENTS = ("cache", "past_key_values")  # transformers' name for it, newest first


def past_names(layers: int) -> list[str]:
    return [f"past_key_values.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]


def present_names(layers: int) -> list[str]:
    return [f"present.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]


def cache_argument(model: nn.Module, source: str) -> str:
    params = inspect.signature(model.forward).parameters
    name = next((n for n in CACHE_ARGUMENTS if n in params), None)
    if name is None:
        raise TxError(f"{source}: {type(model).__name__}.forward takes no KV cache; it cannot generate")
    return name


def cache_shapes(model: nn.Module, feeds: dict[str, torch.Tensor], source: str) -> list[tuple[int, int]]:
    """(kv_heads, head_dim) of every layer's cache, from one forward with the cache on."""
    from transformers import DynamicCache

    cache = DynamicCache()
    try:
        with torch.no_grad(), captured():
            model(**feeds, **{cache_argument(model, source): cache}, use_cache=True, return_dict=True)
    except Exception as err:
        raise TxError(f"{source}: forward with a KV cache fails: {one_line(err)}") from None
    shapes = []
    for layer in cache.layers:
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        if not isinstance(keys, torch.Tensor) or keys.ndim != 4 or keys.shape != values.shape:
            raise TxError(f"{source}: its cache layers are not [batch, heads, seq, head_dim] key/value pairs")
        shapes.append((int(keys.shape[1]), int(keys.shape[3])))
    if not shapes:
        raise TxError(f"{source}: a forward with use_cache=True filled no cache")
    return shapes


def past_specs(shapes: list[tuple[int, int]], dtype: str = "float32") -> list[InputSpec]:
    names = past_names(len(shapes))
    return [
        InputSpec(name, dtype, ("batch", heads, PAST_DIM, head_dim), "normal")
        for name, (heads, head_dim) in zip(names, [s for s in shapes for _ in range(2)], strict=True)
    ]


def with_past(model: nn.Module, inputs: list[InputSpec], dims: dict[str, int], source: str):
    """(wrapper, input specs, output names, dims) of ``model``'s prefill-and-decode graph, from
    the specs of its single forward (input_ids and attention_mask)."""
    names = [spec.name for spec in inputs]
    if names[:2] != ["input_ids", "attention_mask"]:
        raise TxError(f"{source}: a text-generation graph needs input_ids and attention_mask inputs")
    probe = {name: torch.from_numpy(value) for name, value in make_feeds(inputs, dims).items()}
    shapes = cache_shapes(model, probe, source)
    specs = [inputs[0], InputSpec("attention_mask", "int64", ("batch", TOTAL_DIM), "mask")]
    if "position_ids" in inspect.signature(model.forward).parameters:
        specs.append(InputSpec("position_ids", "int64", ("batch", "seq"), "positions"))
    wrapper = CausalLMWithPast(model, [s.name for s in specs], len(shapes), cache_argument(model, source))
    outputs = ["logits", *present_names(len(shapes))]
    return wrapper.eval(), specs + past_specs(shapes), outputs, {**dims, PAST_DIM: 0}


def generation(model: nn.Module, max_positions: int | None, window: int) -> task_metadata.Generation:
    """The end-of-text and padding ids generate uses: the generation config's, else the model
    config's; the sliding window (0: none) rides along for the passes that rebuild the mask."""
    configs = [getattr(model, "generation_config", None), model.config]
    eos = next((c.eos_token_id for c in configs if getattr(c, "eos_token_id", None) is not None), None)
    eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
    pad = next((c.pad_token_id for c in configs if getattr(c, "pad_token_id", None) is not None), None)
    pad = pad if isinstance(pad, int) else (eos_ids[0] if eos_ids else 0)
    return task_metadata.Generation(tuple(int(i) for i in eos_ids), int(pad), max_positions, window)


class CausalLMWithPast(nn.Module):
    """A transformers causal LM taking (named inputs..., *flat past) and returning
    (logits of the last position, *flat present)."""

    def __init__(self, model: nn.Module, input_names: list[str], layers: int, cache_arg: str):
        super().__init__()
        self.model = model
        self.input_names = list(input_names)
        self.layers = layers
        self.cache_arg = cache_arg

    def forward(self, *args):
        from transformers import DynamicCache

        named = len(self.input_names)
        feeds = dict(zip(self.input_names, args[:named], strict=True))
        past = args[named:]
        cache = DynamicCache([(past[2 * i], past[2 * i + 1]) for i in range(self.layers)])
        out = self.model(
            **feeds, **{self.cache_arg: cache}, use_cache=True, return_dict=True, logits_to_keep=1
        )
        present = out[next(k for k in CACHE_ARGUMENTS if k in out)]
        flat = [t for layer in present.layers for t in (layer.keys, layer.values)]
        return (out["logits"], *flat)
