"""GPU-only checks: the bf16 fast paths against the plain float32 reference path, and the fused AdamW that
training uses on the device against torch's plain AdamW.

Skipped (with a reason) where there is no CUDA device; `bench/gpu_check.sh` runs them on a GPU machine.
bf16 keeps about 3 significant digits, so tolerances here are bf16's, not float32's.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

import lora
import train
from helpers import GUANACO_SAMPLE, adapter_weights, hf_checkpoint, metrics, randomize_lora_b, train_losses
from tinyllama import causal_lm_loss, load_model, reference_loss
from tinyllama.runtime import RuntimePlan, attention_kernels, sdpa_context
from training.step import batch_loss, prepare, skip_updates_when

pytestmark = pytest.mark.cuda
# GPU_TESTS_ON_CPU=1 runs these same tests on the CPU (bf16 there too): a dry run of their logic before the
# one GPU session counts.
CUDA = torch.device("cpu" if os.environ.get("GPU_TESTS_ON_CPU") else "cuda")


def _batch(vocab, B=4, T=64, seed=0, device=CUDA):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (B, T), generator=g)
    labels = ids.clone()
    labels[:, :8] = -100
    return ids.to(device), labels.to(device)


def _models(path, config):
    torch.manual_seed(0)
    ref = load_model(path, lora_config=config, device=CUDA)  # float32 reference
    torch.manual_seed(0)
    fast = load_model(path, lora_config=config, device=CUDA, dtype=torch.bfloat16)
    randomize_lora_b(ref, std=0.05)
    with torch.no_grad():
        for a, b in zip(lora.lora_layers(ref).values(), lora.lora_layers(fast).values(), strict=True):
            b.lora_B.weight.copy_(a.lora_B.weight)
            b.lora_A.weight.copy_(a.lora_A.weight)
    return ref, fast


def _loss_and_grads(model, ids, labels, autocast, **kw):
    model.zero_grad(set_to_none=True)
    with torch.autocast(CUDA.type, dtype=torch.bfloat16, enabled=autocast):
        loss, n = causal_lm_loss(model, ids, labels, **kw)
    (loss / n).backward()
    return (loss / n).item(), {k: p.grad.float() for k, p in model.named_parameters() if p.requires_grad}


def _cos(a, b):
    return torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()


def test_bf16_training_path_matches_float32_reference(tmp_path):
    path = hf_checkpoint(tmp_path / "m", hidden_size=256, intermediate_size=512, num_attention_heads=8,
                         num_key_value_heads=2, vocab_size=1024)
    ref, fast = _models(path, lora.LoRAConfig(8, 16, dropout=0.0))
    ids, labels = _batch(1024)
    l32, g32 = _loss_and_grads(ref, ids, labels, autocast=False)
    l16, g16 = _loss_and_grads(fast, ids, labels, autocast=True)
    assert l16 == pytest.approx(l32, rel=2e-2)
    assert all(g16[k].dtype == torch.float32 for k in g16), "LoRA weights and grads stay float32"
    assert min(_cos(g16[k], g32[k]) for k in g32) > 0.99


def test_chunked_labelled_loss_matches_full_logits_in_bf16(tmp_path):
    path = hf_checkpoint(tmp_path / "m", vocab_size=1024)
    _, fast = _models(path, lora.LoRAConfig(4, 8, dropout=0.0))
    ids, labels = _batch(1024)
    with torch.no_grad(), torch.autocast(CUDA.type, dtype=torch.bfloat16):
        chunked, n = causal_lm_loss(fast, ids, labels, chunk_size=37)
        full, m = reference_loss(fast(ids), labels)
    assert n == m
    assert chunked.item() == pytest.approx(full.item(), rel=1e-2)


def test_flash_attention_runs_the_unmasked_causal_path(tmp_path, monkeypatch):
    # The bf16 model under flash attention alone (SDPA raises if flash cannot run these inputs), every call
    # without a mask and causal, against the float32 model (checked against transformers to 1e-4 on CPU).
    from torch.nn.attention import SDPBackend, sdpa_kernel
    path = hf_checkpoint(tmp_path / "m", hidden_size=256, intermediate_size=512, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=1024)
    model = load_model(path, device=CUDA, dtype=torch.bfloat16)
    ids, _ = _batch(1024)
    with torch.no_grad():
        expected = load_model(path, device=CUDA)(ids)
    calls, sdpa = [], F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention",
                        lambda q, k, v, **kw: calls.append(kw) or sdpa(q, k, v, **kw))
    with torch.no_grad(), sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        flash = model(ids)
    assert len(calls) == 2 and all(kw.get("attn_mask") is None and kw.get("is_causal") for kw in calls), calls
    torch.testing.assert_close(flash.float(), expected, rtol=0, atol=5e-2)  # logits up to ~1.5: bf16's rounding


def test_mask_free_right_padding_matches_masked_on_cuda(tmp_path, tokenizer):
    from data import BatchStream, encode_all, load_conversations
    path = hf_checkpoint(tmp_path / "m", vocab_size=32000, hidden_size=64)
    _, fast = _models(path, lora.LoRAConfig(4, 8, dropout=0.0))
    examples, _ = encode_all(load_conversations(str(GUANACO_SAMPLE)), tokenizer, 128)
    batch = next(BatchStream(examples, 4, 128, seed=0))
    with torch.no_grad(), torch.autocast(CUDA.type, dtype=torch.bfloat16):
        masked = batch_loss(fast, {k: v.to(CUDA) for k, v in batch.items()})
        free = batch_loss(fast, prepare(batch, CUDA))
    assert masked[1] == free[1]
    assert free[0].item() == pytest.approx(masked[0].item(), rel=1e-2)


def test_packed_rows_match_documents_alone_in_bf16(tmp_path, tokenizer):
    from data import collate_packed, encode_all, load_conversations, pack
    path = hf_checkpoint(tmp_path / "m", vocab_size=32000, hidden_size=64)
    model = load_model(path, device=CUDA, dtype=torch.bfloat16)
    examples, _ = encode_all(load_conversations(str(GUANACO_SAMPLE)), tokenizer, 256)
    batch = collate_packed(pack(examples[:6], 256)[:1])
    row = {k: v[0] for k, v in batch.items() if k != "cu_seqlens"}
    with torch.no_grad():
        packed = model(batch["input_ids"].to(CUDA), position_ids=batch["position_ids"].to(CUDA),
                       cu_seqlens=batch["cu_seqlens"].to(CUDA))[0]
        for d in row["document_ids"].unique().tolist():
            if d < 0:
                continue
            where = (row["document_ids"] == d).nonzero().flatten()
            alone = model(row["input_ids"][where][None].to(CUDA))[0]
            assert (packed[where.to(CUDA)].float() - alone.float()).abs().max().item() < 5e-2


@pytest.mark.slow
def test_compiled_layers_match_eager(tmp_path):
    path = hf_checkpoint(tmp_path / "m", vocab_size=1024, hidden_size=128, intermediate_size=256)
    _, eager = _models(path, lora.LoRAConfig(4, 8, dropout=0.0))
    _, compiled = _models(path, lora.LoRAConfig(4, 8, dropout=0.0))
    with torch.no_grad():
        for a, b in zip(eager.parameters(), compiled.parameters(), strict=True):
            b.copy_(a)
    for layer in compiled.model.layers:
        layer.compile()
    ids, labels = _batch(1024)
    le, ge = _loss_and_grads(eager, ids, labels, autocast=True)
    lc, gc = _loss_and_grads(compiled, ids, labels, autocast=True)
    assert lc == pytest.approx(le, rel=1e-2)
    assert min(_cos(gc[k], ge[k]) for k in ge) > 0.99


def test_training_in_bf16_on_the_device_follows_the_float32_run_on_the_cpu(tmp_path):
    # The whole loop: bf16 base weights and autocast on the device (and there the fused LoRA MLP), fp32 LoRA
    # weights and fused AdamW state, against the plain float32 run on the CPU, on the same padded batches. A high
    # lr, so the adapter moves far from its start (B = 0).
    path = hf_checkpoint(tmp_path / "m", vocab_size=1024)
    settings = dict(model=str(path), random_init=True, data="random:16", eval_data="none", rank=4, alpha=8,
                    max_len=64, batch_size=4, grad_accum=2, steps=6, lr=1e-2, warmup=0, schedule="constant",
                    packing=False, log_every=1, samples=False)
    ref = train.train(train.TrainConfig(**settings, out=str(tmp_path / "fp32"), device="cpu", dtype="float32"))
    fast = train.train(train.TrainConfig(**settings, out=str(tmp_path / "bf16"), device=CUDA.type, dtype="bfloat16"))
    losses = train_losses(metrics(tmp_path / "bf16"))
    assert len(losses) == 6 and losses == pytest.approx(train_losses(metrics(tmp_path / "fp32")), rel=4e-3)
    a, b = adapter_weights(tmp_path / "fp32"), adapter_weights(tmp_path / "bf16")
    assert a.keys() == b.keys() and all(w.dtype == torch.float32 for w in b.values())
    moved = torch.cat([w.flatten() for k, w in a.items() if "lora_B" in k])
    diff = torch.cat([(b[k] - w).flatten() for k, w in a.items() if "lora_B" in k])
    assert moved.norm() > 1.0 and diff.norm() < 0.2 * moved.norm(), (diff.norm(), moved.norm())
    assert (fast["trainable_params"], fast["total_params"]) == (ref["trainable_params"], ref["total_params"])
    if CUDA.type == "cuda":
        assert fast["peak_gib"] is not None and fast["peak_gib"] > 0
        assert fast["device"] == torch.cuda.get_device_name(0)


def test_the_fused_adamw_of_training_equals_plain_adamw_and_skips_flagged_steps(tmp_path, monkeypatch):
    # The optimizer train.train builds (caught where it hands it to skip_updates_when), rebuilt with its own
    # settings on tensors like its parameters, against torch's plain single-tensor AdamW with the run's lr and
    # weight decay: the same updates. With the flag set on the device, a step changes no weight and no state.
    built = []
    monkeypatch.setattr(train, "skip_updates_when",
                        lambda optimizer, flag: built.append((optimizer, flag)) or skip_updates_when(optimizer, flag))
    train.train(train.TrainConfig(
        model=str(hf_checkpoint(tmp_path / "m", vocab_size=1024)), random_init=True, data="random:16",
        eval_data="none", rank=4, alpha=8, max_len=64, batch_size=4, steps=1, lr=1e-2, weight_decay=0.1,
        samples=False, out=str(tmp_path / "run"), device=CUDA.type, dtype="bfloat16"))
    ((used, flag),) = built
    assert used.defaults["fused"] and used.found_inf is flag and flag.device.type == CUDA.type and flag.item() == 0
    start = [p.detach().clone() for group in used.param_groups for p in group["params"]]
    assert len(start) == 2 * 3 * 2 and all(p.dtype == torch.float32 and p.device.type == CUDA.type for p in start)
    settings = ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize", "fused")
    fused_params, plain_params = ([p.clone().requires_grad_() for p in start] for _ in range(2))
    fused = type(used)(fused_params, **{k: used.defaults[k] for k in settings})
    plain = torch.optim.AdamW(plain_params, lr=1e-2, weight_decay=0.1, foreach=False, fused=False)
    skip = torch.zeros((), device=CUDA)
    skip_updates_when(fused, skip)
    g = torch.Generator(device=CUDA).manual_seed(0)
    grads = [[torch.randn(p.shape, generator=g, device=CUDA) * 10.0 ** -k for p in start] for k in range(4)]

    def step(optimizer, params, grads):
        for p, grad in zip(params, grads, strict=True):
            p.grad = grad.clone()
        optimizer.step()

    for gs in grads[:3]:
        step(fused, fused_params, gs)
        step(plain, plain_params, gs)
    for a, b in zip(fused_params, plain_params, strict=True):
        torch.testing.assert_close(a, b)  # float32's tolerance; each step moves a weight by about lr
    assert max((a - s).abs().max() for a, s in zip(fused_params, start, strict=True)) > 1e-2
    weights = [p.detach().clone() for p in fused_params]
    state = {i: {k: v.clone() for k, v in fused.state[p].items()} for i, p in enumerate(fused_params)}
    skip.fill_(1)
    step(fused, fused_params, grads[3])  # flagged: nothing moves, not even the step count
    for i, p in enumerate(fused_params):
        torch.testing.assert_close(p.detach(), weights[i], rtol=0, atol=0)
        for k, v in state[i].items():
            torch.testing.assert_close(fused.state[p][k], v, rtol=0, atol=0, msg=f"{k} of parameter {i}")
    skip.fill_(0)
    step(fused, fused_params, grads[3])  # as if the flagged step had never been taken
    step(plain, plain_params, grads[3])
    for a, b in zip(fused_params, plain_params, strict=True):
        torch.testing.assert_close(a, b)


def test_preferred_attention_kernel_and_grouped_kv_match_the_math_kernel(tmp_path):
    # train.py's default kernel preference (flash first, grouped k/v read in place where that kernel takes
    # them) against the plain math kernel with k/v repeated: the same bf16 loss and LoRA gradients.
    path = hf_checkpoint(tmp_path / "m", hidden_size=256, intermediate_size=512, num_attention_heads=8,
                         num_key_value_heads=2, vocab_size=1024)
    _, fast = _models(path, lora.LoRAConfig(8, 16, dropout=0.0, targets=("q_proj", "v_proj", "gate_proj")))
    ids, labels = _batch(1024, T=200)
    spec = train.TrainConfig.sdpa_backends
    repeated, in_place = attention_kernels(CUDA, torch.bfloat16, spec, fast.config)
    if CUDA.type == "cuda":
        assert repeated == "flash", f"the preferred kernel did not run: {repeated}"
    results = []
    for backends, native in ((spec, in_place == repeated), ("math", False)):
        fast.plan = RuntimePlan(device=CUDA, dtype=torch.bfloat16, gqa_in_place=native)
        with sdpa_context(backends):
            results.append(_loss_and_grads(fast, ids, labels, autocast=True))
    (l_fast, g_fast), (l_math, g_math) = results
    assert l_fast == pytest.approx(l_math, rel=1e-2)
    assert min(_cos(g_fast[k], g_math[k]) for k in g_math) > 0.99
