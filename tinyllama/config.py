"""`LlamaConfig`: a model's shape and numerics, read from and written to Hugging Face's `config.json`.

Every family computed here is the Llama computation plus options this config names (litgpt's single `Config`
is the pattern): attention biases, per-head q/k norms, Gemma's `(1 + w)` norms, a scaled embedding, the MLP's
activation, norms on both sides of each block, softcaps, a per-layer sliding window and RoPE base, partial
rotary and Phi-3's fused projections. `model_type` says which family a checkpoint is, and so which of those
options its config.json implies (`FAMILIES`):

| model_type | transformers class | adds to Llama |
|---|---|---|
| llama | LlamaForCausalLM | (Llama 2, 3.x, TinyLlama, SmolLM2) |
| mistral | MistralForCausalLM | a sliding window on every layer |
| qwen2 | Qwen2ForCausalLM | q/k/v biases; a window past `max_window_layers` when `use_sliding_window` |
| qwen3 | Qwen3ForCausalLM | q/k norms, explicit head_dim, `attention_bias`; windows as qwen2 |
| gemma2 | Gemma2ForCausalLM | (1 + w) norms, scaled embedding, GeGLU, sandwich norms, softcaps, alternate windows |
| gemma3_text | Gemma3ForCausalLM | Gemma 2's, with q/k norms, 5:1 windows and a local RoPE base |
| phi3 | Phi3ForCausalLM | fused qkv_proj and gate_up_proj, partial rotary, a window on every layer |

`LlamaConfig.from_json(path)` reads what transformers writes (transformers 4's `rope_scaling`, `rope_theta`,
`sliding_window_pattern`, `rope_local_base_freq`, and 5's `rope_parameters` and `layer_types` alike), with each
family's own defaults for the keys its config.json leaves out, and refuses what this implementation does not
compute (other RoPE types, MLP biases, other activations, dropout) rather than approximate it; fields that change
nothing are ignored, others with a warning. `to_hf_dict()` writes a config.json transformers reads back as the
same model.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from dataclasses import dataclass, fields
from pathlib import Path

# config.json keys that carry no information about the computation. The last three are SmolLM2's, left from its
# conversion; transformers' Llama reads none of them.
_HARMLESS_KEYS = {
    "architectures", "transformers_version", "torch_dtype", "dtype", "use_cache",
    "initializer_range", "pad_token_id", "attention_dropout", "_name_or_path", "pretraining_tp",
    "output_attentions", "output_hidden_states", "return_dict", "tokenizer_class", "generation_config",
    "is_llama_config", "rope_interleaved", "transformers.js_config", "auto_map", "cache_implementation",
    "_sliding_window_pattern", "chunk_size_feed_forward", "id2label", "label2id", "is_encoder_decoder",
    "problem_type",
}
FULL, SLIDING = "full_attention", "sliding_attention"  # transformers' layer_types


@dataclass(frozen=True)
class Family:
    """What a model_type implies beyond its config.json's keys: its transformers class, the options it fixes,
    the options its config.json sets (`free`; every other option stays off), and the defaults of transformers'
    config class for the keys a config.json may leave out (transformers writes only the keys that differ)."""
    architecture: str
    options: dict
    free: frozenset
    defaults: dict


_BIAS = frozenset({"qkv_bias", "o_bias"})  # read from attention_bias: all four projections or none
_GEMMA = dict(unit_offset_norm=True, scale_embeddings=True, sandwich_norms=True)
_GEMMA_FREE = _BIAS | {"hidden_act", "query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping"}
_GEMMA_DEFAULTS = dict(vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                       num_attention_heads=8, num_key_value_heads=4, head_dim=256, rms_norm_eps=1e-6,
                       bos_token_id=2, eos_token_id=1, tie_word_embeddings=True, hidden_activation="gelu_pytorch_tanh",
                       query_pre_attn_scalar=256, sliding_window=4096)
_QWEN_DEFAULTS = dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, rms_norm_eps=1e-6,
                      max_position_embeddings=32768, use_sliding_window=False, sliding_window=4096,
                      max_window_layers=28, bos_token_id=None, eos_token_id=None)
FAMILIES: dict[str, Family] = {
    "llama": Family("LlamaForCausalLM", {}, _BIAS,
                    dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                         num_attention_heads=32, rms_norm_eps=1e-6, max_position_embeddings=2048)),
    "mistral": Family("MistralForCausalLM", {}, frozenset(),
                      dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                           num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-6,
                           max_position_embeddings=131072, sliding_window=4096)),
    "qwen2": Family("Qwen2ForCausalLM", dict(qkv_bias=True), frozenset(), _QWEN_DEFAULTS),
    "qwen3": Family("Qwen3ForCausalLM", dict(qk_norm=True), _BIAS, dict(_QWEN_DEFAULTS, head_dim=128)),
    "gemma2": Family("Gemma2ForCausalLM", _GEMMA, _GEMMA_FREE,
                     dict(_GEMMA_DEFAULTS, max_position_embeddings=8192, final_logit_softcapping=30.0,
                          attn_logit_softcapping=50.0, sliding_window_pattern=2)),
    "gemma3_text": Family("Gemma3ForCausalLM", dict(_GEMMA, qk_norm=True), _GEMMA_FREE | {"rope_local_theta"},
                          dict(_GEMMA_DEFAULTS, vocab_size=262208, max_position_embeddings=131072, rope_theta=1e6,
                               rope_local_base_freq=10000.0, sliding_window_pattern=6)),
    "phi3": Family("Phi3ForCausalLM", dict(fused_projections=True), frozenset({"partial_rotary_factor"}),
                   dict(vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
                        num_attention_heads=32, max_position_embeddings=4096, bos_token_id=1, eos_token_id=32000,
                        original_max_position_embeddings=4096)),
}
# The options a family fixes or its config.json sets, each with the value that means "as Llama".
OPTIONS = dict(rope_local_theta=None, partial_rotary_factor=1.0, hidden_act="silu", qkv_bias=False, o_bias=False,
               qk_norm=False, unit_offset_norm=False, scale_embeddings=False, sandwich_norms=False,
               query_pre_attn_scalar=None, attn_logit_softcapping=None, final_logit_softcapping=None,
               fused_projections=False)
# RoPE types computed here (transformers' names) and the parameters each reads; "default" is plain RoPE.
_ROPE_PARAMETERS = {
    "default": (),
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "longrope": ("short_factor", "long_factor", "original_max_position_embeddings"),
}
_ROPE_OPTIONAL = {"longrope": ("factor", "attention_factor")}  # transformers derives them when absent
ACTIVATIONS = ("silu", "gelu_pytorch_tanh")  # transformers' ACT2FN names of SwiGLU's and GeGLU's gate


def _check_rope_type(rope_type, key: str) -> None:
    if rope_type not in _ROPE_PARAMETERS:
        raise ValueError(
            f"{key} has rope_type {rope_type!r}, which is not supported: this implementation computes plain RoPE "
            f"and the types {sorted(set(_ROPE_PARAMETERS) - {'default'})} exactly as transformers does, and "
            "refuses the others (dynamic, yarn, ...) rather than approximate them")


# Sizes and counts: each a positive int (JSON's 32.0, "32" and true are refused, not read as 32 or 1).
_POSITIVE_INTS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "max_position_embeddings", "sliding_window")
_OPTIONAL = {"head_dim", "sliding_window"}
_POSITIVE_NUMBERS = ("rms_norm_eps", "rope_theta", "rope_local_theta", "query_pre_attn_scalar",
                     "attn_logit_softcapping", "final_logit_softcapping")
_OPTIONAL_NUMBERS = {"rope_local_theta", "query_pre_attn_scalar", "attn_logit_softcapping",
                     "final_logit_softcapping"}
_FLAGS = ("tie_word_embeddings", "qkv_bias", "o_bias", "qk_norm", "unit_offset_norm", "scale_embeddings",
          "sandwich_norms", "fused_projections")


def _is_int(value, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _is_number(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and 0 < value < float("inf")


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
    # With a local base (Gemma 3) it applies to the full-attention layers only.
    rope_scaling: dict | None = None
    model_type: str = "llama"  # the family (FAMILIES): how the checkpoint is named and saved
    # Each token attends to at most this many tokens, itself included, on the layers `layer_types` marks
    # "sliding_attention". None: no window.
    sliding_window: int | None = None
    # Per layer, "full_attention" or "sliding_attention" (transformers' names). None: every layer slides when
    # there is a window (Mistral, Phi-3), none otherwise.
    layer_types: list[str] | None = None
    rope_local_theta: float | None = None  # Gemma 3: the sliding layers' RoPE base (None: rope_theta everywhere)
    partial_rotary_factor: float = 1.0  # Phi-3/4: the first head_dim * factor channels rotate, the rest pass
    hidden_act: str = "silu"  # the MLP gate's activation: silu (SwiGLU) or gelu_pytorch_tanh (GeGLU)
    qkv_bias: bool = False  # q_proj, k_proj and v_proj have a bias (Qwen2; attention_bias)
    o_bias: bool = False  # o_proj has a bias (attention_bias)
    qk_norm: bool = False  # q_norm / k_norm: RMSNorm over head_dim, per head, before RoPE (Qwen3, Gemma 3)
    # Gemma's RMSNorm: normalise and scale by (1 + w) in float32, one cast at the end (weights start at zero).
    unit_offset_norm: bool = False
    scale_embeddings: bool = False  # Gemma: embeddings times sqrt(hidden_size), rounded to the weights' dtype
    sandwich_norms: bool = False  # Gemma: a norm after attention and one each side of the MLP
    query_pre_attn_scalar: float | None = None  # attention scale is this ** -0.5 (None: head_dim ** -0.5)
    attn_logit_softcapping: float | None = None  # Gemma 2: scores become tanh(s / cap) * cap before the mask
    final_logit_softcapping: float | None = None  # the same on the output logits
    fused_projections: bool = False  # Phi-3: qkv_proj (q, k, v) and gate_up_proj (gate, up) as one weight each

    def __post_init__(self):
        for key in _POSITIVE_INTS:
            value = getattr(self, key)
            if not (value is None and key in _OPTIONAL) and not _is_int(value, minimum=1):
                raise ValueError(f"{key} is {value!r}; expected a positive integer{' or null' * (key in _OPTIONAL)}")
        for key in ("bos_token_id", "eos_token_id"):
            value = getattr(self, key)
            ids = value if key == "eos_token_id" and isinstance(value, list) else [value]
            if value is not None and not (ids and all(_is_int(i, minimum=0) for i in ids)):
                raise ValueError(f"{key} is {value!r}; expected a token id (an integer, 0 or more) or null"
                                 + (", or a list of them" if key == "eos_token_id" else ""))
        for key in _POSITIVE_NUMBERS:
            value = getattr(self, key)
            if not (value is None and key in _OPTIONAL_NUMBERS) and not _is_number(value):
                raise ValueError(f"{key} is {value!r}; expected a positive number"
                                 + " or null" * (key in _OPTIONAL_NUMBERS))
        for key in _FLAGS:
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"{key} is {getattr(self, key)!r}; expected true or false")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act is {self.hidden_act!r}; supported: {list(ACTIVATIONS)}")
        if self.model_type not in FAMILIES:
            raise ValueError(f"model_type is {self.model_type!r}; supported: {sorted(FAMILIES)} (Llama 2 and 3, "
                             "TinyLlama, SmolLM2, Mistral, Qwen 2.5 and 3, Gemma 2 and 3 (text), Phi-3 and Phi-4-mini)")
        family = FAMILIES[self.model_type]
        for key, plain in OPTIONS.items():
            value, expected = getattr(self, key), family.options.get(key, plain)
            if key not in family.free and value != expected:
                raise ValueError(f"{key}={value!r} is not part of {family.architecture} (model_type "
                                 f"{self.model_type!r} computes {key}={expected!r})")
        if self.qkv_bias != self.o_bias and self.model_type != "qwen2":
            raise ValueError(f"qkv_bias={self.qkv_bias} and o_bias={self.o_bias}: {family.architecture} has "
                             "attention_bias on all four projections or none")
        if self.model_type == "llama" and self.sliding_window is not None:
            raise ValueError(f"sliding_window={self.sliding_window!r}: LlamaForCausalLM has no sliding window "
                             "(use model_type 'mistral', or None for no window)")
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
        if not (isinstance(self.partial_rotary_factor, (int, float)) and 0 < self.partial_rotary_factor <= 1):
            raise ValueError(f"partial_rotary_factor is {self.partial_rotary_factor!r}; expected a number in (0, 1]")
        if self.rotary_dim % 2 or self.rotary_dim == 0:
            raise ValueError(f"the rotated channels (head_dim {self.head_dim} x partial_rotary_factor "
                             f"{self.partial_rotary_factor} = {self.rotary_dim}) must be a positive even number")
        if self.layer_types is None:
            self.layer_types = [SLIDING if self.sliding_window is not None else FULL] * self.num_hidden_layers
        self.layer_types = list(self.layer_types)
        if len(self.layer_types) != self.num_hidden_layers or not set(self.layer_types) <= {FULL, SLIDING}:
            raise ValueError(f"layer_types must list {FULL!r} or {SLIDING!r} for each of the "
                             f"{self.num_hidden_layers} layers, got {self.layer_types!r}")
        if SLIDING in self.layer_types and self.sliding_window is None:
            raise ValueError(f"layer_types marks layers {SLIDING!r} but sliding_window is null: give the window")
        if self.rope_scaling is not None:
            rope_type = self.rope_scaling.get("rope_type")
            _check_rope_type(rope_type, "rope_scaling")
            if rope_type == "default":
                raise ValueError("rope_scaling: plain RoPE is rope_scaling=None, not rope_type 'default'")
            missing = [k for k in _ROPE_PARAMETERS[rope_type] if k not in self.rope_scaling]
            if missing:
                raise ValueError(f"rope_scaling={self.rope_scaling!r}: rope_type {rope_type!r} needs the parameters "
                                 f"{list(_ROPE_PARAMETERS[rope_type])}; missing {missing}")
            if rope_type == "longrope":
                for name in ("short_factor", "long_factor"):
                    factors = self.rope_scaling[name]
                    if not (isinstance(factors, list) and len(factors) == self.rotary_dim // 2
                            and all(_is_number(f) for f in factors)):
                        raise ValueError(f"rope_scaling {name} must list {self.rotary_dim // 2} positive numbers "
                                         f"(one per rotated channel pair), got {factors!r}")

    @property
    def rotary_dim(self) -> int:
        """How many channels of each head RoPE rotates (transformers: int(head_dim * partial_rotary_factor))."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def attention_projections(self) -> tuple[str, ...]:
        """The attention's projection modules, by the checkpoint's own names (LoRA targets)."""
        return ("qkv_proj", "o_proj") if self.fused_projections else ("q_proj", "k_proj", "v_proj", "o_proj")

    @property
    def mlp_projections(self) -> tuple[str, ...]:
        """The MLP's projection modules, by the checkpoint's own names: "the MLP" as a LoRA target."""
        return ("gate_up_proj", "down_proj") if self.fused_projections else ("gate_proj", "up_proj", "down_proj")

    @property
    def attention_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    def with_layers(self, n: int, **changes) -> "LlamaConfig":
        """This config with `n` layers (and `changes`): the layer kinds cut, or repeated in their order, to `n`."""
        kinds = [self.layer_types[i % len(self.layer_types)] for i in range(n)]
        return dataclasses.replace(self, num_hidden_layers=n, layer_types=kinds, **changes)

    def window(self, layer_idx: int) -> int | None:
        """The sliding window of layer `layer_idx`, or None where it attends to everything before it."""
        return self.sliding_window if self.layer_types[layer_idx] == SLIDING else None

    def rope_theta_of(self, layer_idx: int) -> float:
        """The RoPE base of layer `layer_idx`: Gemma 3's sliding layers have their own."""
        if self.rope_local_theta is not None and self.layer_types[layer_idx] == SLIDING:
            return self.rope_local_theta
        return self.rope_theta

    @classmethod
    def from_dict(cls, d: dict) -> "LlamaConfig":
        d = dict(d)
        model_type = d.setdefault("model_type", "llama")
        if model_type == "gemma3":
            raise ValueError("config.json: model_type is 'gemma3', Gemma 3's image-text model (4B and up): only "
                             "its text model (model_type 'gemma3_text', e.g. gemma-3-1b) is supported here")
        if model_type not in FAMILIES:
            raise ValueError(f"config.json: model_type is {model_type!r}; supported: {sorted(FAMILIES)}")
        family = FAMILIES[model_type]
        for key, value in family.defaults.items():
            d.setdefault(key, value)
        if d.get("num_key_value_heads") is None:  # older configs; transformers reads one k/v head per query head
            d["num_key_value_heads"] = d.get("num_attention_heads", cls.num_attention_heads)
        cls._refuse_unsupported(d, model_type)
        d["rope_scaling"] = cls._rope_scaling_from_dict(d)
        if model_type == "phi3":
            d.pop("original_max_position_embeddings", None)  # read by longrope alone, taken into rope_scaling
        d.update(family.options)
        if "qkv_bias" in family.free:
            d["qkv_bias"] = d["o_bias"] = d.pop("attention_bias", False)
        if "hidden_activation" in d:  # Gemma's key for the MLP's activation
            d["hidden_act"] = d.pop("hidden_activation")
        cls._windows_from_dict(d, model_type)
        if isinstance(d.get("bos_token_id"), list):  # some configs list several; the first is the main one
            d["bos_token_id"] = d["bos_token_id"][0]
        names = {f.name for f in fields(cls)} - set(OPTIONS) | family.free | set(family.options)
        if model_type == "llama":
            names -= {"sliding_window", "layer_types"}  # transformers' Llama reads no window, so neither do we
        unknown = sorted(k for k in d if k not in names and k not in _HARMLESS_KEYS)
        if unknown:
            warnings.warn(f"config.json: ignoring fields this implementation does not read: {unknown}", stacklevel=2)
        return cls(**{k: v for k, v in d.items() if k in names})

    @staticmethod
    def _refuse_unsupported(d: dict, model_type: str) -> None:
        """Refuse, in one line, a config.json key whose value asks for something not computed here."""
        fixed = {"mlp_bias": False, "use_bidirectional_attention": False, "resid_pdrop": 0.0, "embd_pdrop": 0.0}
        for key, supported in fixed.items():
            value = d.pop(key, supported)
            if value != supported and not (value is None and supported is False):  # Gemma 2 writes null
                raise ValueError(f"config.json: {key}={value!r} is not supported "
                                 f"(this implementation needs {key}={supported!r})")
        if d.get("attention_dropout", 0.0) != 0.0:
            raise ValueError(f"config.json: attention_dropout={d['attention_dropout']!r} is not supported (this "
                             "implementation has no dropout in the base model; it needs 0)")
        if model_type in ("gemma2", "gemma3_text"):
            d.pop("hidden_act", None)  # Gemma's MLP reads hidden_activation; its config.json often has both
        elif d.pop("hidden_act", "silu") != "silu":
            raise ValueError(f"config.json: hidden_act is not supported (this implementation needs "
                             f"hidden_act='silu' for {FAMILIES[model_type].architecture})")

    @staticmethod
    def _windows_from_dict(d: dict, model_type: str) -> None:
        """Set d's sliding_window and layer_types as transformers' config class for `model_type` decides them
        (from use_sliding_window / max_window_layers, sliding_window_pattern, or layer_types as written)."""
        pattern = d.pop("sliding_window_pattern", None)
        if model_type in ("qwen2", "qwen3"):
            use, first = d.pop("use_sliding_window"), d.pop("max_window_layers")
            if not use:
                d["sliding_window"] = None  # recorded in the Hub's configs, unused (as transformers does)
            if d.get("layer_types") is None:
                d["layer_types"] = [SLIDING if d["sliding_window"] is not None and i >= first else FULL
                                    for i in range(d["num_hidden_layers"])]
        elif model_type in ("gemma2", "gemma3_text") and d.get("layer_types") is None:
            if not _is_int(pattern, minimum=1):
                raise ValueError(f"config.json: sliding_window_pattern is {pattern!r}; expected a positive integer")
            d["layer_types"] = [SLIDING if (i + 1) % pattern else FULL for i in range(d["num_hidden_layers"])]
        elif model_type in ("mistral", "phi3") and "layer_types" in d:
            raise ValueError(f"config.json: layer_types is not read by {FAMILIES[model_type].architecture}, which "
                             "slides on every layer when sliding_window is set")

    @staticmethod
    def _rope_scaling_from_dict(d: dict) -> dict | None:
        """Pop RoPE's settings from a config.json dict `d` (setting d["rope_theta"], and for Gemma 3
        d["rope_local_theta"] and d["partial_rotary_factor"]) and return `rope_scaling`.

        Read as transformers reads them: transformers >= 5 writes `rope_parameters` (with rope_theta inside, and
        for Gemma 3 one dict per layer type), older versions `rope_scaling` (with "type" or "rope_type") and a
        top-level rope_theta (and Gemma 3's rope_local_base_freq). A non-null rope_scaling wins over
        rope_parameters, and a rope_theta inside the dict over the top-level one.
        """
        scaling, parameters = d.pop("rope_scaling", None), d.pop("rope_parameters", None)
        local = d.pop("rope_local_base_freq", None)
        if parameters and FULL in parameters:  # transformers 5's per-layer-type RoPE (Gemma 3)
            sliding = dict(parameters.get(SLIDING) or {})
            if sliding.pop("rope_type", "default") != "default" or set(sliding) - {"rope_theta"}:
                raise ValueError(f"config.json: rope_parameters[{SLIDING!r}] is {parameters.get(SLIDING)!r}; only "
                                 "plain RoPE (a rope_theta) is supported on the sliding layers")
            local = sliding.get("rope_theta", local)
            parameters = parameters[FULL]
        if local is not None:
            d["rope_local_theta"] = local
        key = "rope_scaling" if scaling else "rope_parameters"
        rope = dict(scaling or parameters or {})
        if "rope_theta" in rope:
            d["rope_theta"] = rope.pop("rope_theta")
        if "partial_rotary_factor" in rope:
            d["partial_rotary_factor"] = rope.pop("partial_rotary_factor")
        legacy_type = rope.pop("type", "default")
        rope_type = rope.pop("rope_type", legacy_type)
        if rope_type in ("su", "yarn") and d.get("model_type") == "phi3":
            rope_type = "longrope"  # transformers' Phi-3 reads the older spellings as longrope
        _check_rope_type(rope_type, f"config.json: {key}")
        if rope_type in ("llama3", "longrope"):  # transformers: a top-level value wins, else the context length
            rope["original_max_position_embeddings"] = d.pop(
                "original_max_position_embeddings",
                rope.get("original_max_position_embeddings", d.get("max_position_embeddings")))
        wanted, optional = _ROPE_PARAMETERS[rope_type], _ROPE_OPTIONAL.get(rope_type, ())
        missing = [k for k in wanted if rope.get(k) is None]
        if missing:
            raise ValueError(f"config.json: {key} of rope_type {rope_type!r} needs {list(wanted)}; "
                             f"missing {missing}")
        ignored = sorted(set(rope) - set(wanted) - set(optional))
        if ignored:
            warnings.warn(f"config.json: ignoring {key} fields that rope_type {rope_type!r} does not read: "
                          f"{ignored}", stacklevel=3)
        given = tuple(k for k in optional if rope.get(k) is not None)
        return None if rope_type == "default" else {"rope_type": rope_type, **{k: rope[k] for k in wanted + given}}

    @classmethod
    def from_json(cls, path: str | Path) -> "LlamaConfig":
        try:
            with open(path, encoding="utf-8-sig") as f:  # a byte-order mark is not JSON
                return cls.from_dict(json.load(f))
        except ValueError as e:  # not JSON, or a field this implementation refuses
            raise ValueError(f"{path}: {e}") from None

    def to_hf_dict(self) -> dict:
        """A `config.json` that `transformers` reads back as this config, for the family's class.

        RoPE is written the pre-5 way (top-level rope_theta, `rope_scaling` with rope_type, Gemma 3's
        rope_local_base_freq), which transformers 5 still reads and older versions read too; layer_types is
        written where the family reads it (transformers 5 does; older versions derive the same list).
        """
        family = FAMILIES[self.model_type]
        own = {"vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta", "max_position_embeddings",
               "tie_word_embeddings", "bos_token_id", "eos_token_id", "model_type"}
        d = {name: getattr(self, name) for name in own}
        # A copy: transformers writes rope_theta into the rope_scaling dict it is given.
        d["rope_scaling"] = None if self.rope_scaling is None else dict(self.rope_scaling)
        d["architectures"] = [family.architecture]
        gemma = self.model_type in ("gemma2", "gemma3_text")
        d["hidden_activation" if gemma else "hidden_act"] = self.hidden_act
        if self.model_type in ("llama", "qwen3") or gemma:
            d["attention_bias"] = self.qkv_bias
        if self.model_type == "llama":
            d["mlp_bias"] = False
        else:
            d["sliding_window"] = self.sliding_window
        if self.model_type in ("qwen2", "qwen3"):
            d.update(use_sliding_window=self.sliding_window is not None, layer_types=self.layer_types)
            first = self.layer_types.index(SLIDING) if SLIDING in self.layer_types else None
            if first is not None and SLIDING not in self.layer_types[:first] and FULL not in self.layer_types[first:]:
                d["max_window_layers"] = first  # what transformers before layer_types reads them from
        if gemma:
            d.update(layer_types=self.layer_types, query_pre_attn_scalar=self.query_pre_attn_scalar,
                     final_logit_softcapping=self.final_logit_softcapping,
                     attn_logit_softcapping=self.attn_logit_softcapping)
        if self.model_type == "gemma3_text":
            d["rope_local_base_freq"] = self.rope_local_theta
            # Read by transformers before layer_types; its default (6) would be another model where they differ.
            pattern = self.layer_types.index(FULL) + 1 if FULL in self.layer_types else None
            if pattern and self.layer_types == [SLIDING if (i + 1) % pattern else FULL
                                                for i in range(self.num_hidden_layers)]:
                d["sliding_window_pattern"] = pattern
        if self.model_type == "phi3":
            d["partial_rotary_factor"] = self.partial_rotary_factor
            if self.rope_scaling is not None and "original_max_position_embeddings" in self.rope_scaling:
                d["original_max_position_embeddings"] = self.rope_scaling["original_max_position_embeddings"]
        return d

    @property
    def context_length(self) -> int:
        """The most tokens one sequence may hold: the model's positions."""
        return self.max_position_embeddings
