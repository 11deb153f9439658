"""The guanaco conversation format: parse a row's text into turns, and render turns back into that text.

A guanaco row is one string, `### Human: ...### Assistant: ...` repeated, with no separator between a reply and
the next `### Human:`. Only those two exact markers split turns: markdown headings (`### Step 1`), the bare word
"Assistant:", code and any language inside a turn are content.

Parsing and validation are one step: `parse_guanaco` either returns a conversation that can be trained on
(alternating turns, human first, ending with an assistant reply, no empty turn) or raises `BadRow` with a short
`reason` the loader counts. `check_conversation` is the one rule for turns, also for a conversation the model is
to continue (`data.dialogue`), which ends with the human turn to answer, and for the other file formats
(`data.formats`), whose conversations may open with a system turn. Guanaco text has no system role: `render`
refuses one. Deliberately left out: reading files and reporting (see `data.sources`), tokenization (see
`data.encoding`), and any repair beyond the one documented in `parse_guanaco_with_notes`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

SYSTEM, HUMAN, ASSISTANT = "system", "human", "assistant"
ROLES = (SYSTEM, HUMAN, ASSISTANT)
MARKERS = {HUMAN: "### Human:", ASSISTANT: "### Assistant:"}  # guanaco text has no system marker
_ROLE_OF_MARKER = {m: r for r, m in MARKERS.items()}
_SPLIT = re.compile("(" + "|".join(re.escape(m) for m in MARKERS.values()) + ")")

# Why a trimmed row was kept; the loader reports these next to the skip reasons.
TRAILING_HUMAN = "trailing human turn without answer (dropped)"
WHITESPACE = "whitespace around turns normalised"


@dataclass(frozen=True)
class Turn:
    role: str  # "system", "human" or "assistant"
    text: str  # guanaco rows, OASST trees: stripped (render() puts back one space after the marker); other
    # formats (data.formats): as written, edges included, for the chat template to render or trim

    def __post_init__(self):
        if self.role not in ROLES:
            raise ValueError(f"Turn role must be 'system', 'human' or 'assistant', got {self.role!r}")


class BadRow(ValueError):
    """A row that cannot become a training conversation. `reason` is a short, countable category."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def render(conversation: list[Turn]) -> str:
    """The guanaco text of a conversation: `### Human: q### Assistant: a` per turn, nothing between turns.

    Raises ValueError for a system turn: guanaco text has no marker for one."""
    for i, t in enumerate(conversation):
        if t.role == SYSTEM:
            raise ValueError(f"turn {i + 1} is a system turn, which guanaco text (### Human: / ### Assistant:) "
                             "cannot hold; drop the system turn, or use a chat template with a system role")
    return "".join(f"{MARKERS[t.role]} {t.text}" for t in conversation)


def check_conversation(conversation: list[Turn], last: str = ASSISTANT, markers: bool = True) -> None:
    """Raise BadRow unless the turns are an optional system turn, then human/assistant alternating, human
    first, ending with `last`: an assistant reply for a conversation to train on, the human turn to answer for
    one to continue (`data.dialogue`). No turn may be empty. `markers`: also refuse a turn that contains
    `### Human:` or `### Assistant:` (guanaco rows and OASST trees; the other formats' text may hold them)."""
    if not conversation:
        raise BadRow("empty text", "no turns")
    start = 1 if conversation[0].role == SYSTEM else 0
    for i, turn in enumerate(conversation):
        expected = SYSTEM if i < start else HUMAN if (i - start) % 2 == 0 else ASSISTANT
        if turn.role != expected:
            why = "a system turn may only come first" if turn.role == SYSTEM else f"expected {expected}"
            raise BadRow("turns out of order", f"turn {i + 1} is {turn.role}, {why}")
        if not turn.text.strip():
            raise BadRow("empty turn", f"turn {i + 1} ({turn.role}) has no text")
        for marker in MARKERS.values() if markers else ():
            # A marker inside a turn would re-split differently once rendered (and teach the model to emit it).
            if marker in turn.text:
                raise BadRow("marker inside a turn", f"turn {i + 1} ({turn.role}) contains {marker!r}")
    if conversation[-1].role != last:
        if last == HUMAN:
            raise BadRow("no human turn to answer", "a conversation to answer ends with a human turn (human, "
                         f"assistant, ..., human: an odd number of turns after any system turn), got "
                         f"{len(conversation)} turns")
        raise BadRow("no assistant turn", "the conversation does not end with an assistant reply")


def parse_guanaco_with_notes(text) -> tuple[list[Turn], list[str]]:
    """`parse_guanaco`, and the harmless fix-ups it made: (turns, notes), which the loaders count.

    The one structural fix-up: a trailing `### Human:` turn that no assistant answers (with or without text)
    is dropped, since it carries no assistant token to learn; the earlier turns are kept. Surrounding
    whitespace of each turn is stripped (noted when it differs from the canonical single space).
    """
    if not isinstance(text, str):
        raise BadRow("missing text field", f"`text` is {type(text).__name__}, expected a string")
    if not text.strip():
        raise BadRow("empty text")
    parts = _SPLIT.split(text)
    # parts = [before first marker, marker, body, marker, body, ...]
    if len(parts) == 1:
        raise BadRow("no markers", "neither '### Human:' nor '### Assistant:' occurs")
    if parts[0].strip():
        raise BadRow("text before first marker", f"{parts[0][:40]!r}")
    turns = [Turn(_ROLE_OF_MARKER[m], body.strip()) for m, body in zip(parts[1::2], parts[2::2], strict=True)]
    notes = []
    if turns[0].role != HUMAN:
        raise BadRow("turns out of order", "the first turn is an assistant turn")
    if turns[-1].role == HUMAN:
        turns = turns[:-1]
        notes.append(TRAILING_HUMAN)
        if not turns:
            raise BadRow("no assistant turn", "only a human turn")
    check_conversation(turns)
    if render(turns) != "".join(parts[:1 + 2 * len(turns)]):  # the source text of the kept turns
        notes.append(WHITESPACE)
    return turns, notes


def parse_guanaco(text: str) -> list[Turn]:
    """Split a guanaco row into turns on `### Human:` / `### Assistant:` only.

    Returns alternating turns, human first, ending with an assistant reply (a trailing unanswered human turn
    is dropped; the loaders count that). Raises BadRow (a ValueError) with a `reason` for an unusable row.
    """
    return parse_guanaco_with_notes(text)[0]
