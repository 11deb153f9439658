"""Preference pairs: a prompt with a chosen and a rejected reply, read from a file, encoded as trl 1.16's
`DPOTrainer` encodes them, and batched with a pair's two sequences in the same micro-batch.

    pairs = load_pairs(Path("prefs.jsonl"))                  # .jsonl, .jsonl.gz or .parquet
    examples, report = encode_pairs(pairs, tokenizer, template, max_len=1024)
    batch = collate_pairs(examples[:4])                      # all chosen rows, then all rejected rows

A file holds one format, decided by its first row (as for conversations, `data.formats`):

| format          | a row                                                                      |
| --------------- | -------------------------------------------------------------------------- |
| standard        | {"prompt": str, "chosen": str, "rejected": str}                            |
| conversational  | {"prompt": [messages], "chosen": [assistant message], "rejected": [...]}   |
| implicit prompt | {"chosen": [whole conversation], "rejected": [...]} (or both strings)      |

Implicit prompt (UltraFeedback-binarized, which also carries a string `prompt` beside conversations): the prompt
is the longest shared prefix of chosen and rejected, whole messages for conversations, characters for strings,
cut as trl's `extract_prompt` cuts it (a prefix ending just after a space gives that space back to the replies).
Rows that cannot be trained on are skipped and counted by reason (`SKIPS`).

Token ids, trl's `DPOTrainer._prepare_dataset` and `DataCollatorForPreference` (used for every objective):
- standard rows: the EOS text is appended to each reply that does not end with it; the sequence is the tokenizer's
  encoding of prompt + reply as one string, with the tokenizer's own BOS (`tokenizer(text)`); special-token text
  in it becomes the special token, as in transformers. The prompt alone is encoded the same way;
- conversational rows: the template's text of the prompt with the generation prompt, and of prompt + reply,
  each encoded with no added special token (the template writes them);
- the completion is every token after the prefix the prompt's ids share with both sequences' ids;
- a pair whose prompt alone reaches max_len is dropped (counted); a longer sequence is cut to max_len, keeping
  its start.

Deliberately left out: tools, images, per-row chat-template arguments, and packing pairs.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .batching import BatchStream
from .encoding import encode_rendered
from .sources import AUTO, NONE, _jsonl_rows, hold_out, is_parquet, parse_sources, require_pyarrow, weighted

STANDARD, CONVERSATIONAL, IMPLICIT = "standard", "conversational", "implicit prompt"
IDENTICAL, EMPTY, NO_USER_LAST, NOT_ONE_REPLY, BAD_ROW, TOO_LONG = (
    "identical chosen and rejected", "empty reply", "prompt does not end with a user turn",
    "reply is not one assistant message", "not a preference row", "prompt reaches max_len")
SKIPS = (IDENTICAL, EMPTY, NO_USER_LAST, NOT_ONE_REPLY, BAD_ROW, TOO_LONG)
COLUMNS = ("prompt", "chosen", "rejected")


class BadPair(ValueError):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass
class Pair:
    """A prompt and its two replies: all strings (standard) or all message lists (conversational)."""
    prompt: str | list[dict]
    chosen: str | list[dict]
    rejected: str | list[dict]

    @property
    def conversational(self) -> bool:
        return isinstance(self.chosen, list)


@dataclass
class PairReport:
    source: str = ""
    format: str = ""
    rows: int = 0
    pairs: int = 0
    skipped: Counter = field(default_factory=Counter)

    def __str__(self) -> str:
        skipped = sum(self.skipped.values())
        s = f"{self.source}: {self.rows} rows read, {skipped} skipped"
        if self.skipped:
            s += " (" + ", ".join(f"{k}: {v}" for k, v in sorted(self.skipped.items())) + ")"
        return s + f"; {self.pairs} pairs ({self.format})"


def _is_messages(x) -> bool:
    return isinstance(x, list) and bool(x) and isinstance(x[0], dict) and "role" in x[0]


def pair_format(row) -> str | None:
    """The format of a row (`STANDARD`, `CONVERSATIONAL`, `IMPLICIT`), or None for a row that is not a pair.
    A `prompt` of the other kind than the replies (UltraFeedback's string beside conversations) is ignored, as
    trl's `maybe_extract_prompt` ignores it."""
    if not isinstance(row, dict) or "chosen" not in row or "rejected" not in row:
        return None
    if "prompt" in row and _is_messages(row["prompt"]) == _is_messages(row["chosen"]):
        return CONVERSATIONAL if _is_messages(row["chosen"]) else STANDARD
    return IMPLICIT


def extract_prompt(chosen, rejected):
    """(prompt, chosen, rejected): trl's `extract_prompt`, the longest shared prefix of two sequences (strings or
    message lists), one step shorter where that prefix ends with a space (the space goes back to the replies)."""
    idx = 0
    for idx in range(min(len(chosen), len(rejected))):
        if chosen[idx] != rejected[idx]:
            if chosen[idx - 1] == " ":
                idx -= 1
            break
    return chosen[:idx], chosen[idx:], rejected[idx:]


def _check_messages(messages) -> list[dict]:
    if not isinstance(messages, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages):
        raise BadPair(BAD_ROW)
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def parse_pair(fmt: str, row) -> Pair:
    """One row of a file of format `fmt` as a Pair, or BadPair with a countable reason."""
    if not isinstance(row, dict) or "chosen" not in row or "rejected" not in row:
        raise BadPair(BAD_ROW)
    chosen, rejected = row["chosen"], row["rejected"]
    if fmt == IMPLICIT:
        if not (isinstance(chosen, str) and isinstance(rejected, str)):
            chosen, rejected = _check_messages(chosen), _check_messages(rejected)
        if chosen == rejected:
            raise BadPair(IDENTICAL)
        prompt, chosen, rejected = extract_prompt(chosen, rejected)
    else:
        prompt = row.get("prompt")
    if fmt == STANDARD or (fmt == IMPLICIT and isinstance(chosen, str)):
        if not all(isinstance(x, str) for x in (prompt, chosen, rejected)):
            raise BadPair(BAD_ROW)
        if not chosen.strip() or not rejected.strip():
            raise BadPair(EMPTY)
    else:
        prompt = _check_messages(prompt)
        chosen, rejected = _check_messages(chosen), _check_messages(rejected)
        for reply in (chosen, rejected):
            if len(reply) != 1 or reply[0]["role"] != "assistant":
                raise BadPair(NOT_ONE_REPLY)
            if not reply[0]["content"].strip():
                raise BadPair(EMPTY)
        if not prompt or prompt[-1]["role"] != "user":
            raise BadPair(NO_USER_LAST)
    if chosen == rejected:
        raise BadPair(IDENTICAL)
    return Pair(prompt, chosen, rejected)


def _rows(path: Path):
    """(row number, row) of a .jsonl, .jsonl.gz or .parquet file; a line that is not JSON is None."""
    if is_parquet(path):
        pq = require_pyarrow()
        file = pq.ParquetFile(path)
        columns = [c for c in COLUMNS if c in file.schema_arrow.names]
        n = 0
        for batch in file.iter_batches(batch_size=1024, columns=columns):
            for row in batch.to_pylist():
                n += 1
                yield n, row
        return
    for lineno, raw in _jsonl_rows(path):
        try:
            yield lineno, json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            yield lineno, None


def is_pair_file(path) -> bool:
    """Whether the first row of a local file is a preference pair."""
    path = Path(path)
    if not path.is_file():
        return False
    for _, row in _rows(path):
        return pair_format(row) is not None
    return False


def load_pairs(path) -> tuple[list[Pair], PairReport]:
    """The pairs of a local file and the report of what was read and skipped. A file whose first row is not a
    pair is refused, naming what a pair row holds."""
    path = Path(path)
    report = PairReport(source=str(path))
    pairs = []
    for lineno, row in _rows(path):
        report.rows += 1
        if report.rows == 1:
            report.format = pair_format(row) or ""
            if not report.format:
                keys = ", ".join(row) if isinstance(row, dict) else type(row).__name__
                raise ValueError(f"{path} row {lineno} is not a preference pair (it holds {keys}); expected "
                                 "`chosen` and `rejected` (strings or messages) and, unless the prompt is their "
                                 "shared start, a `prompt`")
        try:
            pairs.append(parse_pair(report.format, row))
        except BadPair as e:
            report.skipped[e.reason] += 1
    report.pairs = len(pairs)
    return pairs, report


# ---- token ids -------------------------------------------------------------------------------------------------

@dataclass
class PairExample:
    """A pair's ids: the prompt's, then each completion's; the sequences are prompt + completion, cut to
    `max_len` keeping the start (as `DataCollatorForPreference` cuts them)."""
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    max_len: int | None = None
    ref_chosen_logps: float | None = None  # the reference's, when computed ahead (--precompute-ref)
    ref_rejected_logps: float | None = None

    def sequences(self) -> tuple[list[int], list[int], int]:
        """(chosen sequence, rejected sequence, prompt length), each sequence cut to max_len."""
        n = self.max_len
        return (self.prompt_ids + self.chosen_ids)[:n], (self.prompt_ids + self.rejected_ids)[:n], len(self.prompt_ids)

    def __len__(self) -> int:
        chosen, rejected, _ = self.sequences()
        return max(len(chosen), len(rejected))


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def encode_text(text: str, tokenizer) -> list[int]:
    """transformers' `tokenizer(text)["input_ids"]`: the tokenizer's BOS (where it adds one), then the text with
    special-token text as special tokens."""
    return ([] if tokenizer.bos_id is None else [tokenizer.bos_id]) + encode_rendered(text, tokenizer)


def encode_pair(pair: Pair, tokenizer, template=None) -> PairExample:
    """The ids of a pair as trl's DPOTrainer makes them (see the module docstring). `template`: a Template bound
    to `tokenizer`, for conversational pairs."""
    if pair.conversational:
        if template is None:
            raise ValueError("a conversational pair needs a chat template")
        prompt = encode_rendered(template.render(pair.prompt, add_generation_prompt=True), tokenizer)
        chosen = encode_rendered(template.render(pair.prompt + pair.chosen), tokenizer)
        rejected = encode_rendered(template.render(pair.prompt + pair.rejected), tokenizer)
    else:
        eos = tokenizer.eos_token
        prompt = encode_text(pair.prompt, tokenizer)
        chosen = encode_text(pair.prompt + (pair.chosen if pair.chosen.endswith(eos) else pair.chosen + eos),
                             tokenizer)
        rejected = encode_text(pair.prompt + (pair.rejected if pair.rejected.endswith(eos) else pair.rejected + eos),
                               tokenizer)
    n = min(_common_prefix(prompt, chosen), _common_prefix(prompt, rejected))
    return PairExample(prompt[:n], chosen[n:], rejected[n:])


def encode_pairs(pairs: list[Pair], tokenizer, template=None, max_len: int | None = None,
                 report: PairReport | None = None) -> tuple[list[PairExample], PairReport]:
    """Every pair's ids (`encode_pair`), the pairs whose prompt alone reaches `max_len` dropped and counted."""
    report = report or PairReport()
    bound = None if template is None else template.bind(tokenizer)
    examples = []
    for pair in pairs:
        example = encode_pair(pair, tokenizer, bound)
        if max_len is not None and len(example.prompt_ids) >= max_len:
            report.skipped[TOO_LONG] += 1
            continue
        example.max_len = max_len
        examples.append(example)
    report.pairs = len(examples)
    return examples, report


# ---- batches ---------------------------------------------------------------------------------------------------

def collate_pairs(examples: list[PairExample], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """A micro-batch of pairs: every chosen sequence, then every rejected one, right-padded to the longest.
    `completion_mask` marks the completion tokens; the reference's log-probs come along where computed ahead."""
    rows, masks = [], []
    for side in (0, 1):
        for e in examples:
            seq, n_prompt = e.sequences()[side], len(e.prompt_ids)
            rows.append(seq)
            masks.append([0] * min(n_prompt, len(seq)) + [1] * max(0, len(seq) - n_prompt))
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    completion_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (r, m) in enumerate(zip(rows, masks, strict=True)):
        input_ids[i, :len(r)] = torch.tensor(r)
        attention_mask[i, :len(r)] = 1
        completion_mask[i, :len(r)] = torch.tensor(m)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask}
    if examples[0].ref_chosen_logps is not None:
        batch["ref_chosen_logps"] = torch.tensor([e.ref_chosen_logps for e in examples])
        batch["ref_rejected_logps"] = torch.tensor([e.ref_rejected_logps for e in examples])
    return batch


class PairStream(BatchStream):
    """`BatchStream`'s order, steps, splits and resumption, over pairs: `batch_size` counts pairs, and a pair's two
    sequences are in the same micro-batch. No packing."""

    def __init__(self, examples, batch_size: int, max_len: int, **kwargs):
        kwargs["packing"] = False
        try:
            super().__init__(examples, batch_size, max_len, **kwargs)
        except ValueError as e:  # its counts are of pairs here
            raise ValueError(str(e).replace(" examples ", " pairs ", 1)) from None

    def collate(self, items: list[int]) -> dict[str, torch.Tensor]:
        return collate_pairs([self.examples[i] for i in items], self.pad_id)


def pair_batches(examples, batch_size: int, rank: int = 0, world_size: int = 1, pad_id: int = 0):
    """Every pair once, in order, `batch_size` at a time; batch k goes to rank k % world_size."""
    for k, s in enumerate(range(0, len(examples), batch_size)):
        if k % world_size == rank:
            yield collate_pairs(examples[s:s + batch_size], pad_id)


def load_pair_train_eval(data: str, eval_data: str, tokenizer, template, max_len: int, *, seed: int = 0,
                         log=print) -> tuple[list[PairExample], list[PairExample]]:
    """(training pairs, evaluation pairs) for `--data` / `--eval-data` with a preference objective: local files of
    pairs, comma-separated, each optionally weighted (`a.jsonl:2`); evaluation `auto` holds out a share of each file
    (as for conversations: `data.sources.hold_out`), `none` none, else the named files whole."""
    train, held = [], []
    for i, source in enumerate(parse_sources(data)):
        if source.is_split:
            raise ValueError(f"--data {source.name} is a guanaco split of conversations; a preference objective "
                             "trains on a local file of pairs (prompt, chosen, rejected)")
        pairs, report = load_pairs(Path(source.name))
        log(report)
        if eval_data.lower() == AUTO:
            pairs, out = hold_out(pairs, seed, source.name)
            held += out
            log(f"eval: held out {len(out)} of {len(pairs) + len(out)} pairs of {source.name} (seed {seed})")
        examples, encoded = encode_pairs(pairs, tokenizer, template, max_len, PairReport(source=source.name))
        if encoded.skipped:
            log(f"data {source.name}: " + ", ".join(f"{k}: {v}" for k, v in encoded.skipped.items()) + " skipped")
        train += weighted(examples, source.weight, np.random.default_rng([seed, 1, i]))
    if not train:
        raise ValueError(f"no usable preference pairs in {data!r} (see the report above)")
    if eval_data.lower() == NONE:
        return train, []
    if eval_data.lower() != AUTO:
        for source in parse_sources(eval_data, weights=False):
            pairs, report = load_pairs(Path(source.name))
            log(report)
            held += pairs
    evaluation, _ = encode_pairs(held, tokenizer, template, max_len)
    log(f"eval: {len(evaluation)} pairs")
    return train, evaluation
