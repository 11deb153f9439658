"""Supervised fine-tuning of TinyLlama with LoRA: the settings, and the loop in `main()`, top to bottom.

    python train.py --rank 64 --alpha 64            # guanaco train split from the Hub, adapter in runs/
    torchrun --nproc_per_node 2 train.py --rank 64  # data parallel (NCCL on GPU, gloo on CPU)

Every setting is a field of `TrainConfig`; the command line is generated from it. What `main` does, in order:
validate settings (before any download or GPU work), secure the output folder, load data and model, then for
each optimizer step run `grad_accum` micro-batches whose summed token losses are divided by the labelled-token
count of the whole step (across micro-batches and ranks), clip, step AdamW over the LoRA weights only, log,
evaluate, checkpoint. The pieces it uses: `training.step` (a step's parts, and why the host never waits for
the GPU), `training.parallel`, `training.run_folder` (lock, checkpoints, resume), `training.report`, and
`tinyllama.runtime` (attention kernels, torch.compile).

Deliberately left out: full fine-tuning, mixed LoRA ranks per layer, fp16 loss scaling (bf16 needs none),
FSDP/tensor parallelism (a 1.1B frozen base fits on one GPU; data parallel is enough).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

import lora
from data import BatchStream, eval_batches, load_train_eval
from data.sources import AUTO, NONE, is_random, source_problems
from lora import LoRAConfig
from tinyllama import load_model, load_tokenizer
from tinyllama.checkpoint import DEFAULT_MODEL, HubUnavailable, model_config, random_model, resolve_checkpoint
from tinyllama.flops import measure_matmul_peak, training_flops_per_token
from tinyllama.quant import QUANTIZE_CHOICES
from tinyllama.runtime import (
    COMPILE_MODES,
    COMPILE_SCOPES,
    DEFAULT_SDPA_BACKENDS,
    SDPA_BACKENDS,
    Runtime,
    configure_runtime,
    resolve_device,
    resolve_dtype,
    uncompile_model,
)
from tinyllama.shapes import SHAPES
from training import TrainingError, parallel, report, run_folder
from training.settings import command_line, parse_settings
from training.step import (
    QueuedStep,
    Timer,
    Totals,
    batch_loss,
    evaluate,
    finish_step,
    prepare,
    real_token_count,
    skip_updates_when,
)

SCHEDULES = ("cosine", "linear", "constant")
TRAIN_DTYPES = ("auto", "float32", "bfloat16")  # float16 would need loss scaling


@dataclass
class TrainConfig:
    # What to train
    model: str = field(default=DEFAULT_MODEL, metadata={"help": "Hub repo id or local HF checkpoint folder"})
    data: str = field(default="train", metadata={
        "help": "training data: a guanaco split (train, test) or a local .jsonl (guanaco rows or OASST trees) or "
                ".parquet (a text column; pip install -e .[parquet]); commas separate several sources, and "
                "SOURCE:W uses one W times (a.jsonl:2,train; 0.5: a seeded half); 'random[:N]' = N random token "
                "sequences, every position labelled (benchmark workload)"})
    eval_data: str = field(default="auto", metadata={
        "help": "auto: hold out 2%% of each local --data file's conversations (at least 1, at most 500, drawn "
                "with --seed; never trained on) and use the guanaco test split for split names; or splits/files "
                "(comma-separated); 'none' disables eval"})
    tokenizer: str = field(default="", metadata={
        "help": "tokenizer.model or tokenizer.json, or a folder holding one (default: the model's)"})
    random_init: bool = field(default=False, metadata={
        "help": "random weights of --model's shape instead of its weights; --model may then also be a shape name "
                "(tinyllama.shapes: llama-2-7b, llama-3.2-1b, ...) or a config.json"})
    # LoRA
    rank: int = 64
    alpha: float | None = field(default=None, metadata={"help": "LoRA alpha (default: equal to --rank)"})
    dropout: float = 0.05
    targets: str = field(default="gate_proj,up_proj,down_proj", metadata={"help": "comma-separated"})
    rslora: bool = field(default=False, metadata={
        "help": "scale by alpha/sqrt(rank); llama.cpp ignores this and scales by alpha/rank: run the adapter there "
                "with --lora-scaled ADAPTER:SCALE, SCALE = sqrt(rank)"})
    dora: bool = field(default=False, metadata={
        "help": "DoRA (PEFT's use_dora): a trainable magnitude per output row; not with --fused-mlp"})
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
    packing: bool | None = field(default=None, metadata={
        "help": "pack conversations into rows of --max-len tokens (each cut at the model's context); default: on "
                "CUDA, where it is the fastest (a step then holds more conversations), off on a CPU"})
    group_by_length: bool = field(default=True, metadata={"help": "length-grouped batches (padding mode)"})
    # Bookkeeping
    eval_every: int = field(default=100, metadata={"help": "steps between evals; 0: only at the end"})
    save_every: int = field(default=0, metadata={"help": "steps between checkpoints; 0: none"})
    keep_checkpoints: int = field(default=2, metadata={
        "help": "checkpoints kept (the newest; older ones this run wrote are pruned); 0 keeps them all"})
    log_every: int = 10
    tensorboard: bool = field(default=False, metadata={
        "help": "also write the metrics as TensorBoard scalars to OUT/tensorboard (pip install -e .[tensorboard])"})
    out: str = field(default="", metadata={
        "help": "output folder (default: runs/rank{rank}; with --resume, the checkpoint's own folder)"})
    overwrite: bool = field(default=False, metadata={
        "help": "replace an earlier run in --out: only what its manifest (OUT/.run-manifest.json) lists is removed; "
                "without it such a folder is refused"})
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
    sdpa_backends: str = field(default=DEFAULT_SDPA_BACKENDS, metadata={
        "help": "attention kernels in order of preference (flash, efficient, cudnn, math), or 'default' for "
                "PyTorch's own order; see tinyllama.runtime.sdpa_context"})
    grad_checkpointing: bool = False
    quantize: str = field(default="none", metadata={
        "help": "none, or nf4: the frozen base projections in 4 bits (QLoRA; tinyllama.quant)"})
    double_quant: bool = field(default=False, metadata={
        "help": "with --quantize nf4: quantise the block scales too (QLoRA's double quantisation)"})
    fused_mlp: bool | None = field(default=None, metadata={
        "help": "the LoRA MLP as one autograd function (less activation memory, fewer matmuls); default: on CUDA"})
    varlen: bool | None = field(default=None, metadata={
        "help": "packed rows through varlen flash attention (no dense mask); default: on CUDA where torch has it"})
    dist_timeout: float = field(default=300.0, metadata={
        "help": "seconds a data-parallel process waits for the others before the job stops with an error"})
    debug: bool = field(default=False, metadata={"help": "show the Python traceback of errors (or TRAIN_DEBUG=1)"})
    samples: bool = field(default=True, metadata={"help": "print base vs fine-tuned answers at the end"})
    dry_run: bool = field(default=False, metadata={"help": "print the parameter table and exit"})


# ---- settings --------------------------------------------------------------------------------------------

def parse_args(argv=None) -> TrainConfig:
    return parse_settings(TrainConfig, argv, description=__doc__.split("\n")[0])


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
    need(cfg.dtype in TRAIN_DTYPES, f"--dtype must be one of {list(TRAIN_DTYPES)}, got {cfg.dtype!r}")
    device = None
    try:
        device = resolve_device(cfg.device)
        need(device.type in ("cpu", "cuda"), f"--device must be cpu or cuda[:N], got {cfg.device!r}")
        need(device.type != "cuda" or torch.cuda.is_available(),
             f"--device {cfg.device} asked for CUDA but torch.cuda.is_available() is False")
    except RuntimeError as e:
        problems.append(f"--device {cfg.device!r}: {e}")
    need(cfg.quantize in ("none", *QUANTIZE_CHOICES),
         f"--quantize must be none or one of {list(QUANTIZE_CHOICES)}, got {cfg.quantize!r}")
    need(not cfg.double_quant or cfg.quantize != "none", "--double-quant applies to --quantize nf4; add that")
    unfusable = "--dora" if cfg.dora else f"--quantize {cfg.quantize}" if cfg.quantize != "none" else None
    need(not (cfg.fused_mlp and unfusable), f"{unfusable} with --fused-mlp is not supported (the fused LoRA MLP "
         "computes plain LoRA on dense weights); leave --fused-mlp out and the MLP runs on the plain path")
    need(not (cfg.compile and cfg.grad_checkpointing),
         "--compile with --grad-checkpointing is not supported; pick one")
    need(cfg.compile_scope in COMPILE_SCOPES,
         f"--compile-scope must be one of {COMPILE_SCOPES}, got {cfg.compile_scope!r}")
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
    if cfg.tensorboard:
        try:
            report.require_tensorboard()
        except ImportError as e:
            problems.append(str(e))
    model_path = Path(cfg.model)
    shape_only = cfg.random_init or cfg.dry_run  # no weights needed: a shape name or a config.json will do
    is_shape = cfg.model in SHAPES or (model_path.suffix == ".json" and model_path.is_file())
    need(model_path.is_dir() or (shape_only and is_shape) or (
        not model_path.exists() and cfg.model.count("/") == 1 and not cfg.model.startswith((".", "/", "~"))),
         f"--model {cfg.model!r} is neither a checkpoint folder nor a Hub repo id like {DEFAULT_MODEL!r} (with "
         f"--random-init or --dry-run, also a shape name: {', '.join(SHAPES)}; or a config.json)")
    need(not (shape_only and is_shape and not cfg.tokenizer and needs_tokenizer(cfg) and not cfg.dry_run),
         f"--model {cfg.model} is a shape without a tokenizer: pass --tokenizer, or train on --data random with "
         "--no-samples")
    if model_path.is_dir() or cfg.random_init:
        with contextlib.suppress(ValueError, OSError):  # a broken config.json is reported when the model loads
            too_long = context_problem(cfg, model_config(cfg.model))
            need(too_long is None, too_long)
    for flag, source in (("--data", cfg.data), ("--eval-data", cfg.eval_data)):
        problems += source_problems(source, flag)
    lora_config = None
    try:
        lora_config = LoRAConfig(rank=cfg.rank, alpha=float(cfg.rank) if cfg.alpha is None else cfg.alpha,
                                 dropout=cfg.dropout,
                                 targets=tuple(t.strip() for t in cfg.targets.split(",") if t.strip()),
                                 use_rslora=cfg.rslora, use_dora=cfg.dora)
    except (ValueError, TypeError) as e:
        problems.append(str(e))
    if cfg.resume:
        problems += run_folder.resume_problems(cfg.resume, lora_config)
    if problems:  # one line for one problem, a line each for several
        raise SystemExit("train.py: invalid settings:" + ("\n  " if len(problems) > 1 else " ")
                         + "\n  ".join(problems))
    return lora_config


# ---- small pieces the loop uses ---------------------------------------------------------------------------

def with_machine_defaults(cfg: TrainConfig) -> TrainConfig:
    """The settings whose default depends on the machine, decided: --packing on CUDA, not on a CPU."""
    if cfg.packing is None:
        try:
            cuda = resolve_device(cfg.device).type == "cuda"
        except RuntimeError:
            cuda = False  # validate says what is wrong with --device
        cfg = dataclasses.replace(cfg, packing=cuda)
    return cfg


def needs_tokenizer(cfg: TrainConfig) -> bool:
    """Whether the run has conversations to encode or samples to print."""
    return not is_random(cfg.data) or cfg.samples or (cfg.eval_data.lower() not in (AUTO, NONE)
                                                      and not is_random(cfg.eval_data))


def context_problem(cfg: TrainConfig, config) -> str | None:
    """Why --max-len does not fit the model's positions (RoPE past them is extrapolation), or None. Packed rows
    may be longer: each conversation in them is cut at the model's context instead."""
    if config.sliding_window is not None and cfg.max_len > config.sliding_window:  # packed rows too
        return (f"--max-len {cfg.max_len} is longer than this Mistral checkpoint's sliding_window "
                f"({config.sliding_window}), which this implementation does not compute; lower --max-len to at "
                "most that")
    if cfg.max_len <= config.max_position_embeddings or cfg.packing:
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


@dataclass
class Run:
    """What `main` loads before its first step."""
    model: torch.nn.Module
    tokenizer: object | None  # tinyllama.Tokenizer or BPETokenizer (see load_tokenizer)
    stream: object  # data.BatchStream
    eval_examples: list
    optimizer: torch.optim.Optimizer
    runtime: Runtime
    total_steps: int
    start_step: int
    totals: Totals
    flops_per_token: float
    peak_flops: float
    metrics: report.Metrics | None = None  # set once the output folder is ready


def load_run(cfg: TrainConfig, lora_config: LoRAConfig, proc: parallel.Process, resume_from: Path | None,
             out: Path) -> Run:
    """Tokenizer and data first (cheap, and their errors should not wait for the model), then the model, its
    optimizer and, when resuming, the checkpoint's state. Nothing is written."""
    log, device = proc.log, proc.device
    dtype = resolve_dtype(cfg.dtype, device)
    torch.manual_seed(cfg.seed)  # the same on every rank: identical LoRA initialisation
    folder = None if cfg.random_init else resolve_checkpoint(cfg.model)  # downloads from the Hub if needed
    config = model_config(cfg.model if folder is None else str(folder))
    too_long = context_problem(cfg, config)  # checked again now that a Hub model's config.json is here
    if too_long:
        raise TrainingError(too_long)
    tokenizer = None
    if needs_tokenizer(cfg):
        tokenizer = load_tokenizer(cfg.tokenizer or folder or resolve_checkpoint(cfg.model))
        if tokenizer.vocab_size > config.vocab_size:
            raise TrainingError(
                f"the tokenizer {tokenizer.path} has {tokenizer.vocab_size:,} tokens but the model only "
                f"{config.vocab_size:,} embeddings, so ids past {config.vocab_size - 1} have none; pass the "
                "model's own tokenizer with --tokenizer, or a model whose vocab_size covers it")
    n_random = max(64, cfg.batch_size * cfg.grad_accum * 16)  # `--data random` without a count
    example_len = min(cfg.max_len, config.max_position_embeddings)  # the row length, or less in packed rows
    train_examples, eval_examples = load_train_eval(cfg.data, cfg.eval_data, tokenizer, example_len,
                                                    vocab_size=config.vocab_size, seed=cfg.seed, n_random=n_random,
                                                    log=log)
    stream = BatchStream(train_examples, cfg.batch_size, cfg.max_len, packing=cfg.packing,
                         group_by_length=cfg.group_by_length and not cfg.packing, seed=cfg.seed,
                         rank=proc.rank, world_size=proc.world)
    total_steps = cfg.steps or max(1, math.ceil(cfg.epochs * stream.batches_per_epoch / cfg.grad_accum))
    if cfg.warmup > total_steps:
        log(f"warning: --warmup {cfg.warmup} is longer than the run ({total_steps} steps): the learning rate "
            f"peaks at {lr_at(total_steps - 1, cfg, total_steps):.3g} and never reaches --lr {cfg.lr:g}")
    state = run_folder.read_state(resume_from) if resume_from else {}
    start_step = state.get("step", 0)
    if resume_from and start_step == total_steps and not run_folder.is_finished(out, total_steps):
        log(f"{resume_from} is the run's last step, but {out} has no final adapter and summary of it (the run was "
            "stopped while writing them): writing them now")
    elif resume_from and start_step >= total_steps:
        raise TrainingError(f"{resume_from} is at step {start_step} and this run has {total_steps} steps: it is "
                            f"already complete, and nothing was changed. To train further, resume with --steps N "
                            f"(N > {start_step}) or more --epochs.")
    changes = run_folder.changed_settings(state.get("config", {}), dataclasses.asdict(cfg))
    if changes:
        log("resuming with settings that differ from the checkpoint's: " + ", ".join(changes))

    quantize = None if cfg.quantize == "none" else cfg.quantize
    # The model, with LoRA built in (base frozen); AdamW over the LoRA weights only (fp32 weights and state,
    # whatever the base dtype). Fused: it alone can skip an update on the device (`skip_updates_when`).
    if cfg.random_init:
        model = random_model(config, dtype=dtype, device=device, lora=lora_config, quantize=quantize,
                             double_quant=cfg.double_quant)
    else:
        model = load_model(folder, dtype=dtype, device=device, lora=lora_config, quantize=quantize,
                           double_quant=cfg.double_quant)
    model.gradient_checkpointing = cfg.grad_checkpointing
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    totals = Totals()
    if resume_from:
        lora.load_adapter(model, resume_from)
        optimizer.load_state_dict(run_folder.load_optimizer_state(resume_from, optimizer, start_step))
        stream.load_state_dict(state["stream"])
        totals = Totals(**state.get("totals", {}))  # the summary describes the whole run, not this leg
        log(f"resumed from {resume_from} at step {start_step}")
    runtime = configure_runtime(model, device, dtype, sdpa_backends=cfg.sdpa_backends, fused_mlp=cfg.fused_mlp,
                                varlen=cfg.varlen, compile_scope=cfg.compile_scope if cfg.compile else None,
                                compile_mode=cfg.compile_mode)
    if device.type == "cuda":
        log(f"attention: {runtime.attention}")
    return Run(model, tokenizer, stream, eval_examples[proc.rank::proc.world], optimizer, runtime, total_steps,
               start_step, totals, training_flops_per_token(model.config, lora_config, cfg.max_len),
               measure_matmul_peak(device, dtype))


# ---- the run ----------------------------------------------------------------------------------------------

def main(cfg: TrainConfig) -> dict:
    cfg = with_machine_defaults(cfg)
    lora_config = validate(cfg)
    if cfg.dry_run:
        shape = cfg.model if cfg.model in SHAPES or Path(cfg.model).exists() else "TinyLlama-1.1B shape"
        return report.parameter_table(model_config(cfg.model), lora_config, sorted({4, 16, 64, 256, cfg.rank}),
                                      shape, print)
    proc = parallel.start(cfg.device, cfg.dist_timeout)
    log, device = proc.log, proc.device
    resume_from = run_folder.find_checkpoint(cfg.resume) if cfg.resume else None
    out = Path(cfg.out) if cfg.out else resume_from.parent if resume_from else Path(f"runs/rank{cfg.rank}")
    # The main process alone writes the output folder. It locks it (which also proves it writable) and checks
    # that no other run's files would be overwritten, before anything is loaded; the checkpoint is loaded and
    # checked before anything in the folder is written or moved.
    if proc.main:
        run_folder.refuse_model_folder(out, cfg.model)
    with run_folder.lock(out, log) if proc.main else contextlib.nullcontext():
        if proc.main:
            run_folder.check_out(out, resume_from, cfg.overwrite)
        run = load_run(cfg, lora_config, proc, resume_from, out)
        model, optimizer, stream = run.model, run.optimizer, run.stream
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if proc.main:  # the first write into the output folder
            run_folder.begin(out, resume_from, cfg.overwrite, log)
            run_folder.write_text(out / "config.json", json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
        run.metrics = report.Metrics(out, tensorboard=cfg.tensorboard, start_step=run.start_step, enabled=proc.main)
        trainable, total = lora.count_parameters(model)
        log(f"training {trainable:,} of {total:,} parameters ({100 * trainable / total:.2f}%) on {device} "
            f"({run.runtime.dtype}), {proc.world} process(es), {run.total_steps} steps of "
            f"{cfg.batch_size}x{cfg.grad_accum}x{proc.world} sequences, max_len {cfg.max_len}, "
            f"{'packed' if cfg.packing else 'padded'}")
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        progress = report.Progress(run.total_steps, run.start_step, enabled=proc.main)
        bad = torch.zeros((), device=device)  # set on the device by a non-finite step; see training.step
        skip_updates_when(optimizer, bad)
        pending = None
        for step in range(run.start_step, run.total_steps):
            lr = lr_at(step, cfg, run.total_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            micro = [next(stream) for _ in range(cfg.grad_accum)]
            n_real = sum(real_token_count(b) for b in micro)  # before prepare() drops a right-padded mask
            micro = [prepare(b, device) for b in micro]  # copies queued now; labelled positions found on the CPU
            counts = torch.tensor([sum(b["label_index"].numel() for b in micro), n_real], dtype=torch.float64)
            if proc.world > 1:  # NCCL reduces device tensors; a single process needs no round trip
                counts = parallel.all_reduce_sum(counts.to(device)).cpu()
            n_labelled, n_tokens = counts.tolist()
            if n_labelled == 0:
                raise TrainingError(f"step {step + 1}: no labelled tokens in this batch")

            timer = Timer(device)
            loss_total = torch.zeros((), device=device)
            for i, batch in enumerate(micro):
                if lora_config.dropout:
                    torch.manual_seed(dropout_seed(cfg.seed, step, i * proc.world + proc.rank))
                with run.runtime.forward():
                    loss_sum, _ = batch_loss(model, batch)
                (loss_sum / n_labelled).backward()
                loss_total += loss_sum.detach()
            parallel.all_reduce_grads(params)
            loss_total = parallel.all_reduce_sum(loss_total)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip or math.inf)  # the norm, clipped or not
            numbers = torch.stack([loss_total, grad_norm.to(loss_total.dtype)])
            torch.maximum(bad, (~torch.isfinite(numbers)).any().to(bad.dtype), out=bad)
            optimizer.step()  # skipped on the device if `bad`
            optimizer.zero_grad(set_to_none=True)
            timer.stop()

            if pending is not None:  # the previous step's numbers, read now that this step is queued
                finish_step(pending, run, cfg.log_every, proc, out, progress)
            done = step + 1
            pending = QueuedStep(done, numbers, timer, lr, n_tokens, n_labelled, stream.epoch)
            evaluate_now = (cfg.eval_every and done % cfg.eval_every == 0 or done == run.total_steps) \
                and run.eval_examples
            save_now = cfg.save_every and (done % cfg.save_every == 0 or done == run.total_steps) and proc.main
            if evaluate_now or save_now or done == run.total_steps:  # checked before anything is evaluated or saved
                finish_step(pending, run, cfg.log_every, proc, out, progress)
                pending = None
            if evaluate_now:
                batches = eval_batches(run.eval_examples, cfg.batch_size, cfg.max_len, packing=cfg.packing)
                run.totals.eval_loss, run.totals.eval_ppl = evaluate(model, batches, run.runtime)
                run.metrics.write({"step": done, "split": "eval", "loss": run.totals.eval_loss,
                                   "ppl": run.totals.eval_ppl, "lr": lr, "tokens_per_s": None})
                progress.note(f"step {done}: eval loss {run.totals.eval_loss:.4f}, ppl {run.totals.eval_ppl:.2f}")
            if save_now:
                run_folder.save_checkpoint(
                    out, done, lambda folder: lora.save_adapter(model, folder, base_model=cfg.model), optimizer,
                    {"stream": stream.state_dict(), "config": dataclasses.asdict(cfg),
                     "totals": dataclasses.asdict(run.totals)}, cfg.keep_checkpoints)
        progress.close()
        run.metrics.close()

        summary = report.summary(run.totals, trainable=trainable, total=total, steps=run.total_steps,
                                 flops_per_token=run.flops_per_token, peak_flops=run.peak_flops, device=device,
                                 world=proc.world, out=out, largest_weight=report.largest_weight(params))
        if proc.main:
            card = report.model_card(cfg, run.totals, run.total_steps, command_line(cfg))
            run_folder.claim(out, "adapter", "summary.json")
            run_folder.write_dir(out / "adapter", lambda folder: lora.save_adapter(model, folder, base_model=cfg.model,
                                                                                   card=card))
            run_folder.write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
            report.print_summary(summary, log)
            report.plot_losses(out)
            if cfg.samples and run.tokenizer is not None:
                uncompile_model(model)  # generation's growing shapes would recompile a whole-model graph
                report.show_samples(model, run.tokenizer, out, log)
    parallel.stop()
    return summary


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
