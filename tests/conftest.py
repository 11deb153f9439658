"""Shared test helpers: paths to the shipped assets, tiny random configs, and HF reference checkpoints."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ASSETS = ROOT / "tests" / "assets"  # copies of ../shared/fixtures, so a plain clone can test
TOKENIZER_PATH = ASSETS / "tokenizer.model"
GUANACO_SAMPLE = ASSETS / "guanaco_sample.jsonl"
OASST_SAMPLE = ASSETS / "oasst_trees_sample.jsonl"

# The house tiny config: 2 layers, width 64, 4 heads, 2 KV heads (grouped-query).
TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=10000.0,
            max_position_embeddings=256, tie_word_embeddings=False)


@pytest.fixture(scope="session")
def tokenizer():
    from tinyllama import Tokenizer
    return Tokenizer(TOKENIZER_PATH)


def hf_checkpoint(path: Path, seed: int = 0, **overrides) -> Path:
    """Save a random `transformers.LlamaForCausalLM` (float32, safetensors) to `path` and return it."""
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(**{**TINY, **overrides})
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # HF initialises norms to 1; perturb them so a wrong norm cannot hide
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(path, safe_serialization=True)
    return Path(path)


@pytest.fixture
def hf_tiny(tmp_path):
    return hf_checkpoint(tmp_path / "hf_tiny")


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """A tiny random Llama with the real 32,000-token vocabulary and tokenizer, so guanaco text fits."""
    import shutil

    path = hf_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", seed=0, vocab_size=32000, hidden_size=32,
                         intermediate_size=64, num_attention_heads=4, num_key_value_heads=2)
    shutil.copy(TOKENIZER_PATH, path / "tokenizer.model")
    return path


def pytest_collection_modifyitems(config, items):
    """`@pytest.mark.cuda` tests need a GPU: skip them, saying so, when there is none (CI has none)."""
    if torch.cuda.is_available() or os.environ.get("GPU_TESTS_ON_CPU"):
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (run bench/gpu_check.sh on a GPU machine)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
