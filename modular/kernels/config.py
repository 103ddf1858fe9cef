"""The `kernels` config group: which implementation runs the experts' grouped matmuls."""

from __future__ import annotations

from dataclasses import dataclass

from modular.errors import require

BACKENDS = ("auto", "torch", "triton", "megablocks")


@dataclass
class KernelsConfig:
    """Which implementation runs the experts' grouped matmuls."""

    backend: str = "auto"  # auto | torch | triton | megablocks


def validate_kernels(cfg) -> None:
    k = cfg.kernels
    require(k.backend in BACKENDS, f"kernels.backend='{k.backend}' is unknown; allowed: {', '.join(BACKENDS)}.")
