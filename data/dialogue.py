"""A conversation as the model continues it: turns -> prompt ids through a chat template, and the reply,
streamed and cut where the template ends a turn.

    turns, ids = fit_history(tokenizer, ["hi", "Hello!", "how are you"], max_new_tokens, context_length)
    reply = answer(model, tokenizer, ["hi", "Hello!", "how are you"], template=load_template("llama3"),
                   system="Answer briefly.", on_text=print)

A conversation to answer is a list of strings, user, assistant, ..., user (one string is one user turn), and an
optional system prompt. Its prompt is the template's text with its generation prompt (`data.encode_prompt`),
cut as training cut it, so the model continues as it learned to; the template defaults to guanaco. The reply
ends at EOS or the template's end-of-turn token (`data.end_of_turn_ids`), at a stop string the template names
(guanaco's `### Human:`, not returned), or after `max_new_tokens`; the oldest exchanges are dropped when the
conversation and the reply would not fit the model's context length (the system prompt is kept).

Deliberately left out: keeping the KV cache between turns (each turn re-reads the kept history: one prefill,
cheap next to the answer), and the terminal (`chat.py`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from tinyllama.generation import StopStrings, generate
from tinyllama.templates import GUANACO_MARKERS, Template, load_template

from .encoding import encode_prompt, end_of_turn_ids
from .guanaco import ASSISTANT, HUMAN, SYSTEM, Turn, check_conversation

# Guanaco's: a reply ends where the model starts the next human turn. It never holds "### Assistant:" either
# (training conversations cannot: the guanaco template refuses markers inside turns), and one that did could not
# be kept in the history, so that ends a reply too.
STOP_STRINGS = GUANACO_MARKERS


def conversation(turns: str | Sequence[str], system: str | None = None) -> list[Turn]:
    """`turns` (alternating user, assistant, ..., user; one string is one user turn), each stripped of
    surrounding whitespace, after an optional system prompt: `data.encode_prompt(conversation(turns), tokenizer,
    template)` are the ids the model continues. Raises BadRow (a ValueError) for an even number of turns or an
    empty turn; the template refuses what it cannot render (guanaco: a marker inside a turn, a system prompt)."""
    texts = [turns] if isinstance(turns, str) else list(turns)
    conv = [Turn(SYSTEM, system.strip())] if system else []
    conv += [Turn(HUMAN if i % 2 == 0 else ASSISTANT, t.strip()) for i, t in enumerate(texts)]
    check_conversation(conv, last=HUMAN, markers=False)
    return conv


def fit_history(tokenizer, turns: str | Sequence[str], max_new_tokens: int, context_len: int,
                template: Template | None = None, system: str | None = None) -> tuple[list[str], list[int]]:
    """Drop the oldest exchanges until the prompt plus `max_new_tokens` fits `context_len`; (turns, ids)."""
    turns = [t.text for t in conversation(turns) if t.role != SYSTEM]
    while True:
        ids = encode_prompt(conversation(turns, system), tokenizer, template)
        if len(ids) + max_new_tokens <= context_len:
            return turns, ids
        if len(turns) == 1:
            raise ValueError(f"the message is {len(ids)} tokens; with max_new_tokens={max_new_tokens} that is "
                             f"more than the context length ({context_len}): shorten it or ask for fewer tokens")
        turns = turns[2:]


class TextStream:
    """Turns tokens into text as they arrive, showing only text that can no longer change.

    Each `push` decodes the whole answer so far (so SentencePiece spaces and multi-byte characters come out
    right) and passes the new suffix to `write`, holding back an incomplete UTF-8 character and any tail that
    could be the start of a stop string. `finish()` returns the final text, cut at the first stop string.
    """

    def __init__(self, tokenizer, stop_strings: Sequence[str] = STOP_STRINGS,
                 write: Callable[[str], None] | None = None):
        self.tokenizer, self.write = tokenizer, write
        self.stop = StopStrings(tokenizer, stop_strings)
        self.ids: list[int] = []
        self.shown = 0

    def _cut(self, text: str) -> str:
        at = self.stop.find(text)
        return text if at < 0 else text[:at]

    def push(self, token_id: int) -> None:
        self.ids.append(token_id)
        if self.write is None:
            return
        text = self._cut(self.tokenizer.decode(self.ids)).rstrip("\ufffd")
        for n in range(min(len(text), max((len(s) for s in self.stop.strings), default=0)), 0, -1):
            if any(s.startswith(text[-n:]) for s in self.stop.strings):
                text = text[:-n]
                break
        if len(text) > self.shown:
            self.write(text[self.shown:])
            self.shown = len(text)

    def finish(self) -> str:
        text = self._cut(self.tokenizer.decode(self.ids))
        if self.write is not None and len(text) > self.shown:
            self.write(text[self.shown:])
            self.shown = len(text)
        return text


def answer(model, tokenizer, history_or_prompt: str | Sequence[str], max_new_tokens: int = 256, *,
           template: Template | None = None, system: str | None = None, temperature: float = 0.0,
           top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
           on_text: Callable[[str], None] | None = None) -> str:
    """The model's reply to a prompt (or to the last user turn of `[user, assistant, ..., user]`), through
    `template` (default guanaco) after an optional `system` prompt.

    Greedy by default. Stops at EOS or the template's end of turn, at a stop string of the template (guanaco's
    `### Human:`, cut off, not returned) or after `max_new_tokens`; the oldest exchanges are dropped if the
    conversation would not fit the context. `on_text` receives the reply piece by piece as it is generated.
    Returns the reply with surrounding whitespace stripped.
    """
    template = (template or load_template("guanaco")).bind(tokenizer)
    _, ids = fit_history(tokenizer, history_or_prompt, max_new_tokens, model.config.context_length, template,
                         system)
    stream = TextStream(tokenizer, template.stop_strings, on_text)
    generate(model, ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
             stop=stream.stop, eos_id=end_of_turn_ids(tokenizer, template), on_token=stream.push)
    return stream.finish().strip()
