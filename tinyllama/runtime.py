"""How a model runs on a machine: device and dtype names, attention kernels, torch.compile.

    device, dtype = resolve_device("auto"), resolve_dtype("auto", device)
    runtime = configure_runtime(model, device, dtype, sdpa_backends=DEFAULT_SDPA_BACKENDS, compile_scope="layers")
    with runtime.forward():   # bf16 autocast on a bf16 model, and the attention kernels in order of preference
        logits = model(ids)

Used by `train.py` and `chat.py` alike. The model itself runs without any of this (CPU, float32, PyTorch's
own kernel choice); these are switches for speed, each tested to change no numbers.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
COMPILE_SCOPES = ("layers", "model")
SDPA_BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                 "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}
DEFAULT_SDPA_BACKENDS = "flash,cudnn,efficient,math"


def resolve_device(name: str) -> torch.device:
    """"auto" is the first GPU when there is one, else the CPU; anything else as torch.device reads it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """"auto" is bfloat16 on CUDA and float32 on a CPU (where bf16 matmuls are slow)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)"


def peak_memory_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


@dataclass
class Runtime:
    """What `configure_runtime` decided: `forward()` is the context every forward pass of the model runs in."""
    device: torch.device
    dtype: torch.dtype
    sdpa_backends: str
    attention: str  # the kernel unmasked causal attention gets, for the log

    @contextlib.contextmanager
    def forward(self):
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.dtype == torch.bfloat16), \
                sdpa_context(self.sdpa_backends):
            yield


def configure_runtime(model, device: torch.device, dtype: torch.dtype, *,
                      sdpa_backends: str = DEFAULT_SDPA_BACKENDS, fused_mlp: bool | None = None,
                      varlen: bool | None = None, compile_scope: str | None = None,
                      compile_mode: str = "default") -> Runtime:
    """Set the model's runtime switches for this machine: grouped k/v read in place where the preferred kernel
    takes them (`Attention.native_gqa`); the LoRA MLP as one autograd function (`tinyllama.lora_mlp`; None: on
    CUDA unless the adapter is DoRA or the base NF4, which it does not implement); packed rows as concatenated
    segments for varlen flash attention instead of a dense mask (`Llama.varlen_attention`; None: on CUDA where
    torch has the kernel); torch.compile (`compile_scope` "layers" or "model"; None: eager). Call it once the
    model is loaded on `device`."""
    from .lora_mlp import fuse_gate_up
    from .model import _VARLEN_KERNEL
    from .quant import is_quantized

    repeated, in_place = attention_kernels(device, dtype, sdpa_backends, model.config)
    dora = model.lora_config is not None and model.lora_config.use_dora
    unfusable = "DoRA" if dora else "an NF4-quantised base" if is_quantized(model) else None
    if fused_mlp and unfusable:
        raise ValueError(f"fused_mlp=True (train.py --fused-mlp) with {unfusable}: the fused LoRA MLP computes "
                         "plain LoRA on dense weights only; leave fused_mlp unset or pass --no-fused-mlp to run the "
                         "MLP on the plain path")
    fused_mlp = device.type == "cuda" and not unfusable if fused_mlp is None else fused_mlp
    model.varlen_attention = device.type == "cuda" and _VARLEN_KERNEL is not None if varlen is None else varlen
    for layer in model.model.layers:
        layer.self_attn.native_gqa = in_place == repeated
        if fused_mlp:
            fuse_gate_up(layer.mlp)
    if compile_scope is not None:
        compile_model(model, compile_scope, compile_mode)
    attention = ("cpu" if device.type != "cuda" else f"{repeated} kernel"
                 + (", grouped k/v heads read in place" if in_place == repeated
                    else f" (k/v heads repeated: in place would take {in_place})"))
    return Runtime(device, dtype, sdpa_backends, attention)


def sdpa_context(spec: str):
    """The attention kernels SDPA may pick, in order of preference ("flash,cudnn,efficient,math").

    The default prefers flash attention: PyTorch's own choice on Hopper is cuDNN's, which builds a new kernel
    plan for every new sequence length, and length-grouped padded batches bring a new length almost every step
    (bench/results/nvidia-h200-*.md measure both). Flash takes no mask, so packed rows (a block-diagonal mask,
    always max_len long) go to cuDNN, the next in the list. "default" leaves PyTorch's order alone.
    """
    if spec == "default":
        return contextlib.nullcontext()
    return sdpa_kernel([SDPA_BACKENDS[name] for name in spec.split(",")], set_priority=True)


def attention_kernels(device, dtype, spec: str, config) -> tuple[str, str]:
    """(kernel for unmasked causal attention with k/v repeated, the same with grouped k/v read in place).

    Asked of SDPA's own checks (`torch.backends.cuda.can_use_*`) for this model's head shapes, under the
    preference `spec`. When they differ, reading the grouped heads in place would cost a slower kernel, so
    the model repeats them instead (`Attention.native_gqa`). On a CPU both are ("cpu", "cpu").
    """
    if device.type != "cuda":
        return "cpu", "cpu"
    try:
        from torch.backends.cuda import (
            SDPAParams,
            can_use_cudnn_attention,
            can_use_efficient_attention,
            can_use_flash_attention,
        )
    except ImportError:  # an older torch: do not guess, repeat k/v (the reference path)
        return "unknown", "unchecked"
    checks = {"flash": can_use_flash_attention, "efficient": can_use_efficient_attention,
              "cudnn": can_use_cudnn_attention, "math": lambda params: True}
    order = spec.split(",") if spec != "default" else ["cudnn", "flash", "efficient", "math"]
    kind = dict(device=device, dtype=torch.bfloat16 if dtype == torch.bfloat16 else torch.float32)
    q = torch.zeros(1, config.num_attention_heads, 128, config.head_dim, **kind)

    def first(kv_heads: int, gqa: bool) -> str:
        kv = torch.zeros(1, kv_heads, 128, config.head_dim, **kind)
        params = SDPAParams(q, kv, kv, None, 0.0, True, gqa)
        with sdpa_context(spec):
            return next(name for name in order if checks[name](params))

    return first(config.num_attention_heads, False), first(config.num_key_value_heads, True)


def compile_model(model, scope: str, mode: str = "default") -> None:
    """torch.compile in place. `layers`: each decoder layer (all 22 share one graph, so it compiles in
    seconds); `model`: embeddings to final norm as one graph (`hidden_states`), no Python between layers.
    Either way the loss's per-chunk cross-entropy (`tinyllama.loss.cross_entropy_chunk`) is compiled too; its
    matmuls and the chunking stay eager (`FrozenHeadCrossEntropy`). `uncompile_model` undoes both."""
    from .loss import cross_entropy_chunk

    if scope == "layers":
        for layer in model.model.layers:
            layer.compile(mode=mode)
    else:
        model.hidden_states = torch.compile(model.hidden_states, mode=mode)
    # The loss's chunk: fused float32 passes; chunk lengths vary (labelled tokens per batch), hence dynamic.
    model.loss_chunk = torch.compile(cross_entropy_chunk, dynamic=True)


def uncompile_model(model) -> None:
    model.__dict__.pop("hidden_states", None)
    model.__dict__.pop("loss_chunk", None)
