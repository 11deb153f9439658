"""Fixtures shared by the tests; the helpers and constants they use live in `helpers.py`."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from helpers import TOKENIZER_PATH, hf_checkpoint


@pytest.fixture(scope="session")
def tokenizer():
    from tinyllama import Tokenizer
    return Tokenizer(TOKENIZER_PATH)


@pytest.fixture
def hf_tiny(tmp_path):
    return hf_checkpoint(tmp_path / "hf_tiny")


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """A tiny random Llama with the real 32,000-token vocabulary and tokenizer, so guanaco text fits."""
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
