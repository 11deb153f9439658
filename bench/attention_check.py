"""Which SDPA kernel to prefer for training: each kernel's cost at a new sequence length and at a repeated one.

    python -m bench.attention_check --out runs/attention     # CUDA: TinyLlama's heads, bf16, forward + backward

Length-grouped padded batches bring a new sequence length almost every step. A kernel that prepares something
per shape (cuDNN builds an execution plan) pays that again and again; this measures it. For each kernel and
each of a few lengths never seen before: the first causal forward + backward (shape new) and the median of the
next `--repeats` (shape known), timed with CUDA events after a synchronisation. Also flash attention with
the grouped k/v heads read in place (`enable_gqa`) against repeated k/v, which is what `RuntimePlan.gqa_in_place`
chooses between. A kernel that cannot run these inputs is reported as such, not timed.

Written to `--out`: attention.md and attention.json. On a CPU it runs the same code at tiny sizes (a dry run of
the script; the numbers mean nothing).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from tinyllama.runtime import resolve_device

KERNELS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
           "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}


def time_call(fn, device) -> float:
    """Seconds for fn() on the device (events on CUDA), after waiting for earlier work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000
    import time
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def measure(kernel: str, gqa: bool, lengths, args, device, dtype) -> dict:
    heads, kv_heads, d, b = args.heads, args.kv_heads, args.head_dim, args.batch
    rows = []
    for T in lengths:
        q = torch.randn(b, heads, T, d, device=device, dtype=dtype, requires_grad=True)
        n_kv = kv_heads if gqa else heads
        k = torch.randn(b, n_kv, T, d, device=device, dtype=dtype, requires_grad=True)
        v = torch.randn(b, n_kv, T, d, device=device, dtype=dtype, requires_grad=True)
        grad = torch.randn(b, heads, T, d, device=device, dtype=dtype)

        def step(q=q, k=k, v=v, grad=grad):  # called at once, in this iteration
            with sdpa_kernel([KERNELS[kernel]]):
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
            y.backward(grad)

        try:
            first = time_call(step, device)
        except RuntimeError as e:  # "No available kernel": this kernel does not take these inputs
            return {"kernel": kernel, "gqa_in_place": gqa, "error": str(e).splitlines()[0][:300]}
        again = statistics.median(time_call(step, device) for _ in range(args.repeats))
        rows.append({"seq_len": T, "first_ms": 1000 * first, "again_ms": 1000 * again})
    return {"kernel": kernel, "gqa_in_place": gqa, "rows": rows,
            "first_ms_mean": statistics.mean(r["first_ms"] for r in rows),
            "again_ms_mean": statistics.mean(r["again_ms"] for r in rows)}


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.attention_check", description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--lengths", default="", help="comma-separated new sequence lengths (default 5 between "
                                                  "300 and 1000 on CUDA, tiny on a CPU)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default="runs/attention")
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    if not cuda:
        args.batch, args.heads, args.kv_heads, args.head_dim, args.repeats = 1, 4, 2, 16, 1
    lengths = ([int(x) for x in args.lengths.split(",")] if args.lengths else
               [301, 517, 733, 911, 1013] if cuda else [17, 29])
    kernels = ["cudnn", "flash", "efficient"] if cuda else ["math"]
    results = [measure(kn, False, lengths, args, device, dtype) for kn in kernels]
    results.append(measure("flash" if cuda else "math", True, lengths, args, device, dtype))
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    lines = [f"# Causal attention forward + backward per kernel, {name}, torch {torch.__version__}", "",
             f"batch {args.batch}, {args.heads} query heads / {args.kv_heads} k/v heads, head size "
             f"{args.head_dim}, {str(dtype).replace('torch.', '')}; new sequence lengths {lengths}; "
             f"'first' is the first call at a length (new shape), 'again' the median of the next {args.repeats}.",
             "", "| kernel | k/v heads | first call (ms, mean) | again (ms, mean) | per length: first / again (ms) |",
             "|---|---|---|---|---|"]
    for r in results:
        kv = "grouped, in place" if r["gqa_in_place"] else "repeated"
        if "error" in r:
            lines.append(f"| {r['kernel']} | {kv} | cannot run: {r['error']} | | |")
            continue
        per = ", ".join(f"{x['seq_len']}: {x['first_ms']:.2f} / {x['again_ms']:.2f}" for x in r["rows"])
        lines.append(f"| {r['kernel']} | {kv} | {r['first_ms_mean']:.2f} | {r['again_ms_mean']:.2f} | {per} |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "attention.md").write_text("\n".join(lines) + "\n")
    (out / "attention.json").write_text(json.dumps({"device": name, "torch": torch.__version__,
                                                    "lengths": lengths, "results": results}, indent=1) + "\n")
    print("\n".join(lines))
    return results


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
