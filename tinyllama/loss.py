"""The causal-LM loss: the one place where labels are shifted.

`labels` are aligned with `input_ids` (as the data pipeline writes them, -100 = no loss), and position t
predicts labels[t + 1]. Losses are returned as (sum over labelled tokens, number of labelled tokens), so a
training step can divide by the token count of the *whole* optimizer step, not average per-micro-batch means.

`causal_lm_loss` runs the LM head only at labelled positions and in chunks, so the [tokens, 32000] logits of
unlabelled prompt tokens are never materialised; `reference_loss` is the plain full-logits version it is
tested against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """targets[:, t] = labels[:, t + 1]; the last position predicts nothing."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def reference_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    targets = shift_labels(labels)
    loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX,
                           reduction="sum")
    return loss, targets.ne(IGNORE_INDEX).sum()


def lm_head_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_size: int = 4096):
    """Cross-entropy summed over labelled positions, computing logits for those positions only."""
    targets = shift_labels(labels).flatten()
    keep = targets.ne(IGNORE_INDEX)
    h = hidden.flatten(0, 1)[keep]
    targets = targets[keep]
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, targets.numel(), chunk_size):
        logits = F.linear(h[start:start + chunk_size], weight).float()
        total = total + F.cross_entropy(logits, targets[start:start + chunk_size], reduction="sum")
    return total, keep.sum()


def causal_lm_loss(model, input_ids, labels, chunk_size: int = 4096, **forward_kwargs):
    """(loss sum, labelled-token count) of `model` on a batch; kwargs go to `model.hidden_states`."""
    hidden = model.hidden_states(input_ids, **forward_kwargs)
    return lm_head_loss(hidden, model.lm_head.weight, labels, chunk_size)
