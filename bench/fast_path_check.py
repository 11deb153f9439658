"""The runtime plan's fast paths, each checked once beside its plain path on this machine (gpu_check's first stage).

    python -m bench.fast_path_check            # the TinyLlama-1.1B shape, random weights, LoRA r=64 on the MLP
    python -m bench.fast_path_check --shape tiny --device cpu --fused-mlp --varlen   # the same checks on a CPU
    python -m bench.fast_path_check --shape gemma-2-2b    # a family's shape: its sliding layer, its softcapped
                                                          # attention through FlexAttention (CUDA)

What `train.py` does at start-up (`tinyllama.startup_check.check_fast_paths`), with every line shown: which fast paths
the plan picked here, and for each whether it matched its plain path on one layer in the plan's dtype. Exit status
1 when one failed (it would be turned off in training).
"""

from __future__ import annotations

import argparse
import sys

import torch

from lora import LoRAConfig
from tinyllama.checkpoint import model_config, random_model
from tinyllama.config import LlamaConfig
from tinyllama.runtime import FAST_PATHS, plan_runtime, resolve_device, resolve_dtype
from tinyllama.shapes import SHAPES
from tinyllama.startup_check import check_fast_paths, probe_layers

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.fast_path_check", description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--shape", choices=["tinyllama", "tiny", *sorted(SHAPES)], default="tinyllama")
    p.add_argument("--fused-mlp", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--varlen", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--flex-softcap", action=argparse.BooleanOptionalAction, default=None,
                   help="Gemma 2's softcapped attention via FlexAttention (default: on CUDA where torch has it)")
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    dtype = resolve_dtype("auto", device)
    # One layer is all the check runs; the rest of the model would only cost memory and time.
    if args.shape in ("tiny", "tinyllama"):
        config = LlamaConfig(**TINY) if args.shape == "tiny" else LlamaConfig(num_hidden_layers=1)
    else:  # as many layers as the check probes: the first, and the first sliding one
        full = model_config(args.shape)
        config = full.with_layers(max(probe_layers(full)) + 1)
    torch.manual_seed(0)
    targets = config.attention_projections + config.mlp_projections  # every projection, softcapped q/k included
    model = random_model(config, dtype=dtype, device=device, lora_config=LoRAConfig(64, 64.0, targets=targets))
    for name, param in model.named_parameters():
        if "lora_B" in name:  # B = 0 (a fresh adapter) would hide a wrong LoRA branch
            torch.nn.init.normal_(param, std=0.02)
    plan = plan_runtime(config, device, dtype, lora_config=model.lora_config, fused_mlp=args.fused_mlp,
                        varlen=args.varlen, flex_softcap=args.flex_softcap)
    print(f"plan on {device}: {plan.describe()}")
    checked = check_fast_paths(model, plan, print)
    failed = [name for name in FAST_PATHS if getattr(plan, name) != getattr(checked, name)]
    print(f"fast paths failed: {', '.join(failed) or 'none'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
