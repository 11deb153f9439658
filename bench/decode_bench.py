"""Decode benchmark: `tinyllama.generate` against `transformers` `generate`, same weights, same prompts.

    python -m bench.decode_bench                     # a scaled-down random TinyLlama shape, batch 1 and 16
    python -m bench.decode_bench --device cuda --full  # the real TinyLlama-1.1B shape (random weights)

Both systems decode greedily for exactly `max_new_tokens` (end tokens switched off) from the same left-padded
prompts. Prefill and decode are separated the same way for both, from the outside: the time of a 1-token run
is the prefill (prompt tokens / s, i.e. time to first token); the extra time of the N-token run over it is N-1
decode steps (generated tokens / s, summed over the batch). Each run is timed after a warm-up, the two
systems alternate, and the fastest of `repeats` runs counts (other load on the machine only ever adds time, so
the minimum is the least disturbed measurement). GPU runs are timed with CUDA events.

`transformers` is imported here only (a benchmark, not runtime code).
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from tinyllama import load_model
from tinyllama.generation import generate_batch
from tinyllama.runtime import resolve_device


def _timer(device: torch.device):
    if device.type == "cuda":
        def timed(fn):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn()
            end.record()
            torch.cuda.synchronize(device)
            return start.elapsed_time(end) / 1e3, out
    else:
        def timed(fn):
            t = time.perf_counter()
            out = fn()
            return time.perf_counter() - t, out
    return timed


def _hf_inputs(prompts, device):
    L = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), L, dtype=torch.long)
    mask = torch.zeros(len(prompts), L, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, L - len(p):] = torch.tensor(p)
        mask[i, L - len(p):] = 1
    return ids.to(device), mask.to(device)


def run_decode_bench(model_ours, hf_model, prompts: list[list[int]], max_new_tokens: int, device,
                     repeats: int = 3) -> list[dict]:
    """Two rows (system "this" and "hf") for one batch of prompts: prefill and decode tokens/s, and whether
    the greedy outputs agreed."""
    device = torch.device(device)
    timed = _timer(device)
    ids, mask = _hf_inputs(prompts, device)

    def ours(n):
        return generate_batch(model_ours, prompts, n, eos_id=())

    def hf(n):
        out = hf_model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=n, min_new_tokens=n,
                                pad_token_id=0, eos_token_id=None, temperature=None, top_p=None, top_k=None)
        return out[:, ids.shape[1]:].tolist()

    systems = {"this": ours, "hf": hf}
    times = {(s, n): [] for s in systems for n in (1, max_new_tokens)}
    outputs = {}
    for s, fn in systems.items():  # warm-up (allocator, kernels, lazy inits)
        fn(1)
        outputs[s] = fn(max_new_tokens)
    for _ in range(repeats):
        for n in (1, max_new_tokens):
            for s, fn in systems.items():
                seconds, out = timed(lambda fn=fn, n=n: fn(n))  # called at once, in this iteration
                assert all(len(row) == n for row in out), f"{s} stopped early: {[len(r) for r in out]}"
                times[s, n].append(seconds)
    prompt_tokens = sum(len(p) for p in prompts)
    rows = []
    for s in systems:
        t1, tn = min(times[s, 1]), min(times[s, max_new_tokens])
        rows.append(dict(system=s, device=device.type, batch=len(prompts), prompt_tokens=prompt_tokens,
                         new_tokens=max_new_tokens, prefill_s=t1, decode_s=tn - t1,
                         prefill_tokens_per_s=prompt_tokens / t1,
                         decode_tokens_per_s=len(prompts) * (max_new_tokens - 1) / max(tn - t1, 1e-9),
                         same_greedy_output=outputs[s] == outputs["this"],
                         # Above the thread count, other work shared the cores during the runs.
                         load_avg=os.getloadavg()[0] if device.type == "cpu" else None))
    return rows


def format_table(rows: list[dict]) -> str:
    head = f"{'system':<6} {'device':<6} {'batch':>5} {'prefill tok/s':>14} {'decode tok/s':>13} {'same output':>12}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['system']:<6} {r['device']:<6} {r['batch']:>5} {r['prefill_tokens_per_s']:>14,.0f} "
                     f"{r['decode_tokens_per_s']:>13,.1f} {str(r['same_greedy_output']):>12}")
    return "\n".join(lines)


# A TinyLlama-like shape small enough for a 2-core CPU: same vocabulary, head size and 8:1 query/KV grouping.
SMALL = dict(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=6,
             num_attention_heads=8, num_key_value_heads=1, max_position_embeddings=2048)
FULL = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
            num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048)


def build_models(shape: dict, device, dtype, folder):
    """A random HF checkpoint written to `folder`, loaded by both systems."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(**shape, rms_norm_eps=1e-5, tie_word_embeddings=False)
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder, safe_serialization=True)
    ours = load_model(folder, dtype=dtype, device=device).eval()
    hf = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
    return ours, hf


def main(argv=None):
    import tempfile

    p = argparse.ArgumentParser(prog="python -m bench.decode_bench", description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default=None, help="float32 or bfloat16 (default: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--full", action="store_true", help="the real TinyLlama-1.1B shape instead of a small one")
    p.add_argument("--batches", default="1,16")
    p.add_argument("--prompt-len", type=int, default=None, help="longest prompt (default 128; 512 with --full)")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    shape = FULL if args.full else SMALL
    L = args.prompt_len or (512 if args.full else 128)
    with tempfile.TemporaryDirectory() as folder:
        ours, hf = build_models(shape, device, dtype, folder)
    g = torch.Generator().manual_seed(0)
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        # Different lengths (L/2..L), so batching needs padding; a batch of one is the longest prompt.
        lengths = [L] + torch.randint(L // 2, L + 1, (batch - 1,), generator=g).tolist()
        prompts = [[1] + torch.randint(3, shape["vocab_size"], (n - 1,), generator=g).tolist() for n in lengths]
        rows += run_decode_bench(ours, hf, prompts, args.new_tokens, device, args.repeats)
    print(f"decode benchmark: {'TinyLlama-1.1B' if args.full else 'small'} shape {shape}, {dtype}, "
          f"{torch.get_num_threads()} CPU threads, prompts up to {L} tokens, {args.new_tokens} new tokens")
    print(format_table(rows))
    return rows


if __name__ == "__main__":
    main()
