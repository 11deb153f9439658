"""Will it fit? One optimizer step's memory and FLOPs, planned before anything is loaded.

    plan = plan_step(cfg, lora_config, config)        # cfg: TrainConfig, config: the model's LlamaConfig
    print(format_plan(plan))                          # what `train.py --dry-run` prints

The step is traced, not guessed: a model of `config`'s shape is built on fake tensors
(`torch._subclasses.FakeTensorMode`: shapes and dtypes, no storage, any size) and one micro-batch of
`--batch-size` x `--max-len` tokens, every position labelled, goes forward and backward through the project's own
step (`tinyllama.loss.causal_lm_loss`), in the dtype and on the paths `--device` would run (`RuntimePlan`: the
fused MLP, packing, gradient checkpointing, NF4, DoRA). A deep model is traced cut to a few layers, the rest
added (`repeating_layers`: each layer after the first costs what another of its kind costs). Traced on the CPU
kernels, which save what CUDA's save for attention (the output and its log-sum-exp, no [T, T] probabilities); a
CUDA plan is traced there too, on a machine without a GPU, with dropout run as CUDA runs it (a bool mask, where
the CPU keeps one in bf16).

Parts of the peak, per process (`PARTS`), in bytes:
- `weights`: the frozen base (bf16, or NF4 projections), sharded under --fsdp (`training.fsdp.planned_param_bytes`);
- `lora_weights`, `gradients`, `adamw`: the adapter in float32, its gradients, AdamW's two moments;
- `activations`: what autograd saves for the backward pass during one micro-batch's forward pass, each storage
  once (what `torch.autograd.graph.saved_tensors_hooks` sees), the model's parameters and views of them left
  out: the frozen base and also the adapter's own matrices, which are saved as they are (in float32, no copy)
  and held once, in `lora_weights`; a copy such as an autocast cast of them is new memory and is counted;
- `transient`: the largest tensor any single operation of the forward or backward pass creates beyond those
  (the cross-entropy's logits chunk, an MLP intermediate), which must fit beside them; with gradient
  checkpointing also one layer's activations, which its backward pass recomputes; under --fsdp also two whole
  layers' weights (the one running, gathered, and the next one, prefetched).
`peak_bytes` is their sum: the moment the backward pass starts, with every activation saved and one more
buffer in flight. `activation_bytes_per_token` divides `activations` by the micro-batch's tokens; FLOPs per
token are `tinyllama.flops.training_flops_per_token`, checked against `torch.utils.flop_counter` on the trace.

PyTorch's `torch.distributed._tools.mem_tracker.MemTracker` was the first choice for the parts; it registers a
gradient hook on every parameter, which a frozen base parameter refuses, so the parts come from the shapes and
the saved-tensor hooks instead. Calibrated against every peak recorded on an H200 (docs/will-it-fit.md): +1% to
+10%, on the safe side.
A preference objective (`--objective dpo|ipo|simpo|orpo`) is traced on `--batch-size` pairs: 2 x batch_size rows
of `--max-len`, every token but the first a completion token, through `training.preference.micro_batch_terms`,
the reference's forward pass included (no gradient: it saves nothing, its largest tensor is transient); a frozen
copy of `--init-adapter`'s weights (the dpo and ipo reference) is counted in `weights`.
Deliberately left out: the CUDA caching allocator's fragmentation and cuBLAS/flash workspaces (not needed to
stay on the safe side so far), and torch.compile's fusions (planned eagerly).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, flop_registry

from tinyllama.flops import training_flops_per_token
from tinyllama.loss import IGNORE_INDEX, causal_lm_loss, label_positions
from tinyllama.model import Llama
from tinyllama.quant import is_projection, nf4_quantize, quantized_module, replace_module
from tinyllama.runtime import apply_plan, plan_runtime, resolve_dtype

from .fsdp import planned_param_bytes
from .preference import ORPO, PREFERENCE, SFT, WITH_REFERENCE, Reference, logp_positions, micro_batch_terms

PARTS = ("weights", "lora_weights", "gradients", "adamw", "activations", "transient")
GIB = 2 ** 30


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


class SavedTensors:
    """Counts what autograd saves for backward while active: each storage once (a tensor and its views are one),
    the tensors of `exclude` left out (the plan passes all of a model's parameters and buffers: the trainable
    ones too, which the plan counts elsewhere)."""

    def __init__(self, exclude=()):
        self.exclude = {_storage_key(t) for t in exclude}
        self.storages: dict[int, int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: torch.Tensor):
        key = _storage_key(t)
        if key not in self.exclude:
            self.storages[key] = t.untyped_storage().nbytes()
        return t

    @property
    def bytes(self) -> int:
        return sum(self.storages.values())

    def __enter__(self):
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)


class _LargestOutput(TorchDispatchMode):
    """The largest tensor (bytes) any operation returns while active."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel() * t.element_size())
        return out


# The flop counter knows CUDA's attention kernels but not the CPU's, which take the same arguments first.
_CPU_ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
        flop_registry[torch.ops.aten._scaled_dot_product_flash_attention].__wrapped__,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward:
        flop_registry[torch.ops.aten._scaled_dot_product_flash_attention_backward].__wrapped__,
}


def labelled_batch(batch_size: int, max_len: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, labels, label_index) of a micro-batch of full rows whose every position is labelled (the
    first predicts nothing of its own): what the plan is traced on, and the tests measure on."""
    ids = torch.zeros(batch_size, max_len, dtype=torch.long)
    labels = ids.clone()
    labels[:, 0] = IGNORE_INDEX
    return ids, labels, label_positions(labels)


def measure_step(model, batch, plan) -> dict:
    """Saved-activation bytes, the largest single op output and FLOPs of one micro-batch's forward and backward
    pass through `model` (real or fake tensors) run as `plan` says; `batch`: `labelled_batch`'s."""
    ids, labels, index = batch
    exclude = [*model.parameters(), *model.buffers()]
    with FlopCounterMode(display=False, custom_mapping=_CPU_ATTENTION_FLOPS) as flops, _LargestOutput() as largest:
        with SavedTensors(exclude) as saved, plan.forward():
            loss, _ = causal_lm_loss(model, ids, labels, label_index=index)
        loss.backward()
    return {"activations": saved.bytes, "transient": largest.largest, "flops": flops.get_total_flops(),
            "tokens": ids.numel()}


def pair_batch(batch_size: int, max_len: int, nll: bool = False) -> dict:
    """A micro-batch of `batch_size` pairs (2 x batch_size full rows) whose every token but the first is a
    completion token, its log-prob positions found (`training.preference.logp_positions`): what the plan of a
    preference step is traced on, and the tests measure on."""
    ids = torch.zeros(2 * batch_size, max_len, dtype=torch.long)
    completion = torch.ones_like(ids)
    completion[:, 0] = 0
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "completion_mask": completion}
    return {**batch, **logp_positions(batch, nll)}


def measure_preference_step(model, batch: dict, plan, objective: str, reference=None) -> dict:
    """`measure_step` of a preference objective's micro-batch (`pair_batch`'s): the reference's forward pass (no
    gradient, so nothing saved; its largest tensor counts as transient), then the policy's, forward and
    backward."""
    exclude = [*model.parameters(), *model.buffers()]
    with FlopCounterMode(display=False, custom_mapping=_CPU_ATTENTION_FLOPS) as flops, _LargestOutput() as largest:
        with SavedTensors(exclude) as saved, plan.forward():
            terms = micro_batch_terms(model, batch, objective, beta=0.1, gamma=0.5, label_smoothing=0.0,
                                      reference=reference)
            loss = terms["loss_sum"] + terms.get("nll_sum", 0.0)
        loss.backward()
    return {"activations": saved.bytes, "transient": largest.largest, "flops": flops.get_total_flops(),
            "tokens": batch["input_ids"].numel()}


def fake_model(config, lora_config, dtype: torch.dtype, quantize: bool = False, double_quant: bool = False):
    """The model as `load_model` builds it (base in `dtype` or NF4 projections, LoRA in float32), on the fake
    tensors of the active FakeTensorMode: every shape and dtype, no values."""
    model = Llama(config, lora_config=lora_config)
    for name, p in model.named_parameters():
        if ".lora_" not in name:
            p.data = p.data.to(dtype)
    if quantize:
        for name, module in list(model.named_modules()):
            if is_projection(name, module):
                weight = nf4_quantize(module.weight.detach(), double_quant=double_quant)
                replace_module(model, name, quantized_module(module, weight, dtype))
    return model


@contextlib.contextmanager
def _dropout_as_on(device: torch.device):
    """Dropout as `device` runs it: CUDA's fused kernel (`native_dropout`) keeps a bool mask for the backward
    pass, the CPU's keeps one in the input's dtype, twice the bytes in bf16. A CUDA plan traced on the CPU
    runs the CUDA way."""
    if device.type != "cuda":
        yield
        return
    original = F.dropout

    def dropout(x, p=0.5, training=True, inplace=False):
        return torch.native_dropout(x, p, training)[0] if training and p > 0 else x

    F.dropout = dropout
    try:
        yield
    finally:
        F.dropout = original


def plan_step(cfg, lora_config, config, *, world: int = 1, device: torch.device | None = None) -> dict:
    """The plan of one optimizer step of `cfg` (a TrainConfig) on a model of `config`, per process of `world`
    (sharded with --fsdp), for `device` (default: --device's). See the module docstring."""
    device = device or torch.device("cuda" if cfg.device.startswith("cuda") else "cpu")
    dtype = resolve_dtype(cfg.dtype, device)
    quantize = cfg.quantize != "none"
    sharded = cfg.fsdp != "none"
    runtime = plan_runtime(config, device, dtype, lora_config=lora_config, quantized=quantize, packing=cfg.packing,
                           fused_mlp=cfg.fused_mlp, varlen=cfg.varlen, sharded=sharded)
    traced = dataclasses.replace(runtime, device=torch.device("cpu"))
    objective = getattr(cfg, "objective", SFT)
    pairs = objective in PREFERENCE
    batch = pair_batch(cfg.batch_size, cfg.max_len, objective == ORPO) if pairs else labelled_batch(
        cfg.batch_size, cfg.max_len)

    def trace(layers: int) -> dict:
        """measure_step on a model of `config` cut to its first `layers` layers, and "whole": the activations
        without gradient checkpointing, which its backward pass recomputes one layer at a time."""
        with FakeTensorMode(allow_non_fake_inputs=True) as mode, torch.random.fork_rng(), _dropout_as_on(device):
            model = fake_model(config.with_layers(layers), lora_config, dtype, quantize, cfg.double_quant)
            model.train()
            apply_plan(model, traced)
            if pairs:
                fake_batch = {k: mode.from_tensor(t) for k, t in batch.items()}
                reference = Reference(model, from_adapter=bool(cfg.init_adapter)) if objective in WITH_REFERENCE \
                    else None
                measure = functools.partial(measure_preference_step, objective=objective, reference=reference)
            else:
                fake_batch, measure = [mode.from_tensor(t) for t in batch], measure_step
            whole = measure(model, fake_batch, traced)["activations"] if cfg.grad_checkpointing else 0
            model.gradient_checkpointing = cfg.grad_checkpointing
            return {**measure(model, fake_batch, traced), "whole": whole}

    cut = repeating_layers(config)
    if cut is None:
        step = trace(config.num_hidden_layers)
    else:  # the layers past the first repeat: trace one and two repeats, and add the difference for the rest
        short, long, repeats = cut
        one, two = trace(short), trace(long)
        step = {k: one[k] + (repeats - 1) * (two[k] - one[k]) for k in ("activations", "flops", "whole")}
        step.update(tokens=one["tokens"], transient=one["transient"])
    if cfg.grad_checkpointing:
        step["transient"] += max(step["whole"] - step["activations"], 0) // config.num_hidden_layers
    with FakeTensorMode(), torch.random.fork_rng():  # the parameters' shapes: one layer's, and the adapter's
        model = fake_model(config.with_layers(1), lora_config, dtype, quantize, cfg.double_quant)
    layer = model.model.layers[0]
    if sharded:  # FSDP gathers a layer whole before it runs, and prefetches the next one meanwhile
        step["transient"] += 2 * sum(t.numel() * t.element_size() for t in [*layer.parameters(), *layer.buffers()])
    per_layer = sum(p.numel() for p in layer.parameters() if p.requires_grad)
    lora_params = sum(p.numel() for p in model.parameters() if p.requires_grad) + (config.num_hidden_layers - 1) * \
        per_layer
    lora_bytes = math.ceil(lora_params / world) * 4
    weights = planned_param_bytes(config, lora_config, world=world if sharded else 1, dtype=dtype,
                                  quantize=quantize, double_quant=cfg.double_quant)
    if objective in WITH_REFERENCE and cfg.init_adapter:  # the initial adapter, frozen beside the trained one
        weights += lora_bytes if sharded else lora_params * 4  # sharded as the adapter is
    parts = {"weights": weights - (lora_bytes if sharded else lora_params * 4), "lora_weights":
             lora_bytes if sharded else lora_params * 4, "activations": step["activations"],
             "transient": step["transient"]}
    parts["gradients"] = parts["lora_weights"]
    parts["adamw"] = 2 * parts["lora_weights"]
    parts = {k: int(parts[k]) for k in PARTS}
    return {"peak_bytes": sum(parts.values()), "parts": parts,
            "activation_bytes_per_token": step["activations"] / step["tokens"],
            "flops_per_token": training_flops_per_token(config, lora_config, cfg.max_len),
            "traced_flops_per_token": step["flops"] / step["tokens"],
            "micro_batch": [cfg.batch_size, cfg.max_len], "world": world if sharded else 1,
            "device": device.type, "dtype": str(dtype).removeprefix("torch."),
            "paths": runtime.describe()}


def repeating_layers(config) -> tuple[int, int, int] | None:
    """(short, long, repeats) when tracing `config` cut to `short` and to `long` layers tells the whole model's
    step: every layer after the first costs what any other of its kind (full or sliding attention) costs, and the
    kinds repeat with a period p from layer 1 on (the first layer differs: its input needs no gradient). With
    n = 1 + repeats * p + r layers, short = 1 + p + r and long = short + p; the whole step is the short one plus
    (repeats - 1) times their difference, exactly, for sums (saved bytes, FLOPs). None where tracing every
    layer costs no more."""
    kinds, n = config.layer_types, config.num_hidden_layers
    period = next((p for p in range(1, n) if all(kinds[i] == kinds[i - p] for i in range(1 + p, n))), n)
    repeats, rest = divmod(n - 1, period)
    short = 1 + period + rest
    return (short, short + period, repeats) if 2 * short + period < n else None


def fit_batch_size(cfg, lora_config, config, budget_bytes: int, *, world: int = 1, device=None,
                   largest: int = 1024) -> tuple[int, dict]:
    """The largest micro-batch size whose planned peak fits `budget_bytes`, and its plan; (0, plan of 1) when not
    even one row fits. Activations grow linearly with the batch, so two traces place it; the answer is traced
    once more to confirm."""
    one = plan_step(dataclasses.replace(cfg, batch_size=1), lora_config, config, world=world, device=device)
    two = plan_step(dataclasses.replace(cfg, batch_size=2), lora_config, config, world=world, device=device)
    if one["peak_bytes"] > budget_bytes:
        return 0, one
    per_row = max(two["peak_bytes"] - one["peak_bytes"], 1)
    size = min(largest, 1 + (budget_bytes - one["peak_bytes"]) // per_row)
    plan = plan_step(dataclasses.replace(cfg, batch_size=size), lora_config, config, world=world, device=device)
    while size > 1 and plan["peak_bytes"] > budget_bytes:
        size -= 1
        plan = plan_step(dataclasses.replace(cfg, batch_size=size), lora_config, config, world=world, device=device)
    return size, plan


_UNITS = {"": 1, "B": 1, "KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9, "TB": 10 ** 12, "KIB": 2 ** 10,
          "MIB": 2 ** 20, "GIB": 2 ** 30, "TIB": 2 ** 40}


def parse_bytes(text: str) -> int:
    """"24GiB", "80GB", "1.5TiB", "1000000" -> bytes; ValueError saying what is accepted."""
    number = text.strip().rstrip("BbIiKkMmGgTt") or "x"
    unit = text.strip()[len(number):].upper()
    try:
        value = float(number)
    except ValueError:
        value = -1.0
    if unit not in _UNITS or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{text!r} is not a size; write a number and a unit: 24GiB, 80GB, 512MiB")
    return int(value * _UNITS[unit])


def largest_part(plan: dict) -> str:
    name = max(PARTS, key=lambda k: plan["parts"][k])
    return f"{name} ({plan['parts'][name] / GIB:.2f} GiB)"


def format_plan(plan: dict) -> str:
    """The plan as `--dry-run` prints it."""
    b, t = plan["micro_batch"]
    lines = [f"plan of one optimizer step, per process ({plan['world']} process(es)), micro-batch {b} x {t} tokens, "
             f"{plan['device']} {plan['dtype']} ({plan['paths']}):"]
    for name in PARTS:
        lines.append(f"  {name:<13} {plan['parts'][name] / GIB:9.2f} GiB")
    lines.append(f"  {'peak':<13} {plan['peak_bytes'] / GIB:9.2f} GiB")
    lines.append(f"saved activations: {plan['activation_bytes_per_token'] / 1024:,.1f} KiB per token; FLOPs per "
                 f"token: {plan['flops_per_token'] / 1e9:,.2f} G (the flop counter on the trace: "
                 f"{plan['traced_flops_per_token'] / 1e9:,.2f} G)")
    return "\n".join(lines)
