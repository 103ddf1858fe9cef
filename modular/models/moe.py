"""The MoE FFN slot: router → dispatcher → expert banks (grouped matmuls) → weighted combine.

Banks are concatenated into global expert ids (bank 0's experts first); the router sees all their
rows at once. Auxiliary losses (already weighted) land in `aux_loss` and statistics in `last_stats`
after every forward, so the trainer and `modular info` can read them without extra passes.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from modular.experts import ExpertBank, SharedExperts, build_bank
from modular.experts.swiglu import SwiGLUBank
from modular.kernels import combine, permute, sort_by_expert
from modular.kernels.torch_gmm import can_fuse_swiglu_moe, torch_swiglu_moe
from modular.routing import apply_capacity, build_router, expert_capacity, routing_stats


class MoELayer(nn.Module):
    def __init__(self, d_model: int, num_experts: int, experts_cfg, routing_cfg, init_std: float = 0.02,
                 backend: str = "torch"):
        super().__init__()
        self.d_model = d_model
        self.experts_cfg = experts_cfg
        self.routing_cfg = routing_cfg
        self.init_std = init_std
        self.backend = backend
        self.top_k = int(routing_cfg.top_k)
        self.banks = nn.ModuleList([build_bank(experts_cfg, d_model, num_experts, init_std)])
        # The expert each one was initialised from (continual growth by copy), for task-arithmetic merges.
        self.expert_parents: list[int | None] = [None] * num_experts
        self.router = build_router(routing_cfg, num_experts)
        self.shared_experts = None
        if experts_cfg.shared_experts > 0:
            shared_dim = experts_cfg.shared_ffn_dim or experts_cfg.ffn_dim
            self.shared_experts = SharedExperts(d_model, shared_dim, experts_cfg.shared_experts)
        self.loss_weights = {"load_balancing": float(routing_cfg.aux_loss_weight),
                             "z_loss": float(routing_cfg.z_loss_weight)}
        self.set_backend(backend)
        # torch backend, SwiGLU banks: gather, experts and combine run as one autograd Function
        # (kernels/torch_gmm.py); False forces the generic permute → bank.forward → combine path.
        self.fused_swiglu = True
        self.aux_loss: Tensor | None = None
        self.aux_losses: dict[str, float] = {}
        self.last_stats: dict | None = None
        # Set by modular.parallel under expert/data parallelism: runs forward across ranks, shards new banks.
        self.parallel = None

    # -- structure ------------------------------------------------------------------------------
    @property
    def num_experts(self) -> int:
        return sum(bank.num_experts for bank in self.banks)

    def bank_sizes(self) -> list[int]:
        return [bank.num_experts for bank in self.banks]

    def router_weight(self) -> Tensor:
        """[E, D]: the router rows of every bank, in global expert order."""
        return torch.cat([bank.router_weight for bank in self.banks], dim=0)

    def set_backend(self, backend: str) -> None:
        self.backend = backend
        for bank in self.banks:
            bank.backend = backend

    def add_bank(self, bank: ExpertBank) -> None:
        """Append a bank of new experts (continual growth); the router follows the new expert count."""
        bank.backend = self.backend
        if self.parallel is not None:  # expert parallel: this rank keeps its share of the new experts
            bank = self.parallel.shard_bank(bank)
        self.banks.append(bank)
        self.expert_parents = self.expert_parents + [None] * bank.num_experts
        self.router.resize(self.num_experts)

    def new_bank(self, num_experts: int) -> ExpertBank:
        return build_bank(self.experts_cfg, self.d_model, num_experts, self.init_std)

    # -- compute --------------------------------------------------------------------------------
    def forward(self, x: Tensor, token_ids: Tensor | None = None) -> Tensor:
        if self.parallel is not None:
            return self.parallel.forward(self, x, token_ids)
        shape = x.shape
        x_TD = x.reshape(-1, self.d_model)
        T = x_TD.shape[0]
        E = self.num_experts
        routed = self.router(x_TD, self.router_weight(), token_ids.reshape(-1) if token_ids is not None else None)
        cf = self.routing_cfg.capacity_factor
        if cf is not None and self.routing_cfg.type != "expert_choice":
            capacity = expert_capacity(T, E, self.top_k, float(cf))
            routed = apply_capacity(routed, capacity, E, self.routing_cfg.drop_policy)

        if self._fused_triton():
            from modular.kernels.triton_swiglu import swiglu_moe

            order = torch.argsort(routed.expert_idx, stable=True)
            counts = torch.bincount(routed.expert_idx, minlength=E)
            y_TD = swiglu_moe(x_TD, list(self.banks), counts, routed.token_idx[order], order, routed.weight[order],
                              routed.token_idx)
        elif self._can_fuse_swiglu(x_TD):  # torch backend: one Function streaming expert by expert
            token_sorted, order, counts = sort_by_expert(routed.token_idx, routed.expert_idx, E)
            y_TD = torch_swiglu_moe(x_TD, *self._stacked_swiglu_weights(), counts, token_sorted, routed.weight[order])
        else:
            x_sorted, token_sorted, order, counts = permute(x_TD, routed.token_idx, routed.expert_idx, E)
            y_sorted = self._run_banks(x_sorted, counts)
            y_TD = combine(y_sorted, token_sorted, routed.weight[order], T)
        if self.shared_experts is not None:
            y_TD = y_TD + self.shared_experts(x_TD)

        self.aux_loss = sum(
            (self.loss_weights.get(name, 0.0) * value for name, value in routed.losses.items()),
            start=x_TD.new_zeros(()),
        )
        self.aux_losses = {name: float(value.detach()) for name, value in routed.losses.items()}
        self.last_stats = routing_stats(routed.probs, routed.expert_idx, routed.token_idx, E,
                                        routed.dropped_assignments)
        self.last_stats["bank_sizes"] = self.bank_sizes()
        return y_TD.reshape(shape)

    def _fused_triton(self) -> bool:
        """All banks SwiGLU on the Triton backend: gather/scatter fused into the expert GEMMs, one launch
        per projection over every bank."""
        return self.backend == "triton" and all(bank.registry_name == "swiglu" for bank in self.banks)

    def _can_fuse_swiglu(self, x_TD: Tensor) -> bool:
        return (self.fused_swiglu and self.backend == "torch" and all(type(b) is SwiGLUBank for b in self.banks)
                and can_fuse_swiglu_moe(x_TD, self.banks[0].w_gate, self.banks[0].w_down))

    def _stacked_swiglu_weights(self) -> tuple[Tensor, Tensor, Tensor]:
        """(w_gate [E, F, D], w_up [E, F, D], w_down [E, D, F]) over all banks, in global expert order."""
        if len(self.banks) == 1:
            bank = self.banks[0]
            return bank.w_gate, bank.w_up, bank.w_down
        return tuple(torch.cat([getattr(b, n) for b in self.banks], dim=0) for n in ("w_gate", "w_up", "w_down"))

    def _run_banks(self, x_sorted_AD: Tensor, counts_E: Tensor) -> Tensor:
        if len(self.banks) == 1:
            return self.banks[0](x_sorted_AD, counts_E)
        counts_per_bank = torch.split(counts_E, self.bank_sizes())
        rows_per_bank = [int(c.sum()) for c in counts_per_bank]
        x_per_bank = torch.split(x_sorted_AD, rows_per_bank)
        return torch.cat([bank(x, c) for bank, x, c in zip(self.banks, x_per_bank, counts_per_bank)], dim=0)

    def extra_repr(self) -> str:
        return f"banks={self.bank_sizes()}, top_k={self.top_k}, router={self.router.registry_name}"
