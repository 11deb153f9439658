"""The data pipeline: load conversations, render them with a chat template, encode them with loss masks, and
batch them.

    conversations = load_conversations("train")            # or a local .jsonl / .jsonl.gz / .parquet, any format
    template = load_template("guanaco")                    # or chatml, llama3, ..., "model", a .jinja file
    examples, report = encode_all(conversations, tokenizer, max_len=1024, template=template)
    stream = BatchStream(examples, batch_size=8, max_len=1024, packing=True, seed=0)
    batch = next(stream)                                   # dict of tensors: model kwargs + "labels"

Modules: `guanaco` (turns, parsing, rendering), `oasst` (message trees), `formats` (messages, ShareGPT, Alpaca
and prompt-completion rows), `sources` (files, Parquet, the Hub, load reports, lists of weighted sources and the
evaluation hold-out: `load_train_eval`), templates (`tinyllama.templates`, re-exported here: chat templates,
rendered as transformers renders them),
`encoding` (tokens and labels through a template: `encode_messages`), `batching` (padding, packing, the
stream), `dialogue` (a conversation as the model continues it: the prompt ids, the streamed reply cut where the
template ends a turn), `synthetic` (the random benchmark workload), `pairs` (preference pairs for DPO and
its kin: formats, trl's token ids, batches of whole pairs), `stats` (a
command-line summary of a data file). Runtime code uses torch, numpy, huggingface_hub and the tokenizer it is
given (pyarrow, for Parquet files, when installed); never transformers or datasets. It sits above `tinyllama`
(the loss's IGNORE_INDEX, the Hub's error, generation for `dialogue`) and below `training` and the commands.
"""

from tinyllama.templates import BUILTINS, Template, TemplateRefused, load_template

from .batching import BatchStream, collate_packed, collate_padded, eval_batches, pack, pack_row, plan_packing
from .encoding import (
    IGNORE_INDEX,
    EncodeReport,
    Example,
    NoLabelledTokens,
    encode,
    encode_all,
    encode_messages,
    encode_prompt,
    encode_rendered,
    end_of_turn_ids,
)
from .guanaco import BadRow, Turn, parse_guanaco, render
from .sources import Conversations, LoadReport, load_conversations, load_examples, load_train_eval

__all__ = ["Turn", "BadRow", "parse_guanaco", "render", "load_conversations", "load_examples", "load_train_eval",
           "LoadReport", "Conversations",
           "Template", "TemplateRefused", "load_template", "BUILTINS",
           "encode", "encode_all", "encode_messages", "encode_prompt", "encode_rendered", "end_of_turn_ids",
           "Example", "EncodeReport", "NoLabelledTokens", "IGNORE_INDEX",
           "BatchStream", "collate_padded", "collate_packed", "pack", "pack_row", "plan_packing", "eval_batches"]
