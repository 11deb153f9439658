"""DPO speed and memory: this project's preference step against trl's `DPOTrainer`, same model, pairs and batch.

    python -m bench.preference_bench --out bench/results/cpu-2-cores-DATE-dpo.md   # both, alternately, 3 times
    python -m bench.preference_bench --system ours|trl --folder DIR                  # one run (what the above calls)

The model is a random Llama saved with transformers' `save_pretrained` (`--width`, `--mlp`, `--layers`, the
32,000-token vocabulary and TinyLlama's tokenizer; default: a quarter of TinyLlama's width and MLP, 2 layers, its
heads of 64 and 8 query heads per KV head), the pairs standard rows of random words (prompt 48 words, replies
24-56), each pair trained on once. Both systems: fp32 on CPU (bf16 base under bf16 autocast on CUDA), LoRA rank 16,
alpha 32, no dropout, on gate/up/down (this project's default targets), beta 0.1, a fresh adapter (the reference
is the base), `--batch-size` pairs a step with no accumulation, AdamW, clip 1.0, constant lr. trl is given the
peft model and no reference model, as its documentation shows.

Each run is its own process, so its peak memory is its own: `ru_maxrss` on a CPU (the whole process: Python,
the imports, the model), `torch.cuda.max_memory_allocated` on CUDA. tokens/s counts the real tokens of the
chosen and rejected sequences (prompt included) over the timed steps, after `--warmup` steps, per wall second
and per second of the process's CPU time (on a shared CPU the steadier figure). A step is timed from the
micro-batch's copy to the device to the end of AdamW's step (this project's `step_s`; for trl, its Trainer's
`on_step_begin` to `on_step_end`, which also leaves out loading the batch). On a shared machine, run each system
several times alternately (`--repeats`) and read the median, which the table reports.

trl, transformers and peft are imported here only, in the runs that use them.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("river mountain cloud engine garden window letter market silver planet candle forest bridge winter "
         "doctor ocean music paper stone summer harbor lantern meadow castle pencil island").split()
SYSTEMS = ("ours", "trl")
COLUMNS = ("system", "tokens/s (median)", "runs (tokens/s)", "tokens per CPU second (median)", "peak memory (median)",
           "timed steps")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--system", choices=(*SYSTEMS, "both"), default="both")
    p.add_argument("--folder", default="runs/preference-bench", help="where the model, pairs and runs go")
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--mlp", type=int, default=1408)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=2, help="pairs a step")
    p.add_argument("--max-len", type=int, default=256)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--warmup", type=int, default=1, help="steps run before the timed ones")
    p.add_argument("--steps", type=int, default=3, help="timed steps")
    p.add_argument("--repeats", type=int, default=3, help="with --system both: runs of each system, alternately")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", help="with --system both: write the result table (markdown) here")
    args = p.parse_args(argv)
    for name in ("width", "mlp", "layers", "batch_size", "max_len", "rank", "steps", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        p.error(f"--warmup must be >= 0, got {args.warmup}")
    return args


def make_inputs(args) -> tuple[Path, Path]:
    """The random model (transformers' files) and the pairs in `args.folder`, made once."""
    folder = Path(args.folder)
    model, pairs = folder / f"model-{args.width}-{args.mlp}-{args.layers}", folder / "pairs.jsonl"
    if not (model / "config.json").is_file():
        import transformers

        from tinyllama.tokenizer import Tokenizer, write_tokenizer_config

        torch.manual_seed(0)
        config = transformers.LlamaConfig(vocab_size=32000, hidden_size=args.width, intermediate_size=args.mlp,
                                          num_hidden_layers=args.layers, num_attention_heads=args.width // 64,
                                          num_key_value_heads=max(1, args.width // 512),
                                          max_position_embeddings=2048)
        transformers.LlamaForCausalLM(config).save_pretrained(model)
        (model / "tokenizer.model").write_bytes((ROOT / "assets" / "tokenizer.model").read_bytes())
        write_tokenizer_config(Tokenizer(model / "tokenizer.model"), model, 2048)
    rng = random.Random(0)

    def words(n: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(n))

    n = args.batch_size * (args.warmup + args.steps)
    rows = [{"prompt": f"Question: {words(48)}?\nAnswer:", "chosen": " " + words(rng.randint(24, 56)),
             "rejected": " " + words(rng.randint(24, 56))} for _ in range(n)]
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return model, pairs


def peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def run_ours(args, model: Path, pairs: Path) -> dict:
    import train

    cpu = []  # process CPU seconds of each step: on a CPU, the steadier figure when other processes share it
    queue_step = train.preference_step.queue_step

    def timed_step(*a, **kw):
        start = time.process_time()
        try:
            return queue_step(*a, **kw)
        finally:
            cpu.append(time.process_time() - start)

    train.preference_step.queue_step = timed_step
    out = Path(args.folder) / "ours"
    cfg = train.TrainConfig(model=str(model), data=str(pairs), eval_data="none", objective="dpo", beta=0.1,
                            rank=args.rank, alpha=2.0 * args.rank, dropout=0.0, lr=5e-6, warmup=0,
                            schedule="constant", batch_size=args.batch_size, grad_accum=1, max_len=args.max_len,
                            steps=args.warmup + args.steps, log_every=1, samples=False, out=str(out),
                            overwrite=True, device=args.device, save_every=0)
    train.train(cfg)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in rows if r["split"] == "train" and r["step"] > args.warmup]
    return {"tokens": sum(r["tokens"] for r in timed), "seconds": sum(r["step_s"] for r in timed),
            "cpu_seconds": sum(cpu[args.warmup:]), "steps": len(timed)}


def run_trl(args, model_folder: Path, pairs: Path) -> dict:
    import datasets
    import peft
    import transformers
    from trl import DPOConfig, DPOTrainer

    device = torch.device(args.device)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_folder)
    # As this project runs: the base in bf16 under bf16 autocast on CUDA (the adapter fp32), fp32 on a CPU.
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = transformers.AutoModelForCausalLM.from_pretrained(model_folder, dtype=dtype).to(device)
    model = peft.get_peft_model(model, peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0,
                                                       target_modules=["gate_proj", "up_proj", "down_proj"]))
    times, cpu, tokens = [], [], []

    class Clock(transformers.TrainerCallback):
        def on_step_begin(self, *_, **__):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            self.start, self.cpu = time.perf_counter(), time.process_time()

        def on_step_end(self, *_, **__):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - self.start)
            cpu.append(time.process_time() - self.cpu)

    class Counting(DPOTrainer):
        def training_step(self, model, inputs, *rest, **kwargs):
            tokens.append(int(inputs["attention_mask"].sum()))  # chosen rows, then rejected rows
            return super().training_step(model, inputs, *rest, **kwargs)

    config = DPOConfig(output_dir=str(Path(args.folder) / "trl"), per_device_train_batch_size=args.batch_size,
                       max_steps=args.warmup + args.steps, learning_rate=5e-6, lr_scheduler_type="constant",
                       warmup_steps=0, logging_steps=10**6, report_to=[], save_strategy="no",
                       use_cpu=device.type == "cpu", bf16=device.type == "cuda", max_length=args.max_len, beta=0.1,
                       seed=0, max_grad_norm=1.0, loss_type=["sigmoid"], dataloader_num_workers=0)
    trainer = Counting(model, args=config, train_dataset=datasets.Dataset.from_list(
                           [json.loads(line) for line in pairs.read_text().splitlines()]),
                       processing_class=tokenizer, callbacks=[Clock()])
    trainer.train()
    return {"tokens": sum(tokens[args.warmup:]), "seconds": sum(times[args.warmup:]),
            "cpu_seconds": sum(cpu[args.warmup:]), "steps": len(times[args.warmup:])}


def one_run(args) -> dict:
    model, pairs = make_inputs(args)
    result = (run_ours if args.system == "ours" else run_trl)(args, model, pairs)
    return {"system": args.system, **result, "tokens_per_s": result["tokens"] / result["seconds"],
            "tokens_per_cpu_s": result["tokens"] / result["cpu_seconds"],
            "peak_bytes": peak_bytes(torch.device(args.device))}


def table(results: list[dict]) -> str:
    """The markdown table of every run's result, one row a system: the median tokens/s and peak memory."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for system in SYSTEMS:
        runs = [r for r in results if r["system"] == system]
        if not runs:
            continue
        speed = statistics.median(r["tokens_per_s"] for r in runs)
        peak = statistics.median(r["peak_bytes"] for r in runs) / 2**30
        each = ", ".join(f"{r['tokens_per_s']:,.0f}" for r in runs)
        per_cpu = statistics.median(r["tokens_per_cpu_s"] for r in runs)
        lines.append(f"| {system} | {speed:,.0f} | {each} | {per_cpu:,.0f} | {peak:.2f} GiB | {runs[0]['steps']} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.system != "both":
        print("RESULT " + json.dumps(one_run(args)), flush=True)
        return
    make_inputs(args)  # once, before any run is timed
    own = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in ("system", "out", "repeats")]
    results = []
    for i in range(args.repeats):
        for system in SYSTEMS:
            proc = subprocess.run([sys.executable, "-m", "bench.preference_bench", *own, "--system", system],
                                  cwd=ROOT, capture_output=True, text=True)
            lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            if proc.returncode or not lines:
                raise SystemExit(f"bench.preference_bench: the {system} run failed (exit {proc.returncode}):\n"
                                 f"{proc.stderr[-3000:]}")
            results.append(json.loads(lines[-1].removeprefix("RESULT ")))
            r = results[-1]
            print(f"run {i + 1} {system}: {r['tokens']} tokens in {r['seconds']:.1f} s ({r['cpu_seconds']:.1f} s "
                  f"of CPU), {r['tokens_per_s']:,.0f} tokens/s, {r['peak_bytes'] / 2**30:.2f} GiB", flush=True)
    text = table(results)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
