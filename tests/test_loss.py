"""The loss: label shifting, the labelled-only chunked head, and the frozen-head fused path vs plain PyTorch."""

from __future__ import annotations

import pytest
import torch

import lora
from helpers import TINY, randomize_lora_b
from tinyllama import Llama, LlamaConfig, causal_lm_loss, reference_loss
from tinyllama.loss import label_positions, lm_head_loss, shift_labels


def test_shift_labels_predicts_the_next_token():
    labels = torch.tensor([[-100, 5, 6, 7]])
    assert shift_labels(labels).tolist() == [[5, 6, 7, -100]]


def _model_and_batch(seed=0):
    torch.manual_seed(seed)
    model = randomize_lora_b(Llama(LlamaConfig(**TINY), lora_config=lora.LoRAConfig(4, 8, dropout=0.0)), std=0.1)
    ids = torch.randint(0, TINY["vocab_size"], (3, 21))
    labels = ids.clone()
    labels[:, :6] = -100
    labels[2, 15:] = -100
    return model, ids, labels


@pytest.mark.parametrize("chunk_size", [7, 4096])
def test_labelled_only_chunked_loss_equals_full_logits(chunk_size):
    model, ids, labels = _model_and_batch()
    with torch.no_grad():
        a, n = causal_lm_loss(model, ids, labels, chunk_size=chunk_size)
        b, m = reference_loss(model(ids), labels)
    assert n == m == int(shift_labels(labels).ne(-100).sum())
    assert a.item() == pytest.approx(b.item(), rel=1e-6)


@pytest.mark.parametrize("chunk_size", [5, 4096])
def test_frozen_head_fused_path_equals_plain_path(chunk_size):
    results = []
    for fused in (False, True):
        model, ids, labels = _model_and_batch()
        hidden = model.hidden_states(ids)
        loss, n = lm_head_loss(hidden, model.lm_head.weight, labels, chunk_size, fused=fused)
        (2.5 * loss / n).backward()  # a non-unit upstream gradient must scale the fused path too
        results.append((loss.detach(), {k: p.grad for k, p in model.named_parameters() if p.requires_grad}))
    (plain, g_plain), (fused, g_fused) = results
    assert fused.item() == pytest.approx(plain.item(), rel=1e-6)
    assert len(g_plain) == 3 * 2 * TINY["num_hidden_layers"]
    for k in g_plain:
        torch.testing.assert_close(g_fused[k], g_plain[k], rtol=1e-5, atol=1e-7, msg=k)


def test_fused_path_is_chosen_only_for_a_frozen_head_with_grad():
    model, ids, labels = _model_and_batch()
    hidden = model.hidden_states(ids)
    loss, _ = lm_head_loss(hidden, model.lm_head.weight, labels)
    assert type(loss.grad_fn).__name__ == "FrozenHeadCrossEntropyBackward"
    model.lm_head.weight.requires_grad_(True)
    loss, _ = lm_head_loss(model.hidden_states(ids), model.lm_head.weight, labels)
    assert "FrozenHead" not in type(loss.grad_fn).__name__


def test_label_positions_computed_ahead_give_the_same_loss_and_count():
    model, ids, labels = _model_and_batch()
    index = label_positions(labels)
    assert index.numel() == int((shift_labels(labels) != -100).sum())
    hidden = model.hidden_states(ids)
    a, n = lm_head_loss(hidden, model.lm_head.weight, labels)
    b, m = lm_head_loss(hidden, model.lm_head.weight, labels, label_index=index)
    assert n == m == index.numel()
    assert torch.equal(a, b)
    ref, count = reference_loss(model(ids), labels)
    assert m == count
    torch.testing.assert_close(b, ref)


@pytest.mark.slow
def test_the_compiled_loss_chunk_equals_the_eager_one():
    # What a compiled plan's loss uses: inductor's fused passes, the same numbers, at two chunk lengths
    # (dynamic: one compilation).
    from tinyllama.loss import compiled_cross_entropy_chunk, cross_entropy_chunk

    compiled = compiled_cross_entropy_chunk()
    for n in (37, 64):
        logits, targets = torch.randn(n, 128), torch.randint(0, 128, (n,))
        loss, grad = cross_entropy_chunk(logits.clone(), targets)
        loss_c, grad_c = compiled(logits.clone(), targets)
        torch.testing.assert_close(loss_c, loss)
        torch.testing.assert_close(grad_c, grad)
        expected = torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
        torch.testing.assert_close(loss, expected)
        torch.testing.assert_close(grad, torch.softmax(logits, -1) - torch.nn.functional.one_hot(targets, 128))
