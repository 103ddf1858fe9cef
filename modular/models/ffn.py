"""The dense SwiGLU FFN of Llama: down_proj(silu(gate_proj(x)) * up_proj(x))."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from modular.models.adapters import adapted, place


class SwiGLUFFN(nn.Module):
    def __init__(self, d_model: int, ffn_dim: int):
        super().__init__()
        self.ffn_dim = ffn_dim
        self.gate_proj = nn.Linear(d_model, ffn_dim, bias=False)
        self.up_proj = nn.Linear(d_model, ffn_dim, bias=False)
        self.down_proj = nn.Linear(ffn_dim, d_model, bias=False)

    def forward(self, x: Tensor, ctx=None, adapters=None) -> Tensor:
        """adapters: the layer's domain deltas by projection name (models/adapters.py), applied to their rows."""
        if not adapters:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        a = adapters
        h = F.silu(adapted(self.gate_proj, x, place(a, "gate_proj"), ctx)) * adapted(self.up_proj, x, place(a, "up_proj"), ctx)
        return adapted(self.down_proj, h, place(a, "down_proj"), ctx)
