"""Expert-choice routing (Zhou et al., 2022): each expert picks its top-C tokens.

Balanced by construction, so it needs no balancing loss; a token may get zero or several experts.
It looks at every token of the batch when choosing, so it is not causal: use it for research
comparisons, not for autoregressive generation.
"""

from __future__ import annotations

import torch
from torch import Tensor

from modular.errors import ConfigError
from modular.routing.base import Router, RouterOutput, register_router
from modular.routing.capacity import expert_capacity
from modular.routing.losses import z_loss
from modular.routing.topk import router_probs


@register_router("expert_choice")
class ExpertChoiceRouter(Router):
    owns_capacity = True

    @classmethod
    def chooses_over_batch(cls, cfg, training: bool) -> bool:
        return True

    @classmethod
    def experts_per_token(cls, cfg, num_experts: int) -> float:
        return min(float(num_experts), float(cfg.capacity_factor) * int(cfg.top_k))

    @classmethod
    def routes_every_token(cls, cfg) -> bool:
        return False  # an expert may pass over a token that no other expert picks

    @classmethod
    def validate_config(cls, cfg) -> None:
        if cfg.capacity_factor is None:
            raise ConfigError("routing.capacity_factor is null but the expert_choice router needs one; "
                              "set e.g. routing.capacity_factor=1.0.")

    def __init__(self, cfg, num_experts: int):
        super().__init__(cfg, num_experts)
        self.capacity_factor = float(cfg.capacity_factor if cfg.capacity_factor is not None else 1.0)

    def capacity(self, num_tokens: int) -> int:
        return expert_capacity(num_tokens, self.num_experts, self.top_k, self.capacity_factor)

    def route(self, logits: Tensor, token_ids: Tensor | None) -> RouterOutput:
        T, E = logits.shape
        probs = router_probs(logits, "softmax")  # [T, E]
        C = self.capacity(T)
        weight_EC, token_EC = torch.topk(probs.t(), C, dim=-1)  # [E, C]
        expert_idx = torch.arange(E, device=logits.device).repeat_interleave(C)
        return RouterOutput(
            token_idx=token_EC.reshape(-1),
            expert_idx=expert_idx,
            weight=weight_EC.reshape(-1).to(logits.dtype),
            probs=probs,
            logits=logits,
            losses={"z_loss": z_loss(logits)},
        )
