"""Generation: greedy parity with `transformers`, the KV cache against full recomputation, batches against
single prompts, sampling (seeds, temperature, top-k, top-p), stop conditions, dtypes and model state."""

from __future__ import annotations

import pytest
import torch

import lora
from helpers import TINY, LazyModule, hf_checkpoint, hf_greedy, hf_model, randomize_lora_b, rig_cycle
from lora import LoRAConfig
from tinyllama import Llama, LlamaConfig, load_model
from tinyllama.generation import Decoder, StopStrings, generate, generate_batch, sample

transformers = pytest.importorskip("transformers")
peft = LazyModule("peft")

CONFIGS = {
    "gqa": {},
    "mha": dict(num_key_value_heads=4, rope_theta=1000.0),
    "mqa_tied": dict(num_key_value_heads=1, tie_word_embeddings=True),
}
PROMPTS = [[1, 17, 33, 5, 90, 41, 7], [1, 99], [1, 3, 64, 12, 8, 77, 21, 54, 60, 2, 19, 45, 11]]


def _reference_greedy(model, prompt, n):
    """Greedy decoding the slow, obvious way: the whole sequence through the model at every step, no cache."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_greedy_equals_transformers_generate(tmp_path, name):
    path = hf_checkpoint(tmp_path / name, seed=2, **CONFIGS[name])
    ours, ref = load_model(path).eval(), hf_model(path)
    expected = [hf_greedy(ref, p, 24) for p in PROMPTS]
    assert [generate(ours, p, 24) for p in PROMPTS] == expected
    assert len({tuple(e) for e in expected}) == len(PROMPTS), "degenerate reference: every prompt gave the same"


@pytest.mark.slow
def test_greedy_with_adapter_equals_peft_generate(tmp_path):
    path = hf_checkpoint(tmp_path / "base", seed=3)
    config = LoRAConfig(rank=4, alpha=8, dropout=0.0, targets=lora.ALL_TARGETS)
    ref = peft.get_peft_model(hf_model(path), peft.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, task_type="CAUSAL_LM", target_modules=list(config.targets)))
    torch.manual_seed(5)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.3)
    ref.eval().save_pretrained(tmp_path / "adapter")

    ours = load_model(path, lora_config=lora.read_adapter_config(tmp_path / "adapter"))
    lora.load_adapter(ours, tmp_path / "adapter")
    plain = load_model(path).eval()
    for prompt in PROMPTS:
        expected = hf_greedy(ref, prompt, 24)
        assert generate(ours, prompt, 24) == expected
        if prompt is PROMPTS[0]:
            assert generate(plain, prompt, 24) != expected, "the adapter does not change the output"
    lora.merge(ours)
    assert [generate(ours, p, 24) for p in PROMPTS] == [hf_greedy(ref, p, 24) for p in PROMPTS]


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_cached_logits_equal_full_recomputation_at_every_step(name):
    torch.manual_seed(6)
    model = Llama(LlamaConfig(**{**TINY, **CONFIGS[name]})).eval()
    steps = 12
    decoder = Decoder(model, PROMPTS, steps)  # different lengths: left padding and per-row positions
    seqs = [list(p) for p in PROMPTS]
    logits = decoder.prefill()
    for step in range(steps + 1):
        with torch.no_grad():
            full = torch.stack([model(torch.tensor([s]))[0, -1] for s in seqs])
        diff = (logits - full).abs().max().item()
        assert diff <= 1e-4, f"step {step}: max |cached - recomputed| = {diff}"
        if step == steps:
            break
        tokens = logits.argmax(-1)
        seqs = [s + [t] for s, t in zip(seqs, tokens.tolist(), strict=True)]
        logits = decoder.step(tokens)
    assert decoder.cache.length == max(map(len, PROMPTS)) + steps
    with pytest.raises(RuntimeError, match="full"):
        decoder.step(tokens)


@pytest.mark.slow
def test_batch_of_different_lengths_equals_each_prompt_alone():
    torch.manual_seed(7)
    model = Llama(LlamaConfig(**TINY)).eval()
    alone = [generate(model, p, 20, eos_id=()) for p in PROMPTS]
    assert generate_batch(model, PROMPTS, 20, eos_id=()) == alone
    assert alone == [_reference_greedy(model, p, 20) for p in PROMPTS]
    # One row ends early at an end token; the others must not notice.
    eos = alone[1][3]
    cut = [row[:row.index(eos)] if eos in row else row for row in alone]
    assert len(cut[1]) == 3
    assert generate_batch(model, PROMPTS, 20, eos_id=eos) == cut
    assert [generate(model, p, 20, eos_id=eos) for p in PROMPTS] == cut


@pytest.mark.slow
def test_sampling_is_seeded_and_leaves_the_global_rng_alone():
    torch.manual_seed(8)
    model = Llama(LlamaConfig(**TINY)).eval()
    state = torch.get_rng_state()
    a = generate(model, PROMPTS[0], 30, temperature=1.5, seed=1, eos_id=())
    assert torch.equal(torch.get_rng_state(), state), "sampling drew from the global RNG"
    assert generate(model, PROMPTS[0], 30, temperature=1.5, seed=1, eos_id=()) == a
    assert generate(model, PROMPTS[0], 30, temperature=1.5, seed=2, eos_id=()) != a
    rows = generate_batch(model, PROMPTS, 30, temperature=1.5, top_k=50, top_p=0.95, seed=3, eos_id=())
    assert rows == generate_batch(model, PROMPTS, 30, temperature=1.5, top_k=50, top_p=0.95, seed=3, eos_id=())
    assert a != _reference_greedy(model, PROMPTS[0], 30), "sampling at temperature 1.5 looked greedy"


@pytest.mark.slow
def test_temperature_zero_and_top_k_one_are_greedy():
    torch.manual_seed(9)
    model = Llama(LlamaConfig(**TINY)).eval()
    for prompt in PROMPTS:
        greedy = _reference_greedy(model, prompt, 20)
        assert generate(model, prompt, 20, temperature=0.0, top_k=7, top_p=0.3, seed=1, eos_id=()) == greedy
        assert generate(model, prompt, 20, temperature=1.0, top_k=1, seed=1, eos_id=()) == greedy
        assert generate(model, prompt, 20, temperature=1.0, top_p=1e-6, seed=1, eos_id=()) == greedy


def test_top_k_and_top_p_sample_only_from_their_sets():
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])  # sorted: 1 (0.5), 3 (0.3), 2 (0.15), 0 (0.05)
    logits = probs.log().expand(20000, 4)
    g = torch.Generator().manual_seed(0)

    def freq(temperature=1.0, **kw):
        draws = sample(logits, temperature=temperature, generator=g, **kw)
        return torch.bincount(draws, minlength=4).float() / len(draws)

    f = freq()
    assert (f - probs).abs().max() < 0.02
    f = freq(top_k=2)  # tokens 1 and 3, renormalised: 0.625, 0.375
    assert f[0] == 0 and f[2] == 0 and abs(f[1] - 0.625) < 0.02
    f = freq(top_p=0.7)  # 0.5 < 0.7, 0.5 + 0.3 >= 0.7: the nucleus is {1, 3}
    assert f[0] == 0 and f[2] == 0 and abs(f[1] - 0.625) < 0.02
    f = freq(top_p=0.85)  # 0.8 < 0.85: {1, 3, 2}
    assert f[0] == 0 and abs(f[2] - 0.15 / 0.95) < 0.02
    f = freq(top_p=0.5)  # the first token alone reaches 0.5
    assert f[1] == 1
    hot = freq(temperature=0.25)  # sharper: the top token gains
    assert hot[1] > 0.8


def test_generation_runs_in_eval_mode_and_restores_train_mode(hf_tiny):
    model = load_model(hf_tiny, lora_config=LoRAConfig(rank=4, alpha=8, dropout=0.5))
    randomize_lora_b(model, std=0.2, seed=4)
    model.eval()
    expected = _reference_greedy(model, PROMPTS[0], 16)
    model.train()
    assert generate(model, PROMPTS[0], 16, eos_id=()) == expected, "LoRA dropout was active while generating"
    assert model.training and all(m.training for m in model.modules())


def test_stop_strings_cut_where_the_marker_begins(tokenizer):
    stop = StopStrings(tokenizer, ["### Human:"])
    ids = tokenizer.encode("Sure!### Human: more", bos=False)  # the marker is "##", "#", "▁Human", ":" here
    pieces = [tokenizer.id_to_piece(i) for i in ids]
    assert pieces[:6] == ["▁Sure", "!", "##", "#", "▁Human", ":"]
    assert [stop(ids[:n]) for n in range(1, 6)] == [None] * 5
    assert stop(ids[:6]) == 2
    assert stop(tokenizer.encode("a ### Human", bos=False)) is None
    # Stopping on text: the model below emits exactly these ids, and generation must end at the ":".
    model = Llama(LlamaConfig(**{**TINY, "vocab_size": 32000, "hidden_size": 16, "intermediate_size": 16,
                                 "num_hidden_layers": 1}))
    rig_cycle(model, ids[:6])
    seen = []
    assert generate(model, [1, ids[0]], 40, stop=stop, eos_id=(), on_token=seen.append) == ids[1:2]  # "!"
    assert seen == ids[1:6], "generation went on after the marker was complete"
    free = generate(model, [1, ids[0]], 40, eos_id=())
    assert len(free) == 40 and tokenizer.decode(free).startswith("!### Human: Sure!### Human:")


def test_bfloat16_with_unmerged_and_merged_adapter(hf_tiny):
    cfg = LoRAConfig(rank=4, alpha=8, dropout=0.0)
    m32 = randomize_lora_b(load_model(hf_tiny, lora_config=cfg), std=0.2, seed=4).eval()
    m16 = load_model(hf_tiny, lora_config=cfg, dtype=torch.bfloat16)
    m16.load_state_dict(m32.state_dict())
    assert m16.model.layers[0].mlp.up_proj.lora_A.weight.dtype == torch.float32  # LoRA stays float32
    decoder = Decoder(m16.eval(), PROMPTS, 8)
    assert decoder.cache.k.dtype == torch.bfloat16
    ref = Decoder(m32, PROMPTS, 8).prefill()
    for merged in (False, True):
        if merged:
            lora.merge(m16)
            decoder = Decoder(m16, PROMPTS, 8)
        torch.testing.assert_close(decoder.prefill(), ref, rtol=0, atol=0.1, msg=f"merged={merged}")
        # An end token placed by construction: the second row's fourth token. Every row must stop right before
        # its first occurrence of it (the second after three tokens), and the rows unaffected must not change.
        rows = generate_batch(m16, PROMPTS, 8, eos_id=())
        eos = rows[1][3]
        cut = [row[:row.index(eos)] if eos in row else row for row in rows]
        assert len(cut[1]) <= 3 and generate_batch(m16, PROMPTS, 8, eos_id=eos) == cut, f"merged={merged}"
        alone = generate(m16, PROMPTS[1], 8, eos_id=())
        assert eos in alone and generate(m16, PROMPTS[1], 8, eos_id=eos) == alone[:alone.index(eos)]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_greedy_equals_cpu(hf_tiny):
    cpu = load_model(hf_tiny).eval()
    gpu = load_model(hf_tiny, device="cuda").eval()
    assert generate_batch(gpu, PROMPTS, 16, eos_id=()) == generate_batch(cpu, PROMPTS, 16, eos_id=())
    assert generate(gpu, PROMPTS[0], 8, temperature=1.0, seed=0) == generate(gpu, PROMPTS[0], 8, temperature=1.0,
                                                                             seed=0)
    bf16 = load_model(hf_tiny, device="cuda", dtype=torch.bfloat16, lora_config=LoRAConfig(rank=4, alpha=8)).eval()
    torch.testing.assert_close(Decoder(bf16, PROMPTS, 8).prefill().cpu(), Decoder(cpu, PROMPTS, 8).prefill(),
                               rtol=0, atol=0.1)  # a fresh adapter (B = 0) on bf16 weights: the float32 logits


def test_errors_say_what_to_do():
    model = Llama(LlamaConfig(**TINY)).eval()
    with pytest.raises(ValueError, match="context length"):
        generate(model, [1] * 250, 10)
    with pytest.raises(ValueError, match="empty"):
        generate_batch(model, [[1, 2], []], 5)
    with pytest.raises(ValueError, match="token id 500.*different tokenizer"):
        generate(model, [1, 500], 5)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, [1], 5, temperature=1.0, top_p=0.0)
    assert generate(model, [1, 2], 0) == []
