"""The Llama architecture in plain PyTorch: Llama 2 (TinyLlama), Llama 3.x, SmolLM2 and Mistral.

One file, top to bottom: RMSNorm, rotary embeddings, grouped-query attention, the SwiGLU MLP (with
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

import enum
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lora.config import LoRAConfig
from lora.layer import LoRALinear

from .config import LlamaConfig
from .lora_mlp import fused_lora_mlp
from .runtime import RuntimePlan, varlen_kernel


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


def _linear(in_features: int, out_features: int, name: str, lora_config: LoRAConfig | None) -> nn.Linear:
    if lora_config is not None and name in lora_config.targets:
        return LoRALinear(in_features, out_features, lora_config)
    return nn.Linear(in_features, out_features, bias=False)


class Segments(NamedTuple):
    """Packed rows as concatenated sequences: `cu_seqlens` [segments + 1] (int32, see data.batching) over the
    flattened [batch * row_len] tokens. Passed to the layers in place of the dense block-diagonal mask."""
    cu_seqlens: torch.Tensor
    row_len: int


class AttentionPath(enum.Enum):
    """How a forward pass computes attention, picked once for all layers by `Llama.attention_inputs`."""
    CAUSAL = "causal"  # no mask; grouped k/v heads repeated for each query head (the plain path)
    CAUSAL_GQA = "causal, grouped k/v heads read in place"  # no mask; SDPA's enable_gqa (RuntimePlan.gqa_in_place)
    MASKED = "masked"  # a dense boolean mask: padding, a KV cache, or packed rows on the plain path
    DECODE = "decode"  # one query per row: the queries sharing a k/v head form one block, the cache read in place
    SEGMENTS = "segments"  # packed rows as concatenated segments, no mask (RuntimePlan.varlen)


class AttentionInputs(NamedTuple):
    path: AttentionPath
    mask: torch.Tensor | None = None  # MASKED, DECODE (None: nothing to mask)
    segments: Segments | None = None  # SEGMENTS


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig, layer_idx: int, lora_config: LoRAConfig | None = None):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = (
            config.num_attention_heads, config.num_key_value_heads, config.head_dim)
        h, q_dim, kv_dim = config.hidden_size, self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        self.q_proj = _linear(h, q_dim, "q_proj", lora_config)
        self.k_proj = _linear(h, kv_dim, "k_proj", lora_config)
        self.v_proj = _linear(h, kv_dim, "v_proj", lora_config)
        self.o_proj = _linear(q_dim, h, "o_proj", lora_config)

    def forward(self, x, cos, sin, attn: AttentionInputs, cache: "KVCache | None" = None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        if attn.path is AttentionPath.SEGMENTS:
            return self.o_proj(varlen_attention(q, k, v, attn.segments))
        if attn.path is AttentionPath.DECODE:
            # A single query may see every key given, so no causal mask is needed beyond the padding mask.
            g = self.n_heads // self.n_kv_heads
            y = F.scaled_dot_product_attention(q.view(B, self.n_kv_heads, g, self.head_dim), k, v,
                                               attn_mask=attn.mask)
            return self.o_proj(y.reshape(B, T, -1))
        if attn.path is AttentionPath.CAUSAL_GQA:
            # The kernel reads each shared k/v head in place (flash attention does): no n_heads/n_kv_heads copies
            # of k and v are made, or kept for the backward pass.
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:  # CAUSAL, MASKED: each k/v head repeated for the n_heads/n_kv_heads queries it serves
            k = k.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
            v = v.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn.mask, is_causal=attn.mask is None)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


def varlen_attention(q, k, v, segments: Segments) -> torch.Tensor:
    """Causal attention within each segment: q [B, H, T, D], k/v [B, KV, T, D] -> [B, T, H * D].

    On CUDA, flash attention over the concatenated segments (`runtime.varlen_kernel`, grouped k/v read in place);
    elsewhere `varlen_plain`, the same thing one segment at a time through SDPA.
    """
    B, H, T, D = q.shape
    q, k, v = (t.transpose(1, 2).reshape(B * T, t.shape[1], D) for t in (q, k, v))
    kernel = varlen_kernel() if q.is_cuda else None
    y = kernel(q, k, v, segments) if kernel is not None else varlen_plain(q, k, v, segments.cu_seqlens)
    return y.reshape(B, T, H * D)


def varlen_plain(q, k, v, cu_seqlens) -> torch.Tensor:
    """q [N, H, D], k/v [N, KV, D]: SDPA with a causal mask, segment by segment (reads cu_seqlens on the host)."""
    bounds = cu_seqlens.tolist()
    out = [F.scaled_dot_product_attention(*(t[s:e].transpose(0, 1) for t in (q, k, v)), is_causal=True,
                                          enable_gqa=k.shape[1] != q.shape[1]).transpose(0, 1)
           for s, e in zip(bounds[:-1], bounds[1:], strict=True) if e > s]
    return torch.cat(out)


def segment_ids(cu_seqlens: torch.Tensor, batch: int, row_len: int) -> torch.Tensor:
    """[batch, row_len]: which segment of `cu_seqlens` each token of the packed rows belongs to."""
    tokens = torch.arange(batch * row_len, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    return (torch.searchsorted(cu_seqlens, tokens, right=True) - 1).view(batch, row_len)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)). LoRA lives here from construction when configured.

    `forward(x, fused=True)` runs the LoRA MLP as one autograd function (`tinyllama.lora_mlp`) on the gate/up
    weight `runtime.apply_plan` fused for a plan with `fused_mlp`; `plain` is the modules one by one, what runs
    otherwise (and with LoRA disabled or merged).
    """

    def __init__(self, config: LlamaConfig, lora_config: LoRAConfig | None = None):
        super().__init__()
        h, i = config.hidden_size, config.intermediate_size
        self.gate_proj = _linear(h, i, "gate_proj", lora_config)
        self.up_proj = _linear(h, i, "up_proj", lora_config)
        self.down_proj = _linear(i, h, "down_proj", lora_config)
        self.register_buffer("gate_up_weight", None, persistent=False)  # owned by the plan: runtime.apply_plan

    def forward(self, x, fused: bool = False):
        if fused and self.gate_up_weight is not None and all(m.active and not m.merged for m in (
                self.gate_proj, self.up_proj, self.down_proj)):
            return fused_lora_mlp(self, x)
        return self.plain(x)

    def plain(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig, layer_idx: int, lora_config: LoRAConfig | None = None):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx, lora_config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config, lora_config)

    def forward(self, x, cos, sin, attn: AttentionInputs, cache=None, fused_mlp: bool = False):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attn, cache)
        return x + self.mlp(self.post_attention_layernorm(x), fused_mlp)


class LlamaBody(nn.Module):
    """Hugging Face's `LlamaModel`: embeddings, decoder layers, final norm (named `model.*`)."""

    def __init__(self, config: LlamaConfig, lora_config: LoRAConfig | None = None):
        super().__init__()
        # On meta, nn.Embedding's normal_ init runs through a decomposition that imports torch._dynamo (about 1 s
        # of every start); a meta weight holds no values to draw, so it is made empty.
        shape = (config.vocab_size, config.hidden_size)
        empty = torch.empty(shape) if torch.get_default_device().type == "meta" else None
        self.embed_tokens = nn.Embedding(*shape, _weight=empty)
        self.layers = nn.ModuleList(DecoderLayer(config, i, lora_config) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class Llama(nn.Module):
    """`Llama(config, lora_config=None)`; `model(input_ids) -> logits [batch, seq, vocab]`.

    Built on the current default device, so `with torch.device("meta"): Llama(cfg)` costs no memory.
    With a `LoRAConfig`, the targeted projections are `LoRALinear` and everything but `lora_A`/`lora_B` is
    frozen. `plan` (a `runtime.RuntimePlan`, set by `runtime.apply_plan`) is how it runs on this machine: the
    default is the plain path everywhere.
    """

    def __init__(self, config: LlamaConfig, lora_config: LoRAConfig | None = None):
        super().__init__()
        self.config = config
        self.lora_config = lora_config
        self.model = LlamaBody(config, lora_config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.gradient_checkpointing = False
        self.plan = RuntimePlan()
        if lora_config is not None:
            for name, p in self.named_parameters():
                p.requires_grad_(".lora_" in name)

    def hidden_states(self, input_ids, *, position_ids=None, attention_mask=None, cu_seqlens=None,
                      cache: "KVCache | None" = None, plan: RuntimePlan | None = None) -> torch.Tensor:
        """The final-norm hidden states [B, T, hidden]: everything but the LM head.

        - `position_ids` [B, T]: defaults to 0..T-1 (continuing from the cache when one is given).
        - `attention_mask` [B, T_keys]: 1 for real tokens, 0 for padding (T_keys includes cached tokens).
        - `cu_seqlens`: packed rows (data.batching): where each segment starts in the flattened [B * T] tokens; a
          token attends only to earlier tokens of its own segment.
        - `plan`: how to run (default `self.plan`).
        """
        plan = plan or self.plan
        B, T = input_ids.shape
        past = cache.length if cache is not None else 0
        self.config.check_attention_span(past + T)
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=input_ids.device).expand(B, T)
        x = self.model.embed_tokens(input_ids)
        cos, sin = rope_cos_sin(self.config, position_ids, x.dtype)
        attn = self.attention_inputs(B, T, past, attention_mask, cu_seqlens, cache, plan, input_ids.device)
        for layer in self.model.layers:
            if self.gradient_checkpointing and self.training:
                x = checkpoint(layer, x, cos, sin, attn, cache, plan.fused_mlp, use_reentrant=False)
            else:
                x = layer(x, cos, sin, attn, cache, plan.fused_mlp)
        if cache is not None:
            cache.length += T
        return self.model.norm(x)

    def attention_inputs(self, B: int, T: int, past: int, attention_mask, cu_seqlens, cache, plan: RuntimePlan,
                         device) -> AttentionInputs:
        """The attention path of a forward pass (every layer takes the same), with its mask or segments."""
        if cu_seqlens is not None and plan.varlen and cache is None and attention_mask is None:
            return AttentionInputs(AttentionPath.SEGMENTS, segments=Segments(cu_seqlens, T))
        document_ids = None if cu_seqlens is None else segment_ids(cu_seqlens, B, T)
        mask = build_attention_mask(T, past, attention_mask, document_ids, device, force=cache is not None)
        grouped = self.config.num_key_value_heads != self.config.num_attention_heads
        if grouped and T == 1:
            return AttentionInputs(AttentionPath.DECODE, mask=mask)
        if mask is None:
            return AttentionInputs(AttentionPath.CAUSAL_GQA if grouped and plan.gqa_in_place else AttentionPath.CAUSAL)
        return AttentionInputs(AttentionPath.MASKED, mask=mask)

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

