"""Score a model and its LoRA adapter on lm-evaluation-harness tasks: did the adapter get better?

    python eval.py --adapter runs/r64/adapter --tasks hellaswag,arc_easy --limit 200
    python eval.py --adapter runs/r64/adapter --no-adapter --tasks hellaswag --limit 200   # its base alone
    python eval.py --adapter runs/r64/adapter --tasks my_task --include-path tasks/ --output results/
    make eval ADAPTER=runs/r64/adapter TASKS=hellaswag ARGS="--limit 200"

The model is `--model`, else the base the adapter records (as `chat.py` and the export read it). The adapter is
loaded as training left it, unmerged: LoRA, DoRA, and on an NF4 base with `--quantize nf4` (how a QLoRA adapter
was trained), with nothing exported first. The model is this project's own (`evaluation.harness.HarnessLM`),
scored by lm-eval 0.4 (`pip install -e .[eval]`) exactly as its `hf` model scores the same weights.

`--apply-chat-template` renders each prompt through the adapter's chat template (its `chat_template.jinja`, what
training used; guanaco for an adapter without one), else the model's own. Results (and with `--log-samples`,
every request and answer) are written by lm-eval's `EvaluationTracker` under `--output`, and the table lm-eval
prints is printed on stdout. Tasks are lm-eval's, or your own YAML files in an `--include-path` folder
(docs/eval.md).

Left out: several GPUs, `--batch-size auto`, lm-eval's request cache, W&B logging of results, pushing to the Hub.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

import lora
from tinyllama.checkpoint import load_model, resolve_checkpoint
from tinyllama.export import resolve_base
from tinyllama.quant import QUANTIZE_CHOICES
from tinyllama.runtime import DTYPES, resolve_device, resolve_dtype
from tinyllama.templates import adapter_template
from tinyllama.tokenizer import load_tokenizer


def _parse(argv):
    p = argparse.ArgumentParser(prog="python eval.py", description=__doc__.split("\n")[0])
    p.add_argument("--adapter", help="LoRA adapter folder (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--no-adapter", action="store_true",
                   help="score the base alone: --model, else the base --adapter records")
    p.add_argument("--model", help="checkpoint folder or Hub id (default: the base the adapter records)")
    p.add_argument("--quantize", default="none", choices=["none", *QUANTIZE_CHOICES],
                   help="load the base's projections as NF4, as a QLoRA adapter was trained")
    p.add_argument("--double-quant", action="store_true", help="with --quantize nf4: quantise the block scales too")
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval task names (or globs, or .yaml files)")
    p.add_argument("--include-path", help="a folder of your own task YAMLs, added to lm-eval's")
    p.add_argument("--num-fewshot", type=int, help="examples before each question (default: the task's)")
    p.add_argument("--limit", type=float, help="at most N examples per task (a number below 1: that fraction)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (default 8)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help="auto: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--apply-chat-template", action="store_true",
                   help="render prompts through the adapter's chat template, else the model's")
    p.add_argument("--output", help="folder for lm-eval's results JSON (and samples with --log-samples)")
    p.add_argument("--log-samples", action="store_true", help="also write every request and answer (needs --output)")
    p.add_argument("--seed", type=int, help="every seed lm-eval takes (few-shot sampling, ...); default: lm-eval's")
    return p.parse_args(argv)


def _check(args) -> None:
    """Refuse what cannot work before anything is loaded."""
    if args.adapter is None and not args.no_adapter:
        raise ValueError("pass --adapter DIR to score an adapter, or --no-adapter with --model to score a base")
    if args.no_adapter and args.adapter is None and args.model is None:
        raise ValueError("--no-adapter needs --model (or --adapter, whose recorded base is then scored alone)")
    if args.log_samples and not args.output:
        raise ValueError("--log-samples writes the samples under --output; pass --output DIR")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise ValueError(f"--num-fewshot must be 0 or more, got {args.num_fewshot}")
    if args.limit is not None and args.limit <= 0:
        raise ValueError(f"--limit must be above 0, got {args.limit:g}")
    if args.double_quant and args.quantize == "none":
        raise ValueError("--double-quant applies to --quantize nf4; add that")
    if args.include_path and not Path(args.include_path).is_dir():
        raise ValueError(f"--include-path {args.include_path} is not a folder; pass the folder holding your task YAMLs")


def task_names(spec: str, include_path: str | None):
    """lm-eval's TaskManager and the tasks `spec` names, or ValueError naming the ones it does not know."""
    from lm_eval.tasks import TaskManager

    names = [t.strip() for t in spec.split(",") if t.strip()]
    if not names:
        raise ValueError("--tasks names no task; pass e.g. --tasks hellaswag,arc_easy")
    # Indexing lm-eval's own thousands of task files takes seconds to tens of seconds: skipped when the
    # --include-path folder holds every task named.
    manager = TaskManager(include_path=include_path, include_defaults=False) if include_path else None
    if manager is None or any(not t.endswith(".yaml") and not manager.match_tasks([t]) for t in names):
        manager = TaskManager(include_path=include_path)
    missing = [t for t in names if not t.endswith(".yaml") and not manager.match_tasks([t])]
    if missing:
        where = f" or in {include_path}" if include_path else " (your own need --include-path)"
        raise ValueError(f"unknown task(s) {', '.join(missing)}: not among lm-eval's tasks{where}; `lm-eval ls "
                         "tasks` lists them")
    return manager, names


def build(args, device: torch.device, dtype: torch.dtype):
    """The HarnessLM to score, and the model_args string that names it in lm-eval's results."""
    from evaluation.harness import HarnessLM

    found = lora.read_adapter_file(args.adapter) if args.adapter else None
    base, folder = resolve_base(found, args.model) if found else (args.model, resolve_checkpoint(args.model))
    scored = None if args.no_adapter else found
    quantize = None if args.quantize == "none" else args.quantize
    model = load_model(folder, dtype=dtype, device=device, lora_config=scored.config if scored else None,
                       quantize=quantize, double_quant=args.double_quant)
    if scored is not None:
        lora.load_adapter(model, scored)
    tokenizer = load_tokenizer(folder)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"the tokenizer of {folder} has {tokenizer.vocab_size} tokens but the model only "
                         f"{model.config.vocab_size} embeddings")
    template = None
    if args.apply_chat_template:
        template = adapter_template(None, args.adapter if scored else None, folder, tokenizer)
    model_args = f"pretrained={base}" + (f",peft={args.adapter}" if scored else "")
    if quantize:
        model_args += f",quantize={quantize}"
    lm = HarnessLM(model, tokenizer, template=template, batch_size=args.batch_size, name=str(base))
    return lm, model_args


def _error(e: Exception) -> int:
    # One line, whatever raised it: lm-eval's and datasets' messages may span several.
    print("error: " + " ".join(str(e).split()), file=sys.stderr)
    return 2


def main(argv=None) -> int:
    args = _parse(argv)
    try:
        _check(args)
        import lm_eval  # noqa: F401 - the extra's absence is said here, in one line
    except ImportError:
        print("error: eval.py needs lm-evaluation-harness: pip install -e .[eval]", file=sys.stderr)
        return 2
    except ValueError as e:
        return _error(e)
    from lm_eval import simple_evaluate
    from lm_eval.loggers import EvaluationTracker
    from lm_eval.utils import make_table

    logging.getLogger("lm_eval").setLevel(logging.WARNING)  # its INFO lines would bury the table
    try:
        device = resolve_device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {args.device} asked for CUDA, but this machine has no usable GPU; use "
                             "--device cpu")
        dtype = resolve_dtype(args.dtype, device)
        manager, tasks = task_names(args.tasks, args.include_path)
        lm, model_args = build(args, device, dtype)
        seeds = {} if args.seed is None else {f"{k}_seed": args.seed for k in
                                              ("random", "numpy_random", "torch_random", "fewshot_random")}
        tracker = EvaluationTracker(output_path=args.output) if args.output else None
        results = simple_evaluate(model=lm, model_args=model_args, tasks=tasks, num_fewshot=args.num_fewshot,
                                  limit=int(args.limit) if args.limit and args.limit >= 1 else args.limit,
                                  batch_size=args.batch_size, device=str(device), log_samples=args.log_samples,
                                  evaluation_tracker=tracker, apply_chat_template=args.apply_chat_template,
                                  task_manager=manager, **seeds)
    except (ValueError, OSError, RuntimeError, KeyError) as e:  # lm-eval's and datasets' errors end here too
        return _error(e)
    samples = results.pop("samples", None)
    if tracker is not None:
        tracker.save_results_aggregated(results=results, samples=samples)
        if args.log_samples:
            for task in results["configs"]:
                tracker.save_results_samples(task_name=task, samples=samples[task])
        print(f"results written under {args.output}", file=sys.stderr)
    print(f"{model_args}, limit: {args.limit}, num_fewshot: {args.num_fewshot}, batch_size: {args.batch_size}")
    print(make_table(results))
    if "groups" in results:
        print(make_table(results, "groups"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
