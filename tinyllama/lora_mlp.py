"""The SwiGLU MLP with LoRA on gate, up and down as one autograd function: the fast path of `MLP.forward`.

    y = down(silu(gate(x)) * up(x)),   each projection  W x + s * B(A(dropout(x)))

What the plain autograd graph keeps for backward, per layer: x twice (each dropout output), both x·A products,
the gate and up outputs, silu(gate), the product h, h again after down's dropout, and h·A. `FusedLoRAMLP` keeps x,
the gate and up pre-activations and the dropout masks (a byte a value, none without dropout), and recomputes
the rest in backward, in the manner of unsloth's `LoRA_MLP`. Gate and up read the same x: with the two base
weights stored as one [2 * intermediate, hidden] tensor (`fuse_gate_up`; the modules' `weight`s become views of
it, so checkpoints and adapters keep Hugging Face's and PEFT's names) their base products are one matmul in the
forward pass and one in the backward pass, and without dropout so are their A products.

Dropout keeps PEFT's semantics: each of the three modules draws its own mask over its own input (x for gate
and up, h for down), scaled by 1 / (1 - p), on the LoRA branch only. The masks are drawn with `torch.bernoulli`
(gate, up, down, in that order) rather than by `nn.Dropout`, so the same seed gives other masks than the plain
path; tests/test_lora_mlp.py checks both paths against a hand-written reference with the same masks. DoRA and NF4
bases (`tinyllama.quant`) are left out: their MLP runs on the plain path (`runtime.plan_runtime` does not plan
it), where each NF4 projection dequantises its own weight in forward and backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lora.layer import LoRALinear

from .quant import NF4Storage


def fuse_gate_up(mlp) -> bool:
    """Store gate and up's frozen weights as one tensor (`mlp.gate_up_weight`, a non-persistent buffer), the
    modules' weights views of it; True if done (or done before). `runtime.apply_plan` calls it for a plan with
    `fused_mlp`, which `runtime.plan_runtime` refuses for DoRA and NF4 bases; an MLP without plain LoRA on all
    three dense projections is left alone (False) and runs on the plain path.
    """
    gate, up, down = mlp.gate_proj, mlp.up_proj, mlp.down_proj
    if mlp.gate_up_weight is not None:
        return True
    if not all(isinstance(m, LoRALinear) and not isinstance(m, NF4Storage) and not m.use_dora
               for m in (gate, up, down)):
        return False
    fused = torch.cat([gate.weight.detach(), up.weight.detach()])
    n = gate.weight.shape[0]
    mlp.gate_up_weight = fused  # a registered, non-persistent buffer: not in checkpoints
    gate.weight = torch.nn.Parameter(fused[:n], requires_grad=False)
    up.weight = torch.nn.Parameter(fused[n:], requires_grad=False)
    return True


def dropout_masks(x: torch.Tensor, intermediate: int, p: float):
    """The three modules' keep-masks (bool): gate's and up's over x, down's over h; None without dropout."""
    if p == 0:
        return None, None, None
    keep = 1 - p
    full = torch.full((), keep, device=x.device)
    gate = torch.bernoulli(full.expand(x.shape)).bool()
    up = torch.bernoulli(full.expand(x.shape)).bool()
    down = torch.bernoulli(full.expand(*x.shape[:-1], intermediate)).bool()
    return gate, up, down


def _drop(t: torch.Tensor, mask, p: float) -> torch.Tensor:
    return t if mask is None else t * mask / (1 - p)


class FusedLoRAMLP(torch.autograd.Function):
    """x [N, hidden] (all tensors in the compute dtype) -> y [N, hidden]; gradients for x and the six LoRA
    matrices only (the base weights are frozen)."""

    @staticmethod
    def forward(ctx, x, w_gate_up, w_down, a_gate, b_gate, a_up, b_up, a_down, b_down, scales, p, masks):
        n_int = w_down.shape[1]
        m_gate, m_up, m_down = masks
        # Base products of gate and up in one matmul; their LoRA products accumulate into it.
        gu = x @ w_gate_up.t()
        if m_gate is None:  # no dropout: one A matmul for both
            xa = x @ torch.cat([a_gate, a_up]).t()
            xa_gate, xa_up = xa[:, :a_gate.shape[0]], xa[:, a_gate.shape[0]:]
        else:
            xa_gate = _drop(x, m_gate, p) @ a_gate.t()
            xa_up = _drop(x, m_up, p) @ a_up.t()
        gate, up = gu[:, :n_int], gu[:, n_int:]
        s_gate, s_up, s_down = scales
        gate.addmm_(xa_gate, b_gate.t(), alpha=s_gate)
        up.addmm_(xa_up, b_up.t(), alpha=s_up)
        h = F.silu(gate) * up
        y = h @ w_down.t()
        y.addmm_(_drop(h, m_down, p) @ a_down.t(), b_down.t(), alpha=s_down)
        ctx.save_for_backward(x, gu, w_gate_up, w_down, a_gate, b_gate, a_up, b_up, a_down, b_down,
                              *(m for m in masks if m is not None))
        ctx.scales, ctx.p, ctx.dropout = scales, p, m_gate is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        x, gu, w_gate_up, w_down, a_gate, b_gate, a_up, b_up, a_down, b_down, *masks = ctx.saved_tensors
        m_gate, m_up, m_down = masks if ctx.dropout else (None, None, None)
        (s_gate, s_up, s_down), p, n_int, r = ctx.scales, ctx.p, w_down.shape[1], a_gate.shape[0]
        gate, up = gu[:, :n_int], gu[:, n_int:]
        # Recompute what the forward pass did not keep.
        sig = torch.sigmoid(gate)
        act = gate * sig  # silu(gate)
        h = act * up
        h_drop = _drop(h, m_down, p)
        # down: y = h Wd^T + s (h_drop Ad^T) Bd^T
        xa_down = h_drop @ a_down.t()
        d_b_down = (dy.t() @ xa_down).mul_(s_down)
        d_xa_down = (dy @ b_down).mul_(s_down)
        d_a_down = d_xa_down.t() @ h_drop
        dh = dy @ w_down
        dh_lora = d_xa_down @ a_down
        dh.add_(_drop(dh_lora, m_down, p))
        # SwiGLU: h = silu(gate) * up
        d_gu = torch.empty_like(gu)
        d_gate, d_up = d_gu[:, :n_int], d_gu[:, n_int:]
        torch.mul(dh, act, out=d_up)
        torch.mul(dh * up, sig * (1 + gate * (1 - sig)), out=d_gate)
        # gate and up: g = x Wg^T + s (x_g Ag^T) Bg^T, likewise up
        x_gate, x_up = _drop(x, m_gate, p), _drop(x, m_up, p)
        xa_gate, xa_up = x_gate @ a_gate.t(), x_up @ a_up.t()
        d_b_gate = (d_gate.t() @ xa_gate).mul_(s_gate)
        d_b_up = (d_up.t() @ xa_up).mul_(s_up)
        d_xa_gate = (d_gate @ b_gate).mul_(s_gate)
        d_xa_up = (d_up @ b_up).mul_(s_up)
        if m_gate is None:  # both A products came from x: one matmul for both A gradients, one for their dx
            d_xa = torch.cat([d_xa_gate, d_xa_up], dim=1)
            d_a = d_xa.t() @ x
            d_a_gate, d_a_up = d_a[:r], d_a[r:]
        else:
            d_a_gate, d_a_up = d_xa_gate.t() @ x_gate, d_xa_up.t() @ x_up
        dx = None
        if ctx.needs_input_grad[0]:
            dx = d_gu @ w_gate_up
            if m_gate is None:
                dx.addmm_(d_xa, torch.cat([a_gate, a_up]))
            else:
                dx.add_(_drop(d_xa_gate @ a_gate, m_gate, p)).add_(_drop(d_xa_up @ a_up, m_up, p))
        return dx, None, None, d_a_gate, d_b_gate, d_a_up, d_b_up, d_a_down, d_b_down, None, None, None


def fused_lora_mlp(mlp, x: torch.Tensor) -> torch.Tensor:
    """`mlp(x)` through `FusedLoRAMLP` (`mlp`: a `tinyllama.model.MLP` with LoRA on all three projections and gate/up
    fused). Under autocast the computation runs in the autocast dtype, as the plain path's matmuls do."""
    gate, up, down = mlp.gate_proj, mlp.up_proj, mlp.down_proj
    dtype = (torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type)
             else mlp.gate_up_weight.dtype)
    p = gate.lora_dropout.p if hasattr(gate.lora_dropout, "p") else 0.0
    p = p if mlp.training else 0.0
    x2 = x.reshape(-1, x.shape[-1]).to(dtype)
    masks = dropout_masks(x2, down.in_features, p)
    adapters = [t.weight.to(dtype) for m in (gate, up, down) for t in (m.lora_A, m.lora_B)]
    with torch.autocast(x.device.type, enabled=False):
        y = FusedLoRAMLP.apply(x2, mlp.gate_up_weight.to(dtype), down.weight.to(dtype), *adapters,
                          (gate.scaling, up.scaling, down.scaling), p, masks)
    return y.view(*x.shape[:-1], y.shape[-1])
