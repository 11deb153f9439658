"""NF4: the frozen base projections stored in 4 bits (QLoRA, https://arxiv.org/abs/2305.14314), in plain PyTorch.

Storage, exactly as bitsandbytes' `quantize_4bit(w, blocksize=64, quant_type="nf4")` stores it: the weight,
flattened row-major, is cut into blocks of 64 values; each block keeps its largest magnitude (`absmax`, float32)
and each value becomes the index of the nearest of the 16 NormalFloat4 codes (`NF4_CODE`) to value / absmax,
ties to the lower code; two indices per byte, the even element in the high nibble. With double quantisation
(`double_quant=True`, bitsandbytes' `compress_statistics`), the absmax values, less their mean (`offset`), are
themselves quantised to 8 bits in blocks of 256 with bitsandbytes' signed dynamic map (`dynamic_code()`), keeping
one float32 scale per block of 256 (`nested_absmax`). About 4.5 bits a weight, or 4.127 with double quantisation.

The 8-bit step follows bitsandbytes' CPU kernel, which picks a code through a 65536-entry lookup table over
[-1, 1] rather than by exact nearest neighbour (`_DynamicLookup`); `tests/test_quant.py` compares packed codes,
absmax, offset, nested codes and nested absmax with bitsandbytes bit for bit, and the dequantised values too.
The same operations run on a GPU; there the double-quantisation offset (a float32 mean) may differ from the
CPU's in its last bit, the reduction order being the device's.

A quantised projection (`NF4Linear`, or `NF4LoRALinear` with an adapter) dequantises its weight inside the
forward pass and again in the backward pass (`nf4_linear`, a custom autograd function that saves the packed
weight, never the dense one, and computes no weight gradient: the base is frozen). Dequantisation is a handful
of elementwise tensor ops with static shapes and no host synchronisation, which torch.compile fuses into one
kernel per weight; `tests/test_quant.py` checks it against autograd through the dense dequantised weight.
The fused LoRA MLP (`tinyllama.lora_mlp`) takes dense weights only: an NF4 MLP runs on the plain modules.

Left out: FP4 and other 4-bit types, quantised embeddings, norms or LM head (they stay in the compute dtype),
merging an adapter into a quantised base (merge into the unquantised checkpoint instead), and saving a
quantised checkpoint in bitsandbytes' on-disk format. DoRA works on a quantised base (QDoRA): its norms read
the dequantised weight (`base_weight`), its products go through `nf4_linear` (`base_linear`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from lora.config import TARGET_NAMES, LoRAConfig
from lora.layer import LoRALinear

QUANTIZE_CHOICES = ("nf4",)
# The projections `quantize="nf4"` stores in 4 bits: every linear layer of a decoder block, by the names a LoRA
# adapter may target. Embeddings, norms and the LM head keep the compute dtype.
PROJECTIONS = TARGET_NAMES
# bitsandbytes' block sizes for 4-bit quantisation; its double quantisation always uses blocks of 256.
BLOCK_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCK_SIZE = 256

# The NormalFloat4 codes, bitsandbytes' `get_4bit_type("nf4")` (quantiles of N(0, 1) scaled to [-1, 1]).
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)


class NF4Weight(NamedTuple):
    """A weight quantised by `nf4_quantize`. All tensors on the weight's device.

    - `packed`: uint8 [ceil(n / 2)], n = shape.numel(); byte i holds element 2i in its high nibble and 2i + 1
      in its low nibble, each an index into `code` (bitsandbytes' packed tensor, which is [n / 2, 1], flattened).
    - `absmax`: one scale per block of `block_size` values, [ceil(n / block_size)]: float32 the block's largest
      magnitude, or with double quantisation uint8 indices into `nested_code`.
    - `shape`: the dense weight's shape, [out_features, in_features] for a linear layer.
    - `block_size`: values per absmax (64 unless chosen).
    - `code`: float32 [16], the NF4 values (`NF4_CODE`).
    - `offset`: float32 [] (double quantisation only): the mean of the float32 absmax, subtracted before
      quantising it.
    - `nested_absmax`: float32 [ceil(blocks / 256)] (double quantisation only): the largest magnitude of each
      block of 256 centred absmax values.
    - `nested_code`: float32 [256] (double quantisation only): bitsandbytes' signed dynamic map (`DYNAMIC_CODE`).
    """
    packed: torch.Tensor
    absmax: torch.Tensor
    shape: torch.Size
    block_size: int
    code: torch.Tensor
    offset: torch.Tensor | None = None
    nested_absmax: torch.Tensor | None = None
    nested_code: torch.Tensor | None = None

    @property
    def double_quant(self) -> bool:
        return self.offset is not None


def check_quantize(quantize: str | None) -> str | None:
    """`quantize` as given ("nf4"), None for None or "none"; anything else refused, naming the choices."""
    if quantize is None or quantize == "none":
        return None
    if quantize not in QUANTIZE_CHOICES:
        raise ValueError(f"unknown quantize={quantize!r}: the choices are {list(QUANTIZE_CHOICES)} (or None for the "
                         "compute dtype)")
    return quantize


def dynamic_code() -> torch.Tensor:
    """bitsandbytes' `create_dynamic_map(signed=True)` (8 bits, up to 7 exponent bits), built as it builds it, in
    float32 on the CPU: 256 sorted values in [-1, 1] that are dense near 0."""
    data, max_exponent_bits, non_sign_bits = [], 7, 7
    for i in range(max_exponent_bits):
        boundaries = torch.linspace(0.1, 1, 2 ** (i + non_sign_bits - max_exponent_bits) + 1, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    data += [0, 1.0]
    return torch.tensor(sorted(data), dtype=torch.float32)


class _DynamicLookup:
    """How bitsandbytes' CPU kernel (csrc/cpu_ops.cpp, `quantize_cpu_impl`) rounds a value v in [-1, 1] to a code
    of a sorted 256-entry map: v goes to one of 65536 evenly spaced steps, i = trunc((v + 1) / 2 * 65535 + 0.5),
    and step i to the number of midpoints between codes that lie below -1 + 2i / 65535. Near 0, where the
    dynamic map's codes are closer together than a step, this is not always the nearest code; reproduced here
    so that the codes are bitsandbytes'. The table is built once on the CPU in float32 (as the kernel does)."""

    def __init__(self, code: torch.Tensor):
        steps = torch.arange(65536, dtype=torch.float32)
        grid = -1.0 + (2.0 * steps) / torch.tensor(65535.0)  # tensor / tensor: correctly rounded on every device
        self.table = torch.searchsorted(0.5 * (code[:-1] + code[1:]), grid).to(torch.uint8)

    def __call__(self, scaled: torch.Tensor) -> torch.Tensor:
        """uint8 codes of float32 values in [-1, 1]."""
        step = ((scaled + 1.0) * 0.5 * 65535.0 + 0.5).to(torch.int64)
        return self.table.to(scaled.device)[step]


_DYNAMIC = None  # (code, lookup), built on first use


def _dynamic():
    global _DYNAMIC
    if _DYNAMIC is None:
        code = dynamic_code()
        _DYNAMIC = code, _DynamicLookup(code)
    return _DYNAMIC


def _scale_blocks(values: torch.Tensor, scales: torch.Tensor, block_size: int) -> torch.Tensor:
    """values [n] float32 times the scale of their block (scales [ceil(n / block_size)]); a last, shorter block
    takes the last scale."""
    n = values.numel()
    pad = scales.numel() * block_size - n
    if pad:
        values = F.pad(values, (0, pad))
    return (values.view(-1, block_size) * scales.view(-1, 1)).view(-1)[:n]


@torch.no_grad()
def nf4_quantize(weight: torch.Tensor, block_size: int = 64, double_quant: bool = False) -> NF4Weight:
    """Quantise `weight` (float32, bfloat16 or float16, any shape) to NF4 on its device; see `NF4Weight`.

    bitsandbytes' `quantize_4bit(weight, blocksize=block_size, quant_type="nf4", compress_statistics=double_quant)`
    operation for operation: values in float32, multiplied by the reciprocal of their block's absmax (a last,
    shorter block divided by its absmax), clamped to [-1, 1], and given the index of the first code whose
    midpoint with the next code is not below them (`torch.bucketize`), so a value on a midpoint takes the
    lower code.
    """
    if weight.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"nf4_quantize takes a float32, bfloat16 or float16 weight, got {weight.dtype}")
    if block_size not in BLOCK_SIZES:
        raise ValueError(f"NF4 block_size must be one of {list(BLOCK_SIZES)} (bitsandbytes' sizes), got {block_size}")
    if weight.numel() == 0:
        raise ValueError(f"nf4_quantize needs a weight with values, got shape {tuple(weight.shape)}")
    device = weight.device
    code = torch.tensor(NF4_CODE, dtype=torch.float32, device=device)
    flat = weight.reshape(-1).float()
    n = flat.numel()
    full = n - n % block_size
    blocks = flat[:full].view(-1, block_size)
    absmax = blocks.abs().amax(dim=1)
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38)).view(-1, 1)).clamp_(-1, 1).view(-1)
    if full < n:  # bitsandbytes divides the last, shorter block, and keeps its absmax clamped away from 0
        last = flat[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, last.view(1)])
        scaled = torch.cat([scaled, (flat[full:] / last).clamp_(-1, 1)])
    del flat, blocks
    if n % 2:
        scaled = F.pad(scaled, (0, 1))
    index = torch.bucketize(scaled, (code[:-1] + code[1:]) / 2, out_int32=True).to(torch.uint8)
    del scaled
    packed = (index[0::2] << 4) | index[1::2]
    if not double_quant:
        return NF4Weight(packed, absmax, weight.shape, block_size, code)
    offset = absmax.mean()
    nested, nested_absmax = _quantize_dynamic(absmax - offset)
    return NF4Weight(packed, nested, weight.shape, block_size, code, offset, nested_absmax,
                     _dynamic()[0].to(device))


def _quantize_dynamic(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bitsandbytes' `quantize_blockwise(values, blocksize=256)` (its CPU kernel): uint8 codes of the dynamic map
    and float32 absmax per block of 256. A block of zeros gets code 0 (as the kernel leaves it)."""
    n = values.numel()
    blocks = F.pad(values, (0, -n % NESTED_BLOCK_SIZE)).view(-1, NESTED_BLOCK_SIZE)
    absmax = blocks.abs().amax(dim=1)
    inverse = torch.where(absmax > 0, 1.0 / absmax, 0.0)
    codes = _dynamic()[1]((blocks * inverse.view(-1, 1)).clamp_(-1, 1))
    codes = torch.where(absmax.view(-1, 1) > 0, codes, 0).to(torch.uint8)
    return codes.view(-1)[:n], absmax


def nf4_absmax(weight: NF4Weight) -> torch.Tensor:
    """The float32 absmax per block; with double quantisation, dequantised as bitsandbytes does it: the code
    times its block's scale, then the offset added (two roundings, in that order)."""
    if not weight.double_quant:
        return weight.absmax
    scaled = _scale_blocks(weight.nested_code[weight.absmax.int()], weight.nested_absmax, NESTED_BLOCK_SIZE)
    return scaled + weight.offset


def nf4_dequantize(weight: NF4Weight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The dense weight in `dtype`: each code's value times its block's absmax in float32, then rounded to
    `dtype` once (bitsandbytes' `dequantize_4bit`)."""
    n = math.prod(weight.shape)
    index = torch.stack([weight.packed >> 4, weight.packed & 0xF], dim=-1).view(-1)
    values = weight.code[index.int()]
    return _scale_blocks(values[:n], nf4_absmax(weight), weight.block_size).to(dtype).view(weight.shape)


class _NF4Matmul(torch.autograd.Function):
    """y = x W^T with W = nf4_dequantize(weight, dtype), dequantised in forward and again in backward: only the
    packed weight is saved. Gradient for x only (the weight is frozen)."""

    @staticmethod
    def forward(ctx, x, dtype, shape, block_size, packed, absmax, code, offset, nested_absmax, nested_code):
        weight = NF4Weight(packed, absmax, shape, block_size, code, offset, nested_absmax, nested_code)
        ctx.save_for_backward(packed, absmax, code, offset, nested_absmax, nested_code)
        ctx.dtype, ctx.shape, ctx.block_size = dtype, shape, block_size
        return F.linear(x, nf4_dequantize(weight, dtype))

    @staticmethod
    def backward(ctx, grad_y):
        grad_x = None
        if ctx.needs_input_grad[0]:
            packed, absmax, code, offset, nested_absmax, nested_code = ctx.saved_tensors
            weight = NF4Weight(packed, absmax, ctx.shape, ctx.block_size, code, offset, nested_absmax, nested_code)
            grad_x = grad_y @ nf4_dequantize(weight, ctx.dtype)
        return grad_x, None, None, None, None, None, None, None, None, None


def _compute_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.dtype:
    """The dtype a dense F.linear would compute in: autocast's, when it is on, else `dtype`."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return dtype


def nf4_linear(x: torch.Tensor, weight: NF4Weight, dtype: torch.dtype) -> torch.Tensor:
    """F.linear(x, nf4_dequantize(weight, dtype)) without keeping the dense weight for backward (`_NF4Matmul`).
    `dtype` is the model's compute dtype; under autocast the matmul runs in autocast's dtype, as F.linear's
    would, and the weight is dequantised straight to it."""
    dtype = _compute_dtype(x, dtype)
    with torch.autocast(x.device.type, enabled=False):
        return _NF4Matmul.apply(x.to(dtype), dtype, tuple(weight.shape), weight.block_size, weight.packed,
                                weight.absmax, weight.code, weight.offset, weight.nested_absmax, weight.nested_code)


# Buffer names of a quantised weight in a module (and so in its state_dict): `weight_packed`, `weight_absmax`, ...
_BUFFERS = ("packed", "absmax", "code", "offset", "nested_absmax", "nested_code")


class NF4Storage:
    """What a quantised projection adds to its module: the `NF4Weight` as buffers `weight_<field>`, the dense
    shape and block size, the compute dtype, and a `weight` attribute that says where the weight went."""

    def _store(self, weight: NF4Weight, dtype: torch.dtype) -> None:
        for name in _BUFFERS:
            self.register_buffer(f"weight_{name}", getattr(weight, name))
        self.weight_shape, self.block_size, self.compute_dtype = torch.Size(weight.shape), weight.block_size, dtype

    def nf4_weight(self) -> NF4Weight:
        return NF4Weight(self.weight_packed, self.weight_absmax, self.weight_shape, self.block_size,
                         self.weight_code, self.weight_offset, self.weight_nested_absmax, self.weight_nested_code)

    def storage(self) -> dict[str, torch.Tensor]:
        """The tensors that hold the quantised weight (buffers; frozen parameters once `storage_as_parameters`
        made them shardable), by attribute name."""
        return {f"weight_{n}": t for n in _BUFFERS if (t := getattr(self, f"weight_{n}")) is not None}

    def storage_as_parameters(self) -> None:
        """Make the per-weight tensors (packed values and block scales) frozen parameters instead of buffers, so
        that FSDP, which shards parameters only, shards them (`training.fsdp`); the 16- and 256-entry code
        tables and the offset stay buffers."""
        for name in ("weight_packed", "weight_absmax", "weight_nested_absmax"):
            t = self._buffers.get(name)
            if t is not None:  # None (no double quantisation) stays a buffer of None
                del self._buffers[name]
                self.register_parameter(name, nn.Parameter(t, requires_grad=False))

    @property
    def quantized_weight_count(self) -> int:
        """How many weights the module stands for beyond its parameters (`lora.count_parameters` counts them)."""
        return self.weight_shape.numel()

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense frozen weight [out, in] in `dtype` (default: the compute dtype): a new tensor."""
        return nf4_dequantize(self.nf4_weight(), dtype or self.compute_dtype)

    def __getattr__(self, name: str):
        if name == "weight" and any("weight_packed" in self.__dict__.get(d, {}) for d in ("_buffers", "_parameters")):
            raise AttributeError(
                f"{type(self).__name__} keeps its frozen weight in NF4 (buffers weight_packed, weight_absmax, ...), "
                "not as a dense `weight`: use .dequantize(dtype) for a dense copy, or load the model without "
                "quantize for dense weights")
        return super().__getattr__(name)

    def _nf4_repr(self) -> str:
        return f"nf4, block_size={self.block_size}{', double_quant' if self.weight_offset is not None else ''}"


class NF4Linear(NF4Storage, nn.Module):
    """A frozen linear layer whose weight is NF4: `forward(x)` = x W^T (+ b) with W dequantised on the fly to
    `dtype` (the model's compute dtype). A bias (Qwen2's q/k/v) stays dense, as bitsandbytes keeps it."""

    def __init__(self, weight: NF4Weight, dtype: torch.dtype, bias: nn.Parameter | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self._store(weight, dtype)
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _add_bias(nf4_linear(x, self.nf4_weight(), self.compute_dtype), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self._nf4_repr()}"


class NF4LoRALinear(NF4Storage, LoRALinear):
    """`LoRALinear` on an NF4 base: the base product is `nf4_linear`, `base_weight()` a dequantised copy; the
    adapter is LoRALinear's own (float32 `lora_A` / `lora_B`, same names, same PEFT keys).

    Built with its LoRA tensors on `meta` (they are not in a base checkpoint): `load_model` / `random_model`
    materialise them, or `quantized_module` hands over an existing layer's.
    """

    def __init__(self, weight: NF4Weight, config: LoRAConfig, dtype: torch.dtype):
        out_features, in_features = weight.shape
        with torch.device("meta"):  # LoRALinear's dense weight: never allocated, replaced by the NF4 buffers
            super().__init__(in_features, out_features, dataclasses.replace(config, use_dora=False))
        del self.weight
        self._store(weight, dtype)
        if config.use_dora:  # QDoRA. The magnitude starts as row norms of a base weight that exists only now: on
            # meta like the adapter, it is set when the adapter is materialised (reset_lora_parameters).
            self.use_dora = True
            self.lora_magnitude_vector = nn.Parameter(torch.empty(out_features, device="meta"))

    def base_linear(self, x: torch.Tensor) -> torch.Tensor:
        return _add_bias(nf4_linear(x, self.nf4_weight(), self.compute_dtype), self.bias)

    def base_weight(self) -> torch.Tensor:
        return self.dequantize()

    def merge(self) -> None:
        raise ValueError("cannot merge an adapter into an NF4-quantised base (the merged weight would be rounded "
                         "to 4 bits again): save the adapter and merge it into the unquantised checkpoint "
                         "(python -m tinyllama.export --adapter ADAPTER --out FOLDER, or load_model without "
                         "quantize, lora.load_adapter, lora.merge)")

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self._nf4_repr()}"


def quantized_module(module: nn.Module, weight: NF4Weight, dtype: torch.dtype) -> nn.Module:
    """The NF4 counterpart of a projection (`nn.Linear` or `LoRALinear`) with base weight `weight`; a
    LoRALinear's adapter modules (`lora_A`, `lora_B`, dropout) move over as they are, materialised or on meta."""
    if tuple(weight.shape) != (module.out_features, module.in_features):
        raise ValueError(f"an NF4 weight of shape {tuple(weight.shape)} cannot replace a "
                         f"[{module.out_features}, {module.in_features}] projection")
    if not isinstance(module, LoRALinear):
        return NF4Linear(weight, dtype, module.bias).train(module.training)
    if module.merged:
        raise ValueError("this LoRA layer is merged into its base weight; quantise the base before merging")
    # The config only sizes the new layer: the adapter's modules and scaling are the old layer's, moved over.
    new = NF4LoRALinear(weight, LoRAConfig(rank=module.rank, alpha=1.0, dropout=0.0, use_dora=module.use_dora), dtype)
    new.lora_A, new.lora_B, new.lora_dropout = module.lora_A, module.lora_B, module.lora_dropout
    if module.use_dora:
        new.lora_magnitude_vector = module.lora_magnitude_vector
    new.scaling, new.active, new.bias = module.scaling, module.active, module.bias
    return new.train(module.training)


def _add_bias(y: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return y if bias is None else y + bias.to(y.dtype)


def is_projection(name: str, module: nn.Module) -> bool:
    """Whether `module` (named `name` in the model) is a decoder projection that `quantize` stores in 4 bits."""
    return isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in PROJECTIONS


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


def is_quantized(model: nn.Module) -> bool:
    """Whether any module of `model` keeps an NF4 weight."""
    return any(isinstance(m, NF4Storage) for m in model.modules())
