"""`python -m data.stats PATH_OR_SPLIT [--max-len N] [--batch-size B] [--chat-template SPEC] [--speed N]`: what
a data file holds and costs.

Prints rows read and skipped (with reasons, and the file's format), turns, token lengths (p50/p90/p99/max, before
truncation) through the chat template, how many conversations max_len truncates or drops, how many system prompts
the template leaves out (Mistral v0.3 writes one only into a conversation's last user turn, so a conversation to
train on never shows it), how many differ from transformers' encoding of the whole rendered text (a merge across a
label boundary, see data.encoding), and the padding fraction of each batching mode for one epoch: padded
(shuffled), padded with length grouping, and packed (whose efficiency is 1 - padding). `dataset_stats` returns the
same numbers as a dict for benchmarks. `--speed N` times encoding N conversations (the file's, repeated) with the
template and with guanaco.

A file of preference pairs (`data.pairs`) gets its pairs, skips and the lengths of prompts, completions and
sequences instead.

Works offline for a local file: the tokenizer defaults to the repository's copy of the Llama 2 / TinyLlama
`tokenizer.model` (assets/, byte-identical to TinyLlama's). Deliberately left out: plots, per-language
breakdowns, and anything that needs the model.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from tinyllama.templates import BUILTINS, load_template
from tinyllama.tokenizer import load_tokenizer

from .batching import BatchStream, padding_fraction, plan_packing
from .encoding import (
    ASSISTANT_ONLY,
    DEFAULT_MAX_LEN,
    SYSTEM_NOT_RENDERED,
    TRAIN_ON,
    encode_all,
    encode_full,
    encode_rendered,
    to_messages,
)
from .guanaco import SYSTEM, BadRow, Turn
from .pairs import encode_pairs, is_pair_file, load_pairs
from .sources import load_conversations

DEFAULT_TOKENIZER = Path(__file__).resolve().parents[1] / "assets" / "tokenizer.model"


def dataset_stats(conversations, tokenizer, max_len: int, batch_size: int, seed: int = 0, template=None,
                  train_on: str = ASSISTANT_ONLY) -> dict:
    template = (template or load_template("guanaco")).bind(tokenizer)
    n_turns = sum(len(c) for c in conversations)
    full_lengths, merged = [], 0
    for conv in conversations:
        try:
            ids, _ = encode_full(conv, tokenizer, template, train_on)
        except BadRow:  # counted by encode_all below
            continue
        full_lengths.append(len(ids))
        # Where piece-wise tokenization differs from tokenizing the whole text (see data.encoding).
        merged += ids != encode_rendered(template.render(to_messages(conv)), tokenizer)
    examples, report = encode_all(conversations, tokenizer, max_len, template, train_on=train_on)
    lengths = np.array(full_lengths) if full_lengths else np.zeros(1)
    out = {
        "conversations": len(conversations),
        "turns": n_turns,
        "multi_turn": sum(len(c) > 2 for c in conversations),
        "system": sum(_has_system(c) for c in conversations),
        "system_not_rendered": report.notes[SYSTEM_NOT_RENDERED],
        "tokens_p50": float(np.percentile(lengths, 50)), "tokens_p90": float(np.percentile(lengths, 90)),
        "tokens_p99": float(np.percentile(lengths, 99)), "tokens_max": int(lengths.max()),
        "max_len": max_len, "truncated": report.truncated, "skipped": sum(report.skipped.values()),
        "examples": report.examples, "tokens": report.tokens, "labelled_tokens": report.labelled,
        "boundary_merges": merged, "batch_size": batch_size,
    }
    lengths_in = [len(e) for e in examples]  # after truncation: what the model is fed
    for name, kwargs in (("padded", {}), ("padded_grouped", {"group_by_length": True})):
        try:
            stream = BatchStream(examples, batch_size, max_len, seed=seed, **kwargs)
            out[f"padding_{name}"] = stream.padding_fraction(epoch=0)
        except ValueError:  # fewer examples than one batch: one batch of them all, in file order
            out[f"padding_{name}"] = padding_fraction(lengths_in, [list(range(len(lengths_in)))])
    # Packing does not depend on the batch size: the plan's rows are what every epoch feeds the model.
    rows = plan_packing(lengths_in, max_len)
    out["packed_rows"] = len(rows)
    out["padding_packed"] = padding_fraction(lengths_in, rows, max_len)
    out["packing_efficiency"] = 1.0 - out["padding_packed"]
    return out


def pair_stats(pairs, report, tokenizer, max_len: int, template=None) -> dict:
    """A preference file's numbers: pairs kept and skipped (by reason, `max_len` included) and the lengths of
    prompts, completions and sequences, as training encodes them (`data.pairs`)."""
    examples, report = encode_pairs(pairs, tokenizer, template, max_len=max_len, report=report)
    prompt = np.array([len(e.prompt_ids) for e in examples] or [0])
    completion = np.array([len(x) for e in examples for x in (e.chosen_ids, e.rejected_ids)] or [0])
    sequence = np.array([n for e in examples for n in (len(e.prompt_ids) + len(e.chosen_ids),
                                                      len(e.prompt_ids) + len(e.rejected_ids))] or [0])
    return {"pairs": report.pairs, "skipped": dict(report.skipped), "max_len": max_len,
            "truncated": int((sequence > max_len).sum()),
            **{f"{name}_p{q}": float(np.percentile(a, q)) for name, a in
               (("prompt", prompt), ("completion", completion), ("sequence", sequence)) for q in (50, 90)},
            "sequence_max": int(sequence.max())}


def format_pair_stats(s: dict) -> str:
    skipped = ", ".join(f"{k}: {v}" for k, v in sorted(s["skipped"].items())) or "none"
    return "\n".join([
        f"pairs: {s['pairs']} (skipped: {skipped})",
        f"tokens (p50/p90): prompt {s['prompt_p50']:.0f}/{s['prompt_p90']:.0f}, completion "
        f"{s['completion_p50']:.0f}/{s['completion_p90']:.0f}, sequence {s['sequence_p50']:.0f}/"
        f"{s['sequence_p90']:.0f}, max {s['sequence_max']}",
        f"max_len {s['max_len']}: {s['truncated']} sequences cut (the start is kept)",
    ])


def format_stats(s: dict) -> str:
    pct = lambda x: f"{100 * x:.1f}%"  # noqa: E731
    return "\n".join([
        f"conversations: {s['conversations']}, turns: {s['turns']} ({s['multi_turn']} multi-turn conversations)",
        f"tokens per conversation (before truncation): p50 {s['tokens_p50']:.0f}, p90 {s['tokens_p90']:.0f}, "
        f"p99 {s['tokens_p99']:.0f}, max {s['tokens_max']}",
        f"max_len {s['max_len']}: {s['truncated']} truncated, {s['skipped']} skipped; "
        f"{s['examples']} examples, {s['tokens']} tokens, {s['labelled_tokens']} labelled "
        f"({pct(s['labelled_tokens'] / max(s['tokens'], 1))})",
        f"system prompts: {s['system']} conversations have one; the template leaves out "
        f"{s['system_not_rendered']} of them (not trained on)",
        f"tokenization: {s['boundary_merges']} conversations differ from the encoding of the whole rendered text "
        "(a token merged across a label boundary, or special-token text inside a message)",
        f"padding fraction at batch size {s['batch_size']}, one epoch: padded {pct(s['padding_padded'])}, "
        f"padded+grouped {pct(s['padding_padded_grouped'])}, packed {pct(s['padding_packed'])} "
        f"({s.get('packed_rows', 0)} rows; packing efficiency {pct(s['packing_efficiency'])})",
    ])


def _has_system(conversation) -> bool:
    """Whether a conversation (Turns or message dicts) opens with a system message."""
    if not conversation:
        return False
    first = conversation[0]
    return (first.role if isinstance(first, Turn) else first.get("role")) == SYSTEM


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m data.stats", description="What a data file holds and costs: rows, "
                                "tokens through the chat template, truncation, padding and packing.")
    p.add_argument("source", help="a local .jsonl, .jsonl.gz or .parquet of any format train.py reads, or a split "
                   "name: train, test/eval")
    p.add_argument("--max-len", type=int, default=DEFAULT_MAX_LEN,
                   help="tokens per row, as train.py's --max-len: longer conversations are cut (default: %(default)s, "
                   "train.py's)")
    p.add_argument("--batch-size", type=int, default=8,
                   help="sequences per batch, for the padding fractions (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="the shuffle of the padded batches (default: %(default)s)")
    p.add_argument("--all-threads", action="store_true", help="OASST trees: every thread, not the best one")
    p.add_argument("--tokenizer", default=str(DEFAULT_TOKENIZER),
                   help="tokenizer.model / tokenizer.json, or a model folder (default: assets/tokenizer.model, "
                   "TinyLlama's)")
    p.add_argument("--chat-template", metavar="SPEC", help=f"a built-in ({', '.join(BUILTINS)}), model (the "
                   "--tokenizer folder's own) or a .jinja file (default: the folder's own, else guanaco)")
    p.add_argument("--train-on", default=ASSISTANT_ONLY, choices=TRAIN_ON,
                   help="assistant: every assistant turn is labelled; last: the final one (default: %(default)s)")
    p.add_argument("--speed", type=int, default=0, metavar="N", help="also time encoding N conversations (the "
                   "file's, repeated) with the template and guanaco (default: %(default)s, no timing)")
    args = p.parse_args(argv)
    source = Path(args.source) if Path(args.source).is_file() else args.source
    try:
        tokenizer = load_tokenizer(args.tokenizer)
        folder = Path(args.tokenizer) if Path(args.tokenizer).is_dir() else None
        template = load_template(args.chat_template, folder, tokenizer)
        if isinstance(source, Path) and is_pair_file(source):
            pairs, report = load_pairs(source)
            print(report)
            print(f"chat template: {template.name}")
            print(format_pair_stats(pair_stats(pairs, report, tokenizer, args.max_len, template)))
            return 0
        conversations = load_conversations(source, all_threads=args.all_threads, verbose=False)
    except (ImportError, OSError, RuntimeError, ValueError) as e:  # messages for people (ImportError: an extra)
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(conversations.report)
    print(f"chat template: {template.name}")
    print(format_stats(dataset_stats(conversations, tokenizer, args.max_len, args.batch_size, args.seed, template,
                                     args.train_on)))
    if args.speed:
        for t in (template, load_template("guanaco", tokenizer=tokenizer)):
            print(f"encoding speed ({t.name}): {encode_speed(conversations, tokenizer, t, args.speed):,.0f} "
                  "conversations/s")
    return 0


def encode_speed(conversations, tokenizer, template, n: int = 10_000) -> float:
    """Conversations per second `encode_all` turns into examples: `n` of them (the given ones, repeated), the
    best of three runs."""
    many = [conversations[i % len(conversations)] for i in range(n)]
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        encode_all(many, tokenizer, None, template)
        best = min(best, time.perf_counter() - start)
    return n / best


if __name__ == "__main__":
    sys.exit(main())
