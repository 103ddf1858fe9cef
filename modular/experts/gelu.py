"""GELU MLP experts (GPT-style FFN without biases): y = W_out · gelu(W_in · x)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modular.experts.base import ExpertBank, register_expert
from modular.kernels.grouped_mm import grouped_mm


@register_expert("gelu")
class GeluBank(ExpertBank):
    expert_param_names = ("w_in", "w_out")

    def __init__(self, d_model: int, ffn_dim: int, num_experts: int, init_std: float = 0.02):
        super().__init__(d_model, ffn_dim, num_experts, init_std)
        self.w_in = nn.Parameter(torch.empty(num_experts, ffn_dim, d_model))  # [E, F, D]
        self.w_out = nn.Parameter(torch.empty(num_experts, d_model, ffn_dim))  # [E, D, F]

    def forward(self, x_sorted_ND: Tensor, counts_E: Tensor) -> Tensor:
        hidden = F.gelu(grouped_mm(x_sorted_ND, self.w_in, counts_E, self.backend))  # [N, F]
        return grouped_mm(hidden, self.w_out, counts_E, self.backend)  # [N, D]
