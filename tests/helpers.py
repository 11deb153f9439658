"""What the tests share: paths to the shipped assets, the house tiny config, reference checkpoints saved by
`transformers`, and short runs of the real `train.main` with what they wrote."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "assets"  # copies of ../shared/fixtures, so a plain clone can test
TOKENIZER_PATH = ASSETS / "tokenizer.model"
GUANACO_SAMPLE = ASSETS / "guanaco_sample.jsonl"
OASST_SAMPLE = ASSETS / "oasst_trees_sample.jsonl"

# The house tiny config: 2 layers, width 64, 4 heads, 2 KV heads (grouped-query).
TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=10000.0,
            max_position_embeddings=256, tie_word_embeddings=False)


def hf_checkpoint(path: Path, seed: int = 0, **overrides) -> Path:
    """Save a random `transformers.LlamaForCausalLM` (float32, safetensors) to `path` and return it."""
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(**{**TINY, **overrides})
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # HF initialises norms to 1; perturb them so a wrong norm cannot hide
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(path, safe_serialization=True)
    return Path(path)


def run(tmp_path, ckpt, name="run", **overrides) -> tuple[dict, list[dict]]:
    """Train the tiny checkpoint on the guanaco sample (3 steps by default) into tmp_path/name."""
    settings = dict(model=str(ckpt), data=str(GUANACO_SAMPLE), eval_data="none", rank=4, alpha=8.0,
                    dropout=0.0, lr=1e-2, warmup=0, batch_size=4, grad_accum=1, max_len=128, steps=3,
                    group_by_length=False, log_every=1, out=str(tmp_path / name), samples=False, seed=0)
    settings.update(overrides)
    import train

    summary = train.main(train.TrainConfig(**settings))
    out = Path(settings["out"])
    return summary, metrics(out)


def metrics(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def adapter_weights(folder) -> dict[str, torch.Tensor]:
    """The adapter tensors of a run folder (its adapter/) or of an adapter or checkpoint folder."""
    folder = Path(folder)
    folder = folder / "adapter" if (folder / "adapter").is_dir() else folder
    return load_file(str(folder / "adapter_model.safetensors"))


def train_losses(rows):
    return [r["loss"] for r in rows if r["split"] == "train"]


def snapshot(folder) -> dict[str, bytes]:
    """Every file under `folder` (relative path -> bytes): to show that nothing was touched."""
    folder = Path(folder)
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
