"""Autoregressive generation with a key/value cache: greedy and sampled decoding, stop conditions, batches.

    new_ids = generate(model, prompt_ids, max_new_tokens=64)                      # greedy
    new_ids = generate(model, prompt_ids, 64, temperature=0.7, top_p=0.9, seed=0)  # sampled, reproducible
    rows = generate_batch(model, [ids_a, ids_b], 64)                               # prompts of any lengths

How it runs. `Decoder` left-pads the prompts into one batch and one preallocated `KVCache` (n_kv_heads heads
only, in the model's dtype), masks the padding and numbers each row's positions from its own first token, so a
row computes what it would alone. `prefill()` runs the prompts once and applies the LM head to the last
position only; each `step()` then runs just the new token of every row against the cache. Sampling draws from
a `torch.Generator` seeded per call, never from the global RNG.

What is returned: the new tokens only. Generation of a row ends at an end token (`eos_id`, not returned), when
`stop(new_ids)` says so (see `StopStrings`; the stop text is not returned), or after `max_new_tokens`.

Deliberately left out: beam search, repetition penalties, speculative decoding, and paged or shared caches
(every call builds its own cache; a chat re-reads its history each turn, which costs one prefill).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch

from .model import KVCache, Llama

# stop(new_ids) -> None to go on, or how many of new_ids to keep (generation of that row then ends).
StopFn = Callable[[list[int]], "int | None"]


class Decoder:
    """The model side of generation for a batch of prompts: one prefill, then one token per row per step.

    `prefill()` -> next-token logits [B, vocab] (float32) after each prompt; `step(tokens)` appends one token
    per row and returns the logits after it. Rows are left-padded (pad id 0, masked out) and positioned from 0
    at their first real token. The model should be in eval mode; `generate_batch` takes care of that.
    """

    def __init__(self, model: Llama, prompts: Sequence[Sequence[int]], max_new_tokens: int):
        config = model.config
        if not prompts:
            raise ValueError("no prompts given: pass a list of token-id lists")
        lengths = [len(p) for p in prompts]
        if min(lengths) == 0:
            raise ValueError(f"prompt {lengths.index(0)} is empty: a prompt needs at least one token "
                             "(e.g. BOS: tokenizer.encode(text) adds it)")
        bad = [(i, t) for i, p in enumerate(prompts) for t in p if not 0 <= int(t) < config.vocab_size]
        if bad:
            raise ValueError(f"prompt {bad[0][0]} holds token id {bad[0][1]}, outside the model's vocabulary "
                             f"[0, {config.vocab_size}); was it encoded with a different tokenizer?")
        L = max(lengths)
        self.max_len = L + max_new_tokens
        if self.max_len > config.max_position_embeddings:
            raise ValueError(f"a prompt of {L} tokens plus max_new_tokens={max_new_tokens} is {self.max_len} "
                             f"positions, more than the model's context length "
                             f"({config.max_position_embeddings}); shorten the prompt or ask for fewer tokens")
        self.model = model
        weight = model.model.embed_tokens.weight
        self.device = weight.device
        B = len(prompts)
        self.ids = torch.zeros(B, L, dtype=torch.long)
        self.mask = torch.zeros(B, self.max_len, dtype=torch.bool)
        for i, p in enumerate(prompts):
            self.ids[i, L - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
            self.mask[i, L - len(p):L] = True
        self.ids, self.mask = self.ids.to(self.device), self.mask.to(self.device)
        # Equal lengths need no padding mask: the model's causal mask is then all there is.
        self.padded = min(lengths) != L
        self.positions = (self.mask[:, :L].long().cumsum(-1) - 1).clamp(min=0)
        self.next_position = torch.as_tensor(lengths, device=self.device)[:, None]
        with torch.inference_mode():
            self.cache = KVCache(config, B, self.max_len, device=self.device, dtype=weight.dtype)
        # A LoRA adapter kept in float32 on a bfloat16 model: let autocast meet the dtypes in the middle.
        dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
        self._autocast = (torch.autocast(self.device.type, dtype=weight.dtype) if len(dtypes) > 1
                          else contextlib.nullcontext())

    @torch.inference_mode()
    def prefill(self) -> torch.Tensor:
        if self.cache.length:
            raise RuntimeError("prefill() runs once, on an empty cache; build a new Decoder for new prompts")
        L = self.ids.shape[1]
        with self._autocast:
            h = self.model.hidden_states(self.ids, position_ids=self.positions, cache=self.cache,
                                         attention_mask=self.mask[:, :L] if self.padded else None)
            return self.model.logits(h[:, -1]).float()

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        n = self.cache.length
        if n == 0:
            raise RuntimeError("step() before prefill(): run the prompts first")
        if n >= self.max_len:
            raise RuntimeError(f"the cache holds {self.max_len} positions and is full; the Decoder was built for "
                               f"{self.max_len - self.ids.shape[1]} new tokens")
        self.mask[:, n] = True
        with self._autocast:
            h = self.model.hidden_states(tokens.view(-1, 1).to(self.device), position_ids=self.next_position,
                                         attention_mask=self.mask[:, :n + 1] if self.padded else None,
                                         cache=self.cache)
            self.next_position += 1
            return self.model.logits(h[:, -1]).float()


def sample(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
           top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids [B] from logits [B, vocab]. Temperature 0 is greedy (argmax; top_k/top_p are moot)."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        # Nucleus: the smallest set of most likely tokens whose probability reaches top_p (never empty).
        sorted_logits, order = logits.sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)
        mass_before = probs.cumsum(-1) - probs
        sorted_logits = sorted_logits.masked_fill(mass_before >= top_p, float("-inf"))
        logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


def _check_sampling(max_new_tokens, temperature, top_k, top_p):
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be an integer >= 1 or None, got {top_k!r}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p!r}")


def _end_ids(model: Llama, eos_id) -> set[int]:
    if eos_id is None:
        eos_id = model.config.eos_token_id
    if eos_id is None:
        return set()
    return {int(eos_id)} if isinstance(eos_id, int) else {int(i) for i in eos_id}


def generate_batch(model: Llama, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
                   temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                   stop: StopFn | None = None, seed: int | None = None,
                   eos_id: int | Sequence[int] | None = None,
                   on_token: Callable[[int, int], None] | None = None) -> list[list[int]]:
    """The new tokens of each prompt (prompts may differ in length); greedy rows equal `generate` of each alone.

    - `temperature` 0 is greedy; above 0, sampling with optional `top_k` / `top_p` (nucleus) filtering, from a
      generator seeded with `seed` (None: a fresh random seed). One generator serves the whole batch, so a
      sampled row depends on the batch it is in.
    - `eos_id`: token id(s) that end a row, not returned; None means `model.config.eos_token_id`, and `()`
      never ends on a token.
    - `stop(new_ids)`: called after each token; None to go on, or how many of `new_ids` to keep (see
      `StopStrings`).
    - `on_token(row, token_id)`: called for every token as it is generated (streaming). It also sees tokens that
      a later `stop` removes, since a stop text is only recognised once complete.

    Runs in inference mode and in eval mode (the model's train/eval state is restored afterwards).
    """
    _check_sampling(max_new_tokens, temperature, top_k, top_p)
    ends = _end_ids(model, eos_id)
    out: list[list[int]] = [[] for _ in prompts]
    decoder = Decoder(model, prompts, max_new_tokens)
    if max_new_tokens == 0:
        return out
    generator = None
    if temperature > 0:
        generator = torch.Generator(device=decoder.device)
        if seed is None:
            generator.seed()  # fresh, from the OS; the global RNG stays untouched
        else:
            generator.manual_seed(seed)
    active = list(range(len(prompts)))
    was_training = model.training
    model.eval()
    try:
        logits = decoder.prefill()
        for step in range(max_new_tokens):
            tokens = sample(logits, temperature, top_k, top_p, generator)
            chosen = tokens.tolist()
            still = []
            for row in active:
                token = chosen[row]
                if token in ends:
                    continue
                out[row].append(token)
                if on_token is not None:
                    on_token(row, token)
                keep = stop(out[row]) if stop is not None else None
                if keep is not None:
                    del out[row][keep:]
                    continue
                still.append(row)
            active = still
            if not active or step == max_new_tokens - 1:
                break
            # Finished rows keep decoding (their tokens are ignored): cheaper than reshaping the cache.
            logits = decoder.step(tokens)
    finally:
        model.train(was_training)
    return out


def generate(model: Llama, prompt_ids: Sequence[int], max_new_tokens: int, *, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, stop: StopFn | None = None,
             seed: int | None = None, eos_id: int | Sequence[int] | None = None,
             on_token: Callable[[int], None] | None = None) -> list[int]:
    """The new tokens after `prompt_ids` (a list of ids, BOS included if wanted); see `generate_batch`.

    `on_token(token_id)` streams each token as it is generated.
    """
    callback = None if on_token is None else (lambda _row, token: on_token(token))
    return generate_batch(model, [prompt_ids], max_new_tokens, temperature=temperature, top_k=top_k,
                          top_p=top_p, stop=stop, seed=seed, eos_id=eos_id, on_token=callback)[0]


class StopStrings:
    """A `stop` for `generate`: ends a row once its decoded new text contains one of `strings`.

    SentencePiece splits a marker differently depending on what precedes it (`### Human:` is `▁###` at the start
    of a line but `##`,`#` after "!"), so the check is on text, not ids. Returns how many tokens to keep: those
    before the token in which the stop string begins. When it begins inside a token (a piece like ":#"), that
    token's text before the marker is lost too; `data.dialogue.answer` cuts the text exactly instead.
    Only the last few tokens are decoded per call, enough to hold the longest stop string.
    """

    def __init__(self, tokenizer, strings: Sequence[str]):
        if isinstance(strings, str):
            strings = [strings]
        self.strings = tuple(s for s in strings if s)
        self.tokenizer = tokenizer
        # Every token decodes to at least one byte, so this many tokens cover any stop string (+2 for the
        # dummy-prefix space SentencePiece drops at the start of a decode).
        self.window = max((len(s.encode("utf-8")) for s in self.strings), default=0) + 2

    def find(self, text: str) -> int:
        """Index of the first stop string in `text`, or -1."""
        hits = [i for i in (text.find(s) for s in self.strings) if i >= 0]
        return min(hits) if hits else -1

    def __call__(self, new_ids: list[int]) -> int | None:
        if not self.strings or self.find(self.tokenizer.decode(new_ids[-self.window:])) < 0:
            return None
        start = self.find(self.tokenizer.decode(new_ids))
        if start < 0:  # only the window's decode showed it (a dropped dummy-prefix space): not a real match
            return None
        keep = len(new_ids)
        while keep > 0 and len(self.tokenizer.decode(new_ids[:keep])) > start:
            keep -= 1
        return keep
