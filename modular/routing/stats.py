"""Per-forward routing statistics: tokens per expert, routing entropy, imbalance, dropped tokens."""

from __future__ import annotations

import torch
from torch import Tensor


@torch.no_grad()
def routing_stats(probs_TE: Tensor, expert_idx_A: Tensor, token_idx_A: Tensor, num_experts: int,
                  dropped_assignments: int) -> dict:
    """Statistics of one forward, detached and on the CPU (cheap: E-sized tensors)."""
    T = probs_TE.shape[0]
    tokens_per_expert = torch.bincount(expert_idx_A, minlength=num_experts)
    p = probs_TE.float().clamp_min(1e-12)
    p = p / p.sum(dim=-1, keepdim=True)  # sigmoid scores need normalising to be a distribution
    entropy = -(p * p.log()).sum(dim=-1).mean()
    mean_load = tokens_per_expert.float().mean().clamp_min(1e-12)
    routed_tokens = torch.zeros(T, dtype=torch.bool, device=probs_TE.device)
    routed_tokens[token_idx_A] = True
    return {
        "tokens_per_expert": tokens_per_expert.cpu(),
        "entropy": float(entropy),
        "max_imbalance": float(tokens_per_expert.max().float() / mean_load),
        "dropped_assignments": int(dropped_assignments),
        "dropped_tokens": int(T - routed_tokens.sum()),
        "num_tokens": int(T),
    }
