"""Multi-process runs under ``torchrun``: who am I, which device, and talking to the others.

``torchrun --nproc-per-node=N -m cxr_core train ...`` starts N copies of the command with
``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE`` in the environment. Each copy trains on its
share of every global batch inside DistributedDataParallel, which averages gradients, so
the schedule, batch size and results mean the same as a one-process run. Rank 0 alone
writes the run folder. The backend is NCCL on GPUs and gloo on CPU (which is how the
test suite exercises this path on a machine without GPUs). ``predict`` under torchrun
needs no process group: each rank takes every N-th file on its own GPU.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, TypeVar

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class World:
    rank: int = 0
    local_rank: int = 0
    size: int = 1

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def world_from_env() -> World:
    """The process's place in a torchrun launch; a single process when not launched so."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    return World(rank=int(os.environ.get("RANK", "0")), local_rank=int(os.environ.get("LOCAL_RANK", "0")), size=size)


def rank_device(world: World, device: torch.device) -> torch.device:
    """On CUDA each rank takes the GPU numbered by its local rank, whatever ``device``
    said: N processes on one GPU would only fight over it."""
    if world.distributed and device.type == "cuda":
        return torch.device("cuda", world.local_rank)
    return device


def start(world: World, device: torch.device) -> torch.device:
    """Join the process group (once) and return this rank's device (:func:`rank_device`)."""
    if not world.distributed:
        return device
    device = rank_device(world, device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=timedelta(minutes=30))
        log.info("rank %d/%d joined (%s) on %s", world.rank, world.size, backend, device)
    return device


def stop() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when any rank says True (a cancel seen by one stops all together)."""
    if not dist.is_initialized():
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


def from_main(compute: Callable[[], T], world: World) -> T:
    """Rank 0 computes, every rank gets rank 0's answer (one decision for all ranks)."""
    if not dist.is_initialized():
        return compute()
    box: list[object] = [compute() if world.main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]  # type: ignore[return-value]


def gather(value: object) -> list[object]:
    """Every rank's ``value``, in rank order (one-process runs: ``[value]``)."""
    if not dist.is_initialized():
        return [value]
    out: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def parameter_digest(module: torch.nn.Module) -> str:
    """sha256 of the parameters' bytes: equal across ranks when gradients were synchronised.

    Parameters only: batch-norm running statistics are per rank between broadcasts.
    """
    import hashlib

    digest = hashlib.sha256()
    for tensor in module.parameters():
        digest.update(tensor.detach().to("cpu").contiguous().numpy().tobytes())
    return digest.hexdigest()
