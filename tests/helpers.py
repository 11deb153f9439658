"""Helpers shared by the training tests: one short run of the real `train.main`, and what it wrote."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

import train
from conftest import GUANACO_SAMPLE


def run(tmp_path, ckpt, name="run", **overrides) -> tuple[dict, list[dict]]:
    """Train the tiny checkpoint on the guanaco sample (3 steps by default) into tmp_path/name."""
    settings = dict(model=str(ckpt), data=str(GUANACO_SAMPLE), eval_data="none", rank=4, alpha=8.0,
                    dropout=0.0, lr=1e-2, warmup=0, batch_size=4, grad_accum=1, max_len=128, steps=3,
                    group_by_length=False, log_every=1, out=str(tmp_path / name), samples=False, seed=0)
    settings.update(overrides)
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
