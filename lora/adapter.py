"""LoRA adapters in PEFT's on-disk format, merging, and parameter accounting.

An adapter folder holds `adapter_config.json` and `adapter_model.safetensors` whose keys are our parameter
names behind PEFT's prefix: `base_model.model.` + `model.layers.{i}.mlp.gate_proj.lora_A.weight` ([r, in]) and
`...lora_B.weight` ([out, r]), with DoRA also `...lora_magnitude_vector` ([out]). So
`peft.PeftModel.from_pretrained` reads what we write, and we read what PEFT writes. Deliberately unsupported
(refused with a message): per-module rank/alpha patterns, layer subsets, LoRA biases, `modules_to_save`, PEFT's
other LoRA variants (aLoRA, QA-LoRA, BD-LoRA, ...) and initialisations that change the base weights (PiSSA, ...).

`adapter_config.json` holds every key PEFT 0.21.2 writes, in its order (sorted), with PEFT's defaults for what
we do not use; `peft_version` names that PEFT release, the format we follow (we are not PEFT). Beside it,
`README.md` is a model card with PEFT's front matter and what the adapter is: base model, LoRA settings and,
when `save_adapter` is given a `ModelCard`, how it was trained. PEFT's "all-linear" adapters load too: PEFT
writes the projections it found, as names (`q_proj`) or, below 20 modules, as full paths; both map onto our
targets when every layer has them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import shlex
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors.torch import load_file, save_file

from tinyllama import files

from .config import ALL_TARGETS, ATTENTION_TARGETS, TARGET_NAMES, LoRAConfig
from .layer import LoRALinear

PEFT_PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
CARD_NAME = "README.md"
TEMPLATE_NAME = "chat_template.jinja"  # tinyllama.templates.ADAPTER_FILE
CARD_MARKER = "<!-- Written by lora.save_adapter"  # a README.md without it is not ours to replace
PEFT_FORMAT_VERSION = "0.21.2"  # the PEFT release whose adapter_config.json we write key for key

# What PEFT 0.21.2's `save_pretrained` writes for the LoraConfig keys we do not set, as it writes them
# (tests/test_adapter_files.py diffs a whole file against PEFT's, and has PEFT read ours back without a warning).
PEFT_UNUSED_KEYS = {
    "alora_invocation_tokens": None, "alpha_pattern": {}, "arrow_config": None, "auto_mapping": None,
    "bias": "none", "corda_config": None, "ensure_weight_tying": False, "eva_config": None, "exclude_modules": None,
    "fan_in_fan_out": False, "init_lora_weights": True, "kasa_config": None, "layer_replication": None,
    "layers_pattern": None, "layers_to_transform": None, "loftq_config": {}, "lora_bias": False,
    "lora_ga_config": None, "megatron_config": None, "megatron_core": "megatron.core", "modules_to_save": None,
    "monteclora_config": None, "qalora_group_size": 16, "rank_pattern": {}, "revision": None,
    "target_parameters": None, "trainable_token_indices": None, "use_bdlora": None, "use_qalora": False,
    "velora_config": None,
}
# PEFT features we do not implement: an adapter whose config sets one (anything but null, false, {} or []) is
# refused rather than run wrongly.
UNSUPPORTED_KEYS = (
    "rank_pattern", "alpha_pattern", "layers_to_transform", "modules_to_save", "exclude_modules", "lora_bias",
    "fan_in_fan_out", "layer_replication", "target_parameters", "trainable_token_indices",
    "alora_invocation_tokens", "use_qalora", "use_bdlora", "arrow_config", "kasa_config", "monteclora_config",
)
# Initialisations that change the base weights as well: such an adapter fits only the base PEFT modified.
BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq")


def lora_layers(model) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total), counted as the reference table does: over `model.parameters()`, trainable = requires_grad;
    a module that keeps its frozen weight in another form (a quantised projection, `tinyllama.quant`) counts as
    the weights it stands for, which it states as `quantized_weight_count`, and its storage not at all (it may be
    parameters, so that FSDP shards it)."""
    storage = {id(t) for m in model.modules() if hasattr(m, "quantized_weight_count") for t in m.storage().values()}
    params = [p for p in model.parameters() if id(p) not in storage]
    quantized = sum(getattr(m, "quantized_weight_count", 0) for m in model.modules())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params) + quantized


def adapter_state_dict(model) -> dict[str, torch.Tensor]:
    """The LoRA tensors under PEFT's key names."""
    return {PEFT_PREFIX + k: v for k, v in model.state_dict().items() if ".lora_" in k}


@dataclasses.dataclass(frozen=True)
class ModelCard:
    """How an adapter was trained, for the README.md beside it (`save_adapter(..., card=ModelCard(...))`).
    Every field is optional; one left out is left out of the card."""

    train_data: str | None = None  # e.g. "timdettmers/openassistant-guanaco (train split)" or a local file
    eval_data: str | None = None
    steps: int | None = None
    train_loss: float | None = None  # the last logged training loss
    eval_loss: float | None = None  # the last evaluation's loss, on eval_data
    command: str | None = None  # the command line that trained it


def save_adapter(model, out_dir: str | os.PathLike, base_model: str = "TinyLlama/TinyLlama_v1.1",
                 card: ModelCard | None = None, chat_template: str | None = None,
                 tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """Write `adapter_model.safetensors`, `adapter_config.json` and a `README.md` model card into `out_dir`, and
    `chat_template.jinja` when given the template training rendered conversations with (beside the adapter,
    as transformers saves a tokenizer's template: adapter_config.json may hold only keys PEFT knows).
    `tensors`: the adapter's tensors under PEFT's names when the model holds only shards of them (gathered by
    the caller); default `adapter_state_dict(model)`.

    `base_model` becomes `base_model_name_or_path`, as PEFT writes it: the Hub repo id for a base from the Hub,
    a local checkpoint folder as given. A README.md this function did not write is never replaced: the save is
    refused before anything is written.
    """
    config: LoRAConfig | None = model.lora_config
    if config is None:
        raise ValueError("this model has no LoRA layers: build it with lora_config=LoRAConfig(...) first")
    if any(m.merged for m in lora_layers(model).values()):
        raise ValueError("the adapter is merged into the base weights; save it before lora.merge(model)")
    out = Path(out_dir)
    readme = out / CARD_NAME
    if readme.is_file() and CARD_MARKER not in readme.read_text(errors="replace"):
        raise FileExistsError(f"{readme} exists and was not written by lora.save_adapter, so it is not replaced; "
                              "save the adapter into a folder of its own, or move that README.md away first")
    out.mkdir(parents=True, exist_ok=True)
    peft_config = {
        **PEFT_UNUSED_KEYS, "peft_type": "LORA", "peft_version": PEFT_FORMAT_VERSION, "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model, "inference_mode": True,
        "r": config.rank, "lora_alpha": _plain_number(config.alpha), "lora_dropout": config.dropout,
        "target_modules": sorted(config.targets), "use_rslora": config.use_rslora,
        "use_dora": config.use_dora,
    }
    tensors = {k: v.detach().contiguous().cpu() for k, v in (tensors or adapter_state_dict(model)).items()}
    # Write then rename, so a crash mid-save never leaves a half-written adapter under the real name.
    files.write_file(out / WEIGHTS_NAME, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    # PEFT's layout exactly: indent 2, keys sorted, no newline at the end.
    files.write_text(out / CONFIG_NAME, json.dumps(peft_config, indent=2, sort_keys=True))
    files.write_text(readme, _card_text(config, base_model, card))
    if chat_template is not None:
        files.write_text(out / TEMPLATE_NAME, chat_template)
    return out


def _plain_number(x: float) -> int | float:
    """16.0 -> 16: alpha is written as an integer when it is one, as a PEFT user would have passed it."""
    return int(x) if float(x).is_integer() else x



def _card_text(config: LoRAConfig, base_model: str, card: ModelCard | None = None) -> str:
    """The README.md of an adapter folder: PEFT's front matter (so the Hub lists it as a PEFT adapter of
    `base_model`), then the base model, the LoRA settings and, from `card`, how it was trained."""
    card = card or ModelCard()
    tags = sorted([f"base_model:adapter:{base_model}", "lora", "transformers"])
    scale = f"alpha / sqrt(r) = {config.scaling:g}, rsLoRA" if config.use_rslora else f"alpha / r = {config.scaling:g}"
    lines = [
        "---", f"base_model: {_yaml_scalar(base_model)}", "library_name: peft", "pipeline_tag: text-generation",
        "tags:", *(f"- {_yaml_scalar(t)}" for t in tags), "---", "",
        f"# LoRA adapter for {base_model}", "",
        f"{CARD_MARKER} (tinyllama-lora), which replaces this file when it saves an adapter here. -->", "",
        "A LoRA adapter in PEFT's format (`adapter_config.json`, `adapter_model.safetensors`).", "",
        "## LoRA", "",
        f"- Base model: {base_model}",
        f"- Rank (r): {config.rank}",
        f"- Alpha: {_plain_number(config.alpha)} (scale {scale})",
        f"- Dropout: {config.dropout:g}",
        f"- Target modules: {', '.join(config.targets)}, in every layer",
    ]
    if config.use_dora:
        lines.append("- DoRA: yes (a trainable magnitude per output row, `lora_magnitude_vector`)")
    training = [
        ("Training data", card.train_data), ("Evaluation data", card.eval_data),
        ("Steps", None if card.steps is None else f"{card.steps:,}"),
        ("Final train loss", None if card.train_loss is None else f"{card.train_loss:.4f}"),
        ("Final eval loss", None if card.eval_loss is None else f"{card.eval_loss:.4f}"),
    ]
    if any(value is not None for _, value in training) or card.command:
        lines += ["", "## Training", ""]
        lines += [f"- {name}: {value}" for name, value in training if value is not None]
        if card.command:
            lines += ["", "Trained with:", "", "```bash", card.command, "```"]
    lines += [
        "", "## Use", "",
        "With tinyllama-lora, from its checkout:", "",
        "```bash", f"python chat.py --model {shlex.quote(base_model)} --adapter path/to/this/folder", "```", "",
        "With PEFT:", "",
        "```python", "from peft import PeftModel", "from transformers import AutoModelForCausalLM", "",
        f"base = AutoModelForCausalLM.from_pretrained({json.dumps(base_model)})",
        'model = PeftModel.from_pretrained(base, "path/to/this/folder")', "```",
    ]
    if config.use_rslora:
        # llama.cpp scales an adapter by SCALE * alpha / r (SCALE 1 with --lora); SCALE = sqrt(r) gives alpha / sqrt(r).
        sqrt_r = f"{math.sqrt(config.rank):g}"
        lines += ["", "llama.cpp ignores `use_rslora`: it scales an adapter by SCALE * alpha / r, with SCALE 1 for "
                      f"`--lora ADAPTER.gguf`. For this rsLoRA adapter pass SCALE = sqrt(r) = {sqrt_r}, so that it is "
                      f"scaled by alpha / sqrt(r) as trained: `--lora-scaled ADAPTER.gguf:{sqrt_r}` (llama.cpp "
                      f"builds before the FNAME:SCALE syntax: `--lora-scaled ADAPTER.gguf {sqrt_r}`)."]
    lines += ["", "### Framework versions", "",
              f"- PEFT {PEFT_FORMAT_VERSION} (the file format; written by tinyllama-lora, not by PEFT)", ""]
    return "\n".join(lines)


def _yaml_scalar(s: str) -> str:
    """`s` as YAML: plain where YAML reads it back as this very string (as PEFT's writer leaves a repo id or
    a path), else double-quoted (JSON's string escapes are YAML's)."""
    plain = re.fullmatch(r"(\.{1,2}/)?[A-Za-z_/][\w./@+:-]*", s, re.ASCII) and not s.endswith(":") and \
        s.lower() not in ("null", "true", "false", "yes", "no", "on", "off", "y", "n")
    return s if plain else json.dumps(s)


class AdapterFile(NamedTuple):
    """What an adapter folder's adapter_config.json says, read once (`read_adapter_file`)."""

    folder: Path  # the adapter folder
    path: Path  # its adapter_config.json
    config: LoRAConfig
    base_model: str | None  # base_model_name_or_path: the base it was trained on; None when it records none
    layers: int | None  # the layer count target_modules imply when they name modules layer by layer, else None


def read_adapter_config(adapter_dir: str | os.PathLike) -> LoRAConfig:
    """The `LoRAConfig` an adapter folder (ours or PEFT's) was trained with; refuses what we cannot run."""
    return read_adapter_file(adapter_dir).config


def read_adapter_file(adapter_dir: str | os.PathLike) -> AdapterFile:
    """An adapter folder's adapter_config.json: its `LoRAConfig` (refusing what we cannot run), the base model it
    records, and the layer count its target_modules imply when they name modules layer by layer (None when they
    name projections, which then apply to every layer)."""
    path = Path(adapter_dir) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {adapter_dir}: is this a PEFT LoRA adapter folder?")
    try:
        c = json.loads(path.read_text())
        if not isinstance(c, dict):
            raise ValueError(f"expected a JSON object, found {type(c).__name__}")
    except ValueError as e:
        raise ValueError(f"{path} is not a readable adapter config ({e}); save the adapter again") from None
    refuse = {"peft_type": (c.get("peft_type"), "LORA"), "bias": (c.get("bias", "none"), "none")}
    # Unused is null, false, {} or [] (not 0: layers_to_transform=0 means layer 0 alone).
    refuse |= {k: (c[k], PEFT_UNUSED_KEYS[k]) for k in UNSUPPORTED_KEYS
               if k in c and not (c[k] is None or c[k] is False or c[k] in ({}, []))}
    for key, (found, needed) in refuse.items():
        if found != needed:
            raise ValueError(f"{path}: {key}={found!r} is not supported (needs {json.dumps(needed)})")
    init = c.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(BASE_CHANGING_INITS):
        raise ValueError(f"{path}: init_lora_weights={init!r} changes the base weights too, so this adapter only "
                         "fits the base model PEFT changed; convert it with PEFT into a plain LoRA adapter "
                         "(save_pretrained(..., path_initial_model_for_weight_conversion=...)) and load that")
    missing = [k for k in ("r", "lora_alpha", "target_modules") if k not in c]
    if missing:
        raise ValueError(f"{path}: missing {missing}; is this a PEFT LoRA adapter config?")
    targets, layers = _projections(c["target_modules"], path)
    try:
        config = LoRAConfig(rank=c["r"], alpha=c["lora_alpha"], dropout=c.get("lora_dropout", 0.0),
                            targets=targets, use_rslora=bool(c.get("use_rslora", False)),
                            use_dora=bool(c.get("use_dora", False)))
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    return AdapterFile(Path(adapter_dir), path, config, c.get("base_model_name_or_path") or None, layers)


_LAYER_INDEX = re.compile(r"0|[1-9][0-9]*")


def _projections(target_modules, path: Path) -> tuple[tuple[str, ...], int | None]:
    """PEFT's `target_modules` as our target names (sorted), and the layer count it implies when it names
    modules layer by layer.

    PEFT adapts a module whose name equals an entry or ends with "." + entry. For "all-linear" it writes the
    modules it found: their names (`q_proj`) when there are 20 or more, else their full paths
    (`model.layers.0.self_attn.q_proj`). A projection named by path must be named in every layer 0..n-1; that
    n is the model's layer count is checked when the adapter loads.
    """
    if target_modules == "all-linear":  # unresolved (written by hand): every linear layer but lm_head, as in PEFT
        return tuple(sorted(ALL_TARGETS)), None
    if isinstance(target_modules, str):
        raise ValueError(f"{path}: target_modules is a pattern ({target_modules!r}); list the module names instead")
    if not isinstance(target_modules, list) or not all(isinstance(t, str) for t in target_modules):
        raise ValueError(f"{path}: target_modules should be a list of module names, found {target_modules!r}")
    everywhere, by_layer = set(), {}
    for entry in target_modules:
        parts = entry.split(".")
        name = parts[-1]
        attention = name in ATTENTION_TARGETS or name == "qkv_proj"
        full = ["model", "layers", _LAYER_INDEX, "self_attn" if attention else "mlp", name]
        fits = name in TARGET_NAMES and len(parts) <= len(full) and all(
            part == want if isinstance(want, str) else bool(want.fullmatch(part))
            for part, want in zip(parts, full[len(full) - len(parts):], strict=True))
        if not fits:
            raise ValueError(f"{path}: target_modules names {entry!r}, which is not one of the projections that can "
                             f"be adapted here: {', '.join(TARGET_NAMES)} of a decoder layer (as `q_proj` or as "
                             "`model.layers.0.self_attn.q_proj`)")
        if len(parts) >= 3:
            by_layer.setdefault(name, set()).add(int(parts[-3]))
        else:
            everywhere.add(name)
    per_layer = {name: found for name, found in by_layer.items() if name not in everywhere}
    n = max(set().union(*per_layer.values())) + 1 if per_layer else None
    for name, found in sorted(per_layer.items()):
        if found != set(range(n)):
            raise ValueError(f"{path}: target_modules adapts {name} in layers {sorted(found)} only, of layers "
                             f"0-{n - 1}; an adapter for some layers but not others is not supported (train it "
                             "with the projection in every layer)")
    return tuple(sorted(everywhere | by_layer.keys())), n


def tensor_problem(tensor: torch.Tensor, dtype: torch.dtype) -> str | None:
    """What is wrong with an adapter tensor that should hold `dtype` values, or None: another dtype is refused,
    not cast (an int64 tensor has lost its fractions already, a float16 one its range), and a NaN or infinity
    would spread through every later step. The one check for adapters from anywhere: `load_adapter` (a
    checkpoint resumed, an adapter chatted with or exported) and a checkpoint about to be written."""
    if tensor.dtype != dtype:
        return f"is stored as {tensor.dtype}, expected {dtype}"
    bad = int((~torch.isfinite(tensor)).sum()) if tensor.dtype.is_floating_point else 0
    if bad:
        return f"holds {bad} non-finite value{'s' if bad > 1 else ''} (NaN or infinity) of {tensor.numel()}"
    return None


def load_adapter(model, adapter_dir: str | os.PathLike | AdapterFile, copy=None):
    """Load a PEFT-format LoRA adapter (its folder, or its `read_adapter_file` already read) into a model built
    with a matching `LoRAConfig`.

    Rank, target modules and every tensor shape must match, and every tensor must be finite and of its
    parameter's dtype (`tensor_problem`: float32, as `save_adapter` writes our adapters); alpha, rsLoRA and
    dropout are taken from the adapter (they define how its weights are meant to be scaled).
    `copy(parameter, tensor)` puts each saved tensor into its parameter (default `Tensor.copy_`;
    `training.fsdp` keeps only this process's shard).
    """
    if isinstance(adapter_dir, AdapterFile):
        adapter, adapter_dir = adapter_dir, adapter_dir.folder
    else:
        adapter = read_adapter_file(adapter_dir)
    saved, layers = adapter.config, adapter.layers
    current: LoRAConfig | None = model.lora_config
    if current is None:
        raise ValueError(f"the model has no LoRA layers; build it with lora_config=lora.read_adapter_config("
                         f"{str(adapter_dir)!r}) and load again")
    if layers is not None and layers != model.config.num_hidden_layers:
        raise ValueError(f"adapter {adapter_dir} names its target modules layer by layer, for layers 0-{layers - 1}, "
                         f"but the model has {model.config.num_hidden_layers} layers; an adapter for some layers but "
                         "not others is not supported (is this the adapter of another base model?)")
    if saved.rank != current.rank:
        raise ValueError(f"adapter rank r={saved.rank} but the model was built with rank {current.rank}")
    if set(saved.targets) != set(current.targets):
        raise ValueError(f"adapter targets {sorted(saved.targets)} differ from the model's "
                         f"{sorted(current.targets)}")
    if saved.use_dora != current.use_dora:
        raise ValueError(f"the adapter is {'DoRA' if saved.use_dora else 'plain LoRA'} (use_dora="
                         f"{str(saved.use_dora).lower()}) but the model was built with use_dora={current.use_dora}; "
                         f"with train.py, add or leave out --dora to match; in Python, build the model with "
                         f"lora_config=lora.read_adapter_config({str(adapter_dir)!r}) and load again")
    weights = Path(adapter_dir) / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {adapter_dir}")
    # PEFT may keep the adapter name in keys (`.lora_A.default.weight`); the saved format drops it.
    try:
        tensors = {k.replace(".default.", "."): v for k, v in load_file(str(weights)).items()}
    except Exception as e:  # SafetensorError: truncated or not safetensors at all
        raise ValueError(f"{weights} is not a readable safetensors file ({e}); save the adapter again") from None
    own = {PEFT_PREFIX + k: p for k, p in model.state_dict(keep_vars=True).items() if ".lora_" in k}
    missing = sorted(own.keys() - tensors.keys())
    unexpected = sorted(tensors.keys() - own.keys())
    bad_shapes = [f"{k}: adapter {tuple(tensors[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in own.keys() & tensors.keys() if tensors[k].shape != own[k].shape]
    if missing or unexpected or bad_shapes:
        raise ValueError(f"adapter {adapter_dir} does not fit the model: missing {missing[:10]}, "
                         f"unexpected {unexpected[:10]}, shape mismatches {bad_shapes[:10]}")
    for k in sorted(own):
        problem = tensor_problem(tensors[k], own[k].dtype)
        if problem:
            raise ValueError(f"{weights}: tensor {k} {problem}; nothing was loaded. The adapter is damaged or was "
                             f"saved in another precision: convert it to {own[k].dtype} yourself if that is what "
                             "you want, or use another adapter")
    with torch.no_grad():
        for k, p in own.items():
            (copy or torch.Tensor.copy_)(p, tensors[k].to(p.device))
    for layer in lora_layers(model).values():
        layer.scaling = saved.scaling
        if hasattr(layer.lora_dropout, "p"):
            layer.lora_dropout.p = saved.dropout
    model.lora_config = dataclasses.replace(current, alpha=saved.alpha, use_rslora=saved.use_rslora,
                                            dropout=saved.dropout)
    return model


def merge(model):
    """Fold every adapter into its base weight (`W += s * B @ A`; DoRA: `W = m / ||W + s B A|| * (W + s B A)`);
    the model then runs at base-model cost."""
    for layer in lora_layers(model).values():
        layer.merge()
    return model


@contextlib.contextmanager
def disabled(model):
    """Run the base model inside this block (e.g. to compare answers before and after fine-tuning)."""
    layers = lora_layers(model).values()
    if any(layer.merged for layer in layers):
        raise ValueError("the adapter is merged into the base weights; it can no longer be switched off")
    for layer in layers:
        layer.active = False
    try:
        yield model
    finally:
        for layer in layers:
            layer.active = True
