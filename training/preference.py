"""Preference tuning (DPO, IPO, SimPO, ORPO) as trl 1.16 computes it, on the SFT loop's model and optimizer.

A micro-batch holds whole pairs (`data.pairs.collate_pairs`): its first half the chosen sequences, its second
half the rejected ones, with a `completion_mask`. One forward pass gives every sequence's log-probabilities over
its completion tokens (`sequence_logps`); the objective turns them into per-pair losses and rewards
(`pair_losses`, trl's formulas, named as trl names them):

| objective | trl                                  | log-probs | per-pair loss                                       |
| --------- | ------------------------------------ | --------- | --------------------------------------------------- |
| dpo       | DPOTrainer, loss_type "sigmoid"      | summed    | -logsigmoid(beta * d), d = (c - ref_c) - (r - ref_r) |
| ipo       | DPOTrainer, loss_type "ipo"          | summed    | (h - 1/(2 beta))^2, h: d with each side / its length |
| simpo     | CPOTrainer, loss_type "simpo"        | averaged  | -(1-eps) ls(beta z) - eps ls(-beta z)                |
| orpo      | ORPOTrainer                          | averaged  | -beta * logsigmoid(log_odds), plus the chosen NLL   |

(ls: logsigmoid; SimPO's z = c - r - gamma/beta, eps the label smoothing.) Rewards: beta * (logp - ref) for
dpo and ipo, beta * logp for simpo and orpo. The reference (dpo, ipo) is the policy before step 1, frozen
(`Reference`): the base with the adapter switched off when the run starts from a fresh adapter (B = 0, so the
two are the same), else the initial adapter's weights, kept as a frozen copy and put in place for the reference
forward pass. The loss of a step is the mean over all of its pairs (all micro-batches, all processes): each
micro-batch's per-pair losses are summed and divided by the step's pair count; ORPO's NLL is one token-level
mean over the step's chosen tokens, prompt included.

Deliberately left out: trl's other loss types, `ld_alpha`, f-divergences, reference models other than the
policy's own start, and logging of logits and entropy.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

import lora
from tinyllama.loss import softcap_logits

SFT, DPO, IPO, SIMPO, ORPO = "sft", "dpo", "ipo", "simpo", "orpo"
OBJECTIVES = (SFT, DPO, IPO, SIMPO, ORPO)
PREFERENCE = (DPO, IPO, SIMPO, ORPO)
WITH_REFERENCE = (DPO, IPO)
AVERAGED = (SIMPO, ORPO)  # log-probs averaged over the completion, not summed
# The step's metrics, each a mean over its pairs, under trl's names (ORPO adds ORPO_METRICS).
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected")
ORPO_METRICS = ("log_odds_ratio", "log_odds_chosen", "nll_loss")  # the NLL, a mean over tokens, last


def metric_names(objective: str) -> tuple[str, ...]:
    return METRICS + (ORPO_METRICS if objective == ORPO else ())


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, branching at -ln 2 to avoid cancellation (trl's orpo log1mexp)."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def pair_losses(objective: str, chosen: torch.Tensor, rejected: torch.Tensor, *, beta: float, gamma: float = 0.0,
                label_smoothing: float = 0.0, ref_chosen: torch.Tensor | None = None,
                ref_rejected: torch.Tensor | None = None, chosen_len: torch.Tensor | None = None,
                rejected_len: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(per-pair losses [B], per-pair metrics {name: [B]}) of one objective, from the pairs' log-probs: sums over
    the completion for dpo and ipo (with the reference's and, for ipo, the completion lengths), averages for simpo
    and orpo. ORPO's NLL is not in these: it is a token-level mean over the step (`step_loss`)."""
    extra = {}
    if objective in WITH_REFERENCE:
        chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
        if objective == DPO:
            losses = -F.logsigmoid(beta * (chosen_ratio - rejected_ratio))
        else:
            h = chosen_ratio / chosen_len.clamp(min=1) - rejected_ratio / rejected_len.clamp(min=1)
            losses = (h - 1 / (2 * beta)) ** 2
        chosen_reward, rejected_reward = beta * chosen_ratio.detach(), beta * rejected_ratio.detach()
    elif objective == SIMPO:
        z = chosen - rejected - gamma / beta
        losses = -F.logsigmoid(beta * z) * (1 - label_smoothing) - F.logsigmoid(-beta * z) * label_smoothing
        chosen_reward, rejected_reward = beta * chosen.detach(), beta * rejected.detach()
    elif objective == ORPO:
        chosen, rejected = chosen.float(), rejected.float()
        log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
        ratio = F.logsigmoid(log_odds)
        losses = -beta * ratio
        chosen_reward, rejected_reward = beta * chosen.detach(), beta * rejected.detach()
        extra = {"log_odds_ratio": ratio.detach(), "log_odds_chosen": log_odds.detach()}
    else:
        raise ValueError(f"unknown preference objective {objective!r}; expected one of {PREFERENCE}")
    metrics = {"rewards/chosen": chosen_reward, "rewards/rejected": rejected_reward,
               "rewards/accuracies": (chosen_reward > rejected_reward).to(chosen_reward.dtype),
               "rewards/margins": chosen_reward - rejected_reward,
               "logps/chosen": chosen.detach(), "logps/rejected": rejected.detach(), **extra}
    return losses, metrics


# ---- log-probabilities of the model ---------------------------------------------------------------------------

def logp_positions(batch: dict, nll: bool = False) -> dict[str, torch.Tensor]:
    """Where a pair micro-batch's log-probs are read: the flat positions (into [rows * (width - 1)]) that predict a
    completion token (and, with `nll`, any real token of a chosen row but its first), their rows, and which of them
    are completion and NLL tokens. Call it on the CPU copy, as `tinyllama.loss.label_positions`: a boolean
    selection on the GPU would make the host wait for the device."""
    input_ids, completion = batch["input_ids"], batch["completion_mask"]
    rows, width = input_ids.shape
    wanted = completion[:, 1:].bool()
    real = batch["attention_mask"][:, 1:].bool() & (torch.arange(rows)[:, None] < rows // 2)
    if nll:
        wanted = wanted | real
    index = wanted.flatten().nonzero().squeeze(1)
    return {"logp_index": index, "logp_row": index // (width - 1),
            "logp_completion": completion[:, 1:].flatten()[index].bool(), "logp_nll": real.flatten()[index]}


def sequence_logps(model, batch: dict, *, nll: bool = False, chunk_size: int = 4096) -> dict[str, torch.Tensor]:
    """Per sequence of a pair micro-batch: the sum of its completion tokens' log-probs (`logps` [2B]) and their
    count (`tokens`); with `nll`, also the chosen sequences' summed cross-entropy over every real token but the
    first (`nll_sum`, prompt included, as ORPO's NLL) and its count (`nll_tokens`). The LM head runs only at the
    positions that predict one of those tokens (`logp_positions`, in the batch or found here), in chunks."""
    if "logp_index" not in batch:
        batch = {**batch, **logp_positions(batch, nll)}
    input_ids, completion = batch["input_ids"], batch["completion_mask"]
    index, row = batch["logp_index"], batch["logp_row"]
    is_completion, is_real = batch["logp_completion"], batch["logp_nll"]
    hidden = model.hidden_states(input_ids)  # right-padded: the causal mask alone keeps padding out of real tokens
    h = hidden[:, :-1].flatten(0, 1).index_select(0, index)
    t = input_ids[:, 1:].flatten().index_select(0, index)
    token_logps = torch.cat([
        -F.cross_entropy(softcap_logits(F.linear(h[s:s + chunk_size], model.lm_head.weight),
                                        model.config.final_logit_softcapping).float(),
                         t[s:s + chunk_size], reduction="none")
        for s in range(0, index.numel(), chunk_size)]) if index.numel() else hidden.new_zeros(0, dtype=torch.float32)
    # Masked sums, not boolean selections: their shapes are fixed, so nothing waits for the device.
    logps = torch.zeros(input_ids.shape[0], dtype=torch.float32, device=hidden.device).index_add(
        0, row, token_logps * is_completion)
    out = {"logps": logps, "tokens": completion.sum(1)}
    if nll:
        out["nll_sum"] = -(token_logps * is_real).sum()
        out["nll_tokens"] = is_real.sum()
    return out


class Reference:
    """The policy as it was before step 1, for dpo and ipo: the base (adapter off) when the run starts from a fresh
    adapter, else a frozen copy of the initial adapter's weights, put in place for each reference forward pass.
    One base in memory either way. Its forward passes run without dropout and without gradient."""

    def __init__(self, model, from_adapter: bool):
        self.model = model
        self.frozen = None
        if from_adapter:
            self.frozen = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}

    @contextlib.contextmanager
    def active(self):
        model = self.model
        training = model.training
        model.eval()
        try:
            if self.frozen is None:
                with torch.no_grad(), lora.disabled(model):
                    yield
                return
            params = dict(model.named_parameters())
            with torch.no_grad():
                current = {name: params[name].detach().clone() for name in self.frozen}
                for name, value in self.frozen.items():
                    params[name].copy_(value)
                try:
                    yield
                finally:
                    for name, value in current.items():
                        params[name].copy_(value)
        finally:
            model.train(training)

    def logps(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen, rejected) summed completion log-probs of a micro-batch under the reference."""
        with self.active():
            logps = sequence_logps(self.model, batch)["logps"]
        return logps.chunk(2)


def micro_batch_terms(model, batch: dict, objective: str, *, beta: float, gamma: float, label_smoothing: float,
                      reference: Reference | None) -> dict:
    """A micro-batch's share of its step: the sum of its per-pair losses (with gradient), the sums of its
    per-pair metrics, and for ORPO the NLL's token sum and count."""
    if objective in WITH_REFERENCE:
        if "ref_chosen_logps" in batch:
            ref_chosen, ref_rejected = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
        else:
            ref_chosen, ref_rejected = reference.logps(batch)
    else:
        ref_chosen = ref_rejected = None
    out = sequence_logps(model, batch, nll=objective == ORPO)
    logps, tokens = out["logps"], out["tokens"]
    if objective in AVERAGED:
        logps = logps / tokens.clamp(min=1)
    chosen, rejected = logps.chunk(2)
    chosen_len, rejected_len = tokens.chunk(2)
    losses, metrics = pair_losses(objective, chosen, rejected, beta=beta, gamma=gamma,
                                  label_smoothing=label_smoothing, ref_chosen=ref_chosen, ref_rejected=ref_rejected,
                                  chosen_len=chosen_len, rejected_len=rejected_len)
    terms = {"loss_sum": losses.sum(), "pairs": chosen.numel(),
             "metrics": torch.stack([metrics[name].float().sum() for name in metric_names(objective)
                                     if name in metrics])}
    if objective == ORPO:
        terms["nll_sum"], terms["nll_tokens"] = out["nll_sum"], out["nll_tokens"]
    return terms


def precompute_reference(reference: Reference, examples, batch_size: int, collate) -> None:
    """--precompute-ref: the reference's log-probs of every pair, once, before training (trl's
    `precompute_ref_log_probs`); each example then carries them and no reference forward runs during training."""
    for s in range(0, len(examples), batch_size):
        chunk = examples[s:s + batch_size]
        chosen, rejected = reference.logps(collate(chunk))
        for e, c, r in zip(chunk, chosen.tolist(), rejected.tolist(), strict=True):
            e.ref_chosen_logps, e.ref_rejected_logps = c, r
