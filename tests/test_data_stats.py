"""`python -m data.stats`: the numbers it prints are the pipeline's own, computed offline for a local file."""

from __future__ import annotations

import numpy as np
import pytest

from data import BatchStream, encode, encode_all, load_conversations
from data.stats import dataset_stats, main
from helpers import GUANACO_SAMPLE, OASST_SAMPLE, TOKENIZER_PATH


def test_dataset_stats_numbers(tokenizer):
    convs = load_conversations(GUANACO_SAMPLE, verbose=False)
    s = dataset_stats(convs, tokenizer, max_len=100, batch_size=2, seed=0)
    lengths = [len(encode(c, tokenizer, None)[0]) for c in convs]
    examples, report = encode_all(convs, tokenizer, 100)
    assert (s["conversations"], s["turns"], s["multi_turn"]) == (11, 28, 2)
    assert s["tokens_max"] == max(lengths) == 144
    assert s["tokens_p50"] == np.percentile(lengths, 50) and s["tokens_p99"] <= s["tokens_max"]
    assert s["truncated"] == sum(n > 100 for n in lengths) == report.truncated == 5
    assert (s["skipped"], s["examples"], s["boundary_merges"]) == (0, 11, 0)
    assert s["padding_padded"] == BatchStream(examples, 2, 100).padding_fraction(0)
    assert s["padding_padded_grouped"] < s["padding_padded"]
    assert s["packing_efficiency"] == 1 - BatchStream(examples, 2, 100, packing=True).padding_fraction(0)
    assert 0 < s["padding_packed"] < 1


def test_stats_command_prints_everything_offline(capsys):
    assert main([str(GUANACO_SAMPLE), "--max-len", "100", "--batch-size", "2",
                 "--tokenizer", str(TOKENIZER_PATH)]) == 0
    out = capsys.readouterr().out
    for expected in ("11 rows read, 0 skipped", "turns: 28", "p50", "p90", "p99", "max 144", "5 truncated",
                     "padded", "padded+grouped", "packing efficiency"):
        assert expected in out, expected
    assert main([str(OASST_SAMPLE), "--all-threads", "--batch-size", "2"]) == 0  # default tokenizer, offline
    assert "6 conversations (oasst)" in capsys.readouterr().out


def test_stats_command_explains_a_missing_source(tmp_path, capsys):
    assert main([str(tmp_path / "missing.jsonl")]) == 2
    assert "neither a split name" in capsys.readouterr().err


def test_packing_efficiency_does_not_depend_on_having_a_full_batch(tokenizer):
    # 11 conversations pack into one 2048-token row and do not fill a batch of 16, yet the plan is what an
    # epoch would feed, so its efficiency is real tokens / (rows x max_len), and padded modes fall back to one
    # batch of everything rather than reporting nothing.
    convs = load_conversations(GUANACO_SAMPLE, verbose=False)
    s = dataset_stats(convs, tokenizer, max_len=2048, batch_size=16, seed=0)
    examples, report = encode_all(convs, tokenizer, 2048)
    assert s["packed_rows"] == 1
    assert s["packing_efficiency"] == report.tokens / 2048
    lengths = [len(e) for e in examples]
    assert s["padding_padded"] == s["padding_padded_grouped"] == 1 - sum(lengths) / (max(lengths) * len(lengths))


def test_stats_uses_train_py_max_len_and_help_shows_the_defaults(capsys):
    from training.settings import TrainConfig

    assert main([str(GUANACO_SAMPLE), "--batch-size", "2"]) == 0
    assert f"max_len {TrainConfig().max_len}: " in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--help"])
    shown = " ".join(capsys.readouterr().out.split())
    for default in (f"(default: {TrainConfig().max_len}, train.py's)", "(default: 8)", "(default: assistant)",
                    "(default: assets/tokenizer.model, TinyLlama's)"):
        assert default in shown, default
