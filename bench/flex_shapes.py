"""Gemma 2's softcapped attention over padded batches of many lengths: how FlexAttention should be compiled.

    python -m bench.flex_shapes --out runs/flex_shapes     # CUDA: Gemma-2-2B's heads, bf16, forward + backward

Padded batches (preference objectives, `--no-packing`) bring a new length almost every step, and FlexAttention
is compiled per shape. Each mode below runs, in a process of its own (torch's compile caches start empty), the
same sequence of softcapped attention calls of a sliding layer: every length of `--lengths` at each batch size
of `--batches`, training (forward + backward) then held-out eval (forward, no grad), twice over. The first
pass pays the compiles; the second is the steady state. Modes:

- `flex`: this project's path (`model.flex_block_mask`, `model.flex_softcapped_attention`): lengths padded to
  `flex_length` (a power of two of 128-token blocks), compiled once per shape, up to `FLEX_RECOMPILE_LIMIT`;
- `flex-dynamic`: whole blocks, compiled as transformers compiles it (`torch.compile(flex_attention)`: sizes
  become symbolic after the first recompile);
- `plain`: `model.softcapped_attention`, every score materialised (what a CPU and the memory plan run);
- `flex-blocks`: lengths padded to whole blocks only, torch's own limit of 8 shapes (past it torch runs
  FlexAttention uncompiled).

Reported per mode: graphs compiled, whether torch hit its recompile limit, the first pass's seconds, the
steady pass's milliseconds per call (CUDA events), its peak memory, and the largest difference from `plain`
on the first pass's outputs. Written to `--out` after each mode (a run cut short keeps the modes it finished):
flex_shapes.md and flex_shapes.json. On a CPU (no FlexAttention backward there) it runs the eval calls only, at
tiny sizes: a dry run of the script; the numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

MODES = ("flex", "flex-dynamic", "plain", "flex-blocks")


class _LimitHits(logging.Handler):
    """Counts torch._dynamo's "hit config.recompile_limit" warnings."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record):
        self.count += "recompile_limit" in record.getMessage()


def _set_mode(mode: str):
    """Point the model's FlexAttention path at `mode`'s compile (this process only)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    import tinyllama.model as model

    if mode in ("flex-blocks", "flex-dynamic"):
        compiled = torch.compile(flex_attention, dynamic=False if mode == "flex-blocks" else None)
        model.flex_kernel = lambda: (compiled, create_block_mask)


def child(mode: str, args) -> dict:
    from bench.attention_check import time_call
    from tinyllama.model import build_attention_mask, flex_block_mask, flex_softcapped_attention, softcapped_attention
    from tinyllama.runtime import resolve_device

    device = resolve_device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    train = device.type == "cuda"  # FlexAttention has no backward pass on a CPU
    hits = _LimitHits()
    logging.getLogger("torch._dynamo").addHandler(hits)
    _set_mode(mode)
    from torch._dynamo.utils import counters

    H, KV, D = args.heads, args.kv_heads, args.head_dim
    scale, cap = args.query_pre_attn_scalar ** -0.5, args.softcap
    generator = torch.Generator().manual_seed(0)
    cases = []
    for grad in ((True, False) if train else (False,)):
        for B in args.batches:
            for T in args.lengths:
                q = torch.randn(B, H, T, D, generator=generator).to(device, dtype)
                k, v = (torch.randn(B, KV, T, D, generator=generator).to(device, dtype) for _ in range(2))
                pad = torch.ones(B, T, dtype=torch.long, device=device)
                pad[0, : T // 5] = 0  # the batch's shortest row: a fifth of it left padding
                mask = build_attention_mask(T, 0, pad, None, device, window=args.window, force=True)
                cases.append((grad, B, T, q, k, v, mask))

    def call(grad, q, k, v, mask):
        with torch.set_grad_enabled(grad):
            q, k, v = (t.detach().requires_grad_(grad) for t in (q, k, v))
            if mode == "plain":
                y = softcapped_attention(q, k, v, mask, scale, cap)
            else:
                # Power-of-two lengths for this project's mode, whole blocks for the others.
                y = flex_softcapped_attention(q, k, v, flex_block_mask(mask, lengths_vary=mode == "flex"), scale,
                                              cap)
            if grad:
                y.backward(torch.ones_like(y))
            return y.detach()

    t0 = time.perf_counter()
    differences = []
    for grad, _, _, q, k, v, mask in cases:
        y = call(grad, q, k, v, mask)
        if mode != "plain" and not grad:
            with torch.no_grad():
                ref = softcapped_attention(q, k, v, mask, scale, cap)
            differences.append((y.float() - ref.float()).abs().max().item())
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    first = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    steady = {}
    for case in cases:
        grad, B, T = case[:3]
        steady[f"{'train' if grad else 'eval'} B{B} T{T}"] = 1000 * time_call(lambda c=case: call(c[0], *c[3:]),
                                                                                device)
    return {"mode": mode, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "calls": len(cases), "graphs": counters["stats"]["unique_graphs"],
            "limit_hits": hits.count, "first_pass_s": first, "steady_ms_total": sum(steady.values()),
            "steady_ms_median": statistics.median(steady.values()),
            "peak_gib": torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None,
            "max_difference": max(differences, default=None), "steady_ms": steady}


def table(results: list[dict]) -> list[str]:
    lines = ["| mode | graphs compiled | recompile limit hit | first pass (s) | steady: total ms, median ms a call "
             "| peak GiB | largest difference from plain |", "|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['mode']} | failed: {r['error']} | | | | | |")
            continue
        peak = "n/a" if r["peak_gib"] is None else f"{r['peak_gib']:.2f}"
        diff = "" if r["max_difference"] is None else f"{r['max_difference']:.2g}"
        lines.append(f"| {r['mode']} | {r['graphs']} | {'yes' if r['limit_hits'] else 'no'} | "
                     f"{r['first_pass_s']:.1f} | {r['steady_ms_total']:.1f}, {r['steady_ms_median']:.2f} | "
                     f"{peak} | {diff} |")
    return lines


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="auto")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--lengths", type=_ints, default=None,
                   help="padded lengths (default: 6 from 200 to 2000 on CUDA; 40,150,300 on a CPU)")
    p.add_argument("--batches", type=_ints, default=None, help="batch sizes (default: 8,3 on CUDA; 2,1 on a CPU)")
    p.add_argument("--heads", type=int, default=None, help="query heads (default: Gemma-2-2B's 8; 4 on a CPU)")
    p.add_argument("--kv-heads", type=int, default=None, help="k/v heads (default: 4; 2 on a CPU)")
    p.add_argument("--head-dim", type=int, default=None, help="(default: 256; 16 on a CPU)")
    p.add_argument("--query-pre-attn-scalar", type=float, default=256.0)
    p.add_argument("--softcap", type=float, default=50.0)
    p.add_argument("--window", type=int, default=4096, help="the sliding window (Gemma-2-2B's)")
    p.add_argument("--out", default="runs/flex_shapes")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    cuda = args.device.startswith("cuda") or (args.device == "auto" and torch.cuda.is_available())
    for name, on_cuda, on_cpu in (("lengths", [200, 517, 777, 1100, 1500, 2000], [40, 150, 300]),
                                  ("batches", [8, 3], [2, 1]), ("heads", 8, 4), ("kv_heads", 4, 2),
                                  ("head_dim", 256, 16)):
        if getattr(args, name) is None:
            setattr(args, name, on_cuda if cuda else on_cpu)
    if args.child:
        print(json.dumps(child(args.child, args)))
        return 0
    argv = sys.argv[1:] if argv is None else argv
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for mode in args.modes.split(","):
        run = subprocess.run([sys.executable, "-m", "bench.flex_shapes", *argv, "--child", mode],
                             capture_output=True, text=True)
        if run.returncode:
            lines = run.stderr.strip().splitlines() or ["no output"]
            why = next((line for line in reversed(lines) if "Error" in line), lines[-1])
            results.append({"mode": mode, "error": f"exit {run.returncode}: {why[:300]}"})
        else:
            results.append(json.loads(run.stdout.strip().splitlines()[-1]))
        print(table(results[-1:])[-1], flush=True)
        device = next((r["device"] for r in results if "device" in r), args.device)
        lines = [f"# FlexAttention over padded batches of many lengths ({device})", "",
                 f"- torch {torch.__version__}; {'bf16, forward + backward, then eval' if cuda else 'fp32, eval only'}"
                 f"; lengths {args.lengths}; batch sizes {args.batches}; heads {args.heads} on {args.kv_heads} k/v, "
                 f"head dim {args.head_dim}; softcap {args.softcap}; window {args.window}",
                 f"- command: `python -m bench.flex_shapes {' '.join(argv)}`", "", *table(results)]
        (out / "flex_shapes.md").write_text("\n".join(lines) + "\n")
        (out / "flex_shapes.json").write_text(json.dumps(results, indent=1) + "\n")
    print("\n".join(lines))
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
