"""What a run tells its user: the progress line, metrics (metrics.jsonl, and the trackers of --report-to:
`training.trackers`), the summary table, loss.png and base vs fine-tuned samples."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

import lora
from data.dialogue import answer
from data.sources import AUTO, HOLDOUT_MAX, HOLDOUT_PERCENT, HUB_REPO, NONE, SPLIT_FILES
from tinyllama import Llama
from tinyllama.runtime import device_name, peak_memory_gib

from . import run_folder, trackers
from .run_folder import Totals
from .settings import TrainConfig

SAMPLE_PROMPTS = [
    "What is the difference between a list and a tuple in Python?",
    "Give me three tips for sleeping better.",
    "Write a haiku about the sea.",
]


class Metrics:
    """Where each metrics row goes: `metrics.jsonl` (the record that resume, plots and tests read), then each
    tracker of `training.trackers` (`--report-to`), under the TensorBoard tags (`train/loss`, `eval/ppl`, ...).
    Only the main process writes and reports; the others get a disabled instance.

    `logged_through`: the last step an earlier leg of this run logged (read before a resume trimmed
    metrics.jsonl). A W&B or MLflow run that the run continues gets no step up to it again; one that starts now
    first gets the rows metrics.jsonl already holds, so each tracker holds the whole run."""

    def __init__(self, out: Path, started: list = (), *, tensorboard: bool = False, settings: dict | None = None,
                 start_step: int = 0, logged_through: int = 0, enabled: bool = True, log=print):
        self.out, self.enabled, self.log, self.trackers = out, enabled, log, list(started)
        if not enabled:
            return
        if tensorboard:
            self.trackers.append(trackers.start_tensorboard(out, settings or {}, start_step))
        trackers.save_ids(out, self.trackers)
        self.skip_through = {t.name: logged_through if t.continues else 0 for t in self.trackers}
        earlier = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()] \
            if self.trackers and (out / "metrics.jsonl").is_file() else []
        for row in earlier:
            self._report(row, [t for t in self.trackers if t.name != "tensorboard"])

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        run_folder.append_metrics(self.out, row)
        self._report(row, self.trackers)

    def _report(self, row: dict, to: list) -> None:
        values = trackers.values_of(row)
        for tracker in to:
            if row["step"] > self.skip_through[tracker.name]:
                self._call(tracker, "log", values, row["step"])

    def _call(self, tracker, method: str, *args) -> None:
        """A tracker that fails is warned about once and dropped: the run goes on, metrics.jsonl holds it all."""
        try:
            getattr(tracker, method)(*args)
        except Exception as e:  # noqa: BLE001  (each tool raises its own kinds; none should stop the training)
            self.trackers.remove(tracker)
            self.log(f"warning: {tracker.name} failed ({type(e).__name__}: {str(e).strip()[:200]}); it gets nothing "
                     f"more from this run, which goes on (metrics.jsonl holds every value)")

    def close(self, summary: dict | None = None) -> None:
        """End each tracker's run, with the run's summary when it finished."""
        for tracker in list(self.trackers):
            if summary is None:
                self._call(tracker, "close")
            else:
                self._call(tracker, "finish", summary)
        self.trackers = []


def model_card(cfg: TrainConfig, totals: Totals, steps: int, command: str) -> lora.ModelCard:
    """What the adapter's README.md says about its run."""
    def named(spec: str) -> str:
        return ", ".join(f"{HUB_REPO} ({s} split)" if s.partition(":")[0] in SPLIT_FILES else s
                         for s in spec.split(","))

    eval_data = {AUTO: f"auto: {HOLDOUT_PERCENT}% of each local --data file held out (at most {HOLDOUT_MAX}, seed "
                       f"{cfg.seed}, never trained on); the guanaco test split for split names",
                 NONE: None}.get(cfg.eval_data.lower(), named(cfg.eval_data))
    return lora.ModelCard(train_data=named(cfg.data), eval_data=eval_data, steps=steps,
                          train_loss=totals.last_loss, eval_loss=totals.eval_loss, command=command)


def parameter_table(config, lora_config, ranks, shape: str, log) -> dict:
    """Trainable and total parameters per LoRA rank, for a model of `config`'s shape built on the meta device
    (nothing is allocated or downloaded)."""
    log(f"{'rank':>6} {'trainable':>14} {'total':>16} {'trainable %':>12}   ({shape}, targets "
        f"{','.join(lora_config.targets)}{', DoRA' if lora_config.use_dora else ''})")
    rows = []
    for r in ranks:
        with torch.device("meta"):
            m = Llama(config, lora_config=dataclasses.replace(lora_config, rank=r, alpha=float(r)))
        trainable, total = lora.count_parameters(m)
        log(f"{r:>6} {trainable:>14,} {total:>16,} {100 * trainable / total:>11.2f}%")
        rows.append({"rank": r, "trainable_params": trainable, "total_params": total})
    return {"rows": rows}


# A healthy adapter's weights stay near 1 in size (A starts within +-1/sqrt(in_features), B at 0, DoRA's
# magnitudes near the base rows' norms); far past this bound, the updates were far too large.
LARGEST_SANE_WEIGHT = 100.0
# Steps in a row with the same loss (training.run_folder.FLAT_LOSS) that mean the model stopped learning.
STUCK_STEPS = 3


def largest_weight(params) -> float:
    """The largest absolute value among the trainable weights (reads them from the device once)."""
    return max((p.detach().abs().max().item() for p in params if p.numel()), default=0.0)


def health_warnings(t, largest: float) -> list[str]:
    """What says a run that ended without an error learned nothing: a loss stuck at one value, exploded weights."""
    warnings = []
    if t.flat_steps >= STUCK_STEPS:
        warnings.append(f"the loss was {t.last_loss:.4f} on each of the last {t.flat_steps + 1} steps, on different "
                        "batches: the model's output no longer depends on its input, and the adapter learns nothing; "
                        "lower --lr (or --alpha)")
    if not largest <= LARGEST_SANE_WEIGHT:  # also NaN
        warnings.append(f"the largest adapter weight is {largest:.3g} (a trained adapter's stay near 1): the updates "
                        "were far too large; lower --lr (or --alpha)")
    return warnings


def summary(t, *, trainable: int, total: int, steps: int, flops_per_token: float, peak_flops: float,
            device: torch.device, world: int, out: Path, largest_weight: float, param_bytes: int = 0) -> dict:
    """summary.json: the reference table's columns and what else describes the whole run (`t`: its Totals)."""
    per_s = (lambda n: n / t.seconds) if t.seconds else (lambda n: None)
    return {
        "training_time_s": t.seconds, "trainable_params": trainable, "total_params": total,
        "trainable_percent": 100 * trainable / total, "steps": steps, "tokens_per_s": per_s(t.tokens),
        "labelled_tokens_per_s": per_s(t.labelled),
        "mfu": per_s(t.tokens * flops_per_token / peak_flops / world) if t.seconds else None,
        "peak_flops": peak_flops, "peak_gib": peak_memory_gib(device), "first_loss": t.first_loss,
        "last_loss": t.last_loss, "eval_loss": t.eval_loss, "eval_ppl": t.eval_ppl,
        "device": device_name(device), "world_size": world, "param_bytes_per_process": param_bytes,
        "out": str(out),
        "warnings": health_warnings(t, largest_weight),
    }


def print_summary(s: dict, log) -> None:
    log("\n| Training Time (s) | Trainable Params | Total Params | Trainable % | tokens/s | MFU | peak GiB |")
    log("|---|---|---|---|---|---|---|")
    peak = f"{s['peak_gib']:.2f}" if s["peak_gib"] is not None else "n/a (cpu)"
    log(f"| {s['training_time_s']:.2f} | {s['trainable_params']:,} | {s['total_params']:,} | "
        f"{s['trainable_percent']:.2f} | {s['tokens_per_s']:,.0f} | {100 * s['mfu']:.1f}% | {peak} |")
    log(f"loss {s['first_loss']:.4f} -> {s['last_loss']:.4f}"
        + (f"; eval loss {s['eval_loss']:.4f}" if s["eval_loss"] is not None else "")
        + (f" (ppl {s['eval_ppl']:.2f})" if s["eval_ppl"] is not None else "")
        + f"; adapter saved to {s['out']}/adapter")
    for warning in s["warnings"]:
        log(f"warning: {warning}")


def plot_losses(out: Path, log=print) -> None:
    """loss.png of train and eval loss, when matplotlib is installed (an optional extra). A plot that cannot be
    written (a full disk) is a warning: the run's adapter and summary are saved by then."""
    # A bare Figure, not pyplot: pyplot's import sets up a GUI backend and a figure manager a file never needs,
    # and a Figure saves to PNG through Agg by itself (no global backend switch, nothing to close).
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    for split in ("train", "eval"):
        pts = [(r["step"], r["loss"]) for r in rows if r["split"] == split]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o" if split == "eval" else None, label=split)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    run_folder.claim(out, "loss.png")
    try:
        # The default margins hold the labels and legend of this one plot; bbox_inches="tight" would draw it twice.
        fig.savefig(out / "loss.png", dpi=120)
    except OSError as e:
        with contextlib.suppress(OSError):  # a cut-off image is no plot
            (out / "loss.png").unlink(missing_ok=True)
        log(f"warning: could not write {out / 'loss.png'} ({e.strerror or e}); the adapter, summary.json and "
            "metrics.jsonl are saved, and the plot is only drawn from metrics.jsonl")
    else:
        run_folder.record(out, "loss.png")


def show_samples(model, tokenizer, out: Path, log, template=None, max_new_tokens: int = 96) -> None:
    """Answers of the base and the fine-tuned model to fixed prompts through the training's chat template, side
    by side (also samples.md)."""
    lines = ["# Base vs fine-tuned (greedy)", ""]
    for prompt in SAMPLE_PROMPTS:
        with lora.disabled(model):
            base = answer(model, tokenizer, prompt, max_new_tokens=max_new_tokens, template=template)
        tuned = answer(model, tokenizer, prompt, max_new_tokens=max_new_tokens, template=template)
        lines += [f"## {prompt}", "", "**base:** " + base.strip(), "", "**fine-tuned:** " + tuned.strip(), ""]
    text = "\n".join(lines)
    run_folder.claim(out, "samples.md")
    run_folder.write_text(out / "samples.md", text)
    log("\n" + text)


class Progress:
    """A one-line progress bar (loss, lr, tokens/s, ETA) on a terminal; plain log lines otherwise."""

    def __init__(self, total: int, start: int, enabled: bool):
        self.total, self.start, self.enabled = total, start, enabled
        self.tty = sys.stderr.isatty()
        self.t0 = time.perf_counter()
        self.every = max(1, total // 20)

    def update(self, step, loss, lr, tokens_per_s):
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / (step - self.start) * (self.total - step)
        width = 30
        bar = "#" * int(width * step / self.total)
        line = (f"[{bar:<{width}}] {step}/{self.total} loss {loss:.4f} lr {lr:.2e} "
                f"{tokens_per_s:,.0f} tok/s ETA {eta:,.0f}s")
        if self.tty:
            print("\r" + line, end="", file=sys.stderr, flush=True)
        elif step % self.every == 0 or step == self.total or step == self.start + 1:
            print(line, file=sys.stderr, flush=True)

    def note(self, text):
        if self.enabled:
            print(("\n" if self.tty else "") + text, file=sys.stderr, flush=True)

    def close(self):
        if self.enabled and self.tty:
            print(file=sys.stderr)
