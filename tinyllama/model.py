"""The Llama architecture in plain PyTorch: Llama 2 (TinyLlama), Llama 3.x, SmolLM2 and Mistral.

One file, top to bottom: config, RMSNorm, rotary embeddings, grouped-query attention, the SwiGLU MLP (with
LoRA built in when a `LoRAConfig` is given), the decoder block, the model, and a key/value cache.

Module and parameter names are Hugging Face's (`model.layers.0.mlp.gate_proj.weight`, `lm_head.weight`), so a
`LlamaForCausalLM` or `MistralForCausalLM` safetensors checkpoint loads with no renaming, and LoRA keys are a
fixed prefix away from PEFT's. Numerics follow `transformers`' Llama (RMSNorm in float32, rotate-half RoPE with
inverse frequencies and cos/sin in float32, Llama 3's and linear RoPE scaling computed as it does), which the
tests check to 1e-4 in float32.

Deliberately left out: other RoPE variants (dynamic, yarn, longrope, ...), sliding-window attention (a Mistral
config with a window loads, but a sequence longer than the window is refused), attention/MLP biases, tensor
parallelism, dropout in the base model. A config that asks for any of them is refused, not approximated.
"""

from __future__ import annotations

import inspect
import json
import math
import warnings
from dataclasses import dataclass, fields
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lora.config import LoRAConfig
from lora.layer import LoRALinear

from .lora_mlp import lora_mlp

# config.json keys that carry no information about the computation. The last three are SmolLM2's, left from its
# conversion; transformers' Llama reads none of them.
_HARMLESS_KEYS = {
    "architectures", "transformers_version", "torch_dtype", "dtype", "use_cache",
    "initializer_range", "pad_token_id", "attention_dropout", "_name_or_path", "pretraining_tp",
    "output_attentions", "output_hidden_states", "return_dict", "tokenizer_class", "generation_config",
    "is_llama_config", "rope_interleaved", "transformers.js_config",
}
# config.json keys whose only supported value is the one given; anything else is refused.
_FIXED_KEYS = {"hidden_act": "silu", "attention_bias": False, "mlp_bias": False}
# The checkpoint families computed here (transformers' model_type): Mistral is the Llama computation plus a
# sliding window, which is recorded and enforced as a limit on the attention span, not computed.
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}
# RoPE types computed here (transformers' names) and the parameters each reads; "default" is plain RoPE.
_ROPE_PARAMETERS = {
    "default": (),
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}
# transformers' MistralConfig default for a config.json without the key.
_MISTRAL_DEFAULT_SLIDING_WINDOW = 4096


def _check_rope_type(rope_type, key: str) -> None:
    if rope_type not in _ROPE_PARAMETERS:
        raise ValueError(
            f"{key} has rope_type {rope_type!r}, which is not supported: this implementation computes plain RoPE "
            f"and the types {sorted(set(_ROPE_PARAMETERS) - {'default'})} exactly as transformers does, and "
            "refuses the others (dynamic, yarn, longrope, ...) rather than approximate them")


@dataclass
class LlamaConfig:
    vocab_size: int = 32000
    hidden_size: int = 2048
    intermediate_size: int = 5632
    num_hidden_layers: int = 22
    num_attention_heads: int = 32
    num_key_value_heads: int = 4
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2  # several: any of them ends generation (Llama 3 Instruct lists 3)
    # RoPE scaling in transformers' terms: None for plain RoPE, else {"rope_type": "linear", "factor": ...} or
    # {"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}.
    rope_scaling: dict | None = None
    model_type: str = "llama"  # or "mistral": the same computation, saved under Mistral's names
    # Mistral only: each token attends to at most this many tokens (itself included). Not computed: a longer
    # attention span is refused (`check_attention_span`). None: no window.
    sliding_window: int | None = None

    def __post_init__(self):
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"hidden_size ({self.hidden_size}) is not divisible by num_attention_heads "
                    f"({self.num_attention_heads}); set head_dim explicitly in config.json")
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads}) for grouped-query attention")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.model_type not in _ARCHITECTURES:
            raise ValueError(f"model_type is {self.model_type!r}; supported: {sorted(_ARCHITECTURES)} (Llama 2 and "
                             "3, TinyLlama, SmolLM2 and other Llama-architecture models; Mistral)")
        if self.sliding_window is not None and (self.model_type != "mistral" or self.sliding_window < 1):
            raise ValueError(f"sliding_window={self.sliding_window!r} needs model_type 'mistral' and a positive "
                             f"window (model_type is {self.model_type!r}); use None for no window")
        if self.rope_scaling is not None:
            rope_type = self.rope_scaling.get("rope_type")
            _check_rope_type(rope_type, "rope_scaling")
            if rope_type == "default":
                raise ValueError("rope_scaling: plain RoPE is rope_scaling=None, not rope_type 'default'")
            missing = [k for k in _ROPE_PARAMETERS[rope_type] if k not in self.rope_scaling]
            if missing:
                raise ValueError(f"rope_scaling={self.rope_scaling!r}: rope_type {rope_type!r} needs the parameters "
                                 f"{list(_ROPE_PARAMETERS[rope_type])}; missing {missing}")

    @classmethod
    def from_dict(cls, d: dict) -> "LlamaConfig":
        d = dict(d)
        model_type = d.setdefault("model_type", "llama")
        if model_type not in _ARCHITECTURES:
            raise ValueError(f"config.json: model_type is {model_type!r}; supported: {sorted(_ARCHITECTURES)}")
        if model_type == "mistral":
            d.setdefault("sliding_window", _MISTRAL_DEFAULT_SLIDING_WINDOW)
        if d.get("num_key_value_heads") is None:  # older configs; transformers reads one k/v head per query head
            d["num_key_value_heads"] = d.get("num_attention_heads", cls.num_attention_heads)
        d["rope_scaling"] = cls._rope_scaling_from_dict(d)
        for key, supported in _FIXED_KEYS.items():
            value = d.pop(key, supported)
            if value != supported:
                raise ValueError(f"config.json: {key}={value!r} is not supported "
                                 f"(this implementation needs {key}={supported!r})")
        if isinstance(d.get("bos_token_id"), list):  # some configs list several; the first is the main one
            d["bos_token_id"] = d["bos_token_id"][0]
        names = {f.name for f in fields(cls)}
        if model_type != "mistral":
            names.discard("sliding_window")  # transformers' Llama reads no window, so neither do we
        unknown = sorted(k for k in d if k not in names and k not in _HARMLESS_KEYS)
        if unknown:
            warnings.warn(f"config.json: ignoring fields this implementation does not read: {unknown}", stacklevel=2)
        return cls(**{k: v for k, v in d.items() if k in names})

    @staticmethod
    def _rope_scaling_from_dict(d: dict) -> dict | None:
        """Pop RoPE's settings from a config.json dict `d` (setting d["rope_theta"]) and return `rope_scaling`.

        Read as transformers reads them: transformers >= 5 writes `rope_parameters` (with rope_theta inside),
        older versions `rope_scaling` (with "type" or "rope_type") and a top-level rope_theta. A non-null
        rope_scaling wins over rope_parameters, and a rope_theta inside the dict over the top-level one.
        """
        scaling, parameters = d.pop("rope_scaling", None), d.pop("rope_parameters", None)
        key = "rope_scaling" if scaling else "rope_parameters"
        rope = dict(scaling or parameters or {})
        if "rope_theta" in rope:
            d["rope_theta"] = rope.pop("rope_theta")
        legacy_type = rope.pop("type", "default")
        rope_type = rope.pop("rope_type", legacy_type)
        _check_rope_type(rope_type, f"config.json: {key}")
        if rope_type == "llama3":  # transformers: a top-level value wins, else the context length
            rope["original_max_position_embeddings"] = d.pop(
                "original_max_position_embeddings",
                rope.get("original_max_position_embeddings", d.get("max_position_embeddings")))
        wanted = _ROPE_PARAMETERS[rope_type]
        missing = [k for k in wanted if rope.get(k) is None]
        if missing:
            raise ValueError(f"config.json: {key} of rope_type {rope_type!r} needs {list(wanted)}; "
                             f"missing {missing}")
        ignored = sorted(set(rope) - set(wanted))
        if ignored:
            warnings.warn(f"config.json: ignoring {key} fields that rope_type {rope_type!r} does not read: "
                          f"{ignored}", stacklevel=3)
        return None if rope_type == "default" else {"rope_type": rope_type, **{k: rope[k] for k in wanted}}

    @classmethod
    def from_json(cls, path: str | Path) -> "LlamaConfig":
        try:
            with open(path, encoding="utf-8") as f:
                return cls.from_dict(json.load(f))
        except ValueError as e:  # not JSON, or a field this implementation refuses
            raise ValueError(f"{path}: {e}") from None

    def to_hf_dict(self) -> dict:
        """A `config.json` that `transformers` reads back as this config (`LlamaForCausalLM`, or
        `MistralForCausalLM` for model_type 'mistral').

        RoPE is written the pre-5 way (top-level rope_theta, `rope_scaling` with rope_type), which transformers 5
        still reads and older versions read too; transformers 5 itself writes `rope_parameters`.
        """
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        # A copy: transformers writes rope_theta into the rope_scaling dict it is given.
        d["rope_scaling"] = None if self.rope_scaling is None else dict(self.rope_scaling)
        d.update(architectures=[_ARCHITECTURES[self.model_type]], hidden_act="silu")
        if self.model_type == "llama":
            del d["sliding_window"]
            d.update(attention_bias=False, mlp_bias=False)
        return d

    @property
    def context_length(self) -> int:
        """The most tokens one sequence may hold: the positions, or a Mistral sliding window if that is shorter."""
        return min(self.max_position_embeddings, self.sliding_window or self.max_position_embeddings)

    def check_attention_span(self, length: int) -> None:
        """Refuse `length` tokens attended at once (a row, or the cached tokens plus the new ones) when they would
        reach beyond a Mistral sliding window, which this implementation does not compute. Within the window,
        sliding-window attention is plain causal attention, so the result is exact."""
        if self.sliding_window is not None and length > self.sliding_window:
            raise ValueError(
                f"{length} tokens attended at once, but this Mistral checkpoint attends over a sliding window of "
                f"{self.sliding_window} tokens, which this implementation does not compute (it is exact up to "
                f"{self.sliding_window} tokens): use sequences of at most {self.sliding_window} tokens, e.g. a "
                "smaller max_len")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 and round to x's dtype before the weight, exactly as the HF weights were trained.
        # F.rms_norm does the float32 part itself (one fused kernel on CUDA); outside autocast, so it returns
        # x's dtype rather than float32. `reference` is the same thing spelled out.
        with torch.autocast(x.device.type, enabled=False):
            return self.weight * F.rms_norm(x, (x.shape[-1],), eps=self.eps)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_inv_freq(config: LlamaConfig, device=None) -> torch.Tensor:
    """RoPE's inverse frequencies [head_dim / 2], float32, scaled as `config.rope_scaling` says; the same float32
    operations as transformers' `_compute_*_parameters` (whose attention scaling is 1 for these types)."""
    d = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, device=device, dtype=torch.int64).float() / d))
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    if scaling["rope_type"] == "linear":  # positions divided by the factor, folded into the frequencies
        return inv_freq / scaling["factor"]
    # llama3: wavelengths shorter than original/high_freq_factor kept, longer than original/low_freq_factor
    # stretched by the factor, and those between interpolated smoothly.
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    original = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > original / low, inv_freq / factor, inv_freq)
    smooth = (original / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < original / high) * ~(wavelen > original / low)
    return torch.where(is_medium, smoothed, scaled)


def rope_cos_sin(config: LlamaConfig, position_ids: torch.Tensor, dtype: torch.dtype):
    """cos/sin of shape [batch, seq, head_dim] for rotate-half RoPE, computed in float32."""
    with torch.autocast(device_type=position_ids.device.type, enabled=False):
        freqs = position_ids[..., None].float() * rope_inv_freq(config, position_ids.device)  # [B, T, d/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, heads, T, d]; the HF convention: pairs are (i, i + d/2), not interleaved."""
    cos, sin = cos[:, None], sin[:, None]
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def _linear(in_features: int, out_features: int, name: str, lora: LoRAConfig | None) -> nn.Linear:
    if lora is not None and name in lora.targets:
        return LoRALinear(in_features, out_features, lora)
    return nn.Linear(in_features, out_features, bias=False)


class Attention(nn.Module):
    # Unmasked attention passes the n_kv_heads k/v heads to SDPA as they are (`enable_gqa`) instead of repeating
    # them: right where the kernel SDPA picks supports that (flash does). False: always repeat (the reference
    # path, also used under any mask). train.py turns it off where the preferred kernel would not take it.
    native_gqa = True

    def __init__(self, config: LlamaConfig, layer_idx: int, lora: LoRAConfig | None = None):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = (
            config.num_attention_heads, config.num_key_value_heads, config.head_dim)
        h, q_dim, kv_dim = config.hidden_size, self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        self.q_proj = _linear(h, q_dim, "q_proj", lora)
        self.k_proj = _linear(h, kv_dim, "k_proj", lora)
        self.v_proj = _linear(h, kv_dim, "v_proj", lora)
        self.o_proj = _linear(q_dim, h, "o_proj", lora)

    def forward(self, x, cos, sin, mask=None, cache: "KVCache | None" = None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        if isinstance(mask, Segments):  # packed rows, as concatenated documents: no mask at all
            return self.o_proj(varlen_attention(q, k, v, mask))
        if self.n_kv_heads != self.n_heads and T == 1:
            # Decoding one token: the queries sharing a k/v head become rows of one query block, so the cache
            # is read in place instead of copied n_heads/n_kv_heads times. A single query may see every key
            # given, so no causal mask is needed beyond the padding mask.
            g = self.n_heads // self.n_kv_heads
            y = F.scaled_dot_product_attention(q.view(B, self.n_kv_heads, g, self.head_dim), k, v, attn_mask=mask)
            return self.o_proj(y.reshape(B, T, -1))
        if mask is None and self.native_gqa:
            # Plain causal attention: the kernel reads each shared k/v head in place (flash attention does), so
            # no n_heads/n_kv_heads copies of k and v are made, or kept for the backward pass.
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.n_kv_heads != self.n_heads)
            return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))
        if self.n_kv_heads != self.n_heads:  # grouped-query: each k/v head serves n_heads/n_kv_heads queries
            k = k.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
            v = v.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class Segments(NamedTuple):
    """Packed rows as concatenated sequences: `cu_seqlens` [segments + 1] (int32, see data.batching) over the
    flattened [batch * row_len] tokens. Passed to the layers in place of the dense block-diagonal mask."""
    cu_seqlens: torch.Tensor
    row_len: int


def varlen_attention(q, k, v, segments: Segments) -> torch.Tensor:
    """Causal attention within each segment: q [B, H, T, D], k/v [B, KV, T, D] -> [B, T, H * D].

    On CUDA, flash attention over the concatenated segments (`torch.nn.attention.varlen`, grouped k/v read in
    place); elsewhere `varlen_reference`, the same thing one segment at a time through SDPA.
    """
    B, H, T, D = q.shape
    q, k, v = (t.transpose(1, 2).reshape(B * T, t.shape[1], D) for t in (q, k, v))
    kernel = _VARLEN_KERNEL if q.is_cuda else None
    y = kernel(q, k, v, segments) if kernel is not None else varlen_reference(q, k, v, segments.cu_seqlens)
    return y.reshape(B, T, H * D)


def varlen_reference(q, k, v, cu_seqlens) -> torch.Tensor:
    """q [N, H, D], k/v [N, KV, D]: SDPA with a causal mask, segment by segment (reads cu_seqlens on the host)."""
    bounds = cu_seqlens.tolist()
    out = [F.scaled_dot_product_attention(*(t[s:e].transpose(0, 1) for t in (q, k, v)), is_causal=True,
                                          enable_gqa=k.shape[1] != q.shape[1]).transpose(0, 1)
           for s, e in zip(bounds[:-1], bounds[1:], strict=True) if e > s]
    return torch.cat(out)


def _varlen_kernel():
    """torch's varlen flash attention, called as the installed version spells it; None where there is none."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    causal = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    gqa = "enable_gqa" in params

    def kernel(q, k, v, segments: Segments):
        if not gqa and k.shape[1] != q.shape[1]:
            k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
        cu = segments.cu_seqlens
        return varlen_attn(q, k, v, cu, cu, segments.row_len, segments.row_len, **causal,
                           **({"enable_gqa": True} if gqa and k.shape[1] != q.shape[1] else {}))

    return kernel


_VARLEN_KERNEL = _varlen_kernel()


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)). LoRA lives here from construction when configured.

    With LoRA on all three projections and `tinyllama.lora_mlp.fuse_gate_up` applied (`configure_runtime` does it
    on CUDA), the forward pass is one autograd function, `LoRAMLP`; `reference` is the plain modules.
    """

    def __init__(self, config: LlamaConfig, lora: LoRAConfig | None = None):
        super().__init__()
        h, i = config.hidden_size, config.intermediate_size
        self.gate_proj = _linear(h, i, "gate_proj", lora)
        self.up_proj = _linear(h, i, "up_proj", lora)
        self.down_proj = _linear(i, h, "down_proj", lora)
        self.register_buffer("gate_up_weight", None, persistent=False)  # set by fuse_gate_up

    def forward(self, x):
        if self.gate_up_weight is not None and all(m.active and not m.merged for m in (
                self.gate_proj, self.up_proj, self.down_proj)):
            return lora_mlp(self, x)
        return self.reference(x)

    def reference(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig, layer_idx: int, lora: LoRAConfig | None = None):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx, lora)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config, lora)

    def forward(self, x, cos, sin, mask=None, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaBody(nn.Module):
    """Hugging Face's `LlamaModel`: embeddings, decoder layers, final norm (named `model.*`)."""

    def __init__(self, config: LlamaConfig, lora: LoRAConfig | None = None):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i, lora) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class Llama(nn.Module):
    """`Llama(config, lora=None)`; `model(input_ids) -> logits [batch, seq, vocab]`.

    Built on the current default device, so `with torch.device("meta"): Llama(cfg)` costs no memory.
    With a `LoRAConfig`, the targeted projections are `LoRALinear` and everything but `lora_A`/`lora_B` is
    frozen.
    """

    def __init__(self, config: LlamaConfig, lora: LoRAConfig | None = None):
        super().__init__()
        self.config = config
        self.lora_config = lora
        self.model = LlamaBody(config, lora)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.gradient_checkpointing = False
        self.varlen_attention = False  # packed rows: segments (True) or the dense mask (the reference path)
        if lora is not None:
            for name, p in self.named_parameters():
                p.requires_grad_(".lora_" in name)

    def hidden_states(self, input_ids, *, position_ids=None, attention_mask=None, document_ids=None,
                      cu_seqlens=None, cache: "KVCache | None" = None) -> torch.Tensor:
        """The final-norm hidden states [B, T, hidden]: everything but the LM head.

        - `position_ids` [B, T]: defaults to 0..T-1 (continuing from the cache when one is given).
        - `attention_mask` [B, T_keys]: 1 for real tokens, 0 for padding (T_keys includes cached tokens).
        - `document_ids` [B, T]: packed rows; a token attends only to earlier tokens of its own document.
        - `cu_seqlens`: the same packed rows as segments (data.batching); used instead of `document_ids` when
          `varlen_attention` is on (`configure_runtime` turns it on where torch has the CUDA kernel).
        """
        B, T = input_ids.shape
        past = cache.length if cache is not None else 0
        self.config.check_attention_span(past + T)
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=input_ids.device).expand(B, T)
        x = self.model.embed_tokens(input_ids)
        cos, sin = rope_cos_sin(self.config, position_ids, x.dtype)
        if cu_seqlens is not None and self.varlen_attention and cache is None and attention_mask is None:
            mask = Segments(cu_seqlens, T)
        else:
            mask = build_attention_mask(T, past, attention_mask, document_ids, input_ids.device,
                                        force=cache is not None)
        for layer in self.model.layers:
            if self.gradient_checkpointing and self.training:
                x = checkpoint(layer, x, cos, sin, mask, cache, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, cache)
        if cache is not None:
            cache.length += T
        return self.model.norm(x)

    def forward(self, input_ids, **kwargs) -> torch.Tensor:
        return self.lm_head(self.hidden_states(input_ids, **kwargs))


def build_attention_mask(T: int, past: int, attention_mask=None, document_ids=None, device=None,
                         force: bool = False):
    """A boolean SDPA mask [B or 1, 1, T, past + T] (True = may attend), or None for plain causal.

    Every token may always attend to itself, so a padding query never has an empty row (which would give
    NaN); its output is ignored anyway.
    """
    if attention_mask is None and document_ids is None and not force:
        return None
    q = torch.arange(past, past + T, device=device)
    k = torch.arange(past + T, device=device)
    mask = (k[None, :] <= q[:, None])[None, None]  # causal, [1, 1, T, past+T]
    if attention_mask is not None:
        if attention_mask.shape[-1] != past + T:
            raise ValueError(f"attention_mask covers {attention_mask.shape[-1]} positions, expected "
                             f"{past + T} (cached {past} + new {T})")
        mask = mask & attention_mask.bool()[:, None, None, :]
    if document_ids is not None:
        if past:
            raise ValueError("document_ids (packed rows) cannot be combined with a key/value cache")
        mask = mask & (document_ids[:, None, :, None] == document_ids[:, None, None, :])
    return mask | (k[None, :] == q[:, None])[None, None]


class KVCache:
    """Preallocated keys and values for every layer: [layers, batch, kv_heads, max_len, head_dim].

    Stores the n_kv_heads heads only (grouped-query attention shares them), so a TinyLlama cache is 8x smaller
    than one per query head.
    """

    def __init__(self, config: LlamaConfig, batch_size: int, max_len: int, device=None, dtype=torch.float32):
        shape = (config.num_hidden_layers, batch_size, config.num_key_value_heads, max_len, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.length = 0  # positions filled; advanced by the model after all layers have written

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor):
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache is full: {end} positions needed, {self.max_len} allocated")
        self.k[layer_idx, :, :, self.length:end] = k
        self.v[layer_idx, :, :, self.length:end] = v
        return self.k[layer_idx, :, :, :end], self.v[layer_idx, :, :, :end]


def num_parameters(config: LlamaConfig) -> int:
    """Parameter count of the base model, computed from the shapes alone (ties counted once)."""
    with torch.device("meta"):
        return sum(p.numel() for p in Llama(config).parameters())

