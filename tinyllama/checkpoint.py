"""Loading and saving Hugging Face-format Llama checkpoints (config.json + *.safetensors).

`load_model` builds the model on the `meta` device and materialises each tensor straight from the
safetensors files (memory-mapped) into the target dtype and device, so the 1.1B model never exists twice in
memory. Loading is strict: every missing, unexpected or mis-shaped tensor is named. Only safetensors are read;
PyTorch `.bin` pickles are refused (they execute code on load and cannot be memory-mapped).
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lora.layer import LoRALinear

from .config import LlamaConfig
from .model import Llama, RMSNorm
from .quant import (
    NF4Storage,
    check_quantize,
    is_projection,
    is_quantized,
    nf4_quantize,
    quantized_module,
    replace_module,
)
from .shapes import SHAPES, named_shape

DEFAULT_MODEL = "TinyLlama/TinyLlama_v1.1"
# A model folder's tokenizer files, as transformers and llama.cpp read them: SentencePiece's tokenizer.model,
# a Hugging Face tokenizer.json, and the settings around them (BOS/EOS, adding BOS, the chat template).
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja")
# The weights' file names as transformers writes them: model.safetensors, or shards listed in an index.
WEIGHTS_PATTERN, WEIGHTS_INDEX = "model{suffix}.safetensors", "model.safetensors.index.json"
# What a model download fetches from the Hub (file patterns; those a repo lacks are simply not there): config,
# generation settings, weights (single or sharded), and the tokenizer files, so an export carries them unchanged.
HUB_PATTERNS = ["config.json", "generation_config.json", "*.safetensors", WEIGHTS_INDEX, *TOKENIZER_FILES]
# Largest shard `save_model` writes (bytes, or a string like "5GB"): the Hub's recommended file size and
# transformers 4's default (5 writes up to 50GB). TinyLlama-1.1B stays one file even in float32 (4.4 GB).
MAX_SHARD_SIZE = "5GB"
# Old checkpoints stored RoPE's inverse frequencies as buffers; we recompute them, so these are skipped.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
_LAYER_KEY = re.compile(r"model\.layers\.(\d+)\.")


class HubUnavailable(RuntimeError):
    """A model or dataset could not be fetched from the Hugging Face Hub (offline, unknown or gated repo)."""


def is_hub_id(spec: str) -> bool:
    """Whether `spec`, not an existing path, reads as a Hub repo id ("owner/name"), not as a path that is missing
    (`./x/y`, `/x/y`, `~/x`)."""
    return not Path(spec).exists() and spec.count("/") == 1 and not spec.startswith((".", "/", "~"))


def resolve_checkpoint(path_or_repo_id: str | os.PathLike) -> Path:
    """A local folder as is, or a Hub repo id downloaded (to the HF cache; HF_HOME/HF_HUB_OFFLINE apply)."""
    path = Path(path_or_repo_id)
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"{path} is a file; pass the checkpoint folder holding config.json and *.safetensors")
        return path
    repo_id = str(path_or_repo_id)
    if not is_hub_id(repo_id):
        raise FileNotFoundError(f"{repo_id!r} is neither an existing folder nor a Hub repo id like "
                                f"{DEFAULT_MODEL!r}")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS))
    except Exception as e:  # offline, unknown repo, gated repo, ...: all end here with one clear message
        raise HubUnavailable(
            f"could not get {repo_id!r} from the Hugging Face Hub ({type(e).__name__}: {e}). If you are "
            f"offline, download it elsewhere (`hf download {repo_id} --local-dir DIR`) and pass the local "
            "folder DIR instead, or check HF_HOME / HF_HUB_OFFLINE.") from e


def model_config(spec: str | os.PathLike) -> LlamaConfig:
    """The config of a local checkpoint folder, a config.json file or a shape name (`tinyllama.shapes`), else
    TinyLlama-1.1B's (a Hub id not downloaded yet); never downloads (for shapes and sizes)."""
    path = Path(spec)
    if str(spec) in SHAPES and not path.exists():
        return named_shape(str(spec))
    config_json = path / "config.json" if path.is_dir() else path
    if config_json.suffix == ".json" and config_json.is_file():
        return LlamaConfig.from_json(config_json)
    return LlamaConfig()


def random_model(config: LlamaConfig, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 lora_config=None, quantize: str | None = None, double_quant: bool = False) -> Llama:
    """A model of `config`'s shape with random weights (benchmarks without the Hub: a step costs the same).
    LoRA weights stay float32, as `load_model` makes them.

    With `quantize="nf4"` the projections are drawn (nn.Linear's init, float32) and quantised one at a time, as
    `load_model` quantises them, so a 7B-shaped NF4 model never exists densely on the device.
    """
    if check_quantize(quantize) is None:
        with torch.device(device):
            model = Llama(config, lora_config=lora_config)
        for name, p in model.named_parameters():
            if ".lora_" not in name:
                p.data = p.data.to(dtype)
        return model
    with torch.device("meta"):
        model = Llama(config, lora_config=lora_config)
    for name, module in list(model.named_modules()):
        if is_projection(name, module):
            weight = torch.empty(module.out_features, module.in_features, device=device)
            torch.nn.init.kaiming_uniform_(weight, a=math.sqrt(5))  # what nn.Linear draws
            if module.bias is not None:  # zeros, as transformers initialises a bias
                module.bias = torch.nn.Parameter(torch.zeros(module.out_features, device=device, dtype=dtype),
                                                 requires_grad=False)
            replace_module(model, name, quantized_module(module, nf4_quantize(weight, double_quant=double_quant),
                                                         dtype))
            del weight
    for name, module in model.named_modules():  # the rest as Llama builds it; LoRA below, as load_model does
        if ".lora_" in name or isinstance(module, NF4Storage) or not any(
                p.is_meta for p in module.parameters(recurse=False)):
            continue
        module.to_empty(device=device, recurse=False)
        if isinstance(module, RMSNorm):  # Gemma's (1 + w) norm starts at w = 0
            torch.nn.init.constant_(module.weight, 0.0 if module.unit_offset else 1.0)
        else:  # nn.Embedding, nn.Linear (the LM head)
            module.reset_parameters()
        for p in module.parameters(recurse=False):
            p.data = p.data.to(dtype)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    _materialize_lora(model, device)
    return model


def _weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted({folder / name for name in weight_map.values()})
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{index} lists shards that are not there: {missing}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        bins = sorted(p.name for p in folder.glob("*.bin"))
        hint = (f"it has PyTorch pickles {bins}; convert them to safetensors first (e.g. load with transformers "
                "and save_pretrained(..., safe_serialization=True))") if bins else "it has no weights at all"
        raise FileNotFoundError(f"no *.safetensors weights in {folder}: {hint}")
    return files


def load_model(path_or_repo_id: str | os.PathLike = DEFAULT_MODEL, *, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu", lora_config=None, quantize: str | None = None,
               double_quant: bool = False) -> Llama:
    """Load a Hugging Face Llama checkpoint into `Llama`, optionally with LoRA built in (fresh adapters).

    `quantize="nf4"`: the seven decoder projections are stored as NF4 (`tinyllama.quant`; `double_quant`
    quantises their absmax too), each quantised on `device` right after it is read, from the checkpoint's values
    as stored (not rounded to `dtype` first), so only one dense projection exists at a time. Embeddings, norms
    and the LM head are loaded in `dtype`, which is also the dtype the projections compute in.
    """
    quantize = check_quantize(quantize)
    folder = resolve_checkpoint(path_or_repo_id)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"no config.json in {folder}: a Hugging Face checkpoint folder needs one")
    config = LlamaConfig.from_json(config_path)
    keys = check_weights(folder, config)  # in seconds, before a config of 10^5 layers is built
    with torch.device("meta"):
        model = Llama(config, lora_config=lora_config)
    projections = {name for name, m in model.named_modules() if is_projection(name, m)} if quantize else set()
    state, quantized = {}, {}
    for key, tensor in read_weights(folder, keys):
        module_name = key.removesuffix(".weight")
        if module_name in projections:
            quantized[module_name] = nf4_quantize(floating(tensor).to(device), double_quant=double_quant)
            del tensor
        else:
            state[key] = tensor.to(device=device, dtype=dtype)
    model.load_state_dict(state, strict=False, assign=True)
    for name, weight in quantized.items():
        replace_module(model, name, quantized_module(model.get_submodule(name), weight, dtype))
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    _materialize_lora(model, device)
    return model


def floating(tensor: torch.Tensor) -> torch.Tensor:
    """A checkpoint tensor as `nf4_quantize` takes it: float32, bfloat16 and float16 as stored, others float32."""
    return tensor if tensor.dtype in (torch.float32, torch.bfloat16, torch.float16) else tensor.float()


def read_weights(folder: Path, keys: set[str]):
    """(key, tensor) of each of `keys` (what `check_weights` found fit) in the checkpoint in `folder`, as stored,
    on the CPU, one at a time, so a caller keeps only what it needs of each (a quantised copy, a shard)."""
    for file in _weight_files(folder):
        with _open_weights(file) as f:
            for key in f.keys():
                if key in keys:
                    yield key, f.get_tensor(key)


def check_weights(folder: Path, config: LlamaConfig) -> set[str]:
    """The keys of the base weights in `folder` that the model of `config` loads, after checking their names and
    shapes against it from the safetensors headers alone (no tensor is read, no model built): raises ValueError
    naming a layer count that differs from num_hidden_layers, and every missing, unexpected and mis-shaped key."""
    held = {}
    for file in _weight_files(folder):
        with _open_weights(file) as f:
            held.update((key, tuple(f.get_slice(key).get_shape())) for key in f.keys()
                        if not key.endswith(_IGNORED_SUFFIXES))
    if config.tie_word_embeddings:
        held.pop("lm_head.weight", None)  # shares embed_tokens.weight
    layers = {int(m[1]) for key in held if (m := _LAYER_KEY.match(key))}
    if len(layers) != config.num_hidden_layers and layers == set(range(len(layers))):
        # Named before the keys are listed: a config claiming 10^5 layers would otherwise list 10^6 missing keys.
        raise ValueError(f"checkpoint {folder} does not fit its config.json: num_hidden_layers is "
                         f"{config.num_hidden_layers}, but the weights hold {len(layers)} layers (model.layers.0 to "
                         f"model.layers.{len(layers) - 1}); set num_hidden_layers to {len(layers)} in "
                         f"{folder / 'config.json'}, or use the weights written with this config")
    expected = expected_shapes(config)
    missing = sorted(expected.keys() - held.keys())
    unexpected = sorted(held.keys() - expected.keys())
    mismatched = [f"{key}: checkpoint {shape} vs model {expected[key]}" for key, shape in held.items()
                  if key in expected and shape != expected[key]]
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {missing[:20]}{' …' if len(missing) > 20 else ''}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {unexpected[:20]}")
    if mismatched:
        problems.append("shape mismatches: " + "; ".join(mismatched))
    if problems:
        raise ValueError(f"checkpoint {folder} does not fit its config.json: " + "; ".join(problems))
    return set(held)


def expected_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Each base tensor of the model of `config` and its shape (no tied lm_head), without building every layer:
    one is built on `meta` and its names repeated."""
    one = config.with_layers(1)  # every layer holds the same tensors
    with torch.device("meta"):
        state = Llama(one).state_dict()
    shapes = {}
    for key, tensor in state.items():
        if m := _LAYER_KEY.match(key):
            shapes.update((f"model.layers.{i}.{key[m.end():]}", tuple(tensor.shape))
                          for i in range(config.num_hidden_layers))
        else:
            shapes[key] = tuple(tensor.shape)
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    return shapes


def _open_weights(file: Path):
    try:
        return safe_open(str(file), framework="pt", device="cpu")
    except Exception as e:  # SafetensorError: truncated or not safetensors at all
        raise ValueError(f"{file} is not a readable safetensors file ({e}); download or convert it again") from None


def _materialize_lora(model: Llama, device) -> None:
    """LoRA tensors are not in a base checkpoint: create them (float32, PEFT's init) on the target device."""
    for module in model.modules():
        if isinstance(module, LoRALinear):
            module.lora_A.to_empty(device=device)
            module.lora_B.to_empty(device=device)
            module.lora_A.weight.data = module.lora_A.weight.data.float()
            module.lora_B.weight.data = module.lora_B.weight.data.float()
            module.reset_lora_parameters()


def default_generation_config(config) -> dict:
    """generation_config.json for a model that ships none: its config's BOS and EOS ids."""
    ids = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id}
    return {k: v for k, v in ids.items() if v is not None}


def save_model(model: Llama, out_dir: str | os.PathLike, dtype: torch.dtype | None = None, *,
               max_shard_size: int | str = MAX_SHARD_SIZE, generation_config: dict | None = None) -> Path:
    """Write a Hugging Face-format folder of the base weights, as `transformers`' `save_pretrained` lays it out.

    - `config.json`, with `torch_dtype` the dtype written (`dtype`, else the model's own).
    - `generation_config.json`: `generation_config` as given, else the config's BOS and EOS ids.
    - The weights: `model.safetensors`, or, above `max_shard_size` bytes (or "5GB"-style), shards
      `model-00001-of-0000N.safetensors` and `model.safetensors.index.json` (metadata and weight map, split as
      `huggingface_hub.split_torch_state_dict_into_shards` splits them, which transformers uses). Weight files
      of an earlier save into the same folder that this one does not write are removed: they would be read.

    No tokenizer files (see `tinyllama.export`). LoRA must be merged first (`lora.merge(model)`): an unmerged
    adapter would be silently lost otherwise.
    """
    from huggingface_hub import split_torch_state_dict_into_shards

    if is_quantized(model):
        raise ValueError("this model's projections are NF4-quantised; save_model writes dense Hugging Face "
                         "checkpoints: load the model without quantize to save or export it")
    unmerged = [n for n, m in model.named_modules() if isinstance(m, LoRALinear) and not m.merged]
    if unmerged:
        raise ValueError(f"{len(unmerged)} LoRA layers are not merged (e.g. {unmerged[0]}): call "
                         "lora.merge(model) first, or save the adapter alone with lora.save_adapter")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {}
    for key, t in model.state_dict().items():
        if ".lora_" in key or (key == "lm_head.weight" and model.config.tie_word_embeddings):
            continue
        t = (t.to(dtype) if dtype is not None else t).detach().contiguous().cpu()
        if t.untyped_storage().nbytes() != t.numel() * t.element_size():  # a view (fused gate/up): its own copy
            t = t.clone()
        state[key] = t
    split = split_torch_state_dict_into_shards(state, filename_pattern=WEIGHTS_PATTERN,
                                               max_shard_size=max_shard_size)
    for name in sorted(os.listdir(out)):
        if re.fullmatch(r"model(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?", name) and (
                name not in split.filename_to_tensors):
            (out / name).unlink()
    for name, keys in split.filename_to_tensors.items():
        save_file({k: state[k] for k in keys}, str(out / name), metadata={"format": "pt"})
    if split.is_sharded:
        # transformers' index, key for key: total_parameters, total_size (bytes), and the sorted weight map.
        index = {"metadata": {"total_parameters": sum(t.numel() for t in state.values()), **split.metadata},
                 "weight_map": split.tensor_to_filename}
        (out / WEIGHTS_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    cfg = model.config.to_hf_dict()
    cfg["torch_dtype"] = str(next(iter(state.values())).dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    if generation_config is None:
        generation_config = default_generation_config(model.config)
    (out / "generation_config.json").write_text(json.dumps(generation_config, indent=2) + "\n")
    return out
