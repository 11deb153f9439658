"""Loading and saving Hugging Face-format Llama checkpoints (config.json + *.safetensors).

`load_model` builds the model on the `meta` device and materialises each tensor straight from the
safetensors files (memory-mapped) into the target dtype and device, so the 1.1B model never exists twice in
memory. Loading is strict: every missing, unexpected or mis-shaped tensor is named. Only safetensors are read;
PyTorch `.bin` pickles are refused (they execute code on load and cannot be memory-mapped).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .model import Llama, LlamaConfig

DEFAULT_MODEL = "TinyLlama/TinyLlama_v1.1"
# What a model download fetches from the Hub (file patterns): config, weights (single or sharded), tokenizer.
HUB_PATTERNS = ["config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer.model"]
# Old checkpoints stored RoPE's inverse frequencies as buffers; we recompute them, so these are skipped.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class HubUnavailable(RuntimeError):
    """A model or dataset could not be fetched from the Hugging Face Hub (offline, unknown or gated repo)."""


def resolve_checkpoint(path_or_repo_id: str | os.PathLike) -> Path:
    """A local folder as is, or a Hub repo id downloaded (to the HF cache; HF_HOME/HF_HUB_OFFLINE apply)."""
    path = Path(path_or_repo_id)
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"{path} is a file; pass the checkpoint folder holding config.json and *.safetensors")
        return path
    repo_id = str(path_or_repo_id)
    if repo_id.count("/") != 1 or repo_id.startswith((".", "/")):
        raise FileNotFoundError(f"{repo_id!r} is neither an existing folder nor a Hub repo id like "
                                f"{DEFAULT_MODEL!r}")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS))
    except Exception as e:  # offline, unknown repo, gated repo, ...: all end here with one clear message
        raise HubUnavailable(
            f"could not get {repo_id!r} from the Hugging Face Hub ({type(e).__name__}: {e}). If you are "
            f"offline, download it elsewhere (`huggingface-cli download {repo_id}`) and pass the local "
            "folder instead, or check HF_HOME / HF_HUB_OFFLINE.") from e


def model_config(path_or_repo_id: str | os.PathLike) -> LlamaConfig:
    """The config of a local checkpoint folder, else TinyLlama-1.1B's; never downloads (for shapes and sizes)."""
    config_json = Path(path_or_repo_id) / "config.json"
    return LlamaConfig.from_json(config_json) if config_json.is_file() else LlamaConfig()


def random_model(config: LlamaConfig, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 lora=None) -> Llama:
    """A model of `config`'s shape with random weights (benchmarks without the Hub: a step costs the same).
    LoRA weights stay float32, as `load_model` makes them."""
    with torch.device(device):
        model = Llama(config, lora=lora)
    for name, p in model.named_parameters():
        if ".lora_" not in name:
            p.data = p.data.to(dtype)
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
               device: str | torch.device = "cpu", lora=None) -> Llama:
    """Load a Hugging Face Llama checkpoint into `Llama`, optionally with LoRA built in (fresh adapters)."""
    folder = resolve_checkpoint(path_or_repo_id)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"no config.json in {folder}: a Hugging Face checkpoint folder needs one")
    config = LlamaConfig.from_json(config_path)
    with torch.device("meta"):
        model = Llama(config, lora=lora)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    wanted = {k for k in expected if ".lora_" not in k}
    if config.tie_word_embeddings:
        wanted.discard("lm_head.weight")  # shares embed_tokens.weight

    state, unexpected, mismatched = {}, [], []
    for file in _weight_files(folder):
        try:
            f = safe_open(str(file), framework="pt", device="cpu")
        except Exception as e:  # SafetensorError: truncated or not safetensors at all
            raise ValueError(f"{file} is not a readable safetensors file ({e}); download or convert it "
                             "again") from None
        with f:
            for key in f.keys():
                if key.endswith(_IGNORED_SUFFIXES) or (key == "lm_head.weight" and config.tie_word_embeddings):
                    continue
                if key not in wanted:
                    unexpected.append(key)
                    continue
                shape = tuple(f.get_slice(key).get_shape())
                if shape != tuple(expected[key]):
                    mismatched.append(f"{key}: checkpoint {shape} vs model {tuple(expected[key])}")
                    continue
                state[key] = f.get_tensor(key).to(device=device, dtype=dtype)
    missing = sorted(wanted - state.keys())
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {missing[:20]}{' …' if len(missing) > 20 else ''}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {sorted(unexpected)[:20]}")
    if mismatched:
        problems.append("shape mismatches: " + "; ".join(mismatched))
    if problems:
        raise ValueError(f"checkpoint {folder} does not fit its config.json: " + "; ".join(problems))

    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    _materialize_lora(model, device)
    return model


def _materialize_lora(model: Llama, device) -> None:
    """LoRA tensors are not in a base checkpoint: create them (float32, PEFT's init) on the target device."""
    from lora.layer import LoRALinear

    for module in model.modules():
        if isinstance(module, LoRALinear):
            module.lora_A.to_empty(device=device)
            module.lora_B.to_empty(device=device)
            module.lora_A.weight.data = module.lora_A.weight.data.float()
            module.lora_B.weight.data = module.lora_B.weight.data.float()
            module.reset_lora_parameters()


def save_model(model: Llama, out_dir: str | os.PathLike, dtype: torch.dtype | None = None) -> Path:
    """Write a Hugging Face-format folder (config.json + model.safetensors) of the base weights.

    LoRA must be merged first (`lora.merge(model)`): an unmerged adapter would be silently lost otherwise.
    """
    from lora.layer import LoRALinear

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
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = model.config.to_hf_dict()
    cfg["torch_dtype"] = str(next(iter(state.values())).dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return out
