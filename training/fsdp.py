"""Sharding across processes with PyTorch's own FSDP2 (`--fsdp`), for models one GPU cannot hold.

    mesh = shard(model, proc, "full")          # each decoder layer, then the root, over all processes
    tensors = full_state(adapter_tensors)      # on every process (a collective); rank 0 writes them

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
- Gradients are summed, not averaged (`set_gradient_divide_factor(1.0)`): each process's loss is already
  divided by the labelled-token count of the whole optimizer step over all processes (`train.queue_step`), so
  the sum is what one process accumulating the same micro-batches computes.
- The loss runs the LM head outside the model's `forward` (`tinyllama.loss.causal_lm_loss`): `hidden_states`
  is registered as a forward method of the root, whose parameters (embeddings, final norm, head) stay gathered
  from its forward until the backward has used them.
- Each layer prefetches the next one's all-gather in the forward pass and the previous one's in the backward,
  so communication overlaps compute. Gradients are reduced once per optimizer step, after its last micro-batch.

Gathering: adapters and checkpoints hold full tensors, the same files as a single process writes, so a
checkpoint resumes with any number of processes, with or without `--fsdp`. Only LoRA tensors and their AdamW
state are gathered, never the base. Deliberately left out: CPU offload, `torch.compile` under FSDP, and tensor
or pipeline parallelism.
"""

from __future__ import annotations

import os

import torch
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor, distribute_tensor

from . import TrainingError

MODES = ("none", "full", "hybrid")


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
    policy = MixedPrecisionPolicy(param_dtype=None, reduce_dtype=torch.float32)
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


def is_sharded(model) -> bool:
    return any(isinstance(p, DTensor) for p in model.parameters())


def full(t: torch.Tensor) -> torch.Tensor:
    """A DTensor gathered whole (a collective: every process calls it), else `t`."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def local_bytes(model) -> int:
    """Bytes of this process's parameters and buffers: its shards of sharded parameters, all of the rest."""
    tensors = [p.to_local() if isinstance(p, DTensor) else p for p in model.parameters()]
    return sum(t.numel() * t.element_size() for t in [*tensors, *model.buffers()])


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
        out["state"][i] = {k: distribute_tensor(v.to(p.device), p.device_mesh, p.placements)
                           if isinstance(p, DTensor) and v.shape == p.shape else v for k, v in s.items()}
    return out
