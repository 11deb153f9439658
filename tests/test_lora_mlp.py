"""tinyllama.lora_mlp: the LoRA MLP as one autograd function against its references (a hand-written formula with
the same dropout masks, and the plain modules), and fused gate/up weights that change no names or numbers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import lora
from helpers import GUANACO_SAMPLE, adapter_weights, hf_checkpoint, randomize_lora_b, run, train_losses
from lora import LoRAConfig
from tinyllama import load_model, save_model
from tinyllama.config import LlamaConfig
from tinyllama.lora_mlp import dropout_masks, fuse_gate_up, fused_lora_mlp
from tinyllama.model import MLP
from tinyllama.runtime import RuntimePlan, apply_plan

CONFIG = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                     num_attention_heads=4, num_key_value_heads=2)


def lora_mlp_module(p: float, seed: int = 0) -> MLP:
    torch.manual_seed(seed)
    return randomize_lora_b(MLP(CONFIG, LoRAConfig(rank=4, alpha=8.0, dropout=p)), std=0.2).train()


def by_hand(mlp: MLP, x, masks, p):
    """W x + s * B(A(dropout(x))) for each projection, with the given keep-masks (PEFT's LoRA)."""
    def projection(m, t, mask):
        dropped = t if mask is None else t * mask / (1 - p)
        return t @ m.weight.t() + m.scaling * (dropped @ m.lora_A.weight.t()) @ m.lora_B.weight.t()
    h = F.silu(projection(mlp.gate_proj, x, masks[0])) * projection(mlp.up_proj, x, masks[1])
    return projection(mlp.down_proj, h, masks[2])


def lora_params(mlp):
    return [t.weight for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj) for t in (m.lora_A, m.lora_B)]


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_the_function_equals_the_formula_with_the_same_masks(p):
    mlp = lora_mlp_module(p)
    assert fuse_gate_up(mlp)
    x = torch.randn(3, 5, 32, requires_grad=True)
    torch.manual_seed(1)
    y = fused_lora_mlp(mlp, x)
    torch.manual_seed(1)  # the masks the function drew, drawn again
    masks = [None if m is None else m.view(3, 5, -1) for m in dropout_masks(x.reshape(15, 32), 48, p)]
    assert (masks[0] is None) == (p == 0) and (p == 0 or not torch.equal(masks[0], masks[1]))
    ref = by_hand(mlp, x, masks, p)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x, *lora_params(mlp)], dy)
    expected = torch.autograd.grad(ref, [x, *lora_params(mlp)], dy)
    torch.testing.assert_close(y, ref)
    for name, g, e in zip(["x", "A_gate", "B_gate", "A_up", "B_up", "A_down", "B_down"], grads, expected,
                          strict=True):
        torch.testing.assert_close(g, e, msg=name)


def test_without_dropout_the_fused_module_equals_the_plain_modules():
    plain, fused = lora_mlp_module(0.0), lora_mlp_module(0.0)
    fuse_gate_up(fused)
    x = torch.randn(2, 7, 32)
    y1, y2 = plain(x), fused(x, fused=True)
    torch.testing.assert_close(y2, y1)
    for a, b in zip(torch.autograd.grad(y1.square().sum(), lora_params(plain)),
                    torch.autograd.grad(y2.square().sum(), lora_params(fused)), strict=True):
        torch.testing.assert_close(b, a)


def test_the_fused_path_in_bfloat16_autocast_stays_close_to_the_plain_one():
    plain, fused = lora_mlp_module(0.0), lora_mlp_module(0.0)
    fuse_gate_up(fused)
    x = torch.randn(2, 7, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y1, y2 = plain(x), fused(x, fused=True)
    assert y2.dtype == y1.dtype == torch.bfloat16
    torch.testing.assert_close(y2.float(), y1.float(), rtol=2e-2, atol=2e-2)


def test_fusing_keeps_names_values_and_merging(tmp_path, hf_tiny):
    model = load_model(hf_tiny, lora_config=LoRAConfig(4, 8, dropout=0.0))
    keys = {k: v.clone() for k, v in model.state_dict().items()}
    for layer in model.model.layers:
        assert fuse_gate_up(layer.mlp)
        assert layer.mlp.gate_proj.weight.data_ptr() == layer.mlp.gate_up_weight.data_ptr()
    state = model.state_dict()
    assert state.keys() == keys.keys()  # the fused buffer is not a checkpoint key
    for k, v in keys.items():
        torch.testing.assert_close(state[k], v, rtol=0, atol=0, msg=k)
    ids = torch.randint(0, 128, (2, 9))
    lora.merge(model)  # writes through the views: merged base weights, plain path
    merged = model(ids)
    save_model(model, tmp_path / "merged")  # views get their own storage on the way out
    torch.testing.assert_close(load_model(tmp_path / "merged")(ids), merged)


def test_gradient_checkpointing_replays_the_fused_dropout_masks(hf_tiny):
    results = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = load_model(hf_tiny, lora_config=LoRAConfig(4, 8, dropout=0.3)).train()
        apply_plan(model, RuntimePlan(fused_mlp=True))
        randomize_lora_b(model, std=0.1)
        model.gradient_checkpointing = ckpt
        torch.manual_seed(5)
        loss = model(torch.randint(0, 128, (2, 9))).square().mean()
        loss.backward()
        results.append((loss.detach(), [p.grad for p in model.parameters() if p.requires_grad]))
    torch.testing.assert_close(results[1][0], results[0][0])
    for a, b in zip(results[0][1], results[1][1], strict=True):
        torch.testing.assert_close(b, a)


@pytest.mark.slow
def test_train_py_with_the_fused_mlp_trains_like_the_plain_one(tmp_path):
    ckpt = hf_checkpoint(tmp_path / "model", vocab_size=32000, hidden_size=32, intermediate_size=64)
    (ckpt / "tokenizer.model").write_bytes(GUANACO_SAMPLE.with_name("tokenizer.model").read_bytes())
    _, plain = run(tmp_path, ckpt, "plain", fused_mlp=False)
    _, fused = run(tmp_path, ckpt, "fused", fused_mlp=True)
    assert train_losses(fused) == pytest.approx(train_losses(plain), rel=1e-5)
    assert [r["grad_norm"] for r in fused] == pytest.approx([r["grad_norm"] for r in plain], rel=1e-4)
    a, b = adapter_weights(tmp_path / "plain"), adapter_weights(tmp_path / "fused")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6, msg=k)


@pytest.mark.cuda
def test_cuda_bf16_fused_mlp_stays_close_to_the_plain_one():
    import os

    device = torch.device("cpu" if os.environ.get("GPU_TESTS_ON_CPU") else "cuda")
    plain, fused = (lora_mlp_module(0.0).to(device) for _ in range(2))
    for m in (plain, fused):
        for proj in (m.gate_proj, m.up_proj, m.down_proj):
            proj.weight.data = proj.weight.data.bfloat16()  # a bf16 base with fp32 adapters, as in training
    fuse_gate_up(fused)
    x = torch.randn(4, 64, 32, device=device, dtype=torch.bfloat16)
    outs = []
    for m in (plain, fused):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            y = m(x, fused=m is fused)
        outs.append((y.float(), torch.autograd.grad(y.float().square().sum(), lora_params(m))))
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=2e-2, atol=2e-2)
    for a, b in zip(outs[0][1], outs[1][1], strict=True):
        assert a.dtype == b.dtype == torch.float32
        torch.testing.assert_close(b, a, rtol=5e-2, atol=5e-2 * a.abs().max().item())
