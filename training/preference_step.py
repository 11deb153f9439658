"""One optimizer step and the held-out evaluation of a preference objective (`training.preference`), in the shape
of the SFT step (`train.queue_step`): micro-batches forward and backward, gradients summed over processes,
clipped, AdamW, all queued on the device and read one step later (`training.step.read_step`).

Exactness across accumulation and processes: the step's pair count (and, for ORPO, its count of chosen tokens)
is summed over micro-batches and processes first, on the host, and every micro-batch's summed per-pair losses
are divided by it. So 2 micro-batches of 4 pairs, or 2 processes of 4, give the gradient of one batch of 8.
The metrics are sums over pairs, divided by the pair count when read. Under --fsdp (and --fsdp hybrid) FSDP
sums the gradients itself, once a step, as for SFT; the reference's frozen adapter copy is sharded as the adapter
is (`preference.Reference` copies whatever tensors the parameters are), and the held-out evaluation runs in
lockstep (`stand_in_pair`).
"""

from __future__ import annotations

import math

import torch

from . import fsdp, parallel
from .preference import ORPO, logp_positions, metric_names, micro_batch_terms
from .step import QueuedStep, Timer


def _device_batch(batch: dict, device, nll: bool) -> dict:
    """The micro-batch on `device`, with the positions its log-probs are read at found first, on the CPU."""
    batch = {**batch, **logp_positions(batch, nll)}
    if device.type == "cuda":
        return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}
    return {k: v.to(device) for k, v in batch.items()}


def step_counts(micro: list[dict], orpo: bool) -> list[float]:
    """[pairs, real tokens, completion tokens, ORPO's NLL tokens] of this process's micro-batches (CPU copies)."""
    pairs = sum(b["input_ids"].shape[0] // 2 for b in micro)
    tokens = sum(int(b["attention_mask"].sum()) for b in micro)
    completion = sum(int(b["completion_mask"].sum()) for b in micro)
    nll = sum(int(b["attention_mask"][:b["input_ids"].shape[0] // 2, 1:].sum()) for b in micro) if orpo else 0
    return [pairs, tokens, completion, nll]


def queue_step(run, cfg, proc, step: int, lr: float, micro: list[dict], bad: torch.Tensor,
               params: list[torch.Tensor], seeds: list[int]) -> QueuedStep:
    """Optimizer step `step` (0-based) over this process's micro-batches of pairs `micro`; `seeds[i]` seeds the
    dropout masks of micro-batch i (`train.dropout_seed`)."""
    model, optimizer, device = run.model, run.optimizer, proc.device
    orpo = cfg.objective == ORPO
    counts = torch.tensor(step_counts(micro, orpo), dtype=torch.float64)
    if proc.world > 1:
        counts = parallel.all_reduce_sum(counts.to(device)).cpu()
    n_pairs, n_tokens, n_completion, n_nll = counts.tolist()
    micro = [_device_batch(b, device, orpo) for b in micro]
    names = metric_names(cfg.objective)
    timer = Timer(device)
    loss_total = torch.zeros((), device=device)
    sums = torch.zeros(len(names), device=device)  # per-pair metric sums; ORPO's NLL (token sum) last
    sharded = cfg.fsdp != "none"
    with parallel.peers_answer():  # FSDP's collectives run inside the model
        for i, batch in enumerate(micro):
            if cfg.dropout:
                torch.manual_seed(seeds[i])
            if sharded:  # reduce the gradients once, after the step's last micro-batch
                model.set_requires_gradient_sync(i == len(micro) - 1)
            with run.plan.forward():
                terms = micro_batch_terms(model, batch, cfg.objective, beta=cfg.beta, gamma=cfg.gamma,
                                          label_smoothing=cfg.label_smoothing, reference=run.reference)
            loss = terms["loss_sum"] / n_pairs
            if orpo:
                loss = loss + terms["nll_sum"] / n_nll
            loss.backward()
            loss_total += loss.detach()
            sums[:len(terms["metrics"])] += terms["metrics"]
            if orpo:
                sums[-1] += terms["nll_sum"].detach()
        if not sharded:  # FSDP has reduce-scattered them already
            parallel.all_reduce_grads(params)
        loss_total = parallel.all_reduce_sum(loss_total)
        sums = parallel.all_reduce_sum(sums)
        grad_norm = fsdp.full(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip or math.inf))
    means = sums / n_pairs
    if orpo:
        means[-1] = sums[-1] / n_nll
    numbers = torch.cat([torch.stack([loss_total, grad_norm.to(loss_total.dtype)]), means.to(loss_total.dtype)])
    torch.maximum(bad, (~torch.isfinite(numbers[:2])).any().to(bad.dtype), out=bad)
    optimizer.step()  # skipped on the device if `bad`
    optimizer.zero_grad(set_to_none=True)
    timer.stop()
    return QueuedStep(step + 1, numbers, timer, lr, n_tokens, n_completion, run.stream.epoch, loss_count=1.0,
                      metric_names=names)


def stand_in_pair(with_ref: bool) -> dict:
    """One pair of one-token sequences with no completion: what a sharded process with fewer held-out micro-batches
    than another runs, once for each it lacks, since every forward pass of a sharded model is a collective. With
    `with_ref` it carries reference log-probs, as --precompute-ref's pairs do, so it skips the reference's pass
    as theirs do."""
    batch = {"input_ids": torch.zeros(2, 1, dtype=torch.long), "attention_mask": torch.ones(2, 1, dtype=torch.long),
             "completion_mask": torch.zeros(2, 1, dtype=torch.long)}
    if with_ref:
        batch["ref_chosen_logps"] = batch["ref_rejected_logps"] = torch.zeros(1)
    return batch


def evaluate(run, cfg, proc, batches) -> dict:
    """The loss and metrics over the held-out pairs (this process's `batches`, summed over processes), each a mean
    over pairs (ORPO's NLL over tokens), as `eval` rows report them. Under --fsdp a process with fewer batches
    than another runs `stand_in_pair`s, counted nowhere, until they match."""
    model, device = run.model, proc.device
    orpo = cfg.objective == ORPO
    names = metric_names(cfg.objective)
    total = torch.zeros(len(names) + 3, dtype=torch.float64, device=device)  # loss, pairs, nll tokens, metrics
    batches = list(batches)
    missing = 0
    if cfg.fsdp != "none":
        missing = int(parallel.all_reduce_max(torch.tensor(float(len(batches)), device=device)).item()) - len(batches)
    model.eval()
    with torch.no_grad(), run.plan.forward():
        for _ in range(missing):
            micro_batch_terms(model, _device_batch(stand_in_pair(cfg.precompute_ref), device, orpo), cfg.objective,
                              beta=cfg.beta, gamma=cfg.gamma, label_smoothing=cfg.label_smoothing,
                              reference=run.reference)
        for batch in batches:
            pairs, _, _, nll = step_counts([batch], orpo)
            terms = micro_batch_terms(model, _device_batch(batch, device, orpo), cfg.objective, beta=cfg.beta,
                                      gamma=cfg.gamma, label_smoothing=cfg.label_smoothing, reference=run.reference)
            total[0] += terms["loss_sum"].double()
            total[1] += pairs
            total[2] += nll
            total[3:3 + len(terms["metrics"])] += terms["metrics"].double()
            if orpo:
                total[-1] += terms["nll_sum"].double()
    model.train()
    total = parallel.all_reduce_sum(total).tolist()
    pairs = max(total[1], 1)
    row = {"loss": total[0] / pairs + (total[-1] / max(total[2], 1) if orpo else 0.0)}
    row.update({name: value / pairs for name, value in zip(names, total[3:], strict=True)})
    if orpo:
        row["nll_loss"] = total[-1] / max(total[2], 1)
    return row
