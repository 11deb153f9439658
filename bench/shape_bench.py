"""Peak memory and tokens/s of other model shapes, with and without NF4 and gradient checkpointing.

    python -m bench.shape_bench --device cuda --out runs/shapes                 # the default runs below
    python -m bench.shape_bench --runs llama-2-7b:nf4-gc,llama-2-7b:bf16-gc      # a choice of them
    python -m bench.shape_bench --device cpu --tiny --steps 2 --out /tmp/shapes  # the code path, tiny, on a CPU

Each run is `train.train` on random weights of a named shape (`tinyllama.shapes`: `--model NAME --random-init`)
and W1-style data (`--data random`: random token ids, every position labelled), LoRA rank `--rank` on the MLP,
micro-batches of `--batch-size` x `--max-len`, one process. A run is `SHAPE:VARIANT`, the variant `bf16` or
`nf4`, `-dq` for double quantisation and `-gc` for gradient checkpointing (`nf4-dq-gc`). Written to `--out`:
`shapes.md` (one row per run: trainable and total parameters, tokens/s, peak GiB) and `shapes.json`; a run that
fails (out of memory, say) is a row with its error, and the next one still runs.
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import tempfile
from pathlib import Path

import torch

import train
from tinyllama.runtime import device_name, resolve_device
from tinyllama.shapes import SHAPES, named_shape

DEFAULT_RUNS = ("llama-3.2-1b:bf16,llama-3.2-1b:nf4,llama-3.2-1b:nf4-gc,"
                "llama-2-7b:bf16-gc,llama-2-7b:nf4-gc,llama-2-7b:nf4-dq-gc")
VARIANT_PARTS = {"bf16", "nf4", "dq", "gc"}


def parse_run(spec: str) -> tuple[str, dict]:
    """`llama-2-7b:nf4-gc` -> ("llama-2-7b", TrainConfig overrides)."""
    shape, _, variant = spec.partition(":")
    parts = variant.split("-")
    if shape not in SHAPES or not variant or not set(parts) <= VARIANT_PARTS or parts[0] not in ("bf16", "nf4") \
            or ("dq" in parts and parts[0] != "nf4"):
        raise SystemExit(f"bench.shape_bench: run {spec!r}: expected SHAPE:VARIANT with SHAPE one of {list(SHAPES)} "
                         "and VARIANT bf16 or nf4, then -dq (nf4 only) and/or -gc, e.g. llama-2-7b:nf4-dq-gc")
    return shape, dict(quantize="nf4" if parts[0] == "nf4" else "none", double_quant="dq" in parts,
                       grad_checkpointing="gc" in parts)


def tiny(config) -> dict:
    """A shape cut to 2 layers of width 64 (its kind kept: RoPE scaling, ties, vocabulary): a dry run's size."""
    heads = 4
    kv = heads if config.num_key_value_heads == config.num_attention_heads else 2
    return dict(config.to_hf_dict(), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=heads, num_key_value_heads=kv, head_dim=16, vocab_size=512)


def run_one(spec: str, args, tmp: Path) -> dict:
    shape, overrides = parse_run(spec)
    model = shape
    if args.tiny:
        model = str(tmp / f"{shape}.json")
        Path(model).write_text(json.dumps(tiny(named_shape(shape))))
    out = tmp / spec.replace(":", "-")
    cfg = train.TrainConfig(model=model, random_init=True, data=f"random:{args.steps * args.batch_size}",
                            eval_data="none", samples=False, rank=args.rank, batch_size=args.batch_size,
                            grad_accum=1, max_len=args.max_len, steps=args.steps, warmup=0, log_every=1,
                            device=args.device, dtype="bfloat16" if args.device != "cpu" else "float32",
                            out=str(out), **overrides)
    row = {"run": spec, "shape": shape, **overrides}
    try:
        summary = train.train(cfg)
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        steady = [r for r in rows if r["split"] == "train" and r["step"] > args.warmup_steps]
        seconds = sum(r["step_s"] for r in steady)
        row.update(trainable=summary["trainable_params"], total=summary["total_params"],
                   tokens_per_s=sum(r["tokens"] for r in steady) / seconds if seconds else None,
                   median_step_s=sorted(r["step_s"] for r in steady)[len(steady) // 2] if steady else None,
                   peak_gib=summary["peak_gib"], final_loss=summary["last_loss"])
    except (Exception, SystemExit) as e:  # out of memory, or a refusal: recorded, and the next run goes on
        row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
    finally:
        shutil.rmtree(out, ignore_errors=True)  # a 7B adapter is hundreds of MB: only the numbers are kept
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    print(f"--- {spec}: {row}")
    return row


def render(rows: list[dict], args, device: str) -> str:
    title = (f"# Model shapes: {args.steps} steps each of train.py, random weights, micro-batch {args.batch_size} x "
             f"{args.max_len}, LoRA rank {args.rank} on the MLP, on {device}")
    title += " (TINY dry run)" if args.tiny else ""
    lines = [title,
             "", "| run | quantize | double quant | grad checkpointing | trainable | total | tokens/s | median "
             "step (s) | peak GiB |", "|---|---|---|---|---|---|---|---|---|"]

    def num(v, fmt):
        return "n/a" if v is None else format(v, fmt)

    for r in rows:
        if "error" in r:
            lines.append(f"| {r['run']} | {r['quantize']} | {r['double_quant']} | {r['grad_checkpointing']} | "
                         f"failed: {r['error']} | | | | |")
            continue
        lines.append(f"| {r['run']} | {r['quantize']} | {r['double_quant']} | {r['grad_checkpointing']} | "
                     f"{r['trainable']:,} | {r['total']:,} | {num(r['tokens_per_s'], ',.0f')} | "
                     f"{num(r['median_step_s'], '.3f')} | {num(r['peak_gib'], '.2f')} |")
    lines += ["", f"tokens/s: steps after the first {args.warmup_steps}; peak GiB: torch.cuda.max_memory_allocated "
              "over the run (after loading). Command: `python -m bench.shape_bench "
              + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k not in ("out", "tiny"))
              + (" --tiny" if args.tiny else "") + "`"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", default=DEFAULT_RUNS, help="comma-separated SHAPE:VARIANT (see the module docstring)")
    p.add_argument("--device", default="auto")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup-steps", type=int, default=3, help="first steps left out of tokens/s")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-len", type=int, default=1024)
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--tiny", action="store_true", help="every shape cut to 2 layers of width 64 (a dry run)")
    p.add_argument("--out", default="runs/shapes")
    args = p.parse_args(argv)
    args.device = str(resolve_device(args.device))
    runs = args.runs.split(",")
    for spec in runs:
        parse_run(spec)  # every spec checked before the first run
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = device_name(torch.device(args.device))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for spec in runs:
            rows.append(run_one(spec, args, Path(tmp)))
            # Rewritten after every run: a stage cut short keeps what it measured.
            (out / "shapes.json").write_text(json.dumps({"device": device, "args": vars(args), "rows": rows},
                                                        indent=2) + "\n")
            (out / "shapes.md").write_text(render(rows, args, device))
    print(render(rows, args, device))
    return rows


if __name__ == "__main__":
    main()
