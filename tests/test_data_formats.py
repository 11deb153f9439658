"""data.formats: the conversation formats beside guanaco rows and OASST trees (messages, ShareGPT, Alpaca,
prompt-completion), in .jsonl, .jsonl.gz and .parquet: the exact conversations, every skip reason counted, the
format named in the report, detection, and the turn rules they share with data.guanaco.

Guanaco rows and OASST trees are in test_data.py, Parquet guanaco rows in test_data_sources.py.
"""

from __future__ import annotations

import gzip
import json
from collections import Counter
from pathlib import Path

import pytest

from data import BadRow, Turn, load_conversations, render
from data.formats import EMPTY_SYSTEM, WEIGHT_IGNORED, detect_format, parquet_format, parse_row
from data.guanaco import SYSTEM, check_conversation
from data.sources import source_problems
from helpers import OASST_SAMPLE, A, H

S = SYSTEM


def write_jsonl(path: Path, rows) -> Path:
    text = "".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows)
    if path.suffix == ".gz":
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def write_parquet(path: Path, columns: dict) -> Path:
    pa = pytest.importorskip("pyarrow", reason="Parquet files need pyarrow: pip install -e .[parquet]")
    pq = pytest.importorskip("pyarrow.parquet", reason="Parquet files need pyarrow: pip install -e .[parquet]")
    pq.write_table(pa.table(columns), path)
    return path


def turns(conversations) -> list[list[tuple[str, str]]]:
    return [[(t.role, t.text) for t in c] for c in conversations]


def msg(role, content, **kw):
    return {"role": role, "content": content, **kw}


# ---- messages (trl / OpenAI) ---------------------------------------------------------------------------------

MESSAGES_GOOD = [
    {"messages": [msg("system", "Be brief."), msg("user", " hi \n"), msg("assistant", "hello"),
                  msg("user", "and?"), msg("assistant", "### Human: is just text here")]},
    {"messages": [msg("human", "q"), msg("gpt", "a")]},
    {"messages": [msg("prompter", "q2"), msg("model", "a2")]},
    {"messages": [msg("user", [{"type": "text", "text": "two "}, {"type": "text", "text": "parts"}]),
                  msg("assistant", [{"type": "text", "text": "ok"}])], "tools": []},
    {"messages": [msg("system", ""), msg("user", "q3"), msg("assistant", "a3 \n")]},
]
MESSAGES_WANT = [  # text as written, whitespace included: the chat template decides what to render of it
    [(S, "Be brief."), (H, " hi \n"), (A, "hello"), (H, "and?"), (A, "### Human: is just text here")],
    [(H, "q"), (A, "a")],
    [(H, "q2"), (A, "a2")],
    [(H, "two parts"), (A, "ok")],
    [(H, "q3"), (A, "a3 \n")],  # an empty system turn dropped, the row kept
]
MESSAGES_BAD = [  # (row, counted reason)
    ({"messages": [msg("user", "q"), msg("assistant", "a"), msg("user", "and then?")]}, "ends with a human turn"),
    ({"messages": [msg("user", "q"), msg("assistant", "  ")]}, "empty assistant turn"),
    ({"messages": [msg("user", ""), msg("assistant", "a")]}, "empty human turn"),
    ({"messages": [msg("narrator", "q"), msg("assistant", "a")]}, "unknown role"),
    ({"messages": [{"content": "q"}, msg("assistant", "a")]}, "unknown role"),
    ({"messages": [msg("user", "q"), msg("tool", "42")]}, "tool message"),
    ({"messages": [msg("user", "q"), msg("assistant", None, tool_calls=[{"id": "1"}]), msg("assistant", "x")]},
     "tool message"),
    ({"messages": [msg("user", [{"type": "image_url", "image_url": {"url": "x"}}]), msg("assistant", "a")]},
     "non-text content"),
    ({"messages": [msg("user", "q"), msg("user", "q again"), msg("assistant", "a")]}, "turns out of order"),
    ({"messages": [msg("user", "q"), msg("system", "late"), msg("assistant", "a")]}, "turns out of order"),
    ({"messages": [msg("user", "q"), msg("user", "q again")]}, "turns out of order"),  # not "ends with a human"
    ({"messages": [msg("assistant", "I start"), msg("user", "q"), msg("assistant", "a")]}, "turns out of order"),
    ({"messages": [{"role": "user"}, msg("assistant", "a")]}, "missing content"),
    ({"messages": [msg("user", 7), msg("assistant", "a")]}, "non-string content"),
    ({"messages": [msg("user", [{"type": "text", "text": 7}]), msg("assistant", "a")]}, "non-string content"),
    ({"messages": [msg("system", "only a system prompt")]}, "no assistant turn"),
    ({"messages": []}, "empty conversation"),
    ({"messages": "user: hi"}, "messages not a list"),
    ({"messages": ["hi"]}, "message not an object"),
    ({"text": "### Human: hi### Assistant: hello"}, "not a messages row"),
]


def test_messages_rows_become_exact_conversations_and_every_skip_is_counted(tmp_path, capsys):
    path = write_jsonl(tmp_path / "chat.jsonl", MESSAGES_GOOD[:1] + [r for r, _ in MESSAGES_BAD]
                       + ["{broken"] + MESSAGES_GOOD[1:])
    convs = load_conversations(path)
    assert turns(convs) == MESSAGES_WANT
    report = convs.report
    assert (report.format, report.rows, report.conversations) == ("messages", 5 + len(MESSAGES_BAD) + 1, 5)
    assert report.skipped == Counter([reason for _, reason in MESSAGES_BAD] + ["invalid JSON"])
    assert report.notes == Counter({EMPTY_SYSTEM: 1})
    err = capsys.readouterr().err
    assert f"{path}: 26 rows read, 21 skipped (" in err and "; 5 conversations (messages); kept" in err
    assert "turns out of order: 4" in err and "tool message: 2" in err and "empty assistant turn: 1" in err


@pytest.mark.parametrize("row,reason", MESSAGES_BAD)
def test_strict_names_the_file_line_and_reason(tmp_path, row, reason):
    path = write_jsonl(tmp_path / "chat.jsonl", MESSAGES_GOOD[:2] + [row])
    with pytest.raises(BadRow) as e:
        load_conversations(path, strict=True)
    assert (e.value.reason, e.value.lineno) == (reason, 3)
    assert str(e.value).startswith(f"{path}:3: {reason}: ")  # the detail follows: which message, what was found


def test_message_weight_0_is_noted_not_honoured(tmp_path):
    row = {"messages": [msg("user", "q"), msg("assistant", "a", weight=0), msg("user", "q2"),
                        msg("assistant", "a2", weight=1)]}
    conv, notes = parse_row("messages", row)
    assert turns([conv]) == [[(H, "q"), (A, "a"), (H, "q2"), (A, "a2")]] and notes == [WEIGHT_IGNORED]


# ---- ShareGPT ------------------------------------------------------------------------------------------------

def sg(who, value):
    return {"from": who, "value": value}


def test_sharegpt_gz_rows_and_role_spellings(tmp_path):
    rows = [
        {"conversations": [sg("system", "You are terse."), sg("human", "hi"), sg("gpt", "yo\n")]},
        {"conversations": [sg("user", "q"), sg("assistant", "a"), sg("prompter", "q2"), sg("model", "a2")]},
        {"conversations": [sg("human", "q"), sg("gpt", "a"), sg("human", "dangling")]},
        {"conversations": [sg("human", "q"), sg("function_call", "{}"), sg("observation", "{}"), sg("gpt", "a")]},
        {"conversations": [sg("human", "q"), sg("bing", "a")]},
        {"conversations": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
        {"conversations": [sg("human", "q"), sg("gpt", None)]},
        {"messages": [msg("user", "q"), msg("assistant", "a")]},
    ]
    convs = load_conversations(write_jsonl(tmp_path / "sg.jsonl.gz", rows), verbose=False)
    assert turns(convs) == [[(S, "You are terse."), (H, "hi"), (A, "yo\n")],
                            [(H, "q"), (A, "a"), (H, "q2"), (A, "a2")]]
    assert convs.report.format == "sharegpt" and convs.report.rows == 8
    assert convs.report.skipped == Counter({"ends with a human turn": 1, "tool message": 1, "unknown role": 2,
                                            "missing content": 1, "not a sharegpt row": 1})
    assert convs.report.notes == Counter()


# ---- Alpaca --------------------------------------------------------------------------------------------------

def test_alpaca_joins_instruction_and_input(tmp_path):
    rows = [
        {"instruction": "Translate.", "input": "Bonjour", "output": "Hello"},
        {"instruction": "Name a prime.", "output": "7"},
        {"instruction": " Name a colour. ", "input": "  ", "output": "Red", "system": ""},
        {"instruction": "Be nice.", "input": None, "output": "OK", "system": "You are kind.",
         "text": "Below is an instruction ..."},
        {"instruction": "q", "output": ""},
        {"instruction": "", "input": "only an input", "output": "a"},
        {"instruction": "q"},
        {"instruction": ["q"], "output": "a"},
        {"text": "### Human: hi### Assistant: hello"},
    ]
    convs = load_conversations(write_jsonl(tmp_path / "alpaca.jsonl", rows), verbose=False)
    assert turns(convs) == [[(H, "Translate.\n\nBonjour"), (A, "Hello")], [(H, "Name a prime."), (A, "7")],
                            [(H, " Name a colour. "), (A, "Red")],  # input and system whitespace: absent
                            [(S, "You are kind."), (H, "Be nice."), (A, "OK")]]
    assert convs.report.format == "alpaca"
    assert convs.report.skipped == Counter({"empty assistant turn": 1, "empty human turn": 1, "missing content": 1,
                                            "non-string content": 1, "not an alpaca row": 1})
    assert convs.report.notes == Counter()


# ---- prompt-completion ---------------------------------------------------------------------------------------

def test_prompt_completion_strings_and_message_lists(tmp_path):
    rows = [
        {"prompt": "What is 2+2?", "completion": " 4"},
        {"prompt": [msg("system", "Maths tutor."), msg("user", "2+3?"), msg("assistant", "5"),
                    msg("user", "times 2?")],
         "completion": [msg("assistant", "10")]},
        {"prompt": "q", "completion": [msg("assistant", "a")]},
        {"prompt": [msg("user", "q")], "completion": [msg("user", "not a reply")]},
        {"prompt": [msg("user", "q")], "completion": [msg("assistant", "a"), msg("assistant", "more")]},
        {"prompt": [msg("user", "q")], "completion": []},
        {"prompt": "q", "completion": None},
        {"prompt": "q", "completion": 4},
        {"prompt": {"role": "prompter", "text": "an OASST tree", "replies": []}, "completion": "a"},
    ]
    convs = load_conversations(write_jsonl(tmp_path / "pc.jsonl", rows), verbose=False)
    assert turns(convs) == [[(H, "What is 2+2?"), (A, " 4")],
                            [(S, "Maths tutor."), (H, "2+3?"), (A, "5"), (H, "times 2?"), (A, "10")],
                            [(H, "q"), (A, "a")]]
    assert convs.report.format == "prompt-completion"
    assert convs.report.skipped == Counter({"turns out of order": 2, "ends with a human turn": 1,
                                            "missing content": 1, "completion not a string or list": 1,
                                            "not a prompt-completion row": 1})


# ---- detection -----------------------------------------------------------------------------------------------

def test_detection_keeps_oasst_trees_apart_from_prompt_completion(tmp_path):
    tree = json.loads(OASST_SAMPLE.read_text(encoding="utf-8").splitlines()[0])
    assert detect_format(tree) == "oasst" and "prompt" in tree
    assert [detect_format(r) for r in [
        {"prompt": "x", "completion": "y"}, {"messages": [], "text": "t"}, {"conversations": []},
        {"instruction": "i", "output": "o", "text": "t"}, {"text": "t"}, {"prompt": "x", "response": "y"},
        ["not", "an", "object"]]] == [
        "prompt-completion", "messages", "sharegpt", "alpaca", "guanaco", "guanaco", "guanaco"]
    assert load_conversations(OASST_SAMPLE, verbose=False).report.format == "oasst"  # as before

    pc = {"prompt": "q", "completion": "a"}
    first_pc = load_conversations(write_jsonl(tmp_path / "pc.jsonl", [pc, tree]), verbose=False)
    assert turns(first_pc) == [[(H, "q"), (A, "a")]]
    assert first_pc.report.skipped == Counter({"not a prompt-completion row": 1})
    first_tree = load_conversations(write_jsonl(tmp_path / "trees.jsonl", [tree, pc]), verbose=False)
    assert first_tree.report.format == "oasst" and len(first_tree) == 1
    assert first_tree.report.skipped == Counter({"not a message tree": 1})


def test_a_guanaco_file_counts_other_rows_as_before_and_names_what_they_look_like(tmp_path):
    path = write_jsonl(tmp_path / "g.jsonl", [{"text": "### Human: hi### Assistant: hello"},
                                              {"messages": [msg("user", "q"), msg("assistant", "a")]}])
    convs = load_conversations(path, verbose=False)
    assert convs.report.format == "guanaco" and convs.report.skipped == Counter({"missing text field": 1})
    with pytest.raises(BadRow, match=r"g.jsonl:2: missing text field: .*got a messages row \(a file holds one "
                       r"format, decided by its first row\)"):
        load_conversations(path, strict=True)


def test_all_threads_is_for_oasst_only(tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", MESSAGES_GOOD)
    with pytest.raises(ValueError, match="all_threads=True applies to OASST message trees, but this file holds "
                       r"messages rows"):
        load_conversations(path, all_threads=True)


def test_messages_about_accepted_files_name_the_formats(tmp_path):
    problems = source_problems(f"{tmp_path}/missing.jsonl")
    assert len(problems) == 1 and "`messages` (role/content), ShareGPT `conversations`, Alpaca" in problems[0]
    with pytest.raises(FileNotFoundError, match="`prompt`/`completion` rows"):
        load_conversations(tmp_path / "missing.jsonl")


# ---- Parquet -------------------------------------------------------------------------------------------------

def test_parquet_messages_sharegpt_alpaca_prompt_completion_load_like_jsonl(tmp_path):
    # Struct columns: every message carries every field (tool_calls null where absent), as Hub Parquet does.
    messages = [[msg("user", "q"), msg("assistant", "a", tool_calls=None)],
                [msg("system", "Brief."), msg("user", "q2"), msg("assistant", "a2", tool_calls=None)],
                [msg("user", "q"), msg("assistant", None, tool_calls=[{"id": "c1"}])],
                None]
    cases = {
        "messages": ({"id": [1, 2, 3, 4], "text": ["ignored"] * 4, "messages": messages},
                     ["messages"], Counter({"tool message": 1, "messages not a list": 1})),
        "sharegpt": ({"conversations": [[sg("human", "q"), sg("gpt", "a")], [sg("human", "q")]]},
                     ["conversations"], Counter({"ends with a human turn": 1})),
        "alpaca": ({"instruction": ["Translate.", "Name a prime."], "input": ["Bonjour", ""], "output": ["Hello", "7"],
                    "system": [None, "You count."]}, ["instruction", "output", "input", "system"], Counter()),
        "prompt-completion": ({"prompt": ["q", "q2"], "completion": ["a", None]}, ["prompt", "completion"],
                              Counter({"missing content": 1})),
    }
    for fmt, (columns, read, skipped) in cases.items():
        parquet = write_parquet(tmp_path / f"{fmt}.parquet", columns)
        rows = [dict(zip(columns, values, strict=True)) for values in zip(*columns.values(), strict=True)]
        jsonl = write_jsonl(tmp_path / f"{fmt}.jsonl", [{k: v for k, v in r.items() if k in read} for r in rows])
        got, want = load_conversations(parquet, verbose=False), load_conversations(jsonl, verbose=False)
        assert parquet_format(list(columns)) == (fmt, read)
        assert got == want and len(got) == len(rows) - sum(skipped.values()), fmt
        assert (got.report.format, got.report.rows, got.report.skipped) == (fmt, len(rows), skipped), fmt
    assert turns(load_conversations(tmp_path / "messages.parquet", verbose=False)) == [
        [(H, "q"), (A, "a")], [(S, "Brief."), (H, "q2"), (A, "a2")]]
    assert turns(load_conversations(tmp_path / "alpaca.parquet", verbose=False)) == [
        [(H, "Translate.\n\nBonjour"), (A, "Hello")], [(S, "You count."), (H, "Name a prime."), (A, "7")]]
    with pytest.raises(BadRow, match=r"sharegpt.parquet: row 2: ends with a human turn"):
        load_conversations(tmp_path / "sharegpt.parquet", strict=True)


def test_parquet_without_conversation_columns_lists_found_and_expected(tmp_path):
    path = write_parquet(tmp_path / "rows.parquet", {"prompt": ["hi"], "response": ["hello"]})
    with pytest.raises(ValueError, match=r"rows.parquet has no `text` column \(its columns: prompt, response\) "
                       r"nor any other .*`messages`, `conversations` \(ShareGPT\), `instruction` and `output` "
                       r"\(Alpaca\), `prompt` and `completion`$"):
        load_conversations(path)


# ---- the turn rules ------------------------------------------------------------------------------------------

def test_one_system_turn_first_and_markers_only_when_asked():
    check_conversation([Turn(S, "sys"), Turn(H, "q"), Turn(A, "a")])
    check_conversation([Turn(S, "sys"), Turn(H, "q")], last=H)
    check_conversation([Turn(H, "q ### Assistant: x"), Turn(A, "a")], markers=False)
    cases = [([Turn(H, "q"), Turn(S, "sys"), Turn(A, "a")], {}, "turns out of order"),
             ([Turn(S, "a"), Turn(S, "b"), Turn(H, "q"), Turn(A, "a")], {}, "turns out of order"),
             ([Turn(S, " "), Turn(H, "q"), Turn(A, "a")], {}, "empty turn"),
             ([Turn(S, "sys")], {}, "no assistant turn"),
             ([Turn(S, "sys"), Turn(H, "q"), Turn(A, "a")], {"last": H}, "no human turn to answer"),
             ([Turn(H, "q ### Assistant: x"), Turn(A, "a")], {}, "marker inside a turn")]
    for conv, kwargs, reason in cases:
        with pytest.raises(BadRow) as e:
            check_conversation(conv, **kwargs)
        assert e.value.reason == reason, conv


def test_guanaco_text_has_no_system_turn():
    assert render([Turn(H, "q"), Turn(A, "a")]) == "### Human: q### Assistant: a"
    with pytest.raises(ValueError, match="turn 1 is a system turn, which guanaco text"):
        render([Turn(S, "sys"), Turn(H, "q"), Turn(A, "a")])
    with pytest.raises(ValueError, match="Turn role must be 'system', 'human' or 'assistant', got 'user'"):
        Turn("user", "q")
