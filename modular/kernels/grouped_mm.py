"""Grouped matmul `y[seg_e] = x[seg_e] @ w[e].T` for tokens sorted by expert, with backend selection.

Weights are stacked like nn.Linear (out × in) per expert: w [E, M, K]; counts [E] are the rows of
each expert's contiguous segment of x [N, K] (zeros allowed: an empty expert gets zero gradient).
The torch path (kernels/torch_gmm.py) is torch._grouped_mm with its own backward, or a per-segment
loop where that op cannot run (float64, widths whose rows are not a multiple of 16 bytes).
"""

from __future__ import annotations

import importlib.util

import torch
from torch import Tensor

from modular.errors import ConfigError
from modular.kernels.autocast import autocast_inputs
from modular.kernels.torch_gmm import torch_grouped_mm

BACKENDS = ("auto", "torch", "triton", "megablocks")


def resolve_backend(backend: str, device: torch.device) -> str:
    """`auto` is Triton on CUDA and the torch path elsewhere; explicit choices are checked."""
    if backend not in BACKENDS:
        raise ConfigError(f"kernels.backend='{backend}' is unknown; allowed: {', '.join(BACKENDS)}.")
    if backend == "auto":
        return "triton" if device.type == "cuda" and _triton_available() else "torch"
    if backend == "megablocks" and importlib.util.find_spec("megablocks") is None:
        raise ConfigError(
            "kernels.backend='megablocks' was asked for, but the megablocks package is not installed "
            "(it needs CUDA and an exact torch version to build); use kernels.backend=auto, torch or triton."
        )
    if backend == "triton" and not _triton_available():
        raise ConfigError("kernels.backend='triton' was asked for, but triton cannot be imported here; use torch.")
    return backend


def _triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def grouped_mm(x: Tensor, w: Tensor, counts: Tensor, backend: str = "torch") -> Tensor:
    """x [N, K], w [E, M, K], counts [E] int64 with sum N → [N, M]; differentiable in x and w.
    Under torch.autocast x and w are cast to its dtype first, as an nn.Linear's would be."""
    x, w = autocast_inputs(x.device.type, x, w)
    if backend == "triton":
        from modular.kernels.triton_gmm import triton_grouped_mm

        return triton_grouped_mm(x, w, counts)
    if backend == "megablocks":
        from megablocks import grouped_gemm_util as gg  # only importable where megablocks was built

        return gg.ops.gmm(x, w, counts.cpu(), trans_b=True)
    return torch_grouped_mm(x, w, counts)
