"""The fixed benchmark workload (`--data random:N`): random token ids, every position labelled."""

from __future__ import annotations

import torch

from .encoding import IGNORE_INDEX, Example


def random_examples(n: int, length: int, vocab_size: int, seed: int) -> list[Example]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, vocab_size, (length,), generator=g)
        ids[0] = 1  # BOS, which nothing predicts
        labels = ids.clone()
        labels[0] = IGNORE_INDEX
        out.append(Example(ids, labels))
    return out
