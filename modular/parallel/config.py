"""The `parallel` config group: expert-parallel and data-parallel sizes and the collective backend.

Static checks run with every config (`validate_parallel`); the checks against the number of processes
torchrun started run when the process group is set up (`modular.parallel.mesh.mesh_shape`).
"""

# OmegaConf 2.3 reads typing.Optional in structured configs but not `X | None`.
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from modular.errors import ConfigError

BACKENDS = ("auto", "gloo", "nccl")


@dataclass
class ParallelConfig:
    """ep · dp processes: each MoE layer's experts split over `ep` ranks, everything else replicated."""

    ep: int = 1  # expert-parallel size: ranks that share one copy of every MoE layer's experts
    dp: Optional[int] = None  # data-parallel size (replicas of each expert slice); null = world size / ep
    backend: str = "auto"  # auto (nccl on CUDA, gloo on the CPU) | gloo | nccl


def validate_parallel(cfg, expert_counts: list[int], moe_layers: list[int]) -> None:
    """Checks that need no process group: sizes, backend, and experts divisible among the EP ranks."""
    p = cfg.parallel
    if not (isinstance(p.ep, int) and p.ep >= 1):
        raise ConfigError(f"parallel.ep={p.ep} is not allowed; it must be an integer >= 1.")
    if p.dp is not None and not (isinstance(p.dp, int) and p.dp >= 1):
        raise ConfigError(f"parallel.dp={p.dp} is not allowed; it must be an integer >= 1, or null for "
                          "world size / parallel.ep.")
    if p.backend not in BACKENDS:
        raise ConfigError(f"parallel.backend='{p.backend}' is unknown; allowed: {', '.join(BACKENDS)}.")
    for layer, count in zip(moe_layers, expert_counts):
        if count % p.ep:
            raise ConfigError(
                f"parallel.ep={p.ep} does not divide the {count} experts of layer {layer}; every MoE layer's "
                f"expert count must be a multiple of parallel.ep (e.g. parallel.ep={_largest_divisor(count, p.ep)})."
            )


def _largest_divisor(count: int, at_most: int) -> int:
    return max(d for d in range(1, min(count, at_most) + 1) if count % d == 0)
