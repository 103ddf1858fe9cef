"""Dropless dispatch: sort (token, slot) assignments by global expert, gather rows, and combine back.

sort_by_expert: assignments → order that makes each expert's rows contiguous, counts per expert
permute:  the same, plus x_sorted (the gathered rows)
combine:  expert outputs in sorted order × routing weights, summed back into token order
"""

from __future__ import annotations

import torch
from torch import Tensor


def sort_by_expert(token_idx_A: Tensor, expert_idx_A: Tensor, num_experts: int):
    """Returns (sorted token ids [A], order [A], counts [E])."""
    from modular.routing.losses import assignment_counts  # not torch.bincount: no host sync on a GPU

    order = torch.argsort(expert_idx_A, stable=True)  # stable: tokens keep their order inside an expert
    counts = assignment_counts(expert_idx_A, num_experts)
    return token_idx_A[order], order, counts


def permute(x_TD: Tensor, token_idx_A: Tensor, expert_idx_A: Tensor, num_experts: int):
    """Returns (x_sorted [A, D], sorted token ids [A], order [A], counts [E])."""
    token_sorted, order, counts = sort_by_expert(token_idx_A, expert_idx_A, num_experts)
    # index_select, not x[idx]: its backward is a dense index_add instead of an accumulating index_put
    return x_TD.index_select(0, token_sorted), token_sorted, order, counts


def combine(y_sorted_AD: Tensor, token_sorted_A: Tensor, weight_sorted_A: Tensor, num_tokens: int) -> Tensor:
    """y [T, D] = Σ over a token's assignments of weight · expert output."""
    weighted = y_sorted_AD * weight_sorted_A.unsqueeze(-1).to(y_sorted_AD.dtype)
    out = y_sorted_AD.new_zeros(num_tokens, y_sorted_AD.shape[-1])
    return out.index_add(0, token_sorted_A, weighted)
