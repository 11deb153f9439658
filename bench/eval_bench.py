"""Requests per second of lm-evaluation-harness loglikelihood requests: this project's `HarnessLM` against
lm-eval's own `hf` model (transformers + PEFT) on the same weights, and what batching and sharing each context's
forward pass across its choices give.

    python -m bench.eval_bench                       # CPU, the `cpu` bench shape, 1,000 requests
    python -m bench.eval_bench --shape full --device cuda --dtype bfloat16

The workload is a multiple-choice task as lm-eval builds it: 250 questions of 4 choices each (1,000 requests),
`Question: ...\\nAnswer:` followed by a choice of 1 to 4 words, the way ARC or HellaSwag put it. The model is a
random model of the shape `--shape` names (`bench.workloads`: `cpu` is TinyLlama scaled down to 4 layers of width
256 with the real 32,000-token vocabulary and tokenizer) with a rank-16 LoRA adapter on every projection (random
B), saved as a checkpoint folder and a PEFT adapter that both models load. Each row times `lm.loglikelihood` over
all 1,000 requests (tokenizing included, lm-eval's own task building not), after one untimed warm-up batch, and
checks that the scores agree with the hf model's.

Rows: `hf` at batch 1 and at --batch-size (lm-eval runs one forward per context + choice); ours with every
request alone (`share_context=False`, the same work as hf) at batch 1 and --batch-size; ours with each context
run once and the choices after it from its KV cache, at --batch-size rows.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import random
import shutil
import tempfile
import time
from pathlib import Path

import torch

import lora
from bench.workloads import model_config
from tinyllama.checkpoint import random_model, save_model
from tinyllama.runtime import DTYPES, device_name
from tinyllama.tokenizer import Tokenizer, load_tokenizer, write_tokenizer_config

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("river mountain cloud engine garden window letter market silver planet candle forest bridge winter "
         "doctor ocean music paper stone summer harbor lantern meadow castle pencil island").split()


def requests(n_questions: int, seed: int = 0):
    """(context, continuation) pairs: n_questions x 4 choices, as lm-eval's multiple_choice output_type makes."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(n_questions):
        question = " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 24)))
        context = f"Question: Which word goes with {question}?\nAnswer:"
        for _ in range(4):
            pairs.append((context, " " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 4)))))
    return pairs


def build_folders(shape: str, out: Path) -> tuple[Path, Path]:
    """A random model of `shape` with the real tokenizer, and a LoRA adapter on it with random B."""
    config = model_config(shape)
    torch.manual_seed(0)
    base = out / "base"
    save_model(random_model(config), base)
    shutil.copy(ROOT / "assets" / "tokenizer.model", base / "tokenizer.model")
    write_tokenizer_config(Tokenizer(base / "tokenizer.model"), base, config.max_position_embeddings)
    from tinyllama.checkpoint import load_model

    targets = config.attention_projections + config.mlp_projections
    model = load_model(base, lora_config=lora.LoRAConfig(rank=16, alpha=32, dropout=0.0, targets=targets))
    with torch.no_grad():
        for layer in lora.lora_layers(model).values():
            layer.lora_B.weight.normal_(0, 0.02)
    lora.save_adapter(model, out / "adapter", base_model=str(base))
    return base, out / "adapter"


def timed(lm, instances) -> tuple[float, float, list]:
    """Wall seconds, CPU seconds of this process, and the scores. On a shared machine the CPU seconds are the
    steadier figure: other processes' load stretches the wall time, not this one's CPU time."""
    lm.loglikelihood(instances[:8], disable_tqdm=True)  # warm-up: first-call allocations, kernel selection
    if lm.device.type == "cuda":
        torch.cuda.synchronize()
    start, cpu = time.perf_counter(), time.process_time()
    scores = lm.loglikelihood(instances, disable_tqdm=True)
    if lm.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, time.process_time() - cpu, scores


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="cpu", help="bench.workloads shape: cpu (default), full, tiny")
    p.add_argument("--questions", type=int, default=250, help="4 requests each (default 250: 1,000 requests)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES))
    args = p.parse_args(argv)

    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from evaluation.harness import HarnessLM
    from tinyllama.checkpoint import load_model

    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    pairs = requests(args.questions)
    instances = [Instance("loglikelihood", {}, pair, idx=i % 4) for i, pair in enumerate(pairs)]
    with tempfile.TemporaryDirectory() as tmp:
        base, adapter = build_folders(args.shape, Path(tmp))
        found = lora.read_adapter_file(adapter)
        model = load_model(base, dtype=dtype, device=device, lora_config=found.config)
        lora.load_adapter(model, found)
        tokenizer = load_tokenizer(base)
        rows = []
        hf_scores = None
        for bs in (1, args.batch_size):
            hf = HFLM(pretrained=str(base), peft=str(adapter), dtype=args.dtype, device=args.device, batch_size=bs)
            seconds, cpu, hf_scores = timed(hf, instances)
            rows.append((f"lm-eval `hf` (transformers + PEFT), one forward per request, batch {bs}", seconds, cpu,
                         0.0))
            del hf
        for share, bs in ((False, 1), (False, args.batch_size), (True, args.batch_size)):
            lm = HarnessLM(model, tokenizer, batch_size=bs, share_context=share)
            seconds, cpu, scores = timed(lm, instances)
            diff = max(abs(a - b) for (a, _), (b, _) in zip(scores, hf_scores, strict=True))
            how = "context shared across its 4 choices" if share else "one forward per request"
            rows.append((f"ours (HarnessLM), {how}, batch {bs} rows", seconds, cpu, diff))
    n = len(instances)
    machine = platform.processor() or platform.machine()
    print(f"{n} loglikelihood requests ({args.questions} questions x 4 choices), shape {args.shape}, {args.dtype}, "
          f"{device_name(device)}, torch threads {torch.get_num_threads()}, {machine}, {datetime.date.today()}")
    print("| model | wall s | requests/s (wall) | CPU s | requests per CPU second | max abs. difference from hf |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, seconds, cpu, diff in rows:
        print(f"| {name} | {seconds:.2f} | {n / seconds:.0f} | {cpu:.2f} | {n / cpu:.0f} | {diff:.1e} |")


if __name__ == "__main__":
    main()
