"""Supervised fine-tuning of TinyLlama with LoRA, and preference tuning on the same loop (`--objective dpo|ipo|
simpo|orpo`: `training.preference`, its step `training.preference_step`): the loop in `train()`, top to bottom.

    python train.py --rank 64 --alpha 64            # guanaco train split from the Hub, adapter in runs/
    python train.py --config configs/qlora.yaml     # the settings kept in a file (flags given here win)
    torchrun --nproc_per_node 2 train.py --rank 64  # data parallel (NCCL on GPU, gloo on CPU)

Every setting is a field of `TrainConfig` (`training.settings`, with `validate`); the command line is generated
from it. What `train` does, in order: validate settings (before any download or GPU work), secure the output
folder, load data and model (`load_run`: the runtime plan decided and its fast paths checked), then for each
optimizer step (`queue_step`) run `grad_accum` micro-batches whose summed token losses are divided by the
labelled-token count of the whole step (across micro-batches and ranks), clip, step AdamW over the LoRA weights
only; then log, evaluate, checkpoint, and at the end write the adapter and summary (`finish_run`). The pieces it
uses: `training.step` (a step's parts, and why the host never waits for the GPU), `training.parallel`,
`training.run_folder` (lock, checkpoints, resume), `training.report` (with `training.trackers`: W&B, MLflow,
TensorBoard), and `tinyllama.runtime` (how the model runs on this machine: `RuntimePlan`).

Deliberately left out: full fine-tuning, mixed LoRA ranks per layer, fp16 loss scaling (bf16 needs none),
tensor and pipeline parallelism (FSDP2 with `--fsdp` shards a base too large for one GPU; the adapters are small
enough that nothing else needs splitting).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import torch

import lora
from data import BUILTINS, BatchStream, eval_batches, load_template, load_train_eval
from data.pairs import PairStream, collate_pairs, load_pair_train_eval, pair_batches
from lora import LoRAConfig
from tinyllama import load_model, load_tokenizer
from tinyllama.checkpoint import HubUnavailable, model_config, random_model, resolve_checkpoint
from tinyllama.flops import measure_matmul_peak, training_flops_per_token
from tinyllama.runtime import (
    apply_plan,
    plan_runtime,
    resolve_dtype,
)
from tinyllama.shapes import SHAPES
from tinyllama.startup_check import FastPathError, check_fast_paths
from training import TrainingError, fsdp, parallel, preference, preference_step, report, run_folder, trackers
from training.plan import GIB, fit_batch_size, format_plan, largest_part, parse_bytes, plan_step
from training.run_folder import Totals
from training.settings import (
    TrainConfig,
    command_line,
    context_problem,
    lora_config_of,
    needs_tokenizer,
    parse_args,
    rank_warning,
    validate,
    with_init_adapter,
    with_machine_defaults,
)
from training.step import (
    QueuedStep,
    Run,
    Timer,
    batch_loss,
    evaluate,
    finish_step,
    prepare,
    real_token_count,
    skip_updates_when,
)

# ---- the loop's schedule and seeds ------------------------------------------------------------------

def dropout_seed(seed: int, step: int, slot: int) -> int:
    """The seed of the dropout masks of one micro-batch: slot = micro-batch index * world size + rank.

    A function of where the micro-batch sits in the optimizer step's rows (`BatchStream` deals slot s the step's
    rows [s * batch_size, (s + 1) * batch_size)), not of which process runs it: every rank draws its own masks,
    K processes equal one process accumulating K micro-batches, and a resumed run, on any split with the same
    --batch-size, draws the masks the uninterrupted one would have, with no RNG state in the checkpoint.
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
    try:  # --targets resolved again too: "mlp" is another family's modules than TinyLlama's
        lora_config = dataclasses.replace(lora_config, targets=lora_config_of(cfg, config).targets)
    except ValueError as e:
        raise TrainingError(str(e)) from None
    if wide := rank_warning(cfg, config):
        log("warning: " + wide)
    tokenizer = None
    if needs_tokenizer(cfg):
        tokenizer = load_tokenizer(cfg.tokenizer or folder or resolve_checkpoint(cfg.model))
        if tokenizer.vocab_size > config.vocab_size:
            raise TrainingError(
                f"the tokenizer {tokenizer.path} has {tokenizer.vocab_size:,} tokens but the model only "
                f"{config.vocab_size:,} embeddings, so ids past {config.vocab_size - 1} have none; pass the "
                "model's own tokenizer with --tokenizer, or a model whose vocab_size covers it")
    template = None if tokenizer is None else chat_template(cfg, folder, tokenizer, log)
    n_random = max(64, cfg.batch_size * cfg.grad_accum * 16)  # `--data random` without a count
    example_len = min(cfg.max_len, config.max_position_embeddings)  # the row length, or less in packed rows
    pairs = cfg.objective in preference.PREFERENCE
    if pairs:  # --batch-size counts pairs: a pair's two sequences share a micro-batch
        train_examples, eval_examples = load_pair_train_eval(cfg.data, cfg.eval_data, tokenizer, template,
                                                             example_len, seed=cfg.seed, log=log)
    else:
        train_examples, eval_examples = load_train_eval(cfg.data, cfg.eval_data, tokenizer, example_len,
                                                        vocab_size=config.vocab_size, seed=cfg.seed,
                                                        n_random=n_random, template=template, train_on=cfg.train_on,
                                                        log=log)
    stream = (PairStream if pairs else BatchStream)(
        train_examples, cfg.batch_size, cfg.max_len, grad_accum=cfg.grad_accum, packing=cfg.packing,
        group_by_length=cfg.group_by_length and not cfg.packing, seed=cfg.seed, rank=proc.rank,
        world_size=proc.world)
    total_steps = cfg.steps or max(1, math.ceil(cfg.epochs * stream.steps_per_epoch))
    if cfg.warmup > total_steps:
        log(f"warning: --warmup {cfg.warmup} is longer than the run ({total_steps} steps): the learning rate "
            f"peaks at {lr_at(total_steps - 1, cfg, total_steps):.3g} and never reaches --lr {cfg.lr:g}")
    state = run_folder.read_state(resume_from) if resume_from else {}
    if resume_from:  # the checksums first: no value of a damaged file is read
        run_folder.verify_files(resume_from, state, log)
    start_step = state.get("step", 0)
    if resume_from and start_step == total_steps and not run_folder.is_finished(out, total_steps):
        log(f"{resume_from} is the run's last step, but {out} has no final adapter and summary of it (the run was "
            "stopped while writing them): writing them now")
    elif resume_from and start_step >= total_steps:
        raise TrainingError(f"{resume_from} is at step {start_step} and this run has {total_steps} steps: it is "
                            f"already complete, and nothing was changed. To train further, resume with --steps N "
                            f"(N > {start_step}) or more --epochs.")
    if resume_from:  # before the model loads: a split that cannot continue the data order is refused at once
        try:
            stream.load_state_dict(state["stream"], saved_grad_accum=state["config"].get("grad_accum"),
                                   step=start_step)
        except ValueError as e:
            raise TrainingError(f"--resume {resume_from}: {resume_from / run_folder.STATE} stream: {e}") from e
    changes = run_folder.changed_settings(state.get("config", {}), dataclasses.asdict(cfg))
    if changes:
        log("resuming with settings that differ from the checkpoint's: " + ", ".join(changes))

    model, plan, reference = build_model(cfg, lora_config, proc, folder, config, resume_from)
    if reference is not None and cfg.precompute_ref:
        log(f"reference: log-probs of {len(train_examples) + len(eval_examples)} pairs computed ahead")
        with plan.forward():
            preference.precompute_reference(reference, train_examples + eval_examples, cfg.batch_size,
                                            lambda chunk: {k: v.to(device) for k, v in collate_pairs(chunk).items()})
    param_bytes = int(parallel.all_reduce_max(torch.tensor(fsdp.local_bytes(model), dtype=torch.float64,
                                                           device=device)).item())
    params = [p for p in model.parameters() if p.requires_grad]
    # AdamW over the LoRA weights only (fp32 weights and state, whatever the base dtype; sharded as they are
    # under --fsdp). Fused: it alone can skip an update on the device (`skip_updates_when`).
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    totals = Totals()
    if resume_from:
        saved = run_folder.load_optimizer_state(resume_from, optimizer, start_step)
        optimizer.load_state_dict(fsdp.shard_optimizer_state(saved, params))
        totals = Totals(**state.get("totals", {}))  # the summary describes the whole run, not this leg
        log(f"resumed from {resume_from} at step {start_step}")
    return Run(model, tokenizer, stream, eval_examples[proc.rank::proc.world], optimizer, plan, total_steps,
               start_step, totals, training_flops_per_token(model.config, lora_config, cfg.max_len),
               measure_matmul_peak(device, dtype), template, param_bytes, evaluates=bool(eval_examples),
               reference=reference)


def chat_template(cfg: TrainConfig, folder: Path | None, tokenizer, log):
    """`--chat-template` (default: the model's own, from beside its tokenizer files, else guanaco), refused
    when the tokenizer has no special token to end a turn with."""
    tokenizer_dir = Path(cfg.tokenizer) if cfg.tokenizer else None
    if tokenizer_dir is not None and not tokenizer_dir.is_dir():
        tokenizer_dir = tokenizer_dir.parent
    try:
        template = dataclasses.replace(load_template(cfg.chat_template, folder or tokenizer_dir, tokenizer),
                                       timeout=cfg.template_timeout)
        end = template.end_of_turn_token(tokenizer)
    except ValueError as e:
        raise TrainingError(str(e)) from e
    if end is None:
        usable = [name for name in BUILTINS if load_template(name, tokenizer=tokenizer).end_of_turn_token(tokenizer)]
        raise TrainingError(
            f"the chat template {template.name} ends an assistant turn with "
            f"{template.text_after_reply(tokenizer)!r}, which holds no special token of the tokenizer "
            f"{tokenizer.path} (to it that is plain text), so the model would never learn where a reply ends. Pick a "
            f"template that ends a turn with one of this tokenizer's special tokens: of the built-ins, "
            f"{', '.join(usable)}")
    turns = "the last assistant turn" if cfg.train_on == "last" else "every assistant turn"
    use = ("renders conversational pairs; standard pairs are used as they are"
           if cfg.objective in preference.PREFERENCE else f"the loss on {turns} and its end-of-turn token")
    log(f"chat template: {template.name} ({use})")
    return template


def build_model(cfg: TrainConfig, lora_config: LoRAConfig, proc: parallel.Process, folder: Path | None, config,
                resume_from: Path | None):
    """The model with LoRA built in (base frozen; under --fsdp loaded straight into its shards), --init-adapter's
    weights, the checkpoint's adapter loaded when resuming, run as its RuntimePlan says (fast paths checked);
    (model, plan, the reference of a dpo or ipo run: the model as it is before the checkpoint's adapter)."""
    log, device = proc.log, proc.device
    dtype = resolve_dtype(cfg.dtype, device)
    quantize = None if cfg.quantize == "none" else cfg.quantize
    mesh = fsdp.mesh_for(cfg.fsdp, device, proc.world, cfg.fsdp_shard_size) if cfg.fsdp != "none" else None
    if mesh is not None and not cfg.random_init:  # no process ever holds the whole base
        model = fsdp.load_sharded(folder, mesh, dtype=dtype, device=device, lora_config=lora_config,
                                  quantize=quantize, double_quant=cfg.double_quant)
    else:
        load = functools.partial(random_model, config) if cfg.random_init else functools.partial(load_model, folder)
        model = load(dtype=dtype, device=device, lora_config=lora_config, quantize=quantize,
                     double_quant=cfg.double_quant)
        if mesh is not None:
            fsdp.shard(model, mesh)
    if mesh is not None:
        log(f"sharded with FSDP2 over a {'x'.join(map(str, mesh.shape))} mesh ({', '.join(mesh.mesh_dim_names)})")
    model.gradient_checkpointing = cfg.grad_checkpointing
    model.train()
    if cfg.init_adapter:
        try:
            lora.load_adapter(model, cfg.init_adapter, copy=fsdp.copy_into)
        except (ValueError, OSError) as e:
            raise TrainingError(f"--init-adapter {cfg.init_adapter}: {e}") from None
        log(f"starting from the adapter {cfg.init_adapter}")
    reference = None
    if cfg.objective in preference.WITH_REFERENCE:
        reference = preference.Reference(model, from_adapter=bool(cfg.init_adapter))
    if resume_from:
        try:
            lora.load_adapter(model, resume_from, copy=fsdp.copy_into)
        except ValueError as e:
            raise TrainingError(f"--resume {resume_from}: {e}") from e
    plan = plan_runtime(model.config, device, dtype, lora_config=lora_config, quantized=quantize is not None,
                        packing=cfg.packing, fused_mlp=cfg.fused_mlp, varlen=cfg.varlen,
                        sdpa_backends=cfg.sdpa_backends, compile_scope=cfg.compile_scope if cfg.compile else None,
                        compile_mode=cfg.compile_mode, sharded=mesh is not None)
    checked = model if mesh is None else fsdp.check_stand_in(
        model.config, dtype=dtype, device=device, lora_config=lora_config, quantize=quantize,
        double_quant=cfg.double_quant)
    try:
        plan = check_fast_paths(checked, plan, log, strict=cfg.strict_fast_paths)
    except FastPathError as e:
        raise TrainingError(str(e)) from e
    apply_plan(model, plan)
    log(f"runs as: {plan.describe()}")
    return model, plan, reference


def dry_run(cfg: TrainConfig, lora_config: LoRAConfig) -> dict:
    """--dry-run: the parameter table, then the plan of one optimizer step (and, with --fit-memory, the
    largest micro-batch that fits); nothing is loaded or downloaded beyond a config.json."""
    config = model_config(cfg.model)
    shape = cfg.model if cfg.model in SHAPES or Path(cfg.model).exists() else "TinyLlama-1.1B shape"
    table = report.parameter_table(config, lora_config, sorted({4, 16, 64, 256, cfg.rank}), shape, print)
    if cfg.fit_memory:
        budget = parse_bytes(cfg.fit_memory)
        size, step = fit_batch_size(cfg, lora_config, config, budget, world=cfg.plan_world)
        print(format_plan(step))
        print(f"fits {cfg.fit_memory}: --batch-size {size}" if size else
              f"does not fit {cfg.fit_memory}: one row of {cfg.max_len} tokens plans "
              f"{step['peak_bytes'] / GIB:.2f} GiB, the largest part {largest_part(step)}")
        step["fit_memory"] = {"budget_bytes": budget, "batch_size": size}
    else:
        step = plan_step(cfg, lora_config, config, world=cfg.plan_world)
        print(format_plan(step))
    if cfg.plan_json:
        run_folder.write_text(Path(cfg.plan_json), json.dumps(step, indent=2) + "\n")
    return {**table, "plan": step}


# ---- the run ----------------------------------------------------------------------------------------------

def train(cfg: TrainConfig) -> dict:
    """Train as `cfg` says; the run's summary (summary.json), or the parameter table with --dry-run."""
    cfg = with_init_adapter(with_machine_defaults(cfg))
    lora_config = validate(cfg)
    if cfg.dry_run:
        return dry_run(cfg, lora_config)
    proc = parallel.start(cfg.device, cfg.dist_timeout, group=cfg.fsdp != "none")
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
        started = trackers.start_remote(cfg, out, resume_from, log) if proc.main else []  # their errors: at once
        try:
            run = load_run(cfg, lora_config, proc, resume_from, out)
        except BaseException:
            trackers.close_failed(started)
            raise
        model, optimizer, stream = run.model, run.optimizer, run.stream
        logged = run_folder.last_step(out) if proc.main and resume_from else 0  # before begin() trims metrics
        if proc.main:  # the first write into the output folder
            run_folder.begin(out, resume_from, cfg.overwrite, log)
            run_folder.write_text(out / "config.json", json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
        run.metrics = report.Metrics(out, started, tensorboard="tensorboard" in trackers.requested(cfg),
                                     settings=dataclasses.asdict(cfg), start_step=run.start_step,
                                     logged_through=logged, enabled=proc.main, log=log)
        trainable, total = lora.count_parameters(model)
        log(f"training {trainable:,} of {total:,} parameters ({100 * trainable / total:.2f}%) on {device} "
            f"({run.plan.dtype}), {proc.world} process(es), {run.total_steps} steps of "
            f"{cfg.batch_size}x{cfg.grad_accum}x{proc.world} sequences, max_len {cfg.max_len}, "
            f"{'packed' if cfg.packing else 'padded'}")
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        progress = report.Progress(run.total_steps, run.start_step, enabled=proc.main)
        bad = torch.zeros((), device=device)  # set on the device by a non-finite step; see training.step
        skip_updates_when(optimizer, bad)
        pending = None
        params = [p for group in optimizer.param_groups for p in group["params"]]
        for step in range(run.start_step, run.total_steps):
            queued = queue_step(run, cfg, proc, step, bad, params)
            if pending is not None:  # the previous step's numbers, read now that this step is queued
                finish_step(pending, run, cfg.log_every, proc, out, progress)
            pending, done, lr = queued, queued.step, queued.lr
            # Every process evaluates, its share possibly empty (fewer held-out examples than processes): the
            # sums over processes are collectives that all must join.
            evaluate_now = (cfg.eval_every and done % cfg.eval_every == 0 or done == run.total_steps) \
                and run.evaluates
            save_now = cfg.save_every and (done % cfg.save_every == 0 or done == run.total_steps)
            if evaluate_now or save_now or done == run.total_steps:  # checked before anything is evaluated or saved
                finish_step(pending, run, cfg.log_every, proc, out, progress)
                pending = None
            if evaluate_now and cfg.objective in preference.PREFERENCE:
                with parallel.peers_answer():
                    row = preference_step.evaluate(run, cfg, proc, pair_batches(run.eval_examples, cfg.batch_size))
                run.totals.eval_loss = row["loss"]
                run.metrics.write({"step": done, "split": "eval", **row, "lr": lr, "tokens_per_s": None})
                progress.note(f"step {done}: eval loss {row['loss']:.4f}, reward accuracy "
                              f"{row['rewards/accuracies']:.3f}")
            elif evaluate_now:
                batches = eval_batches(run.eval_examples, cfg.batch_size, cfg.max_len, packing=cfg.packing)
                with parallel.peers_answer():
                    run.totals.eval_loss, run.totals.eval_ppl = evaluate(model, batches, run.plan,
                                                                         lockstep=cfg.fsdp != "none")
                run.metrics.write({"step": done, "split": "eval", "loss": run.totals.eval_loss,
                                   "ppl": run.totals.eval_ppl, "lr": lr, "tokens_per_s": None})
                progress.note(f"step {done}: eval loss {run.totals.eval_loss:.4f}, ppl {run.totals.eval_ppl:.2f}")
            if save_now:  # every process gathers its shards (under --fsdp); the main one writes
                with parallel.peers_answer():
                    tensors, optimizer_state = adapter_tensors(run), fsdp.full_optimizer_state(optimizer)
                if proc.main:
                    run_folder.save_checkpoint(
                        out, done, functools.partial(save_adapter, run, cfg, tensors=tensors), optimizer_state,
                        {"stream": stream.state_dict(), "config": dataclasses.asdict(cfg),
                         "totals": dataclasses.asdict(run.totals)}, cfg.keep_checkpoints, adapter=tensors)
        progress.close()
        summary = finish_run(run, cfg, proc, out)
        run.metrics.close(summary)
    parallel.stop()
    return summary


def queue_step(run: Run, cfg: TrainConfig, proc: parallel.Process, step: int, bad: torch.Tensor,
               params: list[torch.Tensor]) -> QueuedStep:
    """Optimizer step `step` (0-based): its `grad_accum` micro-batches forward and backward, the gradients of
    `params` (the optimizer's) summed over processes, clipped, AdamW. Queued on the device, nothing read back
    (`finish_step` reads it later)."""
    model, optimizer, device = run.model, run.optimizer, proc.device
    lr = lr_at(step, cfg, run.total_steps)
    for group in optimizer.param_groups:
        group["lr"] = lr
    micro = [next(run.stream) for _ in range(cfg.grad_accum)]
    if cfg.objective in preference.PREFERENCE:
        seeds = [dropout_seed(cfg.seed, step, i * proc.world + proc.rank) for i in range(cfg.grad_accum)]
        return preference_step.queue_step(run, cfg, proc, step, lr, micro, bad, params, seeds)
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
    sharded = cfg.fsdp != "none"
    with parallel.peers_answer():  # FSDP's collectives run inside the model
        for i, batch in enumerate(micro):
            if cfg.dropout:
                torch.manual_seed(dropout_seed(cfg.seed, step, i * proc.world + proc.rank))
            if sharded:  # reduce the gradients once, after the step's last micro-batch
                model.set_requires_gradient_sync(i == len(micro) - 1)
            with run.plan.forward():
                loss_sum, _ = batch_loss(model, batch)
            (loss_sum / n_labelled).backward()
            loss_total += loss_sum.detach()
        if not sharded:  # FSDP has reduce-scattered them already
            parallel.all_reduce_grads(params)
        loss_total = parallel.all_reduce_sum(loss_total)
        # The norm, clipped or not; over the sharded gradients, a collective gathers it whole.
        grad_norm = fsdp.full(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip or math.inf))
    numbers = torch.stack([loss_total, grad_norm.to(loss_total.dtype)])
    torch.maximum(bad, (~torch.isfinite(numbers)).any().to(bad.dtype), out=bad)
    optimizer.step()  # skipped on the device if `bad`
    optimizer.zero_grad(set_to_none=True)
    timer.stop()
    return QueuedStep(step + 1, numbers, timer, lr, n_tokens, n_labelled, run.stream.epoch)


def adapter_tensors(run: Run) -> dict[str, torch.Tensor]:
    """The adapter's tensors whole (gathered from every process's shards under --fsdp: all of them call it)."""
    return {k: fsdp.full(v).detach() for k, v in lora.adapter_state_dict(run.model).items()}


def save_adapter(run: Run, cfg: TrainConfig, folder: Path, tensors: dict, card=None) -> None:
    """The adapter in PEFT's format (`tensors`: `adapter_tensors(run)`), with the chat template its
    conversations were rendered with."""
    lora.save_adapter(run.model, folder, base_model=cfg.model, card=card, tensors=tensors,
                      chat_template=None if run.template is None else run.template.source)


def finish_run(run: Run, cfg: TrainConfig, proc: parallel.Process, out: Path) -> dict:
    """The summary of the whole run; the main process writes the final adapter (with its model card), summary.json,
    loss.png and the samples."""
    model, log = run.model, proc.log
    trainable, total = lora.count_parameters(model)
    with parallel.peers_answer():
        tensors = adapter_tensors(run)  # every process: under --fsdp a collective
    run_folder.refuse_non_finite(out, "adapter", "the final adapter", tensors)  # the same on every process
    summary = report.summary(run.totals, trainable=trainable, total=total, steps=run.total_steps,
                             flops_per_token=run.flops_per_token, peak_flops=run.peak_flops, device=proc.device,
                             world=proc.world, out=out, largest_weight=report.largest_weight(tensors.values()),
                             param_bytes=run.param_bytes)
    summary.update(run.last_metrics or {})  # a preference run's last step, under trl's names
    if proc.main:
        card = report.model_card(cfg, run.totals, run.total_steps, command_line(cfg))
        run_folder.claim(out, "adapter", "summary.json")
        run_folder.write_dir(out / "adapter", lambda folder: save_adapter(run, cfg, folder, tensors, card))
        run_folder.write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
        report.print_summary(summary, log)
        report.plot_losses(out, log)
        if cfg.samples and run.tokenizer is not None and cfg.fsdp != "none":
            log("samples: not generated under --fsdp (one process cannot run the sharded model alone); "
                "python chat.py --adapter OUT/adapter answers the same prompts")
        elif cfg.samples and run.tokenizer is not None:
            apply_plan(model, dataclasses.replace(run.plan, compile_scope=None))  # generation's shapes grow
            report.show_samples(model, run.tokenizer, out, log, run.template)
    return summary


def interrupted(settings: TrainConfig) -> str:
    """What a Ctrl-C leaves: the last checkpoint in the output folder and the command that continues from it."""
    try:
        resumed = run_folder.find_checkpoint(settings.resume) if settings.resume else None
    except (TrainingError, OSError):  # the run was refused this at start, or the folder changed since
        resumed = None
    out = Path(settings.out) if settings.out else resumed.parent if resumed else Path(f"runs/rank{settings.rank}")
    saved = run_folder.checkpoints(out) if out.is_dir() else []
    if not saved:
        return (f"stopped by Ctrl-C before any checkpoint was saved in {out}, so there is nothing to resume: run the "
                "command again (--save-every N saves a checkpoint every N steps)")
    step, last = saved[-1]
    again = command_line(dataclasses.replace(settings, resume=str(out), overwrite=False))
    return f"stopped by Ctrl-C; the last checkpoint is {last} (step {step}), and nothing it holds is lost: {again}"


def main(argv=None) -> dict:
    """`python train.py`: an error a person can act on ends the run with its message, not a traceback; so does
    Ctrl-C, saying how to continue."""
    settings = parse_args(argv)
    try:
        return train(settings)
    except KeyboardInterrupt:
        if settings.debug or os.environ.get("TRAIN_DEBUG"):
            raise
        print(f"train.py: {interrupted(settings)}", file=sys.stderr)
        raise SystemExit(130) from None  # the shell's status for a run ended by SIGINT
    except (TrainingError, HubUnavailable, OSError, ValueError) as e:
        if settings.debug or os.environ.get("TRAIN_DEBUG"):
            raise
        hint = "" if isinstance(e, (TrainingError, HubUnavailable)) else " (--debug shows where it was raised)"
        raise SystemExit(f"train.py: error: {e}{hint}") from None


if __name__ == "__main__":
    main()
