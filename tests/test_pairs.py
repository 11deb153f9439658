"""Preference pairs: formats, counted skips, and token ids equal to trl's DPOTrainer tokenization of the same rows."""

from __future__ import annotations

import json
import shutil
import types

import pytest

from data.pairs import (
    CONVERSATIONAL,
    EMPTY,
    IDENTICAL,
    IMPLICIT,
    NO_USER_LAST,
    STANDARD,
    TOO_LONG,
    collate_pairs,
    encode_pairs,
    extract_prompt,
    load_pairs,
)
from helpers import ROOT, TOKENIZER_PATH
from tinyllama import load_tokenizer
from tinyllama.templates import load_template

# Compared with trl, which takes seconds to import: `make test` only, not test-fast.
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("no_dataset_fingerprints")]

ZEPHYR_FILE = ROOT / "tests/assets/chat_templates/tinyllama-1.1b-chat-v1.0.jinja"


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


STANDARD_ROWS = [
    {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."},
    {"prompt": "Two plus two:", "chosen": " four</s>", "rejected": " five, I think"},
    {"prompt": "Name a prime ", "chosen": "7", "rejected": "8"},  # the prompt ends with a space
]
CONVERSATIONAL_ROWS = [
    {"prompt": [user("What colour is the sky?")], "chosen": [assistant("Blue.")], "rejected": [assistant("Green.")]},
    {"prompt": [{"role": "system", "content": "Be brief."}, user("Hi"), assistant("Hello!"), user("2+2?")],
     "chosen": [assistant("4")], "rejected": [assistant("5, give or take")]},
]
IMPLICIT_ROWS = [
    {"chosen": [user("Where is the sun?"), assistant("In the sky.")],
     "rejected": [user("Where is the sun?"), assistant("In the sea.")]},
    {"prompt": "ignored: a string beside conversations", "chosen": [user("Hi"), assistant("Hello there")],
     "rejected": [user("Hi"), assistant("Go away")]},
]
IMPLICIT_STRINGS = [{"chosen": "Q: colour of grass? A: green", "rejected": "Q: colour of grass? A: purple"}]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """(ours, transformers') for TinyLlama's tokenizer.model, with a tokenizer_config.json as TinyLlama ships it."""
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("sp")
    shutil.copyfile(TOKENIZER_PATH, folder / "tokenizer.model")
    added = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
    config = {"add_bos_token": True, "add_eos_token": False, "legacy": False, "pad_token": None,
              "bos_token": {"__type": "AddedToken", "content": "<s>", **added},
              "eos_token": {"__type": "AddedToken", "content": "</s>", **added},
              "unk_token": {"__type": "AddedToken", "content": "<unk>", **added},
              "clean_up_tokenization_spaces": False, "model_max_length": 2048, "tokenizer_class": "LlamaTokenizer"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return load_tokenizer(folder), transformers.AutoTokenizer.from_pretrained(folder)


def trl_tokenized(rows, hf_tokenizer, template_source=None, max_length=None):
    """trl's own preparation of `rows` (DPOTrainer._prepare_dataset: prompt extraction, EOS, tokenization and the
    filter of prompts that fill max_length): [(prompt_ids, chosen_ids, rejected_ids)]."""
    datasets = pytest.importorskip("datasets")
    from trl import DPOConfig, DPOTrainer

    if template_source is not None:
        hf_tokenizer.chat_template = template_source
    args = DPOConfig(output_dir="/tmp/unused", max_length=max_length, report_to=[], bf16=False, use_cpu=True)
    fake = types.SimpleNamespace(_tokenizer=hf_tokenizer)
    columns = {k: [r.get(k) for r in rows] for k in rows[0]}
    dataset = DPOTrainer._prepare_dataset(fake, datasets.Dataset.from_dict(columns), hf_tokenizer, args, "train")
    return [(r["prompt_ids"], r["chosen_ids"], r["rejected_ids"]) for r in dataset]


def ours(rows, tokenizer, tmp_path, template=None, max_len=None):
    pairs, report = load_pairs(write_jsonl(tmp_path / "pairs.jsonl", rows))
    examples, report = encode_pairs(pairs, tokenizer, template, max_len=max_len, report=report)
    return [(e.prompt_ids, e.chosen_ids, e.rejected_ids) for e in examples], report


def test_standard_rows_tokenize_as_trl(tokenizers, tmp_path):
    tokenizer, hf = tokenizers
    got, report = ours(STANDARD_ROWS, tokenizer, tmp_path)
    assert report.format == STANDARD and report.pairs == 3
    assert got == trl_tokenized(STANDARD_ROWS, hf)
    # One BOS, the EOS appended once (not after the reply that already ends with its text).
    assert got[1][1][-1] == tokenizer.eos_id and got[1][1].count(tokenizer.eos_id) == 1
    assert got[0][0][0] == tokenizer.bos_id


@pytest.mark.parametrize("template", ["zephyr", "file"])
def test_conversational_rows_tokenize_as_trl_through_the_template(tokenizers, tmp_path, template):
    tokenizer, hf = tokenizers
    spec = str(ZEPHYR_FILE) if template == "file" else template
    chosen_template = load_template(spec, tokenizer=tokenizer)
    got, report = ours(CONVERSATIONAL_ROWS, tokenizer, tmp_path, chosen_template)
    assert report.format == CONVERSATIONAL and report.pairs == 2
    assert got == trl_tokenized(CONVERSATIONAL_ROWS, hf, chosen_template.bind(tokenizer).source)
    # The completion holds the end of turn and the newline the template writes after it.
    assert got[0][1].index(tokenizer.eos_id) == len(got[0][1]) - 2 and tokenizer.decode(got[0][1][-1:]) == "\n"


def test_implicit_prompts_tokenize_as_trl(tokenizers, tmp_path):
    tokenizer, hf = tokenizers
    template = load_template("zephyr", tokenizer=tokenizer)
    got, report = ours(IMPLICIT_ROWS, tokenizer, tmp_path, template)
    assert report.format == IMPLICIT and report.pairs == 2
    assert got == trl_tokenized(IMPLICIT_ROWS, hf, template.bind(tokenizer).source)
    got, _ = ours(IMPLICIT_STRINGS, tokenizer, tmp_path)
    assert got == trl_tokenized(IMPLICIT_STRINGS, hf)


def test_prompt_extraction_is_trls():
    from trl.data_utils import extract_prompt as trl_extract

    cases = [("ab cd", "ab ce"), ("ab x", "ab y"), ("abc", "abcd"), ("same start", "same stArt"),
             ([user("q"), assistant("a")], [user("q"), assistant("b")])]
    for chosen, rejected in cases:
        want = trl_extract({"chosen": chosen, "rejected": rejected})
        assert extract_prompt(chosen, rejected) == (want["prompt"], want["chosen"], want["rejected"])
    assert extract_prompt("ab cd", "ab ce") == ("ab c", "d", "e")
    assert extract_prompt("say x", "say y") == ("say", " x", " y")  # the space goes back to the replies


def test_bad_rows_are_skipped_with_counted_reasons(tokenizers, tmp_path):
    tokenizer, hf = tokenizers
    rows = CONVERSATIONAL_ROWS + [
        {"prompt": [user("q")], "chosen": [assistant("same")], "rejected": [assistant("same")]},
        {"prompt": [user("q")], "chosen": [assistant(" ")], "rejected": [assistant("x")]},
        {"prompt": [user("q"), assistant("a")], "chosen": [assistant("b")], "rejected": [assistant("c")]},
        {"prompt": [user("q " * 80)], "chosen": [assistant("b")], "rejected": [assistant("c")]},
    ]
    template = load_template("zephyr", tokenizer=tokenizer)
    got, report = ours(rows, tokenizer, tmp_path, template, max_len=64)
    assert report.rows == 6 and report.pairs == 2
    assert dict(report.skipped) == {IDENTICAL: 1, EMPTY: 1, NO_USER_LAST: 1, TOO_LONG: 1}
    assert "6 rows read, 4 skipped" in str(report)
    # trl drops the same long prompt (its other bad rows it would train on or fail on).
    assert len(trl_tokenized(CONVERSATIONAL_ROWS + rows[-1:], hf, template.bind(tokenizer).source, 64)) == 2


def test_collated_pairs_are_trls_collator(tokenizers, tmp_path):
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    tokenizer, _ = tokenizers
    pairs, _ = load_pairs(write_jsonl(tmp_path / "p.jsonl", STANDARD_ROWS))
    examples, _ = encode_pairs(pairs, tokenizer, max_len=9)
    ours_batch = collate_pairs(examples, pad_id=0)
    theirs = DataCollatorForPreference(pad_token_id=0, max_length=9)(
        [{"prompt_ids": e.prompt_ids, "chosen_ids": e.chosen_ids, "rejected_ids": e.rejected_ids} for e in examples])
    for key in ("input_ids", "attention_mask", "completion_mask"):
        assert ours_batch[key].tolist() == theirs[key].tolist(), key


def test_a_file_of_conversations_is_not_a_pair_file(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": [user("q"), assistant("a")]}])
    with pytest.raises(ValueError, match="not a preference pair"):
        load_pairs(path)


def test_data_stats_reports_pairs(tokenizers, tmp_path, capsys):
    from data import stats

    rows = STANDARD_ROWS + [{"prompt": "p", "chosen": "same", "rejected": "same"}]
    path = write_jsonl(tmp_path / "prefs.jsonl", rows)
    assert stats.main([str(path), "--max-len", "6"]) == 0
    out = capsys.readouterr().out
    assert "4 rows read, 1 skipped (identical chosen and rejected: 1); 3 pairs (standard)" in out
    tokenizer, _ = tokenizers
    examples, _ = encode_pairs(load_pairs(path)[0], tokenizer)
    lengths = [len(e.prompt_ids) + len(x) for e in examples for x in (e.chosen_ids, e.rejected_ids)]
    assert f"max_len 6: {sum(n > 6 for n in lengths)} sequences cut" in out and max(lengths) > 6
