"""`LoRALinear`: a frozen linear layer plus a trainable low-rank update, `W x + s * B(A(dropout(x)))`, and
DoRA (`LoRAConfig(use_dora=True)`), PEFT's weight-decomposed variant of it.

It *is* an `nn.Linear` (it owns `weight`), so a base checkpoint loads into a LoRA model unchanged and the
adapter's keys end in `.lora_A.weight` / `.lora_B.weight` (and DoRA's `.lora_magnitude_vector`), as PEFT writes
them. A bias, where the base projection has one (Qwen2's q/k/v), stays frozen and is added once, by the base
product (PEFT's `bias="none"`); DoRA's magnitude scales W x without it, as PEFT's does.

DoRA (https://arxiv.org/abs/2402.09353) gives every output row a trainable magnitude m, initialised to the
row norms of W + s B A, and uses the weight m / ||W + s B A|| * (W + s B A), the norm held constant for the
gradient (the paper's section 4.3). With dropout, PEFT puts it on the adapter's input alone, so the output is
`W x + (W' - W) dropout(x)`: the base product is computed again on the dropped-out input. `forward` follows
PEFT's `DoraLinearLayer` operation by operation; `reference` builds W' densely.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import LoRAConfig


class LoRALinear(nn.Linear):
    def __init__(self, in_features: int, out_features: int, config: LoRAConfig, bias: bool = False):
        super().__init__(in_features, out_features, bias=bias)
        self.rank = config.rank
        self.scaling = config.scaling
        self.lora_dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(in_features, config.rank, bias=False)
        self.lora_B = nn.Linear(config.rank, out_features, bias=False)
        self.use_dora = config.use_dora
        # PEFT's name, so the adapter key is `...lora_magnitude_vector` exactly as PEFT saves it.
        self.lora_magnitude_vector = nn.Parameter(torch.empty(out_features)) if self.use_dora else None
        self.merged = False
        self.active = True  # False: behave as the base layer (see lora.disabled)
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.reset_lora_parameters()

    def base_weight(self) -> torch.Tensor:
        """The frozen base weight, dense [out, in]: the one place DoRA's norms and merge read W from, so a
        quantised base (`tinyllama.quant.NF4LoRALinear`) changes this and `base_linear`."""
        return self.weight

    def base_linear(self, x: torch.Tensor) -> torch.Tensor:
        """W x + b with the frozen base weight and bias: the one place the forward pass multiplies by W, so a
        quantised base (`tinyllama.quant.NF4LoRALinear`) changes this and `base_weight`."""
        return F.linear(x, self.weight, self.bias)

    def reset_lora_parameters(self) -> None:
        """PEFT's default: A ~ Kaiming-uniform(a=sqrt(5)), B = 0, so a fresh adapter changes nothing; with DoRA,
        then m = ||W + s B A|| per row (PEFT's order: A and B first), which with B = 0 is the norms of W."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        if self.use_dora:
            with torch.no_grad():
                norm = self.weight_norm().to(self.lora_A.weight.dtype)
                if self.lora_magnitude_vector.is_meta and not norm.is_meta:
                    # Built on `meta` and now materialised (`load_model`): meta storage cannot be refilled.
                    self.lora_magnitude_vector = nn.Parameter(
                        norm, requires_grad=self.lora_magnitude_vector.requires_grad)
                else:
                    self.lora_magnitude_vector.copy_(norm)

    def weight_norm(self) -> torch.Tensor:
        """||W + s B A|| per output row [out], in float32 and detached: DoRA's normaliser, a constant for the
        gradient as in the paper and PEFT. Computed in full each call (PEFT caches nothing while training)."""
        device = self.lora_A.weight.device.type
        # Autocast would run B @ A in bfloat16; `meta` (a model being built) has no autocast to turn off.
        exact = contextlib.nullcontext() if device == "meta" else torch.autocast(device, enabled=False)
        with torch.no_grad(), exact:
            delta = self.lora_B.weight.float() @ self.lora_A.weight.float()
            return torch.linalg.norm(self.base_weight().float() + self.scaling * delta, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or not self.active:
            return self.base_linear(x)
        x2 = x.reshape(-1, x.shape[-1])
        y = self.base_linear(x2)
        if self.use_dora:
            return self._dora(x2, y).view(*x.shape[:-1], y.shape[-1])
        # Scale the rank-sized tensor, not the [tokens, out] one, and let the B matmul accumulate into y
        # (addmm_, beta=1) instead of writing its own [tokens, out] result and adding it: the same sum, one
        # kernel and two passes over the largest tensor fewer. y is 2-D from the start, so the in-place add is
        # on a tensor of its own, not a view (which would cost autograd a copy). `reference` is the plain sum.
        a = F.linear(self.lora_dropout(x2), self.lora_A.weight) * self.scaling
        b = self.lora_B.weight.to(a.dtype)  # what autocast would do; in-place ops are not autocast
        if torch.compiler.is_compiling():  # traced, the in-place add becomes a copy plus an add; inductor fuses this
            return (y + a @ b.t()).view(*x.shape[:-1], y.shape[-1])
        return y.addmm_(a, b.t()).view(*x.shape[:-1], y.shape[-1])

    def _dora(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """DoRA's output from x [N, in] and the base output y = W x, in PEFT's order of operations
        (`DoraLinearLayer.forward`): y + (m/n - 1) * W x_d + (m/n) * B A x_d * s, with n = ||W + s B A||.

        Adding (m/n - 1) * W x_d to y rather than multiplying y by m/n keeps a small change of m in float32
        until the one cast at the end: m/n itself would often round to exactly 1 in bfloat16.
        """
        dropping = self.training and getattr(self.lora_dropout, "p", 0.0) > 0
        x_d = self.lora_dropout(x) if dropping else x
        scale = (self.lora_magnitude_vector / self.weight_norm()).view(1, -1)
        base = self.base_linear(x_d) if dropping else y
        if self.bias is not None:
            base = base - self.bias
        lora = F.linear(F.linear(x_d, self.lora_A.weight), self.lora_B.weight)
        return (y + ((scale - 1) * base + scale * lora * self.scaling)).to(y.dtype)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.base_weight(), self.bias)
        if self.merged or not self.active:
            return y
        if not self.use_dora:
            return y + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling
        w = self.base_weight()
        v = w + self.scaling * (self.lora_B.weight @ self.lora_A.weight)
        w_dora = (self.lora_magnitude_vector / torch.linalg.norm(v, dim=1).detach()).unsqueeze(1) * v
        return y + F.linear(self.lora_dropout(x), w_dora - w)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into `weight` (computed in float32, stored in weight's dtype): `W + s B A`, or with
        DoRA PEFT's `m / ||W + s B A|| * (W + s B A)`."""
        if self.merged:
            return
        delta = (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling
        merged = self.base_weight().float() + delta
        if self.use_dora:
            merged = (self.lora_magnitude_vector.float() / torch.linalg.norm(merged, dim=1)).unsqueeze(1) * merged
        self.weight.copy_(merged.to(self.weight.dtype))
        self.merged = True

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, rank={self.rank}, scaling={self.scaling:g}, "
                f"{'dora=True, ' if self.use_dora else ''}merged={self.merged}")
