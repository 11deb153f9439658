"""Each preference loss and metric equals trl's own computation (DPOTrainer._compute_loss, CPOTrainer.cpo_loss,
ORPOTrainer.odds_ratio_loss, called on the same per-token log-probs), and the step-1 values the reference
fixes."""

from __future__ import annotations

import math
import types
from collections import defaultdict

import pytest
import torch

from training.preference import DPO, IPO, ORPO, SIMPO, pair_losses

# Compared with trl's own functions; trl takes seconds to import: `make test` only, not test-fast.
pytestmark = pytest.mark.slow

pytest.importorskip("trl")

B, T = 4, 9


def per_token_logps(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-token log-probs [2B, T-1], completion mask [2B, T]): chosen rows then rejected rows, completions of
    different lengths after prompts of different lengths."""
    g = torch.Generator().manual_seed(seed)
    logps = -torch.rand(2 * B, T - 1, generator=g, dtype=torch.float64).float() * 3
    mask = torch.zeros(2 * B, T, dtype=torch.long)
    for i in range(2 * B):
        start = 2 + i % 3
        mask[i, start:start + 2 + (i * 5) % 5] = 1
    return logps * mask[:, 1:], mask


class _Accelerator:
    device = torch.device("cpu")

    def gather_for_metrics(self, x):
        return x

    gather = gather_for_metrics

    def unwrap_model(self, m):
        return m


def trl_dpo(loss_type: str, logps, mask, ref, beta):
    """DPOTrainer._compute_loss on a stand-in model whose forward returns `logps` as its per-token log-probs,
    with the reference's sums precomputed: (loss, metrics)."""
    from trl import DPOTrainer

    outputs = types.SimpleNamespace(log_probs=logps, entropy=torch.zeros_like(logps),
                                    mean_logits=torch.zeros_like(logps), is_top1=torch.zeros_like(logps).bool())
    fake = types.SimpleNamespace(
        model=types.SimpleNamespace(training=True), accelerator=_Accelerator(), aux_loss_enabled=False,
        ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=[loss_type],
        loss_weights=[1.0], beta=beta, label_smoothing=0.0, use_weighting=False, _metrics=defaultdict(
            lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1)
    inputs = {"input_ids": torch.zeros_like(mask), "attention_mask": torch.ones_like(mask), "completion_mask": mask,
              "ref_chosen_logps": ref[:B], "ref_rejected_logps": ref[B:]}
    loss = DPOTrainer._compute_loss(fake, lambda **kw: outputs, inputs, False)
    return loss, {k: v[0] for k, v in fake._metrics["train"].items()}


def assert_metrics(ours: dict, theirs: dict, names):
    for name in names:
        assert ours[name].mean().item() == pytest.approx(theirs[name], abs=1e-6), name


@pytest.mark.parametrize("objective", [DPO, IPO])
def test_dpo_and_ipo_equal_dpo_trainer(objective):
    logps, mask = per_token_logps(0)
    ref = -torch.rand(2 * B, generator=torch.Generator().manual_seed(1)) * 10
    sums, lengths = logps.sum(1), mask.sum(1)
    beta = 0.3
    loss, theirs = trl_dpo("sigmoid" if objective == DPO else "ipo", logps, mask, ref, beta)
    losses, ours = pair_losses(objective, sums[:B], sums[B:], beta=beta, ref_chosen=ref[:B], ref_rejected=ref[B:],
                               chosen_len=lengths[:B], rejected_len=lengths[B:])
    assert losses.mean().item() == pytest.approx(loss.item(), abs=1e-6)
    assert_metrics(ours, theirs, ["rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                                  "logps/chosen", "logps/rejected"])
    assert 0 < theirs["rewards/accuracies"] < 1  # a mix of wins and losses: the comparison is exercised


@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_simpo_equals_cpo_trainer(label_smoothing):
    from trl.experimental.cpo import CPOTrainer

    logps, mask = per_token_logps(2)
    avg = logps.sum(1) / mask[:, 1:].sum(1)
    fake = types.SimpleNamespace(alpha=0.0, beta=2.0, loss_type="simpo", simpo_gamma=0.7,
                                 label_smoothing=label_smoothing, accelerator=_Accelerator())
    losses_trl, chosen_trl, rejected_trl = CPOTrainer.cpo_loss(fake, avg[:B], avg[B:])
    losses, ours = pair_losses(SIMPO, avg[:B], avg[B:], beta=2.0, gamma=0.7, label_smoothing=label_smoothing)
    torch.testing.assert_close(losses, losses_trl)
    torch.testing.assert_close(ours["rewards/chosen"], chosen_trl)
    torch.testing.assert_close(ours["rewards/rejected"], rejected_trl)


def test_orpo_equals_orpo_trainer():
    from trl.experimental.orpo import ORPOTrainer

    logps, mask = per_token_logps(3)
    avg = logps.sum(1) / mask[:, 1:].sum(1)
    fake = types.SimpleNamespace(beta=0.25, accelerator=_Accelerator())
    losses_trl, chosen_trl, rejected_trl, ratio, log_odds = ORPOTrainer.odds_ratio_loss(fake, avg[:B], avg[B:])
    losses, ours = pair_losses(ORPO, avg[:B], avg[B:], beta=0.25)
    torch.testing.assert_close(losses, -losses_trl)  # trl subtracts its mean: loss = nll - mean(beta * ratio)
    torch.testing.assert_close(ours["rewards/chosen"], chosen_trl)
    torch.testing.assert_close(ours["rewards/rejected"], rejected_trl)
    assert ours["log_odds_ratio"].mean().item() == pytest.approx(ratio.item(), abs=1e-6)
    assert ours["log_odds_chosen"].mean().item() == pytest.approx(log_odds.item(), abs=1e-6)


def test_at_step_one_every_reward_is_zero():
    # The reference is the policy: DPO's loss is log 2, IPO's (1/(2 beta))^2, and no pair is a win.
    logps = -torch.rand(2 * B) * 5
    lengths = torch.arange(2 * B) + 1
    for objective, want in ((DPO, math.log(2)), (IPO, (1 / (2 * 0.1)) ** 2)):
        losses, metrics = pair_losses(objective, logps[:B], logps[B:], beta=0.1, ref_chosen=logps[:B],
                                      ref_rejected=logps[B:], chosen_len=lengths[:B], rejected_len=lengths[B:])
        torch.testing.assert_close(losses, torch.full((B,), want))
        assert metrics["rewards/accuracies"].sum() == 0 and metrics["rewards/margins"].abs().sum() == 0
