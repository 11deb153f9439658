"""Where a training step's time goes: torch.profiler over a few steps of the real loop, this project and HF.

    python -m bench.profile_step --device cuda --shape full --out runs/profile      # W1, rank 64
    python -m bench.profile_step --device cpu --shape cpu --systems this,hf-eager

The steps profiled are those of `train.train` itself (and of `bench.hf_baseline`): a global optimizer
step hook starts the profiler after optimizer step `--skip` and stops it `--profile-steps` steps later, so
the loop is not copied here and warm-up steps are left out. Written to `--out`: `profile.md` with, per
system, the time per step by category (matmul, attention, loss, optimizer, dropout, copies, the rest),
summed over the aten operators' own (self) device time on CUDA or CPU time on a CPU, and the top operators
and kernels; `profile.json` with the category numbers.

Deliberately left out: Chrome traces (too big to bring back from a GPU machine for what they add here).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

import train
from bench import hf_baseline
from bench import workloads as wl
from bench.bench import parse_variant
from data import BatchStream
from data.synthetic import random_examples
from lora import LoRAConfig
from tinyllama import LlamaConfig
from tinyllama.runtime import device_name, resolve_device

# aten operator name fragments -> category, first match wins.
CATEGORIES = [
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_addmm_activation",
                "aten::_scaled_mm", "aten::matmul", "aten::linear")),
    ("attention", ("scaled_dot_product", "flash_attention", "efficient_attention", "cudnn_attention")),
    ("loss (softmax, cross-entropy)", ("softmax", "nll_loss", "cross_entropy", "logsumexp")),
    ("optimizer and clipping", ("adam", "_foreach", "vector_norm")),
    ("dropout (random masks)", ("bernoulli", "dropout", "rand")),
    ("copies, casts, indexing", ("copy", "_to_copy", "cat", "clone", "contiguous", "repeat_interleave", "index",
                                 "fill_", "zero_", "gather", "scatter", "expand", "stack", "pad")),
]


def category(name: str) -> str:
    for label, keys in CATEGORIES:
        if any(k in name for k in keys):
            return label
    return "other elementwise and norms"


class StepWindow:
    """Starts `prof` after optimizer step `skip` and stops it after step `skip + n`, whichever optimizer steps."""

    def __init__(self, prof, skip: int, n: int):
        self.prof, self.skip, self.n, self.k = prof, skip, n, 0
        self.started = self.stopped = False

    def __call__(self, optimizer, args, kwargs):
        self.k += 1
        if self.k == self.skip:
            self.sync()
            self.prof.start()
            self.t0 = time.perf_counter()
            self.started = True
        elif self.k == self.skip + self.n and self.started:
            self.sync()
            self.wall_s = time.perf_counter() - self.t0
            self.prof.stop()
            self.stopped = True

    @staticmethod
    def sync():  # the window's wall time covers the profiled steps' device work, not just their launches
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def __enter__(self):
        from torch.optim.optimizer import register_optimizer_step_post_hook
        self.handle = register_optimizer_step_post_hook(self)
        return self

    def __exit__(self, *exc):
        self.handle.remove()
        if self.started and not self.stopped:
            self.prof.stop()


def summarize(prof, cuda: bool, steps: int) -> dict:
    """Milliseconds per step by category over aten operators' self time (no double counting of nested ops)."""
    rows = prof.key_averages()
    own = (lambda e: e.self_device_time_total) if cuda else (lambda e: e.self_cpu_time_total)
    cats: dict[str, float] = {}
    for e in rows:
        if e.key.startswith("aten::") and own(e) > 0:
            cats[category(e.key)] = cats.get(category(e.key), 0.0) + own(e) / 1000 / steps
    return dict(sorted(cats.items(), key=lambda kv: -kv[1]))


def kernel_ms(prof, steps: int) -> float | None:
    """Device time per step summed over every kernel, compiled (Triton) ones included: the GPU's busy time."""
    from torch.autograd import DeviceType

    rows = [e for e in prof.key_averages() if e.device_type == DeviceType.CUDA]
    return sum(e.self_device_time_total for e in rows) / 1000 / steps if rows else None


@dataclass
class ProfileContext:
    """What every profiled system shares: the device and precision, the model shape, the rank, the window."""
    device: torch.device
    dtype: torch.dtype
    shape: str  # a key of bench.workloads.BENCH_SHAPES
    config: LlamaConfig
    rank: int
    skip: int  # optimizer steps before the profiled ones
    profile_steps: int
    tmp: Path  # this project's run writes its output folder here
    model_dir: Path  # config.json only: train.py builds random weights of this shape (--random-init)
    overrides: dict  # train.py settings for this project's run (TrainConfig fields)


def profile_system(system: str, ctx: ProfileContext) -> dict:
    device, skip, n = ctx.device, ctx.skip, ctx.profile_steps
    steps = skip + n + 1
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    prof = profile(activities=activities, record_shapes=False)
    w = wl.workloads(ctx.shape)["W1"]
    rank = ctx.rank
    with StepWindow(prof, skip, n) as window:
        if system in ("this", "this-compile"):
            train.train(train.TrainConfig(
                model=str(ctx.model_dir), random_init=True, data=f"random:{steps * w.batch_size}",
                eval_data="none", rank=rank, alpha=float(rank), batch_size=w.batch_size, grad_accum=1,
                max_len=w.max_len, steps=steps, samples=False, log_every=1, eval_every=0,
                out=str(ctx.tmp / "this"), overwrite=True, device=str(device),
                compile=system == "this-compile", **ctx.overrides))
        else:
            stream = BatchStream(random_examples(steps * w.batch_size, w.max_len, ctx.config.vocab_size, 0),
                                 w.batch_size, w.max_len, seed=0)
            hf_baseline.run(ctx.config, LoRAConfig(rank=rank, alpha=float(rank)), stream, steps, device,
                            ctx.dtype, compile=system == "hf-compile")
    if not window.stopped:
        raise RuntimeError(f"{system}: the profiler window (steps {skip + 1}-{skip + n}) was not reached")
    cuda = device.type == "cuda"
    sort = "self_device_time_total" if cuda else "self_cpu_time_total"
    return {"system": system, "ms_per_step": summarize(prof, cuda, n), "wall_ms": 1000 * window.wall_s / n,
            "kernel_ms": kernel_ms(prof, n) if cuda else None,
            "table": prof.key_averages().table(sort_by=sort, row_limit=35, max_name_column_width=70)}


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.profile_step", description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--shape", default="auto", choices=["auto", *wl.BENCH_SHAPES])
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--systems", default="this,hf-eager", help="comma-separated: this, this-compile, hf-eager, "
                                                               "hf-compile")
    p.add_argument("--skip", type=int, default=5, help="optimizer steps before the profiled ones")
    p.add_argument("--profile-steps", type=int, default=3)
    p.add_argument("--set", default="", metavar="KEY=VALUE;KEY=VALUE",
                   help="train.py settings for this project's run, as bench.bench --variant takes them "
                        "(e.g. 'compile_scope=model;sdpa_backends=default')")
    p.add_argument("--out", default="runs/profile")
    args = p.parse_args(argv)
    overrides = parse_variant("set:" + args.set)[1]
    device = resolve_device(args.device)
    shape = args.shape if args.shape != "auto" else ("full" if device.type == "cuda" else "cpu")
    config = wl.model_config(shape)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="profile-") as tmp:
        tmp = Path(tmp)
        (tmp / "model").mkdir()
        (tmp / "model" / "config.json").write_text(json.dumps(config.to_hf_dict()))
        ctx = ProfileContext(device=device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32,
                             shape=shape, config=config, rank=args.rank, skip=args.skip,
                             profile_steps=args.profile_steps, tmp=tmp, model_dir=tmp / "model", overrides=overrides)
        for system in args.systems.split(","):
            results.append(profile_system(system, ctx))
            write(results, out, device, shape, args)
    print((out / "profile.md").read_text())
    return results


def write(results, out: Path, device, shape, args) -> None:
    w = wl.workloads(shape)["W1"]
    what = "device (CUDA kernel) time" if device.type == "cuda" else "CPU time"
    lines = [f"# One training step, profiled: W1 ({w.describe()}), rank {args.rank}, shape {shape}, "
             f"{device_name(device)}, torch {torch.__version__}", "",
             f"Steps {args.skip + 1}-{args.skip + args.profile_steps} of the real loop; milliseconds per step of "
             f"{what}, summed over aten operators' self time, by category.", ""]
    names = [r["system"] for r in results]
    cats = sorted({c for r in results for c in r["ms_per_step"]},
                  key=lambda c: -max(r["ms_per_step"].get(c, 0) for r in results))
    lines += ["| category | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for c in cats:
        lines.append(f"| {c} | " + " | ".join(f"{r['ms_per_step'].get(c, 0):.2f}" for r in results) + " |")
    lines.append("| **total** | " + " | ".join(f"**{sum(r['ms_per_step'].values()):.2f}**" for r in results) + " |")
    lines.append("| all kernels, compiled ones too (device busy) | "
                 + " | ".join(f"{r['kernel_ms']:.2f}" if r.get("kernel_ms") else "n/a" for r in results) + " |")
    lines.append("| wall time per step (host clock, synchronised) | "
                 + " | ".join(f"{r['wall_ms']:.2f}" for r in results) + " |")
    for r in results:
        lines += ["", f"## {r['system']}: top operators and kernels", "", "```", r["table"], "```"]
    (out / "profile.md").write_text("\n".join(lines) + "\n")
    (out / "profile.json").write_text(json.dumps([{k: v for k, v in r.items() if k != "table"} for r in results],
                                                 indent=1) + "\n")


if __name__ == "__main__":
    main()
