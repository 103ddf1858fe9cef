"""Causal grouped-query self-attention (Llama): q/k/v/o projections without bias, RoPE, SDPA."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from modular.models.adapters import adapted, place
from modular.models.rope import apply_rotary


class Attention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads
        self.head_dim = d_model // n_heads
        self.q_proj = nn.Linear(d_model, n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d_model, n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d_model, n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(n_heads * self.head_dim, d_model, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, ctx=None, adapters=None) -> Tensor:
        """adapters: the layer's domain deltas by projection name (models/adapters.py), applied to their rows."""
        B, T, _ = x.shape
        a = adapters
        q = adapted(self.q_proj, x, place(a, "q_proj"), ctx).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = adapted(self.k_proj, x, place(a, "k_proj"), ctx).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = adapted(self.v_proj, x, place(a, "v_proj"), ctx).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        # (B, h, T, hd) and (B, kvh, T, hd)
        q, k = apply_rotary(q, k, cos, sin)
        if self.n_kv_heads != self.n_heads:
            repeat = self.n_heads // self.n_kv_heads
            k = k.repeat_interleave(repeat, dim=1)  # (B, h, T, hd); same grouping as HF's repeat_kv
            v = v.repeat_interleave(repeat, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, h, T, hd)
        return adapted(self.o_proj, y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim), place(a, "o_proj"), ctx)
