"""Packed rows without a dense mask: `cu_seqlens` says what the document ids say, and attention over segments
(varlen) computes what the block-diagonal mask computes: on CPU through `varlen_plain`, on CUDA through
torch's varlen flash attention. The model reads packed rows from `cu_seqlens` alone, on either path."""

from __future__ import annotations

import os

import pytest
import torch

import lora
from data import collate_packed, pack, plan_packing
from data.batching import segments_per_row
from data.encoding import Example
from helpers import GUANACO_SAMPLE, TOKENIZER_PATH, hf_checkpoint, randomize_lora_b, run, train_losses
from lora import LoRAConfig
from tinyllama import load_model
from tinyllama.loss import causal_lm_loss
from tinyllama.model import segment_ids
from tinyllama.runtime import RuntimePlan
from training.step import MODEL_INPUTS

CUDA = torch.device("cpu" if os.environ.get("GPU_TESTS_ON_CPU") else "cuda")  # as in test_cuda.py


def examples(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(3, 128, (n,), generator=g)
        ids[0] = 1
        labels = ids.clone()
        labels[0] = -100
        out.append(Example(ids, labels))
    return out


def packed_batch(lengths=(5, 9, 3, 12, 7, 2, 15, 4, 6), max_len=24):
    exs = examples(lengths)
    plan = plan_packing([len(e) for e in exs], max_len)
    return collate_packed(pack(exs, max_len), segments_per_row(plan)), plan


def test_cu_seqlens_marks_every_document_and_padding_tail():
    batch, plan = packed_batch()
    rows, max_len = batch["input_ids"].shape
    cu = batch["cu_seqlens"]
    assert cu.dtype == torch.int32 and len(cu) == rows * segments_per_row(plan) + 1
    total = rows * max_len
    used = cu[cu < total].tolist() + [total]
    # Segment boundaries are exactly where the document id changes or a row starts, in the flattened batch.
    docs = batch["document_ids"].flatten().tolist()
    starts = [i for i in range(total) if i % max_len == 0 or docs[i] != docs[i - 1]]
    assert used == starts + [total]
    assert (cu[len(used):] == total).all()  # the fixed-length padding: empty segments
    # The model's dense mask groups tokens by segment_ids(cu_seqlens): the same partition as the document ids.
    segments = segment_ids(cu, rows, max_len).flatten().tolist()
    pairs = {(d, r) for d, r in zip([f"{i // max_len}:{d}" for i, d in enumerate(docs)], segments, strict=True)}
    assert len(pairs) == len({d for d, _ in pairs}) == len({s for _, s in pairs})


def lora_model(path, varlen: bool, device: torch.device | None = None):
    torch.manual_seed(0)
    model = load_model(path, lora_config=LoRAConfig(4, 8, dropout=0.0, targets=("q_proj", "v_proj", "down_proj")))
    randomize_lora_b(model, seed=1)
    model.plan = RuntimePlan(device=device or torch.device("cpu"), varlen=varlen)
    return model


def model_inputs(batch):
    return {k: batch[k] for k in MODEL_INPUTS if k in batch}


def test_segments_compute_what_the_dense_mask_computes(hf_tiny):
    batch, _ = packed_batch()
    results = []
    for varlen in (False, True):
        model = lora_model(hf_tiny, varlen)
        loss, n = causal_lm_loss(model, batch["input_ids"], batch["labels"], **model_inputs(batch))
        (loss / n).backward()
        results.append((loss.detach(), {k: p.grad for k, p in model.named_parameters() if p.requires_grad}))
    (l_mask, g_mask), (l_seg, g_seg) = results
    torch.testing.assert_close(l_seg, l_mask)
    for k in g_mask:
        torch.testing.assert_close(g_seg[k], g_mask[k], msg=k)


def test_without_segments_the_documents_would_see_each_other(hf_tiny):
    # Negative control: the varlen path really separates documents (one segment per row would not).
    batch, _ = packed_batch()
    model = lora_model(hf_tiny, True).eval()
    rows, max_len = batch["input_ids"].shape
    whole_rows = torch.arange(0, rows * max_len + 1, max_len, dtype=torch.int32)
    with torch.no_grad():
        right = model(batch["input_ids"], position_ids=batch["position_ids"], cu_seqlens=batch["cu_seqlens"])
        wrong = model(batch["input_ids"], position_ids=batch["position_ids"], cu_seqlens=whole_rows)
    assert (right - wrong).abs().max() > 1e-2


@pytest.mark.slow
def test_train_py_packed_with_varlen_trains_like_the_dense_mask(tmp_path):
    ckpt = hf_checkpoint(tmp_path / "model", vocab_size=32000, hidden_size=32, intermediate_size=64)
    (ckpt / "tokenizer.model").write_bytes(TOKENIZER_PATH.read_bytes())
    common = dict(packing=True, batch_size=2, max_len=256, steps=3)
    _, mask = run(tmp_path, ckpt, "mask", varlen=False, **common)
    _, segments = run(tmp_path, ckpt, "segments", varlen=True, **common)
    assert train_losses(segments) == pytest.approx(train_losses(mask), rel=1e-5)
    assert [r["grad_norm"] for r in segments] == pytest.approx([r["grad_norm"] for r in mask], rel=1e-4)


@pytest.mark.cuda
def test_cuda_varlen_flash_attention_matches_the_dense_mask(hf_tiny):
    from tinyllama.runtime import varlen_kernel

    if varlen_kernel() is None and CUDA.type == "cuda":
        pytest.fail("this torch has no torch.nn.attention.varlen: packed rows fall back to the dense mask")
    batch, _ = packed_batch(max_len=64)
    batch = {k: v.to(CUDA) for k, v in batch.items()}
    results = []
    for varlen in (False, True):
        model = lora_model(hf_tiny, varlen, CUDA).to(CUDA, torch.bfloat16)
        for layer in lora.lora_layers(model).values():
            layer.lora_A.float(), layer.lora_B.float()
        with torch.autocast(CUDA.type, dtype=torch.bfloat16):
            loss, n = causal_lm_loss(model, batch["input_ids"], batch["labels"], **model_inputs(batch))
        (loss / n).backward()
        results.append((loss.detach().float(), [p.grad.float() for p in model.parameters() if p.requires_grad]))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=2e-2, atol=2e-2)
    for a, b in zip(results[0][1], results[1][1], strict=True):
        torch.testing.assert_close(b, a, rtol=5e-2, atol=5e-3)


@pytest.mark.slow
def test_packed_rows_may_be_longer_than_the_context_with_each_conversation_cut_at_it(tmp_path):
    import train
    from training import parallel

    ckpt = hf_checkpoint(tmp_path / "model", vocab_size=32000, hidden_size=32, intermediate_size=64,
                         max_position_embeddings=64)
    (ckpt / "tokenizer.model").write_bytes(TOKENIZER_PATH.read_bytes())
    config = load_model(ckpt).config
    cfg = train.TrainConfig(model=str(ckpt), data=str(GUANACO_SAMPLE), eval_data="none", rank=4, packing=True,
                            max_len=128, batch_size=1, steps=1, samples=False)
    assert train.context_problem(cfg, config) is None  # rows of 128 > 64 positions: allowed when packing
    run_ = train.load_run(cfg, train.validate(cfg), parallel.Process(torch.device("cpu")), None, tmp_path / "run")
    lengths = [len(e) for e in run_.stream.examples]
    assert run_.stream.max_len == 128 and max(lengths) == 64  # the longer conversations were cut at 64
    assert max(sum(lengths[i] for i in row) for row in run_.stream.rows) > 64  # rows pack past the context
    unpacked = train.TrainConfig(model=str(ckpt), packing=False, max_len=128)
    assert "longer than the model's max_position_embeddings (64)" in train.context_problem(unpacked, config)
