"""data.sources beyond one file: the evaluation hold-out, weighted lists of sources, Parquet, and --data /
--eval-data as train.py checks and uses them.

Reading and parsing one .jsonl (and the Hub) is in test_data.py.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import pytest

import data.sources as sources
from data import encode_all, load_conversations, load_template, load_train_eval, parse_guanaco
from data.encoding import SYSTEM_NOT_RENDERED
from data.formats import EMPTY_SYSTEM
from data.sources import hold_out, holdout_size, parse_sources, source_problems
from data.stats import dataset_stats, format_stats
from helpers import GUANACO_SAMPLE, metrics, run

BAD_ROW = {"text": "### Human: a question nobody answered"}  # skipped: "no assistant turn"


def numbered_rows(tag: str, n: int) -> list[dict]:
    """n distinct guanaco rows, so every conversation encodes to its own token ids."""
    return [{"text": f"### Human: {tag} question {i}?### Assistant: {tag} answer {i}."} for i in range(n)]


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def ids(examples) -> Counter:
    """How often each token sequence occurs among the examples."""
    return Counter(tuple(e.input_ids.tolist()) for e in examples)


def encoded(rows, tokenizer) -> list[tuple]:
    """The token ids of each row, encoded on its own: what the examples of those rows must be."""
    examples, _ = encode_all([parse_guanaco(r["text"]) for r in rows], tokenizer, 256)
    return [tuple(e.input_ids.tolist()) for e in examples]


# ---- the evaluation hold-out --------------------------------------------------------------------------------

@pytest.mark.parametrize("n,held", [(2, 1), (11, 1), (99, 1), (100, 2), (149, 2), (150, 3), (600, 12),
                                    (25_000, 500), (30_000, 500)])
def test_hold_out_takes_2_percent_at_least_1_at_most_500(n, held):
    conversations = list(range(n))
    assert holdout_size(n) == held
    train, evaluation = hold_out(conversations, seed=0)
    assert len(evaluation) == held and len(train) == n - held
    assert sorted(train + evaluation) == conversations  # disjoint, and nothing lost
    assert train == sorted(train) and evaluation == sorted(evaluation)  # file order kept


def test_hold_out_is_a_function_of_the_seed_and_the_data():
    conversations = [f"conversation {i}" for i in range(600)]
    first = hold_out(conversations, seed=0)
    assert hold_out(list(conversations), seed=0) == first  # every rank, every resumed leg
    assert hold_out(conversations, seed=1)[1] != first[1]


@pytest.mark.parametrize("n", [0, 1])
def test_too_few_conversations_to_hold_out_says_what_to_pass(n):
    with pytest.raises(ValueError, match=rf"one.jsonl has {n} conversation.*--eval-data FILE.*--eval-data none"):
        hold_out(list(range(n)), seed=0, name="one.jsonl")


# ---- source lists -------------------------------------------------------------------------------------------

def test_source_lists_and_weights_parse():
    assert [(s.name, s.weight) for s in parse_sources("a.jsonl:2, train ,dir/b:c.parquet:0.5")] == [
        ("a.jsonl", 2.0), ("train", 1.0), ("dir/b:c.parquet", 0.5)]  # only a number after the last colon weighs
    for spec, message in [("a.jsonl,,b.jsonl", "an empty source"), ("a.jsonl,", "an empty source"),
                          ("a.jsonl:0", "a weight must be a number > 0"), ("a.jsonl:-1", "> 0"),
                          ("a.jsonl:nan", "> 0"), ("a.jsonl:inf", "> 0"),
                          ("a.jsonl,random:4", "stands alone"), ("random,a.jsonl", "stands alone"),
                          ("a.jsonl,b.jsonl,a.jsonl", "named twice")]:
        with pytest.raises(ValueError, match=message):
            parse_sources(spec)
    with pytest.raises(ValueError, match="weights apply to training sources"):
        parse_sources("a.jsonl:2", weights=False)


def test_source_problems_name_each_missing_source(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", numbered_rows("a", 3))
    assert source_problems(f"{a}:2,train") == []
    assert source_problems("random:8") == [] and source_problems("auto", "--eval-data") == []
    assert source_problems("NONE", "--eval-data") == []
    problems = source_problems(f"{a},{tmp_path}/missing.jsonl,validation")
    assert len(problems) == 2
    assert "missing.jsonl' is neither a split name" in problems[0] and "'validation'" in problems[1]
    assert "random:N with N >= 1" in source_problems("random:0")[0]
    assert "weights apply to training sources" in source_problems(f"{a}:2", "--eval-data")[0]


def test_weights_repeat_and_subsample_each_source(tmp_path, tokenizer):
    a_rows, b_rows = numbered_rows("a", 20), numbered_rows("b", 30)
    a = write_jsonl(tmp_path / "a.jsonl", a_rows)
    b = write_jsonl(tmp_path / "b.jsonl", b_rows)
    a_ids, b_ids = encoded(a_rows, tokenizer), encoded(b_rows, tokenizer)

    train, evaluation = load_train_eval(f"{a}:2,{b}", "none", tokenizer, 256, log=lambda *_: None)
    assert evaluation == [] and len(train) == 2 * 20 + 30
    assert ids(train) == Counter({**{x: 2 for x in a_ids}, **{x: 1 for x in b_ids}})

    half, _ = load_train_eval(f"{a}:0.5,{b}:1.5", "none", tokenizer, 256, seed=3, log=lambda *_: None)
    counts = ids(half)
    assert len(half) == 10 + 45
    assert sum(counts[x] for x in a_ids) == 10 and all(counts[x] <= 1 for x in a_ids)  # half of a, no repeats
    assert sorted(counts[x] for x in b_ids) == [1] * 15 + [2] * 15  # all of b once, half of it twice
    again, _ = load_train_eval(f"{a}:0.5,{b}:1.5", "none", tokenizer, 256, seed=3, log=lambda *_: None)
    assert ids(again) == counts
    other, _ = load_train_eval(f"{a}:0.5,{b}:1.5", "none", tokenizer, 256, seed=4, log=lambda *_: None)
    assert ids(other) != counts


def test_auto_eval_holds_out_of_each_file_before_weighting_and_reports_each_source(tmp_path, tokenizer):
    a_rows, b_rows = numbered_rows("a", 100), numbered_rows("b", 60)
    a = write_jsonl(tmp_path / "a.jsonl", a_rows + [BAD_ROW])
    b = write_jsonl(tmp_path / "b.jsonl", b_rows)
    lines = []
    train, evaluation = load_train_eval(f"{a}:2,{b}", "auto", tokenizer, 256, log=lines.append)
    a_ids, b_ids = set(encoded(a_rows, tokenizer)), set(encoded(b_rows, tokenizer))
    held, trained = ids(evaluation), ids(train)
    assert len(evaluation) == 2 + 1 and len(held) == 3
    assert sum(x in a_ids for x in held) == 2 and sum(x in b_ids for x in held) == 1
    assert not held.keys() & trained.keys()  # a held-out conversation is never trained on, weight or not
    assert len(train) == 2 * 98 + 59 and trained.keys() | held.keys() == a_ids | b_ids

    lines = [str(line) for line in lines]
    assert f"{a}: 101 rows read, 1 skipped (no assistant turn: 1); 100 conversations (guanaco)" in lines
    assert f"{b}: 60 rows read, 0 skipped; 60 conversations (guanaco)" in lines
    assert f"eval: held out 2 of 100 conversations of {a} (2%, seed 0)" in lines
    assert f"eval: held out 1 of 60 conversations of {b} (2%, seed 0)" in lines
    assert any(line.startswith(f"data {a}: 98 conversations -> 98 examples, weight 2 -> 196 examples")
               for line in lines)
    assert any(line.startswith(f"data {b}: 59 conversations -> 59 examples (") for line in lines)
    assert "data: 255 training examples from 2 sources" in lines


def test_auto_eval_of_a_split_is_the_test_split_and_files_stay_offline(tmp_path, tokenizer, monkeypatch):
    calls = []

    def fake_hub_file(split, **kwargs):
        calls.append(split)
        return GUANACO_SAMPLE

    monkeypatch.setattr(sources, "hub_file", fake_hub_file)
    a = write_jsonl(tmp_path / "a.jsonl", numbered_rows("a", 100))
    train, evaluation = load_train_eval(f"train,{a}", "auto", tokenizer, 256, log=lambda *_: None)
    assert calls == ["train", "test"]
    assert len(train) == 11 + 98 and len(evaluation) == 2 + 11

    calls.clear()
    train, evaluation = load_train_eval(str(a), "auto", tokenizer, 256, log=lambda *_: None)
    assert calls == [] and (len(train), len(evaluation)) == (98, 2)
    _, evaluation = load_train_eval(str(a), str(GUANACO_SAMPLE), tokenizer, 256, log=lambda *_: None)
    assert len(evaluation) == 11  # an explicit --eval-data is used whole
    train, evaluation = load_train_eval("random:8", "auto", None, 16, vocab_size=100, log=lambda *_: None)
    assert len(train) == 8 and evaluation == train[:64]  # the benchmark workload evaluates on itself, as before


# ---- Parquet -------------------------------------------------------------------------------------------------

def test_parquet_rows_load_like_the_same_jsonl_rows(tmp_path, monkeypatch):
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    rows = [json.loads(line) for line in GUANACO_SAMPLE.read_text(encoding="utf-8").splitlines()]
    rows = rows[:4] + [BAD_ROW, {"text": None}] + rows[4:]
    jsonl = write_jsonl(tmp_path / "rows.jsonl", rows)
    parquet = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"id": list(range(len(rows))), "text": [r["text"] for r in rows]}), parquet,
                   row_group_size=5)
    monkeypatch.setattr(sources, "PARQUET_BATCH_ROWS", 3)  # several batches, across row groups
    want, got = load_conversations(jsonl, verbose=False), load_conversations(parquet, verbose=False)
    assert got == want and len(got) == 11
    assert (got.report.rows, got.report.skipped, got.report.format) == (13, want.report.skipped, "guanaco")
    assert got.report.skipped == Counter({"no assistant turn": 1, "missing text field": 1})
    with pytest.raises(ValueError, match=r"rows.parquet: row 5: no assistant turn"):
        load_conversations(parquet, strict=True)


def test_parquet_without_a_text_column_names_the_columns_found(tmp_path):
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"prompt": ["hi"], "response": ["hello"]}), path)
    with pytest.raises(ValueError, match=r"rows.parquet has no `text` column \(its columns: prompt, response\)"):
        load_conversations(path)


def test_parquet_without_pyarrow_names_the_extra(tmp_path, monkeypatch):
    path = tmp_path / "rows.parquet"
    path.write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # what `import pyarrow.parquet` sees uninstalled
    with pytest.raises(ImportError, match=r"^reading \.parquet files needs pyarrow: pip install -e \.\[parquet\]$"):
        load_conversations(path)
    assert source_problems(str(path)) == [f"--data {path}: reading .parquet files needs pyarrow: "
                                          "pip install -e .[parquet]"]


# ---- train.py ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv,message", [
    (["--data", f"{GUANACO_SAMPLE}:0"], "a weight must be a number > 0"),
    (["--data", f"{GUANACO_SAMPLE},/nonexistent.jsonl"], "'/nonexistent.jsonl' is neither a split name"),
    (["--eval-data", f"{GUANACO_SAMPLE}:2"], "weights apply to training sources"),
])
def test_train_refuses_bad_sources_before_any_work(argv, message, monkeypatch):
    import train

    monkeypatch.setattr(train, "load_model", lambda *a, **k: pytest.fail("loaded a model despite bad args"))
    with pytest.raises(SystemExit, match=message):
        train.train(train.parse_args(argv))


@pytest.mark.slow
def test_a_local_file_evaluates_on_its_held_out_share_without_the_hub(tmp_path, tiny_ckpt, monkeypatch):
    pytest.importorskip("transformers")
    import train

    def no_hub(*args, **kwargs):
        raise AssertionError("the Hub was asked for a split")

    monkeypatch.setattr(sources, "hub_file", no_hub)
    assert train.TrainConfig().eval_data == "auto"
    _, rows = run(tmp_path, tiny_ckpt, eval_data=train.TrainConfig().eval_data, steps=2, eval_every=1)
    assert [r["step"] for r in rows if r["split"] == "eval"] == [1, 2]
    assert metrics(tmp_path / "run") == rows


# ---- what a template leaves out, what a loader repairs ----------------------------------------------------------

def chat_rows(n: int, system_every: int = 0, empty_system: bool = False) -> list[dict]:
    """n distinct `messages` rows; every `system_every`-th one opens with a system prompt, or every one with an
    empty system turn, written as ShareGPT exports write it."""
    rows = []
    for i in range(n):
        messages = [{"role": "system", "content": "Be brief"}] if system_every and i % system_every == 0 else []
        messages += [{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": f"Answer {i}."}]
        if empty_system:
            rows.append({"conversations": [{"from": "system", "value": ""}] + [
                {"from": {"user": "human", "assistant": "gpt"}[m["role"]], "value": m["content"]} for m in messages]})
        else:
            rows.append({"messages": messages})
    return rows


def test_system_prompts_a_template_leaves_out_are_counted(tmp_path, tokenizer):
    """Mistral v0.3 writes the system message only into the last user turn; a conversation to train on ends with
    an assistant turn, so none of the 20 system prompts is trained on, and the report says so."""
    path = write_jsonl(tmp_path / "chats.jsonl", chat_rows(60, system_every=3))
    for name, left_out in (("mistral", 20), ("chatml", 0)):
        lines = []
        template = load_template(name, tokenizer=tokenizer)
        train, _ = load_train_eval(str(path), "none", tokenizer, 1024, template=template, log=lines.append)
        line = next(str(x) for x in lines if str(x).startswith(f"data {path}: "))
        assert len(train) == 60 and "60 examples, 0 truncated, 0 skipped" in line
        assert (f"{SYSTEM_NOT_RENDERED}: 20" in line) == bool(left_out), line
        conversations = load_conversations(path, verbose=False)
        stats = dataset_stats(conversations, tokenizer, 1024, 8, template=template)
        assert (stats["system"], stats["system_not_rendered"]) == (20, left_out)
        assert f"system prompts: 20 conversations have one; the template leaves out {left_out} of them" in \
            format_stats(stats)


def test_an_empty_system_turn_is_dropped_and_the_row_kept(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "sharegpt.jsonl", chat_rows(50, empty_system=True))
    lines = []
    train, evaluation = load_train_eval(str(path), "auto", tokenizer, 1024, log=lines.append)
    assert (len(train), len(evaluation)) == (49, 1)
    assert f"{path}: 50 rows read, 0 skipped; 50 conversations (sharegpt); kept after fix-up: " \
           f"{EMPTY_SYSTEM}: 50" in [str(x) for x in lines]
