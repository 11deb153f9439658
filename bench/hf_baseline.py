"""The transformers + peft baseline: the same workload, batches and step as `train.py`, done the usual HF way.

`transformers.LlamaForCausalLM` with SDPA attention, built with random weights from the same `LlamaConfig`,
LoRA from `peft.get_peft_model` on the same targets (rank, alpha, dropout), base weights in bf16 with bf16
autocast on CUDA (peft keeps the adapter weights in fp32, as this project does), fp32 on CPU, fused AdamW on
CUDA, gradient clipping at 1.0, the same learning-rate schedule. The loss is HF's own (`labels=`: full logits,
mean over labelled tokens; with one micro-batch per step that is the same objective as this project's). The
batches come from `data.BatchStream`, so both systems see the same examples; the timed region is the same as
`train.py`'s (host-to-device copy, forward, backward, clip, optimizer step), timed the same way (`training.step.Timer`).
`use_cache=False`: a training forward has no use for a KV cache.

`compile=True` wraps the peft model in `torch.compile` (default mode, automatic dynamic shapes), as one would.

transformers and peft are imported here only, lazily: they are optional benchmark dependencies.
"""

from __future__ import annotations

import gc
import math

import torch

import train
from training.step import Timer, labelled_count, real_token_count


def build_model(config, lora_config, device: torch.device, dtype: torch.dtype, seed: int = 0):
    import peft
    import transformers

    torch.manual_seed(seed)
    hf_config = transformers.LlamaConfig(**config.to_hf_dict())
    hf_config.use_cache = False
    with torch.device(device):
        model = transformers.LlamaForCausalLM._from_config(hf_config, attn_implementation="sdpa")
    model.to(dtype)
    if model.config._attn_implementation != "sdpa":
        raise RuntimeError(f"transformers chose attention {model.config._attn_implementation!r}, expected 'sdpa'")
    peft_config = peft.LoraConfig(r=lora_config.rank, lora_alpha=lora_config.alpha,
                                  lora_dropout=lora_config.dropout, target_modules=list(lora_config.targets),
                                  bias="none", task_type="CAUSAL_LM", use_rslora=lora_config.use_rslora)
    model = peft.get_peft_model(model, peft_config)  # autocast_adapter_dtype=True: fp32 LoRA on a bf16 base
    model.train()
    return model


def run(config, lora_config, stream, steps: int, device, dtype, *, compile: bool = False, lr: float = 2e-4,
        warmup: int = 20, grad_clip: float = 1.0, seed: int = 0, log=print) -> dict:
    """Train `steps` optimizer steps of one micro-batch each from `stream`; per-step seconds and token counts.

    Returns {"step_s", "tokens", "labelled", "positions", "losses", "trainable_params", "total_params",
    "peak_gib"}: lists per step, counts, and peak memory since the loop started (None on CPU).
    """
    device = torch.device(device)
    model = build_model(config, lora_config, device, dtype, seed)
    params = [p for p in model.parameters() if p.requires_grad]
    trainable, total = sum(p.numel() for p in params), sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, fused=device.type == "cuda")
    forward = torch.compile(model) if compile else model
    schedule = train.TrainConfig(lr=lr, warmup=warmup, schedule="cosine")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)
    timer = Timer(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    out = {"step_s": [], "tokens": [], "labelled": [], "positions": [], "losses": []}
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = train.lr_at(step, schedule, steps)
        batch = next(stream)
        out["tokens"].append(real_token_count(batch))
        out["labelled"].append(labelled_count(batch))
        out["positions"].append(batch["input_ids"].numel())
        timer.start()
        b = {k: v.to(device, non_blocking=True) for k, v in batch.items()}  # the mask too: HF's usual input
        with autocast:
            loss = forward(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        timer.stop()
        out["losses"].append(loss.item())  # a host sync per step, as transformers' Trainer has (its NaN filter)
        out["step_s"].append(timer.elapsed())
        if not math.isfinite(out["losses"][-1]):
            raise RuntimeError(f"transformers baseline: loss is {out['losses'][-1]} at step {step + 1}")
    out.update(trainable_params=trainable, total_params=total,
               peak_gib=torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None)
    del forward, model, optimizer, params
    release(compile)
    return out


def release(compiled: bool) -> None:
    """Free what a run left behind, so the next run's peak memory is its own (compiled graphs hold weights)."""
    if compiled:
        torch._dynamo.reset()
    if compiled or torch.cuda.is_available():
        gc.collect()
        torch.cuda.empty_cache()


def versions() -> dict:
    import peft
    import transformers
    return {"transformers": transformers.__version__, "peft": peft.__version__}
