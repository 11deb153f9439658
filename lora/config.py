"""What a LoRA adapter is: its rank, scale, dropout, which projections it adapts, and whether it is DoRA."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")
ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
# Phi-3's fused projections: q, k and v as one `qkv_proj`, gate and up as one `gate_up_proj`. Which of these a
# model has is its config's (`LlamaConfig.attention_projections` / `mlp_projections`), checked when it is built.
FUSED_TARGETS = ("qkv_proj", "gate_up_proj")
ALL_TARGETS = ATTENTION_TARGETS + MLP_TARGETS  # every projection of a model with separate ones (all but Phi-3)
TARGET_NAMES = ALL_TARGETS + FUSED_TARGETS  # every name a target may have
TARGET_GROUPS = ("mlp", "attention", "all")  # resolved to a model's own names by `resolve_targets`


def resolve_targets(spec: str, attention: tuple[str, ...] = ATTENTION_TARGETS,
                    mlp: tuple[str, ...] = MLP_TARGETS) -> tuple[str, ...]:
    """Comma-separated targets (`--targets`) as projection names: "mlp", "attention" and "all" stand for the
    model's own (`attention` and `mlp`: its config's `attention_projections` / `mlp_projections`), so the
    default, "mlp", is gate, up and down on Llama and Phi-3's gate_up and down. Repeats are dropped."""
    names: list[str] = []
    for entry in (t.strip() for t in spec.split(",")):
        group = {"mlp": mlp, "attention": attention, "all": attention + mlp}.get(entry, (entry,) if entry else ())
        names += [n for n in group if n not in names]
    return tuple(names)
# The widest rank accepted: past every projection's width of the models supported (Llama 3.1 405B's MLP is 53,248
# wide), and far inside what a tensor dimension holds, so a typo fails here instead of inside torch.empty.
MAX_RANK = 65536


@dataclass(frozen=True)
class LoRAConfig:
    """LoRA hyper-parameters. The default targets are the reference script's: the three MLP projections."""

    rank: int
    alpha: float
    dropout: float = 0.05
    targets: tuple[str, ...] = field(default=MLP_TARGETS)
    use_rslora: bool = False  # scale by alpha / sqrt(rank) instead of alpha / rank
    use_dora: bool = False  # DoRA: a trainable magnitude per output row as well (PEFT's use_dora; lora.layer)

    def __post_init__(self):
        object.__setattr__(self, "targets", tuple(self.targets))
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or not 1 <= self.rank <= MAX_RANK:
            raise ValueError(f"LoRA rank must be an integer from 1 to {MAX_RANK}, got {self.rank!r}")
        if not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"LoRA alpha must be a positive number, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        for name in ("use_rslora", "use_dora"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"LoRA {name} must be True or False, got {getattr(self, name)!r}")
        if not self.targets:
            raise ValueError(f"LoRA targets must name at least one of {TARGET_NAMES}, got none")
        unknown = [t for t in self.targets if t not in TARGET_NAMES]
        if unknown:
            raise ValueError(f"unknown LoRA target(s) {unknown}: choose from {TARGET_NAMES}")
        if len(set(self.targets)) != len(self.targets):
            raise ValueError(f"LoRA targets repeat a name: {self.targets}")

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)
