"""Expert capacity and the drop policy for token-choice routing with a capacity factor.

Drop policy: an expert that receives more than `capacity` assignments keeps the ones with the highest
router probability (`probs`, as in Megatron-Core) or the earliest tokens in the batch (`position`, GShard);
the rest are dropped: those token slots contribute nothing (the residual stream carries the token on).
"""

from __future__ import annotations

import math

import torch

from modular.routing.base import RouterOutput


def expert_capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float) -> int:
    """Assignments one expert may take: ceil(factor · k · T / E), at most T."""
    return min(num_tokens, max(1, math.ceil(capacity_factor * top_k * num_tokens / num_experts)))


def apply_capacity(out: RouterOutput, capacity: int, num_experts: int, policy: str = "probs") -> RouterOutput:
    A = out.expert_idx.numel()
    if A == 0:
        return out
    if policy == "probs":
        # the router probability, not the combine weight: after top-1 renormalisation every weight is 1
        priority = -out.probs.detach()[out.token_idx, out.expert_idx]
    elif policy == "position":
        priority = out.token_idx.to(torch.float64)
    else:
        raise ValueError(f"unknown drop policy {policy!r}")
    by_priority = torch.argsort(priority, stable=True)
    order = by_priority[torch.argsort(out.expert_idx[by_priority], stable=True)]
    counts = torch.bincount(out.expert_idx, minlength=num_experts)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(A, device=order.device) - starts[out.expert_idx[order]]
    keep = order[rank < capacity]
    keep, _ = torch.sort(keep)  # back to token order
    return RouterOutput(
        token_idx=out.token_idx[keep],
        expert_idx=out.expert_idx[keep],
        weight=out.weight[keep],
        probs=out.probs,
        logits=out.logits,
        losses=out.losses,
        dropped_assignments=out.dropped_assignments + A - keep.numel(),
    )
