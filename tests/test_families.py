"""The newer members of the Llama family: Llama 3.x (llama3 RoPE scaling, tied embeddings), linear RoPE scaling,
Mistral (no sliding window, or sequences within it) and Llama 2 without grouped heads.

Parity with transformers (RoPE frequencies, logits, greedy generation, checkpoints we save) and with PEFT (LoRA
gradients); the published parameter counts of real configs; refusals that name what they refuse."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from safetensors import safe_open

import lora
from helpers import (
    TINY,
    LazyModule,
    hf_checkpoint,
    hf_greedy,
    hf_model,
    lm_batch,
    our_name,
    peft_lora_model,
    randomize_lora_b,
)
from lora import LoRAConfig
from tinyllama import LlamaConfig, causal_lm_loss, generate, generate_batch, load_model, save_model
from tinyllama.model import num_parameters, rope_cos_sin, rope_inv_freq

transformers = pytest.importorskip("transformers")
peft = LazyModule("peft")

# Llama 3's scaling with a short original context, so the tiny model's sequences run well beyond it.
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
FAMILIES = {  # hf_checkpoint overrides of the house tiny config (max_position_embeddings 256)
    "llama3_tied": dict(rope_scaling=LLAMA3_ROPE, rope_theta=500000.0, tie_word_embeddings=True),
    "linear": dict(rope_scaling={"type": "linear", "factor": 4.0}, rope_theta=1000.0),  # the pre-5 spelling
    "mistral": dict(model_type="mistral", sliding_window=None, rope_theta=1e6),
    "llama2_mha": dict(num_key_value_heads=TINY["num_attention_heads"]),
}
SEQ = 100  # tokens per row: beyond LLAMA3_ROPE's original 64 positions


def _family(name) -> dict:
    """A copy of FAMILIES[name]: transformers writes rope_theta into the rope dict it is given."""
    return copy.deepcopy(FAMILIES[name])


def _hf_config(name) -> transformers.PreTrainedConfig:
    over = _family(name)
    return transformers.AutoConfig.for_model(over.pop("model_type", "llama"), **{**TINY, **over})


def _config_json(name) -> dict:
    """The config.json transformers writes for the family's tiny config."""
    return json.loads(_hf_config(name).to_json_string())


def _rope_parameters(config) -> dict:
    """A transformers config's RoPE settings, without the legacy duplicate "type" key."""
    return {k: v for k, v in config.rope_parameters.items() if k != "type"}


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_inverse_frequencies_and_cos_sin_equal_transformers_bit_for_bit(name):
    hf_config = _hf_config(name)
    ours = LlamaConfig.from_dict(_config_json(name))
    rotary = transformers.AutoModelForCausalLM.from_config(hf_config).model.rotary_emb
    torch.testing.assert_close(rope_inv_freq(ours), rotary.inv_freq, rtol=0, atol=0)

    positions = torch.arange(300)[None]
    cos, sin = rope_cos_sin(ours, positions, torch.float32)
    ref_cos, ref_sin = rotary(torch.zeros(1, dtype=torch.float32), positions)
    torch.testing.assert_close(cos, ref_cos, rtol=0, atol=0)
    torch.testing.assert_close(sin, ref_sin, rtol=0, atol=0)


def test_llama3_test_config_exercises_all_three_bands():
    # The parity tests above mean something for llama3 only if some frequencies are kept, some stretched by the
    # factor and some interpolated: count each band from the unscaled wavelengths.
    config = LlamaConfig.from_dict(_config_json("llama3_tied"))
    plain = rope_inv_freq(LlamaConfig(**{**TINY, "rope_theta": config.rope_theta}))
    wavelen = 2 * torch.pi / plain
    original = LLAMA3_ROPE["original_max_position_embeddings"]
    kept = wavelen < original / LLAMA3_ROPE["high_freq_factor"]
    stretched = wavelen > original / LLAMA3_ROPE["low_freq_factor"]
    assert kept.sum() >= 1 and stretched.sum() >= 1 and (~kept & ~stretched).sum() >= 1
    scaled = rope_inv_freq(config)
    torch.testing.assert_close(scaled[kept], plain[kept], rtol=0, atol=0)
    torch.testing.assert_close(scaled[stretched], plain[stretched] / LLAMA3_ROPE["factor"])


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_logits_match_transformers(tmp_path, name):
    path = hf_checkpoint(tmp_path / name, seed=1, **_family(name))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a transformers-written config of each family reads without complaint
        ours = load_model(path)
    ref = hf_model(path)
    assert type(ref).__name__ == ("MistralForCausalLM" if name == "mistral" else "LlamaForCausalLM")
    ids = torch.randint(0, TINY["vocab_size"], (2, SEQ), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), ref(ids).logits, rtol=0, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_lora_gradients_equal_pefts(tmp_path, name):
    config = LoRAConfig(rank=4, alpha=8, dropout=0.0, targets=lora.ALL_TARGETS)
    path = hf_checkpoint(tmp_path / "base", seed=2, **_family(name))
    ref = peft_lora_model(path, config)  # random non-zero A and B
    ref.save_pretrained(tmp_path / "adapter")
    ours = load_model(path, lora_config=lora.read_adapter_config(tmp_path / "adapter"))
    lora.load_adapter(ours, tmp_path / "adapter")
    ours.eval()

    ids, labels = lm_batch(TINY["vocab_size"], T=SEQ)
    out = ref(input_ids=ids, labels=labels)
    out.loss.backward()
    loss_sum, n = causal_lm_loss(ours, ids, labels)
    (loss_sum / n).backward()
    assert (loss_sum / n).item() == pytest.approx(out.loss.item(), abs=1e-5)

    ours_params = dict(ours.named_parameters())
    compared = 0
    for peft_name, p in ref.named_parameters():
        if "lora_" in peft_name:
            torch.testing.assert_close(ours_params[our_name(peft_name)].grad, p.grad, rtol=1e-4, atol=1e-6)
            compared += 1
    assert compared == 2 * len(config.targets) * TINY["num_hidden_layers"]


@pytest.mark.slow
def test_greedy_generation_beyond_the_original_context_equals_transformers(tmp_path):
    # KV-cache decoding at positions 50..89 with llama3 scaling (original context 64): the cache's positions and
    # the scaled frequencies must agree with transformers' generate, one prompt at a time and left-padded.
    ref = hf_model(hf_checkpoint(tmp_path / "llama3", seed=4, **_family("llama3_tied")))
    with torch.no_grad():  # at HF's initial scale, greedy decoding just repeats a token whatever the positions
        for name, p in ref.named_parameters():
            if name.endswith("proj.weight"):
                p.mul_(8.0)
    ref.save_pretrained(tmp_path / "sharp")
    ours = load_model(tmp_path / "sharp").eval()
    g = torch.Generator().manual_seed(5)
    prompts = [[1] + torch.randint(3, TINY["vocab_size"], (n,), generator=g).tolist() for n in (49, 30)]
    expected = [hf_greedy(ref, p, 40) for p in prompts]
    assert all(len(e) == 40 and len(set(e)) >= 10 for e in expected), "a degenerate or stopped reference"
    assert [generate(ours, p, 40) for p in prompts] == expected
    assert generate_batch(ours, prompts, 40) == expected


@pytest.mark.parametrize("name", ["llama3_tied", "mistral"])
def test_merged_lora_saves_a_checkpoint_transformers_reads_with_equal_logits(tmp_path, name):
    path = hf_checkpoint(tmp_path / "base", seed=6, **_family(name))
    ours = load_model(path, lora_config=LoRAConfig(rank=4, alpha=8, dropout=0.0, targets=lora.ALL_TARGETS)).eval()
    randomize_lora_b(ours, std=0.1, seed=7)
    lora.merge(ours)
    out = save_model(ours, tmp_path / "merged")

    def keys(folder):
        with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
            return set(f.keys())
    assert keys(out) == keys(path)  # tied: one tensor on disk, no lm_head.weight, as transformers writes
    assert ("lm_head.weight" in keys(out)) == (name == "mistral")

    ref, original = hf_model(out), hf_model(path)
    assert type(ref) is type(original)
    assert _rope_parameters(ref.config) == _rope_parameters(original.config)
    assert ref.config.tie_word_embeddings == (name == "llama3_tied")
    ids = torch.randint(0, TINY["vocab_size"], (2, SEQ), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        merged = ours(ids)
        torch.testing.assert_close(ref(ids).logits, merged, rtol=0, atol=1e-4)
        torch.testing.assert_close(load_model(out)(ids), merged, rtol=0, atol=1e-5)
        assert (merged - load_model(path)(ids)).abs().max() > 1e-3, "the adapter had no effect"


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_config_round_trips_through_transformers(name):
    hf_config = _hf_config(name)
    ours = LlamaConfig.from_dict(_config_json(name))
    written = ours.to_hf_dict()
    back = transformers.AutoConfig.for_model(**written)  # what transformers makes of the config.json we write
    assert type(back) is type(hf_config)
    assert _rope_parameters(back) == _rope_parameters(hf_config)
    for key in ("sliding_window", "tie_word_embeddings", "num_key_value_heads", "head_dim"):
        assert getattr(back, key, None) == getattr(hf_config, key, None), key
    assert LlamaConfig.from_dict(json.loads(json.dumps(written))) == ours
    assert ours.rope_scaling is None or written["rope_scaling"] is not ours.rope_scaling  # a copy


def test_rope_parameters_and_legacy_rope_scaling_read_the_same():
    base = {**TINY, "model_type": "llama"}
    new = LlamaConfig.from_dict({**base, "rope_parameters": {**LLAMA3_ROPE, "rope_theta": 5e5}})
    legacy = LlamaConfig.from_dict({**base, "rope_theta": 5e5, "rope_scaling": {**LLAMA3_ROPE}})
    legacy_type = LlamaConfig.from_dict({**base, "rope_theta": 5e5, "rope_scaling": {
        **{k: v for k, v in LLAMA3_ROPE.items() if k != "rope_type"}, "type": "llama3"}})
    assert new == legacy == legacy_type
    assert new.rope_theta == 5e5 and new.rope_scaling == LLAMA3_ROPE


# Published config.json files (the keys that describe the model), written here so nothing is downloaded, with
# the parameter totals of their published safetensors.
LLAMA_3_2_1B = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 128000, "eos_token_id": 128001, "head_dim": 64, "hidden_act": "silu", "hidden_size": 2048,
    "initializer_range": 0.02, "intermediate_size": 8192, "max_position_embeddings": 131072, "mlp_bias": False,
    "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 16, "num_key_value_heads": 8,
    "pretraining_tp": 1, "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
    "transformers_version": "4.45.0.dev0", "use_cache": True, "vocab_size": 128256}
LLAMA_3_1_8B_INSTRUCT = {
    **LLAMA_3_2_1B, "eos_token_id": [128001, 128008, 128009], "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 32, "tie_word_embeddings": False, "transformers_version": "4.43.0.dev0",
    "rope_scaling": {**LLAMA_3_2_1B["rope_scaling"], "factor": 8.0}}
del LLAMA_3_1_8B_INSTRUCT["head_dim"]
SMOLLM2_135M = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 0,
    "eos_token_id": 0, "hidden_act": "silu", "hidden_size": 576, "initializer_range": 0.041666666666666664,
    "intermediate_size": 1536, "is_llama_config": True, "max_position_embeddings": 8192, "mlp_bias": False,
    "model_type": "llama", "num_attention_heads": 9, "num_hidden_layers": 30, "num_key_value_heads": 3,
    "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_interleaved": False, "rope_scaling": None,
    "rope_theta": 100000, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
    "transformers.js_config": {"kv_cache_dtype": {"q4f16": "float16", "fp16": "float16"}},
    "transformers_version": "4.42.3", "use_cache": True, "vocab_size": 49152}
MISTRAL_7B_V0_3 = {
    "architectures": ["MistralForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2,
    "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336,
    "max_position_embeddings": 32768, "model_type": "mistral", "num_attention_heads": 32, "num_hidden_layers": 32,
    "num_key_value_heads": 8, "rms_norm_eps": 1e-05, "rope_theta": 1000000.0, "sliding_window": None,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.42.0.dev0",
    "use_cache": True, "vocab_size": 32768}
PUBLISHED = {"Llama-3.2-1B": (LLAMA_3_2_1B, 1_235_814_400), "Llama-3.1-8B-Instruct": (LLAMA_3_1_8B_INSTRUCT,
             8_030_261_248), "SmolLM2-135M": (SMOLLM2_135M, 134_515_008), "Mistral-7B-v0.3": (MISTRAL_7B_V0_3,
             7_248_023_552)}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_configs_read_silently_with_their_published_parameter_counts(name):
    published, count = PUBLISHED[name]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        config = LlamaConfig.from_dict(published)
    assert num_parameters(config) == count  # tied embeddings counted once
    reference = transformers.AutoConfig.for_model(**published)
    assert config.eos_token_id == reference.eos_token_id  # every end token of Llama 3 Instruct kept
    assert _rope_parameters(transformers.AutoConfig.for_model(**config.to_hf_dict())) == _rope_parameters(reference)


def test_missing_num_key_value_heads_means_one_per_query_head_as_in_transformers():
    published = {k: v for k, v in SMOLLM2_135M.items() if k != "num_key_value_heads"}
    assert (LlamaConfig.from_dict(published).num_key_value_heads
            == transformers.LlamaConfig(**published).num_key_value_heads)


def test_mistral_without_a_sliding_window_key_gets_transformers_default():
    published = {k: v for k, v in MISTRAL_7B_V0_3.items() if k != "sliding_window"}
    assert LlamaConfig.from_dict(published).sliding_window == transformers.MistralConfig(**published).sliding_window


def test_mistral_sliding_window_is_computed_beyond_the_window_as_transformers_does(tmp_path):
    window = 16
    path = hf_checkpoint(tmp_path / "mistral", seed=9, model_type="mistral", sliding_window=window)
    ours, ref = load_model(path).eval(), hf_model(path)
    assert ours.config.sliding_window == window
    ids = torch.randint(0, TINY["vocab_size"], (2, window + 8), generator=torch.Generator().manual_seed(10))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), ref(ids).logits, rtol=0, atol=1e-4)
        # Beyond the window transformers' attention differs from plain causal attention: the window matters here.
        full = hf_model(path)
        full.config.sliding_window = None
        assert (ref(ids).logits - full(ids).logits).abs().max() > 1e-3
    # Cached decoding past the window: each new token sees the last `window` keys only.
    prompt = ids[0, :6].tolist()
    assert generate(ours, prompt, 2 * window, eos_id=[]) == hf_greedy(ref, prompt, 2 * window, eos=-1)
    assert ours.config.context_length == ours.config.max_position_embeddings


@pytest.mark.parametrize("rope_type", ["yarn", "dynamic", "ntk"])
@pytest.mark.parametrize("key", ["rope_parameters", "rope_scaling"])
def test_other_rope_types_are_refused_by_name(rope_type, key):
    rope = {"rope_type": rope_type, "factor": 4.0, "original_max_position_embeddings": 64}
    with pytest.raises(ValueError, match=f"{key} has rope_type '{rope_type}', which is not supported"):
        LlamaConfig.from_dict({**TINY, key: rope})
    with pytest.raises(ValueError, match=f"rope_type '{rope_type}'"):
        LlamaConfig(**TINY, rope_scaling=rope)


def test_incomplete_llama3_scaling_names_the_missing_parameter():
    rope = {k: v for k, v in LLAMA3_ROPE.items() if k != "low_freq_factor"}
    with pytest.raises(ValueError, match="missing.*low_freq_factor"):
        LlamaConfig.from_dict({**TINY, "rope_scaling": rope})
    with pytest.raises(ValueError, match="missing.*low_freq_factor"):
        LlamaConfig(**TINY, rope_scaling=rope)


def test_other_model_types_and_a_llama_sliding_window_are_refused():
    with pytest.raises(ValueError, match="model_type is 'gpt2'"):
        LlamaConfig.from_dict({**TINY, "model_type": "gpt2"})
    with pytest.raises(ValueError, match="sliding_window=8: LlamaForCausalLM has no sliding window"):
        LlamaConfig(**TINY, sliding_window=8)


@pytest.mark.parametrize("key, value, expected", [
    ("hidden_size", -32, "a positive integer"), ("hidden_size", "32", "a positive integer"),
    ("hidden_size", 32.5, "a positive integer"), ("hidden_size", 32.0, "a positive integer"),
    ("num_hidden_layers", True, "a positive integer"), ("num_key_value_heads", 0, "a positive integer"),
    ("vocab_size", None, "a positive integer"), ("max_position_embeddings", 1e3, "a positive integer"),
    ("head_dim", -8, "a positive integer or null"), ("eos_token_id", [2, "x"], "a token id"),
    ("bos_token_id", -1, "a token id"), ("rms_norm_eps", "1e-5", "a positive number"),
])
def test_every_size_in_config_json_is_checked_for_type_and_sign_naming_key_and_file(key, value, expected, tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    config = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64, key: value}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError) as e:
        load_model(folder)
    assert str(e.value).startswith(f"{folder / 'config.json'}: {key} is {value!r}; expected {expected}")
