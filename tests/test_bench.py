"""The training benchmark's invariants: its FLOP count, its results rows, its token counting, its W2 data.

No timing is asserted: the numbers a benchmark measures depend on the machine. What must hold everywhere is
that it counts the right things (FLOPs by the stated formula, real tokens of the batches both systems saw) and
writes them in the promised shape.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
import torch

from bench import bench, tables
from bench import workloads as wl
from helpers import TINY
from lora import LoRAConfig
from tinyllama import LlamaConfig
from tinyllama.flops import training_flops_per_token

ROW_KEYS = {"system": str, "workload": str, "rank": int, "steps": int, "seconds": float, "tokens_per_s": float,
            "device": str, "mfu": float, "peak_flops": float, "trainable_params": int, "total_params": int,
            "padding_fraction": float, "tokens": int}


def test_flops_per_token_matches_a_hand_count():
    # TINY: width 64, 4 heads of 16 (q 64), 2 KV heads (k, v 32), MLP 96, 2 layers, vocabulary 128.
    config = LlamaConfig(**{k: v for k, v in TINY.items()})
    per_layer = 64 * 64 + 64 * 32 + 64 * 32 + 64 * 64 + 3 * 64 * 96  # q, k, v, o, gate/up/down = 30,720
    base = 4 * (2 * per_layer + 64 * 128)  # forward 2N + input-gradient backward 2N; LM head included
    attention = 3 * 2 * 64 * 32 * 2  # (QK^T and AV: 2 x 2 x q_dim x seq/2) x 3 for backward, per layer
    adapters = 6 * 4 * ((64 + 96) + (64 + 96) + (96 + 64)) * 2  # rank 4 on gate, up, down
    assert training_flops_per_token(config, LoRAConfig(rank=4, alpha=4.0), seq_len=32) == base + attention + adapters
    assert training_flops_per_token(config, None, seq_len=32) == base + attention


def test_synthetic_w2_is_deterministic_per_seed():
    a, b, c = (wl.synthetic_conversations(50, seed=s) for s in (3, 3, 4))
    assert a == b
    assert a != c


def test_synthetic_w2_lengths_follow_the_stated_distribution(tokenizer):
    p = wl.W2_LENGTHS
    rows = wl.synthetic_conversations(2000, seed=0)
    human = [h for r in rows for h, _ in r["lengths"]]
    reply = [a for r in rows for _, a in r["lengths"]]
    assert statistics.median(human) == pytest.approx(p["human_median"], rel=0.1)
    assert statistics.median(reply) == pytest.approx(p["assistant_median"], rel=0.1)
    single = sum(len(r["lengths"]) == 1 for r in rows) / len(rows)
    assert single == pytest.approx(1 - p["p_another_exchange"], abs=0.03)
    # Every word is one token, so the planned lengths are the token lengths of the text.
    for r in rows[:100]:
        turns = [t.split("### Assistant: ") for t in r["text"].split("### Human: ")[1:]]
        for (h_text, a_text), (h, a) in zip(turns, r["lengths"], strict=True):
            assert len(tokenizer.encode(h_text, bos=False)) == h
            assert len(tokenizer.encode(a_text, bos=False)) == a


@pytest.mark.slow
def test_synthetic_w2_through_the_real_pipeline_has_the_stated_mean(tmp_path, tokenizer):
    from data import encode_all, load_conversations

    path = wl.write_synthetic_guanaco(tmp_path / "w2.jsonl", 600, seed=0)
    examples, report = encode_all(load_conversations(str(path)), tokenizer, max_len=100_000)
    assert len(examples) == 600 and not report.skipped
    mean = statistics.mean(len(e) for e in examples)
    assert mean == pytest.approx(wl.expected_mean_tokens(), rel=0.1)


@pytest.fixture(scope="module")
def tiny_results(tmp_path_factory):
    """A whole benchmark on the tiny shape: this project on W1 and every W2, and transformers + peft eager."""
    pytest.importorskip("peft")
    out = tmp_path_factory.mktemp("results")
    argv = ["--device", "cpu", "--shape", "tiny", "--steps", "3", "--warmup-steps", "1", "--ranks", "4",
            "--focus-rank", "4", "--systems", "this,hf-eager", "--no-decode", "--out-dir", str(out),
            "--name", "tiny"]
    results = bench.main(argv)
    return results, out


@pytest.mark.slow
def test_results_files_hold_one_row_per_system_workload_rank(tiny_results):
    results, out = tiny_results
    saved = json.loads((out / "tiny.json").read_text())
    assert (out / "tiny.md").is_file()
    assert saved["torch"] == torch.__version__ and saved["device"] == results["device"]
    keys = [(r["system"], r["workload"], r["rank"]) for r in saved["rows"]]
    assert sorted(keys) == sorted([("this", w, 4) for w in wl.WORKLOADS]
                                  + [("hf-eager", w, 4) for w in ("W1", "W2-padded", "W2-packed")])
    assert not saved["errors"]
    for r in saved["rows"]:
        for k, kind in ROW_KEYS.items():
            assert isinstance(r[k], kind) or (kind is float and isinstance(r[k], int)), (k, r[k])
        assert r["steps"] == 3 and r["peak_gib"] is None  # CPU: no peak memory
        assert r["mfu"] == pytest.approx(r["tokens_per_s"] * r["flops_per_token"] / r["peak_flops"])
        assert r["seconds"] == pytest.approx(sum(r["step_s"]))
        assert r["step_s"][0] <= r["first_step_s"] <= r["wall_s"]  # start of the run to the end of its first step
    # Both systems build the same model: the same parameter counts.
    ours, hf = (next(r for r in saved["rows"] if r["system"] == s and r["workload"] == "W1" and r["rank"] == 4)
                for s in ("this", "hf-eager"))
    assert (ours["trainable_params"], ours["total_params"]) == (hf["trainable_params"], hf["total_params"])


@pytest.mark.slow
def test_tokens_counted_are_the_non_pad_tokens_of_the_batches(tiny_results, tmp_path, tokenizer):
    """Recount, from the batches themselves, the real tokens each run saw (bench.py already checks train.py's
    own count against its replay; this checks the replay and the baseline's counting)."""
    from data import BatchStream, encode_all, load_conversations
    from data.synthetic import random_examples

    results, _ = tiny_results
    batch, seq, w2_len, scale = wl.BATCHING["tiny"]
    works = wl.workloads("tiny")
    n_conv = max(256, 3 * 3 * batch)
    path = wl.write_synthetic_guanaco(tmp_path / "w2.jsonl", n_conv, seed=0, scale=scale)
    w1 = random_examples(3 * batch, seq, 32000, seed=0)

    def real_tokens(name, examples=None, **kw):
        w = works[name]
        if examples is None:
            examples, _ = encode_all(load_conversations(str(path)), tokenizer, w.max_len)
        stream = BatchStream(examples, w.batch_size, w.max_len, seed=0, packing=w.packing, **kw)
        total = 0
        for _ in range(3):
            b = next(stream)
            real = b["attention_mask"].bool() if "attention_mask" in b else b["document_ids"].ge(0)
            total += int(real.sum())
        return total

    expected = {("this", "W1"): real_tokens("W1", w1), ("hf-eager", "W1"): real_tokens("W1", w1),
                ("this", "W2-padded"): real_tokens("W2-padded", group_by_length=True),
                ("hf-eager", "W2-padded"): real_tokens("W2-padded"),  # pad-to-longest
                **{(s, n): real_tokens(n) for s in ("this", "hf-eager") for n in ("W2-packed", *wl.LONG_ROWS)}}
    assert expected[("this", "W1")] == 3 * batch * seq
    for r in results["rows"]:
        if r["rank"] == 4:
            assert r["tokens"] == expected[(r["system"], r["workload"])], (r["system"], r["workload"])
    packed = next(r for r in results["rows"] if r["workload"] == "W2-packed")
    assert 0 < packed["padding_fraction"] < 1


@pytest.mark.slow
def test_combine_merges_stage_results(tiny_results, tmp_path):
    results, out = tiny_results
    a = {**results, "rows": [r for r in results["rows"] if r["system"] == "this"], "command": "a"}
    b = {**results, "rows": [r for r in results["rows"] if r["system"] != "this"], "command": "b"}
    (tmp_path / "a.json").write_text(json.dumps(a))
    (tmp_path / "b.json").write_text(json.dumps(b))
    merged = bench.main(["--combine", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--out-dir",
                         str(tmp_path), "--name", "all"])
    assert len(merged["rows"]) == len(results["rows"])
    assert "vs best HF" in (tmp_path / "all.md").read_text()


def test_combine_reads_the_results_files_in_the_tree(tmp_path):
    """Results written by earlier versions of the benchmark (bench/results/) still combine and render."""
    files = sorted((Path(bench.__file__).parent / "results").glob("*.json"))
    if not files:
        pytest.skip("no results files in bench/results")
    for path in files:
        saved = json.loads(path.read_text())
        merged = bench.main(["--combine", str(path), "--out-dir", str(tmp_path), "--name", path.stem])
        assert merged["rows"] == saved["rows"]
        md = (tmp_path / f"{path.stem}.md").read_text()
        assert md.startswith(f"# {tables.title(saved)}\n") and "## Setup" in md


def test_the_default_plan_runs_the_rank_table_then_w2_then_the_baselines():
    args = bench.parse_args(["--baseline", "hf"])
    runs = bench.plan(args, [4, 16, 64, 256], list(wl.WORKLOADS), ["this", *bench.HF_SYSTEMS])
    hf = ("W1", "W2-padded", "W2-packed")
    assert runs == ([("this", "W1", r) for r in (4, 16, 64, 256)] + [("this", w, 64) for w in wl.WORKLOADS[1:]]
                    + [(s, w, 64) for s in ("hf-eager", "hf-compile", "hf-liger") for w in hf])


def test_variants_are_typed_train_settings_run_last_and_cannot_change_the_batches():
    name, overrides = bench.parse_variant("whole:compile=true;compile_scope=model;lr=1e-3;warmup=3")
    assert name == "whole"
    assert overrides == {"compile": True, "compile_scope": "model", "lr": 1e-3, "warmup": 3}
    assert bench.parse_variant("plain:")[1] == {}
    for bad in ("whole:compile_scpoe=model", ":compile=true", "big:batch_size=16", "long:max_len=2048"):
        with pytest.raises(SystemExit, match="--variant"):
            bench.parse_variant(bad)
    args = bench.parse_args(["--variant", "cg:compile=true", "--variant-workloads", "W1,W2-padded"])
    runs = bench.plan(args, [64], ["W1", "W2-padded"], ["this"])
    assert runs == [("this", "W1", 64), ("this", "W2-padded", 64), ("this[cg]", "W1", 64),
                    ("this[cg]", "W2-padded", 64)]


@pytest.mark.slow
def test_shapes_benchmark_counts_each_runs_parameters_and_refuses_unknown_variants(tmp_path):
    from bench import shape_bench
    from tinyllama.config import LlamaConfig as Config
    from tinyllama.model import num_parameters
    from tinyllama.shapes import named_shape

    rows = shape_bench.main(["--device", "cpu", "--tiny", "--steps", "2", "--warmup-steps", "1", "--max-len", "32",
                        "--rank", "4", "--runs", "smollm2-1.7b:nf4-dq-gc,llama-3.2-1b:bf16", "--out", str(tmp_path)])
    assert [r["run"] for r in rows] == ["smollm2-1.7b:nf4-dq-gc", "llama-3.2-1b:bf16"]
    assert [(r["quantize"], r["double_quant"], r["grad_checkpointing"]) for r in rows] == [
        ("nf4", True, True), ("none", False, False)]
    for row in rows:
        assert "error" not in row, row
        config = Config.from_dict(shape_bench.tiny(named_shape(row["shape"])))
        lora = config.num_hidden_layers * 4 * 3 * (config.hidden_size + config.intermediate_size)
        assert (row["trainable"], row["total"]) == (lora, num_parameters(config) + lora)
    saved = json.loads((tmp_path / "shapes.json").read_text())
    assert saved["rows"] == rows and "smollm2-1.7b:nf4-dq-gc" in (tmp_path / "shapes.md").read_text()
    for bad in ("llama-2-7b:bf16-dq", "llama-9b:nf4", "llama-2-7b:int8"):
        with pytest.raises(SystemExit, match="expected SHAPE:VARIANT"):
            shape_bench.parse_run(bad)


def test_step_ab_alternates_the_trees_and_compares_their_median_steps():
    """ABBA per round; per (system, workload, rank) each tree's runs' medians, their median, and this / base."""
    from bench import step_ab

    assert step_ab.order(2) == ["base", "this", "this", "base"] * 2

    def result(w1_ms, packed_ms):
        return {"rows": [{"system": "this", "workload": "W1", "rank": 64, "step_ms_median": w1_ms},
                         {"system": "this", "workload": "W2-packed", "rank": 64, "step_ms_median": packed_ms}]}

    runs = [("base", result(100.0, 200.0)), ("this", result(90.0, 210.0)), ("this", result(96.0, 214.0)),
            ("base", result(104.0, 196.0))]
    table = {r["workload"]: r for r in step_ab.summarize(runs)}
    assert table["W1"]["base_ms"] == [100.0, 104.0] and table["W1"]["this_ms"] == [90.0, 96.0]
    assert table["W1"]["base_median_ms"] == 102.0 and table["W1"]["this_median_ms"] == 93.0
    assert table["W1"]["this_over_base"] == pytest.approx(93.0 / 102.0)
    assert table["W2-packed"]["this_over_base"] == pytest.approx(212.0 / 198.0)
    assert "| this | W1 | 64 | 102.0 (100.0-104.0) | 93.0 (90.0-96.0) | 0.912 |" in step_ab.lines(list(table.values()))
