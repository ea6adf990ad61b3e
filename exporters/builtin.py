"""Three tiny transformers in plain torch, so demos and tests need neither transformers nor a hub.

Each covers one family the passes must handle: a post-LN BERT encoder (LayerNorm, exact GELU,
2-D padding mask), a LLaMA decoder (RMSNorm, RoPE, grouped-query attention, causal + padding
mask, SiLU-gated MLP) and a pre-LN ViT (Conv2d patches, cls token). Attention is written out
(MatMul, Softmax, MatMul) the way Hugging Face's eager attention is, so the graphs look like
real exports. Weights are deterministic (seed 0); norm weights and biases are perturbed away
from 1 and 0 so that folding and rewriting passes are actually exercised.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from txcompile.graph import task_metadata
from txcompile.graph.inputs import PAST_DIM, TOTAL_DIM, InputSpec

from . import decoder
from .model import TorchModel

VOCAB = 1000
HIDDEN = 64
LAYERS = 2
HEADS = 4
MAX_POSITIONS = 512


def _masked_bias(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """0 where attention is allowed, the most negative finite value elsewhere (as HF does)."""
    zero = torch.zeros((), dtype=dtype)
    return torch.where(allowed, zero, torch.finfo(dtype).min)


def _attention(q, k, v, bias):
    """Eager scaled dot-product attention on [batch, heads, seq, head_dim] tensors."""
    scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    probs = torch.softmax(scores + bias, dim=-1)
    return torch.matmul(probs, v)


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    batch, seq, _ = x.shape
    return x.view(batch, seq, heads, -1).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    batch, _, seq, _ = x.shape
    return x.transpose(1, 2).reshape(batch, seq, -1)


class RMSNorm(nn.Module):
    """LLaMA's RMSNorm: weight * x / sqrt(mean(x^2) + eps)."""

    def __init__(self, size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(variance + self.eps))


def _perturb_norms(module: nn.Module) -> None:
    """Norm weights near 1 and biases near 0 but not equal, so affine folds are tested."""
    with torch.no_grad():
        for sub in module.modules():
            if isinstance(sub, nn.LayerNorm | RMSNorm):
                sub.weight.add_(0.1 * torch.randn_like(sub.weight))
                if getattr(sub, "bias", None) is not None:
                    sub.bias.add_(0.1 * torch.randn_like(sub.bias))


# ---------------------------------------------------------------------------------------------
# tiny-bert


class BertLayer(nn.Module):
    """Post-LN: LN(x + attn(x)), then LN(h + mlp(h)) with exact GELU."""

    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)
        self.attn_out = nn.Linear(hidden, hidden)
        self.attn_norm = nn.LayerNorm(hidden, eps=1e-12)
        self.up = nn.Linear(hidden, 4 * hidden)
        self.down = nn.Linear(4 * hidden, hidden)
        self.mlp_norm = nn.LayerNorm(hidden, eps=1e-12)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        q = _split_heads(self.query(x), self.heads)
        k = _split_heads(self.key(x), self.heads)
        v = _split_heads(self.value(x), self.heads)
        context = _merge_heads(_attention(q, k, v, bias))
        x = self.attn_norm(x + self.attn_out(context))
        return self.mlp_norm(x + self.down(F.gelu(self.up(x))))


class TinyBert(nn.Module):
    def __init__(self, vocab=VOCAB, hidden=HIDDEN, layers=LAYERS, heads=HEADS):
        super().__init__()
        self.word = nn.Embedding(vocab, hidden)
        self.position = nn.Embedding(MAX_POSITIONS, hidden)
        self.token_type = nn.Embedding(2, hidden)
        self.norm = nn.LayerNorm(hidden, eps=1e-12)
        self.layers = nn.ModuleList(BertLayer(hidden, heads) for _ in range(layers))

    def forward(self, input_ids, attention_mask, token_type_ids):
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.word(input_ids) + self.position(positions)[None] + self.token_type(token_type_ids)
        x = self.norm(x)
        # [batch, seq] -> [batch, 1, 1, seq] additive bias: (1 - mask) * finfo.min
        mask = attention_mask[:, None, None, :].to(x.dtype)
        bias = (1.0 - mask) * torch.finfo(x.dtype).min
        for layer in self.layers:
            x = layer(x, bias)
        return x


def tiny_bert() -> TorchModel:
    torch.manual_seed(0)
    module = TinyBert()
    _perturb_norms(module)
    inputs = [
        InputSpec("input_ids", "int64", ("batch", "seq"), "ids", 0, VOCAB),
        InputSpec("attention_mask", "int64", ("batch", "seq"), "mask"),
        InputSpec("token_type_ids", "int64", ("batch", "seq"), "ids", 0, 2),
    ]
    return TorchModel(module.eval(), inputs, ["last_hidden_state"], "tiny-bert")


# ---------------------------------------------------------------------------------------------
# tiny-llama


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def repeat_kv(x: torch.Tensor, repeats: int) -> torch.Tensor:
    """[batch, kv_heads, seq, d] -> [batch, kv_heads * repeats, seq, d], as LLaMA does."""
    batch, kv_heads, seq, dim = x.shape
    if repeats == 1:
        return x
    x = x[:, :, None, :, :].expand(batch, kv_heads, repeats, seq, dim)
    return x.reshape(batch, kv_heads * repeats, seq, dim)


class LlamaLayer(nn.Module):
    def __init__(self, hidden: int, heads: int, kv_heads: int, intermediate: int):
        super().__init__()
        self.heads, self.kv_heads = heads, kv_heads
        head_dim = hidden // heads
        self.input_norm = RMSNorm(hidden)
        self.q_proj = nn.Linear(hidden, heads * head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(heads * head_dim, hidden, bias=False)
        self.post_norm = RMSNorm(hidden)
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x, cos, sin, bias, past: tuple | None = None):
        """The layer's output; with ``past`` (keys, values) also the present keys and values."""
        h = self.input_norm(x)
        q = _split_heads(self.q_proj(h), self.heads)
        k = _split_heads(self.k_proj(h), self.kv_heads)
        v = _split_heads(self.v_proj(h), self.kv_heads)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if past is not None:
            k, v = torch.cat((past[0], k), dim=2), torch.cat((past[1], v), dim=2)
        repeats = self.heads // self.kv_heads
        context = _attention(q, repeat_kv(k, repeats), repeat_kv(v, repeats), bias)
        x = x + self.o_proj(_merge_heads(context))
        h = self.post_norm(x)
        x = x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))
        return x if past is None else (x, k, v)


class TinyLlama(nn.Module):
    def __init__(self, vocab=VOCAB, hidden=HIDDEN, layers=LAYERS, heads=HEADS, kv_heads=2):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.layers = nn.ModuleList(
            LlamaLayer(hidden, heads, kv_heads, intermediate=2 * hidden) for _ in range(layers)
        )
        self.norm = RMSNorm(hidden)
        self.lm_head = nn.Linear(hidden, vocab, bias=False)
        head_dim = hidden // heads
        inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, input_ids, attention_mask):
        seq = input_ids.shape[1]
        x = self.embed(input_ids)
        positions = torch.arange(seq, device=input_ids.device, dtype=torch.float32)
        freqs = positions[:, None] * self.inv_freq[None, :]
        angles = torch.cat((freqs, freqs), dim=-1)
        cos, sin = angles.cos()[None, None], angles.sin()[None, None]
        # causal [seq, seq] and padding [batch, 1, 1, seq] masks combined before the bias
        causal = torch.ones(seq, seq, dtype=torch.bool, device=x.device).tril()
        allowed = causal[None, None] & attention_mask[:, None, None, :].bool()
        bias = _masked_bias(allowed, x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, bias)
        return self.lm_head(self.norm(x))


class TinyLlamaWithPast(nn.Module):
    """TinyLlama as one graph for prefill and decode (the layout exporters/decoder.py writes for
    Hugging Face models): position ids and the past keys/values in, the last position's logits
    and the present keys/values out."""

    def __init__(self, model: TinyLlama):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids, *past):
        model = self.model
        x = model.embed(input_ids)
        freqs = position_ids[..., None].to(torch.float32) * model.inv_freq
        angles = torch.cat((freqs, freqs), dim=-1)
        cos, sin = angles.cos()[:, None], angles.sin()[:, None]  # [batch, 1, seq, head_dim]
        seq, past_length = input_ids.shape[1], past[0].shape[2]
        causal = torch.ones(seq, past_length + seq, dtype=torch.bool, device=x.device).tril(past_length)
        allowed = causal[None, None] & attention_mask[:, None, None, :].bool()
        bias = _masked_bias(allowed, x.dtype)
        present = []
        for index, layer in enumerate(model.layers):
            x, k, v = layer(x, cos, sin, bias, (past[2 * index], past[2 * index + 1]))
            present += [k, v]
        return (model.lm_head(model.norm(x[:, -1:])), *present)


def tiny_llama() -> TorchModel:
    torch.manual_seed(0)
    module = TinyLlama()
    _perturb_norms(module)
    inputs = [
        InputSpec("input_ids", "int64", ("batch", "seq"), "ids", 0, VOCAB),
        InputSpec("attention_mask", "int64", ("batch", "seq"), "mask"),
    ]
    return TorchModel(module.eval(), inputs, ["logits"], "tiny-llama")


def tiny_llama_decoder() -> TorchModel:
    torch.manual_seed(0)
    module = TinyLlama()
    _perturb_norms(module)
    layers, kv_heads, head_dim = LAYERS, 2, HIDDEN // HEADS
    inputs = [
        InputSpec("input_ids", "int64", ("batch", "seq"), "ids", 0, VOCAB),
        InputSpec("attention_mask", "int64", ("batch", TOTAL_DIM), "mask"),
        InputSpec("position_ids", "int64", ("batch", "seq"), "positions"),
        *decoder.past_specs([(kv_heads, head_dim)] * layers),
    ]
    outputs = ["logits", *decoder.present_names(layers)]
    settings = task_metadata.Generation(eos_ids=(), pad_id=0, max_positions=MAX_POSITIONS, sliding_window=0)
    metadata = {task_metadata.TASK_KEY: "text-generation", task_metadata.GENERATION_KEY: settings.to_json()}
    dims = {"batch": 2, "seq": 16, PAST_DIM: 0}
    return TorchModel(
        TinyLlamaWithPast(module).eval(), inputs, outputs, "tiny-llama-decoder", dims, [], metadata
    )


# ---------------------------------------------------------------------------------------------
# tiny-vit


class VitBlock(nn.Module):
    """Pre-LN: x + attn(LN(x)), then x + mlp(LN(x)) with exact GELU."""

    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(hidden, eps=1e-6)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)
        self.norm2 = nn.LayerNorm(hidden, eps=1e-6)
        self.fc1 = nn.Linear(hidden, 4 * hidden)
        self.fc2 = nn.Linear(4 * hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)
        q, k, v = (_split_heads(t, self.heads) for t in (q, k, v))
        x = x + self.proj(_merge_heads(_attention(q, k, v, 0.0)))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class TinyVit(nn.Module):
    def __init__(self, image=32, patch=8, channels=3, hidden=HIDDEN, layers=LAYERS, heads=HEADS):
        super().__init__()
        self.patch_embed = nn.Conv2d(channels, hidden, kernel_size=patch, stride=patch)
        self.cls_token = nn.Parameter(0.02 * torch.randn(1, 1, hidden))
        self.position = nn.Parameter(0.02 * torch.randn(1, (image // patch) ** 2 + 1, hidden))
        self.blocks = nn.ModuleList(VitBlock(hidden, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(hidden, eps=1e-6)

    def forward(self, pixel_values):
        x = self.patch_embed(pixel_values).flatten(2).transpose(1, 2)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat((cls, x), dim=1) + self.position
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


def tiny_vit() -> TorchModel:
    torch.manual_seed(0)
    module = TinyVit()
    _perturb_norms(module)
    inputs = [InputSpec("pixel_values", "float32", ("batch", 3, 32, 32), "normal")]
    return TorchModel(module.eval(), inputs, ["last_hidden_state"], "tiny-vit", {"batch": 2})


BUILTINS: dict[str, tuple[Callable[[], TorchModel], str]] = {
    "tiny-bert": (tiny_bert, "BERT encoder: post-LN, exact GELU, 2-D padding mask (64 wide, 2 layers)"),
    "tiny-llama": (tiny_llama, "LLaMA decoder: RMSNorm, RoPE, GQA 4/2 heads, causal mask, SwiGLU"),
    "tiny-llama-decoder": (
        tiny_llama_decoder,
        "tiny-llama with a KV cache: one graph for prefill and decode, for txcompile generate",
    ),
    "tiny-vit": (tiny_vit, "ViT: 8x8 Conv2d patches of a 32x32 image, cls token, pre-LN blocks"),
}
DEFAULT_MODEL = "tiny-bert"
BUILTIN_TASKS = {("tiny-llama", "text-generation"): "tiny-llama-decoder"}  # --task on a built-in
