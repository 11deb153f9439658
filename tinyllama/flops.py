"""FLOP counts for model-FLOPs utilisation (MFU), and a measured matmul peak to divide them by.

The count is for LoRA training with a frozen base, per token of a sequence of length `seq_len`:
- base linear layers (incl. the LM head): forward 2N, backward 2N for the input gradient only (frozen
  weights get no weight gradient), so 4N for N matmul weights;
- attention scores and values: forward 2 * 2 * q_dim * seq_len/2 per layer (causal: half the keys on
  average), backward twice the forward;
- LoRA: forward 2 r (in + out) per adapted projection, backward twice that (input and weight gradients).
Recomputation (gradient checkpointing) is not counted: MFU counts the model's FLOPs, not the hardware's.
"""

from __future__ import annotations

import time

import torch


def matmul_params_per_token(config) -> int:
    h, i, d = config.hidden_size, config.intermediate_size, config.head_dim
    q, kv = config.num_attention_heads * d, config.num_key_value_heads * d
    per_layer = h * q + 2 * h * kv + q * h + 3 * h * i
    return config.num_hidden_layers * per_layer + h * config.vocab_size


def lora_shapes(config) -> dict[str, tuple[int, int]]:
    """(in, out) of every projection name a LoRA target may have."""
    h, i, d = config.hidden_size, config.intermediate_size, config.head_dim
    q, kv = config.num_attention_heads * d, config.num_key_value_heads * d
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h),
            "qkv_proj": (h, q + 2 * kv), "gate_up_proj": (h, 2 * i)}  # Phi-3's fused projections


def training_flops_per_token(config, lora_config, seq_len: int) -> float:
    base = 4 * matmul_params_per_token(config)
    q_dim = config.num_attention_heads * config.head_dim
    attention = 3 * 2 * q_dim * seq_len * config.num_hidden_layers
    adapters = 0
    if lora_config is not None:
        shapes = lora_shapes(config)
        adapters = 6 * lora_config.rank * sum(sum(shapes[t]) for t in lora_config.targets) * config.num_hidden_layers
    return float(base + attention + adapters)


def measure_matmul_peak(device: torch.device, dtype: torch.dtype, n: int | None = None, iters: int = 10) -> float:
    """Achieved FLOP/s of a large square matmul on `device` in `dtype` (the practical peak)."""
    n = n or (8192 if device.type == "cuda" else 1024)
    # Constant inputs: matmul speed does not depend on the values, and the global RNG is left untouched.
    a = torch.full((n, n), 0.5, device=device, dtype=dtype)
    b = torch.full((n, n), 0.25, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        for _ in range(iters):
            a @ b
        end.record()
        end.synchronize()
        seconds = start.elapsed_time(end) / 1000
    else:
        t0 = time.perf_counter()
        for _ in range(iters):
            a @ b
        seconds = time.perf_counter() - t0
    return 2 * n ** 3 * iters / seconds
