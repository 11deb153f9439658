"""LoRA: exact parameter counts, parity with PEFT both ways, merge/export, and what trains."""

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
    peft_lora_model,
    randomize_lora_b,
)
from lora import LoRAConfig
from lora.layer import LoRALinear
from tinyllama import Llama, LlamaConfig, causal_lm_loss, load_model, reference_loss, save_model

transformers = pytest.importorskip("transformers")
peft = LazyModule("peft")

REFERENCE_TABLE = {  # rank: (trainable, total) from the reference table, MLP targets
    4: (2_027_520, 1_102_075_904),
    16: (8_110_080, 1_108_158_464),
    64: (32_440_320, 1_132_488_704),
    256: (129_761_280, 1_229_809_664),
}
REFERENCE_PERCENT = {4: 0.18, 16: 0.73, 64: 2.86, 256: 10.55}


@pytest.mark.slow
@pytest.mark.parametrize("rank", sorted(REFERENCE_TABLE))
def test_counts_on_the_real_tinyllama_shape_match_the_reference_table(rank):
    with torch.device("meta"):
        model = Llama(LlamaConfig(), lora_config=LoRAConfig(rank=rank, alpha=rank))
    trainable, total = lora.count_parameters(model)
    assert (trainable, total) == REFERENCE_TABLE[rank]
    assert round(100 * trainable / total, 2) == REFERENCE_PERCENT[rank]


@pytest.mark.parametrize("kwargs,match", [
    (dict(rank=0, alpha=8), "rank"), (dict(rank=4, alpha=0), "alpha"), (dict(rank=4, alpha=-1), "alpha"),
    (dict(rank=4, alpha=8, targets=("gate_proj", "lm_head")), "lm_head"),
    (dict(rank=4, alpha=8, dropout=1.0), "dropout"), (dict(rank=2.5, alpha=8), "rank"),
    (dict(rank=10**20, alpha=8), r"^LoRA rank must be an integer from 1 to 65536, got 100000000000000000000$"),
    (dict(rank=65537, alpha=8), "rank"), (dict(rank=True, alpha=8), "rank"),
])
def test_invalid_lora_config_is_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LoRAConfig(**kwargs)


CASES = {
    "mlp": LoRAConfig(rank=4, alpha=8, dropout=0.0),
    "attention_gqa": LoRAConfig(rank=3, alpha=5, dropout=0.0, targets=("q_proj", "k_proj", "v_proj", "o_proj")),
    "all_rslora": LoRAConfig(rank=8, alpha=16, dropout=0.0, use_rslora=True,
                             targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")),
}
# Each case's base model: rope_theta other than Llama 2's 10000 where LoRA meets RoPE on q and k (Llama 3 uses
# 500000), so a model that ignored the config's theta could not match PEFT.
BASES = {"attention_gqa": dict(rope_theta=500000.0), "all_rslora": dict(rope_theta=1000.0)}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_adapter_loads_with_same_logits_loss_and_gradients(tmp_path, case):
    config = CASES[case]
    path = hf_checkpoint(tmp_path / "base", **BASES.get(case, {}))
    ref = peft_lora_model(path, config)
    ref.save_pretrained(tmp_path / "adapter")

    ours = load_model(path, lora_config=lora.read_adapter_config(tmp_path / "adapter"))
    lora.load_adapter(ours, tmp_path / "adapter")
    ours.eval()
    assert ours.lora_config.scaling == pytest.approx(config.scaling)

    ids, labels = lm_batch(TINY["vocab_size"])
    out = ref(input_ids=ids, labels=labels)
    out.loss.backward()
    logits = ours(ids)
    assert (logits - out.logits).abs().max().item() <= 1e-4

    loss_sum, n = causal_lm_loss(ours, ids, labels)
    (loss_sum / n).backward()
    ref_sum, ref_n = reference_loss(out.logits, labels)
    assert n == ref_n
    assert (loss_sum / n).item() == pytest.approx(out.loss.item(), abs=1e-5)
    assert (ref_sum / ref_n).item() == pytest.approx(out.loss.item(), abs=1e-5)

    compared = compare_gradients(ref, ours, 1e-4)
    per_layer = len(config.targets) * 2
    assert compared == per_layer * TINY["num_hidden_layers"]


@pytest.mark.parametrize("case", ["mlp", "all_rslora"])
def test_our_adapter_loads_in_peft_with_same_logits(tmp_path, case):
    config = CASES[case]
    path = hf_checkpoint(tmp_path / "base", **BASES.get(case, {}))
    ours = randomize_lora_b(load_model(path, lora_config=config).eval(), std=0.1, seed=5)
    lora.save_adapter(ours, tmp_path / "adapter", base_model=str(path))
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and saved["task_type"] == "CAUSAL_LM" and saved["r"] == config.rank

    ref = peft.PeftModel.from_pretrained(hf_model(path), tmp_path / "adapter").eval()
    ids, _ = lm_batch(TINY["vocab_size"])
    with torch.no_grad():
        assert (ours(ids) - ref(input_ids=ids).logits).abs().max().item() <= 1e-4
        assert (ours(ids) - load_model(path)(ids)).abs().max().item() > 1e-3, "adapter had no effect"


def test_adapter_keys_and_shapes_are_pefts(tmp_path):
    from safetensors.torch import load_file
    cfg = LlamaConfig(**TINY)
    model = Llama(cfg, lora_config=LoRAConfig(rank=4, alpha=4))
    lora.save_adapter(model, tmp_path)
    sd = load_file(tmp_path / "adapter_model.safetensors")
    assert len(sd) == 3 * 2 * cfg.num_hidden_layers
    assert sd["base_model.model.model.layers.1.mlp.gate_proj.lora_A.weight"].shape == (4, cfg.hidden_size)
    assert sd["base_model.model.model.layers.1.mlp.gate_proj.lora_B.weight"].shape == (cfg.intermediate_size, 4)
    assert sd["base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"].shape == (4, cfg.intermediate_size)


def test_fresh_adapter_leaves_logits_bit_identical(hf_tiny):
    base = load_model(hf_tiny).eval()
    with_lora = load_model(hf_tiny, lora_config=LoRAConfig(rank=8, alpha=16)).eval()
    assert all(m.lora_A.weight.abs().sum() > 0 for m in lora.lora_layers(with_lora).values())
    ids, _ = lm_batch(TINY["vocab_size"])
    with torch.no_grad():
        assert torch.equal(base(ids), with_lora(ids))


def test_merge_then_export_reloads_in_transformers(tmp_path, hf_tiny):
    model = load_model(hf_tiny, lora_config=LoRAConfig(rank=4, alpha=8, targets=("q_proj", "v_proj", "up_proj"))).eval()
    randomize_lora_b(model, std=0.1)
    ids, _ = lm_batch(TINY["vocab_size"])
    with torch.no_grad():
        before = model(ids)
        assert (before - load_model(hf_tiny)(ids)).abs().max() > 1e-3, "adapter had no effect"
        with pytest.raises(ValueError, match="not merged"):
            save_model(model, tmp_path / "unmerged")
        lora.merge(model)
        after = model(ids)
    assert (before - after).abs().max().item() <= 1e-4
    save_model(model, tmp_path / "merged")
    hf = hf_model(tmp_path / "merged")
    with torch.no_grad():
        assert (hf(ids).logits - before).abs().max().item() <= 1e-4
        assert torch.equal(load_model(tmp_path / "merged")(ids), after)


def test_only_lora_trains_and_base_is_unchanged(hf_tiny):
    model = load_model(hf_tiny, lora_config=LoRAConfig(rank=4, alpha=8, dropout=0.1)).train()
    base_before = {k: v.clone() for k, v in model.state_dict().items() if ".lora_" not in k}
    lora_before = {k: v.clone() for k, v in model.state_dict().items() if ".lora_" in k}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids, labels = lm_batch(TINY["vocab_size"])
    loss, n = causal_lm_loss(model, ids, labels)
    (loss / n).backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == (".lora_" in name), name
    opt.step()
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in base_before.items())
    assert all(not torch.equal(v, after[k]) for k, v in lora_before.items() if "lora_B" in k)


def test_load_adapter_refuses_mismatches(tmp_path):
    cfg = LlamaConfig(**TINY)
    lora.save_adapter(Llama(cfg, lora_config=LoRAConfig(rank=4, alpha=4)), tmp_path / "r4")
    with pytest.raises(ValueError, match="rank r=4 but the model was built with rank 8"):
        lora.load_adapter(Llama(cfg, lora_config=LoRAConfig(rank=8, alpha=4)), tmp_path / "r4")
    with pytest.raises(ValueError, match="targets"):
        lora.load_adapter(Llama(cfg, lora_config=LoRAConfig(rank=4, alpha=4, targets=("q_proj",))), tmp_path / "r4")
    with pytest.raises(ValueError, match="shape mismatches.*gate_proj"):
        lora.load_adapter(Llama(LlamaConfig(**{**TINY, "intermediate_size": 80}),
                                lora_config=LoRAConfig(rank=4, alpha=4)), tmp_path / "r4")
    with pytest.raises(ValueError, match="no LoRA layers"):
        lora.load_adapter(Llama(cfg), tmp_path / "r4")
    c = json.loads((tmp_path / "r4" / "adapter_config.json").read_text())
    (tmp_path / "r4" / "adapter_config.json").write_text(json.dumps({**c, "bias": "all"}))
    with pytest.raises(ValueError, match="bias='all' is not supported"):
        lora.read_adapter_config(tmp_path / "r4")


def test_disabled_context_gives_the_base_model_back(hf_tiny):
    base = load_model(hf_tiny).eval()
    model = randomize_lora_b(load_model(hf_tiny, lora_config=LoRAConfig(rank=4, alpha=8)).eval(), std=0.1)
    with torch.no_grad():
        ids, _ = lm_batch(TINY["vocab_size"])
        adapted = model(ids)
        with lora.disabled(model):
            assert torch.equal(model(ids), base(ids))
        assert torch.equal(model(ids), adapted)
        assert (adapted - base(ids)).abs().max() > 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_in_place_b_product_equals_the_plain_expression(dtype):
    # LoRALinear.forward (B accumulated into the base output with addmm_) against `reference`; bf16 under
    # autocast, as training runs it. Same dropout mask for both (same seed), so outputs and gradients match.
    torch.manual_seed(0)
    layer = randomize_lora_b(LoRALinear(24, 40, LoRAConfig(rank=4, alpha=8, dropout=0.1)), std=0.2)
    layer.weight.data = layer.weight.data.to(dtype)
    x = torch.randn(3, 5, 24, dtype=dtype, requires_grad=True)
    results = forward_and_reference(layer, x, seed=1, autocast=dtype == torch.bfloat16)
    assert len(results[0]) == 4  # output, x, A and B
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    assert results[0][0].dtype == results[1][0].dtype
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, **tol)


def test_dropout_drops_only_the_adapters_input_in_train_mode():
    # W x + s * B(A(dropout(x))), written out, with the mask LoRALinear drew drawn again (same seed, same
    # number of draws): dropout belongs on the adapter's input alone, not on A's output, B's output, or the base
    # path. In eval mode there is no dropout at all.
    p = 0.3
    torch.manual_seed(0)
    layer = randomize_lora_b(LoRALinear(24, 40, LoRAConfig(rank=4, alpha=8, dropout=p)), std=0.2).train()
    x = torch.randn(3, 5, 24)
    torch.manual_seed(1)
    y = layer(x)
    torch.manual_seed(1)
    keep = torch.nn.functional.dropout(torch.ones_like(x), p)  # 0 or 1 / (1 - p): dropout(x) == x * keep
    assert keep.unique().tolist() == pytest.approx([0.0, 1 / (1 - p)]) and 0.5 < keep.bool().float().mean() < 0.9

    def by_hand(dropped):
        return x @ layer.weight.t() + layer.scaling * (dropped @ layer.lora_A.weight.t()) @ layer.lora_B.weight.t()

    with torch.no_grad():
        torch.testing.assert_close(y, by_hand(x * keep), rtol=1e-5, atol=1e-6)
        assert (y - by_hand(x)).abs().max() > 1e-2, "the mask changed nothing: the test would not see its place"
        torch.testing.assert_close(layer.eval()(x), by_hand(x), rtol=1e-5, atol=1e-6)
