"""RMSNorm exactly as Hugging Face Llama computes it (variance in float32, scale in the input dtype)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor, ctx=None, adapters=None) -> Tensor:
        """adapters: domain deltas on the scale (models/adapters.py), for their rows."""
        dtype = x.dtype
        h = x.to(torch.promote_types(dtype, torch.float32))
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        weight = self.weight if adapters is None else adapters.scale_for(self.weight, ctx, x.shape[0], x.dim())
        return weight * h.to(dtype)
