"""Per-forward routing statistics, kept on the device: tokens per expert, routing entropy, drops.

A forward fills one float64 vector (no host sync); the vector goes through the layer's reducer
(identity in one process, an all-reduce over the ranks under torchrun) and is read on the host only
when someone asks for the numbers (logging, usage measurements), via `RoutingStats.as_dict()`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from modular.routing.losses import assignment_counts


@torch.no_grad()
def routing_stats_vector(probs_TE: Tensor, expert_idx_A: Tensor, token_idx_A: Tensor, weight_A: Tensor,
                         num_experts: int, dropped_assignments: int) -> Tensor:
    """[E + 5] float64: assignments per expert, then tokens, dropped assignments, Σ entropy, routed tokens,
    Σ combine weights."""
    T = probs_TE.shape[0]
    p = probs_TE.float().clamp_min(1e-12)
    p = p / p.sum(dim=-1, keepdim=True)  # sigmoid scores need normalising to be a distribution
    entropy_sum = -(p * p.log()).sum().to(torch.float64)
    # scatter, not routed[idx] = True, and constants by fill, not from host tensors: no host sync on a GPU
    routed = torch.zeros(T, dtype=torch.float64, device=probs_TE.device).scatter_(
        0, token_idx_A, torch.ones_like(token_idx_A, dtype=torch.float64))
    constants = torch.full((2,), float(T), dtype=torch.float64, device=probs_TE.device)
    constants[1:] = float(dropped_assignments)
    scalars = torch.cat([constants, torch.stack([entropy_sum, routed.sum(),
                                                 weight_A.detach().to(torch.float64).sum()])])
    return torch.cat([assignment_counts(expert_idx_A, num_experts, torch.float64), scalars])


class RoutingStats:
    """The statistics of one forward (over the global batch under torchrun), read lazily."""

    def __init__(self, vector: Tensor, num_experts: int, bank_sizes: list[int]):
        self.vector = vector.detach()
        self.num_experts = num_experts
        self.bank_sizes = list(bank_sizes)

    @property
    def tokens_per_expert(self) -> Tensor:
        """[E] int64 on the device."""
        return self.vector[: self.num_experts].round().to(torch.int64)

    def as_dict(self) -> dict:
        """The numbers on the host (one device-to-host copy)."""
        v = self.vector.cpu()
        counts = v[: self.num_experts].round().to(torch.int64)
        tokens, dropped, entropy_sum, routed, weight_sum = v[self.num_experts:].tolist()
        mean_load = counts.float().mean().clamp_min(1e-12)
        return {
            "tokens_per_expert": counts,
            "entropy": entropy_sum / max(tokens, 1.0),
            "max_imbalance": float(counts.max().float() / mean_load) if counts.numel() else 0.0,
            "dropped_assignments": round(dropped),
            "dropped_tokens": round(tokens - routed),
            "num_tokens": round(tokens),
            # mean Σ combine weights per token: 1 for a renormalised top-k (what a merged dense FFN must scale by)
            "routing_mass": weight_sum / max(tokens, 1.0),
            "bank_sizes": list(self.bank_sizes),
        }

