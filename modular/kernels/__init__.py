"""Expert compute: grouped matmuls over contiguous per-expert segments, and the token dispatcher.

`grouped_mm` picks an implementation by backend (torch on CPU, Triton on CUDA, megablocks if asked).
"""

from modular.kernels.dispatch import combine, permute, sort_by_expert
from modular.kernels.grouped_mm import grouped_mm, resolve_backend

__all__ = ["combine", "grouped_mm", "permute", "resolve_backend", "sort_by_expert"]
