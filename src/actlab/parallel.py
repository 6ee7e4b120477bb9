"""Data parallelism on torch.distributed: who this process is, which windows are its own, and how results meet.

Under `torchrun` (or `actlab ... --nproc N`, which launches torchrun) every rank loads the model and builds the
same deterministic windows; `rounds` deals them out so that after every round the windows done by all ranks
together are a prefix of the whole list (a checkpoint is then a prefix count, as in one process, and a run
resumes with any number of processes). Statistics meet on rank 0 through `gather`, which hands each rank's
object to rank 0 in rank order: the caller folds them with the statistic's own merge rule (sum, min, max,
Chan's update, top-k), so distributed results are a single process's up to the order of float additions.
A task's items are split in blocks (`shard`) and their records meet on every rank (`all_gather`); calibration
statistics are sums over each rank's block of windows, added up on every rank (`all_reduce_sum`).
Rank 0 alone writes to disk; a failure it finds before the work starts reaches every rank through `agree`.
gloo on CPU, NCCL where CUDA is present.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from actlab.errors import ActlabError, ConfigError

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def launched_size() -> int:
    """The number of processes torchrun started (1 outside torchrun), before any process group exists."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ConfigError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number") from None


def world() -> World:
    """This process's place: initialises the process group the first time under torchrun (WORLD_SIZE > 1)."""
    import torch
    import torch.distributed as dist

    if not dist.is_available():
        return World()
    if not dist.is_initialized():
        if launched_size() <= 1:
            return World()
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)
    return World(dist.get_rank(), dist.get_world_size())


def rounds(count: int, batch_size: int, world: World, start: int = 0) -> Iterator[range]:
    """For windows [start, count): per round, the window indices this rank runs (possibly none, in the last
    round). Round j covers windows start + j*size*batch .. + (j+1)*size*batch; rank r takes its r-th batch."""
    per_round = batch_size * world.size
    for lo in range(start, count, per_round):
        first = min(count, lo + world.rank * batch_size)
        yield range(first, min(count, first + batch_size))


def round_end(count: int, batch_size: int, world: World, start: int, done_rounds: int) -> int:
    """The prefix of windows covered once `done_rounds` rounds from `start` are finished on every rank."""
    return min(count, start + done_rounds * batch_size * world.size)


def shard(count: int, world: World) -> range:
    """This rank's contiguous block of `count` items (blocks in rank order cover them all, sizes within one)."""
    return range(count * world.rank // world.size, count * (world.rank + 1) // world.size)


def _object_device() -> Any:
    import torch
    import torch.distributed as dist

    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def gather(obj: T, world: World) -> list[T] | None:
    """Every rank's `obj` on rank 0 (in rank order); None on the other ranks. Tensors travel as CPU tensors."""
    if not world.distributed:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * world.size if world.main else None  # type: ignore[assignment]
    dist.gather_object(obj, out, dst=0)
    return out


def all_gather(obj: T, world: World) -> list[T]:
    """Every rank's `obj` on every rank, in rank order."""
    if not world.distributed:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * world.size
    dist.all_gather_object(out, obj)
    return out


def broadcast(obj: T, world: World) -> T:
    """Rank 0's `obj` on every rank."""
    if not world.distributed:
        return obj
    import torch.distributed as dist

    box = [obj if world.main else None]
    dist.broadcast_object_list(box, src=0, device=_object_device())
    return box[0]


def agree(world: World, work: Callable[[], T]) -> T:
    """Run `work` on rank 0 and hand its result to every rank; should it raise an actlab error, every rank raises
    the same error (the others would otherwise wait for rank 0 forever)."""
    if not world.distributed:
        return work()
    failure: ActlabError | None = None
    result: Any = None
    if world.main:
        try:
            result = work()
        except ActlabError as exc:
            failure = exc
    failure, result = broadcast((failure, result), world)
    if failure is not None:
        raise failure
    return result


def all_reduce_sum(tensors: list[Any], world: World) -> None:
    """Sum each tensor over the ranks, in place (every rank ends with the total)."""
    if not world.distributed:
        return
    import torch.distributed as dist

    device = _object_device()
    for t in tensors:
        moved = t.to(device) if t.device != device else t
        dist.all_reduce(moved, op=dist.ReduceOp.SUM)
        if moved is not t:
            t.copy_(moved.cpu())


def barrier(world: World) -> None:
    if world.distributed:
        import torch.distributed as dist

        dist.barrier()


def shutdown() -> None:
    """Leave the process group (at the end of a command): without it the launcher waits for a timeout."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def launched_rank() -> int:
    """This process's rank as torchrun set it (0 outside torchrun), before any process group exists."""
    return int(os.environ.get("RANK", "0") or 0)


def launch(nproc: int, argv: list[str]) -> int:
    """Run the command line `argv` (without --nproc) on `nproc` local processes through torch's elastic launcher
    (what `torchrun --standalone --nproc-per-node N` runs); the exit code of the first process that failed, else 0.
    Each process gets an equal share of the cores unless OMP_NUM_THREADS says otherwise."""
    import logging
    import sys
    import uuid

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    from actlab.threads import cores_available

    if nproc < 1:
        raise ConfigError(f"--nproc must be at least 1, got {nproc}")
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, cores_available() // nproc)))
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)  # the workers report their errors
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=uuid.uuid4().hex,
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.1)
    try:
        elastic_launch(config, sys.executable)("-m", "actlab", *argv)
    except ChildFailedError as exc:
        codes = [failure.exitcode for _, failure in sorted(exc.failures.items())]
        return next((c for c in codes if c > 0), 1)
    return 0


def without_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out
