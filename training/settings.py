"""The settings of a training run: `TrainConfig` (every setting, with its help), `validate` (bad settings refused
before anything is downloaded or put on a GPU, a line each), and the command line generated from the dataclass:
one flag per field, typed as the field is, its help from the field's metadata (`bench.bench --variant` parses
settings with the same types), over the values of `--config FILE` (`tinyllama.settings_file`), and
`--print-config`."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import torch

from data.encoding import DEFAULT_MAX_LEN, TRAIN_ON
from data.pairs import is_pair_file
from data.sources import AUTO, NONE, is_random, parse_sources, source_problems
from lora import LoRAConfig, read_adapter_config, resolve_targets
from tinyllama import settings_file
from tinyllama.checkpoint import DEFAULT_MODEL, is_hub_id, model_config
from tinyllama.flops import lora_shapes
from tinyllama.model import check_targets
from tinyllama.quant import QUANTIZE_CHOICES
from tinyllama.runtime import (
    COMPILE_MODES,
    COMPILE_SCOPES,
    DEFAULT_SDPA_BACKENDS,
    SDPA_BACKENDS,
    default_packing,
    plan_problems,
    resolve_device,
)
from tinyllama.shapes import SHAPES
from tinyllama.templates import BUILTINS, DEFAULT_TIMEOUT, MODEL

from . import run_folder, trackers
from .fsdp import MODES as FSDP_MODES
from .plan import parse_bytes
from .preference import OBJECTIVES, PREFERENCE, SFT, SIMPO, WITH_REFERENCE


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default, except None: those help texts say what the default is computed from."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def setting_type(cls, name: str):
    """The type of field `name` of dataclass `cls`: bool, int, float or str ("float | None" is a float whose
    None default the help explains)."""
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    kind = f.type if isinstance(f.type, str) else f.type.__name__
    return {"bool": bool, "int": int, "float": float, "str": str}[kind.removesuffix(" | None")]


def parse_settings(cls, argv=None, description: str = "", resolve=None, prog: str | None = None):
    """An instance of `cls` from the command line: `--field-name VALUE`, or `--flag/--no-flag` for a bool, over the
    values of `--config FILE` (`tinyllama.settings_file`: every field, by its flag's name). `--print-config` prints
    the settings as YAML, as `resolve(settings)` decides them (None: as they are), and exits: that YAML is itself a
    `--config`."""
    parser = argparse.ArgumentParser(prog=prog, description=description, formatter_class=_HelpFormatter)
    settings_file.add_config_flag(parser)
    parser.add_argument("--print-config", action="store_true", help="print the settings (the file's, then the "
                        "flags', then what the machine decides) as YAML, which --config reads, and exit; nothing is "
                        "loaded or written")
    for f in dataclasses.fields(cls):
        flag, help_, kind = "--" + f.name.replace("_", "-"), f.metadata.get("help", " "), setting_type(cls, f.name)
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=help_)
        elif "const" in f.metadata:  # `--flag` alone means `--flag CONST`
            parser.add_argument(flag, type=kind, default=f.default, nargs="?", const=f.metadata["const"],
                                help=help_)
        else:
            parser.add_argument(flag, type=kind, default=f.default, help=help_)
    args = vars(settings_file.parse_with_file(parser, argv))
    args.pop("config")
    print_only = args.pop("print_config")
    settings = cls(**args)
    if print_only:
        shown = resolve(settings) if resolve else settings
        print(settings_file.to_yaml(dataclasses.asdict(shown), f"{parser.prog} settings: pass this file to "
                                    "--config to run them"), end="")
        raise SystemExit(0)
    return settings


def command_line(settings, program: str = "python train.py") -> str:
    """The command that gives `settings` (a dataclass instance): its program and a flag per non-default field, so
    a run's record (the adapter's model card) can be repeated exactly, whoever started it and however."""
    words = program.split()
    for f in dataclasses.fields(settings):
        value = getattr(settings, f.name)
        if value == f.default:
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            words.append(flag if value else "--no-" + flag[2:])
        else:
            words += [flag, str(value)]
    return shlex.join(words)


# ---- the training settings ---------------------------------------------------------------------------------

SCHEDULES = ("cosine", "linear", "constant")
# Upper bounds of the counts, far past any real run yet small enough that what they size (a random data set of
# 16 steps, index arithmetic in torch's int64) stays finite: a step of 65,536 rows is 134M tokens at 2,048 each,
# 8x Llama 3's largest. The rank's bound is LoRAConfig's (lora.config.MAX_RANK).
MAX_ROWS_PER_STEP = 2**16
MAX_LEN = 2**20  # tokens in a row: past every model's positions (packed rows may exceed those)
TRAIN_DTYPES = ("auto", "float32", "bfloat16")  # float16 would need loss scaling


@dataclass
class TrainConfig:
    # What to train
    model: str = field(default=DEFAULT_MODEL, metadata={"help": "Hub repo id or local HF checkpoint folder"})
    data: str = field(default="train", metadata={
        "help": "training data: a guanaco split (train, test) or a local .jsonl, .jsonl.gz or .parquet (pip install "
                "-e .[parquet]) of guanaco text rows, OASST trees, messages, ShareGPT, Alpaca or prompt-completion "
                "rows (detected per file); commas separate several sources, and "
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
    # Preference tuning (training.preference)
    objective: str = field(default="sft", metadata={
        "help": "sft: supervised fine-tuning on conversations; dpo, ipo, simpo, orpo: preference tuning on a file of "
                "pairs (prompt, chosen, rejected; see docs/preference.md), as trl 1.16's DPOTrainer (dpo, ipo), "
                "CPOTrainer (simpo) and ORPOTrainer (orpo) compute it"})
    beta: float = field(default=0.1, metadata={"help": "the preference objective's beta (ORPO's lambda)"})
    gamma: float = field(default=0.5, metadata={"help": "SimPO's target reward margin (trl's simpo_gamma)"})
    label_smoothing: float = field(default=0.0, metadata={
        "help": "SimPO's label smoothing (trl 1.16 reads it there only), in [0, 0.5)"})
    precompute_ref: bool = field(default=False, metadata={
        "help": "dpo, ipo: compute the reference's log-probs of every pair once before training (trl's "
                "precompute_ref_log_probs) instead of a reference forward pass per step"})
    init_adapter: str = field(default="", metadata={
        "help": "start from this PEFT adapter folder (an SFT run's OUT/adapter) and train it further; its rank, "
                "alpha, targets, rsLoRA and DoRA become the run's. For dpo and ipo it is also the reference"})
    # LoRA
    rank: int = field(default=64, metadata={"help": "LoRA rank r: the inner size of each B A product"})
    alpha: float | None = field(default=None, metadata={"help": "LoRA alpha (default: equal to --rank)"})
    dropout: float = field(default=0.05, metadata={"help": "dropout on the LoRA branch's input (PEFT's "
                                                         "lora_dropout)"})
    targets: str = field(default="mlp", metadata={
        "help": "comma-separated projections to adapt, by the model's own names, or mlp, attention, all: its MLP's "
                "(gate_proj,up_proj,down_proj; Phi-3's gate_up_proj,down_proj), its attention's "
                "(q_proj,k_proj,v_proj,o_proj; Phi-3's qkv_proj,o_proj), or both"})
    rslora: bool = field(default=False, metadata={
        "help": "scale by alpha/sqrt(rank); llama.cpp ignores this and scales by alpha/rank: run the adapter there "
                "with --lora-scaled ADAPTER:SCALE, SCALE = sqrt(rank)"})
    dora: bool = field(default=False, metadata={
        "help": "DoRA (PEFT's use_dora): a trainable magnitude per output row; not with --fused-mlp"})
    # Optimisation
    lr: float = field(default=2e-4, metadata={"help": "peak learning rate of AdamW"})
    warmup: int = field(default=20, metadata={"help": "linear warmup steps"})
    schedule: str = field(default="cosine", metadata={"help": "|".join(SCHEDULES)})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW's decoupled weight decay"})
    grad_clip: float = field(default=1.0, metadata={"help": "max gradient norm; 0 disables"})
    batch_size: int = field(default=4, metadata={"help": "micro-batch size per process"})
    grad_accum: int = field(default=4, metadata={"help": "micro-batches per optimizer step"})
    max_len: int = field(default=DEFAULT_MAX_LEN, metadata={"help": "tokens per row: longer conversations are cut"})
    chat_template: str | None = field(default=None, metadata={
        "help": f"how conversations become text: a built-in ({', '.join(BUILTINS)}), {MODEL} (the model's own, "
                "from its tokenizer_config.json or chat_template.jinja) or a .jinja file; default: the model's own "
                "where it has one, else guanaco. Saved beside the adapter and written into the export"})
    template_timeout: float = field(default=DEFAULT_TIMEOUT, metadata={
        "help": "seconds the chat template may take to render one conversation; one that takes longer (a loop "
                "that never ends) stops the run with an error naming the template"})
    train_on: str = field(default="assistant", metadata={
        "help": "assistant: the loss falls on every assistant turn (and its end-of-turn token); last: on the "
                "final assistant turn only"})
    steps: int = field(default=0, metadata={"help": "optimizer steps (0: use --epochs)"})
    epochs: float = field(default=1.0, metadata={"help": "passes over --data when --steps is 0 (fractions "
                                                     "allowed)"})
    packing: bool | None = field(default=None, metadata={
        "help": "pack conversations into rows of --max-len tokens (each cut at the model's context); default: on "
                "CUDA, where it is the fastest (a step then holds more conversations), off on a CPU"})
    group_by_length: bool = field(default=True, metadata={"help": "length-grouped batches (padding mode)"})
    # Bookkeeping
    eval_every: int = field(default=100, metadata={"help": "steps between evals; 0: only at the end"})
    save_every: int = field(default=0, metadata={"help": "steps between checkpoints; 0: none"})
    keep_checkpoints: int = field(default=2, metadata={
        "help": "checkpoints kept (the newest; older ones this run wrote are pruned); 0 keeps them all"})
    log_every: int = field(default=10, metadata={"help": "steps between metrics.jsonl rows"})
    tensorboard: bool = field(default=False, metadata={
        "help": "also write the metrics as TensorBoard scalars to OUT/tensorboard (pip install -e .[tensorboard]); "
                "the same as --report-to tensorboard"})
    report_to: str = field(default="", metadata={
        "help": "trackers that also get every metrics.jsonl value, the settings and the summary, comma-separated: "
                "tensorboard, wandb (pip install -e .[wandb]; WANDB_PROJECT, WANDB_ENTITY, WANDB_MODE, WANDB_DIR), "
                "mlflow (pip install -e .[mlflow]; MLFLOW_TRACKING_URI, MLFLOW_EXPERIMENT_NAME); none by default"})
    run_name: str = field(default="", metadata={
        "help": "the run's name in the trackers (default: the --out folder's name)"})
    out: str = field(default="", metadata={
        "help": "output folder (default: runs/rank{rank}; with --resume, the checkpoint's own folder)"})
    overwrite: bool = field(default=False, metadata={
        "help": "replace an earlier run in --out: only what its manifest (OUT/.run-manifest.json) lists is removed, "
                "and only while it matches what the manifest recorded; without it such a folder is refused"})
    resume: str = field(default="", metadata={"help": "checkpoint folder, or an output folder (latest)"})
    seed: int = field(default=0, metadata={"help": "seeds the LoRA initialisation, data order, hold-out and "
                                               "dropout masks"})
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
    strict_fast_paths: bool = field(default=False, metadata={
        "help": "stop with an error when a fast path (--varlen, --fused-mlp, grouped k/v in place) fails its "
                "start-up check against its plain path, instead of turning it off with a warning"})
    fsdp: str = field(default="none", metadata={
        "const": "full",
        "help": "shard the model over the torchrun processes with FSDP2: --fsdp (full: every process holds "
                "1/world of the base, the adapter and AdamW's state), --fsdp hybrid (HSDP: shard within a "
                "node, replicate across nodes); none: plain data parallel (every process holds the whole model)"})
    fsdp_shard_size: int = field(default=0, metadata={
        "help": "with --fsdp hybrid: processes per shard group (default 0: the processes of one node, torchrun's "
                "LOCAL_WORLD_SIZE)"})
    dist_timeout: float = field(default=300.0, metadata={
        "help": "seconds a data-parallel process waits for the others before the job stops with an error"})
    debug: bool = field(default=False, metadata={"help": "show the Python traceback of errors (or TRAIN_DEBUG=1)"})
    samples: bool = field(default=True, metadata={"help": "print base vs fine-tuned answers at the end"})
    dry_run: bool = field(default=False, metadata={
        "help": "print the parameter table and the plan of one optimizer step (memory by part, saved activations "
                "and FLOPs per token; traced on fake tensors, nothing loaded) and exit"})
    plan_json: str = field(default="", metadata={"help": "with --dry-run: also write the plan to this JSON file"})
    fit_memory: str = field(default="", metadata={
        "help": "with --dry-run: the largest --batch-size whose planned peak fits this much memory per process "
                "(24GiB, 80GB, ...)"})
    plan_world: int = field(default=1, metadata={"help": "with --dry-run --fsdp: processes to plan for"})


def parse_args(argv=None) -> TrainConfig:
    return parse_settings(TrainConfig, argv, description="Supervised fine-tuning with LoRA (python train.py)",
                          resolve=with_machine_defaults, prog="train.py")


def validate(cfg: TrainConfig) -> LoRAConfig:
    """Refuse bad settings before anything is downloaded or put on a GPU: every problem found, a line each."""
    problems = number_problems(cfg) + machine_problems(cfg) + input_problems(cfg) + objective_problems(cfg)
    lora_config = None
    try:
        config = None
        with contextlib.suppress(ValueError, OSError):  # a broken config.json is reported when the model loads
            config = model_config(cfg.model)
        lora_config = lora_config_of(cfg, config)
    except (ValueError, TypeError) as e:
        problems.append(str(e))
    if cfg.resume:
        problems += run_folder.resume_problems(cfg.resume, lora_config)
    if problems:  # one line for one problem, a line each for several
        raise SystemExit("train.py: invalid settings:" + ("\n  " if len(problems) > 1 else " ")
                         + "\n  ".join(problems))
    return lora_config


def _checker():
    problems = []

    def need(ok, msg):
        if not ok:
            problems.append(msg)

    return problems, need


def number_problems(cfg: TrainConfig) -> list[str]:
    """Numbers out of their range."""
    problems, need = _checker()
    need(cfg.lr > 0 and math.isfinite(cfg.lr), f"--lr must be a finite number > 0, got {cfg.lr}")
    for name in ("epochs", "weight_decay", "grad_clip", "dropout", "dist_timeout"):
        need(math.isfinite(getattr(cfg, name)), f"--{name.replace('_', '-')} must be finite, got {getattr(cfg, name)}")
    need(cfg.alpha is None or cfg.alpha > 0, f"--alpha must be > 0 (leave it out for alpha = rank), got {cfg.alpha}")
    need(0 <= cfg.seed < 2**32, f"--seed must be in 0..2**32-1, got {cfg.seed}")
    need(cfg.dist_timeout > 0, f"--dist-timeout must be > 0 seconds, got {cfg.dist_timeout}")
    need(0 < cfg.template_timeout < math.inf, f"--template-timeout must be a finite number of seconds > 0, got "
         f"{cfg.template_timeout}")
    need(cfg.warmup >= 0, f"--warmup must be >= 0, got {cfg.warmup}")
    need(cfg.schedule in SCHEDULES, f"--schedule must be one of {SCHEDULES}, got {cfg.schedule!r}")
    need(cfg.train_on in TRAIN_ON, f"--train-on must be one of {', '.join(TRAIN_ON)}, got {cfg.train_on!r}")
    need(cfg.weight_decay >= 0, f"--weight-decay must be >= 0, got {cfg.weight_decay}")
    need(cfg.grad_clip >= 0, f"--grad-clip must be >= 0 (0 disables), got {cfg.grad_clip}")
    need(cfg.batch_size >= 1, f"--batch-size must be >= 1, got {cfg.batch_size}")
    need(cfg.grad_accum >= 1, f"--grad-accum must be >= 1, got {cfg.grad_accum}")
    need(cfg.max_len >= 8, f"--max-len must be >= 8, got {cfg.max_len}")
    need(cfg.batch_size <= MAX_ROWS_PER_STEP, f"--batch-size must be <= {MAX_ROWS_PER_STEP}, got {cfg.batch_size}")
    need(cfg.grad_accum <= MAX_ROWS_PER_STEP, f"--grad-accum must be <= {MAX_ROWS_PER_STEP}, got {cfg.grad_accum}")
    need(not (1 <= cfg.batch_size <= MAX_ROWS_PER_STEP and 1 <= cfg.grad_accum <= MAX_ROWS_PER_STEP)
         or cfg.batch_size * cfg.grad_accum <= MAX_ROWS_PER_STEP,
         f"--batch-size {cfg.batch_size} x --grad-accum {cfg.grad_accum} = {cfg.batch_size * cfg.grad_accum} rows "
         f"per optimizer step (per process); at most {MAX_ROWS_PER_STEP} are supported: lower either")
    need(cfg.max_len <= MAX_LEN, f"--max-len must be <= {MAX_LEN}, got {cfg.max_len}")
    bounded = {"batch_size", "grad_accum", "max_len", "rank", "seed"}
    for f in dataclasses.fields(cfg):  # the rest: what torch and numpy index with must fit in 64 bits
        value = getattr(cfg, f.name)
        if f.name in bounded:
            continue
        need(not isinstance(value, int) or isinstance(value, bool) or abs(value) < 2**63,
             f"--{f.name.replace('_', '-')} {value} does not fit in 64 bits; no count here needs more than a few "
             "million")
    need(cfg.steps >= 0, f"--steps must be >= 0, got {cfg.steps}")
    need(cfg.steps > 0 or cfg.epochs > 0, f"--epochs must be > 0 when --steps is 0, got {cfg.epochs}")
    for name in ("eval_every", "save_every", "log_every", "keep_checkpoints"):
        need(getattr(cfg, name) >= 0, f"--{name.replace('_', '-')} must be >= 0, got {getattr(cfg, name)}")
    return problems


def objective_problems(cfg: TrainConfig) -> list[str]:
    """The preference settings: an objective that exists, its numbers, and what it does not run with."""
    problems, need = _checker()
    need(cfg.objective in OBJECTIVES, f"--objective must be one of {', '.join(OBJECTIVES)}, got {cfg.objective!r}")
    need(cfg.beta > 0 and math.isfinite(cfg.beta), f"--beta must be a finite number > 0, got {cfg.beta}")
    need(math.isfinite(cfg.gamma), f"--gamma must be finite, got {cfg.gamma}")
    need(cfg.label_smoothing == 0 or cfg.objective == SIMPO,
         f"--label-smoothing applies to --objective simpo only (trl 1.16's {cfg.objective} does not read it); leave "
         "it out")
    need(0 <= cfg.label_smoothing < 0.5, f"--label-smoothing must be in [0, 0.5), got {cfg.label_smoothing}")
    need(not cfg.precompute_ref or cfg.objective in WITH_REFERENCE,
         f"--precompute-ref applies to --objective dpo or ipo (they have a reference model), not {cfg.objective}")
    if cfg.objective == SFT and not is_random(cfg.data):
        with contextlib.suppress(ValueError, OSError):  # a bad --data is source_problems' to report
            pair_files = [s.name for s in parse_sources(cfg.data) if is_pair_file(s.name)]
            need(not pair_files, f"--data {', '.join(pair_files)} holds preference pairs (chosen, rejected): pass "
                 "--objective dpo, ipo, simpo or orpo to train on them")
    if cfg.objective in PREFERENCE:
        flag = f"--objective {cfg.objective}"
        need(not cfg.packing, f"{flag} runs padded micro-batches of whole pairs: leave --packing out")
        need(not is_random(cfg.data), f"{flag} trains on a file of preference pairs, not --data random")
    return problems


def with_init_adapter(cfg: TrainConfig) -> TrainConfig:
    """--init-adapter's rank, alpha, targets, rsLoRA and DoRA as the run's; a flag set to another value is refused
    in one line (its default is not a choice, so it gives way)."""
    if not cfg.init_adapter:
        return cfg
    try:
        saved = read_adapter_config(cfg.init_adapter)
    except (ValueError, OSError) as e:
        raise SystemExit(f"train.py: invalid settings: --init-adapter {cfg.init_adapter}: {e}") from None
    default = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    theirs = {"rank": saved.rank, "alpha": saved.alpha, "targets": ",".join(saved.targets),
              "rslora": saved.use_rslora, "dora": saved.use_dora}
    conflicts = [f"--{name} {getattr(cfg, name)}" for name, value in theirs.items()
                 if getattr(cfg, name) != default[name] and getattr(cfg, name) != value
                 and not (name == "targets" and set(getattr(cfg, name).split(",")) == set(saved.targets))]
    if conflicts:
        held = (f"rank {saved.rank}, alpha {saved.alpha:g}, targets {theirs['targets']}"
                f"{', rsLoRA' if saved.use_rslora else ''}{', DoRA' if saved.use_dora else ''}")
        raise SystemExit(f"train.py: invalid settings: {', '.join(conflicts)}: not what --init-adapter "
                         f"{cfg.init_adapter} holds ({held}), whose settings the run takes: leave those flags out")
    return dataclasses.replace(cfg, **theirs)


def machine_problems(cfg: TrainConfig) -> list[str]:
    """Device, dtype, kernels, compile and quantisation settings this machine cannot run."""
    problems, need = _checker()
    need(cfg.dtype in TRAIN_DTYPES, f"--dtype must be one of {list(TRAIN_DTYPES)}, got {cfg.dtype!r}")
    device = None
    try:
        device = resolve_device(cfg.device)
        need(device.type in ("cpu", "cuda"), f"--device must be cpu or cuda[:N], got {cfg.device!r}")
        need(device.type != "cuda" or torch.cuda.is_available() or cfg.dry_run,  # a plan for CUDA needs none
             f"--device {cfg.device} asked for CUDA but torch.cuda.is_available() is False")
    except RuntimeError as e:
        problems.append(f"--device {cfg.device!r}: {e}")
    need(cfg.quantize in ("none", *QUANTIZE_CHOICES),
         f"--quantize must be none or one of {list(QUANTIZE_CHOICES)}, got {cfg.quantize!r}")
    need(not cfg.double_quant or cfg.quantize != "none", "--double-quant applies to --quantize nf4; add that")
    if device is not None:
        problems += plan_problems(device, dora=cfg.dora, quantized=cfg.quantize != "none", fused_mlp=cfg.fused_mlp,
                                  varlen=cfg.varlen, sharded=cfg.fsdp != "none")
    need(cfg.fsdp in FSDP_MODES, f"--fsdp must be one of {', '.join(FSDP_MODES)}, got {cfg.fsdp!r}")
    need(not (cfg.fsdp != "none" and cfg.compile), "--compile with --fsdp is not supported; pick one")
    need(not (cfg.fsdp != "none" and cfg.dora), "--dora with --fsdp is not supported (DoRA's magnitude starts as "
         "the norms of whole base rows, which no process holds); use plain data parallel for DoRA")
    need(cfg.plan_world >= 1, f"--plan-world must be >= 1, got {cfg.plan_world}")
    if cfg.fit_memory:
        try:
            parse_bytes(cfg.fit_memory)
        except ValueError as e:
            problems.append(f"--fit-memory: {e}")
    need(cfg.fsdp_shard_size >= 0, f"--fsdp-shard-size must be >= 0, got {cfg.fsdp_shard_size}")
    need(not cfg.fsdp_shard_size or cfg.fsdp == "hybrid", "--fsdp-shard-size applies to --fsdp hybrid; add that")
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
    return problems


def input_problems(cfg: TrainConfig) -> list[str]:
    """The output folder, extras, model, tokenizer and data: what is missing or does not fit."""
    problems, need = _checker()
    need(not cfg.out or not Path(cfg.out).is_file(), f"--out {cfg.out} is a file; expected a folder")
    problems += trackers.problems(cfg)
    model_path = Path(cfg.model)
    shape_only = cfg.random_init or cfg.dry_run  # no weights needed: a shape name or a config.json will do
    is_shape = cfg.model in SHAPES or (model_path.suffix == ".json" and model_path.is_file())
    need(model_path.is_dir() or (shape_only and is_shape) or is_hub_id(cfg.model),
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
    spec = cfg.chat_template
    need(spec is None or spec in BUILTINS or spec == MODEL or Path(spec).expanduser().is_file(),
         f"--chat-template {spec!r} is neither a built-in ({', '.join(BUILTINS)}), nor {MODEL!r} (the model's "
         "own template), nor an existing .jinja file")
    return problems


def with_machine_defaults(cfg: TrainConfig) -> TrainConfig:
    """--packing decided (`runtime.default_packing`; off for preference objectives, whose micro-batches hold whole
    pairs), so config.json and checkpoints record what ran."""
    if cfg.packing is None and cfg.objective in PREFERENCE:
        cfg = dataclasses.replace(cfg, packing=False)
    if cfg.packing is None:
        try:
            device = resolve_device(cfg.device)
        except RuntimeError:
            device = torch.device("cpu")  # validate says what is wrong with --device
        cfg = dataclasses.replace(cfg, packing=default_packing(device))
    return cfg


def lora_config_of(cfg: TrainConfig, config) -> LoRAConfig:
    """The run's LoRAConfig, its --targets resolved to the projection names of the model of `config` (None: a
    Llama's names) and checked against them."""
    targets = resolve_targets(cfg.targets) if config is None else resolve_targets(
        cfg.targets, config.attention_projections, config.mlp_projections)
    lora_config = LoRAConfig(rank=cfg.rank, alpha=float(cfg.rank) if cfg.alpha is None else cfg.alpha,
                             dropout=cfg.dropout, targets=targets, use_rslora=cfg.rslora, use_dora=cfg.dora)
    if config is not None:
        check_targets(config, lora_config.targets)
    return lora_config


def needs_tokenizer(cfg: TrainConfig) -> bool:
    """Whether the run has conversations to encode or samples to print."""
    return not is_random(cfg.data) or cfg.samples or (cfg.eval_data.lower() not in (AUTO, NONE)
                                                      and not is_random(cfg.eval_data))


def rank_warning(cfg: TrainConfig, config) -> str | None:
    """Why --rank is wider than a targeted projection's smaller side, or None. B A then has that side's rank at
    most, so the extra rank is memory and compute for nothing; a warning, not a refusal, since it trains
    correctly (PEFT allows it, and benchmarks run a production rank on tiny shapes)."""
    sides = lora_shapes(config)
    targets = [t for t in resolve_targets(cfg.targets, config.attention_projections, config.mlp_projections)
               if t in sides]
    narrowest = min(targets, key=lambda t: min(sides[t]), default=None)
    if narrowest is None or cfg.rank <= min(sides[narrowest]):
        return None
    n_in, n_out = sides[narrowest]
    return (f"--rank {cfg.rank} is larger than {narrowest}'s smaller side ({n_in} in, {n_out} out): no LoRA "
            f"product there can have that rank, so the rest costs memory and compute for nothing; --rank "
            f"{min(n_in, n_out)} reaches as far")


def context_problem(cfg: TrainConfig, config) -> str | None:
    """Why --max-len does not fit the model's positions (RoPE past them is extrapolation), or None. Packed rows
    may be longer: each conversation in them is cut at the model's context instead."""
    if cfg.max_len <= config.max_position_embeddings or cfg.packing:
        return None
    return (f"--max-len {cfg.max_len} is longer than the model's max_position_embeddings "
            f"({config.max_position_embeddings}); lower --max-len to at most that")
