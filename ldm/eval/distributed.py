"""Running an evaluation on several processes: process group, job sharding, gathering to rank 0.

Assumptions
- A multi-process run is started by `torchrun` (or `python -m torch.distributed.run`), which sets
  WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR and MASTER_PORT. Without WORLD_SIZE > 1 everything here
  is a no-op for a single process (rank 0 of 1), so callers write one code path.
- CPU runs use the gloo backend; CUDA runs use nccl with one GPU per process, `cuda:LOCAL_RANK`.
- Jobs are independent and each one's result depends only on the job (seeded noise, its own batch),
  so which process runs a job does not change its numbers: rank 0 can merge the gathered results
  and write exactly what a single process would have written.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


@dataclass(frozen=True)
class ProcessGroup:
    """Where this process stands: rank `rank` of `world_size`, computing on `device`."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def launched_with_several_processes() -> bool:
    """True under torchrun with more than one process (WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@contextmanager
def process_group(device: torch.device) -> Iterator[ProcessGroup]:
    """Join the torchrun process group for the duration of the block (a no-op for a single process).

    `device` is the device the user asked for: a CUDA device becomes this process's own GPU
    (`cuda:LOCAL_RANK`, backend nccl); anything else runs on the CPU with gloo.
    """
    if not launched_with_several_processes():
        yield ProcessGroup(device=device)
        return
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        # nccl's object collectives put their buffers on the current device.
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    dist.init_process_group(backend=backend)
    try:
        yield ProcessGroup(rank=dist.get_rank(), world_size=dist.get_world_size(), device=device)
    finally:
        dist.destroy_process_group()


def shard(jobs: Sequence[T], group: ProcessGroup) -> list[T]:
    """This process's share of `jobs`: every world_size-th job from position `rank`.

    Round-robin rather than contiguous blocks, because jobs are ordered by configuration and
    configurations differ in cost: interleaving gives every process a similar mix.
    """
    return list(jobs[group.rank::group.world_size])


def gather_to_main(items: list[T], group: ProcessGroup) -> Optional[list[T]]:
    """All processes' `items` concatenated on rank 0 (in rank order); None on the other ranks."""
    if not group.distributed:
        return list(items)
    gathered: Optional[list[Any]] = [None] * group.world_size if group.is_main else None
    dist.gather_object(items, gathered, dst=0)
    if not group.is_main:
        return None
    return [item for part in gathered for item in part]


def broadcast_from_main(value: T, group: ProcessGroup) -> T:
    """Rank 0's `value` on every rank (picklable objects only)."""
    if not group.distributed:
        return value
    box = [value if group.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]
