"""Shapes of known models for random-weight runs (`random:<preset>`), and the byte-level tokenizer they use.

Latency and tests need the layer count, widths and KV heads of a real model, not its weights: a preset is the shape
from the model's published config.json, built offline with a tokenizer of bytes (scores on it are meaningless).
"""

from __future__ import annotations

from typing import Any

# Shapes of real models (from their published config.json), for random-weight runs.
PRESETS: dict[str, dict[str, Any]] = {
    "llama3-8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
                      "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 8192, "rope_theta": 500000.0,
                      "rms_norm_eps": 1e-5, "tie_word_embeddings": False},
    "llama2-7b": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
                      "num_key_value_heads": 32, "vocab_size": 32000, "max_position_embeddings": 4096, "rope_theta": 10000.0,
                      "rms_norm_eps": 1e-5, "tie_word_embeddings": False},
    "smollm2-135m": {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
                         "num_key_value_heads": 3, "vocab_size": 49152, "max_position_embeddings": 8192, "rope_theta": 100000.0,
                         "rms_norm_eps": 1e-5, "tie_word_embeddings": True},
    # Qwen2 architecture (q/k/v projections with bias); sliding window off as in its config
    "qwen2.5-7b": {"model_type": "qwen2", "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                   "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064, "max_position_embeddings": 32768,
                   "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": False},
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
                 "num_key_value_heads": 2, "vocab_size": 320, "max_position_embeddings": 4096, "rope_theta": 10000.0,
                 "rms_norm_eps": 1e-5, "tie_word_embeddings": False},
}


# ChatML turns (as SmolLM2-Instruct's template), spelled out in bytes by the byte tokenizer
BYTE_CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                      "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def byte_tokenizer(vocab_size: int):
    """A byte-level tokenizer (ids 0-255 = bytes, 256 = <|endoftext|>), built offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 257:
        raise ValueError("a byte tokenizer needs vocab_size >= 257")
    vocab = {ch: b for ch, b in _gpt2_byte_table().items()}
    vocab["<|endoftext|>"] = 256
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.chat_template = BYTE_CHAT_TEMPLATE  # so --apply_chat_template runs on random:<preset> models (tests)
    return fast


def _gpt2_byte_table() -> dict[str, int]:
    """GPT-2's byte-to-unicode table, inverted: printable bytes map to themselves, others to 256+n."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def preset_config(preset: str):
    """The transformers config of a shape preset (no weights)."""
    from transformers import AutoConfig

    shape = dict(PRESETS[preset])
    model_type = shape.pop("model_type", "llama")
    rope_theta = shape.pop("rope_theta")
    extra = {"use_sliding_window": False} if model_type == "qwen2" else {}
    return AutoConfig.for_model(model_type, **shape, **extra, rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
                                bos_token_id=256, eos_token_id=256, pad_token_id=256)
