"""One process or many: the ``torchrun`` environment as a small context object.

Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) the process group is created with
NCCL on GPUs and gloo on CPUs; each process uses GPU ``LOCAL_RANK``. Rank 0 writes the run
folder; every rank computes.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any, List

import torch
import torch.distributed as dist


@dataclass
class DistContext:
    """Rank, world size and device of this process."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    initialised: bool = False

    @property
    def main(self) -> bool:
        """True on the process that writes files and logs (rank 0)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum of ``t`` over ranks (a copy; ``t`` unchanged)."""
        t = t.clone()
        if self.distributed:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def gather_objects(self, obj: Any) -> List[Any]:
        """``obj`` of every rank, in rank order, on every rank."""
        if not self.distributed:
            return [obj]
        out: List[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        """Leaves the process group. On a normal end every rank first waits for the others, so
        no rank tears its connections down while another is still in a collective (gloo aborts
        the process then); after an error the group is left at once."""
        if self.initialised and dist.is_initialized():
            if sys.exc_info()[0] is None:
                dist.barrier()
            dist.destroy_process_group()


def init_distributed(device: str = "auto") -> DistContext:
    """Reads the ``torchrun`` environment and joins the process group when there is one.

    Args:
        device: ``auto`` (GPU ``LOCAL_RANK`` when CUDA is available, else the CPU), ``cpu`` or ``cuda``.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        from ..errors import UnavailableError

        raise UnavailableError("--device cuda: torch sees no CUDA GPU here")
    dev = torch.device("cuda", local % max(1, torch.cuda.device_count())) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    ctx = DistContext(rank, world, local, dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", rank=rank, world_size=world,
                                device_id=dev if use_cuda else None)
        ctx.initialised = True
    return ctx
