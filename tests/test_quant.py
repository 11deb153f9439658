"""tinyllama.quant: NF4 storage bit for bit against bitsandbytes (codes, absmax, double quantisation, dequantised
values), the NF4 matmul's gradient against autograd through the dense weight, what the autograd graph keeps,
loading one projection at a time, and LoRA on an NF4 base against a dense model of the dequantised weights,
against PEFT on the original checkpoint and against PEFT on transformers' own bitsandbytes NF4 model."""

from __future__ import annotations

import copy
import dataclasses
import gc
import weakref

import pytest
import torch
from torch.testing import assert_close

import lora
from helpers import TINY, LazyModule, hf_checkpoint, hf_model, randomize_lora_b, run
from lora import ALL_TARGETS, LoRAConfig
from lora.layer import LoRALinear
from tinyllama import LlamaConfig, causal_lm_loss, load_model
from tinyllama import checkpoint as checkpoint_module
from tinyllama.checkpoint import random_model
from tinyllama.lora_mlp import fuse_gate_up
from tinyllama.quant import (
    NF4_CODE,
    NF4Linear,
    NF4LoRALinear,
    NF4Storage,
    dynamic_code,
    is_projection,
    nf4_dequantize,
    nf4_linear,
    nf4_quantize,
    quantized_module,
    replace_module,
)
from tinyllama.runtime import plan_runtime

BNB_MISSING = "bitsandbytes is the NF4 reference (pip install -e .[test])"
bnb = LazyModule("bitsandbytes", reason=BNB_MISSING)
bnb_f = LazyModule("bitsandbytes.functional", reason=BNB_MISSING)
bnb_default_ops = LazyModule("bitsandbytes.backends.default.ops", reason=BNB_MISSING)

ADAPTER = LoRAConfig(rank=4, alpha=8.0, dropout=0.0, targets=ALL_TARGETS)


def bnb_quantize(w: torch.Tensor, double_quant: bool):
    packed, state = bnb_f.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
    return packed, state


def bnb_dequantize(packed, state, dtype):
    """bitsandbytes' dequantize_4bit into `dtype`. Its CPU kernel (AVX-512) reads the absmax of a row's blocks
    as if every row began a block, which is wrong when a row is not a whole number of blocks (no Llama weight:
    2048, 5632, 4096, 11008 are all multiples of 64); for those shapes its own portable implementation (the
    'default' backend, called uncompiled) is the reference."""
    if state.shape[-1] % 64 == 0:
        state = copy.copy(state)
        state.dtype = dtype  # the dtype dequantize_4bit writes
        return bnb_f.dequantize_4bit(packed, state)
    absmax = state.absmax
    if state.nested:
        absmax = bnb_f.dequantize_blockwise(state.absmax, state.state2) + state.offset
    return bnb_default_ops._dequantize_4bit_compute.__wrapped__(
        packed.view(-1), absmax, state.code, 64, state.shape, dtype)


def assert_same_as_bnb(w: torch.Tensor, double_quant: bool, dtypes=(torch.float32, torch.bfloat16)):
    packed, state = bnb_quantize(w, double_quant)
    q = nf4_quantize(w, double_quant=double_quant)
    assert q.packed.dtype == torch.uint8 and torch.equal(q.packed, packed.view(-1))
    assert torch.equal(q.code, state.code)
    assert q.absmax.dtype == state.absmax.dtype and torch.equal(q.absmax, state.absmax)
    if double_quant:
        assert torch.equal(q.offset, state.offset)
        assert torch.equal(q.nested_absmax, state.state2.absmax)
        assert torch.equal(q.nested_code, state.state2.code)
    else:
        assert q.offset is None and state.offset is None
    for dtype in dtypes:
        assert torch.equal(nf4_dequantize(q, dtype), bnb_dequantize(packed, state, dtype))
    return q


def test_code_tables_are_bitsandbytes():
    assert torch.equal(torch.tensor(NF4_CODE), bnb_f.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(dynamic_code(), bnb_f.create_dynamic_map(signed=True))


@pytest.mark.slow
@pytest.mark.parametrize(("dtype", "double_quant"), [(torch.float32, False), (torch.bfloat16, True)],
                         ids=["float32-absmax", "bfloat16-double-quant"])  # each pairing: the small shapes below
def test_tinyllama_mlp_shape_is_bit_identical_to_bitsandbytes(dtype, double_quant):
    torch.manual_seed(0)
    w = (torch.randn(5632, 2048) * 0.02).to(dtype)
    q = assert_same_as_bnb(w, double_quant)
    assert q.packed.numel() == 5632 * 2048 // 2 and q.absmax.numel() == 5632 * 2048 // 64


@pytest.mark.parametrize("double_quant", [False, True], ids=["absmax", "double-quant"])
@pytest.mark.parametrize("shape", [(96, 64), (64, 96), (7, 37), (1, 3)], ids=str)
def test_small_and_ragged_shapes_are_bit_identical_to_bitsandbytes(shape, double_quant):
    """(7, 37): 259 values, an odd count and a last block of 3; (64, 96): rows of a block and a half."""
    torch.manual_seed(1)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert_same_as_bnb(torch.randn(shape).to(dtype), double_quant, dtypes=(torch.float32, dtype))


def test_values_on_a_midpoint_take_the_lower_code_as_in_bitsandbytes():
    code = torch.tensor(NF4_CODE)
    mid = (code[:-1] + code[1:]) / 2
    w = torch.cat([torch.ones(1), mid, -mid]).repeat(2)[:64]  # absmax 1: the scaled values are the midpoints
    q = assert_same_as_bnb(w, double_quant=False)
    index = torch.stack([q.packed >> 4, q.packed & 0xF], -1).view(-1).long()
    assert torch.equal(index[1:16], torch.arange(15))


def test_zero_blocks_match_bitsandbytes():
    w = torch.randn(8, 64)
    w[2:5] = 0  # whole blocks of zeros: absmax 0
    q = assert_same_as_bnb(w, double_quant=False)
    assert torch.equal(nf4_dequantize(q)[2:5], torch.zeros(3, 64))
    # Every block the same absmax: centred absmax all zero, so a nested block of zeros.
    assert_same_as_bnb(torch.sign(torch.randn(512, 64)) + 0.0, double_quant=True)


def test_double_quant_rounds_as_bitsandbytes_lookup_table_does():
    """Row scales over four orders of magnitude put many centred absmax values near 0, where bitsandbytes' CPU
    kernel (a 65536-step table) and the exact nearest code disagree: ours must follow the kernel."""
    torch.manual_seed(2)
    w = torch.randn(1024, 256) * torch.logspace(-4, 0, 1024).view(-1, 1)
    q = assert_same_as_bnb(w, double_quant=True)
    absmax = nf4_quantize(w).absmax
    centred = absmax - absmax.mean()
    scaled = centred / centred.view(-1, 256).abs().amax(1).repeat_interleave(256)
    code = dynamic_code()
    nearest = (scaled.view(-1, 1) - code).abs().argmin(1)
    assert (nearest != q.absmax.long()).any(), "these inputs should exercise the lookup table's rounding"


@pytest.mark.parametrize("kwargs,match", [
    (dict(block_size=100), "block_size"), (dict(block_size=16), "block_size"),
])
def test_unsupported_block_sizes_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        nf4_quantize(torch.randn(4, 64), **kwargs)
    with pytest.raises(ValueError, match="float64"):
        nf4_quantize(torch.randn(4, 64, dtype=torch.float64))


def dense_nf4_linear(x: torch.Tensor, weight, dtype: torch.dtype) -> torch.Tensor:
    """The oracle for `nf4_linear`: the dense dequantised weight through F.linear (autograd keeps it)."""
    return torch.nn.functional.linear(x, nf4_dequantize(weight, dtype))


@pytest.mark.parametrize("double_quant", [False, True], ids=["absmax", "double-quant"])
def test_nf4_linear_gradient_equals_autograd_through_the_dense_weight(double_quant):
    torch.manual_seed(3)
    w = nf4_quantize(torch.randn(96, 64) * 0.1, double_quant=double_quant)
    x = torch.randn(3, 5, 64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    grad_y = torch.randn(3, 5, 96)
    y, y_ref = nf4_linear(x, w, torch.float32), dense_nf4_linear(x_ref, w, torch.float32)
    y.backward(grad_y)
    y_ref.backward(grad_y)
    assert_close(y, y_ref, rtol=0, atol=0)
    assert_close(x.grad, x_ref.grad)
    # Under bf16 autocast: the weight goes straight to bf16, as autocast would cast the dense one.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y16, y16_ref = nf4_linear(x, w, torch.float32), dense_nf4_linear(x, w, torch.float32)
    assert y16.dtype == torch.bfloat16
    assert_close(y16, y16_ref, rtol=0, atol=0)


def dense_twin(nf4_model, checkpoint):
    """A plain (unquantised) LoRA model whose base projections are `nf4_model`'s dequantised weights and whose
    adapter is `nf4_model`'s: what the NF4 model must compute."""
    dense = load_model(checkpoint, lora_config=nf4_model.lora_config)
    with torch.no_grad():
        for name, module in nf4_model.named_modules():
            if isinstance(module, NF4Storage):
                dense.get_submodule(name).weight.copy_(module.dequantize(torch.float32))
    dense.load_state_dict({k: v for k, v in nf4_model.state_dict().items() if ".lora_" in k}, strict=False)
    return dense


@pytest.fixture
def checkpoint(tmp_path):
    # intermediate 192: down_proj's rows are whole blocks, so transformers' bitsandbytes layers dequantise
    # correctly on a CPU (see bnb_dequantize); and no projection has the embeddings' shape [128, 64].
    return hf_checkpoint(tmp_path / "base", intermediate_size=192)


@pytest.mark.slow
@pytest.mark.parametrize("double_quant", [False, True], ids=["absmax", "double-quant"])
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "qdora"])
def test_lora_on_nf4_equals_lora_on_the_dequantised_dense_model(checkpoint, double_quant, dora):
    torch.manual_seed(4)
    adapter = dataclasses.replace(ADAPTER, use_dora=dora, dropout=0.3 if dora else ADAPTER.dropout)
    model = randomize_lora_b(load_model(checkpoint, lora_config=adapter, quantize="nf4", double_quant=double_quant))
    if dora:  # magnitudes away from their initial norms, so that m / ||W + sBA|| is not 1
        with torch.no_grad():
            for layer in lora.lora_layers(model).values():
                layer.lora_magnitude_vector.mul_(1 + 0.1 * torch.randn_like(layer.lora_magnitude_vector))
    dense = dense_twin(model, checkpoint)
    ids = torch.randint(0, TINY["vocab_size"], (2, 9))
    torch.manual_seed(5)  # QDoRA with dropout: the same masks for both (the base product on dropped-out input)
    logits = model(ids)
    torch.manual_seed(5)
    logits_dense = dense(ids)
    assert_close(logits, logits_dense)
    logits.square().sum().backward()
    logits_dense.square().sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    grads_dense = {n: p.grad for n, p in dense.named_parameters() if p.requires_grad}
    assert grads.keys() == grads_dense.keys() and len(grads) == (3 if dora else 2) * 7 * TINY["num_hidden_layers"]
    for name in grads:
        assert_close(grads[name], grads_dense[name], msg=name)
    with lora.disabled(model), lora.disabled(dense):  # the base alone, through the same hook
        assert_close(model(ids), dense(ids))


def saved_tensors(model, ids) -> list[tuple[tuple[int, ...], torch.dtype]]:
    seen = []

    def pack(t):
        seen.append((tuple(t.shape), t.dtype))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(ids).sum()
    loss.backward()
    return seen


def test_the_autograd_graph_keeps_no_dense_weight(checkpoint):
    targets = ("q_proj", "gate_proj", "down_proj")  # k, v, o, up: NF4 without LoRA (NF4Linear), frozen input
    model = load_model(checkpoint, lora_config=LoRAConfig(rank=4, alpha=8.0, dropout=0.0, targets=targets),
                       quantize="nf4")
    # Either way round: autograd may keep a weight transposed (the matmul's own operand).
    shapes = {s for m in model.modules() if isinstance(m, NF4Storage)
              for s in ((m.out_features, m.in_features), (m.in_features, m.out_features))}
    ids = torch.randint(0, TINY["vocab_size"], (2, 5))  # 10 tokens: no activation has a weight's shape
    dense_saved = [s for s, dtype in saved_tensors(dense_twin(model, checkpoint), ids) if dtype == torch.float32]
    assert {(32, 64), (64, 32)} & set(dense_saved)  # the detector sees the dense k/v weights...
    assert {(192, 64), (64, 192)} <= set(dense_saved)  # ...and the MLP's
    saved = saved_tensors(model, ids)
    assert not shapes & {s for s, dtype in saved if dtype.is_floating_point}  # ...and none of the NF4 model's
    assert any(dtype == torch.uint8 for _, dtype in saved)  # it keeps the packed ones


def dense_tensors(shapes) -> list[torch.Tensor]:
    """Every float CPU tensor of one of `shapes` alive in this process (other tests' too: compiled graphs and
    caches keep some of theirs)."""
    gc.collect()
    return [t for t in gc.get_objects() if type(t) in (torch.Tensor, torch.nn.Parameter)
            and t.device.type == "cpu" and t.is_floating_point() and tuple(t.shape) in shapes]


@pytest.mark.slow
@pytest.mark.parametrize("builder", ["load_model", "random_model"])
def test_projections_are_quantised_one_at_a_time(checkpoint, monkeypatch, builder):
    config = LlamaConfig.from_json(checkpoint / "config.json")
    h, i = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * config.head_dim
    shapes, count = {(h, h), (kv, h), (i, h), (h, i)}, 7 * config.num_hidden_layers
    quantized, alive_at_last, quantize = [], [], checkpoint_module.nf4_quantize
    earlier = {id(t): t for t in dense_tensors(shapes)}  # held: their ids stay theirs

    def spy(weight, **kwargs):
        assert all(ref() is None for ref in quantized), "a dense projection outlived its quantisation"
        quantized.append(weakref.ref(weight))
        if len(quantized) == count:  # every dense tensor of a projection's shape still referenced from Python
            alive_at_last.append(sum(id(t) not in earlier for t in dense_tensors(shapes)))
        return quantize(weight, **kwargs)

    monkeypatch.setattr(checkpoint_module, "nf4_quantize", spy)
    if builder == "load_model":
        model = load_model(checkpoint, lora_config=ADAPTER, quantize="nf4", double_quant=True)
    else:
        model = random_model(config, lora_config=ADAPTER, quantize="nf4", double_quant=True)
    assert len(quantized) == count
    assert alive_at_last == [1]  # the one being quantised; a loader that kept them all would hold 14
    projections = [m for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in ALL_TARGETS]
    assert len(projections) == 14 and all(isinstance(m, NF4LoRALinear) for m in projections)
    for m in projections:
        assert m.weight_packed.dtype == torch.uint8 and m.weight_packed.numel() * 2 == m.in_features * m.out_features
    assert not any(k.endswith("_proj.weight") for k in model.state_dict())
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    trainable, _ = lora.count_parameters(model)
    with torch.device("meta"):
        assert trainable == lora.count_parameters(random_model(config, lora_config=ADAPTER, device="meta"))[0]


@torch.no_grad()
def quantized_after_loading(model, double_quant: bool = False):
    """`model` with every projection replaced by its NF4 counterpart, quantised from its dense weight: what
    `load_model(..., quantize="nf4")` does while reading, one weight at a time."""
    for name, module in list(model.named_modules()):
        if is_projection(name, module):
            weight = nf4_quantize(module.weight, double_quant=double_quant)
            replace_module(model, name, quantized_module(module, weight, module.weight.dtype))
    return model


def test_load_model_quantises_what_quantising_the_loaded_model_gives(checkpoint):
    loaded = load_model(checkpoint, quantize="nf4", double_quant=True).state_dict()
    converted = quantized_after_loading(load_model(checkpoint), double_quant=True).state_dict()
    assert loaded.keys() == converted.keys()
    for key in loaded:
        assert torch.equal(loaded[key], converted[key]), key
    assert isinstance(quantized_after_loading(load_model(checkpoint)).model.layers[0].mlp.up_proj, NF4Linear)


def test_unknown_quantize_is_refused_by_name(checkpoint):
    for build in (lambda: load_model(checkpoint, quantize="int4"),
                  lambda: random_model(LlamaConfig(**TINY), quantize="int4")):
        with pytest.raises(ValueError, match="'int4'.*nf4"):
            build()


def test_merge_fused_mlp_and_weight_are_refused_with_a_reason(checkpoint):
    model = load_model(checkpoint, lora_config=ADAPTER, quantize="nf4")
    with pytest.raises(ValueError, match="unquantised checkpoint"):
        lora.merge(model)
    assert not fuse_gate_up(model.model.layers[0].mlp)  # left on the plain path
    assert model.model.layers[0].mlp.gate_up_weight is None
    with pytest.raises(ValueError, match="--fused-mlp with --quantize nf4 is not supported"):
        plan_runtime(model.config, torch.device("cpu"), torch.float32, lora_config=ADAPTER, quantized=True,
                     fused_mlp=True)
    with pytest.raises(AttributeError, match="dequantize"):
        model.model.layers[0].mlp.up_proj.weight  # noqa: B018


def train(model, batches, steps=4):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for ids in batches[:steps]:
        total, count = causal_lm_loss(model, ids, ids)
        loss = total / count
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.slow
def test_nf4_trains_as_the_dequantised_model_and_its_adapter_loads_in_peft(checkpoint, tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = LazyModule("peft")
    torch.manual_seed(5)
    model = load_model(checkpoint, lora_config=ADAPTER, quantize="nf4", double_quant=True)
    dense = dense_twin(model, checkpoint)
    batches = [torch.randint(0, TINY["vocab_size"], (2, 16))] * 4  # one batch again and again: the loss falls
    losses = train(model, batches)
    assert_close(torch.tensor(losses), torch.tensor(train(dense, batches)))
    assert losses[-1] < losses[0]

    adapter = lora.save_adapter(model, tmp_path / "adapter", base_model=str(checkpoint))
    ids = torch.randint(0, TINY["vocab_size"], (2, 11))
    model.eval()
    # PEFT on the original (unquantised) checkpoint = our unquantised model with the adapter.
    plain = lora.load_adapter(load_model(checkpoint, lora_config=ADAPTER), adapter).eval()
    with torch.no_grad():
        assert_close(peft.PeftModel.from_pretrained(hf_model(checkpoint), adapter)(ids).logits, plain(ids))
    # PEFT on transformers' own bitsandbytes NF4 model of the checkpoint = our NF4 model.
    quantization = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                   bnb_4bit_use_double_quant=True,
                                                   bnb_4bit_compute_dtype=torch.float32)
    base = hf_model(checkpoint, quantization_config=quantization, device_map="cpu", dtype=torch.float32)
    for module in base.modules():  # its CPU inference path repacks the weight with bf16 absmax: not NF4 as stored
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    reference = peft.PeftModel.from_pretrained(base, adapter).eval()
    # And the adapter back into a fresh NF4 model of ours.
    reloaded = lora.load_adapter(load_model(checkpoint, lora_config=ADAPTER, quantize="nf4", double_quant=True),
                                 adapter)
    with torch.no_grad():
        assert_close(reference(ids).logits, model(ids))
        assert_close(reloaded.eval()(ids), model(ids), rtol=0, atol=0)


@pytest.mark.slow
def test_nf4_lora_layer_compiles_as_one_graph():
    torch.manual_seed(6)
    layer = randomize_lora_b(LoRALinear(64, 96, ADAPTER))
    layer = quantized_module(layer, nf4_quantize(layer.weight, double_quant=True), torch.float32)
    x = torch.randn(2, 7, 64, requires_grad=True)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)  # fullgraph: a graph break fails
    y, y_eager = compiled(x), layer(x)
    assert_close(y, y_eager)
    grads = torch.autograd.grad(y.square().sum(), [x, layer.lora_A.weight, layer.lora_B.weight])
    grads_eager = torch.autograd.grad(y_eager.square().sum(), [x, layer.lora_A.weight, layer.lora_B.weight])
    for g, g_eager in zip(grads, grads_eager, strict=True):
        assert_close(g, g_eager)


def test_is_projection_names_the_seven_decoder_projections():
    with torch.device("meta"):
        model = random_model(LlamaConfig(**TINY), lora_config=ADAPTER, device="meta")
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if is_projection(n, m)}
    assert names == set(ALL_TARGETS)
    assert not is_projection("lm_head", model.lm_head)


def test_gradient_checkpointing_recomputes_the_same_gradients(checkpoint, monkeypatch):
    import tinyllama.model

    model = randomize_lora_b(load_model(checkpoint, lora_config=ADAPTER, quantize="nf4", double_quant=True), seed=7)
    ids = torch.randint(0, TINY["vocab_size"], (2, 9))
    calls = []
    real = tinyllama.model.checkpoint
    monkeypatch.setattr(tinyllama.model, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))

    def gradients():
        model.zero_grad()
        model(ids).square().sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    plain = gradients()
    assert calls == []
    model.gradient_checkpointing = True
    for name, grad in gradients().items():
        assert_close(grad, plain[name], msg=name)
    assert len(calls) == TINY["num_hidden_layers"]  # every layer went through checkpointing


@pytest.mark.slow
def test_train_py_trains_qlora_and_qdora_counting_the_quantised_weights_as_parameters(checkpoint, tmp_path):
    data = dict(data="random:16", max_len=32)  # the checkpoint has no tokenizer
    dense, _ = run(tmp_path, checkpoint, name="dense", targets=",".join(ALL_TARGETS), **data)
    qlora, _ = run(tmp_path, checkpoint, name="nf4", targets=",".join(ALL_TARGETS), quantize="nf4",
                      double_quant=True, **data)
    assert (qlora["trainable_params"], qlora["total_params"]) == (dense["trainable_params"], dense["total_params"])
    qdora, _ = run(tmp_path, checkpoint, name="qdora", quantize="nf4", dora=True, **data)
    mlp_rows = TINY["num_hidden_layers"] * (2 * 192 + TINY["hidden_size"])  # gate and up: 192 rows, down: 64
    plain, _ = run(tmp_path, checkpoint, name="plain", **data)
    assert qdora["trainable_params"] == plain["trainable_params"] + mlp_rows
    # Both adapters are PEFT's format on the unquantised base: PEFT loads them onto transformers' model of the
    # original checkpoint, with the logits of our dense model carrying the same adapter.
    ids = torch.randint(0, TINY["vocab_size"], (2, 9))
    from peft import PeftModel

    for name in ("nf4", "qdora"):
        adapter = tmp_path / name / "adapter"
        model = lora.load_adapter(load_model(checkpoint, lora_config=lora.read_adapter_config(adapter)), adapter).eval()
        with torch.no_grad():
            assert_close(PeftModel.from_pretrained(hf_model(checkpoint), adapter).eval()(ids).logits, model(ids))
    import train as train_py

    with pytest.raises(SystemExit, match="--double-quant applies to --quantize nf4"):
        train_py.train(train_py.TrainConfig(model=str(checkpoint), double_quant=True, out=str(tmp_path / "x")))
    for flag, extra in (("--dora", dict(dora=True)), ("--quantize nf4", dict(quantize="nf4"))):
        with pytest.raises(SystemExit, match=f"--fused-mlp with {flag} is not supported"):
            train_py.train(train_py.TrainConfig(model=str(checkpoint), fused_mlp=True, out=str(tmp_path / "x"),
                                               **extra))
    assert not (tmp_path / "x").exists()
