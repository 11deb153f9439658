"""Conversation file formats: one row of a file -> one training conversation (a list of `data.guanaco.Turn`).

A file holds one format, decided by its first row (`detect_format`; a Parquet file by its columns,
`parquet_format`). Every row then goes through `parse_row(format, row)`, which returns (turns, notes) or raises
`BadRow` with a short reason the loader counts (`data.sources` reads the files and reports).

| format            | a row (JSON Lines; in Parquet, the same columns)       | the conversation                      |
| ----------------- | ------------------------------------------------------ | ------------------------------------- |
| guanaco           | {"text": "### Human: ...### Assistant: ..."}           | `data.guanaco.parse_guanaco`          |
| oasst             | {"prompt": {"role": "prompter", "text", "replies"}}    | `data.oasst.best_thread`              |
| messages          | {"messages": [{"role", "content"}, ...]} (trl, OpenAI) | one turn per message                  |
| sharegpt          | {"conversations": [{"from", "value"}, ...]}            | one turn per message                  |
| alpaca            | {"instruction", "input"?, "output", "system"?}         | [system], instruction, output         |
| prompt-completion | {"prompt", "completion"}: each a string or messages    | the prompt's, then the completion's   |

Detection tries the formats in this order: oasst (`prompt` is an object), messages, sharegpt, prompt-completion,
alpaca, then guanaco (`text` comes last: Alpaca files often carry a pre-rendered `text` too). A first row with
none of these keys makes a guanaco file whose rows then lack their `text` (counted as such, as before).

Roles (in messages, sharegpt, and the message lists of prompt-completion): `system`; `user`, `human`,
`prompter` -> human; `assistant`, `gpt`, `model` -> assistant. A content (ShareGPT: value) is a string, or
OpenAI's list of parts when every part is {"type": "text", "text": ...} (joined with nothing between). A
prompt-completion string is one human turn (prompt) or one assistant turn (completion); a completion list holds
assistant messages only. Alpaca's human turn is `instruction`, or `instruction + "\\n\\n" + input` when `input` is
not empty; `input` and `system` are optional, and empty (or whitespace only) means absent.

The rules for these four formats (guanaco rows and OASST trees keep their own, in `data.guanaco` / `data.oasst`):
an optional system turn first, then human and assistant turns alternating, human first, ending with an
assistant turn, no turn empty (or whitespace only). Text is kept as it is, whitespace at its edges included:
the chat template decides what is rendered (Llama 2 and 3.x trim message edges, ChatML and Zephyr keep them),
and `data.encoding` trains on exactly that. One repair: an empty first system turn (ShareGPT exports often open
with `{"from": "system", "value": ""}`) is dropped, noted (`EMPTY_SYSTEM`), and the row kept. Nothing else is
repaired: a conversation that ends with a human turn is skipped ("ends with a human turn"), not trimmed as
guanaco rows are. Text may contain `### Human:`: a chat template checks its own markers when it encodes.

Deliberately left out: tool use (tool messages and assistant `tool_calls` skip the row: "tool message"), images
and other non-text parts ("non-text content"), a row's `tools` list and other extra keys (ignored), OpenAI's
per-message training `weight` (every assistant turn is trained on; a weight of 0 is noted), role spellings other
than the ones above (matched exactly, case included), more than one system turn or one anywhere but first,
preference formats (chosen / rejected: `data.pairs` reads those), and custom column names.
"""

from __future__ import annotations

import json

from . import oasst
from .guanaco import ASSISTANT, HUMAN, SYSTEM, BadRow, Turn, check_conversation, parse_guanaco_with_notes

GUANACO, OASST, MESSAGES, SHAREGPT, ALPACA, PROMPT_COMPLETION = (
    "guanaco", "oasst", "messages", "sharegpt", "alpaca", "prompt-completion")
FORMATS = (GUANACO, OASST, MESSAGES, SHAREGPT, ALPACA, PROMPT_COMPLETION)
# What the error messages that list the accepted files say.
ACCEPTED = ("guanaco `text`, OASST trees, `messages` (role/content), ShareGPT `conversations`, Alpaca "
            "`instruction`/`output`, or `prompt`/`completion` rows")

# The keys (in Parquet, the columns) that make a row of each format, in the order detection tries them (oasst,
# a `prompt` object, is tried first).
_KEYS = {MESSAGES: ("messages",), SHAREGPT: ("conversations",), PROMPT_COMPLETION: ("prompt", "completion"),
         ALPACA: ("instruction", "output"), GUANACO: ("text",)}
_OPTIONAL_COLUMNS = {ALPACA: ("input", "system")}

ROLE_NAMES = {"system": SYSTEM, "user": HUMAN, "human": HUMAN, "prompter": HUMAN,
              "assistant": ASSISTANT, "gpt": ASSISTANT, "model": ASSISTANT}
TOOL_ROLES = ("tool", "function", "ipython", "function_call", "observation")  # the last two: LLaMA-Factory

# Why a row was kept as it is, or what was repaired; the loader reports these next to the skip reasons.
WEIGHT_IGNORED = "message weight 0 ignored (trained on)"
EMPTY_SYSTEM = "empty system turn (dropped)"


def _format_of(obj) -> str | None:
    if oasst.is_tree(obj):
        return OASST
    if not isinstance(obj, dict):
        return None
    return next((fmt for fmt, keys in _KEYS.items() if all(k in obj for k in keys)), None)


def detect_format(obj) -> str:
    """The format of a file whose first row is `obj` (one of FORMATS); guanaco when no format's keys are there."""
    return _format_of(obj) or GUANACO


def parquet_format(columns) -> tuple[str, list[str]] | None:
    """(format, the columns to read) of a Parquet file with these columns, or None when none of them holds
    conversations. Tried in `detect_format`'s order; OASST trees in Parquet are not read."""
    for fmt, keys in _KEYS.items():
        if all(k in columns for k in keys):
            return fmt, list(keys) + [c for c in _OPTIONAL_COLUMNS.get(fmt, ()) if c in columns]
    return None


def parse_row(fmt: str, obj) -> tuple[list[Turn], list[str]]:
    """The conversation of one row (a decoded JSON object, or a Parquet row as a dict) of a file of format
    `fmt`, and the notes of what was normalised. Raises BadRow with a countable reason for an unusable row."""
    if fmt == GUANACO:
        if not isinstance(obj, dict) or "text" not in obj:
            raise BadRow("missing text field", f"expected an object with a `text` field, got {_looks_like(obj)}")
        return parse_guanaco_with_notes(obj["text"])
    if fmt == OASST:
        return oasst.best_thread(obj)
    if fmt not in _PARSERS:
        raise ValueError(f"unknown conversation format {fmt!r}; expected one of {', '.join(FORMATS)}")
    # A row of the file's format has at least one of its keys (a missing other one is "missing content").
    if not (isinstance(obj, dict) and any(k in obj for k in _KEYS[fmt])) or (
            fmt == PROMPT_COMPLETION and oasst.is_tree(obj)):
        keys = " and ".join(f"`{k}`" for k in _KEYS[fmt])
        raise BadRow(f"not {'an' if fmt[0] in 'aeiou' else 'a'} {fmt} row",
                     f"expected an object with {keys}, as the file's first row has; got {_looks_like(obj)}")
    notes = []
    turns = _PARSERS[fmt](obj, notes)
    if turns and turns[0].role == SYSTEM and not turns[0].text.strip():
        turns = turns[1:]  # how exported datasets often say "no system prompt"
        notes.append(EMPTY_SYSTEM)
    _check(turns)
    return turns, list(dict.fromkeys(notes))


def _check(turns: list[Turn]) -> None:
    if not turns:
        raise BadRow("empty conversation", "no messages")
    for i, turn in enumerate(turns, start=1):
        if not turn.text.strip():
            raise BadRow(f"empty {turn.role} turn", f"turn {i} ({turn.role}) has no text")
    if turns[-1].role == HUMAN:
        check_conversation(turns, last=HUMAN, markers=False)  # turns out of order, if they are, says more
        raise BadRow("ends with a human turn", f"turn {len(turns)} is a human turn with no assistant reply after "
                     "it (nothing to learn from it; remove it, or add the reply)")
    check_conversation(turns, markers=False)


def _content(value, what: str) -> str:
    """A message's content as text: a string, or a list of text parts joined."""
    if value is None:
        raise BadRow("missing content", f"{what} has no text")
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise BadRow("non-string content", f"{what} is {type(value).__name__}, expected a string or a list of "
                     "text parts")
    texts = []
    for part in value:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif isinstance(kind, str) and kind != "text":
            raise BadRow("non-text content", f"{what} has a {kind!r} part; only text parts are read")
        else:
            raise BadRow("non-string content", f"{what} has the part {_short(part)}, expected "
                         '{"type": "text", "text": "..."}')
    return "".join(texts)


def _message_turns(messages, field: str, role_key: str, content_key: str, notes: list[str]) -> list[Turn]:
    if not isinstance(messages, list):
        raise BadRow(f"{field} not a list", f"`{field}` is {type(messages).__name__}, expected a list of messages")
    turns = []
    for i, m in enumerate(messages, start=1):
        where = f"{field} message {i}"
        if not isinstance(m, dict):
            raise BadRow("message not an object", f"{where} is {_short(m)}")
        name = m.get(role_key)
        role = ROLE_NAMES.get(name) if isinstance(name, str) else None
        if name in TOOL_ROLES or (role == ASSISTANT and (m.get("tool_calls") or m.get("function_call"))):
            raise BadRow("tool message", f"{where} ({role_key} {name!r}) is a tool call or a tool's result; tool "
                         "use is not supported")
        if role is None:
            raise BadRow("unknown role", f"{where} has {role_key} {_short(name)}, expected one of "
                         f"{', '.join(ROLE_NAMES)}")
        if m.get("weight") == 0:
            notes.append(WEIGHT_IGNORED)
        turns.append(Turn(role, _content(m.get(content_key), f"{where} ({name})")))
    return turns


def _field(obj: dict, key: str, optional: bool = False) -> str:
    """An Alpaca field as it is; "" for an optional one that is absent or whitespace only."""
    value = obj.get(key)
    if value is None:
        if optional:
            return ""
        raise BadRow("missing content", f"`{key}` is missing or null")
    if not isinstance(value, str):
        raise BadRow("non-string content", f"`{key}` is {type(value).__name__}, expected a string")
    return "" if optional and not value.strip() else value


def _messages(obj: dict, notes: list[str]) -> list[Turn]:
    return _message_turns(obj.get("messages"), "messages", "role", "content", notes)


def _sharegpt(obj: dict, notes: list[str]) -> list[Turn]:
    return _message_turns(obj.get("conversations"), "conversations", "from", "value", notes)


def _alpaca(obj: dict, notes: list[str]) -> list[Turn]:
    system, instruction = _field(obj, "system", optional=True), _field(obj, "instruction")
    extra, output = _field(obj, "input", optional=True), _field(obj, "output")
    if not instruction.strip():  # an input alone is not an instruction
        raise BadRow("empty human turn", "`instruction` is empty")
    return ([Turn(SYSTEM, system)] if system else []) + [
        Turn(HUMAN, f"{instruction}\n\n{extra}" if extra else instruction), Turn(ASSISTANT, output)]


def _prompt_completion(obj: dict, notes: list[str]) -> list[Turn]:
    prompt, completion = (_side(obj, key, role, notes) for key, role in (("prompt", HUMAN), ("completion", ASSISTANT)))
    for turn in completion:
        if turn.role != ASSISTANT:
            raise BadRow("turns out of order", f"the completion holds a {turn.role} message; a completion is the "
                         "assistant's reply (put earlier turns in the prompt)")
    return prompt + completion


def _side(obj: dict, key: str, role: str, notes: list[str]) -> list[Turn]:
    value = obj.get(key)
    if isinstance(value, str):
        return [Turn(role, value)]
    if isinstance(value, list):
        return _message_turns(value, key, "role", "content", notes)
    if value is None:
        raise BadRow("missing content", f"`{key}` is missing or null")
    raise BadRow(f"{key} not a string or list", f"`{key}` is {type(value).__name__}, expected a string or a list "
                 "of messages")


_PARSERS = {MESSAGES: _messages, SHAREGPT: _sharegpt, ALPACA: _alpaca, PROMPT_COMPLETION: _prompt_completion}


def _looks_like(obj) -> str:
    """A row for an error message: the format it has, when it has one, else its start."""
    fmt = _format_of(obj)
    if not fmt:
        return _short(obj)
    return f"{'an' if fmt[0] in 'aeiou' else 'a'} {fmt} row (a file holds one format, decided by its first row)"


def _short(obj) -> str:
    s = json.dumps(obj, ensure_ascii=False, default=str)
    return s if len(s) <= 60 else s[:57] + "..."
