"""data/: parsing guanaco rows, OASST trees, loading files and the Hub, and bad input.

Encoding and masking are in test_data_encode.py, batching in test_data_batching.py, the stats command in
test_data_stats.py.
"""

from __future__ import annotations

import gzip
import json
from collections import Counter
from pathlib import Path

import pytest

from data import BadRow, Turn, encode_all, load_conversations, oasst, parse_guanaco, render
from data.guanaco import TRAILING_HUMAN, WHITESPACE, parse_guanaco_with_notes
from helpers import ADVERSARIAL, GUANACO_SAMPLE, OASST_SAMPLE, A, H


def fixture_rows() -> list[str]:
    return [json.loads(line)["text"] for line in GUANACO_SAMPLE.read_text(encoding="utf-8").splitlines()]


def write_jsonl(path: Path, objs) -> Path:
    lines = [o if isinstance(o, str) else json.dumps(o, ensure_ascii=False) for o in objs]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------- fixture rows

def test_fixture_rows_parse_to_alternating_turns_and_render_back_exactly():
    rows = fixture_rows()
    assert len(rows) == 11
    n_turns = []
    for row in rows:
        turns = parse_guanaco(row)
        assert [t.role for t in turns] == [H, A] * (len(turns) // 2)
        assert all(t.text and t.text == t.text.strip() for t in turns)
        assert render(turns) == row
        assert parse_guanaco_with_notes(row)[1] == []  # fixture rows are canonical: nothing fixed up
        n_turns.append(len(turns))
    assert n_turns == [2] * 9 + [4, 6]


def test_fixture_multi_turn_row_turn_texts():
    turns = parse_guanaco(fixture_rows()[10])
    assert turns == [Turn(H, "Translate 'good morning' into French."), Turn(A, "Bonjour."),
                     Turn(H, "And into Italian?"), Turn(A, "Buongiorno."),
                     Turn(H, "And Japanese?"), Turn(A, "おはようございます (ohayō gozaimasu).")]


# ------------------------------------------------------------------------------------------- adversarial rows
# (ADVERSARIAL, in helpers.py: test_data_encode.py encodes the same rows)

@pytest.mark.parametrize("name", list(ADVERSARIAL))
def test_adversarial_rows_parse(name):
    row, expected = ADVERSARIAL[name]
    assert [(t.role, t.text) for t in parse_guanaco(row)] == expected


def test_fix_ups_are_named():
    assert parse_guanaco_with_notes(ADVERSARIAL["a trailing ### Human: with no answer"][0])[1] == [TRAILING_HUMAN]
    assert parse_guanaco_with_notes(ADVERSARIAL["leading and trailing whitespace"][0])[1] == [WHITESPACE]
    assert parse_guanaco_with_notes(ADVERSARIAL["markdown headings in a reply"][0])[1] == []


BAD_ROWS = {
    "": "empty text",
    "  \n ": "empty text",
    "Just some text, no markers.": "no markers",
    "Hello!### Human: hi### Assistant: yo": "text before first marker",
    "### Assistant: I speak first.### Human: hi": "turns out of order",
    "### Human: a### Human: b### Assistant: c": "turns out of order",
    "### Human: a### Assistant: b### Assistant: c": "turns out of order",
    "### Human: only a question": "no assistant turn",
    "### Human:": "no assistant turn",
    "### Human:   ### Assistant: an answer to nothing": "empty turn",
    "### Human: q1### Assistant:   ### Human: q2### Assistant: a2": "empty turn",
    "### Human: q### Assistant:": "empty turn",
}


@pytest.mark.parametrize("row", list(BAD_ROWS))
def test_bad_rows_raise_with_their_reason(row):
    with pytest.raises(BadRow) as e:
        parse_guanaco(row)
    assert e.value.reason == BAD_ROWS[row]
    assert isinstance(e.value, ValueError)


def test_non_string_text_is_a_bad_row():
    with pytest.raises(BadRow, match="missing text field"):
        parse_guanaco(None)


# ------------------------------------------------------------------------------------------- loading files

GOOD = {"text": "### Human: hi### Assistant: hello"}
MALFORMED = [  # (line as written, counted reason)
    ('{"text": "### Human: hi### Assistant: hello"', "invalid JSON"),
    (json.dumps({"prompt_text": "### Human: hi### Assistant: yo"}), "missing text field"),
    (json.dumps({"text": 42}), "missing text field"),
    (json.dumps(["### Human: hi### Assistant: yo"]), "missing text field"),
    (json.dumps({"text": ""}), "empty text"),
    (json.dumps({"text": "### Human: no answer"}), "no assistant turn"),
    (json.dumps({"text": "### Assistant: a### Human: q"}), "turns out of order"),
    (json.dumps({"text": "### Human: ### Assistant: a"}), "empty turn"),
]


def test_loader_counts_every_skip_and_reports_it(tmp_path, capsys):
    path = write_jsonl(tmp_path / "mixed.jsonl",
                       [GOOD] + [line for line, _ in MALFORMED]
                       + ["", {"text": "### Human: q### Assistant: a### Human: dangling"}, GOOD])
    convs = load_conversations(path)
    report = convs.report
    assert report.rows == 1 + len(MALFORMED) + 2  # the blank line is not a row
    assert report.skipped == Counter(reason for _, reason in MALFORMED)
    assert report.n_skipped == 8
    assert report.notes == Counter({TRAILING_HUMAN: 1})
    assert len(convs) == report.conversations == 3
    assert convs[1] == [Turn(H, "q"), Turn(A, "a")]
    err = capsys.readouterr().err
    assert "11 rows read, 8 skipped (" in err
    assert "missing text field: 3" in err and "invalid JSON: 1" in err
    assert f"kept after fix-up: {TRAILING_HUMAN}: 1" in err


@pytest.mark.parametrize("line,reason", MALFORMED)
def test_strict_raises_on_the_first_bad_row_with_its_line_number(tmp_path, line, reason):
    path = write_jsonl(tmp_path / "bad.jsonl", [GOOD, GOOD, line, "{broken"])
    with pytest.raises(BadRow) as e:
        load_conversations(path, strict=True)
    assert e.value.reason == reason
    assert e.value.lineno == 3
    assert f"{path}:3: {reason}" in str(e.value)
    assert len(load_conversations(path, verbose=False)) == 2  # without strict: skipped and counted


def test_fixture_file_loads_without_skips():
    convs = load_conversations(GUANACO_SAMPLE, strict=True, verbose=False)
    assert convs.report.format == "guanaco"
    assert (convs.report.rows, convs.report.n_skipped, len(convs)) == (11, 0, 11)
    assert [render(c) for c in convs] == fixture_rows()


def test_invalid_utf8_costs_one_counted_row(tmp_path):
    path = tmp_path / "bytes.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n" + b'{"text": "### Human: \xff### Assistant: x"}\n'
                     + json.dumps(GOOD).encode() + b"\n")
    convs = load_conversations(path, verbose=False)
    assert len(convs) == 2 and convs.report.skipped == Counter({"invalid UTF-8": 1})
    with pytest.raises(BadRow, match=r"bytes.jsonl:2: invalid UTF-8"):
        load_conversations(path, strict=True)


def test_a_lone_surrogate_costs_one_counted_row_in_guanaco_text_and_in_messages(tmp_path, tokenizer):
    # json.dumps writes the escape "\\ud800" a file holds; json.loads gives back a str no UTF-8 can spell.
    good_messages = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    bad_messages = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a\ud800"}]}
    for name, good, bad in (("g.jsonl", GOOD, {"text": "### Human: \ud800### Assistant: x"}),
                            ("m.jsonl", good_messages, bad_messages)):
        path = write_jsonl(tmp_path / name, [good, json.dumps(bad), good])
        convs = load_conversations(path, verbose=False)
        assert len(convs) == 2 and convs.report.skipped == Counter({"invalid Unicode": 1})
        assert len(encode_all(convs, tokenizer, 64)[0]) == 2
        with pytest.raises(BadRow, match=rf"{name}:2: invalid Unicode: turn \d \(\w+\) holds a lone surrogate "):
            load_conversations(path, strict=True)


def test_gzip_and_path_named_like_a_split(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with gzip.open(tmp_path / "rows.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(json.dumps(GOOD) + "\n")
    assert load_conversations(tmp_path / "rows.jsonl.gz", verbose=False) == [[Turn(H, "hi"), Turn(A, "hello")]]
    write_jsonl(tmp_path / "train", [GOOD, GOOD])
    assert len(load_conversations(Path("train"), verbose=False)) == 2  # a Path is always a local file


def test_missing_file_and_wrong_options_say_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a split name"):
        load_conversations(tmp_path / "nope.jsonl")
    with pytest.raises(ValueError, match="all_threads=True applies to OASST"):
        load_conversations(GUANACO_SAMPLE, all_threads=True)
    flat = write_jsonl(tmp_path / "flat.jsonl", [{"message_id": "a", "parent_id": None, "text": "hi",
                                                  "role": "prompter"}])
    with pytest.raises(ValueError, match="flat OASST message export"):
        load_conversations(flat)
    with pytest.raises(ValueError, match="no rows"):
        load_conversations(write_jsonl(tmp_path / "empty.jsonl", []))


# ------------------------------------------------------------------------------------------- the Hub

@pytest.mark.parametrize("split,filename", [("train", "openassistant_best_replies_train.jsonl"),
                                            ("test", "openassistant_best_replies_eval.jsonl"),
                                            ("eval", "openassistant_best_replies_eval.jsonl")])
def test_split_names_download_the_right_hub_file(monkeypatch, split, filename):
    import huggingface_hub
    calls = []

    def fake_download(repo_id, filename, **kwargs):
        calls.append((repo_id, filename, kwargs["repo_type"]))
        return str(GUANACO_SAMPLE)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    convs = load_conversations(split, verbose=False)
    assert calls == [("timdettmers/openassistant-guanaco", filename, "dataset")]
    assert len(convs) == 11 and convs.report.source == f"timdettmers/openassistant-guanaco:{split}"


def test_hub_failure_offline_is_explained(tmp_path):
    # The real hf_hub_download, told not to touch the network, with an empty cache: what an offline machine sees.
    with pytest.raises(RuntimeError) as e:
        load_conversations("train", cache_dir=tmp_path, local_files_only=True)
    msg = str(e.value)
    assert "timdettmers/openassistant-guanaco" in msg and "openassistant_best_replies_train.jsonl" in msg
    assert "pass a local file" in msg


# ------------------------------------------------------------------------------------------- OASST trees

# What guanaco holds for the two fixture trees: the rank-0 reply at every step.
OASST_AS_GUANACO = [
    "### Human: How do I keep basil alive indoors?### Assistant: Give it at least six hours of bright light a day, "
    "water when the top centimetre of soil is dry, and pinch off flower buds so the plant keeps making leaves."
    "### Human: My basil leaves are turning yellow. Why?### Assistant: Yellow leaves usually mean too much water "
    "or a pot without drainage. Let the soil dry out a little and make sure excess water can escape.",
    "### Human: Nenne drei Primzahlen größer als 50.### Assistant: 53, 59 und 61 sind Primzahlen größer als 50.",
]


def test_oasst_trees_give_the_guanaco_conversations():
    convs = load_conversations(OASST_SAMPLE, strict=True, verbose=False)
    assert convs.report.format == "oasst" and convs.report.rows == 2
    assert [render(c) for c in convs] == OASST_AS_GUANACO
    assert [parse_guanaco(t) for t in OASST_AS_GUANACO] == list(convs)


def test_oasst_all_threads():
    convs = load_conversations(OASST_SAMPLE, all_threads=True, verbose=False)
    threads = [[t.text for t in c] for c in convs]
    basil, yellow = "How do I keep basil alive indoors?", "My basil leaves are turning yellow. Why?"
    give = threads[0][1]
    assert threads == [
        [basil, give, yellow, threads[0][3]], [basil, give, yellow, "Probably it needs fertilizer."],
        [basil, "Just water it every day."], [basil, "Basil is easy."],
        ["Nenne drei Primzahlen größer als 50.", "53, 59 und 61 sind Primzahlen größer als 50."],
        ["Nenne drei Primzahlen größer als 50.", "51, 53 und 57."]]
    assert render(convs[0]) == OASST_AS_GUANACO[0]


def msg(role, text, replies=(), rank=None, **kw):
    return {"role": role, "text": text, "replies": list(replies), "rank": rank, **kw}


def test_oasst_best_path_follows_rank_not_file_order_and_skips_deleted():
    tree = {"prompt": msg("prompter", "Q", [
        msg("assistant", "second best", rank=1),
        msg("assistant", "deleted best", rank=0, deleted=True),
        msg("assistant", "rejected", rank=0, review_result=False),
        msg("assistant", "unranked"),
        msg("assistant", "best of the rest", rank=0, replies=[
            msg("prompter", "follow-up B", rank=1, replies=[msg("assistant", "answer B")]),
            msg("prompter", "follow-up A", rank=0, replies=[msg("assistant", "answer A", rank=None)]),
        ]),
    ])}
    conv, notes = oasst.best_thread(tree)
    assert [t.text for t in conv] == ["Q", "best of the rest", "follow-up A", "answer A"] and notes == []


def test_oasst_bad_trees(tmp_path):
    dangling = {"prompt": msg("prompter", "Q", [msg("assistant", "A", rank=0, replies=[msg("prompter", "Q2")])])}
    assert oasst.best_thread(dangling) == ([Turn(H, "Q"), Turn(A, "A")], [TRAILING_HUMAN])
    trees = [
        dangling,
        {"prompt": msg("prompter", "nobody answered")},
        {"prompt": msg("prompter", "Q", [msg("assistant", "Sure.### Human: inject", rank=0)])},
        {"prompt": msg("prompter", "Q", [msg("assistant", "   ", rank=0)])},
        {"prompt": msg("assistant", "I am the root")},
        {"message_tree_id": "x", "prompt": msg("prompter", "Q", [msg("assistant", "fine", rank=0)])},
        "not json",
    ]
    convs = load_conversations(write_jsonl(tmp_path / "trees.jsonl", trees), verbose=False)
    assert convs.report.format == "oasst"
    assert convs.report.skipped == Counter({"no assistant turn": 1, "marker inside a turn": 1, "empty turn": 1,
                                            "turns out of order": 1, "invalid JSON": 1})
    assert convs.report.notes == Counter({TRAILING_HUMAN: 1})
    assert [render(c) for c in convs] == ["### Human: Q### Assistant: A", "### Human: Q### Assistant: fine"]
    with pytest.raises(BadRow, match=r"trees.jsonl:2: no assistant turn"):
        load_conversations(tmp_path / "trees.jsonl", strict=True)
