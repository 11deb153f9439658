"""Conversations -> token ids and labels for causal-LM fine-tuning.

One sequence per conversation: BOS, then the guanaco text of every turn, with EOS after each assistant reply:

    <s>### Human: q1### Assistant: a1</s>### Human: q2### Assistant: a2</s>

Labels are aligned with input_ids (the loss shifts them): the tokens of each reply and its EOS are labelled,
everything else (BOS, markers, human turns) is -100.

How the label boundaries are found. SentencePiece tokenizes a marker differently depending on what precedes it
(a fresh `### Human:` starts with `▁###`, one glued to a reply starts with `##`,`#`), so searching token ids for a
template is unreliable. Instead the text is cut into segments at the label boundaries and each segment is
tokenized on its own:

    "### Human: q1### Assistant:" | " a1" | EOS | "### Human: q2### Assistant:" | " a2" | EOS

The first segment is tokenized as the start of a text (with SentencePiece's dummy-prefix space, as
`tokenizer.encode(text)` does). Every later segment is tokenized *as it appears inside a longer text*: we encode
"\n" + segment and drop the tokens of "\n". That works because "\n" is a byte-fallback piece that merges with
nothing, so what follows it is tokenized exactly as after any other character, without a dummy prefix.
A byte-level BPE tokenizer.json (Llama 3, SmolLM2) has no dummy prefix, and its pre-tokenizer regex makes "\n"
a word of its own before any segment (segments never start with whitespace), so the same code holds for it.

Consequences, checked by the tests:
- decode(input_ids) is exactly the guanaco text (decode drops BOS/EOS, and no segment gains or loses a space);
- the labelled tokens of each reply decode to exactly that reply (its leading "▁" is the space after "Assistant:",
  which SentencePiece's decode drops at the start of a text and byte-level BPE's keeps);
- the ids, EOS aside, equal `tokenizer.encode(guanaco_text)` of the whole row, except where the tokenizer would
  merge the end of a reply with the next marker (a reply ending in "C#" gives "####"; with Llama 3's regex any
  punctuation does: "." and "###" make ".###"); there a token boundary has to exist anyway, since EOS goes
  there. The boundary after "### Assistant:" can never merge: no Llama piece has "▁" after another character,
  and the BPE regexes start a new word at a space.
- the prompt tokens equal what `encode_prompt` gives at inference, so generation sees what training saw.

A tokenizer whose `bos_id` is None (SmolLM2's puts nothing before a text) gives sequences that start with the
first marker. Deliberately left out: chat templates other than guanaco's, a system prompt, and a pad token
(batching masks padding instead; see data.batching).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch

from tinyllama.loss import IGNORE_INDEX  # the loss defines what "no label" is

from .guanaco import ASSISTANT, HUMAN, MARKERS, BadRow, Turn, check_conversation

_CONTEXT = "\n"  # see the module docstring: a separator that never merges with what follows


@dataclass
class Example:
    """One encoded conversation: 1-D int64 tensors of equal length."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    truncated: bool = False

    def __len__(self) -> int:
        return len(self.input_ids)


class NoLabelledTokens(ValueError):
    """Raised by `encode` when truncation leaves no assistant token to learn from."""


@dataclass
class EncodeReport:
    max_len: int | None = None
    conversations: int = 0
    examples: int = 0
    truncated: int = 0  # kept, cut to max_len
    skipped: Counter = field(default_factory=Counter)  # reason -> conversations not turned into an example
    tokens: int = 0
    labelled: int = 0

    def __str__(self) -> str:
        s = (f"{self.conversations} conversations encoded (max_len={self.max_len}): {self.examples} examples, "
             f"{self.truncated} truncated, {sum(self.skipped.values())} skipped")
        if self.skipped:
            s += " (" + ", ".join(f"{k}: {v}" for k, v in self.skipped.items()) + ")"
        return s + f"; {self.tokens} tokens, {self.labelled} labelled"


def _context_prefix(tokenizer) -> list[int]:
    return tokenizer.encode(_CONTEXT, bos=False)


def _encode_inside(tokenizer, text: str, prefix: list[int]) -> list[int]:
    """Tokens of `text` as it is tokenized in the middle of a longer text (no dummy-prefix space)."""
    ids = tokenizer.encode(_CONTEXT + text, bos=False)
    if ids[:len(prefix)] != prefix:
        raise ValueError(f"tokenizer merged {_CONTEXT!r} with the text that follows it ({text[:20]!r}); the "
                         "segment-wise tokenization in data.encoding assumes it never does")
    return ids[len(prefix):]


def segments(conversation: list[Turn]) -> list[tuple[str, bool]]:
    """(text, labelled) pieces whose concatenation is the guanaco text; an EOS follows each labelled one."""
    out = []
    for turn in conversation:
        if turn.role == HUMAN:
            out.append((f"{MARKERS[HUMAN]} {turn.text}{MARKERS[ASSISTANT]}", False))
        else:
            out.append((f" {turn.text}", True))
    return out


def _encode_full(conversation: list[Turn], tokenizer) -> tuple[list[int], list[int]]:
    prefix = _context_prefix(tokenizer)
    ids = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
    labels = [IGNORE_INDEX] * len(ids)
    for i, (text, labelled) in enumerate(segments(conversation)):
        seg = tokenizer.encode(text, bos=False) if i == 0 else _encode_inside(tokenizer, text, prefix)
        if labelled:
            seg = seg + [tokenizer.eos_id]
        ids += seg
        labels += seg if labelled else [IGNORE_INDEX] * len(seg)
    return ids, labels


def _truncate(ids: list[int], labels: list[int], max_len: int | None) -> tuple[list[int], list[int]]:
    if max_len is None or len(ids) <= max_len:
        return ids, labels
    if max_len < 2:
        raise ValueError(f"max_len must be at least 2 (BOS and one token), got {max_len}")
    first = next(i for i, x in enumerate(labels) if x != IGNORE_INDEX)
    if first >= max_len:
        raise NoLabelledTokens(f"no assistant token within max_len={max_len}: the first reply starts at "
                               f"token {first}")
    ids, labels = ids[:max_len], labels[:max_len]
    # Trailing unlabelled tokens (a cut-off human turn) carry no loss and no earlier token attends to them.
    while labels[-1] == IGNORE_INDEX:
        ids.pop()
        labels.pop()
    return ids, labels


def encode(conversation: list[Turn], tokenizer, max_len: int | None) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one conversation, truncated to `max_len` tokens (the start is kept).

    After truncation, trailing unlabelled tokens (the cut-off start of a human turn) are dropped. Raises
    NoLabelledTokens when no assistant token is left, and BadRow (a ValueError) for a conversation that is not
    human/assistant alternating or has an empty turn.
    """
    check_conversation(conversation)
    ids, labels = _encode_full(conversation, tokenizer)
    return _truncate(ids, labels, max_len)


def encode_prompt(conversation: list[Turn], tokenizer) -> list[int]:
    """Ids for generating the next assistant reply: `conversation` ends with the human turn to answer.

    Exactly the tokens training put before that reply, so the model continues as it learned to.
    """
    check_conversation(conversation, last=HUMAN)
    # Encode with a placeholder reply and cut it off: the prompt tokens do not depend on the reply.
    ids, labels = _encode_full(list(conversation) + [Turn(ASSISTANT, "x")], tokenizer)
    last_prompt_end = max(i for i, x in enumerate(labels) if x == IGNORE_INDEX) + 1
    return ids[:last_prompt_end]


def encode_all(conversations, tokenizer, max_len: int | None) -> tuple[list[Example], EncodeReport]:
    """Encode every conversation; returns the examples and a report counting truncated and skipped ones."""
    report = EncodeReport(max_len=max_len)
    examples = []
    for conv in conversations:
        report.conversations += 1
        try:
            check_conversation(conv)
        except BadRow as e:  # loaders never produce these; a hand-built list might
            report.skipped[f"invalid conversation ({e.reason})"] += 1
            continue
        ids, labels = _encode_full(conv, tokenizer)
        truncated = max_len is not None and len(ids) > max_len
        try:
            ids, labels = _truncate(ids, labels, max_len)
        except NoLabelledTokens:
            report.skipped["no assistant token within max_len"] += 1
            continue
        report.truncated += truncated
        report.examples += 1
        report.tokens += len(ids)
        report.labelled += sum(x != IGNORE_INDEX for x in labels)
        examples.append(Example(torch.tensor(ids, dtype=torch.long), torch.tensor(labels, dtype=torch.long),
                                truncated))
    return examples, report
