"""Router auxiliary losses: Switch load balancing and ST-MoE z-loss."""

from __future__ import annotations

import torch
from torch import Tensor


def assignment_counts(expert_idx_A: Tensor, num_experts: int, dtype: torch.dtype = torch.int64) -> Tensor:
    """[E] assignments per expert. Not torch.bincount: on a GPU it reads the largest id back to the host."""
    ones = torch.ones_like(expert_idx_A, dtype=dtype)
    return torch.zeros(num_experts, dtype=dtype, device=expert_idx_A.device).index_add_(0, expert_idx_A, ones)


def load_balancing_loss(probs_TE: Tensor, expert_idx_A: Tensor, num_experts: int) -> Tensor:
    """Switch Transformer loss E · Σ_e f_e · P_e.

    f_e: the fraction of assignments routed to expert e (not differentiable); P_e: the mean router
    probability of e over tokens. Equals 1 when both are uniform, grows as routing concentrates.
    """
    counts = assignment_counts(expert_idx_A, num_experts, probs_TE.dtype)
    f = counts / counts.sum().clamp_min(1)
    p = probs_TE.mean(dim=0)
    return num_experts * torch.sum(f * p)


def z_loss(logits_TE: Tensor) -> Tensor:
    """ST-MoE router z-loss: mean over tokens of logsumexp(logits)², keeps router logits small."""
    return torch.logsumexp(logits_TE, dim=-1).square().mean()
