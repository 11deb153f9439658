"""What the training benchmark runs: the model shapes, the workloads W1/W2, and the synthetic guanaco data.

Shapes (`BENCH_SHAPES`, `model_config(shape)`), TinyLlama-1.1B as the table of model shapes holds it
(`tinyllama.shapes`, "tinyllama-1.1b") and two scaled-down copies of it, which are benchmark sizes, not models:
- `full`: TinyLlama-1.1B (22 layers, width 2048, 32 heads / 4 KV heads, MLP 5632, vocabulary 32000), built with
  random weights: the step cost does not depend on the values.
- `cpu`: the scaled-down shape `make bench` uses on a CPU, so the command finishes in minutes on 2 cores:
  4 layers, width 256, 4 heads / 2 KV heads (head size 64, as TinyLlama), MLP 688 (TinyLlama's 2.75 ratio),
  the real 32000-token vocabulary (so the LM head and the loss weigh what they weigh in the real model and W2
  can use the real tokenizer). Micro-batch 4 x 256 tokens instead of 8 x 512.
- `tiny`: 2 layers, width 32: for the tests and `gpu_check.sh --cpu-dry-run` only.

Workloads (`workloads()`), all with micro-batch B, no gradient accumulation:
- `W1`: B x L random token ids, every position labelled but the BOS (`train.py --data random:N`). Comparable with
  anything; no padding.
- `W2-padded`: guanaco-shaped conversations, loss on the assistant replies only, padded to the longest in a
  micro-batch. This project groups by length (its default); the transformers baseline pads to the longest of a
  plain shuffled micro-batch (its usual `DataCollatorForSeq2Seq`-style batching).
- `W2-packed`: the same conversations packed into rows of exactly L tokens (`data.BatchStream(packing=True)`:
  position_ids restart at every conversation, whose first token is never labelled). The transformers baseline
  trains on the same rows padding-free: position_ids and no attention mask, from which transformers builds the
  block-diagonal causal mask itself.
- `W2-packed-2048`, `W2-packed-4096`: the same conversations in rows 2x and 4x as long (2048 and 4096 tokens on
  the full shape, whose names these are; the scaled-down shapes scale them as they scale W2-packed), with the
  micro-batch divided by 2 and 4, so a batch holds about as many tokens as a W2-packed one. As in `train.py`,
  a conversation is cut at the model's context (`max_position_embeddings`), not at the row length.
W2 speed is *useful* tokens/s: real, non-pad tokens only.

W2 data: the real guanaco eval split when it is in the local Hugging Face cache, otherwise synthetic
conversations written as a guanaco `.jsonl` and read back through the real pipeline (`data.load_conversations`,
`data.encode_all` with the real tokenizer). The synthetic length distribution (`W2_LENGTHS`) is an assumption,
not a fit: with no network here, guanaco could not be measured. It is chosen to give what guanaco is described
as having with the Llama tokenizer: about 360 tokens per conversation on average, most conversations a single
exchange, a long tail past 2000 tokens. Every word of the synthetic text is exactly one token (checked by a
test), so token lengths are what the distribution says. On the `cpu` shape every length is scaled by 1/4 (to
fit 256-token rows as the real data fits 1024-token ones).

Deliberately left out: any attempt to make the synthetic text look like language (its content does not change
the cost of a step).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from data.sources import hub_file
from tinyllama import LlamaConfig
from tinyllama.loss import label_positions
from tinyllama.shapes import SHAPES

_TINYLLAMA = SHAPES["tinyllama-1.1b"]
# The benchmark's shapes: overrides of TinyLlama-1.1B's entry in the table of model shapes.
BENCH_SHAPES = {
    "full": dict(_TINYLLAMA),
    "cpu": dict(_TINYLLAMA, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2),
    "tiny": dict(_TINYLLAMA, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2),
}
# Micro-batch and row length per shape: (batch, W1 sequence length, W2 max_len, W2 length scale).
BATCHING = {"full": (8, 512, 1024, 1.0), "cpu": (4, 256, 256, 0.25), "tiny": (2, 32, 64, 0.1)}
WORKLOADS = ("W1", "W2-padded", "W2-packed", "W2-packed-2048", "W2-packed-4096")
LONG_ROWS = {"W2-packed-2048": 2, "W2-packed-4096": 4}  # row length (and 1 / micro-batch) over W2-packed's

# The synthetic guanaco length distribution, in Llama tokens of the turn text (markers not included).
# Exchanges per conversation: 1 + Geometric(p_another); human and assistant turns: lognormal(median, sigma).
W2_LENGTHS = dict(p_another_exchange=0.2, max_exchanges=6, human_median=24, human_sigma=1.0,
                  assistant_median=175, assistant_sigma=0.75)

# Common English words that are each one Llama/TinyLlama token after a space (tests/test_bench.py checks it).
WORDS = """the of and to in is that for it as was with be by on not he this are or his from at which but have an
they you were her she there been one all we their has would when if so no will more other what its into than some
time could them only two new first may any these like then now such made over did most after also where way many
well should just those must because each through people very how even back years much before between work used
life being state system world long part same under three still both while high might last since great small during
general number another without right found often take point against give public school group thought day order
need home children things water better less second however fact case place hand help old turn""".split()


@dataclass(frozen=True)
class Workload:
    name: str  # one of WORKLOADS
    batch_size: int
    max_len: int
    packing: bool
    group_by_length: bool

    def describe(self) -> str:
        if self.name == "W1":
            return f"{self.batch_size} x {self.max_len} random token ids, every position labelled"
        mode = ("packed into rows of exactly max_len" if self.packing else
                "padded to the longest, length-grouped" if self.group_by_length else
                "padded to the longest of a shuffled micro-batch")
        return f"micro-batch {self.batch_size}, max_len {self.max_len}, prompt-masked conversations, {mode}"


def model_config(shape: str) -> LlamaConfig:
    """The model of a benchmark shape (a key of BENCH_SHAPES), to be built with random weights."""
    return LlamaConfig(**BENCH_SHAPES[shape])


def workloads(shape: str) -> dict[str, Workload]:
    batch, seq, w2_len, _ = BATCHING[shape]
    return {"W1": Workload("W1", batch, seq, packing=False, group_by_length=False),
            "W2-padded": Workload("W2-padded", batch, w2_len, packing=False, group_by_length=True),
            "W2-packed": Workload("W2-packed", batch, w2_len, packing=True, group_by_length=False),
            **{name: Workload(name, max(1, batch // k), k * w2_len, packing=True, group_by_length=False)
               for name, k in LONG_ROWS.items()}}


def baseline_workload(w: Workload) -> Workload:
    """What the transformers baseline runs for a workload: packed rows as they are (padding-free), padded W2 as
    plain pad-to-longest of a shuffled micro-batch (its usual collator), not length-grouped."""
    return w if w.packing else Workload(w.name, w.batch_size, w.max_len, packing=False, group_by_length=False)


# ---- the synthetic guanaco conversations -------------------------------------------------------------------

def _lognormal(rng, median: float, sigma: float, scale: float) -> int:
    return max(1, int(round(scale * median * math.exp(sigma * rng.standard_normal()))))


def synthetic_turn_lengths(rng, scale: float = 1.0) -> list[tuple[int, int]]:
    """(human tokens, assistant tokens) of each exchange of one conversation."""
    p = W2_LENGTHS
    n = 1
    while n < p["max_exchanges"] and rng.random() < p["p_another_exchange"]:
        n += 1
    return [(_lognormal(rng, p["human_median"], p["human_sigma"], scale),
             _lognormal(rng, p["assistant_median"], p["assistant_sigma"], scale)) for _ in range(n)]


def _words(rng, n: int) -> str:
    return " ".join(WORDS[i] for i in rng.integers(0, len(WORDS), n))


def synthetic_conversations(n: int, seed: int = 0, scale: float = 1.0) -> list[dict]:
    """n guanaco rows ({"text": "### Human: ...### Assistant: ..."}), plus the planned lengths under "lengths"."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        lengths = synthetic_turn_lengths(rng, scale)
        text = "".join(f"### Human: {_words(rng, h)}### Assistant: {_words(rng, a)}" for h, a in lengths)
        rows.append({"text": text, "lengths": lengths})
    return rows


def write_synthetic_guanaco(path: str | Path, n: int, seed: int = 0, scale: float = 1.0) -> Path:
    path = Path(path)
    with open(path, "w", encoding="utf-8") as f:
        for row in synthetic_conversations(n, seed, scale):
            f.write(json.dumps({"text": row["text"]}) + "\n")
    return path


def expected_mean_tokens(scale: float = 1.0, marker_tokens: int = 10) -> float:
    """Mean encoded length of a synthetic conversation: exchanges x (turn means + markers and EOS), plus BOS."""
    p = W2_LENGTHS
    q, k = p["p_another_exchange"], p["max_exchanges"]
    exchanges = sum(q ** j for j in range(k))  # E[n] of the truncated geometric
    turn = scale * (p["human_median"] * math.exp(p["human_sigma"] ** 2 / 2)
                    + p["assistant_median"] * math.exp(p["assistant_sigma"] ** 2 / 2))
    return 1 + exchanges * (turn + marker_tokens)


def real_eval_split() -> Path | None:
    """The guanaco eval file if it is already in the local Hugging Face cache (never downloads)."""
    try:
        return hub_file("eval", local_files_only=True)
    except Exception:  # not cached, or no huggingface_hub: the synthetic data stands in
        return None


def w2_source_description(path: Path | None, n: int, scale: float) -> str:
    if path is not None:
        return f"guanaco eval split ({path.name})"
    return (f"synthetic guanaco-format conversations ({n}, seed 0, lengths x{scale:g}): "
            + ", ".join(f"{k}={v}" for k, v in W2_LENGTHS.items())
            + f"; mean ~{expected_mean_tokens(scale):.0f} tokens")


def as_dict(w: Workload) -> dict:
    return {**asdict(w), "description": w.describe()}


def labelled_count(batch) -> int:
    """The labelled tokens of a micro-batch: the positions the loss is computed at."""
    return label_positions(batch["labels"]).numel()
