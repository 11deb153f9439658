"""Supervised fine-tuning of TinyLlama with LoRA, top to bottom in one `main()`.

    python train.py --rank 64 --alpha 64            # guanaco train split from the Hub, adapter in runs/
    torchrun --nproc_per_node 2 train.py --rank 64  # data parallel (NCCL on GPU, gloo on CPU)

Every setting is a field of `TrainConfig`; the command line is generated from it. What it does, in order:
validate settings (before any download or GPU work), load data and model, then for each optimizer step run
`grad_accum` micro-batches whose summed token losses are divided by the labelled-token count of the whole
step (across micro-batches and ranks), clip, step AdamW over the LoRA weights only, log, evaluate, checkpoint.
The output folder is handled by `training.run_folder`: locked while the run writes it, never written over by
another run without --overwrite, checkpoints always whole.

Deliberately left out: full fine-tuning, mixed LoRA ranks per layer, fp16 loss scaling (bf16 needs none),
FSDP/tensor parallelism (a 1.1B frozen base fits on one GPU; data parallel is enough).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.attention import SDPBackend, sdpa_kernel

import lora
from lora import LoRAConfig
from tinyllama import Tokenizer, load_model
from tinyllama.checkpoint import DEFAULT_MODEL, HubUnavailable, resolve_checkpoint
from tinyllama.flops import measure_matmul_peak, training_flops_per_token
from tinyllama.loss import causal_lm_loss, label_positions
from training import TrainingError, run_folder

SCHEDULES = ("cosine", "linear", "constant")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
SDPA_BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                 "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}
DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16}
SAMPLE_PROMPTS = [
    "What is the difference between a list and a tuple in Python?",
    "Give me three tips for sleeping better.",
    "Write a haiku about the sea.",
]


@dataclass
class TrainConfig:
    # What to train
    model: str = field(default=DEFAULT_MODEL, metadata={"help": "Hub repo id or local HF checkpoint folder"})
    data: str = field(default="train", metadata={
        "help": "guanaco split (train, test) or a local .jsonl (guanaco rows or OASST trees); "
                "'random[:N]' = N random token sequences, every position labelled (benchmark workload)"})
    eval_data: str = field(default="test", metadata={"help": "eval split or file; 'none' disables eval"})
    tokenizer: str = field(default="", metadata={"help": "tokenizer.model path (default: the model's)"})
    random_init: bool = field(default=False, metadata={
        "help": "build --model's shape (or TinyLlama's) with random weights instead of loading them"})
    # LoRA
    rank: int = 64
    alpha: float | None = field(default=None, metadata={"help": "LoRA alpha (default: equal to --rank)"})
    dropout: float = 0.05
    targets: str = field(default="gate_proj,up_proj,down_proj", metadata={"help": "comma-separated"})
    rslora: bool = field(default=False, metadata={"help": "scale by alpha/sqrt(rank)"})
    # Optimisation
    lr: float = 2e-4
    warmup: int = field(default=20, metadata={"help": "linear warmup steps"})
    schedule: str = field(default="cosine", metadata={"help": "|".join(SCHEDULES)})
    weight_decay: float = 0.0
    grad_clip: float = field(default=1.0, metadata={"help": "max gradient norm; 0 disables"})
    batch_size: int = field(default=4, metadata={"help": "micro-batch size per process"})
    grad_accum: int = 4
    max_len: int = 1024
    steps: int = field(default=0, metadata={"help": "optimizer steps (0: use --epochs)"})
    epochs: float = 1.0
    packing: bool = field(default=False, metadata={"help": "pack conversations into full rows"})
    group_by_length: bool = field(default=True, metadata={"help": "length-grouped batches (padding mode)"})
    # Bookkeeping
    eval_every: int = field(default=100, metadata={"help": "steps between evals; 0: only at the end"})
    save_every: int = field(default=0, metadata={"help": "steps between checkpoints; 0: none"})
    keep_checkpoints: int = 2
    log_every: int = 10
    out: str = field(default="", metadata={
        "help": "output folder (default: runs/rank{rank}; with --resume, the checkpoint's own folder)"})
    overwrite: bool = field(default=False, metadata={
        "help": "replace an earlier run in --out (its files are removed first); without it such a folder is "
                "refused"})
    resume: str = field(default="", metadata={"help": "checkpoint folder, or an output folder (latest)"})
    seed: int = 0
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda, cuda:N"})
    dtype: str = field(default="auto", metadata={"help": "auto (bfloat16 on CUDA, float32 on CPU), "
                                                         "float32, bfloat16"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the model (see --compile-scope)"})
    compile_scope: str = field(default="layers", metadata={"help": "layers: each decoder layer on its own "
                                                                    "(fast to compile); model: all of it"})
    compile_mode: str = field(default="default", metadata={"help": "torch.compile mode: "
                                                                   + "|".join(COMPILE_MODES)})
    sdpa_backends: str = field(default="flash,cudnn,efficient,math", metadata={
        "help": "attention kernels in order of preference (flash, efficient, cudnn, math), or 'default' for "
                "PyTorch's own order; see sdpa_context"})
    grad_checkpointing: bool = False
    dist_timeout: float = field(default=300.0, metadata={
        "help": "seconds a data-parallel process waits for the others before the job stops with an error"})
    debug: bool = field(default=False, metadata={"help": "show the Python traceback of errors (or TRAIN_DEBUG=1)"})
    samples: bool = field(default=True, metadata={"help": "print base vs fine-tuned answers at the end"})
    dry_run: bool = field(default=False, metadata={"help": "print the parameter table and exit"})


# ---- settings --------------------------------------------------------------------------------------------

class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default, except None: those help texts say what the default is computed from."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def parse_args(argv=None) -> TrainConfig:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=_HelpFormatter)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        help_ = f.metadata.get("help", " ")
        if f.type in ("bool", bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=help_)
        else:  # "float | None": None stands for a default computed from other settings (see the help)
            name = f.type if isinstance(f.type, str) else f.type.__name__
            kind = {"int": int, "float": float, "str": str}[name.removesuffix(" | None")]
            parser.add_argument(flag, type=kind, default=f.default, help=help_)
    return TrainConfig(**vars(parser.parse_args(argv)))


def validate(cfg: TrainConfig) -> LoRAConfig:
    """Refuse bad settings before anything is downloaded or put on a GPU."""
    problems = []

    def need(ok, msg):
        if not ok:
            problems.append(msg)

    need(cfg.lr > 0 and math.isfinite(cfg.lr), f"--lr must be a finite number > 0, got {cfg.lr}")
    for name in ("epochs", "weight_decay", "grad_clip", "dropout", "dist_timeout"):
        need(math.isfinite(getattr(cfg, name)), f"--{name.replace('_', '-')} must be finite, got {getattr(cfg, name)}")
    need(cfg.alpha is None or cfg.alpha > 0, f"--alpha must be > 0 (leave it out for alpha = rank), got {cfg.alpha}")
    need(0 <= cfg.seed < 2**32, f"--seed must be in 0..2**32-1, got {cfg.seed}")
    need(cfg.dist_timeout > 0, f"--dist-timeout must be > 0 seconds, got {cfg.dist_timeout}")
    need(cfg.warmup >= 0, f"--warmup must be >= 0, got {cfg.warmup}")
    need(cfg.schedule in SCHEDULES, f"--schedule must be one of {SCHEDULES}, got {cfg.schedule!r}")
    need(cfg.weight_decay >= 0, f"--weight-decay must be >= 0, got {cfg.weight_decay}")
    need(cfg.grad_clip >= 0, f"--grad-clip must be >= 0 (0 disables), got {cfg.grad_clip}")
    need(cfg.batch_size >= 1, f"--batch-size must be >= 1, got {cfg.batch_size}")
    need(cfg.grad_accum >= 1, f"--grad-accum must be >= 1, got {cfg.grad_accum}")
    need(cfg.max_len >= 8, f"--max-len must be >= 8, got {cfg.max_len}")
    need(cfg.steps >= 0, f"--steps must be >= 0, got {cfg.steps}")
    need(cfg.steps > 0 or cfg.epochs > 0, f"--epochs must be > 0 when --steps is 0, got {cfg.epochs}")
    for name in ("eval_every", "save_every", "log_every", "keep_checkpoints"):
        need(getattr(cfg, name) >= 0, f"--{name.replace('_', '-')} must be >= 0, got {getattr(cfg, name)}")
    need(cfg.dtype in DTYPES, f"--dtype must be one of {list(DTYPES)}, got {cfg.dtype!r}")
    device = None
    try:
        device = resolve_device(cfg.device)
        need(device.type in ("cpu", "cuda"), f"--device must be cpu or cuda[:N], got {cfg.device!r}")
        need(device.type != "cuda" or torch.cuda.is_available(),
             f"--device {cfg.device} asked for CUDA but torch.cuda.is_available() is False")
    except RuntimeError as e:
        problems.append(f"--device {cfg.device!r}: {e}")
    need(not (cfg.compile and cfg.grad_checkpointing),
         "--compile with --grad-checkpointing is not supported; pick one")
    need(cfg.compile_scope in ("layers", "model"),
         f"--compile-scope must be layers or model, got {cfg.compile_scope!r}")
    need(cfg.compile_mode in COMPILE_MODES,
         f"--compile-mode must be one of {COMPILE_MODES}, got {cfg.compile_mode!r}")
    backends = cfg.sdpa_backends.split(",")
    need(cfg.sdpa_backends == "default"
         or (set(backends) <= set(SDPA_BACKENDS) and len(set(backends)) == len(backends)),
         f"--sdpa-backends must be 'default' or distinct names from {list(SDPA_BACKENDS)}, comma-separated; "
         f"got {cfg.sdpa_backends!r}")
    need(device is None or device.type != "cpu" or cfg.sdpa_backends == "default"
         or {"flash", "math"} & set(backends),
         f"--sdpa-backends {cfg.sdpa_backends}: a CPU has only the flash and math kernels; name one of them")
    need(not cfg.out or not Path(cfg.out).is_file(), f"--out {cfg.out} is a file; expected a folder")
    if cfg.resume:
        need(run_folder.find_checkpoint(cfg.resume) is not None,
             f"--resume {cfg.resume}: no checkpoint there (expected a checkpoint-N folder or an output folder "
             "holding one)")
    model_path = Path(cfg.model)
    need(model_path.is_dir() or (not model_path.exists() and cfg.model.count("/") == 1
                                 and not cfg.model.startswith((".", "/", "~"))),
         f"--model {cfg.model!r} is neither a checkpoint folder nor a Hub repo id like {DEFAULT_MODEL!r}")
    if model_path.is_dir() or cfg.random_init:
        with contextlib.suppress(ValueError, OSError):  # a broken config.json is reported when the model loads
            too_long = context_problem(cfg, model_shape(cfg.model))
            need(too_long is None, too_long)
    from data.sources import HUB_FILES

    for flag, source in (("--data", cfg.data), ("--eval-data", cfg.eval_data)):
        if source.startswith("random"):
            n = source.partition(":")[2]
            need(source == "random" or (source.startswith("random:") and n.isdigit() and int(n) > 0),
                 f"{flag} {source!r}: write random or random:N with N >= 1")
        elif source not in HUB_FILES and not (flag == "--eval-data" and source.lower() == "none"):
            need(Path(source).is_file(), f"{flag} {source!r} is neither a split name ({', '.join(HUB_FILES)}) "
                                         "nor an existing file (guanaco or OASST trees .jsonl)")
    lora_config = None
    try:
        lora_config = LoRAConfig(rank=cfg.rank, alpha=float(cfg.rank) if cfg.alpha is None else cfg.alpha,
                                 dropout=cfg.dropout,
                                 targets=tuple(t.strip() for t in cfg.targets.split(",") if t.strip()),
                                 use_rslora=cfg.rslora)
    except (ValueError, TypeError) as e:
        problems.append(str(e))
    if problems:  # one line for one problem, a line each for several
        raise SystemExit("train.py: invalid settings:" + ("\n  " if len(problems) > 1 else " ")
                         + "\n  ".join(problems))
    return lora_config


# ---- small pieces the loop uses ---------------------------------------------------------------------------

def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def model_shape(model: str):
    """The `LlamaConfig` of a local checkpoint folder, else TinyLlama-1.1B's (nothing is downloaded)."""
    from tinyllama import LlamaConfig

    config_json = Path(model) / "config.json"
    return LlamaConfig.from_json(config_json) if config_json.is_file() else LlamaConfig()


def context_problem(cfg: TrainConfig, config) -> str | None:
    """Why --max-len does not fit the model's positions (RoPE past them is extrapolation), or None."""
    if cfg.max_len <= config.max_position_embeddings:
        return None
    return (f"--max-len {cfg.max_len} is longer than the model's max_position_embeddings "
            f"({config.max_position_embeddings}); lower --max-len to at most that")


def dropout_seed(seed: int, step: int, slot: int) -> int:
    """The seed of the dropout masks of one micro-batch: slot = micro-batch index * world size + rank.

    A function of where the micro-batch sits in the global batch, not of which process runs it: every rank
    draws its own masks, K processes equal one process accumulating K micro-batches, and a resumed run draws
    the masks the uninterrupted one would have, with no RNG state in the checkpoint.
    """
    return int(np.random.SeedSequence([seed, step, slot]).generate_state(1)[0])


def lr_at(step: int, cfg: TrainConfig, total_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then the schedule down to 0."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, total_steps - cfg.warmup)
    if cfg.schedule == "cosine":
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * progress))
    if cfg.schedule == "linear":
        return cfg.lr * (1 - progress)
    return cfg.lr


def labelled_count(batch) -> int:
    return label_positions(batch["labels"]).numel()


def real_token_count(batch) -> int:
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    return int(batch["document_ids"].ge(0).sum()) if "document_ids" in batch else batch["input_ids"].numel()


def prepare(batch, device):
    """Move a micro-batch to `device`, dropping the attention mask where it cannot change the loss.

    Padded batches are right-padded, so under the causal mask no real token ever sees a pad: the mask only
    changes the outputs at pad positions, which carry no label and predict nothing. Without it SDPA runs its
    mask-free causal kernel (flash attention on GPU). tests/test_train.py checks loss and gradients agree.
    The labelled positions are found here, on the CPU copy (`label_index`), so the loss never makes the host
    wait for the GPU; on CUDA the batch is copied from pinned memory, without blocking the host either.
    """
    batch = dict(batch)
    if "attention_mask" in batch and is_right_padded(batch["attention_mask"]):
        del batch["attention_mask"]
    batch["label_index"] = label_positions(batch["labels"])
    if device.type == "cuda":
        return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}
    return {k: v.to(device) for k, v in batch.items()}


def is_right_padded(attention_mask: torch.Tensor) -> bool:
    """True when every row is ones then zeros (checked on the CPU copy, before the batch moves)."""
    m = attention_mask.bool()
    return bool((m[:, 1:] <= m[:, :-1]).all())


def batch_loss(model, batch):
    """(loss sum, labelled-token count) of a micro-batch; every key but the labels is a model argument."""
    extra = {k: v for k, v in batch.items() if k not in ("input_ids", "labels")}
    return causal_lm_loss(model, batch["input_ids"], batch["labels"], **extra)  # label_index goes to the loss


def collective(op, *args):
    """Run a torch.distributed collective; a peer that does not answer within --dist-timeout ends the run."""
    try:
        return op(*args)
    except RuntimeError as e:  # gloo raises after the timeout; NCCL's watchdog aborts the process instead
        raise TrainingError(f"data parallel: {op.__name__} failed ({str(e).strip()[:300]}): another process "
                            "stopped answering within --dist-timeout, or died. Restart the job with --resume "
                            "to continue from the latest checkpoint.") from e


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        collective(dist.all_reduce, t)
    return t


def all_reduce_grads(params) -> None:
    """Sum LoRA gradients over ranks in one flat buffer (they are small: no bucketing or overlap needed)."""
    if not dist.is_initialized():
        return
    grads = [p.grad for p in params]
    flat = torch.cat([g.flatten() for g in grads])
    collective(dist.all_reduce, flat)
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


class Timer:
    """One step's time: CUDA events on GPU (`stop` records without waiting; `elapsed` waits for the step to
    finish), wall clock on CPU."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def start(self):
        if self.cuda:
            self._start = torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._t0 = time.perf_counter()

    def stop(self) -> None:
        if self.cuda:
            self._end = torch.cuda.Event(enable_timing=True)
            self._end.record()
        else:
            self._seconds = time.perf_counter() - self._t0

    def elapsed(self) -> float:
        if self.cuda:
            self._end.synchronize()
            return self._start.elapsed_time(self._end) / 1000
        return self._seconds


# ---- speed ------------------------------------------------------------------------------------------------

def sdpa_context(spec: str):
    """The attention kernels SDPA may pick, in order of preference ("flash,cudnn,efficient,math").

    The default prefers flash attention: PyTorch's own choice on Hopper is cuDNN's, which builds a new kernel
    plan for every new sequence length, and length-grouped padded batches bring a new length almost every step
    (bench/results/nvidia-h200-*.md measure both). Flash takes no mask, so packed rows (a block-diagonal mask,
    always max_len long) go to cuDNN, the next in the list. "default" leaves PyTorch's order alone.
    """
    if spec == "default":
        return contextlib.nullcontext()
    return sdpa_kernel([SDPA_BACKENDS[name] for name in spec.split(",")], set_priority=True)


def attention_kernels(device, dtype, spec: str, config) -> tuple[str, str]:
    """(kernel for unmasked causal attention with k/v repeated, the same with grouped k/v read in place).

    Asked of SDPA's own checks (`torch.backends.cuda.can_use_*`) for this model's head shapes, under the
    preference `spec`. When they differ, reading the grouped heads in place would cost a slower kernel, so
    the model repeats them instead (`Attention.native_gqa`). On a CPU both are ("cpu", "cpu").
    """
    if device.type != "cuda":
        return "cpu", "cpu"
    try:
        from torch.backends.cuda import (SDPAParams, can_use_cudnn_attention, can_use_efficient_attention,
                                         can_use_flash_attention)
    except ImportError:  # an older torch: do not guess, repeat k/v (the reference path)
        return "unknown", "unchecked"
    checks = {"flash": can_use_flash_attention, "efficient": can_use_efficient_attention,
              "cudnn": can_use_cudnn_attention, "math": lambda params: True}
    order = spec.split(",") if spec != "default" else ["cudnn", "flash", "efficient", "math"]
    kind = dict(device=device, dtype=torch.bfloat16 if dtype == torch.bfloat16 else torch.float32)
    q = torch.zeros(1, config.num_attention_heads, 128, config.head_dim, **kind)

    def first(kv_heads: int, gqa: bool) -> str:
        kv = torch.zeros(1, kv_heads, 128, config.head_dim, **kind)
        params = SDPAParams(q, kv, kv, None, 0.0, True, gqa)
        with sdpa_context(spec):
            return next(name for name in order if checks[name](params))

    return first(config.num_attention_heads, False), first(config.num_key_value_heads, True)


def compile_model(model, scope: str, mode: str = "default") -> None:
    """torch.compile in place. `layers`: each decoder layer (all 22 share one graph, so it compiles in
    seconds); `model`: embeddings to final norm as one graph (`hidden_states`), no Python between layers.
    The loss stays eager either way (`FrozenHeadCrossEntropy`). `uncompile_model` undoes `model` scope."""
    if scope == "layers":
        for layer in model.model.layers:
            layer.compile(mode=mode)
    else:
        model.hidden_states = torch.compile(model.hidden_states, mode=mode)


def uncompile_model(model) -> None:
    model.__dict__.pop("hidden_states", None)


# ---- data -------------------------------------------------------------------------------------------------

def random_examples(n: int, length: int, vocab_size: int, seed: int):
    """The fixed benchmark workload: random ids, every position labelled (W1)."""
    from data import Example

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, vocab_size, (length,), generator=g)
        ids[0] = 1  # BOS, which nothing predicts
        labels = ids.clone()
        labels[0] = -100
        out.append(Example(ids, labels))
    return out


def load_examples(source: str, tokenizer, cfg: TrainConfig, vocab_size: int, log):
    from data import encode_all, load_conversations

    if source == "random" or source.startswith("random:"):
        n = int(source.split(":")[1]) if ":" in source else max(64, cfg.batch_size * cfg.grad_accum * 16)
        return random_examples(n, cfg.max_len, vocab_size, cfg.seed)
    conversations = load_conversations(source)
    examples, report = encode_all(conversations, tokenizer, cfg.max_len)
    log(f"data {source}: {len(conversations)} conversations -> {len(examples)} examples ({report})")
    if not examples:
        raise TrainingError(f"no usable training examples in {source!r} (see the report above)")
    return examples


# ---- the run ----------------------------------------------------------------------------------------------

def evaluate(model, examples, cfg: TrainConfig, device, autocast) -> tuple[float, float]:
    from data import eval_batches

    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    with torch.no_grad(), autocast():
        for batch in eval_batches(examples, cfg.batch_size, cfg.max_len, packing=cfg.packing):
            loss_sum, n = batch_loss(model, prepare(batch, device))
            total[0] += loss_sum.double()
            total[1] += n
    model.train()
    loss_sum, n = all_reduce_sum(total).tolist()
    loss = loss_sum / max(n, 1)
    return loss, math.exp(min(loss, 50))


def main(cfg: TrainConfig) -> dict:
    lora_config = validate(cfg)
    if cfg.dry_run:
        return dry_run(cfg, lora_config, print)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    device = resolve_device(cfg.device)
    if distributed:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=timedelta(seconds=cfg.dist_timeout))
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    log = (lambda *a: print(*a, flush=True)) if rank == 0 else (lambda *a: None)
    resume_from = run_folder.find_checkpoint(cfg.resume) if cfg.resume else None
    out = Path(cfg.out) if cfg.out else resume_from.parent if resume_from else Path(f"runs/rank{cfg.rank}")
    # The main process alone writes the output folder. It locks it (which also proves it writable) and checks
    # that no other run's files would be overwritten, before anything is loaded.
    with run_folder.lock(out, log) if rank == 0 else contextlib.nullcontext():
        if rank == 0 and not continues_in(resume_from, out):
            run_folder.refuse_other_run(out, cfg.overwrite)
        summary = fit(cfg, lora_config, device, out, resume_from, rank, world, log)
    if distributed:
        collective(dist.barrier)
        dist.destroy_process_group()
    return summary


def continues_in(checkpoint: Path | None, out: Path) -> bool:
    """True when a resumed run goes on in the folder its checkpoint belongs to."""
    return checkpoint is not None and checkpoint.parent.resolve() == out.resolve()


def changed_settings(saved: dict, cfg: TrainConfig) -> list[str]:
    now = dataclasses.asdict(cfg)
    return [f"{k} {saved[k]!r} -> {v!r}" for k, v in now.items()
            if k in saved and saved[k] != v and k not in ("resume", "out", "overwrite")]


def fit(cfg: TrainConfig, lora_config: LoRAConfig, device, out: Path, resume_from: Path | None, rank: int,
        world: int, log) -> dict:
    """Load data and model, train, save: everything after the output folder is secured."""
    main_process = rank == 0
    dtype = DTYPES[cfg.dtype] or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    # Same seed on every rank: identical LoRA init and data order. Ranks differ in their data shard and in their
    # dropout masks (`dropout_seed`).
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)

    # Tokenizer and data first: they are cheap, and their errors should not wait for the model to load.
    folder = None if cfg.random_init else resolve_checkpoint(cfg.model)  # downloads from the Hub if needed
    config = model_shape(cfg.model if folder is None else str(folder))
    too_long = context_problem(cfg, config)  # checked again now that a Hub model's config.json is here
    if too_long:
        raise TrainingError(too_long)
    tokenizer = None
    if not cfg.data.startswith("random") or cfg.samples:
        tokenizer = Tokenizer(cfg.tokenizer or (folder or resolve_checkpoint(cfg.model)) / "tokenizer.model")
        if tokenizer.vocab_size > config.vocab_size:
            raise TrainingError(
                f"the tokenizer {tokenizer.path} has {tokenizer.vocab_size:,} tokens but the model only "
                f"{config.vocab_size:,} embeddings, so ids past {config.vocab_size - 1} have none; pass the "
                "model's own tokenizer with --tokenizer, or a model whose vocab_size covers it")
    from data import BatchStream

    train_examples = load_examples(cfg.data, tokenizer, cfg, config.vocab_size, log)
    eval_examples = []
    if cfg.eval_data.lower() != "none":
        eval_examples = (train_examples[:64] if cfg.eval_data.startswith("random")
                         else load_examples(cfg.eval_data, tokenizer, cfg, config.vocab_size, log))
        eval_examples = eval_examples[rank::world]
    stream = BatchStream(train_examples, cfg.batch_size, cfg.max_len, packing=cfg.packing,
                         group_by_length=cfg.group_by_length and not cfg.packing, seed=cfg.seed,
                         rank=rank, world_size=world)
    total_steps = cfg.steps or max(1, math.ceil(cfg.epochs * stream.batches_per_epoch / cfg.grad_accum))
    if cfg.warmup > total_steps:
        log(f"warning: --warmup {cfg.warmup} is longer than the run ({total_steps} steps): the learning rate "
            f"peaks at {lr_at(total_steps - 1, cfg, total_steps):.3g} and never reaches --lr {cfg.lr:g}")
    state = run_folder.read_state(resume_from) if resume_from else {}
    start_step = state.get("step", 0)
    if resume_from and start_step >= total_steps:
        raise TrainingError(f"{resume_from} is at step {start_step} and this run has {total_steps} steps: it is "
                            f"already complete, and nothing was changed. To train further, resume with --steps N "
                            f"(N > {start_step}) or more --epochs.")
    changes = changed_settings(state.get("config", {}), cfg)
    if changes:
        log("resuming with settings that differ from the checkpoint's: " + ", ".join(changes))

    # The model, with LoRA built in (base frozen).
    if cfg.random_init:
        model = random_model(cfg, lora_config, device, dtype)
    else:
        model = load_model(folder, dtype=dtype, device=device, lora=lora_config)
    model.gradient_checkpointing = cfg.grad_checkpointing
    model.train()

    # Optimizer over the LoRA weights only (fp32 master weights and state, whatever the base dtype).
    params = [p for p in model.parameters() if p.requires_grad]
    # Fused (one kernel for all tensors, on CPU too): it alone can skip an update on the device (`found_inf`).
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    totals = dict(seconds=0.0, tokens=0, labelled=0, first_loss=None, last_loss=None, eval_loss=None,
                  eval_ppl=None)
    if resume_from:
        lora.load_adapter(model, resume_from)
        optimizer.load_state_dict(run_folder.load_optimizer_state(resume_from))
        stream.load_state_dict(state["stream"])
        totals.update(state.get("totals", {}))  # so the summary describes the whole run, not this leg
        log(f"resumed from {resume_from} at step {start_step}")
    repeated, in_place = attention_kernels(device, dtype, cfg.sdpa_backends, model.config)
    for layer in model.model.layers:
        layer.self_attn.native_gqa = in_place == repeated
    if device.type == "cuda":
        log(f"attention: {repeated} kernel" + (", grouped k/v heads read in place" if in_place == repeated else
                                               f" (k/v heads repeated: in place would take {in_place})"))
    if cfg.compile:
        compile_model(model, cfg.compile_scope, cfg.compile_mode)

    @contextlib.contextmanager
    def autocast():  # every forward of the run: bf16 autocast (on a bf16 model) and the attention kernels
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16), \
                sdpa_context(cfg.sdpa_backends):
            yield

    trainable, total = lora.count_parameters(model)
    flops_per_token = training_flops_per_token(model.config, lora_config, cfg.max_len)
    peak_flops = measure_matmul_peak(device, dtype)
    if main_process:  # the first write into the output folder
        if cfg.overwrite and not continues_in(resume_from, out):
            run_folder.clear(out, log)
        if resume_from:
            run_folder.start_resume(out, resume_from, log)
        run_folder.write_text(out / "config.json", json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
    log(f"training {trainable:,} of {total:,} parameters ({100 * trainable / total:.2f}%) on {device} "
        f"({dtype}), {world} process(es), {total_steps} steps of {cfg.batch_size}x{cfg.grad_accum}x{world} "
        f"sequences, max_len {cfg.max_len}, {'packed' if cfg.packing else 'padded'}")

    def record(row):
        if main_process:
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    progress = Progress(total_steps, start_step, enabled=main_process)
    # The host never waits for the GPU inside a step. A step's numbers (loss, grad norm, time) are read only
    # after the next step has been queued, so the CPU prepares step n+1 while the GPU runs step n. A non-finite
    # loss or gradient norm must still stop the run before its update: `bad` is set on the device, and the fused
    # AdamW skips every update from then on (its `found_inf`, the flag torch.amp.GradScaler uses); the host
    # raises when it reads that step's numbers, one step later, with the weights as they were before the bad step.
    bad = torch.zeros((), device=device)
    optimizer.found_inf = bad

    def finish(p):
        """The host side of a queued step: read its numbers (waits for that step only), check, log."""
        loss_sum, norm = p["numbers"].tolist()
        loss = loss_sum / p["n_labelled"]
        if not (math.isfinite(loss) and math.isfinite(norm)):
            what = (f"loss is {loss}" if not math.isfinite(loss) else
                    f"gradient norm is {norm} (the loss, {loss:.4f}, is finite; clipping would zero the update)")
            saved = run_folder.find_checkpoint(out) if main_process else None
            raise TrainingError(f"{what} at step {p['step']}: stopping before the update. Last good checkpoint: "
                                f"{saved or 'none (use --save-every)'}. Try a lower --lr (or --alpha).")
        seconds = p["timer"].elapsed()
        totals["seconds"] += seconds
        totals["tokens"] += int(p["n_tokens"])
        totals["labelled"] += int(p["n_labelled"])
        totals["first_loss"] = loss if totals["first_loss"] is None else totals["first_loss"]
        totals["last_loss"] = loss
        done = p["step"]
        progress.update(done, loss, p["lr"], p["n_tokens"] / seconds)
        if done % max(cfg.log_every, 1) == 0 or done == total_steps or done == start_step + 1:
            record({"step": done, "split": "train", "loss": loss, "lr": p["lr"],
                    "tokens_per_s": p["n_tokens"] / seconds, "labelled_tokens_per_s": p["n_labelled"] / seconds,
                    "step_s": seconds, "mfu": p["n_tokens"] * flops_per_token / seconds / peak_flops / world,
                    "grad_norm": norm, "peak_gib": peak_memory_gib(device), "epoch": p["epoch"]})

    pending = None
    for step in range(start_step, total_steps):
        lr = lr_at(step, cfg, total_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        micro = [next(stream) for _ in range(cfg.grad_accum)]
        n_real = sum(real_token_count(b) for b in micro)  # before prepare() drops a right-padded batch's mask
        micro = [prepare(b, device) for b in micro]  # copies queued now; labelled positions found on the CPU
        counts = torch.tensor([sum(b["label_index"].numel() for b in micro), n_real], dtype=torch.float64)
        if dist.is_initialized():  # NCCL reduces device tensors; a single process needs no round trip
            counts = all_reduce_sum(counts.to(device)).cpu()
        n_labelled, n_tokens = counts.tolist()
        if n_labelled == 0:
            raise TrainingError(f"step {step + 1}: no labelled tokens in this batch")

        timer = Timer(device)
        timer.start()
        loss_total = torch.zeros((), device=device)
        for i, batch in enumerate(micro):
            if lora_config.dropout:
                torch.manual_seed(dropout_seed(cfg.seed, step, i * world + rank))
            with autocast():
                loss_sum, _ = batch_loss(model, batch)
            (loss_sum / n_labelled).backward()
            loss_total += loss_sum.detach()
        all_reduce_grads(params)
        loss_total = all_reduce_sum(loss_total)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip or float("inf"))  # the norm, clipped or not
        numbers = torch.stack([loss_total, grad_norm.to(loss_total.dtype)])
        torch.maximum(bad, (~torch.isfinite(numbers)).any().to(bad.dtype), out=bad)
        optimizer.step()  # skipped on the device if `bad`
        optimizer.zero_grad(set_to_none=True)
        timer.stop()

        if pending is not None:
            finish(pending)
        done = step + 1
        pending = dict(step=done, numbers=numbers, timer=timer, lr=lr, n_tokens=n_tokens, n_labelled=n_labelled,
                       epoch=stream.epoch)
        evaluate_now = (cfg.eval_every and done % cfg.eval_every == 0 or done == total_steps) and eval_examples
        save_now = cfg.save_every and (done % cfg.save_every == 0 or done == total_steps) and main_process
        if evaluate_now or save_now or done == total_steps:
            finish(pending)  # checked before anything is evaluated or saved
            pending = None
        if evaluate_now:
            totals["eval_loss"], totals["eval_ppl"] = evaluate(model, eval_examples, cfg, device, autocast)
            record({"step": done, "split": "eval", "loss": totals["eval_loss"], "ppl": totals["eval_ppl"], "lr": lr,
                    "tokens_per_s": None})
            progress.note(f"step {done}: eval loss {totals['eval_loss']:.4f}, ppl {totals['eval_ppl']:.2f}")
        if save_now:
            run_folder.save_checkpoint(out, done, lambda d: lora.save_adapter(model, d, base_model=cfg.model),
                                       optimizer, {"stream": stream.state_dict(), "config": dataclasses.asdict(cfg),
                                                   "totals": totals}, cfg.keep_checkpoints)
    progress.close()

    seconds, tokens, labelled = totals["seconds"], totals["tokens"], totals["labelled"]
    summary = {
        "training_time_s": seconds, "trainable_params": trainable, "total_params": total,
        "trainable_percent": 100 * trainable / total, "steps": total_steps,
        "tokens_per_s": tokens / seconds if seconds else None,
        "labelled_tokens_per_s": labelled / seconds if seconds else None,
        "mfu": (tokens * flops_per_token / seconds / peak_flops / world) if seconds else None,
        "peak_flops": peak_flops, "peak_gib": peak_memory_gib(device), "first_loss": totals["first_loss"],
        "last_loss": totals["last_loss"], "eval_loss": totals["eval_loss"], "eval_ppl": totals["eval_ppl"],
        "device": device_name(device), "world_size": world, "out": str(out),
    }
    if main_process:
        run_folder.write_dir(out / "adapter", lambda d: lora.save_adapter(model, d, base_model=cfg.model))
        run_folder.write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
        print_summary(summary, log)
        plot_losses(out)
        if cfg.samples and tokenizer is not None:
            uncompile_model(model)  # generation's growing shapes would recompile a whole-model graph
            show_samples(model, tokenizer, out, log)
    return summary


def random_model(cfg, lora_config, device, dtype):
    """The model's shape with random weights (benchmarks with no Hub access; the step cost is the same)."""
    from tinyllama import Llama

    config = model_shape(cfg.model)
    with torch.device(device):
        model = Llama(config, lora=lora_config)
    for name, p in model.named_parameters():
        if ".lora_" not in name:
            p.data = p.data.to(dtype)
    return model


def dry_run(cfg, lora_config, log) -> dict:
    """The parameter table for --model's shape, built on the meta device: nothing is downloaded."""
    from tinyllama import Llama

    config = model_shape(cfg.model)
    shape = cfg.model if (Path(cfg.model) / "config.json").is_file() else "TinyLlama-1.1B shape"
    log(f"{'rank':>6} {'trainable':>14} {'total':>16} {'trainable %':>12}   ({shape}, targets "
        f"{','.join(lora_config.targets)})")
    rows = []
    for r in sorted({4, 16, 64, 256, cfg.rank}):
        with torch.device("meta"):
            m = Llama(config, lora=dataclasses.replace(lora_config, rank=r, alpha=float(r)))
        trainable, total = lora.count_parameters(m)
        log(f"{r:>6} {trainable:>14,} {total:>16,} {100 * trainable / total:>11.2f}%")
        rows.append({"rank": r, "trainable_params": trainable, "total_params": total})
    return {"rows": rows}


def peak_memory_gib(device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def device_name(device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)"


def print_summary(s: dict, log) -> None:
    log("\n| Training Time (s) | Trainable Params | Total Params | Trainable % | tokens/s | MFU | peak GiB |")
    log("|---|---|---|---|---|---|---|")
    peak = f"{s['peak_gib']:.2f}" if s["peak_gib"] is not None else "n/a (cpu)"
    log(f"| {s['training_time_s']:.2f} | {s['trainable_params']:,} | {s['total_params']:,} | "
        f"{s['trainable_percent']:.2f} | {s['tokens_per_s']:,.0f} | {100 * s['mfu']:.1f}% | {peak} |")
    log(f"loss {s['first_loss']:.4f} -> {s['last_loss']:.4f}"
        + (f"; eval loss {s['eval_loss']:.4f} (ppl {s['eval_ppl']:.2f})" if s["eval_loss"] is not None else "")
        + f"; adapter saved to {s['out']}/adapter")


def plot_losses(out: Path) -> None:
    """loss.png of train and eval loss, when matplotlib is installed (an optional extra)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    fig, ax = plt.subplots(figsize=(7, 4))
    for split in ("train", "eval"):
        pts = [(r["step"], r["loss"]) for r in rows if r["split"] == split]
        if pts:
            ax.plot(*zip(*pts), marker="o" if split == "eval" else None, label=split)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    fig.savefig(out / "loss.png", dpi=120, bbox_inches="tight")
    plt.close(fig)


def show_samples(model, tokenizer, out: Path, log, max_new_tokens: int = 96) -> None:
    """Answers of the base and the fine-tuned model to fixed prompts, side by side (also samples.md)."""
    from tinyllama.chat import answer

    lines = ["# Base vs fine-tuned (greedy)", ""]
    for prompt in SAMPLE_PROMPTS:
        with lora.disabled(model):
            base = answer(model, tokenizer, prompt, max_new_tokens=max_new_tokens)
        tuned = answer(model, tokenizer, prompt, max_new_tokens=max_new_tokens)
        lines += [f"## {prompt}", "", "**base:** " + base.strip(), "", "**fine-tuned:** " + tuned.strip(), ""]
    text = "\n".join(lines)
    (out / "samples.md").write_text(text)
    log("\n" + text)


class Progress:
    """A one-line progress bar (loss, lr, tokens/s, ETA) on a terminal; plain log lines otherwise."""

    def __init__(self, total: int, start: int, enabled: bool):
        self.total, self.start, self.enabled = total, start, enabled
        self.tty = sys.stderr.isatty()
        self.t0 = time.perf_counter()
        self.every = max(1, total // 20)

    def update(self, step, loss, lr, tokens_per_s):
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / (step - self.start) * (self.total - step)
        width = 30
        bar = "#" * int(width * step / self.total)
        line = (f"[{bar:<{width}}] {step}/{self.total} loss {loss:.4f} lr {lr:.2e} "
                f"{tokens_per_s:,.0f} tok/s ETA {eta:,.0f}s")
        if self.tty:
            print("\r" + line, end="", file=sys.stderr, flush=True)
        elif step % self.every == 0 or step == self.total or step == self.start + 1:
            print(line, file=sys.stderr, flush=True)

    def note(self, text):
        if self.enabled:
            print(("\n" if self.tty else "") + text, file=sys.stderr, flush=True)

    def close(self):
        if self.enabled and self.tty:
            print(file=sys.stderr)


def cli(argv=None) -> dict:
    """`python train.py`: an error a person can act on ends the run with its message, not a traceback."""
    settings = parse_args(argv)
    try:
        return main(settings)
    except (TrainingError, HubUnavailable, OSError, ValueError) as e:
        if settings.debug or os.environ.get("TRAIN_DEBUG"):
            raise
        hint = "" if isinstance(e, (TrainingError, HubUnavailable)) else " (--debug shows where it was raised)"
        raise SystemExit(f"train.py: error: {e}{hint}") from None


if __name__ == "__main__":
    cli()
