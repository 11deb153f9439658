"""The guanaco conversation as the model continues it: turns -> prompt ids, and the reply, streamed and cut at
the next marker.

    turns, ids = fit_history(tokenizer, ["hi", "Hello!", "how are you"], max_new_tokens, context_length)
    reply = answer(model, tokenizer, ["hi", "Hello!", "how are you"], on_text=print)

A conversation to answer is a list of strings, human, assistant, ..., human (one string is one human turn). Its
prompt is exactly what training put before a reply (`data.encode_prompt`: BOS first, EOS after every earlier
reply), so the model continues as it learned to. The reply ends at EOS, at the next `### Human:` (not
returned), or after `max_new_tokens`; the oldest exchanges are dropped when the conversation and the reply would
not fit the model's context length.

Deliberately left out: system prompts, other chat templates, keeping the KV cache between turns (each turn
re-reads the kept history: one prefill, cheap next to the answer), and the terminal (`chat.py`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from tinyllama.generation import StopStrings, generate

from .encoding import encode_prompt
from .guanaco import ASSISTANT, HUMAN, MARKERS, Turn, check_conversation

# A reply ends where the model starts the next human turn. It never holds "### Assistant:" either (training
# conversations cannot: data.guanaco refuses markers inside turns), and one that did could not be kept in the
# history, so that ends a reply too.
STOP_STRINGS = (MARKERS[HUMAN], MARKERS[ASSISTANT])


def conversation(turns: str | Sequence[str]) -> list[Turn]:
    """`turns` (alternating human, assistant, ..., human; one string is one human turn), each stripped of
    surrounding whitespace, as a guanaco conversation: `data.encode_prompt(conversation(turns), tokenizer)` are
    the ids the model continues. Raises BadRow (a ValueError) for an even number of turns, an empty turn or a
    marker inside one."""
    texts = [turns] if isinstance(turns, str) else list(turns)
    conv = [Turn(HUMAN if i % 2 == 0 else ASSISTANT, t.strip()) for i, t in enumerate(texts)]
    check_conversation(conv, last=HUMAN)
    return conv


def fit_history(tokenizer, turns: str | Sequence[str], max_new_tokens: int,
                context_len: int) -> tuple[list[str], list[int]]:
    """Drop the oldest exchanges until the prompt plus `max_new_tokens` fits `context_len`; (turns, ids)."""
    turns = [t.text for t in conversation(turns)]
    while True:
        ids = encode_prompt(conversation(turns), tokenizer)
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
           temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
           seed: int | None = None, on_text: Callable[[str], None] | None = None) -> str:
    """The model's reply to a prompt (or to the last human turn of `[human, assistant, ..., human]`).

    Greedy by default. Stops at EOS, at `### Human:` (cut off, not returned) or after `max_new_tokens`; the
    oldest exchanges are dropped if the conversation would not fit the context. `on_text` receives the reply
    piece by piece as it is generated. Returns the reply with surrounding whitespace stripped.
    """
    _, ids = fit_history(tokenizer, history_or_prompt, max_new_tokens, model.config.context_length)
    stream = TextStream(tokenizer, STOP_STRINGS, on_text)
    generate(model, ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
             stop=stream.stop, eos_id=tokenizer.eos_id, on_token=stream.push)
    return stream.finish().strip()
