"""GPU-only checks: the bf16 fast paths against the plain float32 reference path.

Skipped (with a reason) where there is no CUDA device; `bench/gpu_check.sh` runs them on a GPU machine.
bf16 keeps about 3 significant digits, so tolerances here are bf16's, not float32's.
"""

from __future__ import annotations

import os

import pytest
import torch

from helpers import GUANACO_SAMPLE, hf_checkpoint
import lora
import train
from training.step import batch_loss, prepare
from tinyllama.runtime import attention_kernels, sdpa_context
from tinyllama import causal_lm_loss, load_model, reference_loss

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
    ref = load_model(path, lora=config, device=CUDA)  # float32 reference
    torch.manual_seed(0)
    fast = load_model(path, lora=config, device=CUDA, dtype=torch.bfloat16)
    with torch.no_grad():
        for (_, a), (_, b) in zip(lora.lora_layers(ref).items(), lora.lora_layers(fast).items()):
            a.lora_B.weight.normal_(0, 0.05)
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


def test_flash_attention_runs_the_unmasked_causal_path(tmp_path):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    path = hf_checkpoint(tmp_path / "m", hidden_size=256, intermediate_size=512, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=1024)
    model = load_model(path, device=CUDA, dtype=torch.bfloat16)
    ids, _ = _batch(1024)
    with torch.no_grad():
        default = model(ids)
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):  # raises if flash cannot run these inputs
            flash = model(ids)
    assert (default.float() - flash.float()).abs().max().item() < 5e-2


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
    from data import encode_all, load_conversations, pack
    path = hf_checkpoint(tmp_path / "m", vocab_size=32000, hidden_size=64)
    model = load_model(path, device=CUDA, dtype=torch.bfloat16)
    examples, _ = encode_all(load_conversations(str(GUANACO_SAMPLE)), tokenizer, 256)
    row = pack(examples[:6], 256)[0]
    with torch.no_grad():
        packed = model(row["input_ids"][None].to(CUDA), position_ids=row["position_ids"][None].to(CUDA),
                       document_ids=row["document_ids"][None].to(CUDA))[0]
        for d in row["document_ids"].unique().tolist():
            if d < 0:
                continue
            where = (row["document_ids"] == d).nonzero().flatten()
            alone = model(row["input_ids"][where][None].to(CUDA))[0]
            assert (packed[where.to(CUDA)].float() - alone.float()).abs().max().item() < 5e-2


def test_compiled_layers_match_eager(tmp_path):
    path = hf_checkpoint(tmp_path / "m", vocab_size=1024, hidden_size=128, intermediate_size=256)
    _, eager = _models(path, lora.LoRAConfig(4, 8, dropout=0.0))
    _, compiled = _models(path, lora.LoRAConfig(4, 8, dropout=0.0))
    with torch.no_grad():
        for a, b in zip(eager.parameters(), compiled.parameters()):
            b.copy_(a)
    for layer in compiled.model.layers:
        layer.compile()
    ids, labels = _batch(1024)
    le, ge = _loss_and_grads(eager, ids, labels, autocast=True)
    lc, gc = _loss_and_grads(compiled, ids, labels, autocast=True)
    assert lc == pytest.approx(le, rel=1e-2)
    assert min(_cos(gc[k], ge[k]) for k in ge) > 0.99


def test_training_loop_runs_on_cuda_with_fused_adamw(tmp_path):
    path = hf_checkpoint(tmp_path / "m", vocab_size=1024)
    summary = train.main(train.TrainConfig(
        model=str(path), random_init=True, data="random:16", eval_data="none", rank=4, alpha=8, max_len=64,
        batch_size=4, grad_accum=2, steps=4, samples=False, out=str(tmp_path / "run"), device=CUDA.type,
        dtype="bfloat16"))
    assert summary["last_loss"] == summary["last_loss"]  # not NaN
    if CUDA.type == "cuda":
        assert summary["peak_gib"] is not None and summary["peak_gib"] > 0
        assert summary["device"] == torch.cuda.get_device_name(0)


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
        for layer in fast.model.layers:
            layer.self_attn.native_gqa = native
        with sdpa_context(backends):
            results.append(_loss_and_grads(fast, ids, labels, autocast=True))
    (l_fast, g_fast), (l_math, g_math) = results
    assert l_fast == pytest.approx(l_math, rel=1e-2)
    assert min(_cos(g_fast[k], g_math[k]) for k in g_math) > 0.99
