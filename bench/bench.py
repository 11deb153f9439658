"""`make bench`: the reference LoRA rank table from the real training loop, side by side with transformers + peft.

The reference table gives training time and trainable/total parameters per LoRA rank; this adds throughput, MFU
and memory, and the same for transformers + peft. Run from the repository root:

    python -m bench.bench                      # this project: W1 at ranks 4/16/64/256, W2 padded/packed at 64
    python -m bench.bench --baseline hf        # plus transformers + peft: eager, torch.compile, Liger-Kernel
    python -m bench.bench --combine a.json b.json --name gpu   # one table from several results files

Every run of this project is `train.train` (128 optimizer steps by default, one micro-batch each, on random
weights of the model's shape: `--random-init`); the baseline is `bench.hf_baseline` on the same batches. The
tokens train.py counted are checked against a replay of the same batches, so both systems are measured on what
they really saw. On CUDA the shape is TinyLlama-1.1B; on a CPU it is a scaled-down configuration (see
`bench.workloads`) with fewer steps, and the table's title says so. Workloads W1 (random ids) and W2
(guanaco-shaped, prompt-masked; padded, packed, and packed in longer rows) are described in `bench.workloads`.

The transformers + peft configurations (`--baseline hf`, all at the focus rank, in this process, on the same
workloads): `hf-eager` (SDPA attention), `hf-compile` (the same under `torch.compile`) and `hf-liger` (the same
with Liger-Kernel's Llama kernels, CUDA only; on a CPU it is skipped with a note). On W2-packed they train
padding-free on this project's packed rows (see `bench.hf_baseline`); on W2-padded they pad to the longest of a
shuffled micro-batch. Every ratio in the report is against the best of them on the same workload family.

What the columns mean:
- Training Time (s) / `seconds`: the sum of the step times of all steps, the first (warm-up, compilation) ones
  included, as the reference table reports it. A step is timed as `train.py` times it: host-to-device copy,
  forward, backward, clip, optimizer step (CUDA events on GPU, wall clock on CPU); building the model and the
  batches is not timed.
- tokens/s: steady state, over the steps after the first `--warmup-steps`, counting real (non-pad) tokens only,
  so for W2 it is *useful* tokens/s. `tokens_per_s_all` in the JSON is over all steps.
- MFU: tokens/s x FLOPs per token / the matmul peak measured at the start of the same run (a large bf16 matmul
  on CUDA, fp32 on CPU where training runs in fp32). FLOPs per token are `tinyllama.flops.
  training_flops_per_token` (frozen-base LoRA: 4 x matmul weights for forward and input-gradient backward,
  attention at the row length, 6 x r x (in + out) per adapter); both numbers are printed.
- peak memory: `torch.cuda.max_memory_allocated` from just before the first step (weights included); n/a on CPU.
- first step (s): from the start of `train.train` (or of the baseline's run) to the end of its first optimizer
  step, the device synchronised: building the model, compiling it, and the first step. For a compiled run this is
  the compile warm-up.

Results go to `--out-dir` (default bench/results) as `<device>-<date>.md` and `.json`, rewritten after every
run, so an interrupted benchmark keeps what it measured; `bench.tables` renders them and checks the targets.

transformers and peft are imported only for `--baseline hf` and the decode benchmark (skipped with a note when
they are missing): `make bench` needs the runtime dependencies only.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import fnmatch
import json
import os
import platform
import re
import shlex
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

import train
from bench import decode_bench, hf_baseline, tables
from bench import workloads as wl
from data import BatchStream, encode_all, load_conversations
from data.stats import DEFAULT_TOKENIZER as TOKENIZER
from data.synthetic import random_examples
from lora import LoRAConfig
from tinyllama import LlamaConfig, Tokenizer
from tinyllama.flops import measure_matmul_peak, training_flops_per_token
from tinyllama.runtime import device_name as describe_device
from tinyllama.runtime import resolve_device
from training.settings import setting_type
from training.step import real_token_count

RESULTS_DIR = Path(__file__).resolve().parent / "results"
SYSTEMS = ("this", "this-compile", "hf-eager", "hf-compile", "hf-liger")
HF_SYSTEMS = ("hf-eager", "hf-compile", "hf-liger")  # what --baseline hf runs
HF_WORKLOADS = "W1,W2-padded,W2-packed"
CPU_STEPS = 32  # CPU default: 8 runs x 32 steps of the scaled-down shape take about 3 minutes on 2 cores
CPU_DECODE_ARGS = ["--new-tokens", "16", "--repeats", "2"]  # decode_bench's defaults take ~4 minutes on 2 cores


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.bench", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--shape", default="auto", choices=["auto", *wl.BENCH_SHAPES],
                   help="model shape: auto = full on CUDA, the scaled-down cpu shape on CPU")
    p.add_argument("--ranks", default="4,16,64,256", help="LoRA ranks of the W1 rank table (alpha = rank)")
    p.add_argument("--focus-rank", type=int, default=64, help="the rank W2 and the baselines run at")
    p.add_argument("--steps", type=int, default=0, help=f"optimizer steps per run (0: 128 on CUDA, {CPU_STEPS} on CPU)")
    p.add_argument("--warmup-steps", type=int, default=-1,
                   help="first steps left out of steady-state tokens/s (-1: min(5, steps // 4))")
    p.add_argument("--workloads", default=",".join(wl.WORKLOADS), help=f"comma-separated: {','.join(wl.WORKLOADS)}")
    p.add_argument("--baseline", default="none", choices=["none", "hf"],
                   help=f"hf: also run transformers + peft ({', '.join(HF_SYSTEMS)})")
    p.add_argument("--systems", default="",
                   help=f"comma-separated subset of {','.join(SYSTEMS)} (overrides --baseline; this-compile is "
                        "this project with --compile, at the focus rank)")
    p.add_argument("--hf-workloads", default=HF_WORKLOADS, help="workloads transformers + peft eager runs")
    p.add_argument("--hf-compile-workloads", default="",
                   help="workloads transformers + peft under torch.compile runs (default: --hf-workloads)")
    p.add_argument("--hf-liger-workloads", default="",
                   help="workloads transformers + peft with Liger-Kernel runs (default: --hf-workloads)")
    p.add_argument("--run-steps", default="", metavar="PATTERN=N,...",
                   help="other step counts for some runs: PATTERN is SYSTEM:WORKLOAD, or a system or a workload "
                        "alone, with * wildcards (e.g. 'W2-packed-4096=64,hf-*:W2-padded=64'); the last "
                        "pattern that matches a run sets its steps")
    p.add_argument("--this-compile-workloads", default="W1", help="workloads this-compile runs")
    p.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE;KEY=VALUE",
                   help="also run this project with these train.py settings (TrainConfig fields, e.g. "
                        "'whole:compile=true;compile_scope=model'), at the focus rank on --variant-workloads; "
                        "its rows are system 'this[NAME]'. Repeatable")
    p.add_argument("--variant-workloads", default="W1", help="workloads the --variant runs use")
    p.add_argument("--dropout", type=float, default=0.05)
    p.add_argument("--w2-data", default="auto",
                   help="guanaco .jsonl for W2; auto: the eval split if cached locally (full shape), else synthetic")
    p.add_argument("--decode", action=argparse.BooleanOptionalAction, default=True,
                   help="also run the decode benchmark, bench.decode_bench (needs transformers; skipped with a "
                        "note without it)")
    p.add_argument("--decode-args", default="",
                   help="arguments for bench.decode_bench (default: --full on CUDA, "
                        f"{' '.join(CPU_DECODE_ARGS)} on CPU)")
    p.add_argument("--out-dir", default=str(RESULTS_DIR))
    p.add_argument("--name", default="", help="results file stem (default <device>-<date>)")
    p.add_argument("--note", default="", help="a line for the results' Setup section (with --combine: where "
                                              "each part's rows come from)")
    p.add_argument("--combine", nargs="+", default=None, metavar="JSON",
                   help="render one table from these results files instead of running anything")
    return p.parse_args(argv)


@dataclass
class BenchContext:
    """What every run of one benchmark shares: where and in what precision it runs, the model shape, the step
    counts, the files train.py reads, and the matmul peak MFU is measured against."""
    device: torch.device
    dtype: torch.dtype
    device_name: str
    config: LlamaConfig
    steps: int  # per run, unless run_steps says otherwise
    warmup: int  # steps left out of steady-state tokens/s
    dropout: float
    peak_flops: float
    tmp: Path  # each run's output folder goes here
    model_dir: Path  # config.json only: train.py builds random weights of this shape (--random-init)
    w2_path: Path | None  # the guanaco .jsonl W2 reads; None when no W2 workload runs
    run_steps: list[tuple[str, int]] = field(default_factory=list)  # (pattern, steps) from --run-steps
    examples: dict[tuple, list] = field(default_factory=dict)  # examples_for's cache


def parse_run_steps(spec: str) -> list[tuple[str, int]]:
    """'PATTERN=N,PATTERN=N' -> [(PATTERN, N)] (see --run-steps)."""
    out = []
    for item in filter(None, (x.strip() for x in spec.split(","))):
        pattern, _, n = item.rpartition("=")
        if not pattern or not n.isdigit() or int(n) < 1:
            raise SystemExit(f"bench.py: --run-steps {spec!r}: expected PATTERN=N (N >= 1), got {item!r}")
        out.append((pattern, int(n)))
    return out


def steps_for(system: str, workload: str, ctx: BenchContext) -> int:
    """This run's optimizer steps: --steps, or the last --run-steps pattern that matches it."""
    def match(name, pattern):  # exact first: a system such as this[plain] is not a character class
        return name == pattern or fnmatch.fnmatchcase(name, pattern)

    steps = ctx.steps
    for pattern, n in ctx.run_steps:
        if ":" in pattern:
            sys_pattern, _, work_pattern = pattern.partition(":")
            hit = match(system, sys_pattern) and match(workload, work_pattern)
        else:
            hit = match(system, pattern) or match(workload, pattern)
        steps = n if hit else steps
    return steps


class FirstStep:
    """Seconds from entering the block to the end of the first optimizer step taken in it, the device
    synchronised then: a global optimizer step hook, so `train.train` is timed as it runs, unchanged."""

    def __init__(self, device: torch.device):
        self.device, self.seconds = device, None

    def __enter__(self):
        from torch.optim.optimizer import register_optimizer_step_post_hook

        self.t0 = time.perf_counter()
        self.handle = register_optimizer_step_post_hook(self.hook)
        return self

    def hook(self, optimizer, args, kwargs) -> None:
        if self.seconds is None:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.seconds = time.perf_counter() - self.t0

    def __exit__(self, *exc):
        self.handle.remove()


# ---- measuring ----------------------------------------------------------------------------------------------

def steady(step_s: list[float], tokens: list[int], warmup: int) -> tuple[float, int]:
    """(seconds, tokens) of the steps after the first `warmup` (all steps if there are no more than that)."""
    w = warmup if len(step_s) > warmup else 0
    return sum(step_s[w:]), sum(tokens[w:])


def replay(examples, w: wl.Workload, steps: int, seed: int = 0) -> dict[str, list[int]]:
    """Token counts of the first `steps` micro-batches `train.py` (or the baseline) draws for this workload:
    the same BatchStream, so the same batches."""
    stream = BatchStream(examples, w.batch_size, w.max_len, packing=w.packing,
                         group_by_length=w.group_by_length and not w.packing, seed=seed)
    out = {"tokens": [], "labelled": [], "positions": []}
    for _ in range(steps):
        b = next(stream)
        out["tokens"].append(real_token_count(b))
        out["labelled"].append(wl.labelled_count(b))
        out["positions"].append(b["input_ids"].numel())
    return out


def make_row(system: str, work: wl.Workload, rank: int, step_s: list[float], counts: dict[str, list[int]], *,
             ctx: BenchContext, trainable: int, total: int, peak_gib: float | None, compile: bool,
             losses: list[float], wall_s: float, leftover_gib: float | None, first_step_s: float | None) -> dict:
    """One results row: times, real-token throughput, MFU and memory of a run, with what it ran."""
    steps = len(step_s)
    sec, tok = steady(step_s, counts["tokens"], ctx.warmup)
    w = ctx.warmup if steps > ctx.warmup else 0
    _, lab = steady(step_s, counts["labelled"], ctx.warmup)
    tokens_per_s = tok / sec if sec else None
    fpt = training_flops_per_token(ctx.config, LoRAConfig(rank=rank, alpha=float(rank)), work.max_len)
    return {
        "system": system, "workload": work.name, "rank": rank, "alpha": float(rank), "steps": steps,
        "warmup_steps": w, "seconds": sum(step_s), "steady_seconds": sec,
        "step_ms": 1000 * sec / max(1, steps - w),
        "step_ms_median": 1000 * statistics.median(step_s[w:]) if step_s else None,
        "step_s": step_s,
        "tokens": sum(counts["tokens"]), "tokens_per_s": tokens_per_s,
        "tokens_per_s_all": sum(counts["tokens"]) / sum(step_s) if sum(step_s) else None,
        "labelled_tokens_per_s": lab / sec if sec else None,
        "padding_fraction": 1 - sum(counts["tokens"]) / sum(counts["positions"]),
        "mfu": tokens_per_s * fpt / ctx.peak_flops if tokens_per_s else None,
        "flops_per_token": fpt, "peak_flops": ctx.peak_flops, "peak_gib": peak_gib, "leftover_gib": leftover_gib,
        "trainable_params": trainable, "total_params": total, "trainable_percent": 100 * trainable / total,
        "device": ctx.device_name, "dtype": str(ctx.dtype).replace("torch.", ""), "compile": compile,
        "batch_size": work.batch_size, "max_len": work.max_len, "packing": work.packing,
        "group_by_length": work.group_by_length, "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None, "wall_s": wall_s, "first_step_s": first_step_s,
        "load_avg": load_avg(),
    }


def load_avg() -> float | None:
    """The 1-minute load average when the run ended: other work on the machine slows a CPU measurement."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def allocated_gib(device: torch.device) -> float | None:
    return torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else None


BATCH_FIELDS = ("data", "batch_size", "grad_accum", "max_len", "steps", "packing", "group_by_length", "seed")


def parse_variant(spec: str) -> tuple[str, dict]:
    """'NAME:key=value;key=value' -> (NAME, TrainConfig overrides typed as the fields are)."""
    name, _, body = spec.partition(":")
    fields = [f.name for f in dataclasses.fields(train.TrainConfig)]
    overrides = {}
    for item in filter(None, body.split(";")):
        key, _, value = (part.strip() for part in item.partition("="))
        if not name or key not in fields:
            raise SystemExit(f"bench.py: --variant {spec!r}: expected NAME:key=value;... with TrainConfig fields "
                             f"({', '.join(fields)}); {key!r} is not one")
        if key in BATCH_FIELDS:
            raise SystemExit(f"bench.py: --variant {spec!r}: {key} changes the batches; a variant changes how a "
                             f"step runs, not what it holds (choose the batching with --workloads)")
        kind = setting_type(train.TrainConfig, key)
        overrides[key] = value.lower() in ("1", "true", "yes") if kind is bool else kind(value)
    return name, overrides


def run_this(w: wl.Workload, rank: int, *, ctx: BenchContext, compile: bool = False,
             variant: tuple[str, dict] | None = None) -> dict:
    """One run of the real training loop (`train.train`) and its row; `variant`: (name, TrainConfig overrides)."""
    overrides = dict(variant[1]) if variant else {}
    compile = overrides.pop("compile", compile)
    system = f"this[{variant[0]}]" if variant else "this-compile" if compile else "this"
    steps = steps_for(system, w.name, ctx)
    name = f"this-{w.name}-r{rank}{'-compile' if compile else ''}{'-' + variant[0] if variant else ''}"
    out = ctx.tmp / name
    data = f"random:{steps * w.batch_size}" if w.name == "W1" else str(ctx.w2_path)
    settings = dict(
        model=str(ctx.model_dir), random_init=True, data=data, eval_data="none", tokenizer=str(TOKENIZER),
        rank=rank, alpha=float(rank), dropout=ctx.dropout, batch_size=w.batch_size, grad_accum=1,
        max_len=w.max_len, steps=steps, packing=w.packing, group_by_length=w.group_by_length, samples=False,
        log_every=1, eval_every=0, save_every=0, out=str(out), overwrite=True, device=str(ctx.device), dtype="auto",
        compile=compile, seed=0)
    cfg = train.TrainConfig(**{**settings, **overrides})
    leftover = allocated_gib(ctx.device)
    t0 = time.perf_counter()
    with FirstStep(ctx.device) as first:
        summary = train.train(cfg)
    wall = time.perf_counter() - t0
    hf_baseline.release(compile)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    metrics = [m for m in metrics if m["split"] == "train"]
    if [m["step"] for m in metrics] != list(range(1, steps + 1)):
        raise RuntimeError(f"{out}/metrics.jsonl does not hold one train row per step (log_every=1)")
    counts = replay(examples_for(w, ctx, steps), w, steps)
    counted = summary["tokens_per_s"] * summary["training_time_s"]
    if abs(counted - sum(counts["tokens"])) > 0.5 + 1e-6 * counted:
        raise RuntimeError(f"{name}: train.py counted {counted:.0f} real tokens, the replayed batches hold "
                           f"{sum(counts['tokens'])}: the benchmark no longer builds the batches train.py does")
    return make_row(system, w, rank, [m["step_s"] for m in metrics], counts,
                    ctx=ctx, trainable=summary["trainable_params"], total=summary["total_params"],
                    peak_gib=summary["peak_gib"], compile=compile, losses=[m["loss"] for m in metrics],
                    wall_s=wall, leftover_gib=leftover, first_step_s=first.seconds)


def run_hf(system: str, w: wl.Workload, rank: int, *, ctx: BenchContext) -> dict:
    """One run of a transformers + peft configuration on the same examples, batched its usual way (packed rows
    padding-free), and its row."""
    hw = wl.baseline_workload(w)
    steps = steps_for(system, w.name, ctx)
    stream = BatchStream(examples_for(w, ctx, steps), hw.batch_size, hw.max_len, packing=hw.packing,
                         group_by_length=hw.group_by_length, seed=0)
    lora_config = LoRAConfig(rank=rank, alpha=float(rank), dropout=ctx.dropout)
    compile = system == "hf-compile"
    leftover = allocated_gib(ctx.device)
    t0 = time.perf_counter()
    try:
        r = hf_baseline.run(ctx.config, lora_config, stream, steps, ctx.device, ctx.dtype, compile=compile,
                            liger=system == "hf-liger")
    except ImportError as e:
        if system != "hf-liger":
            raise
        raise RuntimeError(f"Liger-Kernel cannot be imported ({e}); bench/gpu_check.sh installs "
                           "bench/wheels/liger_kernel-*.whl onto PYTHONPATH") from e
    wall = time.perf_counter() - t0
    return make_row(system, hw, rank, r["step_s"], r, ctx=ctx, trainable=r["trainable_params"],
                    total=r["total_params"], peak_gib=r["peak_gib"], compile=compile, losses=r["losses"],
                    wall_s=wall, leftover_gib=leftover, first_step_s=r["first_step_s"])


def examples_for(w: wl.Workload, ctx: BenchContext, steps: int | None = None) -> list:
    """The examples train.py builds for this workload and step count (cached): W1's random rows, one per
    sequence of the run; W2's conversations, each cut at the row length or the model's context, whichever is
    shorter, as train.py cuts them."""
    if w.name == "W1":
        n = (steps or ctx.steps) * w.batch_size
        key = ("W1", w.max_len, n)
        if key not in ctx.examples:
            ctx.examples[key] = random_examples(n, w.max_len, ctx.config.vocab_size, seed=0)
        return ctx.examples[key]
    cut = min(w.max_len, ctx.config.max_position_embeddings)
    key = ("W2", cut)
    if key not in ctx.examples:
        ctx.examples[key], _ = encode_all(load_conversations(str(ctx.w2_path)), Tokenizer(TOKENIZER), cut)
    return ctx.examples[key]


def padding_report(w: wl.Workload, ctx: BenchContext) -> dict:
    """Padding fraction of an epoch of the W2 data in each batching mode (data.BatchStream.padding_fraction)."""
    ex = examples_for(w, ctx)
    modes = {"pad-to-longest": dict(group_by_length=False), "length-grouped": dict(group_by_length=True),
             "packed": dict(packing=True)}
    return {k: BatchStream(ex, w.batch_size, w.max_len, seed=0, **v).padding_fraction() for k, v in modes.items()}


# ---- the plan and the run -----------------------------------------------------------------------------------

def plan(args, ranks: list[int], names: list[str], systems: list[str]) -> list[tuple[str, str, int]]:
    """(system, workload, rank) in run order: eager runs first, compiled ones after them (compilation leaves
    worker processes and caches behind that should not overlap an eager measurement), then hf-liger:
    Liger-Kernel patches transformers' Llama classes for the whole process (`hf_baseline.liger_kernels` puts
    them back afterwards), so it runs after every other transformers + peft run, where even a patch left behind
    could not change another's measurement. The --variant runs come last."""
    def pick(spec):
        return [n for n in spec.split(",") if n in names]

    runs = []
    if "this" in systems:
        runs += [("this", "W1", r) for r in ranks if "W1" in names]
        runs += [("this", n, args.focus_rank) for n in names if n != "W1"]
    if "hf-eager" in systems:
        runs += [("hf-eager", n, args.focus_rank) for n in pick(args.hf_workloads)]
    if "this-compile" in systems:
        runs += [("this-compile", n, args.focus_rank) for n in names if n in args.this_compile_workloads.split(",")]
    if "hf-compile" in systems:
        runs += [("hf-compile", n, args.focus_rank) for n in pick(args.hf_compile_workloads or args.hf_workloads)]
    if "hf-liger" in systems:
        runs += [("hf-liger", n, args.focus_rank) for n in pick(args.hf_liger_workloads or args.hf_workloads)]
    for spec in args.variant:
        name = spec.partition(":")[0]
        runs += [(f"this[{name}]", n, args.focus_rank) for n in args.variant_workloads.split(",") if n in names]
    return runs


def device_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def w2_data(args, shape: str, steps: int, works: dict[str, wl.Workload], tmp: Path) -> tuple[Path, str]:
    """The guanaco .jsonl W2 reads, and where it comes from: --w2-data, the cached eval split (full shape), or
    synthetic conversations written to `tmp`, enough for three times the steps of a run."""
    real = Path(args.w2_data) if args.w2_data != "auto" else wl.real_eval_split() if shape == "full" else None
    if real is not None:
        return real, f"guanaco file {real}"
    scale = wl.BATCHING[shape][3]
    n_conv = max(256, 3 * steps * works["W2-padded"].batch_size)
    return (wl.write_synthetic_guanaco(tmp / "w2.jsonl", n_conv, seed=0, scale=scale),
            wl.w2_source_description(None, n_conv, scale))


@dataclass
class Choices:
    """What the command line asks a benchmark run for, resolved and checked before anything runs."""
    device: torch.device
    shape: str  # a key of bench.workloads.BENCH_SHAPES
    steps: int  # per run, unless --run-steps says otherwise
    warmup: int  # steps left out of steady-state tokens/s
    ranks: list[int]  # of the W1 rank table
    names: list[str]  # workloads
    systems: list[str]
    variants: dict[str, dict]  # --variant NAME -> its TrainConfig overrides
    run_steps: list[tuple[str, int]]  # --run-steps


def choose(args) -> Choices:
    """The run's choices from the command line: defaults for this device, every name checked, and transformers
    + peft importable when a baseline is asked for."""
    device = resolve_device(args.device)
    steps = args.steps or (128 if device.type == "cuda" else CPU_STEPS)
    names = [n.strip() for n in args.workloads.split(",") if n.strip()]
    systems = ([s.strip() for s in args.systems.split(",") if s.strip()] if args.systems else
               ["this", *HF_SYSTEMS] if args.baseline == "hf" else ["this"])
    choices = Choices(
        device=device, shape=args.shape if args.shape != "auto" else ("full" if device.type == "cuda" else "cpu"),
        steps=steps, warmup=args.warmup_steps if args.warmup_steps >= 0 else min(5, steps // 4),
        ranks=[int(r) for r in args.ranks.split(",") if r.strip()], names=names, systems=systems,
        variants=dict(parse_variant(v) for v in args.variant), run_steps=parse_run_steps(args.run_steps))
    unknown = [n for n in names if n not in wl.WORKLOADS]
    bad_systems = [s for s in systems if s not in SYSTEMS]
    if unknown or bad_systems:
        raise SystemExit(f"bench.py: unknown workload(s) {unknown} or system(s) {bad_systems}; "
                         f"choose from {wl.WORKLOADS} and {SYSTEMS}")
    if any(s.startswith("hf") for s in systems):
        try:
            import peft  # noqa: F401
            import transformers  # noqa: F401
        except ImportError as e:
            raise SystemExit(f"bench.py: the transformers + peft baseline needs them installed ({e}); "
                             "pip install -e '.[test]' (they are benchmark dependencies, not runtime ones)") from None
    return choices


def setup_record(argv, choices: Choices, ctx: BenchContext, date: str, works: dict[str, wl.Workload],
                 w2_source: str | None, run_steps: str) -> dict:
    """What the results file says about the run before its rows: where, what, how measured."""
    device, dtype = choices.device, str(ctx.dtype).replace("torch.", "")
    meta = {
        "date": date, "device": ctx.device_name, "device_type": device.type, "torch": torch.__version__,
        "python": platform.python_version(), "cpu_threads": torch.get_num_threads(),
        "command": "python -m bench.bench " + " ".join(shlex.quote(a) for a in (argv if argv is not None
                                                                                 else sys.argv[1:])),
        "shape": choices.shape, "model_config": dataclasses.asdict(ctx.config), "steps": choices.steps,
        "warmup_steps": choices.warmup, "run_steps": run_steps, "dtype": dtype, "peak_flops": ctx.peak_flops,
        "peak_flops_note": f"measured: {'8192' if device.type == 'cuda' else '1024'}^2 {dtype} matmul on this "
                           "device, this run",
        "workloads": {n: wl.as_dict(works[n]) for n in choices.names}, "w2_source": w2_source,
        "targets": tables.TARGETS, "lora_targets": list(LoRAConfig(rank=1, alpha=1.0).targets),
    }
    if any(s.startswith("hf") for s in choices.systems):
        meta.update(hf_baseline.versions())
    if ctx.w2_path is not None:
        meta["w2_padding_fraction"] = padding_report(works[[n for n in choices.names if n != "W1"][0]], ctx)
    return meta


def measure(system: str, w: wl.Workload, rank: int, ctx: BenchContext, variants: dict[str, dict],
            results: dict) -> None:
    """One run of the plan, its row added to `results`; a run that fails (say, a compiler missing) or cannot run
    here is recorded under "errors" instead, so it never loses the others."""
    print(f"\n=== {system} {w.name} rank {rank}, {steps_for(system, w.name, ctx)} steps ===", flush=True)
    if system == "hf-liger" and ctx.device.type != "cuda":
        note = f"{system} {w.name} rank {rank}: skipped, not attempted: {hf_baseline.LIGER_NOTE} " \
               f"(this run is on {ctx.device.type})"
        print(note, flush=True)
        results["errors"].append(note)
        return
    try:
        if system.startswith("this["):
            row = run_this(w, rank, ctx=ctx, variant=(system[5:-1], variants[system[5:-1]]))
        elif system.startswith("this"):
            row = run_this(w, rank, ctx=ctx, compile=system == "this-compile")
        else:
            row = run_hf(system, w, rank, ctx=ctx)
    except Exception as e:
        traceback.print_exc()
        results["errors"].append(f"{system} {w.name} rank {rank}: {type(e).__name__}: {e}"[:2000])
        hf_baseline.release(compiled=True)
        return
    results["rows"].append(row)
    print(f"--- {system} {w.name} r{rank}: {row['seconds']:.2f} s for {row['steps']} steps, "
          f"{row['tokens_per_s']:,.0f} tokens/s steady, median step {row['step_ms_median']:.1f} ms", flush=True)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.combine:
        return combine(args)
    choices = choose(args)
    device, shape = choices.device, choices.shape
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = wl.model_config(shape)
    works = wl.workloads(shape)
    device_name = describe_device(device)
    date = datetime.date.today().isoformat()
    out_dir = Path(args.out_dir)
    name = args.name or f"{device_slug(device_name)}-{date}"

    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        tmp = Path(tmp)
        model_dir = tmp / "model"
        model_dir.mkdir()
        (model_dir / "config.json").write_text(json.dumps(config.to_hf_dict(), indent=2))
        w2 = any(n != "W1" for n in choices.names)
        w2_path, w2_source = w2_data(args, shape, choices.steps, works, tmp) if w2 else (None, None)
        ctx = BenchContext(device=device, dtype=dtype, device_name=device_name, config=config, steps=choices.steps,
                           warmup=choices.warmup, dropout=args.dropout, peak_flops=measure_matmul_peak(device, dtype),
                           tmp=tmp, model_dir=model_dir, w2_path=w2_path, run_steps=choices.run_steps)
        results = {**setup_record(argv, choices, ctx, date, works, w2_source, args.run_steps),
                   "rows": [], "decode_rows": [], "errors": []}
        print(f"bench: {device_name}, torch {torch.__version__}, shape {shape}, {choices.steps} steps per run "
              f"({choices.warmup} warm-up), matmul peak {ctx.peak_flops / 1e12:.2f} TFLOP/s ({results['dtype']})",
              flush=True)
        for system, wname, rank in plan(args, choices.ranks, choices.names, choices.systems):
            measure(system, works[wname], rank, ctx, choices.variants, results)
            tables.write_results(results, out_dir, name)
        if args.decode:
            results["decode_rows"], results["decode_note"] = run_decode(args, device)
    path = tables.write_results(results, out_dir, name)
    print("\n" + tables.render(results))
    print(f"\nresults: {path} and {path.with_suffix('.json')}")
    return results


def run_decode(args, device: torch.device) -> tuple[list, str]:
    """The decode benchmark's rows and a note saying how it ran (or why it did not)."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        note = "decode benchmark skipped: it compares with transformers, which is not installed"
        print(note)
        return [], note

    extra = (shlex.split(args.decode_args) if args.decode_args else
             ["--full"] if device.type == "cuda" else CPU_DECODE_ARGS)
    argv = ["--device", str(device), *extra]
    command = "python -m bench.decode_bench " + " ".join(argv)
    print(f"\n=== decode benchmark: {command} ===", flush=True)
    return decode_bench.main(argv), command


def combine(args) -> dict:
    """One results file from several (gpu_check.sh runs its stages as separate processes): the first file's
    setup, every part's rows (a later part's row replaces an earlier one of the same system, workload and rank),
    decode rows and errors."""
    parts = [json.loads(Path(p).read_text()) for p in args.combine]
    res = {**parts[0], "rows": [], "decode_rows": [], "errors": []}
    for p in parts:
        keys = {(r["system"], r["workload"], r["rank"]) for r in p["rows"]}
        res["rows"] = [r for r in res["rows"] if (r["system"], r["workload"], r["rank"]) not in keys] + p["rows"]
        res["decode_rows"] += p.get("decode_rows", [])
        res["errors"] += p.get("errors", [])
        for k in ("transformers", "peft", "liger_kernel", "decode_note", "w2_padding_fraction", "w2_source"):
            if p.get(k) is not None:
                res[k] = p[k]
        res["workloads"] = {**res["workloads"], **p["workloads"]}
    res["command"] = "; ".join(p["command"] for p in parts)
    if args.note:
        res["note"] = args.note
    name = args.name or Path(args.combine[0]).stem
    path = tables.write_results(res, Path(args.out_dir), name)
    print(tables.render(res))
    print(f"results: {path} and {path.with_suffix('.json')}")
    return res


if __name__ == "__main__":
    main()
