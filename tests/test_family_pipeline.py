"""The whole pipeline on the other families: a tiny Llama 3-like model with a byte-level BPE tokenizer.json and
tied embeddings, a SmolLM2-like one (BPE, no BOS) and a Mistral one (SentencePiece) train on the guanaco sample
(evaluating on a held-out slice), chat, export to a folder transformers reads with our ids and logits, and train
with QLoRA + DoRA."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import chat
import lora
from data import encode_all, eval_batches, load_conversations
from data.dialogue import answer
from data.sources import hold_out
from helpers import (
    GUANACO_SAMPLE,
    TOKENIZER_PATH,
    hf_checkpoint,
    llama3_like_tokenizer,
    metrics,
    randomize_lora_b,
    run,
    smollm2_like_tokenizer,
)
from tinyllama import load_model, load_tokenizer
from tinyllama.export import export_merged
from tinyllama.runtime import RuntimePlan
from training.step import evaluate

transformers = pytest.importorskip("transformers")

SMALL = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
ROWS = [json.loads(line)["text"] for line in GUANACO_SAMPLE.read_text(encoding="utf-8").splitlines()]


def _model_folder(tmp_path, family: str):
    """A tiny random checkpoint of `family` with its tokenizer files beside it."""
    if family == "mistral":
        folder = hf_checkpoint(tmp_path / family, seed=3, model_type="mistral", sliding_window=None,
                               vocab_size=32000, **SMALL)
        shutil.copy(TOKENIZER_PATH, folder / "tokenizer.model")
        return folder
    build = llama3_like_tokenizer if family == "llama3" else smollm2_like_tokenizer
    tokenizer_folder = build(tmp_path / f"{family}-tokenizer")
    tokenizer = load_tokenizer(tokenizer_folder)
    extra = dict(rope_scaling=LLAMA3_ROPE, rope_theta=500000.0) if family == "llama3" else {}
    folder = hf_checkpoint(tmp_path / family, seed=3, vocab_size=tokenizer.vocab_size, tie_word_embeddings=True,
                           bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, **SMALL, **extra)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_folder / name, folder / name)
    return folder


@pytest.fixture(scope="module", params=["llama3", "smollm2", "mistral"])
def family(request, tmp_path_factory):
    return request.param, _model_folder(tmp_path_factory.mktemp(request.param), request.param)


@pytest.mark.slow
def test_trains_on_guanaco_with_a_held_out_eval_and_writes_samples(tmp_path, family):
    name, folder = family
    summary, rows = run(tmp_path, folder, steps=4, eval_data="auto", eval_every=2, samples=True, lr=2e-2)
    evals = [r for r in rows if r["split"] == "eval"]
    assert [r["step"] for r in evals] == [2, 4]  # evaluated offline
    # ... on the held-out conversation, and on nothing else: the saved adapter evaluated on it here gives the
    # run's eval loss, and the run trained on the other conversations only.
    trained, held = hold_out(load_conversations(str(GUANACO_SAMPLE)), seed=0)
    assert len(held) == 1 and held[0] not in trained
    model = load_model(folder, lora_config=lora.read_adapter_config(tmp_path / "run" / "adapter"))
    lora.load_adapter(model, tmp_path / "run" / "adapter")
    examples, _ = encode_all(held, load_tokenizer(folder), 128)
    loss, _ = evaluate(model, eval_batches(examples, 4, 128), RuntimePlan())
    assert summary["eval_loss"] == pytest.approx(loss, abs=1e-5)
    assert summary["last_loss"] < summary["first_loss"]
    samples = (tmp_path / "run" / "samples.md").read_text()
    assert samples.count("**fine-tuned:**") == 3
    config = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(folder)


@pytest.mark.slow
def test_chat_and_export_read_the_folder_as_transformers_does(tmp_path, family, capsys):
    name, folder = family
    tokenizer = load_tokenizer(folder)
    model = load_model(folder, lora_config=lora.LoRAConfig(rank=4, alpha=8.0, targets=lora.ALL_TARGETS))
    randomize_lora_b(model, std=0.5, seed=4)
    lora.save_adapter(model, tmp_path / "adapter", base_model=str(folder))
    model.eval()

    expected = answer(model, tokenizer, "Tell me a story.", max_new_tokens=8)
    assert chat.main(["--model", str(folder), "--adapter", str(tmp_path / "adapter"), "--prompt",
                      "Tell me a story.", "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out.strip() == expected.strip()

    out = export_merged(tmp_path / "adapter", tmp_path / "merged")
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    for row in ROWS:
        assert hf_tokenizer(row)["input_ids"] == tokenizer.encode(row), row[:40]
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    ids = torch.tensor([tokenizer.encode(ROWS[0])[:100]])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids), rtol=0, atol=1e-5)


@pytest.mark.slow
def test_qlora_with_dora_trains_and_its_adapter_loads_on_the_unquantised_base(tmp_path, family):
    name, folder = family
    summary, _ = run(tmp_path, folder, steps=2, quantize="nf4", double_quant=True, dora=True, max_len=64)
    adapter = tmp_path / "run" / "adapter"
    model = load_model(folder, lora_config=lora.read_adapter_config(adapter))
    lora.load_adapter(model, adapter)
    trainable, total = lora.count_parameters(model)
    assert (summary["trainable_params"], summary["total_params"]) == (trainable, total)
    assert len(metrics(tmp_path / "run")) == 2
