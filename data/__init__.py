"""The guanaco data pipeline: load conversations, encode them with loss masks, and batch them.

    conversations = load_conversations("train")            # or a local guanaco / OASST trees .jsonl, or .parquet
    examples, report = encode_all(conversations, tokenizer, max_len=1024)
    stream = BatchStream(examples, batch_size=8, max_len=1024, packing=True, seed=0)
    batch = next(stream)                                   # dict of tensors: model kwargs + "labels"

Modules: `guanaco` (turns, parsing, rendering), `oasst` (message trees), `sources` (files, Parquet, the Hub,
load reports, lists of weighted sources and the evaluation hold-out: `load_train_eval`), `encoding` (tokens and
labels), `batching` (padding, packing, the stream), `dialogue` (a conversation as the model continues it: the
prompt ids, the streamed reply cut at the next marker), `synthetic` (the random benchmark workload), `stats` (a
command-line summary of a data file). Runtime code uses torch, numpy, huggingface_hub and the tokenizer it is
given (pyarrow, for Parquet files, when installed); never transformers or datasets. It sits above `tinyllama`
(the loss's IGNORE_INDEX, the Hub's error, generation for `dialogue`) and below `training` and the commands.
"""

from .batching import BatchStream, collate_packed, collate_padded, eval_batches, pack, pack_row, plan_packing
from .encoding import IGNORE_INDEX, EncodeReport, Example, NoLabelledTokens, encode, encode_all, encode_prompt
from .guanaco import BadRow, Turn, parse_guanaco, render
from .sources import Conversations, LoadReport, load_conversations, load_examples, load_train_eval

__all__ = ["Turn", "BadRow", "parse_guanaco", "render", "load_conversations", "load_examples", "load_train_eval",
           "LoadReport", "Conversations",
           "encode", "encode_all", "encode_prompt", "Example", "EncodeReport", "NoLabelledTokens", "IGNORE_INDEX",
           "BatchStream", "collate_padded", "collate_packed", "pack", "pack_row", "plan_packing", "eval_batches"]
