"""The training loop: learning, loss normalisation, resume, data parallel, errors, and checkpoints."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

import lora
import train
from data import BatchStream, eval_batches, load_examples
from helpers import (
    GUANACO_SAMPLE,
    TOKENIZER_PATH,
    adapter_weights,
    hf_checkpoint,
    randomize_lora_b,
    run,
    train_losses,
)
from tinyllama import load_model, reference_loss
from tinyllama.runtime import RuntimePlan, sdpa_context
from training import TrainingError, run_folder
from training.step import batch_loss, evaluate, is_right_padded, prepare

pytest.importorskip("transformers")


@pytest.mark.slow
def test_overfits_a_few_sequences_when_lora_has_the_capacity(tmp_path):
    # Small vocabulary, rank near the width, adapters everywhere: LoRA alone can memorise 4 sequences. (With
    # HF's default init std 0.02 the frozen LM head caps every logit near 1.3, so the loss cannot fall far.)
    ckpt = hf_checkpoint(tmp_path / "small_vocab", seed=0, vocab_size=64, initializer_range=0.3)
    summary, rows = run(tmp_path, ckpt, data="random:4", max_len=24, rank=32, alpha=32.0, lr=1e-2, steps=60,
                        batch_size=4, targets="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")
    losses = train_losses(rows)
    assert losses[-1] < losses[0] / 3, f"loss {losses[0]:.3f} -> {losses[-1]:.3f}"


@pytest.mark.slow
def test_grad_accumulation_weights_tokens_not_micro_batches(tmp_path, tiny_ckpt):
    # 8x1 and 2x4 see the same 8 conversations per step; the micro-batches have very different labelled-token
    # counts, so a mean of per-micro-batch means would give a different gradient (norm and direction).
    rows = GUANACO_SAMPLE.read_text().splitlines()
    data = tmp_path / "sixteen.jsonl"  # 16 rows: both settings cut epochs into the same whole steps
    data.write_text("\n".join((rows * 2)[:16]) + "\n")
    _, one = run(tmp_path, tiny_ckpt, "bs8", data=str(data), batch_size=8, grad_accum=1, grad_clip=0.0)
    _, four = run(tmp_path, tiny_ckpt, "bs2x4", data=str(data), batch_size=2, grad_accum=4, grad_clip=0.0)
    for a, b in zip(one, four, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    assert_same_adapters(tmp_path / "bs8", tmp_path / "bs2x4", atol=1e-5)


def assert_same_adapters(a, b, rtol=1e-5, atol=1e-8):
    """The adapters of two run folders hold the same keys, and values within rtol/atol (torch.allclose's
    defaults; rtol=atol=0: equal)."""
    wa, wb = adapter_weights(a), adapter_weights(b)
    assert wa.keys() == wb.keys() and wa
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=rtol, atol=atol, msg=lambda m, k=k: f"{k}: {m}")


def test_lr_schedules_by_hand():
    # lr 1e-3, 4 warmup steps, 10 steps (0-based): warmup lr * (step + 1) / 4 reaches 1e-3 at its last step, then
    # progress = (step - 4) / 6 runs from 0 at step 4 to 5/6 at the last step, 9 (the schedule's 0 lies one past).
    # Cosine: lr * (1 + cos(pi * progress)) / 2, which is lr * (2 - sqrt(3)) / 4 at progress 5/6.
    expected = {  # step: lr
        "cosine": {0: 2.5e-4, 1: 5e-4, 3: 1e-3, 4: 1e-3, 7: 5e-4, 9: 1e-3 * (2 - 3 ** 0.5) / 4},
        "linear": {0: 2.5e-4, 1: 5e-4, 3: 1e-3, 4: 1e-3, 7: 5e-4, 9: 1e-3 / 6},
        "constant": {0: 2.5e-4, 1: 5e-4, 3: 1e-3, 4: 1e-3, 7: 1e-3, 9: 1e-3},
    }
    for schedule, want in expected.items():
        cfg = train.TrainConfig(lr=1e-3, warmup=4, schedule=schedule)
        got = {step: train.lr_at(step, cfg, 10) for step in want}
        assert got == pytest.approx(want, rel=1e-9, abs=0), schedule
    # No warmup: the first step runs at the full lr; of 4 steps the last is at progress 3/4.
    no_warmup = {"cosine": (1e-3, 1e-3 * (2 - 2 ** 0.5) / 4), "linear": (1e-3, 2.5e-4), "constant": (1e-3, 1e-3)}
    for schedule, want in no_warmup.items():
        cfg = train.TrainConfig(lr=1e-3, warmup=0, schedule=schedule)
        assert (train.lr_at(0, cfg, 4), train.lr_at(3, cfg, 4)) == pytest.approx(want, rel=1e-9, abs=0), schedule


@pytest.mark.slow
def test_resume_continues_exactly(tmp_path, tiny_ckpt):
    common = dict(schedule="constant", dropout=0.1, steps=6, save_every=3)
    _, full = run(tmp_path, tiny_ckpt, "full", **common)
    _, first = run(tmp_path, tiny_ckpt, "half", **{**common, "steps": 3})
    _, both = run(tmp_path, tiny_ckpt, "half", **common, resume=str(tmp_path / "half"))
    assert train_losses(first) == train_losses(full)[:3]
    assert train_losses(both) == train_losses(full)  # a resumed run appends to metrics.jsonl
    assert_same_adapters(tmp_path / "full", tmp_path / "half", rtol=0, atol=0)


@pytest.mark.slow
def test_resume_from_a_mid_run_checkpoint_with_a_decaying_schedule(tmp_path, tiny_ckpt):
    common = dict(schedule="cosine", warmup=2, dropout=0.1, steps=6, save_every=3, keep_checkpoints=0)
    _, full = run(tmp_path, tiny_ckpt, "full", **common)
    _, resumed = run(tmp_path, tiny_ckpt, "resumed", **common, resume=str(tmp_path / "full" / "checkpoint-3"))
    # The new folder's metrics.jsonl holds the whole run: steps 1-3 from the checkpoint's run, 4-6 run here.
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    assert train_losses(resumed) == train_losses(full)
    assert_same_adapters(tmp_path / "full", tmp_path / "resumed", rtol=0, atol=0)


@pytest.mark.slow
def test_a_checkpoint_resumes_on_any_split_of_its_rows_per_step(tmp_path, tiny_ckpt):
    # 11 conversations, 4 rows a step: 2 steps an epoch, so checkpoint-3 is in the middle of the second epoch.
    # No dropout: a micro-batch of another size would draw other masks (train.dropout_seed).
    common = dict(schedule="cosine", warmup=1, steps=4, save_every=3, keep_checkpoints=0)
    _, full = run(tmp_path, tiny_ckpt, "full", batch_size=4, grad_accum=1, **common)
    checkpoint = tmp_path / "full" / "checkpoint-3"
    state = run_folder.read_state(checkpoint)
    assert {k: state["stream"][k] for k in ("epoch", "epoch_step", "rows_per_step")} == \
        {"epoch": 1, "epoch_step": 1, "rows_per_step": 4}
    # The same 4 rows a step as 2 micro-batches of 2: the step's rows, and so its gradient, are the same.
    _, resumed = run(tmp_path, tiny_ckpt, "split", batch_size=2, grad_accum=2, **common, resume=str(checkpoint))
    assert train_losses(resumed) == pytest.approx(train_losses(full), rel=1e-5)
    assert_same_adapters(tmp_path / "full", tmp_path / "split", atol=1e-5)
    # 2 rows a step would continue another order: refused before the model loads, with a split that works.
    with pytest.raises(TrainingError) as refused:
        run(tmp_path, tiny_ckpt, "other", batch_size=2, grad_accum=1, **common, resume=str(checkpoint))
    assert "optimizer steps took 4 rows each, this run's take 2 (--batch-size 2 x --grad-accum 1 x 1 process)" \
        in str(refused.value) and "--batch-size 2 --grad-accum 2" in str(refused.value)
    # A checkpoint of the earlier version, which counted micro-batches of batch_size x processes rows, resumes
    # where its epoch holds whole steps of both (here: grad_accum 1, trivially).
    legacy = {k: v for k, v in state["stream"].items() if k not in ("epoch_step", "rows_per_step")}
    state["stream"] = {**legacy, "index": 1, "global_batch_size": 4}
    (checkpoint / run_folder.STATE).write_text(json.dumps(state))
    _, resumed = run(tmp_path, tiny_ckpt, "legacy", batch_size=4, grad_accum=1, **common, resume=str(checkpoint))
    assert train_losses(resumed) == train_losses(full)
    assert_same_adapters(tmp_path / "full", tmp_path / "legacy", rtol=0, atol=0)


@pytest.mark.parametrize("argv,message", [
    (["--rank", "0"], "rank must be an integer from 1 to 65536, got 0"),
    (["--rank", "99999999999999999999"], "rank must be an integer from 1 to 65536, got 99999999999999999999"),
    (["--lr", "-1"], "--lr must be a finite number > 0"),
    (["--lr", "inf"], "--lr must be a finite number > 0"),
    (["--lr", "nan"], "--lr must be a finite number > 0"),
    (["--epochs", "inf"], "--epochs must be finite"),
    (["--grad-clip", "inf"], "--grad-clip must be finite"),
    (["--seed", "-1"], r"--seed must be in 0..2\*\*32-1"),
    (["--alpha", "0"], "--alpha must be > 0"),
    (["--dist-timeout", "0"], "--dist-timeout must be > 0"),
    (["--sdpa-backends", "efficient", "--device", "cpu"], "a CPU has only the flash and math kernels"),
    (["--sdpa-backends", "cudnn,efficient", "--device", "cpu"], "a CPU has only the flash and math kernels"),
    (["--schedule", "step"], "--schedule must be one of"),
    (["--targets", "gate_proj,lm_head"], "unknown LoRA target"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--device", "cuda:0"] if not torch.cuda.is_available() else ["--device", "tpu"], "--device"),
    (["--dtype", "float64"], "--dtype must be one of"),
    (["--resume", "/nonexistent/run"], "no checkpoint there"),
    (["--data", "/nonexistent/file.jsonl"], "neither a split name"),
    (["--eval-data", "validation"], "neither a split name"),
    (["--model", "/nonexistent/folder"], "neither a checkpoint folder nor a Hub repo id"),
    (["--data", "random:0"], "random:N with N >= 1"),
    (["--sdpa-backends", "flash,fast"], "--sdpa-backends must be 'default' or distinct names"),
    (["--sdpa-backends", "flash,flash"], "--sdpa-backends must be 'default' or distinct names"),
    (["--compile", "--compile-scope", "graph"], "--compile-scope must be one of"),
    (["--compile", "--compile-mode", "fast"], "--compile-mode must be one of"),
])
def test_bad_arguments_are_refused_before_any_work(argv, message, monkeypatch):
    monkeypatch.setattr(train, "load_model", lambda *a, **k: pytest.fail("loaded a model despite bad args"))
    with pytest.raises(SystemExit, match=message):
        train.train(train.parse_args(argv))


@pytest.mark.slow
def test_dry_run_prints_the_reference_table_without_downloading(capsys):
    summary = train.train(train.parse_args(["--rank", "64", "--dry-run", "--max-len", "32", "--batch-size", "1"]))
    out = capsys.readouterr().out
    assert "32,440,320" in out and "1,132,488,704" in out and "2.86%" in out
    assert [r["trainable_params"] for r in summary["rows"]] == [2_027_520, 8_110_080, 32_440_320, 129_761_280]


@pytest.mark.slow
def test_nan_loss_stops_and_names_the_step_keeping_the_last_checkpoint(tmp_path, tiny_ckpt):
    # An absurd learning rate blows the adapter up after the first update.
    with pytest.raises(train.TrainingError, match=r"at step (\d+).*checkpoint-1") as e:
        run(tmp_path, tiny_ckpt, "nan", lr=1e30, steps=5, save_every=1, keep_checkpoints=0, grad_clip=0.0)
    step = int(e.value.args[0].split("at step ")[1].split(":")[0])
    assert step >= 2
    good = tmp_path / "nan" / f"checkpoint-{step - 1}"
    model = load_model(tiny_ckpt, lora_config=lora.read_adapter_config(good))
    lora.load_adapter(model, good)
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.slow
def test_nan_read_a_step_late_still_leaves_the_weights_of_the_last_good_step(tmp_path, tiny_ckpt, monkeypatch):
    # With no checkpoint due, the host reads a step's loss only after the next step is queued; the device-side
    # flag must have skipped the bad step's update and every later one.
    models = []
    real_load = train.load_model

    def keep(*a, **k):
        models.append(real_load(*a, **k))
        return models[-1]

    monkeypatch.setattr(train, "load_model", keep)
    with pytest.raises(train.TrainingError, match=r"at step (\d+)") as e:
        run(tmp_path, tiny_ckpt, "nan_late", lr=1e30, steps=6, save_every=0, grad_clip=0.0)
    step = int(e.value.args[0].split("at step ")[1].split(":")[0])
    assert step >= 2
    run(tmp_path, tiny_ckpt, "good", lr=1e30, steps=step - 1, save_every=0, grad_clip=0.0)
    good = adapter_weights(tmp_path / "good")  # the same run, stopped after the last good step
    state = {k.removeprefix("base_model.model."): v for k, v in good.items()}
    got = {k: v for k, v in models[0].state_dict().items() if ".lora_" in k}
    assert got.keys() == state.keys()
    for k, v in state.items():
        assert torch.equal(got[k], v), k


@pytest.mark.slow
def test_trained_adapter_loads_in_peft_with_same_logits(tmp_path, tiny_ckpt):
    import peft
    import transformers
    run(tmp_path, tiny_ckpt, "peft", steps=3)
    adapter = tmp_path / "peft" / "adapter"
    ours = load_model(tiny_ckpt, lora_config=lora.read_adapter_config(adapter)).eval()
    lora.load_adapter(ours, adapter)
    assert any(w.abs().max() > 0 for k, w in adapter_weights(tmp_path / "peft").items() if "lora_B" in k)
    base = transformers.LlamaForCausalLM.from_pretrained(tiny_ckpt, attn_implementation="eager")
    ref = peft.PeftModel.from_pretrained(base, adapter).eval()
    ids = torch.randint(0, 32000, (2, 16))
    with torch.no_grad():
        assert (ours(ids) - ref(input_ids=ids).logits).abs().max().item() <= 1e-4


@pytest.mark.slow
@pytest.mark.plots
def test_summary_reports_the_reference_table_columns_of_the_run(tmp_path, tiny_ckpt, tokenizer):
    out = tmp_path / "summary"
    summary, rows = run(tmp_path, tiny_ckpt, "summary", steps=2, eval_data=str(GUANACO_SAMPLE), eval_every=1)
    assert json.loads((out / "summary.json").read_text()) == summary
    assert [r["split"] for r in rows] == ["train", "eval", "train", "eval"]
    steps = [r for r in rows if r["split"] == "train"]
    # The parameter columns: the model as trained, counted by lora.count_parameters.
    trainable, total = lora.count_parameters(load_model(tiny_ckpt, lora_config=lora.LoRAConfig(4, 8)))
    assert (summary["trainable_params"], summary["total_params"]) == (trainable, total) and 0 < trainable < total
    assert summary["trainable_percent"] == pytest.approx(100 * trainable / total, rel=1e-12)
    # Time and throughput: the sums over the steps in metrics.jsonl, whose tokens are the batches' real tokens.
    assert summary["steps"] == len(steps) == 2
    assert summary["training_time_s"] == pytest.approx(sum(r["step_s"] for r in steps), rel=1e-9)
    examples = load_examples(str(GUANACO_SAMPLE), tokenizer, 128, log=lambda *a: None)
    stream = BatchStream(examples, 4, 128, seed=0)
    real = [int(next(stream)["attention_mask"].sum()) for _ in range(2)]
    assert [r["tokens"] for r in steps] == real
    assert summary["tokens_per_s"] * summary["training_time_s"] == pytest.approx(sum(real), rel=1e-9)
    assert (summary["first_loss"], summary["last_loss"]) == (steps[0]["loss"], steps[-1]["loss"])
    # Eval loss: the saved adapter evaluated on the eval data, here and now, by `evaluate` and one example at a
    # time through the full-logits reference loss.
    model = load_model(tiny_ckpt, lora_config=lora.read_adapter_config(out / "adapter"))
    lora.load_adapter(model, out / "adapter")
    loss, _ = evaluate(model, eval_batches(examples, 4, 128), RuntimePlan())
    with torch.no_grad():
        sums, counts = zip(*(reference_loss(model.eval()(e.input_ids[None]), e.labels[None]) for e in examples),
                           strict=True)
    assert summary["eval_loss"] == pytest.approx(loss, abs=1e-5) and rows[-1]["loss"] == summary["eval_loss"]
    assert summary["eval_loss"] == pytest.approx(float(sum(sums)) / int(sum(counts)), abs=1e-5)
    assert summary["eval_ppl"] == pytest.approx(math.exp(summary["eval_loss"]), rel=1e-9)
    assert summary["peak_gib"] is None  # a CPU run has no peak memory to report
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # matplotlib: test extra


def test_dropping_the_mask_of_right_padded_batches_changes_nothing(tiny_ckpt, tokenizer):
    from data import BatchStream, encode_all, load_conversations
    examples, _ = encode_all(load_conversations(str(GUANACO_SAMPLE)), tokenizer, 128)
    batch = next(BatchStream(examples, 4, 128, seed=0))
    assert is_right_padded(batch["attention_mask"]) and not batch["attention_mask"].all()
    fast = prepare(batch, torch.device("cpu"))
    assert "attention_mask" not in fast
    results = []
    for b in (batch, fast):
        torch.manual_seed(0)
        model = randomize_lora_b(load_model(tiny_ckpt, lora_config=lora.LoRAConfig(4, 8, dropout=0.0)), std=0.1)
        loss, n = batch_loss(model, b)
        (loss / n).backward()
        results.append((loss.detach(), {k: p.grad for k, p in model.named_parameters() if p.requires_grad}))
    (l1, g1), (l2, g2) = results
    torch.testing.assert_close(l1, l2, rtol=1e-6, atol=1e-8)
    assert g1.keys() == g2.keys()
    for k in g1:
        torch.testing.assert_close(g1[k], g2[k], rtol=1e-5, atol=1e-7, msg=k)
    left = batch["attention_mask"].flip(-1)
    assert not is_right_padded(left)


@pytest.mark.slow
def test_gradient_checkpointing_gives_the_same_losses_and_adapter(tmp_path, tiny_ckpt, monkeypatch):
    # Dropout on: recomputation must replay the same dropout masks (checkpoint restores the RNG state).
    import tinyllama.model
    _, plain = run(tmp_path, tiny_ckpt, "plain", dropout=0.1, steps=3)
    calls = []
    real = tinyllama.model.checkpoint
    monkeypatch.setattr(tinyllama.model, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    _, ckpt = run(tmp_path, tiny_ckpt, "ckpt", dropout=0.1, steps=3, grad_checkpointing=True)
    assert len(calls) == 3 * 2  # every layer of every step went through checkpointing
    assert train_losses(ckpt) == pytest.approx(train_losses(plain), rel=1e-6)
    assert_same_adapters(tmp_path / "plain", tmp_path / "ckpt", atol=1e-6)


def test_attention_kernel_preference_sets_sdpa_order_and_only_inside():
    from torch.nn.attention import SDPBackend

    before = torch._C._get_sdp_priority_order()
    with sdpa_context("math"):
        assert torch.backends.cuda.math_sdp_enabled() and not torch.backends.cuda.flash_sdp_enabled()
    with sdpa_context(train.TrainConfig.sdpa_backends):
        assert [SDPBackend(i).name for i in torch._C._get_sdp_priority_order()][:4] == [
            "FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION", "MATH"]
    with sdpa_context("default"):
        assert torch._C._get_sdp_priority_order() == before
    assert torch._C._get_sdp_priority_order() == before and torch.backends.cuda.flash_sdp_enabled()


@pytest.mark.slow
def test_attention_kernel_preference_changes_no_numbers(tmp_path, tiny_ckpt):
    # The preferred SDPA kernel (flash on CPU too) against the plain math kernel: same losses and adapter.
    _, fast = run(tmp_path, tiny_ckpt, "flash", steps=2, sdpa_backends="flash,math")
    _, plain = run(tmp_path, tiny_ckpt, "math", steps=2, sdpa_backends="math")
    assert train_losses(fast) == pytest.approx(train_losses(plain), rel=1e-5)
    assert_same_adapters(tmp_path / "flash", tmp_path / "math", atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("scope", ["layers", "model"])
def test_compiled_model_trains_like_eager(tmp_path, tiny_ckpt, trained_run, scope):
    # torch.compile per decoder layer or whole (inductor, CPU here): the same losses and adapter as eager. Per
    # layer on 2 layers: the first layer's input needs no gradient and the second's does, two graphs. Whole on 1
    # layer: the model's one graph either way, and each graph costs seconds of C++ compilation on a new machine.
    if scope == "layers":
        ckpt = tiny_ckpt
        _, eager = trained_run(tmp_path / "eager", steps=2, max_len=64)
    else:
        ckpt = hf_checkpoint(tmp_path / "one_layer", seed=0, vocab_size=32000, hidden_size=32, intermediate_size=64,
                             num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=1)
        shutil.copy(TOKENIZER_PATH, ckpt / "tokenizer.model")
        _, eager = run(tmp_path, ckpt, "eager", steps=2, max_len=64)
    _, compiled = run(tmp_path, ckpt, "compiled", steps=2, max_len=64, compile=True, compile_scope=scope)
    assert train_losses(compiled) == pytest.approx(train_losses(eager), rel=1e-5)
    assert_same_adapters(tmp_path / "eager", tmp_path / "compiled", atol=1e-5)
