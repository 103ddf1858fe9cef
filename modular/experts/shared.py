"""Always-on shared experts (DeepSeek-MoE): a SwiGLU FFN every token passes through, beside routing.

n shared experts of width F are one SwiGLU FFN of width n·F (the same function, one matmul each).
"""

from __future__ import annotations

from torch import Tensor, nn


class SharedExperts(nn.Module):
    def __init__(self, d_model: int, ffn_dim: int, num_shared: int):
        from modular.models.ffn import SwiGLUFFN  # here, not at import: models imports experts

        super().__init__()
        self.num_shared = num_shared
        self.ffn_dim = ffn_dim
        self.ffn = SwiGLUFFN(d_model, ffn_dim * num_shared)

    def forward(self, x_TD: Tensor) -> Tensor:
        return self.ffn(x_TD)
