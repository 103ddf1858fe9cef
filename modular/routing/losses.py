"""Router auxiliary losses: Switch load balancing and ST-MoE z-loss."""

from __future__ import annotations

import torch
from torch import Tensor


def load_balancing_loss(probs_TE: Tensor, expert_idx_A: Tensor, num_experts: int) -> Tensor:
    """Switch Transformer loss E · Σ_e f_e · P_e.

    f_e: the fraction of assignments routed to expert e (not differentiable); P_e: the mean router
    probability of e over tokens. Equals 1 when both are uniform, grows as routing concentrates.
    """
    counts = torch.bincount(expert_idx_A, minlength=num_experts).to(probs_TE.dtype)
    f = counts / counts.sum().clamp_min(1)
    p = probs_TE.mean(dim=0)
    return num_experts * torch.sum(f * p)


def z_loss(logits_TE: Tensor) -> Tensor:
    """ST-MoE router z-loss: mean over tokens of logsumexp(logits)², keeps router logits small."""
    return torch.logsumexp(logits_TE, dim=-1).square().mean()
