"""The pieces of one optimizer step that `train.py`'s loop puts together.

The host never waits for the GPU inside a step. Batches are copied from pinned memory with their labelled
positions found on the CPU (`prepare`); a step's numbers (loss, grad norm, time) stay on the device in a
`QueuedStep` and are read (`read_step`) only after the next step has been queued, so the CPU prepares step n+1
while the GPU runs step n. A non-finite loss or gradient norm must still stop the run before its update: a flag
set on the device makes the optimizer skip that update and every later one (`skip_updates_when`), and the host
raises when it reads that step, one step later, with the weights as they were before the bad step.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from tinyllama.loss import IGNORE_INDEX, causal_lm_loss, label_positions
from tinyllama.runtime import RuntimePlan, peak_memory_gib

from . import TrainingError, parallel, report, run_folder
from .run_folder import Totals

# What of a batch goes to the model (the rest is for the loss or for counting: `document_ids` marks the padding
# of packed rows on the host; the model reads packed rows from `cu_seqlens`).
MODEL_INPUTS = ("position_ids", "attention_mask", "cu_seqlens")


def real_token_count(batch) -> int:
    """Tokens that are not padding (counted on the CPU copy, before `prepare` may drop the mask)."""
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    return int(batch["document_ids"].ge(0).sum()) if "document_ids" in batch else batch["input_ids"].numel()


def prepare(batch, device):
    """Move what the model and the loss read of a micro-batch to `device`, dropping the attention mask where it
    cannot change the loss.

    Padded batches are right-padded, so under the causal mask no real token ever sees a pad: the mask only
    changes the outputs at pad positions, which carry no label and predict nothing. Without it SDPA runs its
    mask-free causal kernel (flash attention on GPU). tests/test_train.py checks loss and gradients agree.
    The labelled positions are found here, on the CPU copy (`label_index`), so the loss never makes the host
    wait for the GPU; on CUDA the batch is copied from pinned memory, without blocking the host either.
    """
    batch = {k: v for k, v in batch.items() if k in ("input_ids", "labels", *MODEL_INPUTS)}
    if "attention_mask" in batch and is_right_padded(batch["attention_mask"]):
        del batch["attention_mask"]
    batch["label_index"] = label_positions(batch["labels"])
    if device.type == "cuda":
        return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}
    return {k: v.to(device) for k, v in batch.items()}


def is_right_padded(attention_mask: torch.Tensor) -> bool:
    """True when every row is ones then zeros (checked on the CPU copy, before the batch moves)."""
    m = attention_mask.bool()
    return bool((m[:, 1:] <= m[:, :-1]).all())


def batch_loss(model, batch):
    """(loss sum, labelled-token count) of a micro-batch."""
    inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
    return causal_lm_loss(model, batch["input_ids"], batch["labels"], label_index=batch.get("label_index"),
                          **inputs)


def skip_updates_when(optimizer: torch.optim.Optimizer, flag: torch.Tensor) -> None:
    """Make `optimizer.step()` a no-op on the device once `flag` (a 0-d tensor there) is non-zero.

    It uses `found_inf`, the hook torch.amp.GradScaler sets and that only the fused AdamW kernel reads: any
    other optimizer would ignore it silently and apply the bad update, so anything else is refused.
    """
    if not (isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults.get("fused")):
        raise TypeError(f"skip_updates_when needs torch.optim.AdamW(..., fused=True), got {optimizer!r}")
    optimizer.found_inf = flag


class Timer:
    """One step's time: CUDA events on GPU (`stop` records without waiting; `elapsed` waits for the step to
    finish), wall clock on CPU."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        self.start()

    def start(self) -> None:
        if self.cuda:
            self._start = torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._t0 = time.perf_counter()

    def stop(self) -> None:
        if self.cuda:
            self._end = torch.cuda.Event(enable_timing=True)
            self._end.record()
        else:
            self._seconds = time.perf_counter() - self._t0

    def elapsed(self) -> float:
        if self.cuda:
            self._end.synchronize()
            return self._start.elapsed_time(self._end) / 1000
        return self._seconds


@dataclass
class QueuedStep:
    """An optimizer step whose work is queued on the device; `read_step` turns it into numbers."""
    step: int  # 1-based: the number of optimizer steps done once it finishes
    numbers: torch.Tensor  # [loss sum, grad norm], on the device
    timer: Timer
    lr: float
    n_tokens: float  # real (non-pad) tokens, all processes
    n_labelled: float  # labelled tokens, all processes
    epoch: int
    loss_count: float | None = None  # what numbers[0] is divided by (None: n_labelled; 1: it is the loss already)
    metric_names: tuple[str, ...] = ()  # numbers[2:], already means (a preference step's rewards, ...)


def read_step(q: QueuedStep, out: Path | None = None) -> dict:
    """Wait for a queued step (that step only) and return its metrics row; a non-finite one raises, naming the
    last good checkpoint in `out` (looked up only then: the output folder is not read every step)."""
    loss_sum, norm, *extra = q.numbers.tolist()
    loss = loss_sum / (q.n_labelled if q.loss_count is None else q.loss_count)
    if not (math.isfinite(loss) and math.isfinite(norm)):
        what = (f"loss is {loss}" if not math.isfinite(loss) else
                f"gradient norm is {norm} (the loss, {loss:.4f}, is finite; clipping would zero the update)")
        saved = None
        with contextlib.suppress(TrainingError):  # a `latest` that is refused names no checkpoint here
            saved = run_folder.find_checkpoint(out) if out is not None else None
        raise TrainingError(f"{what} at step {q.step}: stopping before the update. Last good checkpoint: "
                            f"{saved or 'none (use --save-every)'}. Try a lower --lr (or --alpha).")
    seconds = q.timer.elapsed()
    return {"step": q.step, "split": "train", "loss": loss, "lr": q.lr, "tokens_per_s": q.n_tokens / seconds,
            "labelled_tokens_per_s": q.n_labelled / seconds, "step_s": seconds, "grad_norm": norm,
            "epoch": q.epoch, "tokens": q.n_tokens, "labelled": q.n_labelled,
            **dict(zip(q.metric_names, extra, strict=True))}


def evaluate(model, batches, plan, lockstep: bool = False) -> tuple[float, float]:
    """Loss and perplexity over `batches` (each process its share of the eval set, summed over processes), run as
    `plan` (a runtime.RuntimePlan) says. `lockstep` (a sharded model, whose every forward pass is a collective):
    a process with fewer batches than another runs forward passes over one unlabelled token until they match."""
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=plan.device)
    batches = list(batches)
    if lockstep:
        most = int(parallel.all_reduce_max(torch.tensor(float(len(batches)), device=plan.device)).item())
        empty = {"input_ids": torch.zeros(1, 1, dtype=torch.long), "labels": torch.full((1, 1), IGNORE_INDEX)}
        batches += [empty] * (most - len(batches))
    with torch.no_grad(), plan.forward():
        for batch in batches:
            loss_sum, n = batch_loss(model, prepare(batch, plan.device))
            total[0] += loss_sum.double()
            total[1] += n
    model.train()
    loss_sum, n = parallel.all_reduce_sum(total).tolist()
    loss = loss_sum / max(n, 1)
    return loss, math.exp(min(loss, 50))


def finish_step(q: QueuedStep, run: Run, log_every: int, proc, out, progress) -> None:
    """The host side of a queued step of `run`: read its numbers (waits for that step only), check,
    count, and log them to the progress line and, every `log_every` steps, to `run.metrics`."""
    row = read_step(q, out if proc.main else None)
    run.totals.add(row)
    if q.metric_names:
        run.last_metrics = {name: row[name] for name in q.metric_names}
    progress.update(q.step, row["loss"], q.lr, row["tokens_per_s"])
    if q.step % max(log_every, 1) == 0 or q.step == run.total_steps or q.step == run.start_step + 1:
        row["mfu"] = q.n_tokens * run.flops_per_token / row["step_s"] / run.peak_flops / proc.world
        row["peak_gib"] = peak_memory_gib(proc.device)
        run.metrics.write(row)


@dataclass
class Run:
    """What `train.load_run` loads before the first step, and what each step reads and updates."""
    model: torch.nn.Module
    tokenizer: object | None  # tinyllama.Tokenizer or BPETokenizer (see load_tokenizer)
    stream: object  # data.BatchStream
    eval_examples: list
    optimizer: torch.optim.Optimizer
    plan: RuntimePlan
    total_steps: int
    start_step: int
    totals: Totals
    flops_per_token: float
    peak_flops: float
    template: object | None = None  # data.Template the conversations were rendered with (None: random data)
    param_bytes: int = 0  # parameters and buffers held by the largest process (after sharding, under --fsdp)
    evaluates: bool = False  # the run has evaluation examples (this process's share, eval_examples, may be empty)
    metrics: report.Metrics | None = None  # set once the output folder is ready
    reference: object | None = None  # training.preference.Reference of a dpo or ipo run
    last_metrics: dict | None = None  # a preference run's last step's metrics, for summary.json
