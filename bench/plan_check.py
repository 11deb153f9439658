"""The plan against the measured peak, for the current defaults: `python -m bench.plan_check --device cuda --out DIR`
(a stage of bench/gpu_check.sh).

For each configuration (the defaults, which on CUDA run the fused LoRA MLP and packed rows; the plain MLP;
NF4; NF4 with gradient checkpointing), a short run of `train.py` on random weights of the benchmark shape and
random tokens (W1: every position labelled) reports `torch.cuda.max_memory_allocated`, and `training.plan`
plans the same settings. Written to DIR/plan_check.md and .json. On a CPU (`--device cpu --shape tiny`) the
same runs happen and the measured column says n/a: the code path is what is checked there.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import train
from tinyllama import LlamaConfig
from training.plan import GIB, plan_step

from .workloads import BATCHING, BENCH_SHAPES

CONFIGS = {
    "defaults": {},
    "plain MLP": {"fused_mlp": False},
    "NF4": {"quantize": "nf4"},
    "NF4 + checkpointing": {"quantize": "nf4", "grad_checkpointing": True},
}


def check(device: str, shape: str, steps: int, out: Path) -> list[dict]:
    batch, length = BATCHING[shape][:2]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        config_path = Path(tmp) / "config.json"
        config_path.write_text(json.dumps(LlamaConfig(**BENCH_SHAPES[shape]).to_hf_dict()))
        for name, settings in CONFIGS.items():
            cfg = train.TrainConfig(model=str(config_path), random_init=True, data=f"random:{batch * steps}",
                                    eval_data="none", steps=steps, batch_size=batch, grad_accum=1, max_len=length,
                                    rank=64, samples=False, device=device, out=str(Path(tmp) / name.replace(" ", "_")),
                                    log_every=steps, **settings)
            summary = train.train(cfg)
            lora_config = train.validate(train.with_machine_defaults(cfg))
            planned = plan_step(train.with_machine_defaults(cfg), lora_config, LlamaConfig(**BENCH_SHAPES[shape]))
            measured = summary["peak_gib"]
            rows.append({"config": name, "measured_gib": measured, "planned_gib": planned["peak_bytes"] / GIB,
                         "error": None if measured is None else planned["peak_bytes"] / GIB / measured - 1,
                         "parts_gib": {k: v / GIB for k, v in planned["parts"].items()}})
    out.mkdir(parents=True, exist_ok=True)
    (out / "plan_check.json").write_text(json.dumps(rows, indent=2))
    lines = [f"# Plan against measured peak ({device}, shape {shape}, {batch} x {length}, {steps} steps)", "",
             "| config | measured GiB | planned GiB | error |", "|---|---|---|---|"]
    for r in rows:
        measured = "n/a" if r["measured_gib"] is None else f"{r['measured_gib']:.2f}"
        error = "n/a" if r["error"] is None else f"{100 * r['error']:+.1f}%"
        lines.append(f"| {r['config']} | {measured} | {r['planned_gib']:.2f} | {error} |")
    (out / "plan_check.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.plan_check", description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--shape", default="full", choices=sorted(BENCH_SHAPES))
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    check(args.device, args.shape, args.steps, Path(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
