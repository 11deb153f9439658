"""The transformers + peft baseline: the same workload, batches and step as `train.py`, done the usual HF way.

`transformers.LlamaForCausalLM` with SDPA attention, built with random weights from the same `LlamaConfig`,
LoRA from `peft.get_peft_model` on the same targets (rank, alpha, dropout), base weights in bf16 with bf16
autocast on CUDA (peft keeps the adapter weights in fp32, as this project does), fp32 on CPU, fused AdamW on
CUDA, gradient clipping at 1.0, the same learning-rate schedule. The loss is HF's own (`labels=`: full logits,
mean over labelled tokens; with one micro-batch per step that is the same objective as this project's). The
batches come from `data.BatchStream`, so both systems see the same examples; the timed region is the same as
`train.py`'s (host-to-device copy, forward, backward, clip, optimizer step), timed the same way (`training.step.Timer`).
`use_cache=False`: a training forward has no use for a KV cache.

Padded batches go in as transformers takes them (input_ids, attention_mask, labels). Packed batches (this
project's `data.BatchStream(packing=True)` rows) go in padding-free: input_ids, labels and position_ids that
restart at every document, and no attention mask; transformers (`masking_utils.find_packed_sequence_indices`)
then finds the documents from the position_ids and gives SDPA a block-diagonal causal mask, so no token attends
across documents (tests/test_bench_baselines.py checks the loss equals the documents' losses alone). Labels
need nothing more: every document's first token is labelled -100, so no label is predicted across a boundary.

`compile=True` wraps the peft model in `torch.compile` (default mode, automatic dynamic shapes), as one would.
`liger=True` builds the model under Liger-Kernel's Llama patch (`apply_liger_kernel_to_llama`: Triton RoPE,
RMSNorm and SwiGLU kernels, and the fused linear cross-entropy that never materialises the logits), as its
documentation shows; it needs the `liger_kernel` package and Triton, so CUDA.

transformers, peft and Liger-Kernel are imported here only, lazily: they are optional benchmark dependencies.
Left out: `attn_implementation="flash_attention_2"` (transformers' other padding-free path, flash-attn's varlen
kernel): it needs the flash-attn package, which is not a dependency here (gpu_check.sh's env stage says whether
the GPU machine has it).
"""

from __future__ import annotations

import contextlib
import gc
import math
import time

import torch

import train
from bench.workloads import labelled_count
from training.step import Timer, real_token_count

LIGER_NOTE = "Liger-Kernel's kernels are Triton kernels, which run on CUDA only"


@contextlib.contextmanager
def liger_kernels():
    """transformers' Llama with Liger-Kernel's kernels while the block runs.

    `apply_liger_kernel_to_llama` replaces names in transformers' `modeling_llama` module (the norm and MLP
    classes, the RoPE function, `LlamaForCausalLM.forward`), so it changes every Llama built in the process
    afterwards. They are put back when the block ends, so a transformers model built later (the decode
    benchmark's `generate`) is transformers' own.
    """
    from liger_kernel.transformers import apply_liger_kernel_to_llama
    from transformers.models.llama import modeling_llama

    module = dict(vars(modeling_llama))
    classes = {c: dict(vars(c)) for c in module.values()
               if isinstance(c, type) and c.__module__ == modeling_llama.__name__}
    apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, fused_linear_cross_entropy=True)
    try:
        yield
    finally:
        for name in set(vars(modeling_llama)) - set(module):
            delattr(modeling_llama, name)
        for name, value in module.items():
            setattr(modeling_llama, name, value)
        for c, attrs in classes.items():
            for name in set(vars(c)) - set(attrs):
                delattr(c, name)
            for name, value in attrs.items():
                if vars(c).get(name) is not value:
                    setattr(c, name, value)


def check_liger(model) -> None:
    """Raise unless the model runs Liger's modules and loss (a patch that did not take would time plain HF)."""
    from transformers.models.llama import modeling_llama

    base = model.get_base_model()
    found = {"MLP": type(base.model.layers[0].mlp).__name__, "norm": type(base.model.norm).__name__,
             "forward": modeling_llama.LlamaForCausalLM.forward.__module__}
    if not (found["MLP"].startswith("Liger") and found["norm"].startswith("Liger")
            and found["forward"].startswith("liger_kernel")):
        raise RuntimeError(f"apply_liger_kernel_to_llama did not patch this transformers' Llama: {found}")


def model_inputs(batch: dict) -> dict:
    """The keyword arguments of a transformers forward for one of `data.BatchStream`'s batches: padded ones with
    their attention mask; packed ones padding-free (position_ids, no mask: transformers finds the documents)."""
    if "attention_mask" in batch:
        return {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
    if "position_ids" in batch:
        return {k: batch[k] for k in ("input_ids", "position_ids", "labels")}
    return {k: batch[k] for k in ("input_ids", "labels")}


def check_packed_support() -> None:
    """Padding-free packed rows need transformers' packed-sequence detection (4.54 and later)."""
    import transformers.masking_utils as masking

    if not hasattr(masking, "find_packed_sequence_indices"):
        raise RuntimeError(f"transformers {transformers_version()} cannot detect packed sequences from "
                           "position_ids: packed rows would attend across documents")


def transformers_version() -> str:
    import transformers
    return transformers.__version__


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


def run(config, lora_config, stream, steps: int, device, dtype, *, compile: bool = False, liger: bool = False,
        lr: float = 2e-4, warmup: int = 20, grad_clip: float = 1.0, seed: int = 0, log=print) -> dict:
    """Train `steps` optimizer steps of one micro-batch each from `stream`; per-step seconds and token counts.

    Returns {"step_s", "tokens", "labelled", "positions", "losses", "trainable_params", "total_params",
    "peak_gib", "first_step_s"}: lists per step, counts, peak memory since the loop started (None on CPU), and
    the seconds from this call to the end of the first step (building the model, compiling, the first step).
    """
    with liger_kernels() if liger else contextlib.nullcontext():
        return _run(config, lora_config, stream, steps, torch.device(device), dtype, compile=compile, liger=liger,
                    lr=lr, warmup=warmup, grad_clip=grad_clip, seed=seed)


def _run(config, lora_config, stream, steps, device, dtype, *, compile, liger, lr, warmup, grad_clip, seed) -> dict:
    t0 = time.perf_counter()
    if stream.packing:
        check_packed_support()
    model = build_model(config, lora_config, device, dtype, seed)
    if liger:
        check_liger(model)
    params = [p for p in model.parameters() if p.requires_grad]
    trainable, total = sum(p.numel() for p in params), sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, fused=device.type == "cuda")
    forward = torch.compile(model) if compile else model
    schedule = train.TrainConfig(lr=lr, warmup=warmup, schedule="cosine")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)
    timer = Timer(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    out = {"step_s": [], "tokens": [], "labelled": [], "positions": [], "losses": [], "first_step_s": None}
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = train.lr_at(step, schedule, steps)
        batch = next(stream)
        out["tokens"].append(real_token_count(batch))
        out["labelled"].append(labelled_count(batch))
        out["positions"].append(batch["input_ids"].numel())
        timer.start()
        b = {k: v.to(device, non_blocking=True) for k, v in model_inputs(batch).items()}
        with autocast:
            loss = forward(**b).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        timer.stop()
        out["losses"].append(loss.item())  # a host sync per step, as transformers' Trainer has (its NaN filter)
        out["step_s"].append(timer.elapsed())
        if step == 0:
            out["first_step_s"] = time.perf_counter() - t0
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
    import importlib.metadata

    import peft
    import transformers

    try:
        liger = importlib.metadata.version("liger-kernel")
    except importlib.metadata.PackageNotFoundError:
        liger = "not installed"
    return {"transformers": transformers.__version__, "peft": peft.__version__, "liger_kernel": liger}
