"""DoRA (`LoRAConfig(use_dora=True)`): parity with PEFT's `use_dora=True` both ways (logits and gradients, in eval
and with dropout in train mode), PEFT's initialisation and merge, exact parameter counts, the dense reference,
and what is refused (the fused MLP, an adapter of the other kind)."""

from __future__ import annotations

import json

import pytest
import torch

import lora
from helpers import (
    TINY,
    LazyModule,
    compare_gradients,
    forward_and_reference,
    hf_checkpoint,
    hf_model,
    lm_batch,
    our_name,
    randomize_lora_b,
)
from lora import LoRAConfig
from lora.layer import LoRALinear
from tinyllama import Llama, LlamaConfig, causal_lm_loss, load_model

transformers = pytest.importorskip("transformers")
peft = LazyModule("peft")

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CASES = {
    "mlp": LoRAConfig(rank=4, alpha=8, dropout=0.0, use_dora=True),
    "all_rslora": LoRAConfig(rank=8, alpha=16, dropout=0.0, targets=ALL, use_rslora=True, use_dora=True),
}


def _peft_config(config: LoRAConfig, dropout: float | None = None):
    return peft.LoraConfig(r=config.rank, lora_alpha=config.alpha, target_modules=list(config.targets),
                           lora_dropout=config.dropout if dropout is None else dropout,
                           use_rslora=config.use_rslora, use_dora=True, task_type="CAUSAL_LM")


def _perturb(model, seed: int):
    """Random non-zero A and B and magnitudes moved off their initial norms: with B = 0 and m = ||W|| DoRA is the
    identity, and every mistake in the norm, the scale or the magnitude's place would hide."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.2 * torch.randn_like(p))
            elif "lora_" in name:
                p.copy_(0.1 * torch.randn_like(p))
    return model


def _loss_backward(model, ids, labels):
    loss_sum, n = causal_lm_loss(model, ids, labels)
    (loss_sum / n).backward()
    return loss_sum / n


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_dora_adapter_loads_with_same_logits_and_gradients(tmp_path, case):
    config = CASES[case]
    path = hf_checkpoint(tmp_path / "base")
    ref = _perturb(peft.get_peft_model(hf_model(path), _peft_config(config)), seed=3).eval()
    ref.save_pretrained(tmp_path / "adapter")

    ours = load_model(path, lora_config=lora.read_adapter_config(tmp_path / "adapter"))
    assert ours.lora_config.use_dora
    lora.load_adapter(ours, tmp_path / "adapter")
    ours.eval()

    ids, labels = lm_batch(TINY["vocab_size"])
    out = ref(input_ids=ids, labels=labels)
    out.loss.backward()
    logits = ours(ids)
    torch.testing.assert_close(logits, out.logits, rtol=0, atol=1e-6)
    loss = _loss_backward(ours, ids, labels)
    assert loss.item() == pytest.approx(out.loss.item(), abs=1e-6)
    assert compare_gradients(ref, ours, 5e-6) == 3 * len(config.targets) * TINY["num_hidden_layers"]
    with torch.no_grad(), lora.disabled(ours):  # the perturbation is large enough to matter
        assert (ours(ids) - logits).abs().max() > 1e-2


def test_our_dora_adapter_loads_in_peft_with_same_logits_and_gradients(tmp_path):
    config = CASES["all_rslora"]
    path = hf_checkpoint(tmp_path / "base")
    ours = _perturb(load_model(path, lora_config=config), seed=5).eval()
    lora.save_adapter(ours, tmp_path / "adapter", base_model=str(path))
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["use_dora"] is True and saved["use_rslora"] is True

    ref = peft.PeftModel.from_pretrained(hf_model(path), tmp_path / "adapter", is_trainable=True).eval()
    assert ref.peft_config["default"].use_dora
    ids, labels = lm_batch(TINY["vocab_size"])
    out = ref(input_ids=ids, labels=labels)
    out.loss.backward()
    torch.testing.assert_close(ours(ids), out.logits, rtol=0, atol=1e-6)
    _loss_backward(ours, ids, labels)
    assert compare_gradients(ref, ours, 5e-6) == 3 * len(ALL) * TINY["num_hidden_layers"]


def test_adapter_keys_are_pefts(tmp_path):
    path = hf_checkpoint(tmp_path / "base")
    ref = peft.get_peft_model(hf_model(path), _peft_config(CASES["mlp"]))
    ref.save_pretrained(tmp_path / "peft")
    ours = load_model(path, lora_config=CASES["mlp"])
    lora.save_adapter(ours, tmp_path / "ours")
    from safetensors.torch import load_file

    theirs, mine = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("peft", "ours"))
    assert sorted(mine) == sorted(theirs)
    assert mine["base_model.model.model.layers.1.mlp.down_proj.lora_magnitude_vector"].shape == (TINY["hidden_size"],)
    assert all(mine[k].shape == theirs[k].shape and mine[k].dtype == theirs[k].dtype for k in mine)


def test_fresh_dora_is_pefts_initialisation_and_changes_nothing(tmp_path):
    # PEFT's init: m = ||W + s B A|| per row after A and B are drawn (B = 0), so m/||.|| is exactly 1.
    path = hf_checkpoint(tmp_path / "base")
    ref = peft.get_peft_model(hf_model(path), _peft_config(CASES["all_rslora"]))
    ours = load_model(path, lora_config=CASES["all_rslora"]).eval()
    ours_params = dict(ours.named_parameters())
    magnitudes = [(p, ours_params[our_name(n)]) for n, p in ref.named_parameters() if "magnitude" in n]
    assert len(magnitudes) == len(ALL) * TINY["num_hidden_layers"]
    for theirs, mine in magnitudes:
        assert mine.requires_grad and mine.dtype == torch.float32
        torch.testing.assert_close(mine, theirs, rtol=1e-6, atol=0)
    ids, _ = lm_batch(TINY["vocab_size"])
    with torch.no_grad():
        assert torch.equal(ours(ids), load_model(path).eval()(ids))


def test_dropout_in_train_mode_matches_peft(tmp_path):
    # PEFT recomputes the base product on the dropped-out input (W x + (m/n - 1) W x_d + (m/n) s B A x_d). Both
    # draw one mask per adapted module over its input, in the same order (gate, up, down), so one seed gives the
    # same masks.
    config = LoRAConfig(rank=4, alpha=8, dropout=0.3, use_dora=True)
    path = hf_checkpoint(tmp_path / "base")
    ref = _perturb(peft.get_peft_model(hf_model(path), _peft_config(config)), seed=3).train()
    ref.save_pretrained(tmp_path / "adapter")
    ours = load_model(path, lora_config=config)
    lora.load_adapter(ours, tmp_path / "adapter")
    ours.train()

    ids, labels = lm_batch(TINY["vocab_size"])
    torch.manual_seed(11)
    out = ref(input_ids=ids, labels=labels)
    out.loss.backward()
    torch.manual_seed(11)
    logits = ours(ids)
    torch.testing.assert_close(logits, out.logits, rtol=0, atol=1e-6)
    torch.manual_seed(11)
    _loss_backward(ours, ids, labels)
    compare_gradients(ref, ours, 5e-6)
    with torch.no_grad():  # eval mode (no dropout) differs: the masks mattered
        assert (ours.eval()(ids) - logits).abs().max() > 1e-2


def test_merge_matches_pefts_merge_and_keeps_the_logits(tmp_path):
    config = CASES["all_rslora"]
    path = hf_checkpoint(tmp_path / "base")
    ours = _perturb(load_model(path, lora_config=config), seed=5).eval()
    lora.save_adapter(ours, tmp_path / "adapter")
    merged_peft = peft.PeftModel.from_pretrained(hf_model(path), tmp_path / "adapter").merge_and_unload()
    ids, _ = lm_batch(TINY["vocab_size"])
    with torch.no_grad():
        before = ours(ids)
        lora.merge(ours)
        torch.testing.assert_close(ours(ids), before, rtol=0, atol=1e-6)
    theirs = merged_peft.state_dict()
    for name, layer in lora.lora_layers(ours).items():
        torch.testing.assert_close(layer.weight, theirs[name + ".weight"], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_matches_the_dense_reference(dtype):
    # `forward` (PEFT's order: y + (m/n - 1) W x_d + (m/n) s B A x_d) against `reference` (the DoRA weight
    # W' = m (W + s B A) / ||W + s B A|| built densely: W x + (W' - W) x_d). Same seed, same dropout mask;
    # outputs and the gradients of x, A, B and m agree. bf16 under autocast, as training runs it.
    torch.manual_seed(0)
    layer = LoRALinear(24, 40, LoRAConfig(rank=4, alpha=8, dropout=0.1, use_dora=True)).train()
    _perturb(layer, seed=1)
    layer.weight.data = layer.weight.data.to(dtype)
    x = torch.randn(3, 5, 24, dtype=dtype, requires_grad=True)
    results = forward_and_reference(layer, x, seed=2, autocast=dtype == torch.bfloat16)
    assert len(results[0]) == 5  # output, x, A, B and m
    assert results[0][0].dtype == results[1][0].dtype
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, **tol)


def test_weight_norm_is_float32_under_autocast():
    # A small step of m is a relative change of ~1e-4 in m/||W + s B A||: bf16 norms would lose it.
    torch.manual_seed(0)
    layer = randomize_lora_b(LoRALinear(64, 48, LoRAConfig(rank=4, alpha=8, use_dora=True)), std=0.2)
    layer.weight.data = layer.weight.data.to(torch.bfloat16)
    exact = torch.linalg.norm(layer.weight.double() + layer.scaling * (layer.lora_B.weight.double()
                                                                       @ layer.lora_A.weight.double()), dim=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        norm = layer.weight_norm()
    assert norm.dtype == torch.float32 and not norm.requires_grad
    torch.testing.assert_close(norm.double(), exact, rtol=1e-6, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("targets", [CASES["mlp"].targets, ALL])
def test_trainable_counts_equal_pefts(targets):
    from training.report import parameter_table

    config = LoRAConfig(rank=4, alpha=8, targets=targets, use_dora=True)
    ranks = [2, 4, 16]
    rows = parameter_table(LlamaConfig(**TINY), config, ranks, "tiny", log=lambda line: None)["rows"]
    for r, row in zip(ranks, rows, strict=True):
        base = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY))
        pcfg = peft.LoraConfig(r=r, lora_alpha=r, target_modules=list(targets), use_dora=True)
        assert (row["trainable_params"], row["total_params"]) == peft.get_peft_model(
            base, pcfg).get_nb_trainable_parameters()


# The reference table's LoRA counts (tests/test_lora.py) and, per layer, DoRA's magnitudes: one per output row of
# gate (5632), up (5632) and down (2048), in 22 layers; new parameters, so the total grows by as much.
LORA_TABLE = {4: (2_027_520, 1_102_075_904), 16: (8_110_080, 1_108_158_464),
              64: (32_440_320, 1_132_488_704), 256: (129_761_280, 1_229_809_664)}
MAGNITUDES = 22 * (5632 + 5632 + 2048)


@pytest.mark.slow
@pytest.mark.parametrize("rank", sorted(LORA_TABLE))
def test_counts_on_the_real_tinyllama_shape(rank):
    with torch.device("meta"):
        model = Llama(LlamaConfig(), lora_config=LoRAConfig(rank=rank, alpha=rank, use_dora=True))
    trainable, total = LORA_TABLE[rank]
    assert lora.count_parameters(model) == (trainable + MAGNITUDES, total + MAGNITUDES)


def test_fused_mlp_is_refused_and_not_chosen_for_dora(monkeypatch):
    from tinyllama import runtime
    from tinyllama.lora_mlp import fuse_gate_up

    def build(**kwargs):
        torch.manual_seed(0)
        return Llama(LlamaConfig(**TINY), lora_config=LoRAConfig(rank=4, alpha=8, **kwargs))

    assert not fuse_gate_up(build(use_dora=True).model.layers[0].mlp)  # left on the plain path
    with pytest.raises(ValueError, match="--fused-mlp with --dora is not supported"):
        runtime.plan_runtime(LlamaConfig(**TINY), torch.device("cpu"), torch.float32,
                             lora_config=LoRAConfig(rank=4, alpha=8, use_dora=True), fused_mlp=True)
    # The default on CUDA fuses plain LoRA's MLP and leaves DoRA's plain (the kernel check needs a GPU: stubbed).
    monkeypatch.setattr(runtime, "attention_kernels", lambda *args: ("flash", "flash"))
    for use_dora, fused in ((False, True), (True, False)):
        model = build(use_dora=use_dora)
        plan = runtime.plan_runtime(model.config, torch.device("cuda"), torch.bfloat16,
                                    lora_config=model.lora_config, varlen=False)
        runtime.apply_plan(model, plan)
        assert plan.fused_mlp == fused
        assert all((layer.mlp.gate_up_weight is not None) == fused for layer in model.model.layers)


def test_load_adapter_refuses_the_other_kind(tmp_path):
    cfg = LlamaConfig(**TINY)
    lora.save_adapter(Llama(cfg, lora_config=LoRAConfig(rank=4, alpha=4, use_dora=True)), tmp_path / "dora")
    lora.save_adapter(Llama(cfg, lora_config=LoRAConfig(rank=4, alpha=4)), tmp_path / "lora")
    with pytest.raises(ValueError, match="adapter is DoRA .* built with use_dora=False"):
        lora.load_adapter(Llama(cfg, lora_config=LoRAConfig(rank=4, alpha=4)), tmp_path / "dora")
    with pytest.raises(ValueError, match="adapter is plain LoRA .* built with use_dora=True"):
        lora.load_adapter(Llama(cfg, lora_config=LoRAConfig(rank=4, alpha=4, use_dora=True)), tmp_path / "lora")
    with pytest.raises(ValueError, match="use_dora must be True or False"):
        LoRAConfig(rank=4, alpha=4, use_dora="yes")
