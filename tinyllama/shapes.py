"""Named model shapes: the configs of the checkpoints people fine-tune, for sizing and benchmarking without weights.

    python train.py --dry-run --model llama-2-7b                    # the parameter table of a 7B model
    python train.py --model llama-3.2-1b --random-init --data random  # time a step of that shape, nothing loaded

Each entry holds the fields of the published `config.json` that decide the computation and the parameter count
(read as config.json is, with each family's defaults for the rest);
`tests/test_shapes.py` checks every count against the published checkpoint's total. A name is only a shape: to
train the real model, pass its Hub id or folder to `--model`.
"""

from __future__ import annotations

import copy

from .config import LlamaConfig

_LLAMA3_ROPE = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}
_LLAMA2 = dict(vocab_size=32000, rms_norm_eps=1e-5, max_position_embeddings=4096)
_LLAMA3 = dict(vocab_size=128256, num_key_value_heads=8, rms_norm_eps=1e-5, rope_theta=500000.0,
               max_position_embeddings=131072, bos_token_id=128000, eos_token_id=128001)

_QWEN25 = dict(model_type="qwen2", vocab_size=151936, rms_norm_eps=1e-6, rope_theta=1e6,
               max_position_embeddings=32768, bos_token_id=151643, eos_token_id=151643)
_QWEN3 = dict(model_type="qwen3", vocab_size=151936, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-6,
              rope_theta=1e6, max_position_embeddings=40960, bos_token_id=151643, eos_token_id=151645)

SHAPES: dict[str, dict] = {
    "tinyllama-1.1b": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                           num_attention_heads=32, num_key_value_heads=4, rms_norm_eps=1e-5,
                           max_position_embeddings=2048),  # LlamaConfig's defaults
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
    "qwen2.5-0.5b": dict(_QWEN25, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(_QWEN25, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True),
    "qwen2.5-3b": dict(_QWEN25, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                       num_attention_heads=16, num_key_value_heads=2, tie_word_embeddings=True),
    "qwen2.5-7b": dict(_QWEN25, vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False),
    "qwen3-0.6b": dict(_QWEN3, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                       num_attention_heads=16, tie_word_embeddings=True),
    "qwen3-1.7b": dict(_QWEN3, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                       num_attention_heads=16, tie_word_embeddings=True),
    "qwen3-4b": dict(_QWEN3, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                     num_attention_heads=32, tie_word_embeddings=True),
    "qwen3-8b": dict(_QWEN3, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                     num_attention_heads=32, tie_word_embeddings=False),
    "gemma-2-2b": dict(model_type="gemma2", vocab_size=256000, hidden_size=2304, intermediate_size=9216,
                       num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4, head_dim=256,
                       max_position_embeddings=8192, sliding_window=4096, query_pre_attn_scalar=256,
                       attn_logit_softcapping=50.0, final_logit_softcapping=30.0, bos_token_id=2, eos_token_id=1),
    "gemma-3-1b": dict(model_type="gemma3_text", vocab_size=262144, hidden_size=1152, intermediate_size=6912,
                       num_hidden_layers=26, num_attention_heads=4, num_key_value_heads=1, head_dim=256,
                       max_position_embeddings=32768, sliding_window=512, sliding_window_pattern=6,
                       rope_theta=1e6, rope_local_base_freq=10000.0, query_pre_attn_scalar=256,
                       bos_token_id=2, eos_token_id=[1, 106]),
    "phi-3-mini": dict(model_type="phi3", vocab_size=32064, hidden_size=3072, intermediate_size=8192,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, rms_norm_eps=1e-5,
                       max_position_embeddings=4096, sliding_window=2047, bos_token_id=1, eos_token_id=32000),
    # The published Phi-4-mini scales RoPE with longrope (computed here) by 48 factors each way, which the shape
    # leaves out: they change neither the parameter count nor the cost of a step.
    "phi-4-mini": dict(model_type="phi3", vocab_size=200064, hidden_size=3072, intermediate_size=8192,
                       num_hidden_layers=32, num_attention_heads=24, num_key_value_heads=8, rms_norm_eps=1e-5,
                       partial_rotary_factor=0.75, rope_theta=10000.0, max_position_embeddings=131072,
                       tie_word_embeddings=True, bos_token_id=199999, eos_token_id=199999),
}


def named_shape(name: str) -> LlamaConfig:
    """The config of shape `name`, read as its config.json would be (each family's own defaults and options)."""
    if name not in SHAPES:
        raise KeyError(f"no model shape named {name!r}; known: {', '.join(SHAPES)}")
    return LlamaConfig.from_dict(copy.deepcopy(SHAPES[name]))
