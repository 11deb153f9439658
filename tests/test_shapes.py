"""Named shapes (tinyllama.shapes): each has its published checkpoint's parameter count, and transformers builds the
same model from its config.json; --model accepts a shape name or a config.json for --dry-run and --random-init."""

from __future__ import annotations

import json

import pytest
import torch

import train
from tinyllama.checkpoint import model_config
from tinyllama.model import num_parameters
from tinyllama.shapes import SHAPES, named_shape

# Totals of the published safetensors checkpoints (tied embeddings counted once, except where the checkpoint
# stores the tied LM head as a tensor of its own: STORED_TIED_HEAD).
PUBLISHED_TOTALS = {
    "tinyllama-1.1b": 1_100_048_384, "llama-2-7b": 6_738_415_616, "llama-2-13b": 13_015_864_320,
    "llama-2-70b": 68_976_648_192,
    "llama-3.2-1b": 1_235_814_400, "llama-3.2-3b": 3_212_749_824, "llama-3.1-8b": 8_030_261_248,
    "mistral-7b-v0.3": 7_248_023_552, "smollm2-1.7b": 1_711_376_384,
    "qwen2.5-0.5b": 494_032_768, "qwen2.5-1.5b": 1_543_714_304, "qwen2.5-3b": 3_085_938_688,
    "qwen2.5-7b": 7_615_616_512, "qwen3-0.6b": 596_049_920, "qwen3-1.7b": 2_031_739_904,
    "qwen3-4b": 4_022_468_096, "qwen3-8b": 8_190_735_360, "gemma-2-2b": 2_614_341_888,
    "gemma-3-1b": 999_885_952, "phi-3-mini": 3_821_079_552, "phi-4-mini": 3_836_021_760,
}
# Qwen3-1.7B's config ties the LM head to the embeddings, yet its safetensors hold lm_head.weight too (a copy, which
# loading ignores, as transformers does): its published total counts the embedding matrix twice.
STORED_TIED_HEAD = {"qwen3-1.7b"}


def _published_model_total(name) -> int:
    config = named_shape(name)
    return PUBLISHED_TOTALS[name] - (config.vocab_size * config.hidden_size if name in STORED_TIED_HEAD else 0)


def test_every_shape_has_a_published_total():
    assert SHAPES.keys() == PUBLISHED_TOTALS.keys()


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SHAPES))
def test_shape_has_the_published_parameter_count(name):
    assert num_parameters(named_shape(name)) == _published_model_total(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SHAPES))
def test_transformers_builds_the_same_shape_from_its_config_json(name):
    transformers = pytest.importorskip("transformers")
    with torch.device("meta"):
        hf = transformers.AutoModelForCausalLM.from_config(
            transformers.AutoConfig.for_model(**named_shape(name).to_hf_dict()))
    assert sum(p.numel() for p in hf.parameters()) == _published_model_total(name)


def test_model_config_reads_shape_names_config_files_and_folders(tmp_path):
    cfg = named_shape("llama-3.2-1b")
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    assert model_config("llama-3.2-1b") == cfg
    assert model_config(tmp_path / "config.json") == cfg
    assert model_config(tmp_path) == cfg
    with pytest.raises(KeyError, match="known: tinyllama-1.1b"):
        named_shape("llama-9b")


@pytest.mark.slow
def test_dry_run_prints_a_7b_table(capsys):
    rows = train.train(train.TrainConfig(model="llama-2-7b", dry_run=True, max_len=32, batch_size=1))["rows"]
    out = capsys.readouterr().out
    assert "llama-2-7b" in out
    # LoRA on the MLP: 32 layers x rank x (gate + up + down) x (in + out) = 32 x r x 3 x (4096 + 11008)
    assert [(r["rank"], r["trainable_params"], r["total_params"]) for r in rows] == [
        (r, 32 * r * 3 * (4096 + 11008), PUBLISHED_TOTALS["llama-2-7b"] + 32 * r * 3 * (4096 + 11008))
        for r in (4, 16, 64, 256)]


@pytest.mark.slow
def test_a_shape_trains_from_random_weights_and_a_shape_without_a_tokenizer_is_refused(tmp_path):
    settings = dict(model="smollm2-1.7b", random_init=True, data="random:4", eval_data="none", steps=1,
                    batch_size=1, grad_accum=1, max_len=8, rank=2, samples=False, out=str(tmp_path / "run"))
    with pytest.raises(SystemExit, match="is a shape without a tokenizer"):
        train.train(train.TrainConfig(**{**settings, "samples": True}))
    with pytest.raises(SystemExit, match="neither a checkpoint folder nor a Hub repo id"):
        train.train(train.TrainConfig(**{**settings, "random_init": False}))
    # A tiny shape from a config.json: the same code path as a shape name, at a size a test can run.
    tiny = dict(named_shape("smollm2-1.7b").to_hf_dict(), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, vocab_size=256)
    (tmp_path / "tiny.json").write_text(json.dumps(tiny))
    summary = train.train(train.TrainConfig(**{**settings, "model": str(tmp_path / "tiny.json")}))
    assert summary["total_params"] - summary["trainable_params"] == num_parameters(model_config(tmp_path / "tiny.json"))
