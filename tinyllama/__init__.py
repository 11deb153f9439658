"""TinyLlama (Llama 2 architecture) in plain PyTorch: model, checkpoint loading, tokenizer."""

from .checkpoint import load_model, save_model
from .loss import causal_lm_loss, reference_loss
from .model import KVCache, Llama, LlamaConfig
from .tokenizer import Tokenizer

__all__ = ["Llama", "LlamaConfig", "KVCache", "Tokenizer", "load_model", "save_model", "causal_lm_loss",
           "reference_loss"]
