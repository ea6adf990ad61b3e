"""Small random causal LMs of every decoder family generate is tested on, saved with weights so
that transformers' reference model is the very same one."""

from __future__ import annotations

from pathlib import Path

import torch

SIZES = {"vocab_size": 300, "num_hidden_layers": 2}
GQA = {"hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 4, "num_key_value_heads": 2}

# architecture → config class and its fields (Mistral's window is shorter than the sequences)
DECODERS = {
    "GPT2LMHeadModel": (
        "GPT2Config",
        {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 128, "vocab_size": 300},
    ),
    "LlamaForCausalLM": ("LlamaConfig", {**SIZES, **GQA}),
    "MistralForCausalLM": ("MistralConfig", {**SIZES, **GQA, "sliding_window": 8}),
    "Qwen2ForCausalLM": ("Qwen2Config", {**SIZES, **GQA}),
    "Phi3ForCausalLM": ("Phi3Config", {**SIZES, **GQA, "pad_token_id": 0}),
    "GemmaForCausalLM": ("GemmaConfig", {**SIZES, **GQA, "num_key_value_heads": 1, "head_dim": 16}),
    "GPTNeoXForCausalLM": (
        "GPTNeoXConfig",
        {**SIZES, "hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 4},
    ),
    "OPTForCausalLM": (
        "OPTConfig",
        {**SIZES, "hidden_size": 64, "ffn_dim": 96, "num_attention_heads": 4, "word_embed_proj_dim": 64},
    ),
    "FalconForCausalLM": ("FalconConfig", {**SIZES, "hidden_size": 64, "num_attention_heads": 4}),
}


def decoder_folder(root: Path, architecture: str) -> Path:
    import transformers

    config_class, fields = DECODERS[architecture]
    config = getattr(transformers, config_class)(**fields)
    config.architectures = [architecture]
    config.bos_token_id = config.eos_token_id = 1  # in the small vocabulary
    torch.manual_seed(0)
    model = getattr(transformers, architecture)(config)
    folder = root / architecture
    model.save_pretrained(folder)
    return folder


def reference(folder: Path):
    import transformers

    config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    model_class = getattr(transformers, config.architectures[0])
    return model_class.from_pretrained(folder, local_files_only=True, dtype=torch.float32).eval()


def transformers_greedy(folder: Path, prompts: list[list[int]], new_tokens: int, pad: int) -> list[list[int]]:
    """transformers' generate(do_sample=False) on left-padded prompts, never stopping early."""
    model = reference(folder)
    longest = max(map(len, prompts))
    ids = torch.tensor([[pad] * (longest - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts])
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = pad
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
        )
    return out[:, longest:].tolist()


def torch_greedy(torch_model, prompts: list[list[int]], new_tokens: int, pad: int = 0) -> list[list[int]]:
    """A with-past TorchModel's own greedy loop in PyTorch: left-padded prompts, presents fed
    back as the past (the reference for built-ins, which transformers cannot run)."""
    layers = sum(spec.name.startswith("past_key_values.") for spec in torch_model.inputs) // 2
    heads, head_dim = torch_model.inputs[3].shape[1], torch_model.inputs[3].shape[3]
    longest = max(map(len, prompts))
    ids = torch.tensor([[pad] * (longest - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts])
    past = [torch.zeros(len(prompts), heads, 0, head_dim) for _ in range(2 * layers)]
    new = []
    with torch.no_grad():
        for _ in range(new_tokens):
            positions = torch.where(mask == 0, 1, mask.cumsum(1) - 1)[:, -ids.shape[1] :]
            logits, *past = torch_model.module(ids, mask, positions, *past)
            ids = logits[:, -1].argmax(-1, keepdim=True)
            new.append(ids)
            mask = torch.cat([mask, torch.ones_like(ids)], dim=1)
    return torch.cat(new, dim=1).tolist()
