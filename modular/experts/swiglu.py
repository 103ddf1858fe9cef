"""SwiGLU experts (Mixtral / Llama FFN): y = W_down · (silu(W_gate · x) ⊙ (W_up · x))."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modular.experts.base import ExpertBank, register_expert
from modular.kernels.grouped_mm import grouped_mm


@register_expert("swiglu")
class SwiGLUBank(ExpertBank):
    expert_param_names = ("w_gate", "w_up", "w_down")

    def __init__(self, d_model: int, ffn_dim: int, num_experts: int, init_std: float = 0.02):
        super().__init__(d_model, ffn_dim, num_experts, init_std)
        self.w_gate = nn.Parameter(torch.empty(num_experts, ffn_dim, d_model))  # [E, F, D]
        self.w_up = nn.Parameter(torch.empty(num_experts, ffn_dim, d_model))  # [E, F, D]
        self.w_down = nn.Parameter(torch.empty(num_experts, d_model, ffn_dim))  # [E, D, F]

    @classmethod
    def expressible_as_swiglu(cls) -> bool:
        return True

    @classmethod
    def swiglu_from_state(cls, tensors):
        return tensors["w_gate"], tensors["w_up"], tensors["w_down"]

    def swiglu_parameters(self):
        # A subclass that computes something else in forward must not be run by the fused SwiGLU kernels.
        plain = type(self).forward is SwiGLUBank.forward
        return (self.w_gate, self.w_up, self.w_down) if plain else None

    def forward(self, x_sorted_ND: Tensor, counts_E: Tensor) -> Tensor:
        gate = grouped_mm(x_sorted_ND, self.w_gate, counts_E, self.backend)  # [N, F]
        up = grouped_mm(x_sorted_ND, self.w_up, counts_E, self.backend)  # [N, F]
        return grouped_mm(F.silu(gate) * up, self.w_down, counts_E, self.backend)  # [N, D]
