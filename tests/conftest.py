"""Fixtures shared by the tests; the helpers and constants they use live in `helpers.py`."""

from __future__ import annotations

import copy
import functools
import gc
import json
import os
import shutil

import pytest
import torch

from helpers import TOKENIZER_PATH, hf_checkpoint, run
from training import report

# One torch thread per test process (and, through the environment, per process a test starts: torchrun's workers,
# chat.py, the export). The tensors here are tiny, so a second intra-op thread gains next to nothing, while with
# `make test`'s pytest-xdist workers on every core (or anything else running) its spin-waits cost more than the
# work: test_errors.py took 100 s with torch's default threads on 2 busy cores, 18 s with one. OMP_NUM_THREADS
# set by hand wins.
torch.set_num_threads(int(os.environ.setdefault("OMP_NUM_THREADS", "1")))

# The tests make millions of short-lived objects (FX graphs, fake tensors, transformers models). With Python's
# default thresholds (700, 10, 10) the collector ran ~3,000 times over 40 s of test_plan and the family tests,
# 2.3 s of it, mostly full passes over all that torch and transformers hold; with these, 0.6 s. The same cycles are
# freed, later.
gc.set_threshold(10_000, 50, 100)


@pytest.fixture(autouse=True, scope="session")
def one_matmul_peak_per_process():
    """train.py measures the machine's matmul peak (for MFU) at the start of every run: 13 products of 1024 x 1024
    matrices, about 0.4 s on one CPU thread, more than a 3-step tiny run trains. Measured once per (device, dtype)
    in each test process instead; runs in a subprocess still measure their own."""
    import train

    peak = functools.cache(train.measure_matmul_peak)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train, "measure_matmul_peak", peak)
        yield


@pytest.fixture(autouse=True, scope="session")
def sentencepiece_merges_once():
    """transformers' tokenizer read from a tokenizer.model (the reference of many tests here) derives the BPE
    merges of its 32,000 pieces again on every load: `generate_merges`, about 0.23 s of each ~0.4 s load, ~36 loads
    in a run of the suite. The merges are a function of the vocabulary alone, so each test process keeps them per
    vocabulary; transformers builds the same tokenizer from them."""
    import importlib

    modules = []
    for name in ("tokenization_utils_base", "convert_slow_tokenizer", "tokenization_utils_tokenizers",
                 "tokenization_utils_sentencepiece"):
        try:
            modules.append(importlib.import_module(f"transformers.{name}"))
        except ImportError:
            continue
    modules = [m for m in modules if hasattr(m, "generate_merges")]
    if not modules:
        yield
        return
    original, kept = modules[0].generate_merges, {}

    def generate_merges(vocab, vocab_scores=None, skip_tokens=None):
        if not isinstance(vocab, dict):
            return original(vocab, vocab_scores, skip_tokens)
        key = (tuple(vocab.items()), None if vocab_scores is None else tuple(dict(vocab_scores).items()),
               None if skip_tokens is None else frozenset(skip_tokens))
        if key not in kept:
            kept[key] = original(vocab, vocab_scores, skip_tokens)
        return list(kept[key])

    with pytest.MonkeyPatch.context() as patch:
        for module in modules:
            patch.setattr(module, "generate_merges", generate_merges)
        yield


@pytest.fixture(autouse=True)
def no_loss_plot(request, monkeypatch):
    """train.py draws loss.png at the end of every run: about 0.1 s of matplotlib, as much as a 3-step tiny run
    trains, in each of the suite's ~270 runs. Only tests marked `plots` draw it (they check the file, and what
    --overwrite does with it); runs in a subprocess draw their own."""
    if "plots" not in request.keywords:
        monkeypatch.setattr(report, "plot_losses", lambda out, log=print: None)


@pytest.fixture
def no_dataset_fingerprints(monkeypatch):
    """trl's trainers tokenize through `datasets.Dataset.map`, which fingerprints each call for its cache by
    pickling its arguments, the tokenizer with its 32,000-token vocabulary among them: seconds per trainer. A random
    fingerprint (what `datasets` falls back to when a transform cannot be hashed) changes nothing else."""
    from datasets import arrow_dataset, fingerprint

    for module in (fingerprint, arrow_dataset):  # `Dataset.map` calls it by its imported name
        monkeypatch.setattr(module, "update_fingerprint", lambda *a, **k: fingerprint.generate_random_fingerprint())


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


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, tiny_ckpt):
    """`trained_run(dest, **settings)`: the run `helpers.run` trains from the tiny checkpoint with `settings`,
    copied to the folder `dest`, and its (summary, metrics rows). Each setting is trained once per test process,
    and each test gets a copy of its own to change. Only for a run that is a test's starting point: a run the test
    watches (patched functions, captured output, a fixture that checks every write) it must train itself."""
    trained = {}

    def copy_of(dest, **settings):
        key = json.dumps(settings, sort_keys=True)
        if key not in trained:
            tmp = tmp_path_factory.mktemp("trained")
            trained[key] = tmp / "run", run(tmp, tiny_ckpt, "run", **settings)
        folder, result = trained[key]
        shutil.copytree(folder, dest)
        return copy.deepcopy(result)

    return copy_of


# The tests that take longest (a torchrun launch is ~10 s of CPU; inductor compiles; processes racing for a lock),
# as two groups that start first, one on each of `make test`'s two workers: pytest-xdist's worksteal hands each
# worker a contiguous half of the collection, and a long test picked up last would leave the other core idle
# while it runs. test_fsdp.py stays whole in one group: its module fixtures (single-process runs, one torchrun
# launch for all its two-process runs) are shared by its tests, and split across workers would run once on each.
SLOW_FIRST = (
    ("tests/test_fsdp.py::",),
    ("tests/test_train.py::test_compiled_model_trains_like_eager",
     "tests/test_run_folder.py::test_racing_processes_never_hold_the_lock_together",
     "tests/test_loss.py::test_the_compiled_loss_chunk_equals_the_eager_one",
     "tests/test_family_runtime.py::test_flex_softcapped_attention_equals_the_plain_path_on_a_cpu",
     "tests/test_quant.py::test_nf4_lora_layer_compiles_as_one_graph"),
)


def _slow_first(items):
    """`items` reordered: SLOW_FIRST's first group at the head of the first half, its second at the head of the
    second half, each in the order listed; everything else keeps its order."""
    groups = [[] for _ in SLOW_FIRST]
    rest = []
    for item in items:
        where = next((g for g, prefixes in enumerate(SLOW_FIRST) if item.nodeid.startswith(prefixes)), None)
        (rest if where is None else groups[where]).append(item)
    for g, prefixes in enumerate(SLOW_FIRST):  # the listed order, then collection order within a prefix
        groups[g].sort(key=lambda item, prefixes=prefixes: next(i for i, p in enumerate(prefixes)
                                                                if item.nodeid.startswith(p)))
    first, second = groups
    k = max(0, min(len(rest), len(items) // 2 - len(first)))
    return first + rest[:k] + second + rest[k:]


def pytest_collection_modifyitems(config, items):
    """Known-slow tests first (`SLOW_FIRST`). `@pytest.mark.cuda` tests need a GPU: skip them, saying so, when
    there is none (CI has none)."""
    items[:] = _slow_first(items)
    if torch.cuda.is_available() or os.environ.get("GPU_TESTS_ON_CPU"):
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (run bench/gpu_check.sh on a GPU machine)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
