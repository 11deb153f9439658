"""TinyLlama (Llama 2 architecture) in plain PyTorch: model, checkpoint loading, tokenizer, generation.

The bottom layer of the project: it imports nothing from `data`, `training` or the commands. How the model
runs on a machine (attention kernels, compile) is `tinyllama.runtime`; the guanaco chat is `chat.py`.
"""

from .checkpoint import load_model, save_model
from .generation import StopStrings, generate, generate_batch
from .loss import causal_lm_loss, reference_loss
from .model import KVCache, Llama, LlamaConfig
from .tokenizer import BPETokenizer, Tokenizer, load_tokenizer

__all__ = ["Llama", "LlamaConfig", "KVCache", "Tokenizer", "BPETokenizer", "load_tokenizer", "load_model",
           "save_model", "causal_lm_loss", "reference_loss", "generate", "generate_batch", "StopStrings"]
