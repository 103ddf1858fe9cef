"""Sinkhorn-balanced routing (BASE layers / Megatron-Core): selection by a balanced transport plan.

Sinkhorn iterations rescale exp(logits) towards equal mass per expert and per token; each token then
picks its top-k experts in that balanced plan, while combine weights come from the plain softmax so
gradients stay those of the router's own probabilities.
"""

from __future__ import annotations

import torch
from torch import Tensor

from modular.routing.base import Router, RouterOutput, flat_token_choice, register_router
from modular.routing.losses import z_loss
from modular.routing.topk import router_probs


@torch.no_grad()
def sinkhorn(logits: Tensor, iterations: int) -> Tensor:
    """Balanced plan Q [T, E]: rows sum to 1/T and columns to 1/E after enough iterations."""
    T, E = logits.shape
    q = torch.exp(logits.double() - logits.double().max())
    q = q / q.sum()
    for _ in range(iterations):
        q = q / (q.sum(dim=0, keepdim=True) * E)
        q = q / (q.sum(dim=1, keepdim=True) * T)
    return q


@register_router("sinkhorn")
class SinkhornRouter(Router):
    @classmethod
    def chooses_over_batch(cls, cfg, training: bool) -> bool:
        return training  # the balanced plan spans the batch; evaluation picks token by token

    @classmethod
    def weights_sum_to_one(cls, cfg) -> bool:
        return bool(cfg.normalize)

    def __init__(self, cfg, num_experts: int):
        super().__init__(cfg, num_experts)
        self.iterations = int(cfg.sinkhorn_iters)
        self.normalize = bool(cfg.normalize)

    def route(self, logits: Tensor, token_ids: Tensor | None) -> RouterOutput:
        probs = router_probs(logits, "softmax")
        if self.training:
            plan = sinkhorn(logits, self.iterations)
            _, expert_idx = torch.topk(plan, self.top_k, dim=-1)
        else:
            # At inference the batch is not a fair sample to balance over (and generation is causal).
            _, expert_idx = torch.topk(probs, self.top_k, dim=-1)
        weight = probs.gather(-1, expert_idx)
        if self.normalize:
            weight = weight / weight.sum(dim=-1, keepdim=True)
        token_idx, expert_flat, weight_flat = flat_token_choice(expert_idx, weight)
        return RouterOutput(
            token_idx=token_idx,
            expert_idx=expert_flat,
            weight=weight_flat.to(logits.dtype),
            probs=probs,
            logits=logits,
            losses={"z_loss": z_loss(logits)},
        )
