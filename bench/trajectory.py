"""Fidelity in bf16: this project and transformers + peft, trained from the same start, follow the same loss curve.

    python -m bench.trajectory --out runs/trajectory                  # GPU: TinyLlama shape, W2 padded, 100 steps
    python -m bench.trajectory --shape tiny --steps 6 --out DIR       # CPU dry run (float32: curves agree to 1e-5)

Both systems start from the same random base (saved by transformers), the same initial adapter (this project's
LoRA initialisation, loaded into PEFT) and see the same micro-batches (`data.BatchStream` over the W2
conversations, padded, length-grouped), with dropout 0, bf16 autocast on CUDA (float32 on a CPU), AdamW, the same
learning-rate schedule and clipping at 1.0. This project runs as `train.train`; transformers + peft as the usual HF
loop (full logits, `labels=`). The measure is the mean absolute difference of the per-step losses. The same
measure between two identical transformers + peft runs is the floor that kernel nondeterminism sets; this
project's curve is "within bf16 noise" when its difference from transformers is of that order.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch

import lora
import train
from bench import workloads as wl
from data import BatchStream, load_examples
from data.stats import DEFAULT_TOKENIZER as TOKENIZER
from lora import LoRAConfig
from tinyllama import LlamaConfig, Tokenizer, load_model
from tinyllama.runtime import device_name, resolve_device, resolve_dtype


def save_base(config: LlamaConfig, folder: Path, dtype: torch.dtype, seed: int) -> Path:
    """A random transformers Llama of `config`'s shape, saved as a checkpoint folder both systems load."""
    import transformers

    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config.to_hf_dict()))
    model.to(dtype).save_pretrained(folder, safe_serialization=True)
    return folder


def hf_losses(base: Path, adapter: Path, stream: BatchStream, settings: train.TrainConfig, steps: int,
              device: torch.device, dtype: torch.dtype) -> list[float]:
    """The usual transformers + peft loop over `stream`, from the adapter in `adapter`; the loss of each step."""
    import peft
    import transformers

    model = transformers.LlamaForCausalLM.from_pretrained(base, dtype=dtype, attn_implementation="sdpa").to(device)
    model.config.use_cache = False
    model = peft.PeftModel.from_pretrained(model, adapter, is_trainable=True)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0, fused=True)
    losses = []
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = train.lr_at(step, settings, steps)
        b = {k: v.to(device) for k, v in next(stream).items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            loss = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, settings.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def mean_abs_diff(a: list[float], b: list[float]) -> float:
    return statistics.fmean(abs(x - y) for x, y in zip(a, b, strict=True))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench.trajectory", description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=["auto", *wl.BENCH_SHAPES], default="auto",
                   help="auto: full on CUDA, tiny on CPU")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", required=True, help="folder for trajectory.md and trajectory.json")
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    dtype = resolve_dtype("auto", device)
    shape = args.shape if args.shape != "auto" else ("full" if device.type == "cuda" else "tiny")
    config = wl.model_config(shape)
    batch, _, max_len, scale = wl.BATCHING[shape]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="trajectory-") as tmp:
        tmp = Path(tmp)
        base = save_base(config, tmp / "model", dtype, seed=0)
        (tmp / "model" / "tokenizer.model").write_bytes(TOKENIZER.read_bytes())
        data = wl.write_synthetic_guanaco(tmp / "w2.jsonl", max(64, 2 * batch * args.steps), seed=0, scale=scale)
        settings = train.TrainConfig(
            model=str(base), data=str(data), eval_data="none", rank=args.rank, alpha=float(args.rank), dropout=0.0,
            lr=args.lr, warmup=min(10, args.steps // 4), batch_size=batch, grad_accum=1, max_len=max_len,
            steps=args.steps, log_every=1, samples=False, out=str(tmp / "ours"), device=str(device), seed=0)
        # The initial adapter train.train will start from (it seeds, then loads), saved for PEFT to start from too.
        torch.manual_seed(settings.seed)
        start = load_model(base, dtype=dtype, device=device, lora_config=LoRAConfig(args.rank, float(args.rank), 0.0))
        lora.save_adapter(start, tmp / "start", base_model=str(base))
        del start
        summary = train.train(settings)
        rows = [json.loads(line) for line in (tmp / "ours" / "metrics.jsonl").read_text().splitlines()]
        ours = [r["loss"] for r in rows if r["split"] == "train"]
        examples = load_examples(str(data), Tokenizer(TOKENIZER), max_len, log=lambda *a: None)
        hf = []
        for _ in range(2):  # two identical runs: their difference is the nondeterminism floor
            stream = BatchStream(examples, batch, max_len, group_by_length=True, seed=settings.seed)
            hf.append(hf_losses(base, tmp / "start", stream, settings, args.steps, device, dtype))
    result = {
        "device": device_name(device), "shape": shape, "dtype": str(dtype).removeprefix("torch."),
        "steps": args.steps, "rank": args.rank, "batch": batch, "max_len": max_len, "lr": args.lr,
        "this_vs_hf": mean_abs_diff(ours, hf[0]), "hf_vs_hf": mean_abs_diff(hf[0], hf[1]),
        "this_vs_hf_max": max(abs(x - y) for x, y in zip(ours, hf[0], strict=True)),
        "first_loss": ours[0], "last_loss": {"this": ours[-1], "hf": hf[0][-1]},
        "losses": {"this": ours, "hf": hf[0], "hf_again": hf[1]}, "this_tokens_per_s": summary["tokens_per_s"],
    }
    (out / "trajectory.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "trajectory.md").write_text(
        f"# Loss trajectory: this project vs transformers + peft ({result['device']}, {result['dtype']})\n\n"
        f"Shape {shape}, rank {args.rank}, W2 padded ({batch} x up to {max_len}), dropout 0, {args.steps} steps, "
        f"same base, initial adapter and batches.\n\n"
        "| measure | mean abs difference of per-step losses | max |\n|---|---|---|\n"
        f"| this project vs transformers + peft | {result['this_vs_hf']:.2e} | {result['this_vs_hf_max']:.2e} |\n"
        f"| transformers + peft vs itself (nondeterminism) | {result['hf_vs_hf']:.2e} | |\n\n"
        f"Loss {ours[0]:.4f} -> {ours[-1]:.4f} (this project), {hf[0][0]:.4f} -> {hf[0][-1]:.4f} "
        "(transformers + peft).\n")
    print((out / "trajectory.md").read_text())
    return result


if __name__ == "__main__":
    main()
