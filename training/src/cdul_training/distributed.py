"""Process-group setup for training under `torchrun` (DistributedDataParallel)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

_logger = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class DistributedContext:
    """Rank of this process among `world_size` processes, and its device."""

    world_size: int
    rank: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Whether this process writes the run folder (rank 0)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Whether a process group with more than one process is active."""
        return self.world_size > 1


def resolve_device(request: str, local_rank: int = 0) -> torch.device:
    """Return the device for `request` (`auto`, `cpu` or `cuda`).

    Raises:
        ValueError: `cuda` was requested and no CUDA device is present, since a silent fall
            back to the CPU would hide a misconfigured machine.
    """
    if request not in DEVICES:
        raise ValueError(f"unknown device {request!r}: use one of {DEVICES}")
    if request == "cpu" or (request == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError("--device cuda requested but no CUDA device is available: use cpu")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def init_distributed(device_request: str = "auto") -> DistributedContext:
    """Join the process group that `torchrun` describes, or run as a single process.

    `torchrun` sets WORLD_SIZE, RANK and LOCAL_RANK. With more than one process the backend is
    NCCL on CUDA devices and gloo on the CPU.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_request, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
        _logger.info("joined process group: rank %d of %d, backend %s", rank, world_size, backend)
    return DistributedContext(world_size, rank, local_rank, device)


def all_reduce_sum(tensor: torch.Tensor, context: DistributedContext) -> torch.Tensor:
    """Sum `tensor` over all processes in place and return it (no-op in a single process)."""
    if context.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_object(value: object, context: DistributedContext) -> object:
    """Return rank 0's `value` on every process."""
    if not context.distributed:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def barrier(context: DistributedContext) -> None:
    """Wait for every process (no-op in a single process)."""
    if context.distributed:
        dist.barrier()


def shutdown(context: DistributedContext) -> None:
    """Leave the process group if this process joined one."""
    if context.distributed and dist.is_initialized():
        dist.destroy_process_group()
