"""The Llama architecture in plain PyTorch, and the families built on it: Llama 2 (TinyLlama), Llama 3.x, SmolLM2,
Mistral, Qwen 2.5 and 3, Gemma 2 and 3 (text), Phi-3 and Phi-4-mini, as one model whose config names what it
computes (`tinyllama.config`: biases, q/k norms, Gemma's norms and embedding scale, GeGLU, sandwich norms,
softcaps, per-layer sliding windows and RoPE bases, partial rotary, fused projections).

One file, top to bottom: RMSNorm, rotary embeddings, grouped-query attention, the gated MLP (with LoRA built
in when a `LoRAConfig` is given), the decoder block, the model, and a key/value cache. Each option is resolved
when the model is built (which modules exist, which function a layer calls), not tested per token.

Module and parameter names are Hugging Face's (`model.layers.0.mlp.gate_proj.weight`, `lm_head.weight`,
Phi-3's `qkv_proj`), so a `*ForCausalLM` safetensors checkpoint of each family loads with no renaming, and
LoRA keys are a fixed prefix away from PEFT's. Numerics follow `transformers` (RMSNorm in float32, rotate-half
RoPE with inverse frequencies and cos/sin in float32, Llama 3's, linear and Phi-3's longrope scaling computed as
it does, sliding windows masked as its masks do), which the tests check to 1e-4 in float32.

Deliberately left out: other RoPE variants (dynamic, yarn, ...), MLP biases, tensor parallelism,
dropout in the base model. A config that asks for any of them is refused, not approximated.
"""

from __future__ import annotations

import enum
import functools
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lora.config import LoRAConfig
from lora.layer import LoRALinear

from .config import FULL, SLIDING, LlamaConfig
from .lora_mlp import fused_lora_mlp
from .loss import softcap_logits
from .runtime import RuntimePlan, flex_kernel, varlen_kernel


class RMSNorm(nn.Module):
    """RMSNorm as transformers computes it: Llama's (normalise in float32, round to x's dtype, times w), or with
    `unit_offset` Gemma's (normalise and times (1 + w) in float32, one rounding at the end; w starts at zero)."""

    def __init__(self, dim: int, eps: float, unit_offset: bool = False):
        super().__init__()
        self.eps, self.unit_offset = eps, unit_offset
        self.weight = nn.Parameter(torch.zeros(dim) if unit_offset else torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # F.rms_norm does the float32 part itself (one fused kernel on CUDA); outside autocast, so it returns
        # x's dtype rather than float32. `reference` is the same thing spelled out.
        with torch.autocast(x.device.type, enabled=False):
            if self.unit_offset:
                return (F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps) * (1.0 + self.weight.float())).to(x.dtype)
            return self.weight * F.rms_norm(x, (x.shape[-1],), eps=self.eps)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.unit_offset:
            return (h * (1.0 + self.weight.float())).to(x.dtype)
        return self.weight * h.to(x.dtype)


def rope_inv_freq(config: LlamaConfig, device=None, layer_type: str = FULL, long: bool = False) -> torch.Tensor:
    """RoPE's inverse frequencies [rotary_dim / 2], float32, for the layers of `layer_type` (Gemma 3's sliding
    layers have their own base and no scaling), scaled as `config.rope_scaling` says; the same float32
    operations as transformers' `_compute_*_parameters` (whose attention scaling is 1 for these types)."""
    d = config.rotary_dim
    local = layer_type == SLIDING and config.rope_local_theta is not None
    theta = config.rope_local_theta if local else config.rope_theta
    powers = theta ** (torch.arange(0, d, 2, device=device, dtype=torch.int64).float() / d)
    scaling = None if local else config.rope_scaling
    if scaling is not None and scaling["rope_type"] == "longrope":  # the short factors, or with `long` the long ones
        factors = torch.tensor(scaling["long_factor" if long else "short_factor"], dtype=torch.float32, device=device)
        return 1.0 / (factors * powers)
    inv_freq = 1.0 / powers
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


def rope_cos_sin(config: LlamaConfig, position_ids: torch.Tensor, dtype: torch.dtype, layer_type: str = FULL):
    """cos/sin of shape [batch, seq, rotary_dim] for rotate-half RoPE, computed in float32.

    longrope (Phi-3): as transformers does per forward pass, the long factors for every position when any
    position of the call is past `original_max_position_embeddings`, else the short ones, and cos/sin scaled by
    the attention factor (sqrt(1 + ln(factor) / ln(original)) unless given)."""
    device, scaling = position_ids.device, config.rope_scaling
    with torch.autocast(device_type=device.type, enabled=False):
        inv_freq = rope_inv_freq(config, device, layer_type)
        scale = 1.0
        if scaling is not None and scaling["rope_type"] == "longrope" and not (
                layer_type == SLIDING and config.rope_local_theta is not None):
            original = scaling["original_max_position_embeddings"]
            past = position_ids.max() + 1 > original  # on the device: no wait for the host
            inv_freq = torch.where(past, rope_inv_freq(config, device, layer_type, long=True), inv_freq)
            scale = longrope_attention_factor(config)
        freqs = position_ids[..., None].float() * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype)


def longrope_attention_factor(config: LlamaConfig) -> float:
    scaling = config.rope_scaling
    if scaling.get("attention_factor") is not None:
        return scaling["attention_factor"]
    original = scaling["original_max_position_embeddings"]
    factor = scaling.get("factor") or config.max_position_embeddings / original
    return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, heads, T, d]; the HF convention: pairs are (i, i + r/2), not interleaved, over the first r =
    cos.shape[-1] channels (all of them but with partial rotary); the rest pass through."""
    cos, sin = cos[:, None], sin[:, None]
    r = cos.shape[-1]
    if r < x.shape[-1]:
        return torch.cat((apply_rope(x[..., :r], cos[:, 0], sin[:, 0]), x[..., r:]), dim=-1)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def _linear(in_features: int, out_features: int, name: str, lora_config: LoRAConfig | None,
            bias: bool = False) -> nn.Linear:
    if lora_config is not None and name in lora_config.targets:
        return LoRALinear(in_features, out_features, lora_config, bias=bias)
    return nn.Linear(in_features, out_features, bias=bias)


class Segments(NamedTuple):
    """Packed rows as concatenated sequences: `cu_seqlens` [segments + 1] (int32, see data.batching) over the
    flattened [batch * row_len] tokens. Passed to the layers in place of the dense block-diagonal mask."""
    cu_seqlens: torch.Tensor
    row_len: int
    window: int | None = None  # sliding window: each token sees at most this many of its segment, itself included


class AttentionPath(enum.Enum):
    """How a forward pass computes attention, picked once for all layers of a kind by `Llama.attention_inputs`."""
    CAUSAL = "causal"  # no mask; grouped k/v heads repeated for each query head (the plain path)
    CAUSAL_GQA = "causal, grouped k/v heads read in place"  # no mask; SDPA's enable_gqa (RuntimePlan.gqa_in_place)
    MASKED = "masked"  # a dense boolean mask: padding, a KV cache, a sliding window, packed rows on the plain path
    DECODE = "decode"  # one query per row: the queries sharing a k/v head form one block, the cache read in place
    SEGMENTS = "segments"  # packed rows as concatenated segments, no mask (RuntimePlan.varlen)


class AttentionInputs(NamedTuple):
    path: AttentionPath
    mask: torch.Tensor | None = None  # MASKED, DECODE (None: nothing to mask)
    segments: Segments | None = None  # SEGMENTS
    block_mask: object = None  # softcapped layers on FlexAttention (RuntimePlan.flex_softcap): `flex_block_mask`


class Attention(nn.Module):
    """Grouped-query attention. q/k/v as three projections, or Phi-3's one `qkv_proj` (q, then k, then v); with
    `qk_norm`, an RMSNorm over each head's queries and keys before RoPE (Qwen3, Gemma 3); with
    `attn_logit_softcapping`, Gemma 2's capped scores, computed by `softcapped_attention` (SDPA has no cap)."""

    def __init__(self, config: LlamaConfig, layer_idx: int, lora_config: LoRAConfig | None = None):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = (
            config.num_attention_heads, config.num_key_value_heads, config.head_dim)
        h, q_dim, kv_dim = config.hidden_size, self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        self.split = (q_dim, kv_dim, kv_dim)
        if config.fused_projections:
            self.qkv_proj = _linear(h, q_dim + 2 * kv_dim, "qkv_proj", lora_config)
        else:
            self.q_proj = _linear(h, q_dim, "q_proj", lora_config, config.qkv_bias)
            self.k_proj = _linear(h, kv_dim, "k_proj", lora_config, config.qkv_bias)
            self.v_proj = _linear(h, kv_dim, "v_proj", lora_config, config.qkv_bias)
        self.o_proj = _linear(q_dim, h, "o_proj", lora_config, config.o_bias)
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps, config.unit_offset_norm)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps, config.unit_offset_norm)
        self.qk_norm = config.qk_norm
        # None: SDPA's own 1 / sqrt(head_dim); Gemma's query_pre_attn_scalar ** -0.5 otherwise.
        self.scale = None if config.query_pre_attn_scalar is None else config.attention_scale
        self.softcap = config.attn_logit_softcapping

    def project(self, x):
        """q [B, T, heads, D], k and v [B, T, kv_heads, D]."""
        B, T, _ = x.shape
        if hasattr(self, "qkv_proj"):
            q, k, v = self.qkv_proj(x).split(self.split, dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q, k, v = (t.view(B, T, -1, self.head_dim) for t in (q, k, v))
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v

    def forward(self, x, cos, sin, attn: AttentionInputs, cache: "KVCache | None" = None):
        B, T, _ = x.shape
        q, k, v = (t.transpose(1, 2) for t in self.project(x))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        if attn.block_mask is not None:  # given only to softcapped layers
            y = flex_softcapped_attention(q, k, v, attn.block_mask, self.scale or self.head_dim ** -0.5, self.softcap)
        elif self.softcap is not None:  # attention_inputs always gives these layers a mask
            y = softcapped_attention(q, k, v, attn.mask, self.scale or self.head_dim ** -0.5, self.softcap)
        elif attn.path is AttentionPath.SEGMENTS:
            return self.o_proj(varlen_attention(q, k, v, attn.segments, self.scale))
        elif attn.path is AttentionPath.DECODE:
            # A single query may see every key given, so no causal mask is needed beyond the padding mask.
            g = self.n_heads // self.n_kv_heads
            y = F.scaled_dot_product_attention(q.view(B, self.n_kv_heads, g, self.head_dim), k, v,
                                               attn_mask=attn.mask, scale=self.scale)
            return self.o_proj(y.reshape(B, T, -1))
        elif attn.path is AttentionPath.CAUSAL_GQA:
            # The kernel reads each shared k/v head in place (flash attention does): no n_heads/n_kv_heads copies
            # of k and v are made, or kept for the backward pass.
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True, scale=self.scale)
        else:  # CAUSAL, MASKED: each k/v head repeated for the n_heads/n_kv_heads queries it serves
            k = k.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
            v = v.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn.mask, is_causal=attn.mask is None,
                                               scale=self.scale)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


def softcapped_attention(q, k, v, mask, scale: float, cap: float) -> torch.Tensor:
    """Gemma 2's attention, operation by operation as transformers' eager path: scores scaled, capped to
    tanh(s / cap) * cap, masked (bool mask, True = may attend), softmax in float32. q [B, H, T, D], k/v
    [B, KV, S, D] -> [B, H, T, D]."""
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    scores = torch.matmul(q, k.transpose(2, 3)) * scale
    scores = torch.tanh(scores / cap) * cap
    if mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    return torch.matmul(F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype), v)


FLEX_BLOCK = 128  # create_block_mask's default block size, in queries and in keys


def flex_length(n: int) -> int:
    """The length FlexAttention runs `n` queries or keys at: whole blocks of `FLEX_BLOCK`, a power of two of
    them. FlexAttention is compiled once per shape (`runtime.flex_kernel`), so padded batches of any length meet
    a few (7 up to 8192 tokens), and the padding costs no compute: blocks wholly masked are skipped."""
    blocks = -(-n // FLEX_BLOCK)
    return FLEX_BLOCK << (blocks - 1).bit_length()


def flex_block_mask(mask: torch.Tensor, lengths_vary: bool = True):
    """The bool mask [B or 1, 1, T, S] (True = may attend) as FlexAttention's BlockMask, built once per forward
    pass and shared by the layers of a kind, over queries and keys padded to `flex_length` where the run's
    lengths vary (padded batches), else to whole blocks (packed rows: all one length): padded keys masked,
    padded queries seeing nothing (their output is zeros, cut off by `flex_softcapped_attention`).

    The padding is there because compiled FlexAttention (torch 2.13, on a CPU) reads a last partial block of keys
    past the end of k and scores them, and the mask does not fully clear what it scored there (NaN stored after k
    gives NaN rows): the last (sequence, k/v head) slice, whose keys end k's storage, came out wrong or NaN
    (tests/test_family_runtime.py has the reproduction)."""
    _, create_block_mask = flex_kernel()
    B, _, T, S = mask.shape
    def length(n):
        return flex_length(n) if lengths_vary else -(-n // FLEX_BLOCK) * FLEX_BLOCK

    pad_t, pad_s = length(T) - T, length(S) - S
    padded = F.pad(mask, (0, pad_s, 0, pad_t), value=False)

    def mask_mod(b, h, q_idx, kv_idx):
        return padded[b if B > 1 else 0, 0, q_idx, kv_idx]

    return create_block_mask(mask_mod, B, None, T + pad_t, S + pad_s, device=mask.device)


def flex_softcapped_attention(q, k, v, block_mask, scale: float, cap: float) -> torch.Tensor:
    """`softcapped_attention` through FlexAttention (`runtime.flex_kernel`, `RuntimePlan.flex_softcap`): the cap
    as a `score_mod`, the mask as `flex_block_mask`'s padded BlockMask, grouped k/v heads read in place, no
    [B, H, T, S] scores kept. q [B, H, T, D], k/v [B, KV, S, D] -> [B, H, T, D]."""
    flex, _ = flex_kernel()
    H, T, S = q.shape[1], q.shape[2], k.shape[2]
    q_len, kv_len = block_mask.seq_lengths
    q = F.pad(q, (0, 0, 0, q_len - T))
    k, v = F.pad(k, (0, 0, 0, kv_len - S)), F.pad(v, (0, 0, 0, kv_len - S))

    def score_mod(score, b, h, q_idx, kv_idx):
        return torch.tanh(score / cap) * cap

    y = flex(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale, enable_gqa=H != k.shape[1])
    return y[:, :, :T]


def varlen_attention(q, k, v, segments: Segments, scale: float | None = None) -> torch.Tensor:
    """Causal attention within each segment: q [B, H, T, D], k/v [B, KV, T, D] -> [B, T, H * D].

    On CUDA, flash attention over the concatenated segments (`runtime.varlen_kernel`, grouped k/v read in place,
    a sliding window as its `window_size`); elsewhere `varlen_plain`, the same thing one segment at a time
    through SDPA.
    """
    B, H, T, D = q.shape
    q, k, v = (t.transpose(1, 2).reshape(B * T, t.shape[1], D) for t in (q, k, v))
    kernel = varlen_kernel() if q.is_cuda else None
    if kernel is not None:
        y = kernel(q, k, v, segments, scale)
    else:
        y = varlen_plain(q, k, v, segments.cu_seqlens, segments.window, scale)
    return y.reshape(B, T, H * D)


def varlen_plain(q, k, v, cu_seqlens, window: int | None = None, scale: float | None = None) -> torch.Tensor:
    """q [N, H, D], k/v [N, KV, D]: SDPA with a causal (and sliding-window) mask, segment by segment (reads
    cu_seqlens on the host)."""
    bounds = cu_seqlens.tolist()
    out = []
    for s, e in zip(bounds[:-1], bounds[1:], strict=True):
        if e > s:
            mask = None if window is None or e - s <= window else build_attention_mask(e - s, 0, window=window,
                                                                                       device=q.device)[0]
            out.append(F.scaled_dot_product_attention(
                *(t[s:e].transpose(0, 1) for t in (q, k, v)), attn_mask=mask, is_causal=mask is None,
                enable_gqa=k.shape[1] != q.shape[1], scale=scale).transpose(0, 1))
    return torch.cat(out)


def segment_ids(cu_seqlens: torch.Tensor, batch: int, row_len: int) -> torch.Tensor:
    """[batch, row_len]: which segment of `cu_seqlens` each token of the packed rows belongs to."""
    tokens = torch.arange(batch * row_len, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    return (torch.searchsorted(cu_seqlens, tokens, right=True) - 1).view(batch, row_len)


def _gelu_tanh(x):
    return F.gelu(x, approximate="tanh")


ACTIVATIONS = {"silu": F.silu, "gelu_pytorch_tanh": _gelu_tanh}  # transformers' ACT2FN names


class MLP(nn.Module):
    """A gated MLP: down(act(gate(x)) * up(x)), act silu (SwiGLU) or tanh-GELU (Gemma's GeGLU); gate and up as
    two projections, or Phi-3's one `gate_up_proj` (gate first). LoRA lives here from construction when configured.

    `forward(x, fused=True)` runs the SwiGLU LoRA MLP as one autograd function (`tinyllama.lora_mlp`) on the
    gate/up weight `runtime.apply_plan` fused for a plan with `fused_mlp`; `plain` is the modules one by one,
    what runs otherwise (and with LoRA disabled or merged).
    """

    def __init__(self, config: LlamaConfig, lora_config: LoRAConfig | None = None):
        super().__init__()
        h, i = config.hidden_size, config.intermediate_size
        if config.fused_projections:
            self.gate_up_proj = _linear(h, 2 * i, "gate_up_proj", lora_config)
        else:
            self.gate_proj = _linear(h, i, "gate_proj", lora_config)
            self.up_proj = _linear(h, i, "up_proj", lora_config)
        self.down_proj = _linear(i, h, "down_proj", lora_config)
        self.act = ACTIVATIONS[config.hidden_act]
        self.register_buffer("gate_up_weight", None, persistent=False)  # owned by the plan: runtime.apply_plan

    def forward(self, x, fused: bool = False):
        if fused and self.gate_up_weight is not None and all(m.active and not m.merged for m in (
                self.gate_proj, self.up_proj, self.down_proj)):
            return fused_lora_mlp(self, x)
        return self.plain(x)

    def plain(self, x):
        if hasattr(self, "gate_up_proj"):
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
            return self.down_proj(self.act(gate) * up)
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Norm, attention, residual; norm, MLP, residual. With `sandwich_norms` (Gemma) the attention's and the
    MLP's outputs are normed too before their residual: input, post-attention, pre- and post-feedforward norms."""

    def __init__(self, config: LlamaConfig, layer_idx: int, lora_config: LoRAConfig | None = None):
        super().__init__()
        norm = functools.partial(RMSNorm, config.hidden_size, config.rms_norm_eps, config.unit_offset_norm)
        self.input_layernorm = norm()
        self.self_attn = Attention(config, layer_idx, lora_config)
        self.post_attention_layernorm = norm()
        self.sandwich = config.sandwich_norms
        if self.sandwich:
            self.pre_feedforward_layernorm = norm()
            self.post_feedforward_layernorm = norm()
        self.mlp = MLP(config, lora_config)

    def forward(self, x, cos, sin, attn: AttentionInputs, cache=None, fused_mlp: bool = False):
        if not self.sandwich:
            x = x + self.self_attn(self.input_layernorm(x), cos, sin, attn, cache)
            return x + self.mlp(self.post_attention_layernorm(x), fused_mlp)
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin, attn, cache))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x), fused_mlp))


class LlamaBody(nn.Module):
    """Hugging Face's `LlamaModel` (and each family's `*Model`): embeddings, decoder layers, final norm (`model.*`)."""

    def __init__(self, config: LlamaConfig, lora_config: LoRAConfig | None = None):
        super().__init__()
        # On meta, nn.Embedding's normal_ init runs through a decomposition that imports torch._dynamo (about 1 s
        # of every start); a meta weight holds no values to draw, so it is made empty.
        shape = (config.vocab_size, config.hidden_size)
        empty = torch.empty(shape) if torch.get_default_device().type == "meta" else None
        self.embed_tokens = nn.Embedding(*shape, _weight=empty)
        self.layers = nn.ModuleList(DecoderLayer(config, i, lora_config) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.unit_offset_norm)


class Llama(nn.Module):
    """`Llama(config, lora_config=None)`; `model(input_ids) -> logits [batch, seq, vocab]`. Every family of
    `config.FAMILIES` is this model with the options its config names.

    Built on the current default device, so `with torch.device("meta"): Llama(cfg)` costs no memory.
    With a `LoRAConfig`, the targeted projections are `LoRALinear` and everything but `lora_A`/`lora_B` is
    frozen. `plan` (a `runtime.RuntimePlan`, set by `runtime.apply_plan`) is how it runs on this machine: the
    default is the plain path everywhere.
    """

    def __init__(self, config: LlamaConfig, lora_config: LoRAConfig | None = None):
        super().__init__()
        if lora_config is not None:
            check_targets(config, lora_config.targets)
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

    def embed(self, input_ids) -> torch.Tensor:
        x = self.model.embed_tokens(input_ids)
        if self.config.scale_embeddings:  # sqrt(hidden) held in float32 and rounded to the weights' dtype first
            w = self.model.embed_tokens.weight
            x = x * torch.tensor(self.config.hidden_size ** 0.5, device=w.device).to(w.dtype)
        return x

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
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=input_ids.device).expand(B, T)
        x = self.embed(input_ids)
        # RoPE and attention inputs once per kind of layer (full, sliding), shared by the layers of that kind.
        kinds = dict.fromkeys(self.config.layer_types)
        # The layer kinds share one cos/sin unless the sliding layers have a RoPE base of their own (Gemma 3).
        shared = rope_cos_sin(self.config, position_ids, x.dtype) if self.config.rope_local_theta is None else None
        rope = {kind: shared or rope_cos_sin(self.config, position_ids, x.dtype, kind) for kind in kinds}
        attn = {kind: self.attention_inputs(B, T, past, attention_mask, cu_seqlens, cache, plan, input_ids.device,
                                            window=self.config.sliding_window if kind == SLIDING else None)
                for kind in kinds}
        for layer, kind in zip(self.model.layers, self.config.layer_types, strict=True):
            args = (x, *rope[kind], attn[kind], cache, plan.fused_mlp)
            if self.gradient_checkpointing and self.training:
                x = checkpoint(layer, *args, use_reentrant=False)
            else:
                x = layer(*args)
        if cache is not None:
            cache.length += T
        return self.model.norm(x)

    def attention_inputs(self, B: int, T: int, past: int, attention_mask, cu_seqlens, cache, plan: RuntimePlan,
                         device, window: int | None = None) -> AttentionInputs:
        """The attention path of a forward pass for layers with sliding window `window` (None: full attention),
        with its mask or segments. A window no shorter than the keys attended changes nothing, so it is dropped."""
        window = window if window is not None and past + T > window else None
        softcap = self.config.attn_logit_softcapping is not None
        kernel = varlen_kernel() if plan.varlen and device.type == "cuda" else None
        plain_segments = window is None and self.config.query_pre_attn_scalar is None
        windowed_segments = plain_segments or device.type != "cuda" or getattr(kernel, "takes_window", False)
        if (cu_seqlens is not None and plan.varlen and cache is None and attention_mask is None and not softcap
                and windowed_segments):
            return AttentionInputs(AttentionPath.SEGMENTS, segments=Segments(cu_seqlens, T, window))
        document_ids = None if cu_seqlens is None else segment_ids(cu_seqlens, B, T)
        mask = build_attention_mask(T, past, attention_mask, document_ids, device, window=window,
                                    force=cache is not None or softcap or window is not None)
        grouped = self.config.num_key_value_heads != self.config.num_attention_heads
        if grouped and T == 1:
            return AttentionInputs(AttentionPath.DECODE, mask=mask)
        if mask is None:
            return AttentionInputs(AttentionPath.CAUSAL_GQA if grouped and plan.gqa_in_place else AttentionPath.CAUSAL)
        # Not with a cache: decoding's key count grows by one a step, and each new length would compile anew.
        # A CPU trace of a CUDA plan (training.plan) runs the plain path.
        if softcap and plan.flex_softcap and cache is None and device.type == "cuda":
            return AttentionInputs(AttentionPath.MASKED, mask=mask,
                                   block_mask=flex_block_mask(mask, lengths_vary=cu_seqlens is None))
        return AttentionInputs(AttentionPath.MASKED, mask=mask)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM head, and Gemma 2's final softcap: tanh(logits / cap) * cap."""
        return softcap_logits(self.lm_head(hidden), self.config.final_logit_softcapping)

    def forward(self, input_ids, **kwargs) -> torch.Tensor:
        return self.logits(self.hidden_states(input_ids, **kwargs))


def check_targets(config: LlamaConfig, targets) -> None:
    """Refuse LoRA targets that are not projections of this family's model, naming the ones it has."""
    have = config.attention_projections + config.mlp_projections
    wrong = [t for t in targets if t not in have]
    if wrong:
        raise ValueError(f"LoRA target(s) {wrong} are not projections of this {config.model_type} model; its "
                         f"projections are {list(have)} (the MLP: {', '.join(config.mlp_projections)})")


def build_attention_mask(T: int, past: int, attention_mask=None, document_ids=None, device=None,
                         force: bool = False, window: int | None = None):
    """A boolean SDPA mask [B or 1, 1, T, past + T] (True = may attend), or None for plain causal. With a sliding
    `window`, a query sees the `window` keys ending at itself (transformers' masking: the key exactly `window`
    back is masked).

    Every token may always attend to itself, so a padding query never has an empty row (which would give
    NaN); its output is ignored anyway.
    """
    if attention_mask is None and document_ids is None and not force and window is None:
        return None
    q = torch.arange(past, past + T, device=device)
    k = torch.arange(past + T, device=device)
    mask = (k[None, :] <= q[:, None])[None, None]  # causal, [1, 1, T, past+T]
    if window is not None:
        mask = mask & (q[:, None] - k[None, :] < window)[None, None]
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

