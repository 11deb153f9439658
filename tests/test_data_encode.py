"""data.encoding: token ids, the EOS after each reply, and the loss mask, proved with the real Llama 2 tokenizer."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from data import IGNORE_INDEX, BadRow, NoLabelledTokens, Turn, encode, encode_all, encode_prompt, parse_guanaco, render
from helpers import ADVERSARIAL, GUANACO_SAMPLE, TOKENIZER_PATH, assert_labelled_runs_are_the_replies, label_runs

ROWS = [json.loads(line)["text"] for line in GUANACO_SAMPLE.read_text(encoding="utf-8").splitlines()]
# Adversarial rows in canonical form (render of the parse), so decode must give them back exactly.
ALL_ROWS = ROWS + [render(parse_guanaco(row)) for row, _ in ADVERSARIAL.values()]
LLAMA2_SHA256 = "9e556afd44213b6bd1be2b850ebbbd98f5481437a8021afaf58ee7fb1818d347"


def test_the_tokenizer_is_the_real_llama2_tokenizer(tokenizer):
    assert hashlib.sha256(TOKENIZER_PATH.read_bytes()).hexdigest() == LLAMA2_SHA256
    assert (tokenizer.vocab_size, tokenizer.bos_id, tokenizer.eos_id) == (32000, 1, 2)


def test_why_template_search_fails(tokenizer):
    """The fact the masking design rests on: a marker glued to text tokenizes differently from a fresh one."""
    fresh = tokenizer.encode("### Assistant:", bos=False)
    glued = tokenizer.encode("!### Assistant:", bos=False)
    assert [tokenizer.id_to_piece(i) for i in fresh] == ["▁###", "▁Ass", "istant", ":"]
    assert [tokenizer.id_to_piece(i) for i in glued] == ["▁!", "##", "#", "▁Ass", "istant", ":"]
    row = tokenizer.encode(ROWS[0])
    assert not any(row[i:i + len(fresh)] == fresh for i in range(len(row)))  # a search would find nothing


def test_the_vocabulary_facts_segment_tokenization_relies_on(tokenizer):
    pieces = [tokenizer.id_to_piece(i) for i in range(tokenizer.vocab_size)]
    # "\n" exists only as the byte piece <0x0A>, so it merges with nothing: what follows it is tokenized as
    # inside any text, without the dummy-prefix space.
    assert not any("\n" in p for p in pieces)
    assert [tokenizer.id_to_piece(i) for i in tokenizer.encode("\n### Human:", bos=False)] == [
        "▁", "<0x0A>", "##", "#", "▁Human", ":"]
    # No piece has "▁" after another character, so ":" and the reply's leading "▁" never merge.
    assert not any("▁" in p.lstrip("▁") for p in pieces)


@pytest.mark.parametrize("row", ALL_ROWS)
def test_decode_gives_back_the_guanaco_row(tokenizer, row):
    ids, labels = encode(parse_guanaco(row), tokenizer, None)
    assert len(ids) == len(labels)
    assert ids[0] == tokenizer.bos_id and labels[0] == IGNORE_INDEX
    # decode drops BOS/EOS and no segment gains or loses a space, with or without the BOS.
    assert tokenizer.decode(ids) == row
    assert tokenizer.decode(ids[1:]) == row


@pytest.mark.parametrize("row", ROWS)
def test_ids_are_the_whole_row_tokenization_plus_eos(tokenizer, row):
    conv = parse_guanaco(row)
    ids, _ = encode(conv, tokenizer, None)
    assert [i for i in ids if i != tokenizer.eos_id] == tokenizer.encode(row)
    assert ids.count(tokenizer.eos_id) == sum(t.role == "assistant" for t in conv)
    assert ids[-1] == tokenizer.eos_id


@pytest.mark.parametrize("row", ALL_ROWS)
def test_labelled_tokens_decode_to_exactly_the_replies(tokenizer, row):
    """The masking proof: labelled runs are the replies (+EOS), unlabelled runs the markers and human turns."""
    conv = parse_guanaco(row)
    ids, labels = encode(conv, tokenizer, None)
    assert_labelled_runs_are_the_replies(conv, ids, labels, tokenizer)


def test_a_reply_that_merges_with_the_next_marker(tokenizer):
    """Where segment-wise tokenization differs from the whole row, and why that is right."""
    row = render(parse_guanaco(ADVERSARIAL["a reply ending in '#' glued to the next marker"][0]))
    conv = parse_guanaco(row)
    ids, labels = encode(conv, tokenizer, None)
    whole = [tokenizer.id_to_piece(i) for i in tokenizer.encode(row)]
    ours = [tokenizer.id_to_piece(i) for i in ids if i != tokenizer.eos_id]
    # Whole-row tokenization glues the reply's "#" and the marker's "###" into one "####" piece, so no token
    # boundary (and no place for EOS) exists where the reply ends.
    assert "####" in whole and "####" not in ours
    assert ours[ours.index("▁Use"):ours.index("▁Use") + 5] == ["▁Use", "▁C", "#", "##", "#"]
    assert tokenizer.decode(ids) == row
    reply_spans = [(s, e) for s, e, lab in label_runs(labels) if lab]
    assert [tokenizer.decode(ids[s:e - 1]) for s, e in reply_spans] == ["Use C#", "GDScript or C#"]


class CharTokenizer:
    """One id per character, no dummy prefix: makes the sequence layout readable."""
    bos_id, eos_id = 1, 2
    bos_token, eos_token, unk_token = "<s>", "</s>", None
    special_tokens = {"<s>": 1, "</s>": 2}
    special_strip = {}

    def encode(self, text, bos=True, eos=False):
        return [self.bos_id] * bos + [ord(c) for c in text] + [self.eos_id] * eos

    def encode_inside(self, text):
        return self.encode(text, bos=False)

    def encode_inside_all(self, texts):
        return [self.encode_inside(t) for t in texts]


def test_layout_with_a_character_tokenizer():
    conv = [Turn("human", "q1"), Turn("assistant", "a1"), Turn("human", "q2"), Turn("assistant", "a2")]
    ids, labels = encode(conv, CharTokenizer(), None)
    show = lambda xs: "".join({1: "<s>", 2: "</s>", IGNORE_INDEX: "_"}.get(x, chr(x) if x > 2 else "")  # noqa
                              for x in xs)
    assert show(ids) == "<s>### Human: q1### Assistant: a1</s>### Human: q2### Assistant: a2</s>"
    assert show(labels) == "_" * 28 + " a1</s>" + "_" * 27 + " a2</s>"


def test_encode_prompt_is_the_training_prefix(tokenizer):
    conv = parse_guanaco(ROWS[10])  # three exchanges
    ids, labels = encode(conv, tokenizer, None)
    reply_starts = [s for s, _, lab in label_runs(labels) if lab]
    for k, start in enumerate(reply_starts):
        assert encode_prompt(conv[:2 * k + 1], tokenizer) == ids[:start]
    with pytest.raises(ValueError, match="ends with a human turn"):
        encode_prompt(conv, tokenizer)


# ------------------------------------------------------------------------------------------- truncation

def test_truncation_inside_a_reply_keeps_the_start(tokenizer):
    conv = parse_guanaco(ROWS[3])
    full_ids, full_labels = encode(conv, tokenizer, None)
    ids, labels = encode(conv, tokenizer, 60)
    assert len(full_ids) > 60 and full_labels[59] != IGNORE_INDEX
    assert (ids, labels) == (full_ids[:60], full_labels[:60])


def test_truncation_inside_a_later_human_turn_ends_at_the_previous_eos(tokenizer):
    conv = parse_guanaco(ROWS[9])
    full_ids, full_labels = encode(conv, tokenizer, None)
    first_eos = full_ids.index(tokenizer.eos_id)
    ids, labels = encode(conv, tokenizer, first_eos + 5)  # cuts into "### Human: It gets about..."
    assert ids == full_ids[:first_eos + 1] and labels == full_labels[:first_eos + 1]
    assert labels[-1] == tokenizer.eos_id


def test_no_sequence_without_a_labelled_token(tokenizer):
    conv = parse_guanaco(ROWS[0])
    _, full_labels = encode(conv, tokenizer, None)
    first = next(i for i, x in enumerate(full_labels) if x != IGNORE_INDEX)
    assert encode(conv, tokenizer, first + 1)[1][-1] != IGNORE_INDEX  # one reply token still fits
    with pytest.raises(NoLabelledTokens, match=f"first reply starts at token {first}"):
        encode(conv, tokenizer, first)


def test_encode_all_counts_truncated_and_skipped(tokenizer):
    convs = [parse_guanaco(r) for r in ROWS]
    lengths = [len(encode(c, tokenizer, None)[0]) for c in convs]
    first_label = [next(i for i, x in enumerate(encode(c, tokenizer, None)[1]) if x != IGNORE_INDEX)
                   for c in convs]
    max_len = 25
    examples, report = encode_all(convs + [[Turn("assistant", "no question")]], tokenizer, max_len)
    n_skip = sum(f >= max_len for f in first_label)
    n_trunc = sum(n > max_len for n in lengths) - n_skip
    assert n_skip >= 1 and n_trunc >= 1  # the case exercises both
    assert (report.conversations, report.examples, report.truncated) == (12, 11 - n_skip, n_trunc)
    assert report.skipped == {"no assistant token within max_len": n_skip,
                              "invalid conversation (turns out of order)": 1}
    assert sum(e.truncated for e in examples) == n_trunc
    assert all(len(e) <= max_len and (e.labels != IGNORE_INDEX).any() for e in examples)
    assert report.tokens == sum(len(e) for e in examples)
    assert "12 conversations encoded (max_len=25)" in str(report)
    untouched, report = encode_all(convs, tokenizer, None)
    assert report.truncated == 0 and [e.input_ids.tolist() for e in untouched] == [
        encode(c, tokenizer, None)[0] for c in convs]
    assert untouched[0].input_ids.dtype == untouched[0].labels.dtype == torch.long


def test_encode_refuses_a_malformed_conversation(tokenizer):
    with pytest.raises(BadRow, match="turns out of order"):
        encode([Turn("human", "a"), Turn("human", "b")], tokenizer, 100)
    with pytest.raises(BadRow, match="no assistant turn"):
        encode([Turn("human", "a")], tokenizer, 100)
