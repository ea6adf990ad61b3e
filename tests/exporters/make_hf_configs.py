"""Write the tiny Hugging Face configs under tests/data/hf/ (run once; the JSON is committed).

Every model is 64 wide, 2 layers, 4 heads, vocabulary 1000 where it has one, so exports take
seconds. No weights are written: loading them exercises the random-init path and its warning.

    python tests/exporters/make_hf_configs.py [name ...]
"""

from __future__ import annotations

import sys
from pathlib import Path

import transformers as tf

ROOT = Path(__file__).resolve().parents[1] / "data" / "hf"
TEXT = {"vocab_size": 1000, "max_position_embeddings": 128}
BERT_LIKE = {
    **TEXT,
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 128,
}
SEQ2SEQ = {
    "vocab_size": 1000,
    "d_model": 64,
    "encoder_layers": 2,
    "decoder_layers": 2,
    "encoder_attention_heads": 4,
    "decoder_attention_heads": 4,
    "encoder_ffn_dim": 128,
    "decoder_ffn_dim": 128,
}
T5 = {"vocab_size": 1000, "d_model": 64, "d_kv": 16, "d_ff": 128, "num_layers": 2, "num_heads": 4}
WHISPER = {
    **SEQ2SEQ,
    "num_mel_bins": 16,
    "max_source_positions": 32,
    "max_target_positions": 64,
    # Whisper's defaults point at its 51865-token vocabulary
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
    "decoder_start_token_id": 1,
    "begin_suppress_tokens": None,
}

CONFIGS = {
    "bert": (tf.BertConfig, BERT_LIKE, "BertModel"),
    "roberta": (tf.RobertaConfig, {**BERT_LIKE, "max_position_embeddings": 130}, "RobertaModel"),
    "distilbert": (
        tf.DistilBertConfig,
        {**TEXT, "dim": 64, "hidden_dim": 128, "n_layers": 2, "n_heads": 4},
        "DistilBertModel",
    ),
    "gpt2": (
        tf.GPT2Config,
        {
            "vocab_size": 1000,
            "n_positions": 128,
            "n_embd": 64,
            "n_layer": 2,
            "n_head": 4,
            "bos_token_id": 999,
            "eos_token_id": 999,
        },
        "GPT2LMHeadModel",
    ),
    "llama": (
        tf.LlamaConfig,
        {**BERT_LIKE, "num_key_value_heads": 2},
        "LlamaForCausalLM",
    ),
    # ALiBi over [B·N]-folded heads (baddbmm) and the tanh GELU in BLOOM's own arrangement
    "bloom": (
        tf.BloomConfig,
        {
            "vocab_size": 1000,
            "hidden_size": 64,
            "n_layer": 2,
            "n_head": 4,
            "bos_token_id": 1,
            "eos_token_id": 2,
        },
        "BloomForCausalLM",
    ),
    # gelu_pytorch_tanh, which TorchScript writes as a formula below opset 20
    "gemma": (
        tf.GemmaConfig,
        {
            **BERT_LIKE,
            "num_key_value_heads": 1,
            "head_dim": 16,
            "hidden_activation": "gelu_pytorch_tanh",
            "pad_token_id": 0,
        },
        "GemmaForCausalLM",
    ),
    # disentangled attention: content→position and position→content terms over folded heads
    "deberta": (
        tf.DebertaV2Config,
        {
            **BERT_LIKE,
            "relative_attention": True,
            "position_buckets": 32,
            "pos_att_type": ["p2c", "c2p"],
        },
        "DebertaV2Model",
    ),
    # attention soft-capping, sliding-window layers (the window shorter than the verification's
    # 16 tokens); weights large enough that the cap of 1 saturates, so dropping it would show
    "gemma2": (
        tf.Gemma2Config,
        {
            **BERT_LIKE,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "sliding_window": 8,
            "attn_logit_softcapping": 1.0,
            "initializer_range": 0.5,
            "pad_token_id": 0,
        },
        "Gemma2ForCausalLM",
    ),
    # interleaved (rotate_every_two) partial rotary, applied before the heads move
    "gptj": (
        tf.GPTJConfig,
        {
            "vocab_size": 1000,
            "n_positions": 128,
            "n_embd": 64,
            "n_layer": 2,
            "n_head": 4,
            "rotary_dim": 8,
            "bos_token_id": 1,
            "eos_token_id": 2,
        },
        "GPTJForCausalLM",
    ),
    "vit": (
        tf.ViTConfig,
        {**BERT_LIKE, "image_size": 32, "patch_size": 8, "num_channels": 3},
        "ViTModel",
    ),
    "swin": (
        tf.SwinConfig,
        {
            "image_size": 32,
            "patch_size": 4,
            "embed_dim": 32,
            "depths": [2, 2],
            "num_heads": [2, 4],
            "window_size": 4,
        },
        "SwinModel",
    ),
    "t5": (tf.T5Config, T5, "T5ForConditionalGeneration"),
    "t5-encoder": (tf.T5Config, T5, "T5EncoderModel"),
    "bart": (tf.BartConfig, SEQ2SEQ, "BartModel"),
    "whisper": (tf.WhisperConfig, WHISPER, "WhisperModel"),
    "whisper-encoder": (tf.WhisperConfig, WHISPER, "WhisperEncoder"),
}


def main(names: list[str]) -> None:
    for name in names or CONFIGS:
        config_class, values, architecture = CONFIGS[name]
        config = config_class(**values, architectures=[architecture])
        folder = ROOT / name
        folder.mkdir(parents=True, exist_ok=True)
        config.to_json_file(folder / "config.json", use_diff=True)
        print(folder / "config.json")


if __name__ == "__main__":
    main(sys.argv[1:])
