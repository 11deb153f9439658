"""Conversations -> token ids and labels for causal-LM fine-tuning, through a chat template.

    ids, labels = encode_messages([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello!"}],
                                  tokenizer, load_template("llama3"))

One sequence per conversation: the template's text (`tinyllama.templates`), encoded as transformers encodes it,
so training sees exactly what transformers, vLLM and llama.cpp will feed the model. With the default `guanaco`
template and Llama's tokenizer that is BOS, then

    ### Human: q1### Assistant: a1</s>### Human: q2### Assistant: a2</s>

Labels are aligned with input_ids (the loss shifts them). Labelled: each assistant turn's content (with the spaces
the template writes right before it, which tokenizers glue to its first word) and the text after it up to and
including the first special token there, the template's end of turn (`</s>`, `<|eot_id|>`, `<|im_end|>`).
Nothing else: no BOS, header, system or user text. `train_on="last"` labels the final assistant turn only.

How the boundaries are found (`Template.layout`). Rendering prefixes of a conversation is not enough (Mistral
v0.3's template moves the system message into the last user turn, so a prefix renders differently from the
whole). Instead the conversation is rendered as it is, and with each message's content replaced by a sentinel
(once per sequence of roles). The sentinels' places say where each content sits; putting the contents back must
give the real text exactly, each content as it is or trimmed of whitespace at its edges where the template trims
it (Llama 2 and 3.x, Mistral v0.3): the labels then cover the trimmed reply, what the template renders. A template
that changes a message's text otherwise is refused, counted, as is one that writes a reply twice or not at all.
A system message the template leaves out (Mistral v0.3 writes it into the last user turn, and a conversation to
train on ends with an assistant turn) is counted in the report (`SYSTEM_NOT_RENDERED`).

How the ids are made. The rendered text is cut at the template's special tokens (each one id; text inside a
message is never read as a special token, so data cannot smuggle in an end token) and at the label boundaries.
A special token the tokenizer marks `lstrip` / `rstrip` swallows the whitespace beside it, as in transformers
(Phi-3's `<|end|>` and the newline after it are one id); that whitespace is in no token and no label. Each piece
of text is encoded on its own: the piece at the very start with `tokenizer.encode` (SentencePiece's
dummy-prefix space), every later one with `tokenizer.encode_inside` (as it is tokenized after other text or a
special token). Consequences, checked by the tests against transformers:
- the ids equal `tokenizer(rendered, add_special_tokens=False)`'s (`encode_rendered` here), with special tokens
  as single ids and BOS only where the template writes one, except where the tokenizer would merge across a
  label boundary. A reply ends at a special token, so that can happen only at its start, where a template glues
  it to the header without a space or newline, or at its end with a template whose end of turn is text to this
  tokenizer (which training refuses). A token boundary has to exist there, so the ids differ; `python -m
  data.stats` counts such rows;
- the labelled tokens of each reply decode to that reply and its end of turn;
- `encode_prompt` gives the ids training put before a reply (where the template renders a conversation and its
  prefixes alike), so generation sees what training saw.
"""

from __future__ import annotations

import array
from collections import Counter
from dataclasses import dataclass, field

import torch

from tinyllama.loss import IGNORE_INDEX  # the loss defines what "no label" is
from tinyllama.templates import LayoutError, Template, TemplateRefused, load_template, special_pattern

from .guanaco import ASSISTANT, HUMAN, BadRow, Turn, check_conversation

ASSISTANT_ONLY, LAST = "assistant", "last"  # --train-on
TRAIN_ON = (ASSISTANT_ONLY, LAST)
DEFAULT_MAX_LEN = 1024  # tokens per row: the default of train.py's --max-len and of data.stats'
ROLES = {"system": "system", HUMAN: "user", "user": "user", ASSISTANT: "assistant"}
# Counted notes, not skips: the conversation is trained on.
SPECIAL_TEXT = "special-token text in a message (encoded as plain text)"
SYSTEM_NOT_RENDERED = "system message not rendered by the template"


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
    notes: Counter = field(default_factory=Counter)  # kept, but worth knowing (SPECIAL_TEXT, SYSTEM_NOT_RENDERED)
    tokens: int = 0
    labelled: int = 0

    def __str__(self) -> str:
        s = (f"{self.conversations} conversations encoded (max_len={self.max_len}): {self.examples} examples, "
             f"{self.truncated} truncated, {sum(self.skipped.values())} skipped")
        if self.skipped:
            s += " (" + ", ".join(f"{k}: {v}" for k, v in self.skipped.items()) + ")"
        if self.notes:
            s += "; " + ", ".join(f"{k}: {v}" for k, v in self.notes.items())
        return s + f"; {self.tokens} tokens, {self.labelled} labelled"


def to_messages(conversation) -> list[dict]:
    """A conversation as chat templates take it, [{"role": "system"|"user"|"assistant", "content": str}]: from
    Turns (`data.guanaco`, human -> user) or from message dicts (roles human/user, gpt/assistant, system)."""
    out = []
    for i, m in enumerate(conversation):
        role, content = (m.role, m.text) if isinstance(m, Turn) else (m.get("role"), m.get("content"))
        if role == "gpt":
            role = ASSISTANT
        if role not in ROLES:
            raise BadRow("unknown role", f"message {i + 1} has role {role!r}; expected system, user or assistant")
        if not isinstance(content, str):
            raise BadRow("content is not text", f"message {i + 1} ({role}) has {type(content).__name__} content")
        out.append({"role": ROLES[role], "content": content})
    return out


def _layout(messages: list[dict], template: Template, labelled: set[int], add_generation_prompt: bool):
    """`template.layout`, its refusals as BadRow; every labelled reply must be in the text exactly once."""
    try:
        text, spans = template.layout(messages, add_generation_prompt)
    except TemplateRefused as e:
        reason = e.reason if len(e.reason) <= 80 else e.reason[:77] + "..."
        raise BadRow(f"refused by the chat template ({reason})") from None
    except LayoutError as e:
        raise BadRow(e.reason, e.detail) from None
    seen = Counter(i for _, _, i in spans)
    wrong = [i for i in sorted(labelled) if seen[i] != 1]
    if wrong:
        raise BadRow("template renders a reply twice or not at all",
                     f"assistant message {wrong[0] + 1} appears {seen[wrong[0]]} times")
    return text, spans


def _label_ranges(text: str, spans, labelled: set[int], template: Template, pattern) -> list[tuple[int, int]]:
    """The labelled character ranges of `text`: each labelled reply, with the spaces the template writes right
    before it (tokenizers glue them to its first word), through the template's end-of-turn token."""
    ranges = []
    for k, (start, end, i) in enumerate(spans):
        if i not in labelled:
            continue
        if k > 0 and spans[k - 1][2] is None:
            while start > spans[k - 1][0] and text[start - 1] == " ":
                start -= 1
        eot = template.end_of_turn(text, spans, k, pattern)
        ranges.append((start, end if eot is None else eot[1]))
    return ranges


# Unicode White_Space: the `\s` that tokenizers strips beside an added token (Python's str.isspace also takes
# \x1c-\x1f, which tokenizers does not).
_WHITESPACE = frozenset("\t\n\v\f\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009"
                        "\u200a\u2028\u2029\u202f\u205f\u3000")


def _with_stripped(text: str, special: list[tuple[int, int]], strip: dict) -> dict[int, tuple[int, int, int]]:
    """{piece start: (piece end, token start, token end)} of each special token, its piece widened over the
    whitespace it swallows, as tokenizers matches added tokens: `lstrip` takes the run of whitespace before the
    token that the previous token did not take, `rstrip` the run after it (never into the next token). The
    swallowed whitespace is in no token."""
    out, taken = {}, 0
    for k, (a, b) in enumerate(special):
        left, right = strip.get(text[a:b], (False, False))
        start, end = a, b
        limit = special[k + 1][0] if k + 1 < len(special) else len(text)
        while left and start > taken and text[start - 1] in _WHITESPACE:
            start -= 1
        while right and end < limit and text[end] in _WHITESPACE:
            end += 1
        out[start] = (end, a, b)
        taken = end
    return out


def _encode_layout(text: str, spans, labelled: set[int], template: Template, tokenizer):
    """(ids, labels): `text` cut at the special tokens the template wrote (never those inside a message), with
    the whitespace they swallow, and at the label boundaries outside them, each piece encoded on its own (see
    the module docstring). A special token is labelled where its own characters are."""
    pattern = special_pattern(tokenizer)
    special = [] if pattern is None else [m.span() for s, e, i in spans if i is None
                                          for m in pattern.finditer(text, s, e)]
    ranges = _label_ranges(text, spans, labelled, template, pattern)
    special_at = _with_stripped(text, special, tokenizer.special_strip)
    # A special token's piece is one id, never cut: a label boundary in the whitespace it swallows (a reply that
    # starts with a newline its header's rstrip takes, an end of turn whose rstrip takes the newline after it)
    # is dropped, and the piece is labelled by where its token's own characters are.
    inner = {x for a, (b, _, _) in special_at.items() for x in range(a + 1, b)}
    bounds = sorted({0, len(text), *(x for r in ranges for x in r if x not in inner),
                     *(x for a, (b, _, _) in special_at.items() for x in (a, b))})
    cuts = list(zip(bounds, bounds[1:], strict=False))
    inside = [text[a:b] for a, b in cuts if a > 0 and a not in special_at]
    encoded = iter(tokenizer.encode_inside_all(inside) if inside else [])
    ids, labels = [], []
    r = 0  # the first labelled range that does not end before the current piece's token
    for a, b in cuts:
        if a in special_at:
            _, at, end = special_at[a]
            piece = [tokenizer.special_tokens[text[at:end]]]
        else:
            at, piece = a, tokenizer.encode(text[a:b], bos=False) if a == 0 else next(encoded)
        while r < len(ranges) and ranges[r][1] <= at:
            r += 1
        ids += piece
        labels += piece if r < len(ranges) and ranges[r][0] <= at else [IGNORE_INDEX] * len(piece)
    return ids, labels


def _labelled_messages(messages: list[dict], train_on: str) -> set[int]:
    if train_on not in TRAIN_ON:
        raise ValueError(f"train_on must be one of {', '.join(TRAIN_ON)}, got {train_on!r}")
    replies = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    return set(replies[-1:] if train_on == LAST else replies)


def _check_trainable(messages: list[dict]) -> None:
    if not messages or messages[-1]["role"] != "assistant":
        raise BadRow("no assistant turn", "the conversation does not end with an assistant reply")
    empty = next((i for i, m in enumerate(messages) if m["role"] == "assistant" and not m["content"].strip()), None)
    if empty is not None:
        raise BadRow("empty turn", f"message {empty + 1} (assistant) has no text")


def _long_tensor(xs: list[int]) -> torch.Tensor:
    """torch.tensor(xs, dtype=torch.long), through an int64 array: a few times faster for a list of ints."""
    return torch.frombuffer(array.array("q", xs), dtype=torch.long) if xs else torch.zeros(0, dtype=torch.long)


def _bound(template: Template | None, tokenizer) -> Template:
    return (template or load_template("guanaco")).bind(tokenizer)


def encode_full(conversation, tokenizer, template: Template, train_on: str = ASSISTANT_ONLY):
    """(input_ids, labels) of a whole conversation (Turns or message dicts ending with an assistant reply),
    through `template` bound to `tokenizer`. Raises BadRow (a ValueError) with a countable `reason` for a
    conversation that cannot be trained on."""
    ids, labels, _ = _encode_conversation(conversation, tokenizer, template, train_on)
    return ids, labels


def _encode_conversation(conversation, tokenizer, template: Template, train_on: str):
    """`encode_full`'s (input_ids, labels), and whether the template left out the conversation's system
    message."""
    if conversation and isinstance(conversation[0], Turn):
        check_conversation(conversation, markers=False)  # the templates check markers and roles their own way
    messages = to_messages(conversation)
    _check_trainable(messages)
    labelled = _labelled_messages(messages, train_on)
    text, spans = _layout(messages, template, labelled, add_generation_prompt=False)
    ids, labels = _encode_layout(text, spans, labelled, template, tokenizer)
    return ids, labels, messages[0]["role"] == "system" and all(i != 0 for _, _, i in spans)


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
    # Trailing unlabelled tokens (a cut-off user turn) carry no loss and no earlier token attends to them.
    while labels[-1] == IGNORE_INDEX:
        ids.pop()
        labels.pop()
    return ids, labels


def encode_messages(messages, tokenizer, template: Template | None = None, max_len: int | None = None, *,
                    train_on: str = ASSISTANT_ONLY) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one conversation through `template` (default guanaco), truncated to `max_len`
    tokens (the start is kept; trailing unlabelled tokens, a cut-off user turn, are dropped).

    Raises NoLabelledTokens when no assistant token is left, and BadRow (a ValueError) with a countable `reason`
    for a conversation that cannot be trained on (see `encode_full`).
    """
    ids, labels = encode_full(messages, tokenizer, _bound(template, tokenizer), train_on)
    return _truncate(ids, labels, max_len)


def encode(conversation: list[Turn], tokenizer, max_len: int | None,
           template: Template | None = None) -> tuple[list[int], list[int]]:
    """`encode_messages` of Turns (`data.guanaco`), which must alternate human/assistant after an optional
    system turn."""
    return encode_messages(conversation, tokenizer, template, max_len)


def encode_prompt(conversation, tokenizer, template: Template | None = None) -> list[int]:
    """Ids for generating the next assistant reply: `conversation` (Turns or message dicts) ends with the user
    turn to answer. The template's text with its generation prompt, cut as training cuts it (at every earlier
    reply), so the model continues as it learned to."""
    if conversation and isinstance(conversation[0], Turn):
        check_conversation(conversation, last=HUMAN, markers=False)
    messages = to_messages(conversation)
    if not messages or messages[-1]["role"] != "user":
        raise BadRow("no human turn to answer", "a conversation to answer ends with a user turn")
    template = _bound(template, tokenizer)
    earlier = _labelled_messages(messages, ASSISTANT_ONLY)
    text, spans = _layout(messages, template, earlier, add_generation_prompt=True)
    return _encode_layout(text, spans, earlier, template, tokenizer)[0]


def encode_rendered(text: str, tokenizer) -> list[int]:
    """The ids of a whole rendered text, special tokens as single ids and no label cuts: what transformers'
    `tokenizer(text, add_special_tokens=False)` gives (also for special-token text inside messages)."""
    return _encode_layout(text, [(0, len(text), None)], set(), _bound(None, tokenizer), tokenizer)[0]


def end_of_turn_ids(tokenizer, template: Template | None = None) -> list[int]:
    """The ids that end an assistant turn in `template` (default guanaco): EOS, and the template's own end token
    where it writes another. Generation stops at them."""
    return _bound(template, tokenizer).end_of_turn_ids(tokenizer)


def encode_all(conversations, tokenizer, max_len: int | None, template: Template | None = None, *,
               train_on: str = ASSISTANT_ONLY) -> tuple[list[Example], EncodeReport]:
    """Encode every conversation through `template` (default guanaco); returns the examples and a report
    counting truncated and skipped ones, those with special-token text in a message (kept as text) and those
    whose system message the template leaves out (trained on without it)."""
    template = _bound(template, tokenizer)
    pattern = special_pattern(tokenizer)
    report = EncodeReport(max_len=max_len)
    examples = []
    for conv in conversations:
        report.conversations += 1
        try:
            ids, labels, system_left_out = _encode_conversation(conv, tokenizer, template, train_on)
        except BadRow as e:  # the template's refusals; loaders never give the other reasons, a hand-built list might
            refused = e.reason.startswith("refused by") or e.reason.startswith("template ")
            report.skipped[e.reason if refused else f"invalid conversation ({e.reason})"] += 1
            continue
        if pattern is not None and any(pattern.search(t.text if isinstance(t, Turn) else t["content"]) for t in conv):
            report.notes[SPECIAL_TEXT] += 1
        if system_left_out:
            report.notes[SYSTEM_NOT_RENDERED] += 1
        truncated = max_len is not None and len(ids) > max_len
        try:
            ids, labels = _truncate(ids, labels, max_len)
        except NoLabelledTokens:
            report.skipped["no assistant token within max_len"] += 1
            continue
        report.truncated += truncated
        report.examples += 1
        report.tokens += len(ids)
        report.labelled += len(labels) - labels.count(IGNORE_INDEX)
        examples.append(Example(_long_tensor(ids), _long_tensor(labels), truncated))
    return examples, report
