"""LoRA adapters in PEFT's on-disk format, merging, and parameter accounting.

An adapter folder holds `adapter_config.json` and `adapter_model.safetensors` whose keys are our parameter
names behind PEFT's prefix: `base_model.model.` + `model.layers.{i}.mlp.gate_proj.lora_A.weight` ([r, in]) and
`...lora_B.weight` ([out, r]). So `peft.PeftModel.from_pretrained` reads what we write, and we read what
PEFT writes. Deliberately unsupported (refused with a message): DoRA, per-module rank/alpha patterns, layer
subsets, LoRA biases, `modules_to_save`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .config import LoRAConfig
from .layer import LoRALinear

PEFT_PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


def lora_layers(model) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total), counted as the reference table does: over `model.parameters()`, trainable = requires_grad."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def adapter_state_dict(model) -> dict[str, torch.Tensor]:
    """The LoRA tensors under PEFT's key names."""
    return {PEFT_PREFIX + k: v for k, v in model.state_dict().items() if ".lora_" in k}


def save_adapter(model, out_dir: str | os.PathLike, base_model: str = "TinyLlama/TinyLlama_v1.1") -> Path:
    config: LoRAConfig | None = model.lora_config
    if config is None:
        raise ValueError("this model has no LoRA layers: build it with lora=LoRAConfig(...) first")
    if any(m.merged for m in lora_layers(model).values()):
        raise ValueError("the adapter is merged into the base weights; save it before lora.merge(model)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    peft_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": config.rank, "lora_alpha": config.alpha, "lora_dropout": config.dropout,
        "target_modules": sorted(config.targets), "bias": "none", "use_rslora": config.use_rslora,
        "use_dora": False, "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True,
        "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
        "rank_pattern": {}, "alpha_pattern": {}, "revision": None,
    }
    tensors = {k: v.detach().contiguous().cpu() for k, v in adapter_state_dict(model).items()}
    # Write then rename, so a crash mid-save never leaves a half-written adapter under the real name.
    _atomic_write(out / WEIGHTS_NAME, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    _atomic_write(out / CONFIG_NAME, lambda p: p.write_text(json.dumps(peft_config, indent=2) + "\n"))
    return out


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def read_adapter_config(adapter_dir: str | os.PathLike) -> LoRAConfig:
    """The `LoRAConfig` an adapter folder (ours or PEFT's) was trained with; refuses what we cannot run."""
    path = Path(adapter_dir) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {adapter_dir}: is this a PEFT LoRA adapter folder?")
    try:
        c = json.loads(path.read_text())
        if not isinstance(c, dict):
            raise ValueError(f"expected a JSON object, found {type(c).__name__}")
    except ValueError as e:
        raise ValueError(f"{path} is not a readable adapter config ({e}); save the adapter again") from None
    refuse = {
        "peft_type": (c.get("peft_type"), "LORA"), "bias": (c.get("bias", "none"), "none"),
        "use_dora": (c.get("use_dora", False), False),
        "rank_pattern": (c.get("rank_pattern") or {}, {}), "alpha_pattern": (c.get("alpha_pattern") or {}, {}),
        "layers_to_transform": (c.get("layers_to_transform"), None),
        "modules_to_save": (c.get("modules_to_save"), None),
    }
    for key, (found, needed) in refuse.items():
        if found != needed:
            raise ValueError(f"{path}: {key}={found!r} is not supported (needs {needed!r})")
    missing = [k for k in ("r", "lora_alpha", "target_modules") if k not in c]
    if missing:
        raise ValueError(f"{path}: missing {missing}; is this a PEFT LoRA adapter config?")
    targets = c.get("target_modules")
    if isinstance(targets, str):
        raise ValueError(f"{path}: target_modules is a pattern ({targets!r}); list the module names instead")
    return LoRAConfig(rank=c["r"], alpha=c["lora_alpha"], dropout=c.get("lora_dropout", 0.0),
                      targets=tuple(sorted(targets)), use_rslora=bool(c.get("use_rslora", False)))


def load_adapter(model, adapter_dir: str | os.PathLike):
    """Load a PEFT-format LoRA adapter into a model built with a matching `LoRAConfig`.

    Rank, target modules and every tensor shape must match; alpha, rsLoRA and dropout are taken from the
    adapter (they define how its weights are meant to be scaled).
    """
    saved = read_adapter_config(adapter_dir)
    current: LoRAConfig | None = model.lora_config
    if current is None:
        raise ValueError(f"the model has no LoRA layers; build it with lora=lora.read_adapter_config("
                         f"{str(adapter_dir)!r}) and load again")
    if saved.rank != current.rank:
        raise ValueError(f"adapter rank r={saved.rank} but the model was built with rank {current.rank}")
    if set(saved.targets) != set(current.targets):
        raise ValueError(f"adapter targets {sorted(saved.targets)} differ from the model's "
                         f"{sorted(current.targets)}")
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
    with torch.no_grad():
        for k, p in own.items():
            p.copy_(tensors[k])
    for layer in lora_layers(model).values():
        layer.scaling = saved.scaling
        if hasattr(layer.lora_dropout, "p"):
            layer.lora_dropout.p = saved.dropout
    model.lora_config = dataclasses.replace(current, alpha=saved.alpha, use_rslora=saved.use_rslora,
                                            dropout=saved.dropout)
    return model


def merge(model):
    """Fold every adapter into its base weight (`W += s * B @ A`); the model then runs at base-model cost."""
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
