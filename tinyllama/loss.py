"""The causal-LM loss: the one place where labels are shifted.

`labels` are aligned with `input_ids` (as the data pipeline writes them, -100 = no loss), and position t
predicts labels[t + 1]. Losses are returned as (sum over labelled tokens, number of labelled tokens), so a
training step can divide by the token count of the *whole* optimizer step, not average per-micro-batch means.

`causal_lm_loss` runs the LM head only at labelled positions and in chunks, so the [tokens, 32000] logits of
unlabelled prompt tokens are never materialised; `reference_loss` is the plain full-logits version it is
tested against. When the LM head is frozen (LoRA training), `FrozenHeadCrossEntropy` goes one step further:
it computes the gradient with respect to the hidden states chunk by chunk during the forward pass and keeps
only that ([tokens, hidden]), so no [tokens, vocab] logits or softmax are held for the backward pass at all.
"""

from __future__ import annotations

import functools

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


def label_positions(labels: torch.Tensor) -> torch.Tensor:
    """Flat indices (into [batch * seq]) of the positions that predict a label.

    Call it on the CPU copy of the labels, before the batch moves to the GPU, and pass the result as
    `label_index`: selecting positions with a boolean mask on the GPU makes the host wait for the device
    (the result's size is data-dependent), which stalls the step in the middle.
    """
    return shift_labels(labels).flatten().ne(IGNORE_INDEX).nonzero().squeeze(1)


def cross_entropy_chunk(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of CE over the chunk, d/dlogits = softmax - onehot in the logits' dtype), computed in float32.

    Eager, this is five passes over one float32 [chunk, vocab] buffer, in place: max, subtract it and
    exponentiate, sum, divide. (`Tensor.logsumexp` would make the same passes plus a temporary copy, and then the
    softmax needs two more; on a CPU it costs about twice as much.) Compiled (`compiled_cross_entropy_chunk`, what
    a compiled plan's loss uses) they fuse into a read of the logits and a write of the gradient.
    """
    logits32 = logits.float()
    picked = logits32.gather(1, targets[:, None]).squeeze(1)
    top = logits32.amax(-1, keepdim=True)
    total = logits32.sub_(top).exp_().sum(-1, keepdim=True)  # exp(logit - max), in place
    loss = (top.squeeze(1) + total.log().squeeze(1) - picked).sum()  # log-sum-exp minus the target's logit
    probs = logits32.div_(total)  # softmax
    probs[torch.arange(targets.numel(), device=targets.device), targets] -= 1
    return loss, probs.to(logits.dtype)


@functools.cache
def compiled_cross_entropy_chunk():
    """`cross_entropy_chunk` compiled once; chunk lengths vary (labelled tokens per batch), hence dynamic."""
    return torch.compile(cross_entropy_chunk, dynamic=True)


def lm_head_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_size: int = 4096,
                 fused: bool | None = None, label_index: torch.Tensor | None = None, loss_chunk=None,
                 softcap: float | None = None):
    """Cross-entropy summed over labelled positions, computing logits for those positions only.

    fused=None uses `FrozenHeadCrossEntropy` when the head is frozen and a gradient is needed; False forces the
    plain chunked path (the reference it is tested against). `label_index`: `label_positions(labels)`, computed
    ahead on the CPU (no host sync); None computes it here. `loss_chunk`: what computes a chunk's loss and logit
    gradient in the fused path (default `cross_entropy_chunk`; a compiled one under `--compile`). `softcap`: Gemma
    2's final cap, tanh(logits / cap) * cap, applied chunk by chunk in the logits' dtype, as transformers does.
    """
    if label_index is None:
        label_index = label_positions(labels)
    h = hidden.flatten(0, 1).index_select(0, label_index)
    targets = shift_labels(labels).flatten().index_select(0, label_index)
    if fused is None:
        fused = h.requires_grad and not weight.requires_grad
    if fused:
        return (FrozenHeadCrossEntropy.apply(h, weight, targets, chunk_size, loss_chunk or cross_entropy_chunk,
                                             softcap), label_index.numel())
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, targets.numel(), chunk_size):
        logits = softcap_logits(F.linear(h[start:start + chunk_size], weight), softcap).float()
        total = total + F.cross_entropy(logits, targets[start:start + chunk_size], reduction="sum")
    return total, label_index.numel()


class FrozenHeadCrossEntropy(torch.autograd.Function):
    """sum_i CE(h_i @ W.T, t_i) for a frozen W, with d/dh computed in the forward pass, chunk by chunk.

    d loss / d h_i = (softmax(h_i W^T) - onehot(t_i)) @ W. Holding that [N, hidden] tensor instead of the
    [N, vocab] logits is the whole memory saving (vocab 32,000 vs hidden 2,048). Same FLOPs as the plain path:
    the input-gradient matmul just runs earlier. Runs under the caller's autocast like the plain path. With a
    final softcap the logits' gradient passes through the cap's derivative, 1 - (capped / cap)^2.
    """

    @staticmethod
    def forward(ctx, h, weight, targets, chunk_size, loss_chunk, softcap=None):
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h)
        for start in range(0, targets.numel(), chunk_size):
            logits = softcap_logits(F.linear(h[start:start + chunk_size], weight), softcap)
            # The cap's derivative, taken before loss_chunk, which may overwrite float32 logits in place.
            slope = None if softcap is None else 1 - (logits.float() / softcap) ** 2
            loss, grad_logits = loss_chunk(logits, targets[start:start + chunk_size])
            if slope is not None:
                grad_logits = grad_logits * slope.to(grad_logits.dtype)
            total += loss
            grad_h[start:start + chunk_size] = grad_logits.to(weight.dtype) @ weight
        ctx.save_for_backward(grad_h)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        (grad_h,) = ctx.saved_tensors
        return grad_h * grad_output.to(grad_h.dtype), None, None, None, None, None


def softcap_logits(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    """Gemma 2's final-logit softcap, tanh(logits / cap) * cap (None: the logits as they are)."""
    return logits if cap is None else torch.tanh(logits / cap) * cap


def causal_lm_loss(model, input_ids, labels, chunk_size: int = 4096, label_index=None, **forward_kwargs):
    """(loss sum, labelled-token count) of `model` on a batch; kwargs go to `model.hidden_states`."""
    hidden = model.hidden_states(input_ids, **forward_kwargs)
    compiled = (forward_kwargs.get("plan") or model.plan).compile_scope is not None
    return lm_head_loss(hidden, model.lm_head.weight, labels, chunk_size, label_index=label_index,
                        loss_chunk=compiled_cross_entropy_chunk() if compiled else None,
                        softcap=model.config.final_logit_softcapping)
