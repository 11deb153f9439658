"""Whole preference runs equal trl's trainers step by step: DPO and IPO (DPOTrainer), SimPO (CPOTrainer) and ORPO
(ORPOTrainer), every pair in one batch, 3 steps, constant lr, fp32, no dropout, from the same initial adapter;
and what must hold of any run (the reference at step 1, accumulation, resume)."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

import train
from helpers import ROOT, TOKENIZER_PATH, adapter_weights, hf_checkpoint, hf_model, metrics

pytest.importorskip("trl")
pytestmark = pytest.mark.usefixtures("no_dataset_fingerprints")  # trl tokenizes through datasets.map

ZEPHYR_FILE = ROOT / "tests/assets/chat_templates/tinyllama-1.1b-chat-v1.0.jinja"
SMALL = dict(vocab_size=32000, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2)
PAIRS = [
    {"prompt": "The sky is", "chosen": " blue.", "rejected": " green, or maybe purple."},
    {"prompt": "Two plus two is", "chosen": " four.", "rejected": " five."},
    {"prompt": "Name a prime:", "chosen": " seven", "rejected": " eight, surely"},
    {"prompt": "Water boils at", "chosen": " 100 degrees.", "rejected": " 50 degrees."},
]
IMPLICIT = [
    {"chosen": "Q: the colour of grass? A: green", "rejected": "Q: the colour of grass? A: purple, sometimes"},
    {"chosen": "Q: the capital of France? A: Paris", "rejected": "Q: the capital of France? A: Lyon"},
]
CONVERSATIONS = [
    {"prompt": [{"role": "user", "content": "What colour is the sky?"}],
     "chosen": [{"role": "assistant", "content": "Blue."}], "rejected": [{"role": "assistant", "content": "Green."}]},
    {"prompt": [{"role": "user", "content": "2+2?"}],
     "chosen": [{"role": "assistant", "content": "4"}], "rejected": [{"role": "assistant", "content": "5, I think"}]},
]
ROWS = {"pairs": PAIRS, "conversations": CONVERSATIONS, "implicit": IMPLICIT}
LR, STEPS, MAX_LEN = 5e-3, 3, 64
METRICS = ["rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny checkpoint with TinyLlama's tokenizer (and a tokenizer_config.json transformers reads as ours), and
    a PEFT adapter on it with random A and B: the initial adapter of every run here."""
    import peft

    root = tmp_path_factory.mktemp("pref")
    ckpt = hf_checkpoint(root / "ckpt", seed=0, **SMALL)
    shutil.copy(TOKENIZER_PATH, ckpt / "tokenizer.model")
    added = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
    (ckpt / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": True, "add_eos_token": False, "legacy": False, "pad_token": None,
        "bos_token": {"__type": "AddedToken", "content": "<s>", **added},
        "eos_token": {"__type": "AddedToken", "content": "</s>", **added},
        "unk_token": {"__type": "AddedToken", "content": "<unk>", **added},
        "clean_up_tokenization_spaces": False, "model_max_length": 2048, "tokenizer_class": "LlamaTokenizer",
        "chat_template": ZEPHYR_FILE.read_text()}))
    model = peft.get_peft_model(hf_model(ckpt), peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                                target_modules=["q_proj", "v_proj", "down_proj"]))
    torch.manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.2)
    model.save_pretrained(root / "init")
    for name, rows in (("pairs", PAIRS), ("conversations", CONVERSATIONS), ("implicit", IMPLICIT)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root, ckpt


def ours(root, ckpt, name, objective, data="pairs", **settings):
    out = root / f"ours-{name}"
    if not out.exists():
        n = len(ROWS[data])
        cfg = dict(model=str(ckpt), data=str(root / f"{data}.jsonl"), eval_data="none", objective=objective,
                   init_adapter=str(root / "init"), dropout=0.0, lr=LR, warmup=0, schedule="constant",
                   batch_size=n, grad_accum=1, max_len=MAX_LEN, steps=STEPS, group_by_length=False, log_every=1,
                   out=str(out), samples=False, seed=0, beta=0.1)
        cfg.update(settings)
        train.train(train.TrainConfig(**cfg))
    return [r for r in metrics(out) if r["split"] == "train"], adapter_weights(out)


def theirs(root, ckpt, name, objective, data="pairs", template=None, **settings):
    """trl's trainer on the same rows from the same adapter: (its log rows, its adapter's tensors)."""
    import datasets
    import peft
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(ckpt)
    tokenizer.pad_token = tokenizer.eos_token  # what DPOTrainer sets itself; CPO and ORPO want it set
    if template is not None:
        tokenizer.chat_template = template
    model = peft.PeftModel.from_pretrained(hf_model(ckpt).train(), root / "init", is_trainable=True)
    rows = ROWS[data]
    dataset = datasets.Dataset.from_list(rows)
    common = dict(output_dir=str(root / f"trl-{name}"), per_device_train_batch_size=len(rows), max_steps=STEPS,
                  learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, logging_steps=1, report_to=[],
                  save_strategy="no", use_cpu=True, bf16=False, max_length=MAX_LEN, beta=0.1, seed=0,
                  gradient_checkpointing=False, max_grad_norm=1.0)
    common.update(settings)
    if objective in ("dpo", "ipo"):
        from trl import DPOConfig, DPOTrainer

        args = DPOConfig(loss_type=["sigmoid" if objective == "dpo" else "ipo"], **common)
        trainer = DPOTrainer(model, args=args, train_dataset=dataset, processing_class=tokenizer)
    elif objective == "simpo":
        from trl.experimental.cpo import CPOConfig, CPOTrainer

        args = CPOConfig(loss_type="simpo", cpo_alpha=0.0, **common)
        trainer = CPOTrainer(model, args=args, train_dataset=dataset, processing_class=tokenizer)
    else:
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        args = ORPOConfig(**common)
        trainer = ORPOTrainer(model, args=args, train_dataset=dataset, processing_class=tokenizer)
    trainer.train()
    tensors = {k.replace(".default.", "."): v.detach().clone() for k, v in
               peft.get_peft_model_state_dict(model, adapter_name="default").items()}
    return [r for r in trainer.state.log_history if "loss" in r], tensors


def assert_same_run(ours_run, theirs_run, names):
    (rows, adapter), (trl_rows, trl_adapter) = ours_run, theirs_run
    assert len(rows) == len(trl_rows) == STEPS
    for step, (a, b) in enumerate(zip(rows, trl_rows, strict=True), start=1):
        for name in ["loss", *names]:
            # 1e-5, or float32's own rounding where the value is large (IPO's loss starts at 25)
            assert a[name] == pytest.approx(b[name], abs=1e-5, rel=1e-6), f"step {step} {name}: {a[name]} vs {b[name]}"
    assert adapter.keys() == trl_adapter.keys()
    for k in adapter:
        torch.testing.assert_close(adapter[k], trl_adapter[k], atol=1e-5, rtol=1e-4, msg=k)


@pytest.mark.slow
def test_dpo_run_equals_dpo_trainer(setup):
    root, ckpt = setup
    run = ours(root, ckpt, "dpo", "dpo")
    assert_same_run(run, theirs(root, ckpt, "dpo", "dpo"), METRICS)
    # The reference is the initial adapter: every reward is 0 at step 1.
    assert run[0][0]["loss"] == pytest.approx(math.log(2), abs=1e-6) and run[0][0]["rewards/accuracies"] == 0


@pytest.mark.slow
def test_dpo_run_on_conversations_through_a_jinja_file_equals_dpo_trainer(setup):
    root, ckpt = setup
    source = ZEPHYR_FILE.read_text()
    run = ours(root, ckpt, "dpo-conv", "dpo", data="conversations", chat_template=str(ZEPHYR_FILE))
    assert_same_run(run, theirs(root, ckpt, "dpo-conv", "dpo", data="conversations", template=source), METRICS)


@pytest.mark.slow
def test_ipo_run_on_conversations_through_the_models_template_equals_dpo_trainer(setup):
    root, ckpt = setup  # the checkpoint's tokenizer_config.json holds a chat template: the run's default
    run = ours(root, ckpt, "ipo", "ipo", data="conversations")
    assert_same_run(run, theirs(root, ckpt, "ipo", "ipo", data="conversations"), METRICS)
    assert run[0][0]["loss"] == pytest.approx((1 / (2 * 0.1)) ** 2, rel=1e-6)


@pytest.mark.slow
def test_simpo_run_equals_cpo_trainer(setup):
    root, ckpt = setup
    run = ours(root, ckpt, "simpo", "simpo", gamma=0.3, label_smoothing=0.1, beta=2.0)
    assert_same_run(run, theirs(root, ckpt, "simpo", "simpo", simpo_gamma=0.3, label_smoothing=0.1, beta=2.0),
                    METRICS)


@pytest.mark.slow
def test_orpo_run_on_implicit_prompts_equals_orpo_trainer(setup):
    root, ckpt = setup
    run = ours(root, ckpt, "orpo", "orpo", data="implicit", beta=0.25)
    assert_same_run(run, theirs(root, ckpt, "orpo", "orpo", data="implicit", beta=0.25),
                    METRICS + ["nll_loss", "log_odds_ratio", "log_odds_chosen"])
