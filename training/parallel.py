"""Data parallel without a wrapper: start the processes, sum what must be summed, fail fast on a stuck peer.

Each process runs the whole loop on its slice of every global batch; the only communication is one all-reduce
of the labelled-token count and one of the flat LoRA gradients per optimizer step (they are small: no bucketing
or overlap needed), so `DistributedDataParallel` would add machinery and nothing else. Sharding the model
instead (`--fsdp`) is `training.fsdp`; it uses the process group, the timeouts and the sums here.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from tinyllama.runtime import resolve_device

from . import TrainingError


@dataclass
class Process:
    """This process's place in the job: its device, rank and world size; `log` prints on rank 0 only."""
    device: torch.device
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def log(self, *args) -> None:
        if self.main:
            print(*args, flush=True)


def start(device_name: str, timeout_s: float, group: bool = False) -> Process:
    """One process, or one of torchrun's (WORLD_SIZE > 1): NCCL on GPUs, gloo on CPUs. A collective that waits
    longer than `timeout_s` for a peer fails (`collective`), instead of hanging for PyTorch's 30 minutes.
    `group`: a process group even for a single process (FSDP needs one)."""
    device = resolve_device(device_name)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        if group and not dist.is_initialized():
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1,
                                    timeout=timedelta(seconds=timeout_s))
        return Process(device)
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    return Process(device, dist.get_rank(), dist.get_world_size())


def stop() -> None:
    if dist.is_initialized():
        collective(dist.barrier)
        dist.destroy_process_group()


def collective(op, *args):
    """Run a torch.distributed collective; a peer that does not answer within --dist-timeout ends the run."""
    try:
        return op(*args)
    except RuntimeError as e:  # gloo raises after the timeout; NCCL's watchdog aborts the process instead
        raise TrainingError(f"data parallel: {op.__name__} failed ({str(e).strip()[:300]}): another process "
                            "stopped answering within --dist-timeout, or died. Restart the job with --resume "
                            "to continue from the latest checkpoint.") from e


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        collective(dist.all_reduce, t)
    return t


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        collective(dist.all_reduce, t, dist.ReduceOp.MAX)
    return t


# What gloo's and NCCL's errors say when a peer stopped answering or died (anything else is not that).
LOST_PEER = ("timed out", "timeout", "connection closed", "connection reset", "broken pipe", "nccl communicator")


@contextlib.contextmanager
def peers_answer():
    """Collectives that run inside the model (FSDP's all-gathers and reduce-scatters) fail as `collective`
    does when a peer stops answering: with the same advice, not a traceback from deep inside autograd."""
    try:
        yield
    except RuntimeError as e:
        lost = any(s in str(e).lower() for s in LOST_PEER)
        if not lost or not dist.is_initialized() or dist.get_world_size() == 1:
            raise
        raise TrainingError(f"data parallel: a collective inside the model failed ({str(e).strip()[:300]}): "
                            "another process stopped answering within --dist-timeout, or died. Restart the job "
                            "with --resume to continue from the latest checkpoint.") from e


def all_reduce_grads(params) -> None:
    """Sum LoRA gradients over ranks in one flat buffer."""
    if not dist.is_initialized():
        return
    grads = [p.grad for p in params]
    flat = torch.cat([g.flatten() for g in grads])
    collective(dist.all_reduce, flat)
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()
