"""The SwiGLU expert step on Triton with fused data movement (ScatterMoE's idea).

Gate and up projections read their rows straight from the token-order activations (a gather fused
into the GEMM's loads, no permuted copy of x), and the down projection's epilogue multiplies by the
routing weight and writes each row to its assignment slot (no separate unpermute pass). Every piece
is a registered `torch.library` op with its own backward, so the composition trains and compiles.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from modular.kernels.triton_gmm import triton_gather_grouped_mm, triton_scatter_grouped_mm


def swiglu_moe(x_TD: Tensor, banks: list, counts_E: Tensor, token_sorted_A: Tensor, order_A: Tensor,
               weight_sorted_A: Tensor, token_idx_A: Tensor) -> Tensor:
    """y [T, D] = Σ over each token's assignments of weight · SwiGLU_expert(x).

    banks: SwiGLU banks whose experts, concatenated, are the global experts counted by counts_E;
    token_sorted_A / order_A / weight_sorted_A: each expert-sorted row's token, assignment slot and
    routing weight; token_idx_A: the token of each assignment slot.
    """
    T, D = x_TD.shape
    gate = triton_gather_grouped_mm(x_TD, [b.w_gate for b in banks], counts_E, token_sorted_A)  # [A, F]
    up = triton_gather_grouped_mm(x_TD, [b.w_up for b in banks], counts_E, token_sorted_A)  # [A, F]
    h = F.silu(gate) * up
    n_slots = order_A.numel()
    y_slots = triton_scatter_grouped_mm(h, [b.w_down for b in banks], counts_E, order_A, weight_sorted_A,
                                        n_slots)  # [A, D] in assignment order, already weighted
    return y_slots.new_zeros(T, D).index_add(0, token_idx_A, y_slots)
