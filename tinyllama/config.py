"""`LlamaConfig`: a model's shape and numerics, read from and written to Hugging Face's `config.json`.

`LlamaConfig.from_json(path)` reads what `transformers` writes for `LlamaForCausalLM` and `MistralForCausalLM`
(transformers 4's `rope_scaling` and 5's `rope_parameters` alike) and refuses what this implementation does not
compute (other RoPE types, biases, activations) rather than approximate it; fields that change nothing are
ignored, others with a warning. `to_hf_dict()` writes a config.json transformers reads back as the same model.
"""

from __future__ import annotations

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


# Sizes and counts: each a positive int (JSON's 32.0, "32" and true are refused, not read as 32 or 1).
_POSITIVE_INTS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "max_position_embeddings", "sliding_window")
_OPTIONAL = {"head_dim", "sliding_window"}


def _is_int(value, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


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
        for key in ("rms_norm_eps", "rope_theta"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
                raise ValueError(f"{key} is {value!r}; expected a positive number")
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
            with open(path, encoding="utf-8-sig") as f:  # a byte-order mark is not JSON
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
