"""Preference runs of train.py on their own: the reference at step 1, --precompute-ref, accumulation, resume,
QLoRA, the held-out evaluation, --init-adapter for SFT, and the settings refused in one line."""

from __future__ import annotations

import json
import math

import pytest
import torch

import lora
from helpers import adapter_weights, metrics, randomize_lora_b, run
from tinyllama import load_model

ANSWERS = ["yes", "no", "maybe so", "certainly not, never", "blue", "a long and winding answer", "7", "forty-two"]


def pairs(n: int) -> list[dict]:
    """n standard pairs of different prompt and reply lengths."""
    return [{"prompt": f"Question {i}: " + "why " * (i % 3), "chosen": " " + ANSWERS[i % 8],
             "rejected": " " + ANSWERS[(i * 3 + 1) % 8] + " indeed" * (i % 2)} for i in range(n)]


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_ckpt):
    """8 pairs, and an adapter on the tiny checkpoint with random B (the initial adapter of a continued run)."""
    root = tmp_path_factory.mktemp("prefs")
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs(8)))
    config = lora.LoRAConfig(rank=4, alpha=8.0, dropout=0.0, targets=("gate_proj", "up_proj", "down_proj"))
    model = randomize_lora_b(load_model(tiny_ckpt, lora_config=config), std=0.2, seed=1)
    lora.save_adapter(model, root / "init", base_model=str(tiny_ckpt))
    return root


def pref_run(tmp_path, ckpt, files, name, **settings):
    common = dict(data=str(files / "pairs.jsonl"), objective="dpo", batch_size=8, schedule="constant",
                  max_len=32, grad_clip=0.0)
    summary, rows = run(tmp_path, ckpt, name, **{**common, **settings})
    return summary, [r for r in rows if r["split"] == "train"]


def assert_same_adapters(a, b, rtol, atol):
    wa, wb = adapter_weights(a), adapter_weights(b)
    assert wa.keys() == wb.keys() and wa
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=rtol, atol=atol, msg=k)


NAMES = ["loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"]


def assert_same_rows(a, b, rel=1e-5):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        for name in NAMES + [k for k in ("nll_loss", "log_odds_ratio") if k in x]:
            assert x[name] == pytest.approx(y[name], rel=rel, abs=1e-6), name
        assert x["rewards/accuracies"] == y["rewards/accuracies"]


def test_a_fresh_adapter_starts_at_log_2_and_precomputed_references_change_nothing(tmp_path, tiny_ckpt, files):
    summary, rows = pref_run(tmp_path, tiny_ckpt, files, "fresh")
    # The reference is the base, and a fresh adapter (B = 0) is the base: every reward is exactly 0 at step 1.
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-7) and rows[0]["rewards/accuracies"] == 0
    assert rows[-1]["loss"] < rows[0]["loss"] and rows[-1]["rewards/accuracies"] > 0
    assert summary["rewards/margins"] == rows[-1]["rewards/margins"]  # summary.json: the last step, trl's names
    _, ahead = pref_run(tmp_path, tiny_ckpt, files, "ahead", precompute_ref=True)
    assert_same_rows(ahead, rows)
    assert_same_adapters(tmp_path / "fresh", tmp_path / "ahead", rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("objective", ["dpo", "orpo"])
def test_accumulating_2x4_pairs_equals_one_batch_of_8(tmp_path, tiny_ckpt, files, objective):
    # The micro-batches hold different numbers of chosen tokens, so ORPO's NLL as a mean per micro-batch would
    # differ from the step's token-level mean.
    settings = dict(objective=objective, init_adapter=str(files / "init"))
    _, one = pref_run(tmp_path, tiny_ckpt, files, "one", **settings)
    _, acc = pref_run(tmp_path, tiny_ckpt, files, "acc", batch_size=4, grad_accum=2, **settings)
    assert_same_rows(acc, one)
    # The step's pairs summed in another order (8 at once, or 4 + 4) differ in the last float32 bits, which Adam
    # can turn into ~1e-4 relative in a weight whose gradient is near zero: test_fsdp's REORDERED tolerance.
    assert_same_adapters(tmp_path / "one", tmp_path / "acc", rtol=1e-3, atol=1e-4)


def test_a_continued_dpo_run_resumes_bit_exactly(tmp_path, tiny_ckpt, files):
    common = dict(init_adapter=str(files / "init"), steps=4, save_every=2, keep_checkpoints=0, batch_size=4)
    pref_run(tmp_path, tiny_ckpt, files, "full", **common)
    full = [r for r in metrics(tmp_path / "full") if r["split"] == "train"]
    # Resumed from step 2: the reference is rebuilt from --init-adapter, not from the checkpoint's adapter.
    run(tmp_path, tiny_ckpt, "resumed", data=str(files / "pairs.jsonl"), objective="dpo",
        schedule="constant", max_len=32, grad_clip=0.0, **common, resume=str(tmp_path / "full" / "checkpoint-2"))
    resumed = [r for r in metrics(tmp_path / "resumed") if r["split"] == "train"]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in full]
    assert [r["rewards/margins"] for r in resumed] == [r["rewards/margins"] for r in full]
    assert_same_adapters(tmp_path / "full", tmp_path / "resumed", rtol=0, atol=0)


@pytest.mark.parametrize("settings", [dict(quantize="nf4"), dict(dora=True), dict(grad_checkpointing=True)],
                         ids=["QLoRA", "DoRA", "gradient checkpointing"])
def test_dpo_runs_from_its_reference_with_qlora_dora_and_checkpointing(tmp_path, tiny_ckpt, files, settings):
    _, rows = pref_run(tmp_path, tiny_ckpt, files, "run", steps=2, **settings)
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-7)  # the base is the reference, exactly
    assert rows[1]["loss"] < rows[0]["loss"]


def test_held_out_pairs_report_loss_and_reward_accuracy(tmp_path, tiny_ckpt, files):
    summary, _ = pref_run(tmp_path, tiny_ckpt, files, "eval", eval_data=str(files / "pairs.jsonl"), steps=2,
                          objective="simpo")
    evals = [r for r in metrics(tmp_path / "eval") if r["split"] == "eval"]
    train_rows = [r for r in metrics(tmp_path / "eval") if r["split"] == "train"]
    assert [r["step"] for r in evals] == [2]
    # The eval set is the training set: evaluated after step 2, its loss is below step 2's (taken before it).
    assert evals[0]["loss"] < train_rows[1]["loss"] and 0 <= evals[0]["rewards/accuracies"] <= 1
    assert summary["eval_loss"] == evals[0]["loss"]


def test_sft_continues_from_an_init_adapter(tmp_path, tiny_ckpt, files):
    from helpers import GUANACO_SAMPLE

    _, rows = run(tmp_path, tiny_ckpt, "sft", init_adapter=str(files / "init"), steps=1, lr=1e-12,
                  data=str(GUANACO_SAMPLE))
    _, fresh = run(tmp_path, tiny_ckpt, "fresh", steps=1, lr=1e-12, data=str(GUANACO_SAMPLE),
                   targets="gate_proj,up_proj,down_proj", rank=4)
    assert rows[0]["loss"] != pytest.approx(fresh[0]["loss"], rel=1e-4)  # the adapter's B is not zero
    saved, start = adapter_weights(tmp_path / "sft"), adapter_weights(files / "init")
    assert saved.keys() == start.keys()
    for k in saved:  # lr 1e-12: the adapter trained on is the one given
        torch.testing.assert_close(saved[k], start[k], rtol=0, atol=1e-9)
    assert json.loads((tmp_path / "sft" / "config.json").read_text())["rank"] == 4


@pytest.mark.parametrize("flags, message", [
    (["--objective", "dpo", "--label-smoothing", "0.1"], "--label-smoothing applies to --objective simpo only"),
    (["--objective", "ipo", "--label-smoothing", "0.1"], "--label-smoothing applies to --objective simpo only"),
    (["--objective", "kto"], "--objective must be one of sft, dpo, ipo, simpo, orpo"),
    (["--objective", "simpo", "--precompute-ref"], "--precompute-ref applies to --objective dpo or ipo"),
    (["--objective", "dpo", "--beta", "0"], "--beta must be a finite number > 0"),
    ([], "holds preference pairs (chosen, rejected): pass --objective dpo, ipo, simpo or orpo"),
])
def test_bad_preference_settings_are_refused_in_one_line(tmp_path, files, flags, message):
    import train

    with pytest.raises(SystemExit) as e:
        train.main(["--data", str(files / "pairs.jsonl"), "--out", str(tmp_path / "o"), *flags])
    text = str(e.value)
    assert message in text and "\n" not in text


def test_flags_that_conflict_with_the_init_adapter_are_refused(tmp_path, files):
    import train

    with pytest.raises(SystemExit) as e:
        train.main(["--init-adapter", str(files / "init"), "--rank", "8", "--alpha", "8", "--out",
                    str(tmp_path / "o")])
    text = str(e.value)
    assert "--rank 8: not what --init-adapter" in text and "rank 4" in text and "\n" not in text
    assert "--alpha" not in text.split("not what")[0]  # alpha 8 is the adapter's own: no conflict


def test_a_damaged_init_adapter_is_refused_before_training(tmp_path, tiny_ckpt, files):
    import shutil

    from safetensors.torch import load_file, save_file

    import train

    damaged = tmp_path / "damaged"
    shutil.copytree(files / "init", damaged)
    tensors = load_file(str(damaged / "adapter_model.safetensors"))
    first = sorted(tensors)[0]
    tensors[first][0, 0] = float("nan")
    save_file(tensors, str(damaged / "adapter_model.safetensors"))
    with pytest.raises(SystemExit) as e:
        train.main(["--model", str(tiny_ckpt), "--data", str(files / "pairs.jsonl"), "--objective", "dpo",
                    "--init-adapter", str(damaged), "--out", str(tmp_path / "o"), "--no-samples", "--max-len", "32",
                    "--batch-size", "2", "--grad-accum", "1"])
    assert f"--init-adapter {damaged}" in str(e.value) and "non-finite" in str(e.value)
    assert not (tmp_path / "o" / "adapter").exists()


@pytest.mark.slow  # traces a step, as test_plan's do
@pytest.mark.parametrize("objective", ["dpo", "orpo"])
def test_the_plan_of_a_preference_step_is_what_the_real_step_saves(objective):
    # Two sequences per pair, the reference's forward pass (which saves nothing) and ORPO's NLL positions: the
    # traced plan's activations are the bytes the real step's saved-tensor hooks see, the adapter's own matrices
    # aside (the plan holds those once, in lora_weights).
    from tinyllama.checkpoint import random_model
    from tinyllama.config import LlamaConfig
    from tinyllama.runtime import apply_plan, plan_runtime
    from training.plan import SavedTensors, pair_batch, plan_step
    from training.preference import Reference, micro_batch_terms
    from training.settings import TrainConfig

    config = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=352, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    lora_config = lora.LoRAConfig(rank=8, alpha=16.0, dropout=0.05)
    planned = plan_step(TrainConfig(device="cpu", batch_size=2, max_len=32, objective=objective), lora_config, config)
    torch.manual_seed(0)
    model = random_model(config, lora_config=lora_config).train()
    plan = plan_runtime(config, torch.device("cpu"), torch.float32, lora_config=lora_config)
    apply_plan(model, plan)
    reference = Reference(model, from_adapter=False) if objective == "dpo" else None
    frozen = [p for p in [*model.parameters(), *model.buffers()] if not p.requires_grad]
    with SavedTensors(frozen) as saved, plan.forward():
        micro_batch_terms(model, pair_batch(2, 32, objective == "orpo"), objective, beta=0.1, gamma=0.5,
                          label_smoothing=0.0, reference=reference)
    adapter = {p.untyped_storage()._cdata for p in model.parameters() if p.requires_grad}
    real = saved.bytes - sum(n for key, n in saved.storages.items() if key in adapter)
    assert planned["parts"]["activations"] == real > 0
    assert planned["activation_bytes_per_token"] == real / (2 * 2 * 32)


@pytest.mark.slow  # traces a step, as test_plan's do
def test_the_plan_holds_the_frozen_initial_adapter_sharded_as_the_adapter():
    # The reference's copy of --init-adapter's weights is split over the processes under --fsdp, as the adapter
    # is: each of 2 processes holds half of it, beside its half of the base and of the trained adapter.
    from tinyllama.config import LlamaConfig
    from training.fsdp import planned_param_bytes
    from training.plan import plan_step
    from training.settings import TrainConfig

    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=176, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2)
    lora_config = lora.LoRAConfig(rank=8, alpha=16.0)  # on gate, up and down: 8 x (64 + 176) x 3 weights
    parts = plan_step(TrainConfig(device="cpu", batch_size=1, max_len=8, objective="dpo", fsdp="full",
                                  init_adapter="runs/sft/adapter"), lora_config, config, world=2)["parts"]
    half = 8 * (64 + 176) * 3 * 4 // 2
    base = planned_param_bytes(config, lora_config, world=2, dtype=torch.float32) - half  # this process's half
    assert parts["lora_weights"] == half and parts["weights"] == base + half  # + half of the frozen copy
