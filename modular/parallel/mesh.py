"""The process mesh: torchrun's WORLD_SIZE processes arranged as dp × ep, and the groups they talk over.

Rank r sits at (dp_rank, ep_rank) = divmod(r, ep): the ranks of one EP group are consecutive, so with
ep <= GPUs per node the all-to-all stays inside a node (NVLink) and only gradients cross nodes.
Every rank holds its own slice of the global batch; dense parameters are replicated on all ranks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from modular.errors import ConfigError, UserError

_CURRENT: ParallelContext | None = None


@dataclass
class ParallelContext:
    """This process's place in the mesh. Groups: `world` (all ranks), `ep` (the ranks sharing one copy of
    the experts), `dp` (the replicas of this rank's expert slice)."""

    rank: int
    world_size: int
    local_rank: int
    dp: int
    ep: int
    device: torch.device
    backend: str
    mesh: object | None = None  # torch.distributed.device_mesh.DeviceMesh
    world_group: object | None = None  # None = the default group
    ep_group: object | None = None
    dp_group: object | None = None

    @property
    def ep_rank(self) -> int:
        return self.rank % self.ep

    @property
    def dp_rank(self) -> int:
        return self.rank // self.ep

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        dist.barrier(group=self.world_group)

    def broadcast_object(self, obj):
        """Rank 0's `obj` on every rank (e.g. a run folder whose name holds a timestamp)."""
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.world_group)
        return box[0]

    def mean(self, *values: float) -> list[float]:
        """The mean over all ranks of each value (for logging per-rank losses as the global-batch loss)."""
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, group=self.world_group)
        return (t / self.world_size).tolist()

    def all_true(self, flag: bool) -> bool:
        """True on every rank iff it is true on every rank (so all ranks take the same branch)."""
        t = torch.tensor([0 if flag else 1], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, group=self.world_group)
        return int(t.item()) == 0

    def any_true(self, flag: bool) -> bool:
        return not self.all_true(not flag)

    def main_first(self, fn):
        """fn() on rank 0, then on the other ranks (e.g. rank 0 fills a cache the others read).

        An error on rank 0 is raised on every rank, so none is left waiting for it.
        """
        if self.is_main:
            try:
                result = fn()
            except BaseException as exc:
                self.broadcast_object(exc if isinstance(exc, UserError) else
                                      RuntimeError(f"rank 0 failed: {type(exc).__name__}: {exc}"))
                raise
            self.broadcast_object(None)
            return result
        error = self.broadcast_object(None)
        if error is not None:
            raise error
        return fn()

    def main_only(self, fn):
        """fn() on rank 0 alone (e.g. locking the run folder); an error there is raised on every rank."""
        result, error = None, None
        if self.is_main:
            try:
                result = fn()
            except BaseException as exc:  # noqa: BLE001  (the other ranks must stop too, not wait for us)
                error = exc
        shared = self.broadcast_object(
            None if error is None else error if isinstance(error, UserError) else
            RuntimeError(f"rank 0 failed: {type(error).__name__}: {error}"))
        if error is not None:
            raise error
        if shared is not None:
            raise shared
        return result


def current() -> ParallelContext | None:
    """The context `init_parallel` set up in this process, or None for a single-process run."""
    return _CURRENT


def mesh_shape(world_size: int, ep: int, dp: int | None) -> tuple[int, int]:
    """(dp, ep) for `world_size` processes; raises ConfigError naming the sizes when they do not fit."""
    if ep > world_size:
        raise ConfigError(
            f"parallel.ep={ep} needs at least {ep} processes, but WORLD_SIZE={world_size}; launch with "
            f"torchrun --nproc_per_node={ep} (or more) or lower parallel.ep."
        )
    if dp is None:
        if world_size % ep:
            raise ConfigError(
                f"WORLD_SIZE={world_size} is not a multiple of parallel.ep={ep}; start a multiple of {ep} processes "
                f"or set parallel.ep to a divisor of {world_size}."
            )
        return world_size // ep, ep
    if dp * ep != world_size:
        raise ConfigError(
            f"parallel.dp={dp} × parallel.ep={ep} = {dp * ep} processes, but WORLD_SIZE={world_size}; set "
            f"parallel.dp=null (world size / ep) or start {dp * ep} processes."
        )
    return dp, ep


def _world_from_env() -> tuple[int, int, int]:
    try:
        return (int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")),
                int(os.environ.get("LOCAL_RANK", "0")))
    except ValueError:
        raise ConfigError(
            f"RANK={os.environ.get('RANK')!r}, WORLD_SIZE={os.environ.get('WORLD_SIZE')!r}, "
            f"LOCAL_RANK={os.environ.get('LOCAL_RANK')!r} are not integers; launch with torchrun."
        ) from None


def init_parallel(cfg, timeout: timedelta | None = None) -> ParallelContext | None:
    """Set up the process group and the (dp, ep) mesh from torchrun's environment.

    Returns None (and touches nothing) for one process with parallel.ep=1, so the single-process path
    is unchanged. Called again in the same process it returns the context already set up.
    """
    global _CURRENT
    if _CURRENT is not None:
        return _CURRENT
    p = cfg.parallel
    rank, world_size, local_rank = _world_from_env()
    dp, ep = mesh_shape(world_size, int(p.ep), None if p.dp is None else int(p.dp))
    if world_size == 1:
        return None
    want = cfg.train.device
    cuda = torch.cuda.is_available() and want != "cpu"
    backend = p.backend if p.backend != "auto" else ("nccl" if cuda else "gloo")
    if backend == "nccl" and not cuda:
        raise ConfigError("parallel.backend=nccl needs CUDA devices, but this run is on the CPU; use "
                          "parallel.backend=gloo (or auto).")
    if cuda:
        torch.cuda.set_device(local_rank)  # train.device=cuda then means this rank's own GPU
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=rank, world_size=world_size,
                                timeout=timeout or timedelta(minutes=30))
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (dp, ep), mesh_dim_names=("dp", "ep"))
    _CURRENT = ParallelContext(rank=rank, world_size=world_size, local_rank=local_rank, dp=dp, ep=ep,
                               device=device, backend=backend, mesh=mesh, world_group=None,
                               ep_group=mesh["ep"].get_group(), dp_group=mesh["dp"].get_group())
    return _CURRENT


def shutdown() -> None:
    """Leave the process group (end of a parallel run)."""
    global _CURRENT
    if _CURRENT is not None and dist.is_initialized():
        dist.destroy_process_group()
    _CURRENT = None


def run_command(cfg, all_overrides: list[str], folder, body):
    """body(cfg, all_overrides, folder, parallel) in one process (parallel None), or on every torchrun rank.

    Under torchrun every rank gets rank 0's overrides and run folder (its name may hold a timestamp),
    and the process group is left however body ends.
    """
    parallel = init_parallel(cfg)
    if parallel is None:
        return body(cfg, all_overrides, folder, None)
    try:
        all_overrides, folder = parallel.broadcast_object((all_overrides, folder))
        return body(cfg, all_overrides, folder, parallel)
    finally:
        shutdown()
