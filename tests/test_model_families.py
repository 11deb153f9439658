"""Qwen 2.5 and 3, Gemma 2 and 3 (text), Phi-3: each computed as transformers computes it.

Tiny random models built by transformers' own config classes, with odd widths, an explicit head_dim where the
family has one, and a sliding window shorter than the sequences: fp32 logits on padded batches, packed rows and
cached decoding; PEFT adapters on every attention and MLP projection loaded both ways, with PEFT's gradients;
Gemma's bf16 rounding (the embedding scale, the norm's single cast); the final softcap inside the chunked loss;
config.json read with each family's defaults, and what is refused."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from test_dora import _peft_config, _perturb

import lora
from helpers import (
    LazyModule,
    compare_gradients,
    hf_checkpoint,
    hf_greedy,
    hf_model,
    lm_batch,
    our_name,
    peft_lora_model,
)
from lora import LoRAConfig
from tinyllama import LlamaConfig, causal_lm_loss, generate, load_model, reference_loss
from tinyllama.config import FAMILIES, FULL, SLIDING
from tinyllama.model import KVCache, Llama, longrope_attention_factor, rope_inv_freq
from tinyllama.runtime import RuntimePlan, plan_runtime

transformers = pytest.importorskip("transformers")
peft = LazyModule("peft")

WINDOW = 8
SEQ = 21  # tokens per row: well past the window
VOCAB = 128
FAMILY_CONFIGS = {  # hf_checkpoint arguments: the house TINY config overridden
    "qwen2": dict(model_type="qwen2", hidden_size=48, intermediate_size=80, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, use_sliding_window=True,
                  sliding_window=WINDOW, max_window_layers=1),
    "qwen3": dict(model_type="qwen3", hidden_size=40, head_dim=16, intermediate_size=80, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, attention_bias=True, use_sliding_window=True,
                  sliding_window=WINDOW, max_window_layers=1),
    "gemma2": dict(model_type="gemma2", hidden_size=40, head_dim=16, intermediate_size=72, num_hidden_layers=3,
                   num_attention_heads=4, num_key_value_heads=2, query_pre_attn_scalar=20,
                   attn_logit_softcapping=5.0, final_logit_softcapping=3.0, sliding_window=WINDOW, pad_token_id=0),
    "gemma3_text": dict(model_type="gemma3_text", hidden_size=40, head_dim=16, intermediate_size=72,
                        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, query_pre_attn_scalar=12,
                        sliding_window=WINDOW, sliding_window_pattern=2, rope_theta=1e6, rope_local_base_freq=1e4,
                        rope_scaling={"rope_type": "linear", "factor": 8.0}, pad_token_id=0),
    "phi3": dict(model_type="phi3", hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, partial_rotary_factor=0.5, sliding_window=WINDOW, pad_token_id=0,
                 bos_token_id=1, eos_token_id=2),
}
FAMILY_NAMES = sorted(FAMILY_CONFIGS)


def _checkpoint(tmp_path, family, **extra):
    return hf_checkpoint(tmp_path / family, seed=1, **copy.deepcopy(FAMILY_CONFIGS[family]), **extra)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Each family's checkpoint folder, built once for the module."""
    root = tmp_path_factory.mktemp("families")
    return {family: _checkpoint(root, family) for family in FAMILY_NAMES}


def _ids(B=2, T=SEQ, seed=0):
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


# ---- config.json ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_config_json_without_optional_keys_reads_as_transformers_class_defaults(family):
    # transformers writes only the keys that differ from its class's defaults: ours must be its defaults.
    hf = transformers.AutoConfig.for_model(family)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and every key transformers writes is read, none ignored
        ours = LlamaConfig.from_dict({"model_type": family})
        complete = LlamaConfig.from_dict(json.loads(hf.to_json_string(use_diff=False)))
    assert ours == complete
    assert ours.sliding_window == getattr(hf, "sliding_window", None)
    if getattr(hf, "layer_types", None) is not None:
        assert ours.layer_types == hf.layer_types


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_config_round_trips_through_transformers(checkpoints, family):
    ours = LlamaConfig.from_json(checkpoints[family] / "config.json")
    hf = transformers.AutoConfig.for_model(**ours.to_hf_dict())
    assert LlamaConfig.from_dict(json.loads(hf.to_json_string())) == ours
    assert ours.sliding_window == WINDOW and SLIDING in ours.layer_types
    if family == "qwen2":  # layers at or past max_window_layers slide
        assert ours.layer_types == [FULL, SLIDING, SLIDING]


# ---- logits --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_logits_equal_transformers_on_a_padded_batch_past_the_window(checkpoints, family):
    ours, ref = load_model(checkpoints[family]).eval(), hf_model(checkpoints[family])
    ids = _ids()
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # left padding
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = ref(ids, attention_mask=mask, position_ids=positions).logits
        got = ours(ids, attention_mask=mask, position_ids=positions)
        torch.testing.assert_close(got[mask.bool()], expected[mask.bool()], rtol=0, atol=1e-4)
        torch.testing.assert_close(ours(ids), ref(ids).logits, rtol=0, atol=1e-4)
        # The window matters at this length: without it transformers gives other logits.
        wide = hf_model(checkpoints[family], sliding_window=10 * SEQ)
        assert (wide(ids).logits - ref(ids).logits).abs().max() > 1e-3


@pytest.mark.parametrize("varlen", [False, True], ids=["block mask", "segments"])
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_packed_rows_equal_each_conversation_alone(checkpoints, family, varlen):
    ours, ref = load_model(checkpoints[family]).eval(), hf_model(checkpoints[family])
    lengths = [11, 4, 15]  # 11 and 15 pass the window
    ids = _ids(1, sum(lengths), seed=3)
    starts = torch.tensor([0, 11, 15, 30], dtype=torch.int32)
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    with torch.no_grad():
        got = ours(ids, position_ids=positions, cu_seqlens=starts, plan=RuntimePlan(varlen=varlen))[0]
        for s, e in zip(starts[:-1].tolist(), starts[1:].tolist(), strict=True):
            torch.testing.assert_close(got[s:e], ref(ids[:, s:e]).logits[0], rtol=0, atol=1e-4)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_cached_decoding_past_the_window_equals_transformers(checkpoints, family):
    ours, ref = load_model(checkpoints[family]).eval(), hf_model(checkpoints[family])
    ids = _ids(1, 3 * WINDOW, seed=4)
    with torch.no_grad():
        expected = ref(ids).logits[0]
        cache = KVCache(ours.config, 1, ids.shape[1])
        got = [ours(ids[:, :5], cache=cache)[0]]  # a prompt, then one token at a time through the cache
        got += [ours(ids[:, t:t + 1], cache=cache)[0] for t in range(5, ids.shape[1])]
        torch.testing.assert_close(torch.cat(got), expected, rtol=0, atol=1e-4)
        prompt = ids[0, :5].tolist()
        assert generate(ours, prompt, 2 * WINDOW, eos_id=[]) == hf_greedy(ref, prompt, 2 * WINDOW, eos=-1)


def test_llama_with_attention_bias_equals_transformers(tmp_path):
    path = hf_checkpoint(tmp_path / "llama", seed=2, attention_bias=True)
    ours, ref = load_model(path).eval(), hf_model(path)
    assert ours.config.qkv_bias and ours.config.o_bias
    with torch.no_grad():
        torch.testing.assert_close(ours(_ids()), ref(_ids()).logits, rtol=0, atol=1e-4)


LONGROPE = {"type": "longrope", "short_factor": [1.0, 1.3, 2.1], "long_factor": [1.5, 3.0, 7.0]}


def test_phi3s_longrope_equals_transformers_within_and_past_the_original_context(tmp_path):
    # Phi-3-mini-128k and Phi-4-mini: the short factors while every position of a call is within the original
    # context, the long ones for all of them once any is past it, cos and sin scaled by the attention factor.
    config = dict(FAMILY_CONFIGS["phi3"], rope_scaling=LONGROPE, original_max_position_embeddings=16,
                  max_position_embeddings=256, sliding_window=None)
    path = hf_checkpoint(tmp_path / "phi3-longrope", seed=2, **config)
    ours, ref = load_model(path).eval(), hf_model(path)
    assert ours.config.rope_scaling["original_max_position_embeddings"] == 16
    rotary = ref.model.rotary_emb
    torch.testing.assert_close(rope_inv_freq(ours.config), rotary.original_inv_freq, rtol=0, atol=0)
    assert longrope_attention_factor(ours.config) == rotary.attention_scaling
    for length in (12, 30):
        ids = _ids(2, length, seed=length)
        with torch.no_grad():
            torch.testing.assert_close(ours(ids), ref(ids).logits, rtol=0, atol=1e-4)
    with torch.no_grad():  # sharpen the head so greedy decoding does not repeat one token
        ours.lm_head.weight.mul_(4), ref.lm_head.weight.mul_(4)
    prompt = _ids(1, 6, seed=9)[0].tolist()  # decoding crosses position 16: transformers switches factors there
    assert generate(ours, prompt, 20, eos_id=[]) == hf_greedy(ref, prompt, 20, eos=-1)
    reread = LlamaConfig.from_dict(json.loads(transformers.AutoConfig.for_model(
        **ours.config.to_hf_dict()).to_json_string()))
    assert reread == ours.config


# ---- LoRA, PEFT ----------------------------------------------------------------------------------------------

def _every_projection(config: LlamaConfig) -> tuple[str, ...]:
    return config.attention_projections + config.mlp_projections


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_pefts_adapter_on_every_projection_loads_here_with_pefts_logits_and_gradients(checkpoints, family, dora,
                                                                                     tmp_path):
    """With DoRA too: on Qwen's biased q/k/v, PEFT's DoRA scales W x without the bias, then adds it once."""
    path = checkpoints[family]
    targets = _every_projection(LlamaConfig.from_json(path / "config.json"))
    config = LoRAConfig(rank=4, alpha=8, dropout=0.0, targets=targets, use_dora=dora)
    if dora:
        ref = _perturb(peft.get_peft_model(hf_model(path), _peft_config(config)), seed=3).eval()
    else:
        ref = peft_lora_model(path, config)  # random non-zero A and B
    ref.save_pretrained(tmp_path / "adapter")
    ours = load_model(path, lora_config=lora.read_adapter_config(tmp_path / "adapter"))
    assert ours.lora_config.use_dora == dora
    lora.load_adapter(ours, tmp_path / "adapter")
    ours.eval()
    ids, labels = lm_batch(VOCAB, T=SEQ)
    out = ref(input_ids=ids, labels=labels)
    out.loss.backward()
    loss_sum, n = causal_lm_loss(ours, ids, labels)
    (loss_sum / n).backward()
    assert (loss_sum / n).item() == pytest.approx(out.loss.item(), abs=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), ref(input_ids=ids).logits, rtol=0, atol=1e-4)
    layers = ours.config.num_hidden_layers
    assert compare_gradients(ref, ours, tol=1e-4) == (3 if dora else 2) * len(targets) * layers


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_our_adapter_loads_in_peft_with_our_logits(checkpoints, family, tmp_path):
    path = checkpoints[family]
    config = LoRAConfig(rank=4, alpha=8, dropout=0.0,
                        targets=_every_projection(LlamaConfig.from_json(path / "config.json")))
    ours = load_model(path, lora_config=config).eval()
    torch.manual_seed(5)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if ".lora_B" in name:
                p.normal_(0, 0.1)
    lora.save_adapter(ours, tmp_path / "adapter", base_model=str(path))
    ref = peft.PeftModel.from_pretrained(hf_model(path), tmp_path / "adapter").eval()
    loaded = {our_name(n) for n, _ in ref.named_parameters() if "lora_" in n}
    assert loaded == {n for n, _ in ours.named_parameters() if ".lora_" in n}
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), ref(input_ids=ids).logits, rtol=0, atol=1e-4)


def test_phi3s_targets_are_its_own_module_names(checkpoints):
    config = LlamaConfig.from_json(checkpoints["phi3"] / "config.json")
    assert config.mlp_projections == ("gate_up_proj", "down_proj")
    assert lora.resolve_targets("mlp", config.attention_projections, config.mlp_projections) == config.mlp_projections
    assert lora.resolve_targets("all,down_proj", config.attention_projections, config.mlp_projections) == (
        "qkv_proj", "o_proj", "gate_up_proj", "down_proj")
    with pytest.raises(ValueError, match=r"\['q_proj'\] are not projections of this phi3 model.*qkv_proj"):
        load_model(checkpoints["phi3"], lora_config=LoRAConfig(rank=2, alpha=2, targets=("q_proj",)))


# ---- numerics in bfloat16 and the loss -------------------------------------------------------------------------

def test_gemmas_embedding_scale_rounds_to_bf16_as_transformers_does():
    config = LlamaConfig.from_dict({"model_type": "gemma2", "hidden_size": 3584, "num_hidden_layers": 1,
                                    "vocab_size": 16, "intermediate_size": 8})
    model = Llama(config).to(torch.bfloat16)
    hf = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**config.to_hf_dict()))
    hf = hf.to(torch.bfloat16)
    hf.model.embed_tokens.weight.data.copy_(model.model.embed_tokens.weight)
    ids = torch.arange(16)[None]
    got = model.embed(ids)
    assert torch.equal(got, hf.model.embed_tokens(ids))
    # sqrt(3584) = 59.87 rounds to 59.75 in bf16: the scale that reaches the embeddings is the rounded one.
    assert torch.equal(got, model.model.embed_tokens(ids) * 59.75)


@pytest.mark.parametrize("family", ["gemma2", "gemma3_text"])
def test_gemma_norms_cast_once_in_bf16_as_transformers(checkpoints, family):
    ours, ref = load_model(checkpoints[family]).eval(), hf_model(checkpoints[family])
    x = torch.randn(3, 5, ours.config.hidden_size).to(torch.bfloat16)
    ours_norm, ref_norm = ours.model.layers[0].input_layernorm, ref.model.layers[0].input_layernorm
    ours_norm.to(torch.bfloat16), ref_norm.to(torch.bfloat16)
    assert torch.equal(ours_norm(x), ref_norm(x))
    assert torch.equal(ours_norm.reference(x), ref_norm(x))
    # Llama's order (round, then times w) would differ somewhere: the single cast is what is being checked.
    w = 1.0 + ours_norm.weight.float()
    llama_order = (torch.nn.functional.rms_norm(x.float(), (x.shape[-1],), eps=ours_norm.eps).to(x.dtype)
                   * w.to(x.dtype))
    assert not torch.equal(llama_order, ref_norm(x))


@pytest.mark.parametrize("family", ["gemma2", "gemma3_text"])
def test_bf16_logits_stay_close_to_transformers(checkpoints, family):
    ours = load_model(checkpoints[family], dtype=torch.bfloat16).eval()
    ref = hf_model(checkpoints[family], dtype=torch.bfloat16)
    with torch.no_grad():
        got, expected = ours(_ids()).float(), ref(_ids()).logits.float()
    assert (got - expected).abs().max() <= 0.05 * expected.abs().max()


def test_the_final_softcap_is_applied_inside_the_chunked_loss_and_its_gradient(checkpoints, tmp_path):
    path = checkpoints["gemma2"]
    config = LoRAConfig(rank=4, alpha=8, dropout=0.0, targets=("down_proj",))
    ids, labels = lm_batch(VOCAB, T=SEQ)
    grads, losses = [], []
    for fused in (True, False):  # the fused frozen-head loss and the plain one, each against the full logits
        torch.manual_seed(0)  # the same A in both
        model = load_model(path, lora_config=config).eval()  # B = 0: the base model's loss, B's gradients
        if fused:
            loss, n = causal_lm_loss(model, ids, labels, chunk_size=7)
        else:
            loss, n = reference_loss(model(ids), labels)
        loss.backward()
        losses.append(loss.item())
        grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
    out = hf_model(path)(input_ids=ids, labels=labels)
    assert losses[0] / n == pytest.approx(out.loss.item(), abs=1e-5)
    assert losses[0] == pytest.approx(losses[1], abs=1e-4)
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


# ---- refusals --------------------------------------------------------------------------------------------------

def test_what_is_not_computed_is_refused_in_one_line():
    with pytest.raises(ValueError, match="gemma3.*only its text model.*gemma3_text"):
        LlamaConfig.from_dict({"model_type": "gemma3", "text_config": {}})
    with pytest.raises(ValueError, match="short_factor must list 48 positive numbers"):  # head_dim 96: 48 pairs
        LlamaConfig.from_dict({"model_type": "phi3", "rope_scaling": {"type": "longrope", "short_factor": [1.0],
                                                                      "long_factor": [1.0]}})
    with pytest.raises(ValueError, match="rope_type 'longrope' needs.*missing.*long_factor"):  # Phi-3's "su"
        LlamaConfig.from_dict({"model_type": "phi3", "rope_scaling": {"type": "su", "short_factor": [1.0]}})
    with pytest.raises(ValueError, match="resid_pdrop=0.1 is not supported"):
        LlamaConfig.from_dict({"model_type": "phi3", "resid_pdrop": 0.1})
    with pytest.raises(ValueError, match="use_bidirectional_attention=True is not supported"):
        LlamaConfig.from_dict({"model_type": "gemma3_text", "use_bidirectional_attention": True})
    with pytest.raises(ValueError, match="qk_norm=True is not part of LlamaForCausalLM"):
        LlamaConfig(qk_norm=True)
    with pytest.raises(ValueError, match="layer_types must list"):
        LlamaConfig.from_dict({"model_type": "gemma2", "num_hidden_layers": 2, "layer_types": [FULL]})


@pytest.mark.parametrize("family", ["gemma2", "phi3"])
def test_the_fused_lora_mlp_is_refused_for_geglu_and_fused_gate_up(checkpoints, family):
    config = LlamaConfig.from_json(checkpoints[family] / "config.json")
    lora_config = LoRAConfig(rank=2, alpha=2, targets=config.mlp_projections)
    cuda = torch.device("cuda")
    with pytest.raises(ValueError, match=f"--fused-mlp is not supported for {family}"):
        plan_runtime(config, cuda, torch.bfloat16, lora_config=lora_config, fused_mlp=True, varlen=False)
    assert not plan_runtime(config, cuda, torch.bfloat16, lora_config=lora_config, varlen=False).fused_mlp
