"""The transformers + peft configurations the benchmark compares with: padding-free packed rows (no token attends
across documents), Liger-Kernel (skipped on a CPU; its process-wide patch undone), the plan that orders them, the
step counts per run, the longer packed rows, and the report's ratios against the best of them."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import sys
import types

import pytest
import torch

from bench import bench, hf_baseline, tables
from bench import workloads as wl
from data import IGNORE_INDEX, BatchStream, Example
from helpers import TINY
from lora import LoRAConfig
from tinyllama import LlamaConfig

pytestmark = pytest.mark.skipif(importlib.util.find_spec("peft") is None,
                                reason="needs peft, the baseline: pip install -e .[test]")


def _documents(vocab: int, seed: int = 0) -> list[Example]:
    """Prompt-masked documents of assorted lengths: BOS first, never labelled, as every encoded example."""
    g = torch.Generator().manual_seed(seed)
    docs = []
    for n in (5, 9, 3, 12, 7, 4, 10, 6):
        ids = torch.randint(3, vocab, (n,), generator=g)
        ids[0] = 1
        labels = ids.clone()
        labels[: max(1, n // 3)] = IGNORE_INDEX
        docs.append(Example(ids, labels))
    return docs


def _model(device="cpu", dtype=torch.float32, seed=0):
    model = hf_baseline.build_model(LlamaConfig(**TINY), LoRAConfig(rank=4, alpha=8.0, dropout=0.0),
                                    torch.device(device), dtype, seed=seed)
    g = torch.Generator(device).manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # B starts at zero: give the adapters a say in the loss
                p.normal_(0, 0.1, generator=g)
            elif "q_proj" in name or "k_proj" in name:  # sharper attention: what a token attends to shows
                p.mul_(8)
    return model


def _loss_sum(model, inputs: dict) -> torch.Tensor:
    """transformers' loss (a mean over the labelled tokens it predicts) times their number: a sum."""
    labelled = (inputs["labels"][:, 1:] != IGNORE_INDEX).sum()
    return model(**inputs).loss * labelled


def _packed_batch():
    stream = BatchStream(_documents(TINY["vocab_size"]), 2, 32, packing=True, seed=0)
    batch = next(stream)
    assert (batch["document_ids"].amax(dim=1) >= 1).all(), "every row should hold several documents"
    return batch


def _alone(batch) -> list[dict]:
    """Each document of a packed batch as a batch of its own (no position_ids, no mask: a plain sequence)."""
    out = []
    for row in range(batch["input_ids"].shape[0]):
        docs = batch["document_ids"][row]
        for d in docs[docs >= 0].unique():
            keep = docs == d
            out.append({k: batch[k][row][keep][None] for k in ("input_ids", "labels")})
    return out


def test_packed_rows_go_to_transformers_padding_free():
    batch = _packed_batch()
    assert set(hf_baseline.model_inputs(batch)) == {"input_ids", "position_ids", "labels"}
    padded = next(BatchStream(_documents(TINY["vocab_size"]), 2, 32, seed=0))
    assert set(hf_baseline.model_inputs(padded)) == {"input_ids", "attention_mask", "labels"}


def test_hf_packed_loss_is_the_sum_of_each_documents_loss_alone():
    """transformers finds the documents from the position_ids and attends within each only: the packed loss
    (as a sum) equals the documents' losses run one by one, and differs when the packing is hidden from it."""
    model = _model()
    batch = _packed_batch()
    with torch.no_grad():
        packed = _loss_sum(model, hf_baseline.model_inputs(batch))
        alone = sum(_loss_sum(model, doc) for doc in _alone(batch))
        hidden = dict(hf_baseline.model_inputs(batch), position_ids=torch.arange(32).expand(2, -1))
        across = _loss_sum(model, hidden)  # one sequence per row: documents see each other
    assert packed.item() == pytest.approx(alone.item(), rel=1e-5)
    assert abs(across.item() - alone.item()) > 100 * 1e-5 * abs(alone.item())  # far outside that tolerance


def test_hf_packed_gradients_are_those_of_the_documents_alone():
    grads = []
    for inputs in ([hf_baseline.model_inputs(_packed_batch())], _alone(_packed_batch())):
        model = _model()
        sum(_loss_sum(model, x) for x in inputs).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    for name, g in grads[0].items():
        torch.testing.assert_close(g, grads[1][name], rtol=1e-4, atol=1e-6, msg=name)


def test_hf_baseline_trains_on_packed_rows_and_times_its_first_step():
    def stream():
        return BatchStream(_documents(TINY["vocab_size"]) * 4, 2, 32, packing=True, seed=0)

    r = hf_baseline.run(LlamaConfig(**TINY), LoRAConfig(rank=4, alpha=4.0), stream(), 3, "cpu", torch.float32)
    assert len(r["step_s"]) == 3 and all(x > 0 for x in r["step_s"])
    assert r["first_step_s"] >= r["step_s"][0]
    same = stream()
    assert r["tokens"] == [int(next(same)["document_ids"].ge(0).sum()) for _ in range(3)]


# ---- Liger-Kernel ------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_hf_liger_is_skipped_on_a_cpu_with_a_note(tmp_path):
    res = bench.main(["--device", "cpu", "--shape", "tiny", "--steps", "2", "--workloads", "W1,W2-packed",
                      "--systems", "hf-liger", "--focus-rank", "4", "--no-decode", "--out-dir", str(tmp_path),
                      "--name", "liger"])
    assert res["rows"] == []
    assert len(res["errors"]) == 2 and all("skipped" in e and "CUDA" in e for e in res["errors"])
    assert "## Runs that failed or were skipped" in (tmp_path / "liger.md").read_text()


def test_liger_patch_is_undone_when_its_runs_end(monkeypatch):
    """apply_liger_kernel_to_llama replaces names in transformers' modeling_llama for the whole process; after
    `liger_kernels()` every one is transformers' own again (a stand-in patch here: Liger needs Triton)."""
    from transformers.models.llama import modeling_llama as m

    class FakeNorm(torch.nn.Module):
        pass

    def patch(rope, rms_norm, swiglu, fused_linear_cross_entropy):
        m.apply_rotary_pos_emb, m.LlamaRMSNorm, m.LlamaMLP = (lambda *a: a), FakeNorm, FakeNorm
        m.LlamaForCausalLM.forward = lambda self, **kw: None
        m.LIGER_ONLY = True

    fake = types.ModuleType("liger_kernel.transformers")
    fake.apply_liger_kernel_to_llama = patch
    monkeypatch.setitem(sys.modules, "liger_kernel", types.ModuleType("liger_kernel"))
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", fake)
    before = (m.apply_rotary_pos_emb, m.LlamaRMSNorm, m.LlamaMLP, m.LlamaForCausalLM.forward)
    with hf_baseline.liger_kernels():
        assert m.LlamaRMSNorm is FakeNorm and m.LlamaForCausalLM.forward is not before[3]
    assert (m.apply_rotary_pos_emb, m.LlamaRMSNorm, m.LlamaMLP, m.LlamaForCausalLM.forward) == before
    assert not hasattr(m, "LIGER_ONLY") and "forward" in vars(m.LlamaForCausalLM)


@pytest.mark.cuda
def test_liger_packed_loss_and_gradients_match_plain_transformers():
    """On a GPU with Liger-Kernel importable (gpu_check.sh installs it): the hf-liger configuration trains on
    packed rows padding-free and computes what plain transformers does, in float32."""
    if not torch.cuda.is_available() or os.environ.get("GPU_TESTS_ON_CPU"):
        pytest.skip("Liger-Kernel's Triton kernels need a CUDA device")
    pytest.importorskip("liger_kernel.transformers")
    batch = {k: v.cuda() for k, v in hf_baseline.model_inputs(_packed_batch()).items()}
    out = []
    for liger in (False, True):
        with hf_baseline.liger_kernels() if liger else contextlib.nullcontext():
            model = _model("cuda")
            if liger:
                hf_baseline.check_liger(model)
            loss = model(**batch).loss
            loss.backward()
        out.append((loss.item(), {n: p.grad.float() for n, p in model.named_parameters() if p.requires_grad}))
    assert out[1][0] == pytest.approx(out[0][0], rel=1e-4)
    for name, g in out[0][1].items():
        torch.testing.assert_close(out[1][1][name], g, rtol=1e-3, atol=1e-5, msg=name)


# ---- the plan, the step counts, the longer rows ------------------------------------------------------------

def test_baseline_hf_runs_every_transformers_configuration_liger_last():
    args = bench.parse_args(["--baseline", "hf", "--variant", "plain:fused_mlp=false"])
    runs = bench.plan(args, [64], list(wl.WORKLOADS), ["this", *bench.HF_SYSTEMS])
    hf = [r for r in runs if r[0].startswith("hf")]
    assert {(s, w) for s, w, _ in hf} == {(s, w) for s in bench.HF_SYSTEMS for w in ("W1", "W2-padded", "W2-packed")}
    assert [s for s, _, _ in runs][-4:-1] == ["hf-liger"] * 3  # after every other transformers run ...
    assert runs[-1][0] == "this[plain]"  # ... and only this project's variants after it
    assert {w for s, w, _ in runs if s == "this"} == set(wl.WORKLOADS)  # the longer rows: this project only


def test_run_steps_patterns_set_the_steps_of_matching_runs():
    ctx = types.SimpleNamespace(steps=128, run_steps=bench.parse_run_steps(
        "W2-packed-4096=64,hf-*:W2-padded=32,hf-compile=16,this[plain]:W1=8"))
    assert bench.steps_for("this", "W1", ctx) == 128
    assert bench.steps_for("this", "W2-packed-4096", ctx) == 64
    assert bench.steps_for("hf-eager", "W2-padded", ctx) == 32
    assert bench.steps_for("hf-compile", "W2-padded", ctx) == 16  # the last match wins
    assert bench.steps_for("this[plain]", "W1", ctx) == 8  # brackets are a name, not a character class
    for bad in ("W1", "W1=0", "=5", "W1=x"):
        with pytest.raises(SystemExit, match="--run-steps"):
            bench.parse_run_steps(bad)


def test_longer_packed_rows_hold_as_many_tokens_per_batch():
    works = wl.workloads("full")
    assert [(works[n].batch_size, works[n].max_len) for n in ("W2-packed", "W2-packed-2048", "W2-packed-4096")] \
        == [(8, 1024), (4, 2048), (2, 4096)]
    assert all(works[n].packing for n in wl.LONG_ROWS)
    assert wl.baseline_workload(works["W2-packed"]) == works["W2-packed"]  # the baseline trains on the same rows
    assert not wl.baseline_workload(works["W2-padded"]).group_by_length


@pytest.mark.slow
def test_rows_longer_than_the_context_cut_each_conversation_there(tmp_path, monkeypatch):
    """train.py packs rows longer than the model's context with every conversation cut at the context; the
    benchmark's replay of its batches (checked against train.py's own token count) must cut them the same way."""
    monkeypatch.setitem(wl.BENCH_SHAPES, "tiny", {**wl.BENCH_SHAPES["tiny"], "max_position_embeddings": 96})
    res = bench.main(["--device", "cpu", "--shape", "tiny", "--steps", "3", "--warmup-steps", "1", "--ranks", "",
                      "--focus-rank", "4", "--workloads", "W2-packed-4096", "--no-decode", "--out-dir",
                      str(tmp_path), "--name", "long"])
    assert not res["errors"], res["errors"]
    (row,) = res["rows"]
    assert row["max_len"] == 256 and row["batch_size"] == 1 and row["first_step_s"] > 0
    saved = json.loads((tmp_path / "long.json").read_text())
    assert saved["workloads"]["W2-packed-4096"]["max_len"] == 256


# ---- the report: every ratio against the best transformers + peft run --------------------------------------

def _row(system, workload, tps, rank=64, **kw):
    return dict(system=system, workload=workload, rank=rank, tokens_per_s=tps, **kw)


def test_ratios_are_against_the_best_hf_run_of_the_workload_family():
    rows = [_row("hf-eager", "W1", 40.0), _row("hf-compile", "W1", 80.0), _row("hf-liger", "W1", 60.0),
            _row("hf-eager", "W2-padded", 10.0), _row("hf-liger", "W2-packed", 50.0),
            _row("this", "W1", 100.0), _row("this", "W2-packed", 150.0), _row("this", "W2-packed-4096", 200.0),
            _row("this", "W1", 30.0, rank=4)]
    assert tables.best_hf(rows, "W1", 64)["system"] == "hf-compile"
    assert tables.best_hf(rows, "W2-padded", 64)["system"] == "hf-liger"
    assert tables.vs_best_hf(rows[5], rows) == 1.25
    assert tables.vs_best_hf(rows[6], rows) == 3.0  # W2 against W2-padded or W2-packed, whichever is faster
    assert tables.vs_best_hf(rows[7], rows) == 4.0
    assert tables.vs_best_hf(rows[0], rows) == 0.5  # a transformers run against the best of them
    assert tables.vs_best_hf(rows[8], rows) is None  # no transformers run at rank 4


def _results(rows, device_type="cuda", shape="full"):
    base = dict(steps=128, warmup_steps=5, step_s=[0.1] * 128, seconds=12.8, step_ms=100.0, step_ms_median=100.0,
                padding_fraction=0.0, mfu=0.3, peak_gib=None, compile=False, max_len=1024, wall_s=20.0)
    return {"rows": [{**base, **r} for r in rows], "device_type": device_type, "shape": shape,
            "targets": tables.TARGETS}


def test_every_target_line_says_met_not_met_or_not_measured_and_why():
    rows = [_row("this", "W1", 130_000.0, peak_gib=7.5, max_len=512), _row("this", "W1", 100_000.0, rank=4),
            _row("this-compile", "W1", 125_000.0, compile=True, first_step_s=75.0),
            _row("this", "W2-packed", 100_000.0), _row("hf-compile", "W2-packed", 60_000.0),
            _row("hf-eager", "W2-padded", 20_000.0)]
    lines = tables.target_checks(_results(rows))
    assert len(lines) == 7 and all(x.startswith(("- MET:", "- NOT MET:", "- not measured (")) for x in lines)
    text = "\n".join(lines)
    assert "- MET: W1 rank 64 >= 120,000 tokens/s: 130,000" in text
    assert "- NOT MET: W2 packed >= 110,000 useful tokens/s" in text
    assert "- MET: W2 useful tokens/s >= 1.5x the best transformers + peft configuration: 1.67x" in text
    assert "hf-compile W2-packed 60,000 useful tokens/s" in text  # names the best transformers run
    assert "- MET: W1 rank 64 peak memory <= 8 GiB: 7.50" in text
    assert "- NOT MET: compile warm-up <= 60 s" in text and "this-compile W1 75.0 s" in text
    assert "- not measured (a CPU target; this run is on CUDA)" in text
    cpu = "\n".join(tables.target_checks(_results(rows, "cpu", "cpu")))
    assert "- not measured (a GPU target at the full shape; this run: cpu, cpu shape): W1 rank 64 >= 120,000" in cpu
    assert "- not measured (no W1 run at rank 64 of hf-eager)" in cpu


@pytest.mark.slow
def test_activation_bench_measures_both_stacks_alike(monkeypatch):
    """bench.activation_bench on a small width: the fused MLP saves less than the plain one, which saves less
    than transformers + peft, and all three do about the same work (FLOPs within 10% at this small width; within
    1% at TinyLlama's, where the fused MLP's extra LoRA products and transformers' extra elementwise work are
    negligible)."""
    from bench import activation_bench as ab

    monkeypatch.setattr(ab, "CONFIG", dict(ab.CONFIG, vocab_size=512, hidden_size=128, intermediate_size=352,
                                           num_attention_heads=4, num_key_value_heads=2))
    monkeypatch.setattr(ab, "LENGTH", 64)
    rows = {"plain": ab.ours(fused=False), "fused": ab.ours(fused=True), "hf": ab.transformers_peft()}
    saved = {k: r["saved_bytes_per_token_per_layer"] for k, r in rows.items()}
    assert saved["fused"] < saved["plain"] < saved["hf"]
    flops = [r["flops_per_token"] for r in rows.values()]
    assert max(flops) / min(flops) < 1.1
    assert all(r["aten_ops"] > 50 for r in rows.values())
    assert "| transformers + peft | " in ab.table({"transformers + peft": rows["hf"]})
