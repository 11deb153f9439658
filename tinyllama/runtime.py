"""How a model runs on this machine: every machine-dependent decision, made once, in one `RuntimePlan`.

    device, dtype = resolve_device("auto"), resolve_dtype("auto", device)
    plan = plan_runtime(model.config, device, dtype, lora_config=model.lora_config)  # decided and checked once
    plan = check_fast_paths(model, plan, log)  # tinyllama.startup_check: each fast path beside its plain path
    apply_plan(model, plan)        # the model's plan; the fused gate/up weight and torch.compile, if planned
    with plan.forward():           # bf16 autocast on a bf16 model, and the attention kernels in order of preference
        logits = model(ids)

What runs where (`plan_runtime`'s defaults; each fast path is tested against its plain path, and the plain path
is what a CPU runs and what `RuntimePlan()` is):

| decision | CUDA | CPU | plain path |
|---|---|---|---|
| dtype | bfloat16 | float32 | float32 |
| packing (`packing`) | on | off (padding) | padding |
| attention kernel order (`sdpa_backends`) | flash, cuDNN, efficient, math | PyTorch's own | PyTorch's own |
| grouped k/v heads read in place (`gqa_in_place`) | where the preferred kernel takes them | yes | repeated |
| packed rows (`varlen`) | varlen flash attention, where torch has it | a dense block mask | a dense block mask |
| softcapped attention (`flex_softcap`) | FlexAttention, where torch has it | scores materialised | the same |
| LoRA MLP (`fused_mlp`) | one function, gate/up one weight (SwiGLU; not DoRA, NF4, FSDP) | the modules | the modules |
| torch.compile (`compile_scope`) | off unless asked | off unless asked | eager |

The forward pass reads only its arguments and the plan (`Llama.plan`, or a `plan=` argument). The one change
`apply_plan` makes to the model's tensors is the fused MLP's: gate's and up's frozen weights become views of one
`[2 * intermediate, hidden]` tensor (`MLP.gate_up_weight`, a non-persistent buffer), so their base products are
one matmul; checkpoints and adapters keep Hugging Face's names and `save_model` writes each view as its own
tensor. Moving or casting the model afterwards gives the views storage of their own again (still correct).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import inspect
import os
from dataclasses import dataclass

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from .lora_mlp import fuse_gate_up

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
COMPILE_SCOPES = ("layers", "model")
SDPA_BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                 "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}
DEFAULT_SDPA_BACKENDS = "flash,cudnn,efficient,math"
FAST_PATHS = ("varlen", "fused_mlp", "gqa_in_place", "flex_softcap")


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


@functools.cache
def varlen_kernel():
    """torch's varlen flash attention, called as the installed version spells it (its signature has changed
    between releases); None where there is none. Looked up on first use: importing it imports torch._dynamo
    (about 2 s), which a CPU run never needs."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    windowed = "window_size" in params
    gqa = "enable_gqa" in params

    def kernel(q, k, v, segments, scale=None):
        if not gqa and k.shape[1] != q.shape[1]:
            k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
        cu = segments.cu_seqlens
        # window_size (left, right): a query sees the `left` keys before it and itself; -1 is unbounded.
        causal = ({"window_size": (-1 if segments.window is None else segments.window - 1, 0)} if windowed
                  else {"is_causal": True})
        return varlen_attn(q, k, v, cu, cu, segments.row_len, segments.row_len, **causal,
                           **({"scale": scale} if scale is not None else {}),
                           **({"enable_gqa": True} if gqa and k.shape[1] != q.shape[1] else {}))

    # What the model asks before sending it a sliding window or a scale of its own (Gemma's): else a dense mask.
    kernel.takes_window = windowed and "scale" in params
    return kernel


def has_flex_attention() -> bool:
    """Whether this torch has FlexAttention, asked without compiling it (which imports torch._dynamo, seconds)."""
    return importlib.util.find_spec("torch.nn.attention.flex_attention") is not None


# How many shapes FlexAttention is compiled for before torch stops compiling it (torch's own limit is 8 per
# function). Past the limit torch runs it uncompiled: its reference path, which keeps every score. A run meets
# a shape per padded length (`model.flex_length`: a power of two from 128), batch size and grad mode (training,
# held-out eval): padded batches of up to 2048 tokens in both modes already make 10; 64 covers up to 8192 tokens
# (7 lengths) with 4 batch sizes in both modes.
FLEX_RECOMPILE_LIMIT = 64


@functools.cache
def flex_kernel():
    """(flex_attention compiled, create_block_mask), or None where torch has no FlexAttention. Compiled because
    eager FlexAttention is torch's slow debugging path (seconds for a tiny layer on a CPU), once per shape
    (`dynamic=False`), up to `FLEX_RECOMPILE_LIMIT` shapes. CUDA only (`plan_runtime`): torch 2.13 has no
    FlexAttention backward on a CPU."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return None
    return with_recompile_limit(torch.compile(flex_attention, dynamic=False), FLEX_RECOMPILE_LIMIT), create_block_mask


def with_recompile_limit(compiled, limit: int):
    """`compiled` (a torch.compile'd function) allowed `limit` compiled shapes instead of torch's global limit.
    torch reads the limit when a call meets a new shape, so it is set around each call. Inside a region that is
    itself being compiled (`--compile`), the call is traced into that region's graph, whose own limit applies."""
    import torch._dynamo

    def call(*args, **kwargs):
        if torch.compiler.is_compiling():
            return compiled(*args, **kwargs)
        with torch._dynamo.config.patch(recompile_limit=limit):
            return compiled(*args, **kwargs)

    return call


@dataclass(frozen=True)
class RuntimePlan:
    """How the model runs: decided once by `plan_runtime`, given to the model by `apply_plan`. The defaults are
    the plain path everywhere."""
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32
    packing: bool = False  # packed rows (data.batching) instead of length-grouped padded batches
    sdpa_backends: str = "default"  # SDPA's kernels in order of preference (`sdpa_context`)
    gqa_in_place: bool = True  # unmasked attention reads grouped k/v heads in place (SDPA enable_gqa)
    varlen: bool = False  # packed rows as segments through `varlen_kernel()` instead of a dense block mask
    fused_mlp: bool = False  # the LoRA MLP as one autograd function (`tinyllama.lora_mlp`)
    # Gemma 2's softcapped attention through FlexAttention (`model.flex_softcapped_attention`, CUDA) instead of
    # `model.softcapped_attention`, which materialises the [B, H, T, S] scores and their float32 softmax.
    flex_softcap: bool = False
    compile_scope: str | None = None  # torch.compile: "layers" (each decoder layer), "model", or None (eager)
    compile_mode: str = "default"
    attention: str = "cpu"  # the kernel unmasked causal attention gets, for the log

    @contextlib.contextmanager
    def forward(self):
        """The context every forward pass runs in: bf16 autocast on a bf16 model, the attention kernel order."""
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.dtype == torch.bfloat16), \
                sdpa_context(self.sdpa_backends):
            yield

    def describe(self) -> str:
        """One line for the log: what this run uses."""
        fast = [name for name in FAST_PATHS if getattr(self, name)]
        compiled = f", compiled ({self.compile_scope}, {self.compile_mode})" if self.compile_scope else ""
        return (f"{self.device.type} {str(self.dtype).removeprefix('torch.')}, "
                f"{'packed' if self.packing else 'padded'} rows, attention: {self.attention}; fast paths: "
                f"{', '.join(fast) or 'none'}{compiled}")


def default_packing(device: torch.device) -> bool:
    """Packed rows on CUDA, where they are the fastest (a step then holds more conversations); padding on a CPU."""
    return device.type == "cuda"


def plan_problems(device: torch.device, *, dora: bool = False, quantized: bool = False,
                  fused_mlp: bool | None = None, varlen: bool | None = None, sharded: bool = False) -> list[str]:
    """Why the asked-for paths cannot run, one line each (train.py's flags named); [] when they can."""
    problems = []
    unfusable = "--dora" if dora else "--quantize nf4" if quantized else "--fsdp" if sharded else None
    if fused_mlp and unfusable:
        problems.append(f"--fused-mlp with {unfusable} is not supported (the fused LoRA MLP computes plain LoRA on "
                        "dense, whole weights); leave --fused-mlp out and the MLP runs on the plain path")
    if varlen and device.type == "cuda" and varlen_kernel() is None:
        problems.append(f"--varlen: torch {torch.__version__} has no varlen flash attention "
                        "(torch.nn.attention.varlen); leave --varlen out and packed rows use a dense mask")
    return problems


def plan_runtime(config, device: torch.device, dtype: torch.dtype, *, lora_config=None, quantized: bool = False,
                 packing: bool | None = None, fused_mlp: bool | None = None, varlen: bool | None = None,
                 sdpa_backends: str = DEFAULT_SDPA_BACKENDS, compile_scope: str | None = None,
                 compile_mode: str = "default", sharded: bool = False,
                 flex_softcap: bool | None = None) -> RuntimePlan:
    """Decide how a model of `config` runs on `device` (the table in the module docstring); None: the default
    there. `sharded`: the model is sharded with FSDP (`training.fsdp`), so no fused MLP (its fused gate/up
    weight is built from whole weights). Raises ValueError, a line per problem (`plan_problems`), for paths
    that cannot run."""
    dora = lora_config is not None and lora_config.use_dora
    problems = plan_problems(device, dora=dora, quantized=quantized, fused_mlp=fused_mlp, varlen=varlen,
                             sharded=sharded)
    swiglu = config.hidden_act == "silu" and not config.fused_projections
    if fused_mlp and not swiglu:
        problems.append(f"--fused-mlp is not supported for {config.model_type} (the fused LoRA MLP computes SwiGLU "
                        "with separate gate_proj and up_proj; this model has "
                        + ("a fused gate_up_proj" if config.fused_projections else f"a {config.hidden_act} gate")
                        + "); leave --fused-mlp out and the MLP runs on the plain path")
    if problems:
        raise ValueError("; ".join(problems))
    cuda = device.type == "cuda"
    mlp_lora = lora_config is not None and {"gate_proj", "up_proj", "down_proj"} <= set(lora_config.targets)
    repeated, in_place = attention_kernels(device, dtype, sdpa_backends, config)
    attention = ("cpu" if not cuda else f"{repeated} kernel"
                 + (", grouped k/v heads read in place" if in_place == repeated
                    else f" (k/v heads repeated: in place would take {in_place})"))
    # A CPU keeps the plain path even when asked: FlexAttention has no backward pass there (torch 2.13 raises).
    softcap = config.attn_logit_softcapping is not None
    flex = flex_softcap is not False and cuda and softcap and has_flex_attention()
    if softcap:
        attention += ("; softcapped attention: FlexAttention" if flex else
                      "; softcapped attention: the plain path (" + (
                          "FlexAttention turned off)" if flex_softcap is False
                          else "FlexAttention has no backward pass on a CPU)" if not cuda
                          else f"torch {torch.__version__} has no FlexAttention)"))
    return RuntimePlan(
        device=device, dtype=dtype, packing=default_packing(device) if packing is None else packing,
        sdpa_backends=sdpa_backends,
        gqa_in_place=in_place == repeated,
        varlen=cuda and varlen_kernel() is not None if varlen is None else varlen,
        fused_mlp=cuda and mlp_lora and swiglu and not (dora or quantized or sharded) if fused_mlp is None
        else fused_mlp,
        flex_softcap=flex, compile_scope=compile_scope, compile_mode=compile_mode, attention=attention)


def apply_plan(model, plan: RuntimePlan):
    """Make `model` run as `plan` says: the plan the forward pass reads, the fused gate/up weight (see the module
    docstring) and torch.compile, or no compile when the plan has none. Call it once the model is on its device.
    Returns the model."""
    model.plan = plan
    if plan.fused_mlp:
        for layer in model.model.layers:
            fuse_gate_up(layer.mlp)
    _compile(model, plan.compile_scope, plan.compile_mode)
    return model


def _compile(model, scope: str | None, mode: str) -> None:
    """torch.compile in place. `layers`: each decoder layer (all share one graph, so it compiles in seconds);
    `model`: embeddings to final norm as one graph (`hidden_states`), no Python between layers. Either way the
    loss's per-chunk cross-entropy is compiled too (`tinyllama.loss`, reading `plan.compile_scope`). None
    undoes both, as generation wants (its growing shapes would recompile a whole-model graph)."""
    for layer in model.model.layers:
        if scope == "layers":
            layer.compile(mode=mode)
        else:
            layer._compiled_call_impl = None  # what nn.Module.compile sets
    if getattr(model, "_compiled_hidden_states", False):
        del model.hidden_states, model._compiled_hidden_states  # the method again (FSDP's wrapper is left alone)
    if scope == "model":
        model.hidden_states = torch.compile(model.hidden_states, mode=mode)
        model._compiled_hidden_states = True


def sdpa_context(spec: str):
    """The attention kernels SDPA may pick, in order of preference ("flash,cudnn,efficient,math").

    The default prefers flash attention: PyTorch's own choice on Hopper is cuDNN's, which builds a new kernel
    plan for every new sequence length, and length-grouped padded batches bring a new length almost every step
    (bench/results/nvidia-h200-*.md measure both). Flash takes no mask, so packed rows on the dense-mask path go
    to cuDNN, the next in the list. "default" leaves PyTorch's order alone.
    """
    if spec == "default":
        return contextlib.nullcontext()
    return sdpa_kernel([SDPA_BACKENDS[name] for name in spec.split(",")], set_priority=True)


def attention_kernels(device, dtype, spec: str, config) -> tuple[str, str]:
    """(kernel for unmasked causal attention with k/v repeated, the same with grouped k/v read in place).

    Asked of SDPA's own checks (`torch.backends.cuda.can_use_*`) for this model's head shapes, under the
    preference `spec`. When they differ, reading the grouped heads in place would cost a slower kernel, so
    the plan repeats them instead (`gqa_in_place` False). On a CPU both are ("cpu", "cpu").
    """
    if device.type != "cuda":
        return "cpu", "cpu"
    if not torch.cuda.is_available():  # a plan for CUDA made without one (training.plan): do not guess
        return "unknown", "unchecked"
    try:
        from torch.backends.cuda import (
            SDPAParams,
            can_use_cudnn_attention,
            can_use_efficient_attention,
            can_use_flash_attention,
        )
    except ImportError:  # an older torch: do not guess, repeat k/v (the plain path)
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
