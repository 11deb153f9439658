"""data.batching: padding and packing are exact (checked through a tiny model), the stream is deterministic,
resumable and data-parallel, deals each optimizer step the same rows however it is split, and length grouping
reduces padding."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest
import torch

from data import (
    IGNORE_INDEX,
    BatchStream,
    Example,
    collate_packed,
    collate_padded,
    encode_all,
    eval_batches,
    load_conversations,
    pack,
    pack_row,
    plan_packing,
)
from data.batching import padding_fraction
from helpers import GUANACO_SAMPLE, TINY
from tinyllama import Llama, LlamaConfig, causal_lm_loss, reference_loss
from training.step import MODEL_INPUTS

PADDED_KEYS = {"input_ids", "labels", "attention_mask"}
PACKED_KEYS = {"input_ids", "labels", "position_ids", "document_ids", "cu_seqlens"}


VOCAB = 1024  # the model tests only need the sequence structure of real examples, not 32,000 logits a token


@pytest.fixture(scope="module")
def fixture_examples(tokenizer):
    """The fixture conversations encoded with the real tokenizer (max_len 128), ids folded into VOCAB."""
    convs = load_conversations(GUANACO_SAMPLE, verbose=False)
    examples, report = encode_all(convs, tokenizer, 128)
    assert report.examples == 11 and report.truncated == 2
    fold = lambda t: torch.where(t == IGNORE_INDEX, t, t % VOCAB)  # noqa: E731  (BOS=1, EOS=2 unchanged)
    return [Example(fold(e.input_ids), fold(e.labels), e.truncated) for e in examples]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Llama(LlamaConfig(**{**TINY, "vocab_size": VOCAB})).eval()


def synthetic(lengths) -> list[Example]:
    """Example i is BOS then its own id (3 + i) repeated, the second half labelled: easy to recognise."""
    out = []
    for i, n in enumerate(lengths):
        ids = torch.tensor([1] + [3 + i] * (n - 1))
        labels = ids.clone()
        labels[: max(1, n // 2)] = IGNORE_INDEX
        out.append(Example(ids, labels))
    return out


def unpadded(batch) -> list[list[int]]:
    return [row[mask.bool()].tolist() for row, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True)]


def documents(batch) -> list[list[int]]:
    """The documents of packed rows, in order, as id lists."""
    docs = []
    for row, doc in zip(batch["input_ids"], batch["document_ids"], strict=True):
        for d in range(int(doc.max()) + 1):
            docs.append(row[doc == d].tolist())
    return docs


def model_kwargs(batch):
    return {k: batch[k] for k in MODEL_INPUTS if k in batch}


# ------------------------------------------------------------------------------------------- padding mode

def test_padded_batch_layout(fixture_examples):
    batch = collate_padded(fixture_examples[:4], pad_id=7)
    assert set(batch) == PADDED_KEYS
    width = max(len(e) for e in fixture_examples[:4])
    for i, e in enumerate(fixture_examples[:4]):
        n = len(e)
        assert batch["input_ids"].shape == (4, width)
        assert torch.equal(batch["input_ids"][i, :n], e.input_ids) and torch.equal(batch["labels"][i, :n], e.labels)
        assert (batch["input_ids"][i, n:] == 7).all() and (batch["labels"][i, n:] == IGNORE_INDEX).all()
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (width - n)


def test_padded_loss_equals_the_per_example_losses(model, fixture_examples):
    examples = fixture_examples[:6]
    batch = collate_padded(examples, pad_id=5)
    with torch.no_grad():
        loss, n = causal_lm_loss(model, batch["input_ids"], batch["labels"], **model_kwargs(batch))
        logits = model(batch["input_ids"], **model_kwargs(batch))
        ref_loss, ref_n = reference_loss(logits, batch["labels"])
        alone = [causal_lm_loss(model, e.input_ids[None], e.labels[None]) for e in examples]
        for i, e in enumerate(examples):  # every real position computes what it computes alone
            torch.testing.assert_close(logits[i, :len(e)], model(e.input_ids[None])[0], atol=1e-4, rtol=0)
    assert n == ref_n == sum(int(a[1]) for a in alone) == sum(int((e.labels[1:] != IGNORE_INDEX).sum())
                                                              for e in examples)
    torch.testing.assert_close(loss, sum(a[0] for a in alone), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(ref_loss, loss, atol=1e-4, rtol=1e-5)
    with torch.no_grad():  # the pad id does not matter: it is masked out and never labelled
        other = collate_padded(examples, pad_id=VOCAB - 1)
        torch.testing.assert_close(causal_lm_loss(model, other["input_ids"], other["labels"],
                                                  **model_kwargs(other))[0], loss, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------- packing mode

def test_packed_documents_compute_exactly_what_they_compute_alone(model, fixture_examples):
    max_len = 256
    plan = plan_packing([len(e) for e in fixture_examples], max_len)
    rows = pack(fixture_examples, max_len)
    assert sorted(i for r in plan for i in r) == list(range(len(fixture_examples)))
    assert len(rows) == len(plan) < len(fixture_examples) and any(len(r) >= 3 for r in plan)
    batch = collate_packed(rows)
    assert set(batch) == PACKED_KEYS and batch["input_ids"].shape == (len(rows), max_len)
    with torch.no_grad():
        packed = model(batch["input_ids"], **model_kwargs(batch))
        plain_causal = model(batch["input_ids"])  # negative control: no position restart, no document mask
        leaks = 0
        for r, row_plan in enumerate(plan):
            start = 0
            for doc, i in enumerate(row_plan):
                e, n = fixture_examples[i], len(fixture_examples[i])
                assert (batch["document_ids"][r, start:start + n] == doc).all()
                alone = model(e.input_ids[None])[0]
                torch.testing.assert_close(packed[r, start:start + n], alone, atol=1e-4, rtol=0)
                leaks += doc > 0 and not torch.allclose(plain_causal[r, start:start + n], alone, atol=1e-3)
                start += n
        assert leaks == sum(len(p) - 1 for p in plan)  # without the mask every later document would differ
        loss, count = causal_lm_loss(model, batch["input_ids"], batch["labels"], **model_kwargs(batch))
        alone = [causal_lm_loss(model, e.input_ids[None], e.labels[None]) for e in fixture_examples]
    assert count == sum(int(a[1]) for a in alone)
    torch.testing.assert_close(loss, sum(a[0] for a in alone), atol=1e-4, rtol=1e-5)


def check_packed_row(row, max_len):
    ids, labels, pos, doc = row["input_ids"], row["labels"], row["position_ids"], row["document_ids"]
    assert ids.shape == labels.shape == pos.shape == doc.shape == (max_len,)
    for t in range(max_len):
        if t == 0 or doc[t] != doc[t - 1]:
            assert pos[t] == 0  # a new document restarts its positions ...
            assert labels[t] == IGNORE_INDEX  # ... and its first label is never predicted from the previous one
            if doc[t] != -1:
                assert ids[t] == 1  # BOS
        else:
            assert pos[t] == pos[t - 1] + 1
    tail = doc == -1
    assert (labels[tail] == IGNORE_INDEX).all()
    assert tail.sum() == 0 or tail[-int(tail.sum()):].all()  # padding only at the end


def test_packed_row_invariants():
    random.seed(1)
    examples = synthetic([random.randint(2, 60) for _ in range(80)])
    for sort in (True, False):
        rows = pack(examples, 64, sort=sort)
        for row in rows:
            check_packed_row(row, 64)
        seen = [d[1] - 3 for d in documents(collate_packed(rows))]  # each example exactly once
        assert sorted(seen) == list(range(80)) and (sort or seen == list(range(80)))
    with pytest.raises(ValueError, match="first token is labelled"):
        pack_row([Example(torch.tensor([1, 5]), torch.tensor([1, 5]))], 8)
    with pytest.raises(ValueError, match="longer than max_len=10"):
        pack(synthetic([5, 11]), 10)


def test_best_fit_decreasing_packs_tighter_than_next_fit():
    random.seed(2)
    lengths = [random.randint(1, 100) for _ in range(300)]
    bfd, nf = plan_packing(lengths, 128), plan_packing(lengths, 128, sort=False)
    assert all(sum(lengths[i] for i in r) <= 128 for r in bfd + nf)
    assert len(bfd) < len(nf)
    assert len(bfd) <= -(-sum(lengths) // 128) * 1.05  # within 5% of the lower bound


def test_padding_fraction_by_hand():
    lengths = [2, 4, 6, 8]
    assert padding_fraction(lengths, [[0, 1], [2, 3]]) == pytest.approx(4 / 24)
    assert padding_fraction(lengths, [[0, 3], [1, 2]]) == pytest.approx(1 - 20 / 28)
    assert padding_fraction(lengths, [[0, 3], [1, 2]], width=10) == 0.0
    assert padding_fraction(lengths, [[0, 1, 2, 3]], width=32) == pytest.approx(0.375)


# ------------------------------------------------------------------------------------------- the stream

def take(stream, n):
    return [next(stream) for _ in range(n)]


def same_batches(a, b):
    return len(a) == len(b) and all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
                                    for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("packing", [False, True])
def test_stream_is_deterministic_and_reshuffles_every_epoch(packing):
    random.seed(3)
    examples = synthetic([random.randint(2, 40) for _ in range(50)])
    kw = dict(packing=packing)
    s = BatchStream(examples, 4, 64, **kw)
    assert set(next(iter(s))) == (PACKED_KEYS if packing else PADDED_KEYS)
    s = BatchStream(examples, 4, 64, **kw)
    n_items, bpe = s.n_items, s.batches_per_epoch
    assert bpe == n_items // 4 and (not packing or n_items < 50)
    first = take(s, 2 * bpe)
    assert s.epoch == 2 and s.index == 0
    assert same_batches(first, take(BatchStream(examples, 4, 64, **kw), 2 * bpe))
    assert not same_batches(first, take(BatchStream(examples, 4, 64, seed=1, **kw), 2 * bpe))
    e0, e1 = s.epoch_order(0), s.epoch_order(1)
    assert e0 != e1 and len(set(e0)) == len(e0) == len(set(e1)) == bpe * 4
    assert BatchStream(examples, 4, 64, seed=5, **kw).epoch_order(2) == BatchStream(
        examples, 4, 64, seed=6, **kw).epoch_order(1)  # epoch e is shuffled with seed + e


@pytest.mark.parametrize("packing,group", [(False, False), (False, True), (True, False)])
def test_stream_resumes_exactly_from_its_state(packing, group):
    random.seed(4)
    examples = synthetic([random.randint(2, 40) for _ in range(30)])
    kw = dict(packing=packing, group_by_length=group, seed=7)
    a = BatchStream(examples, 3, 64, **kw)
    take(a, a.batches_per_epoch + 2)  # into the second epoch
    state = json.loads(json.dumps(a.state_dict()))  # plain data: goes into any checkpoint
    assert (state["epoch"], state["epoch_step"]) == (1, 2)
    expected = take(a, a.batches_per_epoch + 1)
    b = BatchStream(examples, 3, 64, **kw)
    b.load_state_dict(state)
    assert same_batches(take(b, a.batches_per_epoch + 1), expected)


def test_resume_refuses_a_different_setup_but_allows_any_split_of_the_same_step():
    examples = synthetic([10] * 40)
    state = BatchStream(examples, 4, 16, seed=0).state_dict()
    for other in (dict(seed=1), dict(packing=True), dict(group_by_length=True)):
        s = BatchStream(examples, **{"batch_size": 4, "max_len": 16, **other})
        with pytest.raises(ValueError, match="cannot resume"):
            s.load_state_dict(state)
    for batch_size, grad_accum, world_size in [(2, 1, 2), (2, 2, 1), (1, 2, 2), (1, 4, 1)]:  # 4 rows a step
        BatchStream(examples, batch_size, 16, grad_accum=grad_accum, rank=world_size - 1,
                    world_size=world_size).load_state_dict(state)
    # Another number of rows per step: what was saved, what is now, and the largest micro-batch up to this run's
    # that makes the saved step (or the processes that can).
    refusals = {(2, 1, 1): "--batch-size 2 --grad-accum 2", (3, 1, 1): "--batch-size 2 --grad-accum 2",
                (8, 1, 1): "--batch-size 4 --grad-accum 1", (1, 1, 3): "number of processes that divides 4"}
    for (batch_size, grad_accum, world_size), fix in refusals.items():
        now = BatchStream(examples, batch_size, 16, grad_accum=grad_accum, world_size=world_size)
        with pytest.raises(ValueError) as refused:
            now.load_state_dict(state)
        processes = f"{world_size} process{'es' if world_size > 1 else ''}"
        assert (f"optimizer steps took 4 rows each, this run's take {batch_size * grad_accum * world_size} "
                f"(--batch-size {batch_size} x --grad-accum {grad_accum} x {processes})") in str(refused.value)
        assert fix in str(refused.value)


def test_a_position_saved_in_micro_batches_resumes_where_the_order_is_the_same():
    # An earlier version saved the index of the next micro-batch of batch_size x world_size rows, and cut the
    # epoch into such micro-batches. 42 examples in micro-batches of 2 are 21: 7 whole steps of 3 (the same epoch
    # as steps of 6), 10 steps of 2 and one left over (an epoch whose last step ran on into the next).
    examples = synthetic([10] * 42)
    legacy = {"epoch": 1, "index": 6, "seed": 0, "n_items": 42, "global_batch_size": 2, "packing": False,
              "group_by_length": False}
    s = BatchStream(examples, 2, 16, grad_accum=3)
    s.load_state_dict(legacy, saved_grad_accum=3)
    assert s.state_dict() == {**{k: v for k, v in legacy.items() if k not in ("index", "global_batch_size")},
                              "epoch_step": 2, "rows_per_step": 6}
    perm = torch.randperm(42, generator=torch.Generator().manual_seed(0 + 1)).tolist()  # that version's epoch 1
    assert unpadded(next(s)) == [examples[i].input_ids.tolist() for i in perm[12:14]]
    refusals = [(legacy, 2, "with grad_accum 2;"), ({**legacy, "group_by_length": True}, 3, "and length grouping"),
                (legacy, None, "the grad_accum it ran with is unknown")]
    for state, accum, reason in refusals:
        with pytest.raises(ValueError, match="saved by an earlier version") as refused:
            BatchStream(examples, 2, 16, grad_accum=accum or 3).load_state_dict(state, saved_grad_accum=accum)
        assert reason in str(refused.value)


# batch, accumulation, ranks
SPLITS_OF_12 = [(12, 1, 1), (6, 2, 1), (3, 4, 1), (3, 2, 2), (2, 6, 1), (2, 3, 2), (1, 4, 3), (4, 1, 3)]


def _rows(batch, packing):
    return [tuple(r.tolist()) for r in batch["input_ids"]] if packing else [tuple(r) for r in unpadded(batch)]


@pytest.mark.parametrize("packing,group", [(False, False), (False, True), (True, False)])
def test_every_split_of_the_same_rows_per_step_deals_each_step_the_same_rows(packing, group):
    # 70 examples (fewer packed rows): 70 is no multiple of any split's micro-batch rows (batch x ranks), so a
    # stream cut into micro-batches would keep a different tail of each epoch, and length grouping by
    # micro-batch would put other rows together. Dealt by optimizer step, the step's rows are the split's to
    # share out only: a checkpoint of one split resumes on another, and the step's gradient is the same.
    random.seed(9)
    examples = synthetic([random.randint(2, 40) for _ in range(70)])
    kw = dict(packing=packing, group_by_length=group, seed=4)
    streams = {split: [BatchStream(examples, split[0], 64, grad_accum=split[1], rank=r, world_size=split[2], **kw)
                       for r in range(split[2])] for split in SPLITS_OF_12}
    assert {ranks[0].steps_per_epoch for ranks in streams.values()} == {streams[12, 1, 1][0].n_items // 12}
    n_steps = streams[12, 1, 1][0].steps_per_epoch + 2  # into the next epoch
    # Per step, its micro-batches in slot order: micro-batch i of rank r is slot i * ranks + r.
    dealt = {split: [[next(s) for _ in range(split[1]) for s in ranks] for _ in range(n_steps)]
             for split, ranks in streams.items()}
    whole = [sorted(_rows(step[0], packing)) for step in dealt[12, 1, 1]]
    for split, steps in dealt.items():
        assert [sorted(r for b in step for r in _rows(b, packing)) for step in steps] == whole, split
    # The same micro-batch size deals each slot the same rows, whichever rank runs it: the dropout masks keyed by
    # slot (train.dropout_seed) are then the same too.
    for a, b in [((2, 6, 1), (2, 3, 2)), ((3, 4, 1), (3, 2, 2))]:
        assert all(same_batches(x, y) for x, y in zip(dealt[a], dealt[b], strict=True)), (a, b)


@pytest.mark.parametrize("packing,group", [(False, False), (False, True), (True, False)])
def test_ranks_together_see_what_one_process_sees(packing, group):
    random.seed(5)
    examples = synthetic([random.randint(2, 40) for _ in range(70)])
    kw = dict(packing=packing, group_by_length=group, seed=3)
    single = BatchStream(examples, 6, 64, **kw)
    ranks = [BatchStream(examples, 2, 64, rank=r, world_size=3, **kw) for r in range(3)]
    assert single.batches_per_epoch == ranks[0].batches_per_epoch
    for _ in range(single.batches_per_epoch + 2):
        one = next(single)
        parts = [next(r) for r in ranks]
        if packing:
            for k in one.keys() - {"cu_seqlens"}:  # cu_seqlens: offsets within each process's own batch
                assert torch.equal(torch.cat([p[k] for p in parts]), one[k])
        else:
            assert [x for p in parts for x in unpadded(p)] == unpadded(one)


def test_length_grouping_reduces_padding_and_keeps_epochs_shuffled():
    random.seed(6)
    examples = synthetic([random.randint(5, 300) for _ in range(400)])
    plain = BatchStream(examples, 8, 300, seed=0)
    grouped = BatchStream(examples, 8, 300, seed=0, group_by_length=True)
    assert grouped.padding_fraction(0) < 0.5 * plain.padding_fraction(0)
    orders = [grouped.epoch_order(e) for e in range(3)]
    assert orders[0] != orders[1] != orders[2]
    assert all(len(set(o)) == len(o) == 400 for o in orders)
    assert orders[0] == BatchStream(examples, 8, 300, seed=0, group_by_length=True).epoch_order(0)
    # Measured on real batches too: the padding the model sees in one epoch.
    pad = lambda b: 1 - b["attention_mask"].float().mean().item()  # noqa: E731
    g = [pad(b) for b in take(grouped, grouped.batches_per_epoch)]
    p = [pad(b) for b in take(plain, plain.batches_per_epoch)]
    assert sum(g) < 0.5 * sum(p)


@pytest.mark.parametrize("world_size", [1, 2])
def test_an_epoch_of_length_grouped_batches_holds_every_kept_example_exactly_once(world_size):
    # 437 examples: several sorting windows of 50 optimizer steps, and a remainder (437 mod 4 = 1, mod 8 = 5) that
    # no whole step holds, dropped. Every other example comes exactly once per epoch, over all ranks.
    random.seed(8)
    examples = synthetic([random.randint(2, 60) for _ in range(437)])  # example i: BOS, then 3 + i repeated
    ranks = [BatchStream(examples, 4, 64, group_by_length=True, seed=2, rank=r, world_size=world_size)
             for r in range(world_size)]
    kept = ranks[0].batches_per_epoch * 4 * world_size
    assert kept == 437 - 437 % (4 * world_size)
    for epoch in range(2):
        seen = []
        for _ in range(ranks[0].batches_per_epoch):
            for rows in (unpadded(next(s)) for s in ranks):
                assert len(rows) == 4
                seen += [row[1] - 3 for row in rows]
                assert all(row == examples[row[1] - 3].input_ids.tolist() for row in rows)
        counts = Counter(seen)
        assert len(seen) == kept and len(counts) == kept and set(counts.values()) == {1}, f"epoch {epoch}"
        assert set(counts) == set(ranks[0].epoch_order(epoch)) and ranks[0].epoch == epoch + 1


def test_stream_refuses_bad_setups():
    examples = synthetic([10] * 5)
    with pytest.raises(ValueError, match="do not fill one optimizer step"):
        BatchStream(examples, 4, 16, world_size=2)
    with pytest.raises(ValueError, match="longer than max_len=8"):
        BatchStream(examples, 2, 8)
    with pytest.raises(ValueError, match="nothing to do with packing"):
        BatchStream(examples, 2, 16, packing=True, group_by_length=True)


# ------------------------------------------------------------------------------------------- evaluation

@pytest.mark.parametrize("packing", [False, True])
def test_eval_batches_cover_every_example_once_in_order(packing):
    random.seed(7)
    examples = synthetic([random.randint(2, 30) for _ in range(23)])
    want = [e.input_ids.tolist() for e in examples]
    got_of = (lambda b: documents(b)) if packing else unpadded
    batches = list(eval_batches(examples, 4, 32, packing=packing))
    assert [x for b in batches for x in got_of(b)] == want
    if not packing:
        assert [len(b["input_ids"]) for b in batches] == [4] * 5 + [3]
    per_rank = [list(eval_batches(examples, 4, 32, packing=packing, rank=r, world_size=2)) for r in range(2)]
    interleaved = [b for pair in zip(per_rank[0], per_rank[1] + [None], strict=False) for b in pair if b is not None]
    assert [x for b in interleaved for x in got_of(b)] == want
