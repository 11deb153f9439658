"""What works for Llama works for each family: NF4 QLoRA against the dequantised dense model, DoRA against PEFT's
use_dora (a biased projection included), gradient checkpointing against the plain backward pass, packed rows
against padded ones, the memory plan exact on a family with sandwich norms, q/k norms and the attention softcap,
and the trainable-parameter table of Phi-3's fused targets.

The tiny configs are test_model_families' (one per family, a sliding window shorter than the sequences)."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from test_dora import _perturb
from test_model_families import FAMILY_CONFIGS, FAMILY_NAMES, SEQ, VOCAB, checkpoints  # noqa: F401 (fixture)
from test_plan import real_step
from test_quant import dense_twin
from torch.testing import assert_close

import lora
from helpers import TINY, LazyModule, randomize_lora_b
from lora import LoRAConfig
from tinyllama import LlamaConfig, causal_lm_loss, load_model
from tinyllama.checkpoint import model_config, random_model
from tinyllama.quant import NF4LoRALinear, NF4Storage
from tinyllama.runtime import RuntimePlan
from training.plan import plan_step
from training.report import parameter_table
from training.settings import TrainConfig

transformers = pytest.importorskip("transformers")
peft = LazyModule("peft")


def _every_projection(path) -> tuple[str, ...]:
    config = LlamaConfig.from_json(path / "config.json")
    return config.attention_projections + config.mlp_projections


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


# ---- NF4 QLoRA -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_qlora_equals_lora_on_the_dequantised_weights(checkpoints, family):  # noqa: F811
    path = checkpoints[family]
    adapter = LoRAConfig(rank=4, alpha=8.0, dropout=0.0, targets=_every_projection(path))
    model = randomize_lora_b(load_model(path, lora_config=adapter, quantize="nf4", double_quant=True), seed=2)
    nf4 = [m for m in model.modules() if isinstance(m, NF4LoRALinear)]
    assert len(nf4) == len(adapter.targets) * model.config.num_hidden_layers  # every projection in 4 bits
    dense = dense_twin(model, path)
    biased = {n for n, m in model.named_modules() if isinstance(m, NF4LoRALinear) and m.bias is not None}
    assert biased == {n for n, m in dense.named_modules() if isinstance(m, torch.nn.Linear) and m.bias is not None}
    assert bool(biased) == (family in ("qwen2", "qwen3"))  # Qwen's biases stay dense beside the NF4 weight
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(1))
    logits, logits_dense = model(ids), dense(ids)
    assert_close(logits, logits_dense)
    logits.square().sum().backward()
    logits_dense.square().sum().backward()
    grads, grads_dense = _grads(model), _grads(dense)
    assert grads.keys() == grads_dense.keys() and len(grads) == 2 * len(nf4)
    for name in grads:
        assert_close(grads[name], grads_dense[name], msg=name)
    with torch.no_grad():  # and the quantisation is not the identity: the original weights give other logits
        assert (load_model(path, lora_config=adapter)(ids) - dense(ids).detach()).abs().max() > 1e-3


@pytest.mark.parametrize("family", ["phi3", "qwen2"])
def test_random_model_quantises_each_projection_of_the_family(family):
    config = LlamaConfig.from_dict({**TINY, **FAMILY_CONFIGS[family], "vocab_size": VOCAB})
    torch.manual_seed(0)
    model = random_model(config, quantize="nf4")
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, NF4Storage)}
    assert names == set(config.attention_projections + config.mlp_projections)
    dense = random_model(config)  # the same shapes, densely: the NF4 model keeps every projection's bias
    assert {n for n, _ in model.named_parameters() if n.endswith(".bias")} == {
        n for n, _ in dense.named_parameters() if n.endswith(".bias")}


# ---- DoRA ------------------------------------------------------------------------------------------------------

def test_dora_with_a_bias_scales_the_product_without_it():
    """One biased layer against PEFT's DoRA layer on an nn.Linear with the same bias (a bias added before the
    magnitude's scale would differ by (m / ||W'|| - 1) b)."""
    torch.manual_seed(0)
    base = torch.nn.Linear(24, 40, bias=True)
    torch.nn.init.normal_(base.bias, std=1.0)
    wrapped = torch.nn.Sequential()
    wrapped.add_module("q_proj", copy.deepcopy(base))
    ref = peft.get_peft_model(wrapped, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], use_dora=True))
    _perturb(ref, seed=1)
    ours = lora.layer.LoRALinear(24, 40, LoRAConfig(rank=4, alpha=8, dropout=0.0, use_dora=True), bias=True)
    peft_layer = ref.base_model.model.q_proj
    with torch.no_grad():
        ours.weight.copy_(base.weight)
        ours.bias.copy_(base.bias)
        ours.lora_A.weight.copy_(peft_layer.lora_A["default"].weight)
        ours.lora_B.weight.copy_(peft_layer.lora_B["default"].weight)
        ours.lora_magnitude_vector.copy_(peft_layer.lora_magnitude_vector["default"].weight)
    x = torch.randn(3, 24)
    assert_close(ours(x), ref(x), rtol=0, atol=1e-6)
    with torch.no_grad():  # the magnitude is far enough from the norms for the bias's place to matter
        m = ours.lora_magnitude_vector
        norm = (ours.weight + ours.scaling * ours.lora_B.weight @ ours.lora_A.weight).norm(dim=1)
        assert ((m / norm - 1)[None] * ours.bias).abs().max() > 1e-2


# ---- gradient checkpointing and packing ------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_gradient_checkpointing_and_packing_train_as_the_plain_padded_step(checkpoints, family):  # noqa: F811
    path = checkpoints[family]
    adapter = LoRAConfig(rank=4, alpha=8.0, dropout=0.0, targets=_every_projection(path))
    model = randomize_lora_b(load_model(path, lora_config=adapter), seed=4).train()
    lengths = [11, 4, 15]  # two pass the window
    rows = [torch.randint(2, VOCAB, (n,), generator=torch.Generator().manual_seed(n)) for n in lengths]

    def step(**kwargs):
        model.zero_grad()
        loss_sum, count = causal_lm_loss(model, **kwargs)
        (loss_sum / count).backward()
        return (loss_sum / count).detach(), _grads(model)

    # padded: right padding, labels -100 there
    T = max(lengths)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, :len(r)], labels[i, :len(r)], mask[i, :len(r)] = r, r, 1
    padded = step(input_ids=ids, labels=labels, attention_mask=mask)
    model.gradient_checkpointing = True
    checkpointed = step(input_ids=ids, labels=labels, attention_mask=mask)
    model.gradient_checkpointing = False
    assert_close(checkpointed[0], padded[0], rtol=0, atol=0)
    for name, grad in padded[1].items():
        assert_close(checkpointed[1][name], grad, msg=name)

    # packed: one row, each conversation's labels starting afresh (the loss shifts within the row, so the
    # first token of each conversation after the first is never a target of the one before: its label is -100)
    packed_ids = torch.cat(rows)[None]
    packed_labels = torch.cat([torch.cat([torch.tensor([-100]), r[1:]]) for r in rows])[None]
    starts = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    for varlen in (False, True):
        loss, grads = step(input_ids=packed_ids, labels=packed_labels, position_ids=positions, cu_seqlens=starts,
                           plan=RuntimePlan(varlen=varlen))
        assert_close(loss, padded[0], rtol=0, atol=1e-5)
        for name, grad in padded[1].items():
            assert_close(grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)


# ---- the memory plan and the parameter table -------------------------------------------------------------------

@pytest.mark.slow  # traces a step and runs one: about a second each
@pytest.mark.parametrize("family", ["gemma2", "qwen3"])
def test_planned_activations_are_what_the_families_step_holds(family):
    """Gemma 2: sandwich norms, GeGLU, the attention softcap (the plain path materialises [B, H, T, S] scores),
    the final softcap; Qwen3: q/k norms and biases. max_len past the window: sliding layers masked."""
    config = LlamaConfig.from_dict({**TINY, **FAMILY_CONFIGS[family], "vocab_size": VOCAB})
    lora_config = LoRAConfig(rank=4, alpha=8.0, dropout=0.05, targets=config.attention_projections
                             + config.mlp_projections)
    cfg = TrainConfig(device="cpu", batch_size=2, max_len=24)
    planned = plan_step(cfg, lora_config, config)
    real = real_step(config, lora_config, cfg)
    assert real["held"] > 0
    assert planned["parts"]["activations"] == real["held"] == real["saved"] - real["adapter"]


NAMED = ["qwen2.5-0.5b", "qwen2.5-1.5b", "qwen3-0.6b", "gemma-2-2b", "gemma-3-1b", "phi-3-mini", "phi-4-mini"]


def test_phi3_trainable_count_is_its_fused_projections():
    config = model_config("phi-3-mini")
    targets = lora.resolve_targets("all", config.attention_projections, config.mlp_projections)
    assert targets == ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
    table = parameter_table(config, LoRAConfig(rank=4, alpha=4.0, targets=targets), [4, 64], "phi-3-mini",
                            lambda *_: None)
    d, f, layers = 3072, 8192, 32  # qkv 3d out, gate_up 2f out
    per_rank = layers * ((d + 3 * d) + (d + d) + (d + 2 * f) + (f + d))
    assert [r["trainable_params"] for r in table["rows"]] == [4 * per_rank, 64 * per_rank] == [6_291_456,
                                                                                               100_663_296]
    # the published total of Phi-3-mini (3,821,079,552) plus the adapter
    assert [r["total_params"] - r["trainable_params"] for r in table["rows"]] == [3_821_079_552] * 2


@pytest.mark.parametrize("name", NAMED)
def test_the_parameter_table_counts_every_named_family_shape(name):
    """`make params MODEL=<shape>`: the table's trainable count is the sum of rank x (in + out) over the
    family's own MLP projections, read from the built model's modules (not from the formula in the code)."""
    config = model_config(name)
    lora_config = LoRAConfig(rank=8, alpha=8.0, targets=config.mlp_projections)
    table = parameter_table(config, lora_config, [8], name, lambda *_: None)
    with torch.device("meta"):
        from tinyllama.model import Llama
        model = Llama(config, lora_config=lora_config)
    expected = sum(8 * (m.in_features + m.out_features) for m in lora.lora_layers(model).values())
    assert table["rows"][0]["trainable_params"] == expected > 0
    assert len(lora.lora_layers(model)) == len(config.mlp_projections) * config.num_hidden_layers


@pytest.mark.slow  # two traces at a real width per shape: seconds each
@pytest.mark.parametrize("name", NAMED)
def test_the_plan_traces_each_named_family_shape(name):
    """`make plan MODEL=<shape>` at the real width, cut to 1 and 2 layers (the exact planned == held check at a
    family's width is test_planned_activations_are_what_the_families_step_holds)."""
    config = model_config(name)
    cfg = TrainConfig(device="cpu", batch_size=1, max_len=16)
    lora_config = LoRAConfig(rank=8, alpha=8.0, dropout=0.0, targets=config.mlp_projections)
    one, two = (plan_step(cfg, lora_config, config.with_layers(n)) for n in (1, 2))
    per_layer = two["parts"]["activations"] - one["parts"]["activations"]
    assert per_layer > 0
    assert two["peak_bytes"] == sum(two["parts"].values())
    assert two["parts"]["lora_weights"] == 2 * one["parts"]["lora_weights"] > 0  # float32 A and B per layer


# ---- the start-up check on a sliding layer -----------------------------------------------------------------------

def test_the_startup_check_probes_the_first_sliding_layer_with_a_window_that_cuts(monkeypatch):
    """Qwen2 here slides from layer 1: a varlen kernel that ignores its window passes on layer 0 (full) and must
    fail on layer 1, whose probe window is shorter than every probe segment."""
    from tinyllama import model as model_module
    from tinyllama.model import Llama
    from tinyllama.startup_check import PROBE_WINDOW, SEGMENT_LENGTHS, check_fast_paths, probe_layers

    config = LlamaConfig.from_dict({**TINY, **FAMILY_CONFIGS["qwen2"], "vocab_size": VOCAB})
    assert probe_layers(config) == [0, 1] and PROBE_WINDOW < min(SEGMENT_LENGTHS)
    assert probe_layers(LlamaConfig(**TINY)) == [0]
    torch.manual_seed(0)
    model = randomize_lora_b(Llama(config, lora_config=LoRAConfig(4, 8, dropout=0.0)), std=0.1)
    plan = RuntimePlan(varlen=True)
    said = []
    assert check_fast_paths(model, plan, said.append) == plan
    real = model_module.varlen_plain
    monkeypatch.setattr(model_module, "varlen_plain",
                        lambda q, k, v, cu, window=None, scale=None: real(q, k, v, cu, None, scale))
    said = []
    assert check_fast_paths(model, plan, said.append).varlen is False
    (warning,) = [line for line in said if line.startswith("warning")]
    assert "on sliding layer 1 differs from the plain path's" in warning


# ---- Gemma 2's softcapped attention through FlexAttention ------------------------------------------------------

def test_flex_softcap_is_planned_on_cuda_and_refused_on_a_cpu_with_the_reason():
    from tinyllama.runtime import FAST_PATHS, has_flex_attention, plan_runtime

    gemma2 = LlamaConfig.from_dict({**TINY, **FAMILY_CONFIGS["gemma2"], "vocab_size": VOCAB})
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    plan = plan_runtime(gemma2, cpu, torch.float32, flex_softcap=True)
    assert plan.flex_softcap is False and "flex_softcap" in FAST_PATHS  # so the start-up check compares it
    assert "softcapped attention: the plain path (FlexAttention has no backward pass on a CPU)" in plan.describe()
    assert plan_runtime(gemma2, cuda, torch.bfloat16, varlen=False).flex_softcap is has_flex_attention()
    off = plan_runtime(gemma2, cuda, torch.bfloat16, varlen=False, flex_softcap=False)
    assert not off.flex_softcap and "the plain path (FlexAttention turned off)" in off.describe()
    llama = plan_runtime(LlamaConfig(**TINY), cuda, torch.bfloat16, varlen=False)
    assert not llama.flex_softcap and "softcapped" not in llama.describe()


def _flex_case(device, packed: bool, requires_grad: bool = False, nan_after: bool = False, T: int = 40):
    """q, k, v and the mask of one sliding layer past its window (8 of T keys), 4 query heads on 2 k/v heads:
    padded (the first sequence's 6 left pads) or packed (5 segments across the 2 rows). With `nan_after`, each
    tensor is a view of a buffer whose next elements are NaN, so a kernel reading past its end gives NaN."""
    from tinyllama.model import build_attention_mask, segment_ids

    generator = torch.Generator().manual_seed(0)
    B, H, KV, D, window = 2, 4, 2, 16, 8

    def tensor(heads):
        t = torch.randn(B, heads, T, D, generator=generator)
        if nan_after:
            t = torch.cat((t.flatten(), torch.full((t.numel(),), float("nan"))))[:t.numel()].view(t.shape)
        return t.to(device).requires_grad_(requires_grad)

    q, k, v = tensor(H), tensor(KV), tensor(KV)
    pad, docs = torch.ones(B, T, dtype=torch.long, device=device), None
    if packed:
        cu_seqlens = torch.tensor([0, 17, 25, T, T + 17, 2 * T], dtype=torch.int32, device=device)
        docs, pad = segment_ids(cu_seqlens, B, T), None
    else:
        pad[0, :6] = 0
    mask = build_attention_mask(T, 0, pad, docs, torch.device(device), window=window, force=True)
    return q, k, v, mask


def test_flex_lengths_are_whole_blocks_a_power_of_two_of_them():
    """Every length FlexAttention runs at holds the sequence in whole 128-token blocks, the fewest such that
    their count is a power of two; so any padded length up to 8192 runs at one of 7."""
    from tinyllama.model import FLEX_BLOCK, flex_length

    seen = set()
    for n in range(1, 8193):
        got = flex_length(n)
        blocks = got // FLEX_BLOCK
        assert got % FLEX_BLOCK == 0 and got >= n and blocks & (blocks - 1) == 0, (n, got)
        assert blocks == 1 or (blocks // 2) * FLEX_BLOCK < n, (n, got)  # the next power of two down is too short
        seen.add(got)
    assert sorted(seen) == [128, 256, 512, 1024, 2048, 4096, 8192]


def test_a_compiled_function_gets_the_recompile_limit_it_is_given():
    """torch compiles a function for at most 8 shapes, then runs it uncompiled (FlexAttention's reference path
    keeps every score); `with_recompile_limit` lets it compile for more. A trivial function on the eager backend
    (no code generated), 12 shapes."""
    from torch._dynamo.utils import counters

    from tinyllama.runtime import with_recompile_limit

    def compiled_count(fn):
        before = counters["stats"]["unique_graphs"]
        for n in range(1, 13):
            fn(torch.ones(n))
        return counters["stats"]["unique_graphs"] - before

    def twice(x):
        return x * 2

    def thrice(x):  # a code object of its own: torch counts compiles per code object
        return x * 3

    assert compiled_count(torch.compile(twice, dynamic=False, backend="eager")) == torch._dynamo.config.recompile_limit
    assert compiled_count(with_recompile_limit(torch.compile(thrice, dynamic=False, backend="eager"), 16)) == 12


def test_flex_attention_is_called_under_its_own_recompile_limit(monkeypatch):
    """flex_kernel's FlexAttention sees FLEX_RECOMPILE_LIMIT as torch's limit when it is called (torch.compile
    replaced by a function that reports the limit in force at the call)."""
    from tinyllama import runtime

    def compile_reporting_the_limit(fn, **kwargs):
        return lambda *args, **kw: torch._dynamo.config.recompile_limit

    monkeypatch.setattr(torch, "compile", compile_reporting_the_limit)
    flex, _ = runtime.flex_kernel.__wrapped__()  # not the cached kernel
    assert flex() == runtime.FLEX_RECOMPILE_LIMIT != torch._dynamo.config.recompile_limit


@pytest.mark.slow  # FlexAttention compiles on a CPU: about 5 s, 10 s with a cold inductor cache
def test_flex_softcapped_attention_equals_the_plain_path_on_a_cpu():
    """The forward pass (FlexAttention has no CPU backward): padded, packed, a window shorter than the sequence,
    grouped k/v heads, 300 and 400 tokens: one length (`flex_length`, 512 tokens), so one compiled kernel, with a
    wholly padded block of queries and keys. Without `flex_block_mask`'s padding to whole blocks, torch 2.13's
    compiled kernel scores keys read past the end of k, and NaN there survives the mask:

        flex = torch.compile(flex_attention)
        q, k, v = (torch.randn(1, 1, 40, 16) for _ in range(3))  # 40 keys: part of one 128-key block
        k = torch.cat((k.flatten(), torch.tensor([float("nan")])))[:-1].view(k.shape)  # NaN stored after k
        mask = create_block_mask(lambda b, h, q, kv: kv <= q, None, None, 40, 40, device="cpu")
        flex(q, k, v, block_mask=mask).isnan().any()  # True (SDPA: False; with 128 keys: False)

    so the inputs here are stored with NaN after them, as chance memory may hold."""
    from torch._dynamo.utils import counters

    from tinyllama.model import flex_block_mask, flex_softcapped_attention, softcapped_attention
    from tinyllama.runtime import flex_kernel

    if flex_kernel() is None:
        pytest.skip(f"torch {torch.__version__} has no FlexAttention")
    compiled = []
    for T in (300, 400):
        for packed in (False, True):
            q, k, v, mask = _flex_case("cpu", packed, nan_after=True, T=T)
            with torch.no_grad():
                got = flex_softcapped_attention(q, k, v, flex_block_mask(mask), 0.25, 5.0)
            assert_close(got, softcapped_attention(q, k, v, mask, 0.25, 5.0), rtol=1e-5, atol=1e-5)
            compiled.append(counters["stats"]["unique_graphs"])
    assert compiled[1:] == compiled[:1] * 3, "a second length or packing compiled FlexAttention again"
    # Packed rows all have the run's one length: whole blocks are enough there (attention_inputs asks for that).
    assert flex_block_mask(mask).seq_lengths == (512, 512)
    assert flex_block_mask(mask, lengths_vary=False).seq_lengths == (512, 512)  # 400 tokens: 4 blocks
    q, k, v, mask = _flex_case("cpu", True, T=300)
    assert flex_block_mask(mask, lengths_vary=False).seq_lengths == (384, 384)
    # The padding to 512 costs no attention compute: FlexAttention visits only the (query block, key block)
    # pairs the BlockMask lists, and none of them is past the 3 blocks that hold the 300 tokens.
    for packed in (False, True):
        visited = _visited_blocks(flex_block_mask(_flex_case("cpu", packed, T=300)[3]))
        assert visited and max(max(pair) for pair in visited) == 2, sorted(visited)


def _visited_blocks(block_mask) -> set[tuple[int, int]]:
    """The (query block, key block) pairs FlexAttention computes for a BlockMask: its partial and full blocks."""
    pairs = set()
    for counts, indices in ((block_mask.kv_num_blocks, block_mask.kv_indices),
                            (block_mask.full_kv_num_blocks, block_mask.full_kv_indices)):
        if counts is None:
            continue
        for b in range(counts.shape[0]):
            for q_block, n in enumerate(counts[b, 0].tolist()):
                pairs.update((q_block, k_block) for k_block in indices[b, 0, q_block, :n].tolist())
    return pairs


@pytest.mark.cuda
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_flex_softcapped_attention_equals_the_plain_path_on_cuda(packed):
    """Output and gradients of the plain path, on a sliding layer past its window, padded and packed; and the
    start-up check of a Gemma 2 model keeps the path."""
    from tinyllama.model import Llama, flex_block_mask, flex_softcapped_attention, softcapped_attention
    from tinyllama.runtime import flex_kernel
    from tinyllama.startup_check import check_fast_paths

    if os.environ.get("GPU_TESTS_ON_CPU"):  # gpu_check.sh --cpu-dry-run
        pytest.skip("FlexAttention has no backward pass on a CPU; its forward is checked there by "
                    "test_flex_softcapped_attention_equals_the_plain_path_on_a_cpu")
    assert flex_kernel() is not None, "torch has no FlexAttention: gemma2 runs its plain path on this machine"
    q, k, v, mask = _flex_case("cuda", packed, requires_grad=True, T=300)  # a wholly padded block: 300 -> 512
    outs = []
    for y in (flex_softcapped_attention(q, k, v, flex_block_mask(mask), 0.25, 5.0),
              softcapped_attention(q, k, v, mask, 0.25, 5.0)):
        grads = torch.autograd.grad((y * torch.linspace(-1, 1, y.shape[-1], device="cuda")).sum(), (q, k, v))
        outs.append((y, *grads))
    for got, ref in zip(*outs, strict=True):
        assert_close(got, ref, rtol=1e-4, atol=1e-4)
    gemma2 = LlamaConfig.from_dict({**TINY, **FAMILY_CONFIGS["gemma2"], "vocab_size": VOCAB})
    model = randomize_lora_b(Llama(gemma2, lora_config=LoRAConfig(4, 8, dropout=0.0)).cuda(), std=0.1)
    plan = RuntimePlan(device=torch.device("cuda"), flex_softcap=True)
    assert check_fast_paths(model, plan, print, strict=True) == plan
