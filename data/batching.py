"""Examples -> micro-batches: padding or packing, shuffled per epoch, resumable, data-parallel.

A batch is a dict of tensors whose keys other than `labels` are keyword arguments of the model:
- padding mode: {"input_ids", "labels", "attention_mask"}, right-padded to the longest example of the
  micro-batch. There is no pad token: padding uses `pad_id` (any id), attention_mask 0 and label -100.
- packing mode: {"input_ids", "labels", "position_ids", "document_ids", "cu_seqlens"}, rows of exactly `max_len`
  tokens holding whole examples back to back. position_ids restart at 0 for every example and the model lets a
  token attend only to earlier tokens with the same document id, so each example computes exactly what it would
  alone. The unused tail of a row is padding: document id -1, label -100. `cu_seqlens` says the same as the
  document ids for attention kernels that take concatenated sequences (varlen): where each segment (a document,
  or a row's padding tail) starts in the flattened [batch * max_len] tokens, then the total, int32. It is padded
  to a length fixed for the whole stream by repeating the total (empty segments), so every batch has one shape.
  No label is ever predicted across a document boundary: position t predicts labels[t + 1], and the first token
  of every example is BOS, labelled -100 (`pack_row` checks it).

`BatchStream` is the training iterator: infinite, epoch e is shuffled with seed + e, and the unit it deals is one
optimizer step's rows (batch_size x grad_accum x world_size): each step's rows are chosen first, then split into
micro-batches and ranks. So the rows of a step, and the position in the stream (epoch, step: a small state dict),
are the same for every split of the same rows per step, and a checkpoint resumes on any such split (2 ranks of
batch B, or 1 rank of batch B accumulating 2 micro-batches, or 1 rank of batch 2B). `eval_batches` goes through
every example once, in order.

Packing is planned once (best-fit decreasing, the tightest simple packing) and the packed rows are shuffled each
epoch, so the number of batches per epoch is fixed. The examples that share a row therefore share it in every
epoch; the attention mask makes that invisible to the computation, it only fixes which examples are in the same
micro-batch. Deliberately left out: splitting an example across rows (its second half would lose its context),
and dataset-level caching of tensors.
"""

from __future__ import annotations

import bisect

import torch

from .encoding import IGNORE_INDEX

PAD_DOCUMENT = -1
_MEGABATCH = 50  # length grouping sorts windows of 50 optimizer steps: enough to pair similar lengths, still random


# ---------------------------------------------------------------------------------------------- padding mode

def collate_padded(examples, pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-pad examples to the longest one; padding is masked out of attention and labelled -100."""
    width = max(len(e) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e)
        input_ids[i, :n] = torch.as_tensor(e.input_ids)
        labels[i, :n] = torch.as_tensor(e.labels)
        attention_mask[i, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


# ---------------------------------------------------------------------------------------------- packing mode

def plan_packing(lengths: list[int], max_len: int, *, sort: bool = True) -> list[list[int]]:
    """Group example indices into rows of at most max_len tokens.

    sort=True: best-fit decreasing (each example, longest first, goes to the fullest row it fits in).
    sort=False: next-fit in the given order (rows keep the examples in order; used for evaluation).
    """
    too_long = [i for i, n in enumerate(lengths) if n > max_len]
    if too_long:
        raise ValueError(f"{len(too_long)} examples are longer than max_len={max_len} (e.g. example {too_long[0]} "
                         f"has {lengths[too_long[0]]} tokens); encode them with the same max_len")
    rows: list[list[int]] = []
    if not sort:
        used = max_len
        for i, n in enumerate(lengths):
            if used + n > max_len:
                rows.append([])
                used = 0
            rows[-1].append(i)
            used += n
        return rows
    free: list[tuple[int, int]] = []  # sorted (free tokens, row index)
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        j = bisect.bisect_left(free, (lengths[i], -1))
        if j == len(free):
            rows.append([i])
            bisect.insort(free, (max_len - lengths[i], len(rows) - 1))
        else:
            space, r = free.pop(j)
            rows[r].append(i)
            bisect.insort(free, (space - lengths[i], r))
    return rows


def pack_row(examples, max_len: int, pad_id: int = 0) -> dict[str, torch.Tensor]:
    """One packed row of exactly max_len tokens from whole examples (1-D tensors)."""
    input_ids = torch.full((max_len,), pad_id, dtype=torch.long)
    labels = torch.full((max_len,), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros(max_len, dtype=torch.long)
    document_ids = torch.full((max_len,), PAD_DOCUMENT, dtype=torch.long)
    start = 0
    for doc, e in enumerate(examples):
        n = len(e)
        if start + n > max_len:
            raise ValueError(f"examples of {sum(len(x) for x in examples)} tokens do not fit a row of {max_len}")
        ex_labels = torch.as_tensor(e.labels)
        if ex_labels[0] != IGNORE_INDEX:
            # The previous document's last token would be trained to predict this label.
            raise ValueError("cannot pack an example whose first token is labelled: its label would be "
                             "predicted from the previous example's last token (examples start with BOS, -100)")
        input_ids[start:start + n] = torch.as_tensor(e.input_ids)
        labels[start:start + n] = ex_labels
        position_ids[start:start + n] = torch.arange(n)
        document_ids[start:start + n] = doc
        start += n
    position_ids[start:] = torch.arange(max_len - start)  # the padding tail is a document of its own
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "document_ids": document_ids}


def collate_packed(rows: list[dict[str, torch.Tensor]], row_segments: int | None = None) -> dict[str, torch.Tensor]:
    """Stack packed rows, with their `cu_seqlens` padded to len(rows) * row_segments + 1 (default: unpadded)."""
    batch = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
    starts = (batch["position_ids"].flatten() == 0).nonzero().flatten()
    total = batch["position_ids"].numel()
    size = len(starts) + 1 if row_segments is None else len(rows) * row_segments + 1
    if size < len(starts) + 1:
        raise ValueError(f"{len(starts)} segments do not fit cu_seqlens of {size - 1} (row_segments too small)")
    cu = torch.full((size,), total, dtype=torch.int32)
    cu[:len(starts)] = starts
    batch["cu_seqlens"] = cu
    return batch


def segments_per_row(plan: list[list[int]]) -> int:
    """The most segments a row of this packing plan holds: its documents and a padding tail."""
    return max(len(row) for row in plan) + 1


def pack(examples, max_len: int, *, pad_id: int = 0, sort: bool = True) -> list[dict[str, torch.Tensor]]:
    """All examples packed into rows of exactly max_len tokens (see plan_packing for the order)."""
    plan = plan_packing([len(e) for e in examples], max_len, sort=sort)
    return [pack_row([examples[i] for i in row], max_len, pad_id) for row in plan]


# ---------------------------------------------------------------------------------------------- padding accounting

def padding_fraction(lengths: list[int], groups: list[list[int]], width: int | None = None) -> float:
    """Fraction of batch positions that are padding. `groups` are micro-batches (padding mode, padded to their
    longest, width=None) or packed rows (width=max_len)."""
    real = sum(lengths[i] for g in groups for i in g)
    total = sum((width if width is not None else max(lengths[i] for i in g) * len(g)) for g in groups)
    return 1.0 - real / total if total else 0.0


# ---------------------------------------------------------------------------------------------- the stream

class BatchStream:
    """Infinite, deterministic, resumable iterator over micro-batches of `examples` (see the module docstring).

    An *item* is one example (padding mode) or one packed row (packing mode). Epoch e orders the items with
    seed + e; the items of an epoch are cut into optimizer steps of rows_per_step = batch_size * grad_accum *
    world_size consecutive items (an incomplete last one is dropped, a different one each epoch). Within a step,
    micro-batch i of rank r takes the batch_size items of slot i * world_size + r: slot s holds the step's items
    [s * batch_size, (s + 1) * batch_size), whichever rank runs it (`train.dropout_seed` keys masks by slot).
    Iterating yields this rank's micro-batches; grad_accum of them make one optimizer step.
    """

    def __init__(self, examples, batch_size: int, max_len: int, *, grad_accum: int = 1, packing: bool = False,
                 group_by_length: bool = False, seed: int = 0, rank: int = 0, world_size: int = 1,
                 pad_id: int = 0):
        if batch_size < 1 or grad_accum < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need batch_size >= 1, grad_accum >= 1 and 0 <= rank < world_size, got "
                             f"batch_size={batch_size}, grad_accum={grad_accum}, rank={rank}, "
                             f"world_size={world_size}")
        if packing and group_by_length:
            raise ValueError("group_by_length has nothing to do with packing: every packed row is max_len long")
        self.examples = examples
        self.batch_size, self.grad_accum, self.max_len, self.packing = batch_size, grad_accum, max_len, packing
        self.group_by_length, self.seed, self.rank, self.world_size = group_by_length, seed, rank, world_size
        self.pad_id = pad_id
        self.lengths = [len(e) for e in examples]
        too_long = [n for n in self.lengths if n > max_len]
        if too_long:
            raise ValueError(f"{len(too_long)} examples are longer than max_len={max_len} (longest "
                             f"{max(too_long)}); encode them with the same max_len")
        self.rows = plan_packing(self.lengths, max_len) if packing else None
        self.row_segments = segments_per_row(self.rows) if packing else None  # fixes cu_seqlens' length
        self.n_items = len(self.rows) if packing else len(examples)
        self.rows_per_step = batch_size * grad_accum * world_size
        self.steps_per_epoch = self.n_items // self.rows_per_step
        self.batches_per_epoch = self.steps_per_epoch * grad_accum  # this rank's micro-batches
        if self.steps_per_epoch == 0:
            kind = "packed rows" if packing else "examples"
            raise ValueError(f"{self.n_items} {kind} do not fill one optimizer step of {self.rows_per_step} "
                             f"(batch_size {batch_size} x grad_accum {grad_accum} x world_size {world_size}); "
                             "use a smaller batch size or fewer accumulation steps")
        self.epoch, self.index = 0, 0  # position of this rank's next micro-batch
        self._order_epoch, self._order = None, None

    # -- order ------------------------------------------------------------------------------------------------

    def epoch_order(self, epoch: int) -> list[int]:
        """Item indices of an epoch, cut to whole optimizer steps; identical on every rank and for every split of
        the same rows per step."""
        g = torch.Generator().manual_seed(self.seed + epoch)
        perm = torch.randperm(self.n_items, generator=g).tolist()
        keep = self.steps_per_epoch * self.rows_per_step
        if not self.group_by_length:
            return perm[:keep]
        # Sort windows of the shuffled order by length so a step (and so each of its micro-batches, consecutive
        # in it) holds similar lengths, then shuffle the steps: a different order every epoch, but little padding.
        window = self.rows_per_step * _MEGABATCH
        grouped = []
        for s in range(0, len(perm), window):
            grouped += sorted(perm[s:s + window], key=lambda i: -self.lengths[i])
        steps = [grouped[s:s + self.rows_per_step] for s in range(0, keep, self.rows_per_step)]
        return [i for b in torch.randperm(len(steps), generator=g).tolist() for i in steps[b]]

    def batch_items(self, epoch: int, index: int, rank: int | None = None) -> list[int]:
        """The items of this rank's (or `rank`'s) micro-batch `index` in `epoch`."""
        if self._order_epoch != epoch:
            self._order_epoch, self._order = epoch, self.epoch_order(epoch)
        r = self.rank if rank is None else rank
        step, i = divmod(index, self.grad_accum)
        start = step * self.rows_per_step + (i * self.world_size + r) * self.batch_size
        return self._order[start:start + self.batch_size]

    def collate(self, items: list[int]) -> dict[str, torch.Tensor]:
        if self.packing:
            return collate_packed([pack_row([self.examples[i] for i in self.rows[it]], self.max_len, self.pad_id)
                                   for it in items], self.row_segments)
        return collate_padded([self.examples[i] for i in items], self.pad_id)

    # -- iteration and resumption -----------------------------------------------------------------------------

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        batch = self.collate(self.batch_items(self.epoch, self.index))
        self.index += 1
        if self.index == self.batches_per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
        return batch

    def state_dict(self) -> dict:
        """The position of the next optimizer step, plus what must match for it to mean the same thing on resume.

        Only between optimizer steps: the position counts whole steps, so that any split of the same rows per
        step (`rows_per_step`) continues from it."""
        step, rest = divmod(self.index, self.grad_accum)
        if rest:
            raise ValueError(f"the data stream is {rest} micro-batches into an optimizer step of {self.grad_accum}; "
                             "its position can be saved only between optimizer steps")
        return {"epoch": self.epoch, "epoch_step": step, "seed": self.seed, "n_items": self.n_items,
                "rows_per_step": self.rows_per_step, "packing": self.packing,
                "group_by_length": self.group_by_length}

    def load_state_dict(self, state: dict, saved_grad_accum: int | None = None, step: int | None = None) -> None:
        """Continue from `state` (a `state_dict`). `saved_grad_accum`, the saved run's accumulation, reads a
        state written before positions counted optimizer steps (see `_steps_state`). `step`, the optimizer steps
        the checkpoint says were taken, must be where the position is: each took one step of the stream."""
        if "rows_per_step" not in state:
            state = _steps_state(state, saved_grad_accum)
        mine = self.state_dict()
        if state.get("rows_per_step") != self.rows_per_step:
            raise ValueError(self._split_problem(state.get("rows_per_step")))
        diff = {k: (state.get(k), mine[k]) for k in mine if k not in ("epoch", "epoch_step")
                and state.get(k) != mine[k]}
        if diff:
            raise ValueError("cannot resume this data stream: the saved position belongs to a different setup ("
                             + ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in diff.items())
                             + "); use the same data, max_len, seed, packing and length grouping")
        epoch, at = state.get("epoch"), state.get("epoch_step")
        if not (type(epoch) is int and epoch >= 0 and type(at) is int and 0 <= at < self.steps_per_epoch):
            raise ValueError(f"cannot resume this data stream: the saved position, epoch {epoch!r} step {at!r}, "
                             f"is not an epoch >= 0 and a step in 0..{self.steps_per_epoch - 1}")
        if step is not None and epoch * self.steps_per_epoch + state["epoch_step"] != step:
            raise ValueError(f"epoch {epoch} epoch_step {state['epoch_step']} is not the position after step {step} "
                             f"of {self.steps_per_epoch} steps per epoch; the file was edited or damaged: resume "
                             "from another checkpoint")
        self.epoch, self.index = epoch, state["epoch_step"] * self.grad_accum

    def _split_problem(self, saved) -> str:
        """Why a position saved at `saved` rows per optimizer step cannot continue here, and a split that can."""
        processes = f"{self.world_size} process{'es' if self.world_size > 1 else ''}"
        now = f"{self.rows_per_step} (--batch-size {self.batch_size} x --grad-accum {self.grad_accum} x {processes})"
        if not isinstance(saved, int) or isinstance(saved, bool) or saved < 1:
            return (f"cannot resume this data stream: its rows per optimizer step are {saved!r}, expected a "
                    "positive integer")
        if saved % self.world_size:
            fix = f"run on a number of processes that divides {saved}"
        else:  # the largest micro-batch up to this run's that splits the step evenly: it fits in memory
            per_process = saved // self.world_size
            size = max(d for d in range(1, min(self.batch_size, per_process) + 1) if per_process % d == 0)
            fix = f"on {processes}, --batch-size {size} --grad-accum {per_process // size}"
        return (f"cannot resume this data stream: the checkpoint's optimizer steps took {saved} rows each, this "
                f"run's take {now}. Any split of {saved} rows per step (--batch-size x --grad-accum x processes) "
                f"continues it: {fix}")

    # -- accounting -------------------------------------------------------------------------------------------

    def padding_fraction(self, epoch: int = 0) -> float:
        """Fraction of the tokens an epoch feeds the model (all ranks) that are padding."""
        order = self.epoch_order(epoch)
        if self.packing:
            return padding_fraction(self.lengths, [self.rows[i] for i in order], self.max_len)
        return padding_fraction(self.lengths, [order[s:s + self.batch_size]
                                               for s in range(0, len(order), self.batch_size)])


def _steps_state(state: dict, grad_accum: int | None) -> dict:
    """A position saved before the stream dealt whole optimizer steps, as the step position it is, or an error.

    Those states count micro-batches of `global_batch_size` (batch_size x world_size) from an epoch cut into such
    batches, with steps of `grad_accum` of them that could run on into the next epoch. The rest of that run's
    order is the one dealt now only where the epoch holds whole steps of both units (then both drop the same
    tail) and, with length grouping, the grouping unit was the step already (grad_accum 1)."""
    if not all(isinstance(state.get(k), int) for k in ("index", "global_batch_size", "n_items")) \
            or state["global_batch_size"] < 1:
        return state  # not such a state either: refused by the checks that follow, naming what differs
    if not isinstance(grad_accum, int) or grad_accum < 1:
        raise ValueError("cannot resume this data stream: its position was saved by an earlier version, which "
                         "counted micro-batches, and the grad_accum it ran with is unknown")
    unit, index, n_items = state["global_batch_size"], state["index"], state["n_items"]
    same_order = ((n_items // unit) % grad_accum == 0 and index % grad_accum == 0
                  and not (state.get("group_by_length") and grad_accum > 1))
    if not same_order:
        raise ValueError(
            f"cannot resume this data stream: its position was saved by an earlier version that cut each epoch of "
            f"{n_items} rows into micro-batches of {unit} (batch_size x world_size), with grad_accum {grad_accum}"
            + (" and length grouping" if state.get("group_by_length") else "")
            + "; this version deals whole optimizer steps, and would not continue that run's order of the "
            "epoch. Resume it with the version of train.py that wrote it, or start a new run")
    rest = {k: v for k, v in state.items() if k not in ("index", "global_batch_size")}
    return {**rest, "epoch_step": index // grad_accum, "rows_per_step": unit * grad_accum}


def eval_batches(examples, batch_size: int, max_len: int, *, packing: bool = False, rank: int = 0,
                 world_size: int = 1, pad_id: int = 0):
    """Every example exactly once, in order, nothing dropped; micro-batch k goes to rank k % world_size.

    Packing uses next-fit in the given order, so rows hold consecutive examples. The last batch may be smaller,
    and ranks may get one batch more or less than each other.
    """
    lengths = [len(e) for e in examples]
    if packing:
        groups = plan_packing(lengths, max_len, sort=False)  # rows of consecutive examples
    else:
        if max(lengths, default=0) > max_len:
            raise ValueError(f"an example of {max(lengths)} tokens is longer than max_len={max_len}")
        groups = [[i] for i in range(len(examples))]
    # Checked above, batches made below on demand: errors surface at the call, tensors only when iterated.
    return _eval_iter(examples, groups, batch_size, max_len, packing, rank, world_size, pad_id)


def _eval_iter(examples, groups, batch_size, max_len, packing, rank, world_size, pad_id):
    row_segments = segments_per_row(groups) if packing else None
    for k, s in enumerate(range(0, len(groups), batch_size)):
        if k % world_size != rank:
            continue
        chunk = groups[s:s + batch_size]
        if packing:
            yield collate_packed([pack_row([examples[i] for i in g], max_len, pad_id) for g in chunk], row_segments)
        else:
            yield collate_padded([examples[g[0]] for g in chunk], pad_id)
