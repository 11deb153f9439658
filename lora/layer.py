"""`LoRALinear`: a frozen linear layer plus a trainable low-rank update, `W x + s * B(A(dropout(x)))`.

It *is* an `nn.Linear` (it owns `weight`), so a base checkpoint loads into a LoRA model unchanged and the
adapter's keys end in `.lora_A.weight` / `.lora_B.weight`, as PEFT writes them. No bias: Llama has none.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import LoRAConfig


class LoRALinear(nn.Linear):
    def __init__(self, in_features: int, out_features: int, config: LoRAConfig):
        super().__init__(in_features, out_features, bias=False)
        self.rank = config.rank
        self.scaling = config.scaling
        self.lora_dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(in_features, config.rank, bias=False)
        self.lora_B = nn.Linear(config.rank, out_features, bias=False)
        self.merged = False
        self.active = True  # False: behave as the base layer (see lora.disabled)
        self.weight.requires_grad_(False)
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        """PEFT's default: A ~ Kaiming-uniform(a=sqrt(5)), B = 0, so a fresh adapter changes nothing."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or not self.active:
            return F.linear(x, self.weight)
        # Scale the rank-sized tensor, not the [tokens, out] one, and let the B matmul accumulate into y
        # (addmm_, beta=1) instead of writing its own [tokens, out] result and adding it: the same sum, one
        # kernel and two passes over the largest tensor fewer. y is 2-D from the start, so the in-place add is
        # on a tensor of its own, not a view (which would cost autograd a copy). `reference` is the plain sum.
        x2 = x.reshape(-1, x.shape[-1])
        y = F.linear(x2, self.weight)
        a = F.linear(self.lora_dropout(x2), self.lora_A.weight) * self.scaling
        b = self.lora_B.weight.to(a.dtype)  # what autocast would do; in-place ops are not autocast
        if torch.compiler.is_compiling():  # traced, the in-place add becomes a copy plus an add; inductor fuses this
            return (y + a @ b.t()).view(*x.shape[:-1], y.shape[-1])
        return y.addmm_(a, b.t()).view(*x.shape[:-1], y.shape[-1])

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)
        if self.merged or not self.active:
            return y
        return y + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """Fold `s * B @ A` into `weight` (computed in float32, stored in weight's dtype)."""
        if self.merged:
            return
        delta = (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling
        self.weight.copy_((self.weight.float() + delta).to(self.weight.dtype))
        self.merged = True

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, scaling={self.scaling:g}, merged={self.merged}"
