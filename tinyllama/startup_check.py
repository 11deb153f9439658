"""The plan proves itself at start-up: each fast path a `RuntimePlan` picked runs once beside its plain path.

    plan = plan_runtime(model.config, device, dtype, lora_config=model.lora_config)
    plan = check_fast_paths(model, plan, log)  # a fast path that raises or disagrees is turned off
    apply_plan(model, plan)

A module of its own, above both `runtime` (the plan) and `model` (the layer it runs), because the model reads
the plan: in either of them the check would make the two import each other.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from .config import SLIDING
from .model import rope_cos_sin
from .runtime import FAST_PATHS, RuntimePlan, apply_plan


class FastPathError(RuntimeError):
    """A fast path failed its start-up check and `strict` asked for an error instead of the plain path."""


SEGMENT_LENGTHS = (9, 8, 7)  # the packed row the check runs: three short segments
# The window a sliding layer is probed with: shorter than every segment, so the kernel's window (flash/varlen
# `window_size`, the masked path's band) really cuts keys off; a real window (4096) would change nothing on a
# probe this short, and the kernels take any window as an argument.
PROBE_WINDOW = 5
# The paths probed on the packed row: the ones that read its segments (varlen's cu_seqlens, FlexAttention's
# mask_mod reading the document mask); the others on one sequence.
PACKED_PROBES = ("varlen", "flex_softcap")


def check_fast_paths(model, plan: RuntimePlan, log, strict: bool = False) -> RuntimePlan:
    """Run each fast path `plan` picked once beside its plain path, on the model's first layer and its first
    sliding-window layer (with `PROBE_WINDOW`) where it has one, a packed row of a few short segments, in the
    plan's dtype: forward output and the gradients of the input and of the layer's trainable weights. A path that
    raises or disagrees beyond the dtype's tolerance is turned off (one line to `log`; FastPathError with
    `strict`). Returns the plan to run, to give to `apply_plan`. Milliseconds: one or two layers, run eagerly
    (the plan's compile is applied afterwards)."""
    apply_plan(model, dataclasses.replace(plan, compile_scope=None))
    failed = {}
    for name in FAST_PATHS:
        if getattr(plan, name) and (name != "gqa_in_place" or _grouped(model.config)):
            error, problem = _fast_path_error(model, plan, name)
            if problem is None:
                log(f"fast path {name}: checked against its plain path on one layer (largest difference "
                    f"{error:.2g} of the values' scale)")
                continue
            message = f"the fast path {name} failed its start-up check ({problem})"
            if strict:
                raise FastPathError(f"{message}; --strict-fast-paths makes this an error: leave it out to run "
                                    "the plain path instead")
            log(f"warning: {message}: turned off, running its plain path")
            failed[name] = False
    return dataclasses.replace(plan, **failed)


def _grouped(config) -> bool:
    return config.num_key_value_heads != config.num_attention_heads


def _fast_path_error(model, plan: RuntimePlan, name: str) -> tuple[float, str | None]:
    """(largest relative difference, why the fast path `name` of `plan` fails, or None) against its plain path
    on each of `probe_layers`."""
    plain = dataclasses.replace(plan, **dict.fromkeys(FAST_PATHS, False))  # each path checked on its own
    fast = dataclasses.replace(plain, **{name: True})
    tolerance = 2e-2 if plan.dtype == torch.bfloat16 else 1e-4  # what the tests allow the fast paths
    largest = 0.0
    for index in probe_layers(model.config):
        where = "" if index == 0 else f" on sliding layer {index}"
        try:
            fast_out = _layer_outputs(model, fast, index, packed=name in PACKED_PROBES)
        except Exception as e:  # a kernel that does not run here, whatever it raises
            return math.inf, f"{type(e).__name__}: {e}{where}"
        plain_out = _layer_outputs(model, plain, index, packed=name in PACKED_PROBES)
        for what, got, ref in zip(("output", "input gradient", "weight gradients"), fast_out, plain_out,
                                  strict=True):
            error = ((got - ref).abs().max() / ref.abs().max().clamp(min=1.0)).item()
            if not error <= tolerance:  # NaN too
                return error, (f"its {what}{where} differs from the plain path's by {error:.3g} of their scale, "
                               f"past {tolerance:g}")
            largest = max(largest, error)
    return largest, None


def probe_layers(config) -> list[int]:
    """The layers the check runs: the first, and the first sliding-window layer where there is one (probed with
    `PROBE_WINDOW`, so a kernel that ignores or misreads its window disagrees)."""
    sliding = [i for i, kind in enumerate(config.layer_types) if kind == SLIDING and config.sliding_window]
    return [0] if not sliding else sorted({0, sliding[0]})


def _layer_outputs(model, plan: RuntimePlan, index: int, packed: bool) -> tuple[torch.Tensor, ...]:
    """(output, input gradient, flat trainable-weight gradients) of decoder layer `index` under `plan`, in eval
    mode (no dropout), on one row of `SEGMENT_LENGTHS` (packed) or one sequence of the same length; a sliding
    layer attends through a window of `PROBE_WINDOW`."""
    layer, config = model.model.layers[index], model.config
    kind = config.layer_types[index]
    window = min(config.sliding_window, PROBE_WINDOW) if kind == SLIDING and config.sliding_window else None
    T = sum(SEGMENT_LENGTHS)
    starts = torch.tensor([0, *SEGMENT_LENGTHS], device=plan.device).cumsum(0).to(torch.int32)
    position_ids = (torch.cat([torch.arange(n) for n in SEGMENT_LENGTHS]) if packed else torch.arange(T))[None]
    position_ids = position_ids.to(plan.device)
    generator = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(1, T, config.hidden_size, generator=generator).to(plan.device, plan.dtype).requires_grad_()
    weights = [p for p in layer.parameters() if p.requires_grad]
    saved = [p.grad for p in weights]
    was_training = layer.training
    layer.eval()
    try:
        with plan.forward():
            cos, sin = rope_cos_sin(config, position_ids, plan.dtype, kind)
            attn = model.attention_inputs(1, T, 0, None, starts if packed else None, None, plan, plan.device,
                                          window=window)
            y = layer(x, cos, sin, attn, None, plan.fused_mlp)
        for p in weights:
            p.grad = None
        (y.float() * torch.linspace(-1, 1, y.shape[-1], device=y.device)).sum().backward()
        grads = torch.cat([p.grad.float().flatten() for p in weights if p.grad is not None] or
                          [torch.zeros(1, device=plan.device)])
        return y.detach().float(), x.grad.float(), grads
    finally:
        layer.train(was_training)
        for p, g in zip(weights, saved, strict=True):
            p.grad = g
