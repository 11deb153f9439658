"""Named model shapes: the configs of the checkpoints people fine-tune, for sizing and benchmarking without weights.

    python train.py --dry-run --model llama-2-7b                    # the parameter table of a 7B model
    python train.py --model llama-3.2-1b --random-init --data random  # time a step of that shape, nothing loaded

Each entry holds the fields of the published `config.json` that decide the computation and the parameter count;
`tests/test_shapes.py` checks every count against the published checkpoint's total. A name is only a shape: to
train the real model, pass its Hub id or folder to `--model`.
"""

from __future__ import annotations

from .config import LlamaConfig

_LLAMA3_ROPE = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}
_LLAMA2 = dict(vocab_size=32000, rms_norm_eps=1e-5, max_position_embeddings=4096)
_LLAMA3 = dict(vocab_size=128256, num_key_value_heads=8, rms_norm_eps=1e-5, rope_theta=500000.0,
               max_position_embeddings=131072, bos_token_id=128000, eos_token_id=128001)

SHAPES: dict[str, dict] = {
    "tinyllama-1.1b": {},  # LlamaConfig's defaults
    "llama-2-7b": dict(_LLAMA2, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32),
    "llama-2-13b": dict(_LLAMA2, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                        num_attention_heads=40, num_key_value_heads=40),
    "llama-2-70b": dict(_LLAMA2, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                        num_attention_heads=64, num_key_value_heads=8),
    "llama-3.2-1b": dict(_LLAMA3, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, head_dim=64, tie_word_embeddings=True,
                         rope_scaling=dict(_LLAMA3_ROPE, factor=32.0)),
    "llama-3.2-3b": dict(_LLAMA3, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                         num_attention_heads=24, head_dim=128, tie_word_embeddings=True,
                         rope_scaling=dict(_LLAMA3_ROPE, factor=32.0)),
    "llama-3.1-8b": dict(_LLAMA3, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, rope_scaling=dict(_LLAMA3_ROPE, factor=8.0)),
    "mistral-7b-v0.3": dict(model_type="mistral", sliding_window=None, vocab_size=32768, hidden_size=4096,
                            intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                            num_key_value_heads=8, rms_norm_eps=1e-5, rope_theta=1e6, max_position_embeddings=32768),
    "smollm2-1.7b": dict(vocab_size=49152, hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
                         num_attention_heads=32, num_key_value_heads=32, rms_norm_eps=1e-5, rope_theta=130000.0,
                         max_position_embeddings=8192, tie_word_embeddings=True, bos_token_id=0, eos_token_id=0),
}


def named_shape(name: str) -> LlamaConfig:
    if name not in SHAPES:
        raise KeyError(f"no model shape named {name!r}; known: {', '.join(SHAPES)}")
    return LlamaConfig(**SHAPES[name])
