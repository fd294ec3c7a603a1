"""Calibration across processes with torch.distributed (``torchrun --nproc-per-node N d2export ...``).

Each rank holds a contiguous share of the calibration batches and their activations. The sums the
method needs (Hessian moments, DAC teacher and student sums) are reduced by an *ordered chain*:
rank 0 adds its batches' terms to a zero running sum, passes it to rank 1, which adds its own, and
so on; the last rank broadcasts the total. These are the same floating-point additions in the same
order as one process makes, so N processes give bit-identical codes. The units of work of one group
(``pipeline._plan``: linears on one row-independent grid are a single unit) are dealt to the ranks in
turn, solved there and broadcast; rank 0 writes. gloo on CPU, NCCL on CUDA.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch

from d2quant.errors import D2Error, Interrupted


@dataclass(frozen=True)
class Group:
    rank: int = 0
    world: int = 1

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def writes(self) -> bool:
        """Rank 0 writes checkpoints and files and prints."""
        return self.rank == 0

    def share_of(self, n: int) -> range:
        """This rank's contiguous share of ``n`` batches."""
        if n < self.world:
            raise D2Error(f"{n} calibration batches cannot be split over {self.world} processes; "
                          "use more --nsamples or fewer processes")
        lo, hi = n * self.rank // self.world, n * (self.rank + 1) // self.world
        return range(lo, hi)

    def owner(self, j: int) -> int:
        return j % self.world

    def ordered_sum(self, terms: list[torch.Tensor], shape, device, dtype=torch.float64) -> torch.Tensor:
        """sum(terms of rank 0, then rank 1, ...) added one by one in that order."""
        acc = torch.zeros(shape, dtype=dtype, device=device)
        if self.active and self.rank > 0:
            _comm(lambda: torch.distributed.recv(acc, src=self.rank - 1))
        for t in terms:
            acc += t
        if self.active:
            if self.rank < self.world - 1:
                _comm(lambda: torch.distributed.send(acc, dst=self.rank + 1))
            _comm(lambda: torch.distributed.broadcast(acc, src=self.world - 1))
        return acc

    def count(self, n: int) -> int:
        if not self.active:
            return n
        t = torch.tensor([n], dtype=torch.int64, device=_comm_device())
        _comm(lambda: torch.distributed.all_reduce(t))
        return int(t.item())

    def share(self, obj, src: int):
        """``obj`` of rank ``src`` on every rank (tensors inside travel on the CPU)."""
        if not self.active:
            return obj
        box = [obj if self.rank == src else None]
        _comm(lambda: torch.distributed.broadcast_object_list(box, src=src, device=_comm_device()))
        return box[0]

    def barrier(self) -> None:
        if self.active:
            _comm(torch.distributed.barrier)


SINGLE = Group()


def _comm_device():
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _comm(op):
    try:
        return op()
    except RuntimeError as e:  # gloo / NCCL report a dead peer or a timeout as RuntimeError
        raise Interrupted(f"lost contact with the other calibration processes ({str(e).splitlines()[0][:160]}); "
                          "a rank died or timed out: the partial checkpoint resumes with --resume") from e


def from_env(device: str) -> Group:
    """The process group torchrun set up (WORLD_SIZE, RANK, LOCAL_RANK), or a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return SINGLE
    if not torch.distributed.is_initialized():
        cuda = device != "cpu" and torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        torch.distributed.init_process_group("nccl" if cuda else "gloo",
                                             timeout=datetime.timedelta(minutes=30))
    return Group(torch.distributed.get_rank(), torch.distributed.get_world_size())
