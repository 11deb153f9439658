"""TinyLlama and the rest of the Llama family in plain PyTorch: model, checkpoint loading, tokenizers, generation.

The bottom layer of the project (with `lora`, which the model builds in): it imports nothing from `data`,
`training` or the commands. How the model runs on a machine (attention kernels, compile) is `tinyllama.runtime`;
NF4 base weights are `tinyllama.quant`; named model shapes `tinyllama.shapes`; the merged export
`python -m tinyllama.export`; the guanaco chat is `chat.py`.
"""

from .checkpoint import load_model, save_model
from .config import LlamaConfig
from .generation import StopStrings, generate, generate_batch
from .loss import causal_lm_loss, reference_loss
from .model import KVCache, Llama
from .tokenizer import BPETokenizer, Tokenizer, load_tokenizer

__all__ = ["Llama", "LlamaConfig", "KVCache", "Tokenizer", "BPETokenizer", "load_tokenizer", "load_model",
           "save_model", "causal_lm_loss", "reference_loss", "generate", "generate_batch", "StopStrings"]
