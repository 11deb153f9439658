"""`make bench`: the seed's LoRA rank table from the real training loop, side by side with transformers + peft.

    python bench/bench.py                      # this project: W1 at ranks 4/16/64/256, W2 padded/packed at 64
    python bench/bench.py --baseline hf        # plus transformers + peft, eager and torch.compile, at rank 64
    python bench/bench.py --combine a.json b.json --name gpu   # one table from several results files

Every run of this project is `train.main` (128 optimizer steps by default, one micro-batch each, on random
weights of the model's shape: `--random-init`); the baseline is `bench/hf_baseline.py` on the same batches.
On CUDA the shape is TinyLlama-1.1B; on a CPU it is a scaled-down configuration (see `bench/workloads.py`)
with fewer steps, and the table's title says so. Workloads W1 (random ids) and W2 (guanaco-shaped,
prompt-masked; padded and packed) are described in `bench/workloads.py`.

What the columns mean:
- Training Time (s) / `seconds`: the sum of the step times of all steps, the first (warm-up, compilation) ones
  included, as the seed reported it. A step is timed as `train.py` times it: host-to-device copy, forward,
  backward, clip, optimizer step (CUDA events on GPU, wall clock on CPU); building the model and the batches is
  not timed.
- tokens/s: steady state, over the steps after the first `--warmup-steps`, counting real (non-pad) tokens only,
  so for W2 it is *useful* tokens/s. `tokens_per_s_all` in the JSON is over all steps.
- MFU: tokens/s x FLOPs per token / the matmul peak measured at the start of the same run (a large bf16 matmul
  on CUDA, fp32 on CPU where training runs in fp32). FLOPs per token are `tinyllama.flops.
  training_flops_per_token` (frozen-base LoRA: 4 x matmul weights for forward and input-gradient backward,
  attention at the row length, 6 x r x (in + out) per adapter); both numbers are printed.
- peak memory: `torch.cuda.max_memory_allocated` from just before the first step (weights included); n/a on CPU.

Results go to `--out-dir` (default bench/results) as `<device>-<date>.md` and `.json`, rewritten after every
run, so an interrupted benchmark keeps what it measured.

transformers and peft are imported only for `--baseline hf` and the decode benchmark (skipped with a note when
they are missing): `make bench` needs the runtime dependencies only.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
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
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if sys.path and Path(sys.path[0]).resolve() == ROOT / "bench":
    sys.path[0] = str(ROOT)  # run as `python bench/bench.py`: import `bench` as the package, not this file
elif str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import train  # noqa: E402
from bench import workloads as wl  # noqa: E402
from lora import LoRAConfig  # noqa: E402
from tinyllama import LlamaConfig  # noqa: E402
from data.synthetic import random_examples  # noqa: E402
from tinyllama.flops import measure_matmul_peak, training_flops_per_token  # noqa: E402
from tinyllama.runtime import device_name as describe_device, resolve_device  # noqa: E402
from training.step import labelled_count, real_token_count  # noqa: E402

TOKENIZER = ROOT / "assets" / "tokenizer.model"  # the real TinyLlama tokenizer, shipped in the checkout
SYSTEMS = ("this", "this-compile", "hf-eager", "hf-compile")
CPU_STEPS = 32  # CPU default: 6 runs x 32 steps of the scaled-down shape take about 2 minutes on 2 cores
CPU_DECODE_ARGS = ["--new-tokens", "16", "--repeats", "2"]  # decode_bench's defaults take ~4 minutes on 2 cores
TARGETS = {"w1_tokens_per_s": 120_000, "w1_vs_hf_compile": 1.5, "w1_vs_hf_eager": 3.0, "w2_vs_hf_eager": 2.5,
           "rank_spread": 0.15}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--shape", default="auto", choices=["auto", *wl.SHAPES],
                   help="model shape: auto = full on CUDA, the scaled-down cpu shape on CPU")
    p.add_argument("--ranks", default="4,16,64,256", help="LoRA ranks of the W1 rank table (alpha = rank)")
    p.add_argument("--focus-rank", type=int, default=64, help="the rank W2 and the baselines run at")
    p.add_argument("--steps", type=int, default=0, help=f"optimizer steps per run (0: 128 on CUDA, {CPU_STEPS} on CPU)")
    p.add_argument("--warmup-steps", type=int, default=-1,
                   help="first steps left out of steady-state tokens/s (-1: min(5, steps // 4))")
    p.add_argument("--workloads", default=",".join(wl.WORKLOADS), help="comma-separated: W1,W2-padded,W2-packed")
    p.add_argument("--baseline", default="none", choices=["none", "hf"],
                   help="hf: also run transformers + peft, eager and under torch.compile")
    p.add_argument("--systems", default="",
                   help=f"comma-separated subset of {','.join(SYSTEMS)} (overrides --baseline; this-compile is "
                        "this project with --compile, at the focus rank)")
    p.add_argument("--hf-workloads", default="W1,W2-padded", help="workloads transformers + peft eager runs")
    p.add_argument("--hf-compile-workloads", default="",
                   help="workloads transformers + peft under torch.compile runs (default: --hf-workloads)")
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
                   help="also run bench/decode_bench.py (needs transformers; skipped with a note without it)")
    p.add_argument("--decode-args", default="",
                   help="arguments for bench/decode_bench.py (default: --full on CUDA, "
                        f"{' '.join(CPU_DECODE_ARGS)} on CPU)")
    p.add_argument("--out-dir", default=str(ROOT / "bench" / "results"))
    p.add_argument("--name", default="", help="results file stem (default <device>-<date>)")
    p.add_argument("--note", default="", help="a line for the results' Setup section (with --combine: where "
                                              "each part's rows come from)")
    p.add_argument("--combine", nargs="+", default=None, metavar="JSON",
                   help="render one table from these results files instead of running anything")
    return p.parse_args(argv)


# ---- measuring ----------------------------------------------------------------------------------------------

def steady(step_s: list[float], tokens: list[int], warmup: int) -> tuple[float, int]:
    """(seconds, tokens) of the steps after the first `warmup` (all steps if there are no more than that)."""
    w = warmup if len(step_s) > warmup else 0
    return sum(step_s[w:]), sum(tokens[w:])


def replay(examples, w: wl.Workload, steps: int, seed: int = 0) -> dict[str, list[int]]:
    """Token counts of the first `steps` micro-batches `train.py` (or the baseline) draws for this workload:
    the same BatchStream, so the same batches."""
    from data import BatchStream

    stream = BatchStream(examples, w.batch_size, w.max_len, packing=w.packing,
                         group_by_length=w.group_by_length and not w.packing, seed=seed)
    out = {"tokens": [], "labelled": [], "positions": []}
    for _ in range(steps):
        b = next(stream)
        out["tokens"].append(real_token_count(b))
        out["labelled"].append(labelled_count(b))
        out["positions"].append(b["input_ids"].numel())
    return out


def make_row(system: str, work: wl.Workload, rank: int, step_s, counts, *, ctx, trainable, total, peak_gib,
             compile: bool, losses, wall_s: float, leftover_gib) -> dict:
    steps = len(step_s)
    sec, tok = steady(step_s, counts["tokens"], ctx["warmup"])
    w = ctx["warmup"] if steps > ctx["warmup"] else 0
    _, lab = steady(step_s, counts["labelled"], ctx["warmup"])
    tokens_per_s = tok / sec if sec else None
    fpt = training_flops_per_token(ctx["config"], LoRAConfig(rank=rank, alpha=float(rank)), work.max_len)
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
        "mfu": tokens_per_s * fpt / ctx["peak_flops"] if tokens_per_s else None,
        "flops_per_token": fpt, "peak_flops": ctx["peak_flops"], "peak_gib": peak_gib, "leftover_gib": leftover_gib,
        "trainable_params": trainable, "total_params": total, "trainable_percent": 100 * trainable / total,
        "device": ctx["device_name"], "dtype": str(ctx["dtype"]).replace("torch.", ""), "compile": compile,
        "batch_size": work.batch_size, "max_len": work.max_len, "packing": work.packing,
        "group_by_length": work.group_by_length, "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None, "wall_s": wall_s, "load_avg": load_avg(),
    }


def load_avg() -> float | None:
    """The 1-minute load average when the run ended: other work on the machine slows a CPU measurement."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def allocated_gib(device) -> float | None:
    return torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else None


def release(compiled: bool = False) -> None:
    """Free what a run left behind, so the next run's peak memory is its own (compiled graphs hold weights)."""
    if compiled:
        torch._dynamo.reset()
    if compiled or torch.cuda.is_available():
        gc.collect()
        torch.cuda.empty_cache()


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
        kind = train.setting_type(key)
        overrides[key] = value.lower() in ("1", "true", "yes") if kind is bool else kind(value)
    return name, overrides


def run_this(w: wl.Workload, rank: int, *, ctx, compile: bool = False, variant: tuple[str, dict] | None = None) -> dict:
    """One run of the real training loop (`train.main`) and its row; `variant`: (name, TrainConfig overrides)."""
    steps = ctx["steps"]
    overrides = dict(variant[1]) if variant else {}
    compile = overrides.pop("compile", compile)
    name = f"this-{w.name}-r{rank}{'-compile' if compile else ''}{'-' + variant[0] if variant else ''}"
    out = ctx["tmp"] / name
    data = f"random:{steps * w.batch_size}" if w.name == "W1" else str(ctx["w2_path"])
    settings = dict(
        model=str(ctx["model_dir"]), random_init=True, data=data, eval_data="none", tokenizer=str(TOKENIZER),
        rank=rank, alpha=float(rank), dropout=ctx["dropout"], batch_size=w.batch_size, grad_accum=1,
        max_len=w.max_len, steps=steps, packing=w.packing, group_by_length=w.group_by_length, samples=False,
        log_every=1, eval_every=0, save_every=0, out=str(out), overwrite=True, device=str(ctx["device"]), dtype="auto",
        compile=compile, seed=0)
    cfg = train.TrainConfig(**{**settings, **overrides})
    leftover = allocated_gib(ctx["device"])
    t0 = time.perf_counter()
    summary = train.main(cfg)
    wall = time.perf_counter() - t0
    release(compile)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    metrics = [m for m in metrics if m["split"] == "train"]
    if [m["step"] for m in metrics] != list(range(1, steps + 1)):
        raise RuntimeError(f"{out}/metrics.jsonl does not hold one train row per step (log_every=1)")
    counts = replay(examples_for(w, ctx), w, steps)
    counted = summary["tokens_per_s"] * summary["training_time_s"]
    if abs(counted - sum(counts["tokens"])) > 0.5 + 1e-6 * counted:
        raise RuntimeError(f"{name}: train.py counted {counted:.0f} real tokens, the replayed batches hold "
                           f"{sum(counts['tokens'])}: the benchmark no longer builds the batches train.py does")
    system = f"this[{variant[0]}]" if variant else "this-compile" if compile else "this"
    return make_row(system, w, rank, [m["step_s"] for m in metrics], counts,
                    ctx=ctx, trainable=summary["trainable_params"], total=summary["total_params"],
                    peak_gib=summary["peak_gib"], compile=compile,
                    losses=[m["loss"] for m in metrics], wall_s=wall, leftover_gib=leftover)


def run_hf(w: wl.Workload, rank: int, *, ctx, compile: bool) -> dict:
    from bench import hf_baseline
    from data import BatchStream

    hw = wl.baseline_workload(w)
    stream = BatchStream(examples_for(w, ctx), hw.batch_size, hw.max_len, packing=False, group_by_length=False,
                         seed=0)
    lora_config = LoRAConfig(rank=rank, alpha=float(rank), dropout=ctx["dropout"])
    leftover = allocated_gib(ctx["device"])
    t0 = time.perf_counter()
    r = hf_baseline.run(ctx["config"], lora_config, stream, ctx["steps"], ctx["device"], ctx["dtype"],
                        compile=compile)
    wall = time.perf_counter() - t0
    row = make_row("hf-compile" if compile else "hf-eager", hw, rank, r["step_s"], r, ctx=ctx,
                   trainable=r["trainable_params"], total=r["total_params"], peak_gib=r["peak_gib"],
                   compile=compile, losses=r["losses"], wall_s=wall, leftover_gib=leftover)
    return row


def examples_for(w: wl.Workload, ctx) -> list:
    """The examples train.py builds for this workload (cached per (workload data, max_len))."""
    key = ("W1" if w.name == "W1" else "W2", w.max_len)
    if key not in ctx["examples"]:
        if w.name == "W1":
            ctx["examples"][key] = random_examples(ctx["steps"] * w.batch_size, w.max_len,
                                                         ctx["config"].vocab_size, seed=0)
        else:
            from data import encode_all, load_conversations
            from tinyllama import Tokenizer

            ctx["examples"][key], _ = encode_all(load_conversations(str(ctx["w2_path"])), Tokenizer(TOKENIZER),
                                                 w.max_len)
    return ctx["examples"][key]


def padding_report(w: wl.Workload, ctx) -> dict:
    """Padding fraction of an epoch of the W2 data in each batching mode (data.BatchStream.padding_fraction)."""
    from data import BatchStream

    ex = examples_for(w, ctx)
    modes = {"pad-to-longest": dict(group_by_length=False), "length-grouped": dict(group_by_length=True),
             "packed": dict(packing=True)}
    return {k: BatchStream(ex, w.batch_size, w.max_len, seed=0, **v).padding_fraction() for k, v in modes.items()}


# ---- the plan and the run -----------------------------------------------------------------------------------

def plan(args, ranks: list[int], names: list[str], systems: list[str]) -> list[tuple[str, str, int]]:
    """(system, workload, rank) in run order: eager runs first, compiled ones last (compilation leaves worker
    processes and caches behind that should not overlap an eager measurement)."""
    def pick(spec):  # the baseline has no packed mode (packing is this project's): W2-packed is never its
        return [n for n in spec.split(",") if n in names and n != "W2-packed"]

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
    for spec in args.variant:
        name = spec.partition(":")[0]
        runs += [(f"this[{name}]", n, args.focus_rank) for n in args.variant_workloads.split(",") if n in names]
    return runs


def device_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.combine:
        return combine(args)
    device = resolve_device(args.device)
    shape = args.shape if args.shape != "auto" else ("full" if device.type == "cuda" else "cpu")
    steps = args.steps or (128 if device.type == "cuda" else CPU_STEPS)
    warmup = args.warmup_steps if args.warmup_steps >= 0 else min(5, steps // 4)
    ranks = [int(r) for r in args.ranks.split(",") if r.strip()]
    names = [n.strip() for n in args.workloads.split(",") if n.strip()]
    unknown = [n for n in names if n not in wl.WORKLOADS]
    systems = ([s.strip() for s in args.systems.split(",") if s.strip()] if args.systems else
               ["this", "hf-eager", "hf-compile"] if args.baseline == "hf" else ["this"])
    bad_systems = [s for s in systems if s not in SYSTEMS]
    variants = dict(parse_variant(v) for v in args.variant)
    if unknown or bad_systems:
        raise SystemExit(f"bench.py: unknown workload(s) {unknown} or system(s) {bad_systems}; "
                         f"choose from {wl.WORKLOADS} and {SYSTEMS}")
    if any(s.startswith("hf") for s in systems):
        try:
            import peft  # noqa: F401
            import transformers  # noqa: F401
        except ImportError as e:
            raise SystemExit(f"bench.py: the transformers + peft baseline needs them installed ({e}); "
                             "pip install -e '.[test]' (they are benchmark dependencies, not runtime ones)")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = LlamaConfig(**wl.SHAPES[shape])
    works = wl.workloads(shape)
    w2_scale = wl.BATCHING[shape][3]
    device_name = describe_device(device)
    date = datetime.date.today().isoformat()
    out_dir = Path(args.out_dir)
    name = args.name or f"{device_slug(device_name)}-{date}"

    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        tmp = Path(tmp)
        model_dir = tmp / "model"
        model_dir.mkdir()
        (model_dir / "config.json").write_text(json.dumps(config.to_hf_dict(), indent=2))
        w2_path, w2_source = None, None
        if any(n != "W1" for n in names):
            real = (Path(args.w2_data) if args.w2_data != "auto" else
                    wl.real_eval_split() if shape == "full" else None)
            if real is not None:
                w2_path, w2_source = real, f"guanaco file {real}"
            else:
                n_conv = max(256, 3 * steps * works["W2-padded"].batch_size)
                w2_path = wl.write_synthetic_guanaco(tmp / "w2.jsonl", n_conv, seed=0, scale=w2_scale)
                w2_source = wl.w2_source_description(None, n_conv, w2_scale)
        peak_flops = measure_matmul_peak(device, dtype)
        ctx = dict(device=device, dtype=dtype, config=config, steps=steps, warmup=warmup, tmp=tmp,
                   model_dir=model_dir, w2_path=w2_path, dropout=args.dropout, peak_flops=peak_flops,
                   device_name=device_name, examples={})
        meta = {
            "date": date, "device": device_name, "device_type": device.type, "torch": torch.__version__,
            "python": platform.python_version(), "cpu_threads": torch.get_num_threads(),
            "command": "python bench/bench.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None
                                                                                     else sys.argv[1:])),
            "shape": shape, "model_config": dataclasses.asdict(config), "steps": steps, "warmup_steps": warmup,
            "dtype": str(dtype).replace("torch.", ""), "peak_flops": peak_flops,
            "peak_flops_note": f"measured: {'8192' if device.type == 'cuda' else '1024'}^2 "
                               f"{str(dtype).replace('torch.', '')} matmul on this device, this run",
            "workloads": {n: wl.as_dict(works[n]) for n in names}, "w2_source": w2_source,
            "targets": TARGETS, "lora_targets": list(LoRAConfig(rank=1, alpha=1.0).targets),
        }
        if any(s.startswith("hf") for s in systems):
            from bench import hf_baseline
            meta.update(hf_baseline.versions())
        if w2_path is not None:
            meta["w2_padding_fraction"] = padding_report(works[[n for n in names if n != "W1"][0]], ctx)
        results = {**meta, "rows": [], "decode_rows": [], "errors": []}
        print(f"bench: {device_name}, torch {torch.__version__}, shape {shape}, {steps} steps per run "
              f"({warmup} warm-up), matmul peak {peak_flops / 1e12:.2f} TFLOP/s ({meta['dtype']})", flush=True)
        for system, wname, rank in plan(args, ranks, names, systems):
            w = works[wname]
            print(f"\n=== {system} {wname} rank {rank} ===", flush=True)
            try:
                if system.startswith("this["):
                    row = run_this(w, rank, ctx=ctx, variant=(system[5:-1], variants[system[5:-1]]))
                elif system.startswith("this"):
                    row = run_this(w, rank, ctx=ctx, compile=system == "this-compile")
                else:
                    row = run_hf(w, rank, ctx=ctx, compile=system == "hf-compile")
            except Exception as e:  # one failed run (say, a compiler missing) must not lose the others
                traceback.print_exc()
                results["errors"].append(f"{system} {wname} rank {rank}: {type(e).__name__}: {e}"[:2000])
                release(compiled=True)
                write_results(results, out_dir, name)
                continue
            results["rows"].append(row)
            print(f"--- {system} {wname} r{rank}: {row['seconds']:.2f} s for {row['steps']} steps, "
                  f"{row['tokens_per_s']:,.0f} tokens/s steady, median step {row['step_ms_median']:.1f} ms", flush=True)
            write_results(results, out_dir, name)
        if args.decode:
            results["decode_rows"], results["decode_note"] = run_decode(args, device)
    path = write_results(results, out_dir, name)
    print("\n" + render(results))
    print(f"\nresults: {path} and {path.with_suffix('.json')}")
    return results


def run_decode(args, device) -> tuple[list, str]:
    try:
        import transformers  # noqa: F401
    except ImportError:
        note = "decode benchmark skipped: it compares with transformers, which is not installed"
        print(note)
        return [], note
    from bench import decode_bench

    extra = (shlex.split(args.decode_args) if args.decode_args else
             ["--full"] if device.type == "cuda" else CPU_DECODE_ARGS)
    argv = ["--device", str(device), *extra]
    print(f"\n=== decode benchmark: bench/decode_bench.py {' '.join(argv)} ===", flush=True)
    return decode_bench.main(argv), "bench/decode_bench.py " + " ".join(argv)


# ---- reporting ----------------------------------------------------------------------------------------------

def _fmt(v, spec: str, none: str = "n/a") -> str:
    return none if v is None else format(v, spec)


def find(rows, system, workload, rank) -> dict | None:
    for r in reversed(rows):
        if (r["system"], r["workload"], r["rank"]) == (system, workload, rank):
            return r
    return None


def ratio(row, rows, system) -> float | None:
    """This row's tokens/s over the baseline's on the same workload family (W2: its pad-to-longest run)."""
    base_workload = "W1" if row["workload"] == "W1" else "W2-padded"
    base = find(rows, system, base_workload, row["rank"])
    if base is None or row["system"].startswith("hf") or not base["tokens_per_s"]:
        return None
    return row["tokens_per_s"] / base["tokens_per_s"]


def title(res) -> str:
    shape = res["shape"]
    c = res["model_config"]
    what = ("TinyLlama-1.1B shape, random weights" if shape == "full" else
            f"SCALED-DOWN {shape.upper()} CONFIGURATION, not the real model: {c['num_hidden_layers']} layers, "
            f"width {c['hidden_size']}, {c['num_attention_heads']} heads / {c['num_key_value_heads']} KV heads, "
            f"MLP {c['intermediate_size']}, vocabulary {c['vocab_size']}")
    return (f"LoRA rank table: {res['steps']} optimizer steps per rank of train.py on {res['device']} "
            f"({res['dtype']}), torch {res['torch']}; {what}")


def rank_table(res) -> list[str]:
    rows = [r for r in res["rows"] if r["system"] == "this" and r["workload"] == "W1"]
    if not rows:
        return []
    w = res["workloads"].get("W1", {}).get("description", "W1")
    lines = [f"W1 ({w}), alpha = rank, LoRA on {','.join(res['lora_targets'])}:", "",
             "| Rank | Training Time (s) | Trainable Params | Total Params | Trainable % | tokens/s | MFU | "
             "peak memory (GiB) |", "|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: r["rank"]):
        lines.append(f"| {r['rank']} | {r['seconds']:.2f} | {r['trainable_params']:,} | {r['total_params']:,} | "
                     f"{r['trainable_percent']:.2f} | {r['tokens_per_s']:,.0f} | {100 * r['mfu']:.1f}% | "
                     f"{_fmt(r['peak_gib'], '.2f')} |")
    return lines


def comparison_table(res) -> list[str]:
    rows = res["rows"]
    has_hf = any(r["system"].startswith("hf") for r in rows)
    head = ("| system | workload | rank | steps | time (s) | median step (ms) | tokens/s | padding | MFU | peak GiB |"
            + (" vs hf-eager | vs hf-compile |" if has_hf else ""))
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        line = (f"| {r['system']} | {r['workload']} | {r['rank']} | {r['steps']} | {r['seconds']:.2f} | "
                f"{r['step_ms_median']:.1f} | {r['tokens_per_s']:,.0f} | {100 * r['padding_fraction']:.1f}% | "
                f"{100 * r['mfu']:.1f}% | {_fmt(r['peak_gib'], '.2f')} |")
        if has_hf:
            line += "".join(f" {_fmt(ratio(r, rows, s), '.2f', '')}{'x' if ratio(r, rows, s) else ''} |"
                            for s in ("hf-eager", "hf-compile"))
        lines.append(line)
    return lines


def target_checks(res) -> list[str]:
    """The issue's targets against what this run measured; a target that needs a run not made says so."""
    rows, t, cuda = res["rows"], res["targets"], res["device_type"] == "cuda"
    focus = sorted({r["rank"] for r in rows if r["system"].startswith("hf")} or {64})[0]
    out = []

    def check(label, ok, detail, gpu_target=False):
        verdict = ("for reference (a GPU target)" if gpu_target and not cuda else
                   "MET" if ok else "NOT MET" if ok is not None else "n/a")
        out.append(f"- {verdict}: {label}: {detail}")

    w1 = {r["rank"]: r for r in rows if r["system"] == "this" and r["workload"] == "W1"}
    if 4 in w1 and len(w1) > 1:
        worst = max(w1.values(), key=lambda r: r["seconds"])
        spread = worst["seconds"] / w1[4]["seconds"] - 1
        check(f"every rank within {100 * t['rank_spread']:.0f}% of rank 4's time", spread <= t["rank_spread"],
              f"slowest is rank {worst['rank']} at {100 * spread:+.1f}% of rank 4 (each rank: "
              + ", ".join(f"{r} {100 * (w1[r]['seconds'] / w1[4]['seconds'] - 1):+.0f}%" for r in sorted(w1)) + ")")
    eager, comp = (find(rows, s, "W1", focus) for s in ("hf-eager", "hf-compile"))
    # This project's best W1 run at the focus rank, with or without --compile (the label says which).
    ours = max((r for r in rows if r["system"].startswith("this") and r["workload"] == "W1" and r["rank"] == focus),
               key=lambda r: r["tokens_per_s"], default=None)
    if ours:
        out.append(f"- (this project's W1 rank {focus} below: the `{ours['system']}` run)")
    if ours and cuda and res["shape"] == "full":
        check(f"W1 rank {focus} >= {t['w1_tokens_per_s']:,} tokens/s", ours["tokens_per_s"] >= t["w1_tokens_per_s"],
              f"{ours['tokens_per_s']:,.0f} tokens/s, MFU {100 * ours['mfu']:.1f}%")
    if ours and comp:
        x = ours["tokens_per_s"] / comp["tokens_per_s"]
        check(f"W1 >= {t['w1_vs_hf_compile']}x transformers + peft under torch.compile", x >= t["w1_vs_hf_compile"],
              f"{x:.2f}x", gpu_target=True)
    if ours and eager:
        x = ours["tokens_per_s"] / eager["tokens_per_s"]
        check(f"W1 about {t['w1_vs_hf_eager']}x transformers + peft eager", x >= t["w1_vs_hf_eager"], f"{x:.2f}x",
              gpu_target=True)
        if cuda:
            check("W1 peak memory no higher than transformers + peft eager", ours["peak_gib"] <= eager["peak_gib"],
                  f"{ours['peak_gib']:.2f} vs {eager['peak_gib']:.2f} GiB")
        else:
            a, b = ours["step_ms_median"], eager["step_ms_median"]
            check("CPU: step time no higher than transformers + peft eager's", a <= b,
                  f"median step {a:.1f} vs {b:.1f} ms ({a / b:.2f}x)")
    w2_base = find(rows, "hf-eager", "W2-padded", focus)
    w2_ours = [r for r in rows if r["system"].startswith("this") and r["workload"].startswith("W2")]
    if w2_base and w2_ours:
        best = max(w2_ours, key=lambda r: r["tokens_per_s"])
        x = best["tokens_per_s"] / w2_base["tokens_per_s"]
        check(f"W2 useful tokens/s >= {t['w2_vs_hf_eager']}x transformers + peft eager (pad-to-longest)",
              x >= t["w2_vs_hf_eager"], f"{x:.2f}x ({best['system']} {best['workload']} "
              f"{best['tokens_per_s']:,.0f} vs {w2_base['tokens_per_s']:,.0f} tokens/s"
              + (f"; {res['shape']} shape, not the real one" if res["shape"] != "full" else "") + ")",
              gpu_target=True)
    return out


def render(res) -> str:
    lines = [f"# {title(res)}", ""]
    lines += rank_table(res)
    if res["rows"]:
        lines += ["", "All runs (tokens/s: steady state, real non-pad tokens; time: all steps; ratios: this "
                      "project's tokens/s over the baseline's on the same workload, W2 against the baseline's "
                      "pad-to-longest W2-padded):", ""]
        lines += comparison_table(res)
        lines += ["", "Targets:", ""] + target_checks(res)
    lines += ["", "## Setup", ""]
    setup = {
        "date": res["date"], "device": res["device"], "torch": res["torch"],
        "transformers / peft": f"{res['transformers']} / {res['peft']}" if "transformers" in res else "not run",
        "command": f"`{res['command']}`", "shape": json.dumps(res["model_config"]),
        "steps": f"{res['steps']} per run, the first {res['warmup_steps']} left out of tokens/s",
        "matmul peak": f"{res['peak_flops'] / 1e12:.2f} TFLOP/s ({res['peak_flops_note']})",
    }
    if res.get("note"):
        setup["note"] = res["note"]
    for n, w in res["workloads"].items():
        setup[f"workload {n}"] = w["description"]
    if res.get("w2_source"):
        setup["W2 data"] = res["w2_source"]
    if res.get("w2_padding_fraction"):
        setup["W2 padding (one epoch)"] = ", ".join(f"{k} {100 * v:.1f}%" for k, v in
                                                    res["w2_padding_fraction"].items())
    loads = [r["load_avg"] for r in res["rows"] if r.get("load_avg") is not None]
    if loads and res["device_type"] == "cpu":
        setup["machine load"] = (f"1-minute load average {min(loads):.1f} to {max(loads):.1f} at the end of the runs "
                                 f"({res['cpu_threads']} torch threads): above that, other work shared the cores")
    fpt = {(r["workload"], r["rank"]): r["flops_per_token"] for r in res["rows"]}
    if fpt:
        setup["FLOPs per token"] = ", ".join(f"{w} r{r}: {v / 1e9:.3f} G" for (w, r), v in sorted(fpt.items()))
    lines += [f"- {k}: {v}" for k, v in setup.items()]
    if res.get("decode_rows"):
        from bench.decode_bench import format_table
        lines += ["", f"## Decoding ({res.get('decode_note', '')})", "", "```", format_table(res["decode_rows"]),
                  "```"]
    elif res.get("decode_note"):
        lines += ["", f"Decoding: {res['decode_note']}"]
    if res.get("errors"):
        lines += ["", "## Runs that failed", ""] + [f"- {e}" for e in res["errors"]]
    return "\n".join(lines) + "\n"


def write_results(res, out_dir: Path, name: str) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    md = out_dir / f"{name}.md"
    tmp = out_dir / f".{name}.json.tmp"
    tmp.write_text(json.dumps(res, indent=1, default=str) + "\n")
    os.replace(tmp, out_dir / f"{name}.json")
    md.write_text(render(res))
    return md


def combine(args) -> dict:
    """One results file from several (gpu_check.sh runs its stages as separate processes)."""
    parts = [json.loads(Path(p).read_text()) for p in args.combine]
    res = {**parts[0], "rows": [], "decode_rows": [], "errors": []}
    for p in parts:
        keys = {(r["system"], r["workload"], r["rank"]) for r in p["rows"]}
        res["rows"] = [r for r in res["rows"] if (r["system"], r["workload"], r["rank"]) not in keys] + p["rows"]
        res["decode_rows"] += p.get("decode_rows", [])
        res["errors"] += p.get("errors", [])
        for k in ("transformers", "peft", "decode_note", "w2_padding_fraction", "w2_source"):
            if p.get(k) is not None:
                res[k] = p[k]
        res["workloads"] = {**res["workloads"], **p["workloads"]}
    res["command"] = "; ".join(p["command"] for p in parts)
    if args.note:
        res["note"] = args.note
    name = args.name or Path(args.combine[0]).stem
    path = write_results(res, Path(args.out_dir), name)
    print(render(res))
    print(f"results: {path} and {path.with_suffix('.json')}")
    return res


if __name__ == "__main__":
    main()
