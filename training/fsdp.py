"""Sharding across processes with PyTorch's own FSDP2 (`--fsdp`), for models one GPU cannot hold.

    mesh = mesh_for("full", device, world)                     # or "hybrid"
    model = load_sharded(folder, mesh, dtype=..., device=...)  # built on meta, each weight into its shards
    state = full_optimizer_state(optimizer)                    # on every process (a collective); rank 0 writes

`shard` calls `torch.distributed.fsdp.fully_shard` on each decoder layer and then on the whole model, over a
`DeviceMesh`:
- `full`: one dimension, every process holds 1/world of each parameter (the frozen base and the LoRA weights,
  and so AdamW's state, which follows its parameter's shards);
- `hybrid` (HSDP): two dimensions, ("replicate", "shard"): shards within a group of `shard_size` processes
  (default: the processes of a node, torchrun's LOCAL_WORLD_SIZE) and replicates across groups, so the
  all-gathers stay on a node's fast links and only the gradient all-reduce crosses nodes.

What FSDP is told, and why:
- No parameter casting (`param_dtype=None`): the compute dtype is autocast's, as without FSDP (the base is
  already stored in it, the LoRA weights stay float32, NF4 stays uint8); gradients are reduced in float32.
- An NF4 base (`--quantize nf4`, FSDP-QLoRA): its packed weights and block scales become frozen parameters
  (`NF4Storage.storage_as_parameters`), since FSDP shards parameters only; each projection is all-gathered in
  its 4-bit form and dequantised as without FSDP.
- Gradients are summed, not averaged (`set_gradient_divide_factor(1.0)`): each process's loss is already
  divided by the labelled-token count (a preference objective: the pair count) of the whole optimizer step over
  all processes (`train.queue_step`, `training.preference_step`), so the sum is what one process accumulating
  the same micro-batches computes.
- The loss runs the LM head outside the model's `forward` (`tinyllama.loss.causal_lm_loss`): `hidden_states`
  is registered as a forward method of the root, whose parameters (embeddings, final norm, head) stay gathered
  from its forward until the backward has used them.
- Each layer prefetches the next one's all-gather in the forward pass and the previous one's in the backward,
  so communication overlaps compute. Gradients are reduced once per optimizer step, after its last micro-batch.

Loading (`load_sharded`): the model is built and sharded on `meta`, each process allocates only its shards, and
each checkpoint weight is read one at a time, quantised if asked, and copied into the part this process owns, so
no process holds the whole base. Gathering: adapters and checkpoints hold full tensors, the same files as a
single process writes, so a checkpoint resumes with any number of processes, with or without `--fsdp`. Only
LoRA tensors and their AdamW state are gathered, never the base. `planned_param_bytes` computes, from the shapes
alone, what `local_bytes` measures (the README's table). The start-up check of the fast paths runs on a
one-layer stand-in (`check_stand_in`), since no process holds a layer whole. Deliberately left out: CPU offload,
`torch.compile`, the fused MLP and DoRA under FSDP, and tensor or pipeline parallelism.
"""

from __future__ import annotations

import math
import os
import sys

import torch
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from tinyllama.checkpoint import check_weights, floating, random_model, read_weights
from tinyllama.config import LlamaConfig
from tinyllama.model import Llama
from tinyllama.quant import is_projection, nf4_quantize, quantized_module, replace_module

from . import TrainingError

MODES = ("none", "full", "hybrid")


# torch.distributed.fsdp and .tensor are imported where a sharded run uses them, not at the top: importing them
# costs about 0.8 s of every train.py start, sharded or not. Until they are imported, nothing is a DTensor.
def _is_dtensor(t) -> bool:
    tensor = sys.modules.get("torch.distributed.tensor")
    return tensor is not None and isinstance(t, tensor.DTensor)


def mesh_for(mode: str, device: torch.device, world: int, shard_size: int = 0) -> DeviceMesh:
    """The process mesh of `mode`: ("shard",) over all processes, or ("replicate", "shard") for hybrid with
    `shard_size` processes a group (0: the processes of one node)."""
    if mode == "full":
        return init_device_mesh(device.type, (world,), mesh_dim_names=("shard",))
    size = shard_size or int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if size < 1 or world % size:
        raise TrainingError(f"--fsdp hybrid: {world} processes cannot be split into groups of {size} (shard "
                            "groups must divide the processes evenly); pass --fsdp-shard-size N with N dividing "
                            f"{world}")
    return init_device_mesh(device.type, (world // size, size), mesh_dim_names=("replicate", "shard"))


def shard(model, mesh: DeviceMesh) -> None:
    """Shard `model` (a tinyllama Llama) over `mesh` in place, as the module docstring says."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    policy = MixedPrecisionPolicy(param_dtype=None, reduce_dtype=torch.float32)
    for module in model.modules():  # NF4 bases (QLoRA): their packed weights and scales are sharded too
        if hasattr(module, "storage_as_parameters"):
            module.storage_as_parameters()
    layers = list(model.model.layers)
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=False)
    register_fsdp_forward_method(model, "hidden_states")
    for before, layer in zip(layers, layers[1:], strict=False):
        before.set_modules_to_forward_prefetch([layer])
        layer.set_modules_to_backward_prefetch([before])
    for module in [*layers, model]:  # each FSDP module sets its own reduction
        module.set_gradient_divide_factor(1.0)
        module.set_force_sum_reduction_for_comms(True)  # a plain SUM: gloo has no pre-multiplied sum


def load_sharded(folder, mesh: DeviceMesh, *, dtype: torch.dtype, device: torch.device, lora_config=None,
                 quantize: str | None = None, double_quant: bool = False):
    """The checkpoint in `folder` loaded straight into its shards: the model is built and sharded on `meta`,
    each process allocates only its shards, and each weight is read, quantised if asked (one dense projection at
    a time, as `load_model` does), and copied into the shard it owns. The LoRA tensors get PEFT's
    initialisation with the same random draws as `load_model`'s, so a sharded run starts where one process
    would. No process ever holds the whole base."""
    config = LlamaConfig.from_json(folder / "config.json")
    keys = check_weights(folder, config)  # in seconds, before a config of 10^5 layers is built
    with torch.device("meta"):
        model = Llama(config, lora_config=lora_config)
        for name, module in list(model.named_modules()):
            if quantize and is_projection(name, module):
                weight = nf4_quantize(torch.empty(module.out_features, module.in_features), double_quant=double_quant)
                replace_module(model, name, quantized_module(module, weight, dtype))
    for name, p in model.named_parameters():
        if ".lora_" not in name and p.is_floating_point():
            p.data = p.data.to(dtype)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    shard(model, mesh)
    model.to_empty(device=device)
    with torch.no_grad():
        for key, tensor in read_weights(folder, keys):
            module_name = key.removesuffix(".weight")
            module = model.get_submodule(module_name)
            if hasattr(module, "storage"):  # an NF4 projection: quantise the whole, keep its shards
                weight = nf4_quantize(floating(tensor).to(device), double_quant=double_quant)
                for field, target in module.storage().items():
                    copy_into(target, getattr(weight, field.removeprefix("weight_")))
            else:
                copy_into(model.get_parameter(key), tensor.to(device=device, dtype=dtype))
            del tensor
        for module in model.modules():  # PEFT's init, in load_model's order
            if hasattr(module, "reset_lora_parameters"):
                a = torch.empty(module.lora_A.weight.shape, dtype=torch.float32, device=device)
                torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5))
                copy_into(module.lora_A.weight, a)
                copy_into(module.lora_B.weight, torch.zeros(module.lora_B.weight.shape, device=device))
    return model


def copy_into(target: torch.Tensor, full: torch.Tensor) -> None:
    """Copy the part of `full` that this process owns into `target` (a sharded DTensor, or a plain tensor)."""
    if _is_dtensor(target):
        from torch.distributed.tensor import distribute_tensor

        full = distribute_tensor(full, target.device_mesh, target.placements, src_data_rank=None).to_local()
        target = target.to_local()
    target.copy_(full)


def check_stand_in(config, *, dtype: torch.dtype, device: torch.device, lora_config=None,
                   quantize: str | None = None, double_quant: bool = False):
    """A one-layer model of `config`'s shape with random weights, for `startup_check.check_fast_paths`: the check
    compares each fast path with its plain path on one layer, and no process holds a sharded model's layer
    whole. Made with its own random generator, so the training's draws are those of one process."""
    small = config.with_layers(1, vocab_size=256, bos_token_id=None, eos_token_id=None)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        return random_model(small, dtype=dtype, device=device, lora_config=lora_config, quantize=quantize,
                            double_quant=double_quant)


def full(t: torch.Tensor) -> torch.Tensor:
    """A DTensor gathered whole (a collective: every process calls it), else `t`."""
    return t.full_tensor() if _is_dtensor(t) else t


def local_bytes(model) -> int:
    """Bytes of this process's parameters and buffers: its shards of sharded parameters, all of the rest."""
    tensors = [p.to_local() if _is_dtensor(p) else p for p in model.parameters()]
    return sum(t.numel() * t.element_size() for t in [*tensors, *model.buffers()])


def planned_param_bytes(config, lora_config, *, world: int = 1, dtype: torch.dtype = torch.bfloat16,
                        quantize: bool = False, double_quant: bool = False) -> int:
    """What `local_bytes` gives for the largest of `world` processes under --fsdp (world 1: one process, no
    sharding), computed from the shapes alone (the model on `meta`): the base in `dtype`, or its decoder
    projections in NF4 (packed values and block scales, sharded; code tables on every process), the LoRA
    weights in float32. FSDP splits each tensor's first dimension in `world` equal parts, the first largest."""
    with torch.device("meta"):
        model = Llama(config, lora_config=lora_config)
    projections = {n for n, m in model.named_modules() if is_projection(n, m)} if quantize else set()

    def local(rows: int, row_bytes: float) -> float:
        return -(-rows // world) * row_bytes

    total = 0.0
    for name, p in model.named_parameters():
        if name.removesuffix(".weight") in projections:
            n = p.numel()
            blocks = -(-n // 64)
            total += local(-(-n // 2), 1)  # packed: two 4-bit values a byte
            if double_quant:  # uint8 scales, a float32 scale per 256 of them, 16 + 256 codes and an offset
                total += local(blocks, 1) + local(-(-blocks // 256), 4) + (16 + 256 + 1) * 4
            else:  # float32 scales, 16 codes
                total += local(blocks, 4) + 16 * 4
            continue
        element = 4 if p.requires_grad else dtype.itemsize  # LoRA (and DoRA) tensors are float32
        total += local(p.shape[0], p[0].numel() * element) if p.dim() else p.numel() * element
    return int(total)


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """`optimizer.state_dict()` with every sharded state tensor gathered whole (a collective): the format a
    single process writes, whatever the number of processes."""
    state = optimizer.state_dict()
    state["state"] = {i: {k: full(v) for k, v in s.items()} for i, s in state["state"].items()}
    return state


def shard_optimizer_state(state: dict, params: list[torch.Tensor]) -> dict:
    """A full optimizer state (`full_optimizer_state`, or one written without FSDP) with each tensor shaped like
    its parameter distributed as that parameter is, ready for `optimizer.load_state_dict`."""
    out = {**state, "state": {}}
    for i, s in state["state"].items():
        p = params[int(i)]
        out["state"][i] = {k: _distributed_like(v, p) if _is_dtensor(p) and v.shape == p.shape else v
                           for k, v in s.items()}
    return out


def _distributed_like(v: torch.Tensor, p) -> torch.Tensor:
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(v.to(p.device), p.device_mesh, p.placements)
