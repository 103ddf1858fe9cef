"""Low-rank experts: one shared base SwiGLU FFN per bank plus a rank-r delta per expert and projection.

Expert e uses W + B_e A_e for each of gate, up and down. The base is computed once for all routed rows
(one dense matmul); only the thin deltas are grouped, so an added expert costs 2r(2D + F + ...) params
instead of 3DF: cheap experts for growth. B starts at zero (LoRA), so new experts start as the base.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modular.experts.base import ExpertBank, register_expert
from modular.kernels.grouped_mm import grouped_mm


@register_expert("lowrank")
class LowRankBank(ExpertBank):
    expert_param_names = ("a_gate", "b_gate", "a_up", "b_up", "a_down", "b_down")

    def __init__(self, d_model: int, ffn_dim: int, num_experts: int, init_std: float = 0.02, rank: int = 16):
        super().__init__(d_model, ffn_dim, num_experts, init_std)
        self.rank = rank
        D, Fd, E, r = d_model, ffn_dim, num_experts, rank
        self.base_gate = nn.Parameter(torch.empty(Fd, D))  # [F, D]
        self.base_up = nn.Parameter(torch.empty(Fd, D))  # [F, D]
        self.base_down = nn.Parameter(torch.empty(D, Fd))  # [D, F]
        self.a_gate = nn.Parameter(torch.empty(E, r, D))  # [E, r, D]
        self.b_gate = nn.Parameter(torch.empty(E, Fd, r))  # [E, F, r]
        self.a_up = nn.Parameter(torch.empty(E, r, D))
        self.b_up = nn.Parameter(torch.empty(E, Fd, r))
        self.a_down = nn.Parameter(torch.empty(E, r, Fd))  # [E, r, F]
        self.b_down = nn.Parameter(torch.empty(E, D, r))  # [E, D, r]

    @classmethod
    def state_names(cls) -> set[str]:
        return super().state_names() | {"base_gate", "base_up", "base_down"}

    @classmethod
    def expressible_as_swiglu(cls) -> bool:
        return True

    @classmethod
    def swiglu_from_state(cls, t):
        # W_e = base + B_e·A_e per projection: [E, F, r] @ [E, r, D] (what forward computes)
        return (t["base_gate"] + t["b_gate"] @ t["a_gate"], t["base_up"] + t["b_up"] @ t["a_up"],
                t["base_down"] + t["b_down"] @ t["a_down"])

    @classmethod
    def base_swiglu_from_state(cls, t):
        return t["base_gate"], t["base_up"], t["base_down"]

    @classmethod
    def validate_config(cls, experts_cfg, d_model: int) -> None:
        from modular.errors import ConfigError

        rank = experts_cfg.rank
        if not (isinstance(rank, int) and rank >= 1):
            raise ConfigError(f"experts.rank={rank} is not allowed; it must be an integer >= 1.")
        if rank > min(experts_cfg.ffn_dim, d_model):
            raise ConfigError(f"experts.rank={rank} is too large; a low-rank delta needs rank <= min(ffn_dim, "
                              f"d_model) = {min(experts_cfg.ffn_dim, d_model)}.")

    @classmethod
    def from_config(cls, d_model: int, num_experts: int, cfg, init_std: float) -> LowRankBank:
        return cls(d_model, cfg.ffn_dim, num_experts, init_std, rank=cfg.rank)

    def reset_parameters(self) -> None:
        for name, p in self.named_parameters(recurse=False):
            if name.startswith("b_"):
                nn.init.zeros_(p)
            else:
                nn.init.normal_(p, mean=0.0, std=self.init_std)

    def _project(self, x: Tensor, base: Tensor, a: Tensor, b: Tensor, counts: Tensor) -> Tensor:
        low = grouped_mm(x, a, counts, self.backend)  # [N, r]
        return x @ base.t() + grouped_mm(low, b, counts, self.backend)

    def forward(self, x_sorted_ND: Tensor, counts_E: Tensor) -> Tensor:
        gate = self._project(x_sorted_ND, self.base_gate, self.a_gate, self.b_gate, counts_E)  # [N, F]
        up = self._project(x_sorted_ND, self.base_up, self.a_up, self.b_up, counts_E)  # [N, F]
        return self._project(F.silu(gate) * up, self.base_down, self.a_down, self.b_down, counts_E)  # [N, D]

    def extra_repr(self) -> str:
        return super().extra_repr() + f", rank={self.rank}"
