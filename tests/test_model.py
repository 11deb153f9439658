"""The model against `transformers.LlamaForCausalLM` (float32, CPU, random small configs), plus loading."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from helpers import TINY, hf_checkpoint, hf_model, randomize_lora_b
from tinyllama import Llama, LlamaConfig, load_model
from tinyllama.model import RMSNorm, num_parameters
from tinyllama.runtime import RuntimePlan

transformers = pytest.importorskip("transformers")

CONFIGS = {
    "gqa": {},
    "mha": dict(num_key_value_heads=4),
    "mqa_tied": dict(num_key_value_heads=1, tie_word_embeddings=True),
    "odd_sizes": dict(vocab_size=97, hidden_size=48, intermediate_size=77, num_attention_heads=6,
                      num_key_value_heads=3, num_hidden_layers=3, rope_theta=1e6),
    "rope_eps": dict(rope_theta=500.0, rms_norm_eps=1e-3),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_match_transformers(tmp_path, name):
    path = hf_checkpoint(tmp_path / name, seed=1, **CONFIGS[name])
    ours, ref = load_model(path), hf_model(path)
    ids = torch.randint(0, ours.config.vocab_size, (2, 23))
    with torch.no_grad():
        diff = (ours(ids) - ref(ids).logits).abs().max().item()
    assert diff <= 1e-4, f"{name}: max |logits diff| = {diff}"


def test_bfloat16_logits_match_transformers_to_a_fraction_of_a_rounding(tmp_path, monkeypatch):
    # Both models in bfloat16 on the CPU, transformers through SDPA as ours: the same operations in the same
    # dtypes give the same bits, so the logits must agree elementwise within bf16's tolerance and, on average,
    # to a small fraction of one bf16 rounding (2**-8 relative). The average is what catches a step done in
    # another dtype, such as RMSNorm's weight applied before the cast back to bf16 instead of after it (as HF
    # does): that moves most logits by one rounding, well within any elementwise bf16 tolerance.
    path = hf_checkpoint(tmp_path / "m", seed=1, hidden_size=256, intermediate_size=512, num_attention_heads=8,
                         vocab_size=1024)
    ours = load_model(path, dtype=torch.bfloat16).eval()
    ref = hf_model(path, attn_implementation="sdpa", dtype=torch.bfloat16)
    assert ref.dtype == ours.lm_head.weight.dtype == torch.bfloat16
    ids = torch.randint(0, 1024, (2, 23), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ref(ids).logits.float()
        got = ours(ids).float()

    def mean_error(logits):
        return ((logits - expected).abs().mean() / expected.abs().mean()).item()

    bound = 1e-3  # mean |difference| / mean |logit|; one bf16 rounding of every logit is about 2e-3 to 4e-3
    torch.testing.assert_close(got, expected, rtol=1.6e-2, atol=1e-2)  # torch's own bf16 tolerance
    assert mean_error(got) <= bound
    # The negative control: RMSNorm with its weight applied in float32, before the cast, misses the bound.
    monkeypatch.setattr(RMSNorm, "forward", lambda self, x: F.rms_norm(
        x.float(), (x.shape[-1],), weight=self.weight.float(), eps=self.eps).to(x.dtype))
    with torch.no_grad():
        assert mean_error(ours(ids).float()) > 3 * bound


@pytest.mark.parametrize("kv_heads", [1, 2])
def test_grouped_kv_read_in_place_equals_repeated(kv_heads, monkeypatch):
    # RuntimePlan.gqa_in_place (SDPA's enable_gqa) against the plain path that repeats k/v: outputs and grads.
    from lora import LoRAConfig

    seen = []  # k/v heads each SDPA call received: the in-place path must really hand over the grouped ones
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda q, k, v, **kw: seen.append(k.shape[1]) or sdpa(q, k, v, **kw))

    torch.manual_seed(0)
    model = Llama(LlamaConfig(**{**TINY, "num_key_value_heads": kv_heads}),
                  lora_config=LoRAConfig(4, 8, dropout=0.0, targets=("q_proj", "v_proj", "down_proj")))
    randomize_lora_b(model, std=0.1)
    ids = torch.randint(0, TINY["vocab_size"], (2, 19))
    results = []
    for native in (True, False):
        model.zero_grad()
        seen.clear()
        out = model(ids, plan=RuntimePlan(gqa_in_place=native))
        assert seen == [kv_heads if native else TINY["num_attention_heads"]] * TINY["num_hidden_layers"]
        out.square().mean().backward()
        results.append((out.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}))
    (a, ga), (b, gb) = results
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert ga.keys() == gb.keys() and len(ga) == 2 * 3 * TINY["num_hidden_layers"]
    for k in ga:
        torch.testing.assert_close(ga[k], gb[k], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_equals_the_spelled_out_reference(dtype):
    torch.manual_seed(0)
    norm = RMSNorm(64, 1e-5)
    norm.weight.data = (torch.rand(64) + 0.5).to(dtype)
    x = (3 * torch.randn(4, 7, 64)).to(dtype).requires_grad_()
    out = norm(x)
    grad = torch.autograd.grad(out.float().square().sum(), x)[0]
    ref = norm.reference(x)
    ref_grad = torch.autograd.grad(ref.float().square().sum(), x)[0]
    assert out.dtype == ref.dtype == dtype
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(out, ref, **tol)
    torch.testing.assert_close(grad, ref_grad, **tol)


def test_padding_mask_and_position_ids_match_transformers(hf_tiny):
    ours, ref = load_model(hf_tiny), hf_model(hf_tiny)
    ids = torch.randint(0, TINY["vocab_size"], (3, 17))
    mask = torch.ones(3, 17, dtype=torch.long)
    mask[1, :5] = 0   # left padding
    mask[2, 11:] = 0  # right padding
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        a = ours(ids, attention_mask=mask, position_ids=pos)
        b = ref(ids, attention_mask=mask, position_ids=pos).logits
    real = mask.bool()
    assert (a[real] - b[real]).abs().max().item() <= 1e-4
    assert torch.isfinite(a).all(), "padding rows must not produce NaN"
    # A left-padded row equals the same tokens run alone.
    with torch.no_grad():
        alone = ours(ids[1:2, 5:])
    assert (a[1, 5:] - alone[0]).abs().max().item() <= 1e-4


def test_explicit_position_ids_match_transformers(hf_tiny):
    ours, ref = load_model(hf_tiny), hf_model(hf_tiny)
    ids = torch.randint(0, TINY["vocab_size"], (2, 9))
    pos = torch.tensor([[3, 4, 5, 6, 7, 8, 9, 10, 11], [0, 2, 4, 6, 8, 10, 12, 14, 16]])
    with torch.no_grad():
        diff = (ours(ids, position_ids=pos) - ref(ids, position_ids=pos).logits).abs().max().item()
        shifted = (ours(ids, position_ids=pos) - ours(ids)).abs().max().item()
    assert diff <= 1e-4
    assert shifted > 1e-3, "position_ids had no effect"


def test_sharded_checkpoint_gives_same_logits(tmp_path):
    path = hf_checkpoint(tmp_path / "one")
    ref = hf_model(path)
    ref.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    shards = list((tmp_path / "sharded").glob("*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    ids = torch.randint(0, TINY["vocab_size"], (1, 11))
    with torch.no_grad():
        assert torch.equal(load_model(tmp_path / "sharded")(ids), load_model(path)(ids))


def test_bf16_load_keeps_dtype_and_is_close(hf_tiny):
    ours32, ours16 = load_model(hf_tiny), load_model(hf_tiny, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in ours16.parameters())
    ids = torch.randint(0, TINY["vocab_size"], (1, 8))
    with torch.no_grad():
        assert (ours16(ids).float() - ours32(ids)).abs().max().item() < 0.1


def test_tinyllama_shape_has_exactly_1_100_048_384_parameters():
    # TinyLlama/TinyLlama_v1.1 config.json, as published (written here so nothing is downloaded).
    real = {"architectures": ["LlamaForCausalLM"], "attention_bias": False, "bos_token_id": 1,
            "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02,
            "intermediate_size": 5632, "max_position_embeddings": 2048, "model_type": "llama",
            "num_attention_heads": 32, "num_hidden_layers": 22, "num_key_value_heads": 4,
            "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": None, "rope_theta": 10000.0,
            "tie_word_embeddings": False, "torch_dtype": "float32", "transformers_version": "4.31.0.dev0",
            "use_cache": True, "vocab_size": 32000}
    config = LlamaConfig.from_dict(real)
    assert num_parameters(config) == 1_100_048_384
    with torch.device("meta"):
        model = Llama(config)
    assert model.lm_head.weight.is_meta
    names = dict(model.named_parameters())
    for key in ["model.embed_tokens.weight", "model.layers.21.self_attn.q_proj.weight",
                "model.layers.0.self_attn.k_proj.weight", "model.layers.0.mlp.gate_proj.weight",
                "model.norm.weight", "lm_head.weight"]:
        assert key in names
    assert names["model.layers.0.self_attn.k_proj.weight"].shape == (256, 2048)  # 4 KV heads x 64


# ---- errors a user will hit -------------------------------------------------------------------------

def _edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("field,value", [("hidden_act", "gelu"), ("attention_dropout", 0.1),
                                         ("rope_scaling", {"type": "yarn", "factor": 2.0}),
                                         ("mlp_bias", True)])
def test_unsupported_config_fields_are_refused_by_name(hf_tiny, field, value):
    _edit_config(hf_tiny, **{field: value})
    with pytest.raises(ValueError, match=field):
        load_model(hf_tiny)


def test_unsupported_rope_type_is_refused(hf_tiny):
    _edit_config(hf_tiny, rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 8.0})
    with pytest.raises(ValueError, match="rope_type"):
        load_model(hf_tiny)


def test_unknown_config_field_is_reported(hf_tiny):
    _edit_config(hf_tiny, sliding_window=128)
    with pytest.warns(UserWarning, match="sliding_window"):
        load_model(hf_tiny)


def test_bin_only_checkpoint_is_refused(hf_tiny):
    (hf_tiny / "model.safetensors").unlink()
    (hf_tiny / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"no \*\.safetensors.*pytorch_model\.bin"):
        load_model(hf_tiny)


def test_missing_and_unexpected_keys_are_listed(hf_tiny):
    from safetensors.torch import load_file, save_file
    sd = load_file(hf_tiny / "model.safetensors")
    del sd["model.layers.1.mlp.up_proj.weight"]
    sd["model.layers.1.mlp.extra.weight"] = torch.zeros(2)
    save_file(sd, hf_tiny / "model.safetensors")
    with pytest.raises(ValueError) as e:
        load_model(hf_tiny)
    assert "model.layers.1.mlp.up_proj.weight" in str(e.value)
    assert "model.layers.1.mlp.extra.weight" in str(e.value)


def test_shape_mismatch_names_tensor_and_shapes(hf_tiny):
    _edit_config(hf_tiny, intermediate_size=100)
    with pytest.raises(ValueError, match=r"mlp\.gate_proj\.weight: checkpoint \(96, 64\) vs model \(100, 64\)"):
        load_model(hf_tiny)


def test_unreachable_repo_id_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    import huggingface_hub.constants as c
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True, raising=False)
    with pytest.raises(RuntimeError, match="could not get 'TinyLlama/TinyLlama_v1.1'.*local folder"):
        load_model("TinyLlama/TinyLlama_v1.1")


def test_not_a_folder_nor_repo_id(monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: pytest.fail("went to the Hub"))
    for spec in ("no/such/folder/here", "~/models", "./missing/model"):  # a missing path is never a repo id
        with pytest.raises(FileNotFoundError, match="neither an existing folder nor a Hub repo id"):
            load_model(spec)
    import train

    with pytest.raises(SystemExit, match="--model '~/models' is neither a checkpoint folder nor a Hub repo id"):
        train.validate(train.TrainConfig(model="~/models"))  # the same rule (tinyllama.checkpoint.is_hub_id)


def test_config_dataclass_rejects_bad_gqa():
    with pytest.raises(ValueError, match="multiple of num_key_value_heads"):
        LlamaConfig(**{**TINY, "num_key_value_heads": 3})
