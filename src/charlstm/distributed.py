"""Data-parallel training under ``torchrun``: one process per device, DistributedDataParallel.

``torchrun --nproc_per_node N -m charlstm train ...`` starts N copies of the command with
``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` set; ``Distributed.from_env`` joins them into one process
group (gloo on CPU, NCCL on CUDA, one GPU per process). What the ranks must agree on goes
through here: the global streams are cut into one contiguous block of rows per rank, every
rank takes the same steps, the learning rate and the stop decisions come from rank 0,
validation is sharded and summed, and the resume state of every rank is gathered into rank
0's ``last.safetensors``. A single process gets ``Distributed()`` (world size 1), for which
every method is a no-op.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist

from .errors import CharLSTMError


@dataclass(frozen=True)
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, device: str = "auto") -> "Distributed":
        """Join the process group torchrun describes in the environment (none: one process)."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
        use_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
        if not dist.is_available():
            raise CharLSTMError("this PyTorch build has no torch.distributed; run one process")
        if use_cuda:
            if local >= torch.cuda.device_count():
                raise CharLSTMError(f"LOCAL_RANK {local}: this machine has {torch.cuda.device_count()} GPUs; "
                                    "use --nproc_per_node at most that")
            torch.cuda.set_device(local)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if use_cuda else "gloo")
        return cls(rank, world, local)

    def device_name(self, requested: str) -> str:
        """One device per process: rank r of a node uses cuda:LOCAL_RANK."""
        if self.active and (requested.startswith("cuda") or (requested == "auto" and torch.cuda.is_available())):
            return f"cuda:{self.local_rank}"
        return "cpu" if self.active and requested == "auto" else requested

    def check_batch(self, batch_size: int) -> int:
        """Each rank's share of the global batch of streams."""
        if batch_size % self.world_size:
            raise CharLSTMError(f"--batch-size {batch_size} must be a multiple of the {self.world_size} "
                                "processes (each takes an equal share of the streams)")
        return batch_size // self.world_size

    def rows(self, batch_size: int) -> slice:
        """This rank's contiguous block of the global batch's rows (streams)."""
        share = batch_size // self.world_size
        return slice(self.rank * share, (self.rank + 1) * share)

    def sum(self, values: list[float], device: torch.device) -> list[float]:
        """Element-wise sum over ranks (float64, so that loss sums stay exact enough)."""
        if not self.active:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return t.tolist()

    def agree_later(self, stop: bool, main_only: list[float], device: torch.device
                    ) -> Callable[[], tuple[bool, list[float]]]:
        """Stop if any rank asks to; ``main_only`` values (the learning rate, rank 0's clock) are
        taken from rank 0 so every rank does the same. Started now, finished when the returned
        function is called: the small all-reduce runs in gloo's thread while this rank computes
        a step, instead of making the ranks wait for each other once more per step."""
        if not self.active:
            return lambda: (stop, list(main_only))
        mine = torch.tensor([float(stop)] + [v if self.is_main else 0.0 for v in main_only], dtype=torch.float64,
                            device=device)
        work = dist.all_reduce(mine, async_op=True)

        def result() -> tuple[bool, list[float]]:
            work.wait()
            summed = mine.tolist()
            return summed[0] > 0, summed[1:]
        return result

    def gather(self, obj) -> list | None:
        """Every rank's ``obj`` on rank 0 (None elsewhere); a collective every rank must call."""
        if not self.active:
            return [obj]
        out = [None] * self.world_size if self.is_main else None
        dist.gather_object(obj, out, dst=0)
        return out

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every rank."""
        if not self.active:
            return obj
        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def sum_gradients_in_shared_memory(self, ddp: torch.nn.Module, numel: int) -> bool:
        """Have ``ddp`` sum its gradient buckets through shared memory when every rank runs on
        this machine's CPU (see ``SharedMemorySum``); False (DDP's own all-reduce) otherwise."""
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "0")) == self.world_size
        if not self.active or dist.get_backend() != "gloo" or not local:
            return False
        shared = SharedMemorySum.open(self, numel)
        if shared is None:
            return False
        ddp.register_comm_hook(None, shared.hook)
        return True

    def shard(self, ids: np.ndarray) -> tuple[np.ndarray, int]:
        """This rank's contiguous piece of ``ids`` and where it starts (for sharded scoring)."""
        bounds = np.linspace(0, len(ids), self.world_size + 1).astype(np.int64)
        return ids[bounds[self.rank]:bounds[self.rank + 1]], int(bounds[self.rank])

    def close(self) -> None:
        if self.active and dist.is_initialized():
            dist.destroy_process_group()


SHARED_MEMORY_DIR = Path("/dev/shm")


class SharedMemorySum:
    """DDP's gradient all-reduce for ranks on one machine, through one shared-memory block:
    each rank writes its bucket (already divided by the world size, as DDP's own hook does)
    into its slot, the ranks meet at a barrier, and each adds the slots up itself, in rank
    order, so every rank gets the same bits. (gloo's all-reduce goes through TCP loopback:
    about 3 ms a step for the 2 x 256 model on a quiet 2-core machine.) Two sets of
    slots alternate: a rank may write the next bucket while another still reads this one.
    The file is unlinked as soon as every rank has mapped it, so nothing is left behind."""

    def __init__(self, slots: torch.Tensor, rank: int):
        self.slots, self.rank, self.calls = slots, rank, 0

    @classmethod
    def open(cls, group: Distributed, numel: int) -> "SharedMemorySum | None":
        name = group.broadcast(f"charlstm-ddp-{os.getpid()}-{time.time_ns()}")
        path, size = SHARED_MEMORY_DIR / name, 2 * group.world_size * numel
        if group.is_main:
            try:
                with open(path, "wb") as handle:  # pages reserved now: a full /dev/shm fails here, not mid-run
                    os.posix_fallocate(handle.fileno(), 0, size * 4)
            except OSError:
                path.unlink(missing_ok=True)
        group.barrier()  # the same collectives on every rank, whatever failed
        try:
            slots = torch.from_file(str(path), shared=True, size=size, dtype=torch.float32)
        except (OSError, RuntimeError):
            slots = None
        ok = group.sum([float(slots is not None)], torch.device("cpu"))[0] == group.world_size
        group.barrier()  # everyone has mapped it (or given up): the name can go
        if group.is_main:
            path.unlink(missing_ok=True)
        return cls(slots.view(2, group.world_size, numel), group.rank) if ok else None

    def hook(self, _state, bucket):  # no annotations: DDP checks them, and these would be strings
        """DDP's communication hook: the bucket's gradients averaged over the ranks, in place."""
        grads = bucket.buffer()
        slots = self.slots[self.calls % 2, :, :grads.numel()]
        self.calls += 1
        torch.div(grads, len(slots), out=slots[self.rank])
        dist.barrier()
        torch.sum(slots, dim=0, out=grads)
        done = torch.futures.Future()
        done.set_result(grads)
        return done
