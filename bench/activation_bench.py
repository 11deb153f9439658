"""Saved activations and aten ops of one training step, this project (plain and fused MLP) beside transformers +
peft, measured the same way: `python -m bench.activation_bench` (run by `make bench BASELINE=hf`).

The TinyLlama width with two layers, float32 on the CPU, a micro-batch of 2 x 512 tokens every one labelled,
LoRA rank 64 on the MLP with dropout 0.05. For each: the bytes autograd saves for the backward pass during the
forward pass (`training.plan.SavedTensors`: each storage once, parameters and views of them left out), per
token and layer, and the aten operations one forward and backward pass dispatches (a TorchDispatchMode
counting every call). FLOPs from `torch.utils.flop_counter` on the same pass, to show the three do the same
work.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

import lora
from tinyllama.checkpoint import random_model
from tinyllama.config import LlamaConfig
from tinyllama.loss import causal_lm_loss
from tinyllama.runtime import apply_plan, plan_runtime
from training.plan import _CPU_ATTENTION_FLOPS, SavedTensors, labelled_batch

CONFIG = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=2,
              num_attention_heads=32, num_key_value_heads=4)
BATCH, LENGTH, RANK, DROPOUT = 2, 512, 64, 0.05


class OpCount(TorchDispatchMode):
    """How many aten operations run while active."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def _measure(model, step) -> dict:
    exclude = [*model.parameters(), *model.buffers()]
    with FlopCounterMode(display=False, custom_mapping=_CPU_ATTENTION_FLOPS) as flops, OpCount() as ops:
        with SavedTensors(exclude) as saved:
            loss = step()
        loss.backward()
    tokens, layers = BATCH * LENGTH, CONFIG["num_hidden_layers"]
    return {"saved_bytes_per_token_per_layer": saved.bytes / tokens / layers, "aten_ops": ops.count,
            "flops_per_token": flops.get_total_flops() / tokens}


def ours(fused: bool) -> dict:
    config = LlamaConfig(**CONFIG)
    lora_config = lora.LoRAConfig(rank=RANK, alpha=float(RANK), dropout=DROPOUT)
    torch.manual_seed(0)
    model = random_model(config, lora_config=lora_config).train()
    plan = plan_runtime(config, torch.device("cpu"), torch.float32, lora_config=lora_config, fused_mlp=fused)
    apply_plan(model, plan)
    ids, labels, index = labelled_batch(BATCH, LENGTH)

    def step():
        with plan.forward():
            return causal_lm_loss(model, ids, labels, label_index=index)[0]

    return _measure(model, step)


def transformers_peft() -> dict:
    import peft
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(**CONFIG, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(config)
    model = peft.get_peft_model(model, peft.LoraConfig(r=RANK, lora_alpha=RANK, lora_dropout=DROPOUT,
                                                       target_modules=["gate_proj", "up_proj", "down_proj"]))
    model.train()
    ids, labels, _ = labelled_batch(BATCH, LENGTH)
    return _measure(model, lambda: model(input_ids=ids, labels=labels).loss * (labels != -100).sum())


def table(rows: dict) -> str:
    hf = rows["transformers + peft"]["saved_bytes_per_token_per_layer"]
    lines = ["| path | saved bytes per token per layer | vs transformers + peft | aten ops per step | "
             "GFLOPs per token |", "|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['saved_bytes_per_token_per_layer'] / 1000:,.0f}k | "
                     f"{r['saved_bytes_per_token_per_layer'] / hf:.2f}x | {r['aten_ops']} | "
                     f"{r['flops_per_token'] / 1e9:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.activation_bench", description=__doc__.splitlines()[0])
    p.add_argument("--json", help="also write the numbers to this file")
    args = p.parse_args(argv)
    rows = {"this project, plain MLP": ours(fused=False), "this project, fused MLP": ours(fused=True),
            "transformers + peft": transformers_peft()}
    print(table(rows))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
