"""The SwiGLU expert step on Triton as one op: gate/up GEMMs, activation, down GEMM, forward and backward.

``modular::triton_swiglu_moe`` is a `torch.library` custom op whose backward is a single function
(itself the op ``modular::triton_swiglu_moe_backward``, so that AOT autograd can trace the backward
graph without looking inside it). Both run the grouped-GEMM kernels of `triton_gmm.py` with fused data
movement (ScatterMoE's idea): the gate and up GEMMs read their rows straight from the token-order
activations (a gather fused into the loads, no permuted copy of x), and the down GEMM's epilogue
multiplies by the routing weight and writes each row to its assignment slot. In backward the dY rows
are gathered the same way, and the routing weight gradient comes from the down projection's dH GEMM
(a per-row dot product in its epilogue), so no extra pass over dY is needed.

Legend: T tokens, D model width, F expert hidden width, E experts over all banks, A assignments
(token, expert pairs); "sorted" rows are the A assignments in expert order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from modular.kernels.autocast import autocast_inputs
from modular.kernels.triton_gmm import (
    _check_index,
    _check_inputs,
    _forward,
    _grad_w,
    _grad_x,
    _launch_gmm,
    _split_bank_grads,
)

__all__ = ["swiglu_moe", "triton_swiglu_moe"]


# ----------------------------------------------------------------------------------------------------
# Forward / backward bodies
# ----------------------------------------------------------------------------------------------------


def _swiglu(gate: Tensor, up: Tensor) -> Tensor:
    # In fp32 and rounded once: forward and backward must produce the same bits for h (the backward
    # recomputes it), and one rounding of half-precision inputs is more accurate than one per op.
    return (F.silu(gate.float()) * up.float()).to(gate.dtype)


def _swiglu_forward(x, w_gate, w_up, w_down, counts, token_sorted, order, weight_sorted, token_idx):
    """(y [T, D], gate [A, F], up [A, F]); gate and up are the pre-activations backward needs."""
    gate = _forward(x, w_gate, counts, token_sorted, None, None, -1)
    up = _forward(x, w_up, counts, token_sorted, None, None, -1)
    h = _swiglu(gate, up)
    # order is a permutation of the A slots, so the scatter writes every row of y_slots.
    y_slots = _forward(h, w_down, counts, None, order, weight_sorted, order.shape[0])  # weighted, [A, D]
    y = y_slots.new_zeros((x.shape[0], w_down[0].shape[1])).index_add_(0, token_idx, y_slots)
    return y, gate, up


def _swiglu_backward(dy, x, gate, up, w_gate, w_up, w_down, counts, token_sorted, weight_sorted,
                     needs_x: bool, needs_gate: list[bool], needs_up: list[bool], needs_down: list[bool],
                     needs_weight: bool):
    """(dx, dw_gate, dw_up, dw_down, d_weight); not requested ones have zero rows, dw stacks the banks
    that need a gradient ([sum of their E_b, ...], split into banks outside the op).

    With s_r = weight_r, t_r = token_r and e_r = expert_r of sorted row r, y[t] = Σ_r s_r h_r W_down[e_r]ᵀ:
    the dY row of r is dy[t_r] (read through token_sorted, so no [A, D] copy of dy is made) and
    d s_r = <dy[t_r], h_r W_down[e_r]ᵀ> = <dy[t_r] W_down[e_r], h_r>, the unweighted dH row dotted with h.
    """
    bank_sizes = [w.shape[0] for w in w_gate]
    needs_upstream = needs_x or any(needs_gate) or any(needs_up)
    dy = dy.contiguous()
    h = _swiglu(gate, up)  # recomputed: an elementwise pass, cheaper than keeping a third [A, F] tensor

    # dH = s · dY W_down (sorted rows), and d s from the same GEMM's epilogue.
    dh, d_weight = _grad_x(dy, h, w_down, counts, None, token_sorted, weight_sorted, needs_upstream,
                           needs_weight)
    dw_down = _grad_w(dy, h, counts, None, token_sorted, weight_sorted, bank_sizes, needs_down)

    n_rows, d_model = gate.shape[0], x.shape[1]
    dx = x.new_empty((x.shape[0] if needs_x else 0, d_model))
    # Separate empty tensors: a custom op's outputs may not alias each other.
    dw_gate, dw_up = (x.new_empty((0, gate.shape[1], d_model)) for _ in range(2))
    if needs_upstream:
        g, u, dh32 = gate.float(), up.float(), dh.float()
        sig = torch.sigmoid(g)
        d_up = (dh32 * g * sig).to(x.dtype)
        # d silu(g)/dg = σ(g) · (1 + g · (1 − σ(g)))
        d_gate = (dh32 * u * sig * (1 + g * (1 - sig))).to(x.dtype)
        del g, u, dh32, sig, dh
        dw_gate = _grad_w(d_gate, x, counts, token_sorted, None, None, bank_sizes, needs_gate)
        dw_up = _grad_w(d_up, x, counts, token_sorted, None, None, bank_sizes, needs_up)
        if needs_x:
            # Rows of dx in sorted order from both projections, then one sum into tokens: a token
            # routed to top_k experts receives the sum of its top_k rows.
            dx_rows = d_gate.new_empty((n_rows, d_model))
            dx_up_rows = d_gate.new_empty((n_rows, d_model))
            _launch_gmm(d_gate, w_gate, counts, dx_rows, n_rows, transpose_w=False)
            _launch_gmm(d_up, w_up, counts, dx_up_rows, n_rows, transpose_w=False)
            dx = dx.zero_().index_add_(0, token_sorted, dx_rows.add_(dx_up_rows))
    return dx, dw_gate, dw_up, dw_down, d_weight


# ----------------------------------------------------------------------------------------------------
# torch.library ops: opaque to torch.compile (which cannot trace the kernels' data_ptr tables), with
# fake kernels for shape propagation.
# ----------------------------------------------------------------------------------------------------


@torch.library.custom_op("modular::triton_swiglu_moe", mutates_args=())
def _swiglu_moe_op(x: Tensor, w_gate: list[Tensor], w_up: list[Tensor], w_down: list[Tensor],
                   counts: Tensor, token_sorted: Tensor, order: Tensor, weight_sorted: Tensor,
                   token_idx: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    # gate and up are outputs only because a custom op's autograd formula can save nothing else;
    # they are marked non-differentiable and the public functions return y alone.
    return _swiglu_forward(x, w_gate, w_up, w_down, counts, token_sorted, order, weight_sorted, token_idx)


@_swiglu_moe_op.register_fake
def _(x, w_gate, w_up, w_down, counts, token_sorted, order, weight_sorted, token_idx):
    n_rows, ffn = token_sorted.shape[0], w_gate[0].shape[1]
    y = x.new_empty((x.shape[0], w_down[0].shape[1]))
    return y, x.new_empty((n_rows, ffn)), x.new_empty((n_rows, ffn))


@torch.library.custom_op("modular::triton_swiglu_moe_backward", mutates_args=())
def _swiglu_moe_backward_op(dy: Tensor, x: Tensor, gate: Tensor, up: Tensor, w_gate: list[Tensor],
                            w_up: list[Tensor], w_down: list[Tensor], counts: Tensor, token_sorted: Tensor,
                            weight_sorted: Tensor, needs_x: bool, needs_gate: list[bool],
                            needs_up: list[bool], needs_down: list[bool],
                            needs_weight: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _swiglu_backward(dy, x, gate, up, w_gate, w_up, w_down, counts, token_sorted, weight_sorted,
                            needs_x, needs_gate, needs_up, needs_down, needs_weight)


@_swiglu_moe_backward_op.register_fake
def _(dy, x, gate, up, w_gate, w_up, w_down, counts, token_sorted, weight_sorted, needs_x, needs_gate,
      needs_up, needs_down, needs_weight):
    def stacked(ws, needs):
        return ws[0].new_empty((sum(w.shape[0] for w, n in zip(ws, needs) if n), *ws[0].shape[1:]))

    dx = x.new_empty((x.shape[0] if needs_x else 0, x.shape[1]))
    d_weight = weight_sorted.new_empty((token_sorted.shape[0] if needs_weight else 0,))
    return dx, stacked(w_gate, needs_gate), stacked(w_up, needs_up), stacked(w_down, needs_down), d_weight


def _setup_context(ctx, inputs, output):
    x, w_gate, w_up, w_down, counts, token_sorted, _order, weight_sorted, _token_idx = inputs
    _, gate, up = output
    ctx.mark_non_differentiable(gate, up)
    # Saved: x and the pre-activations gate and up (2·A·F), h is recomputed from them. Recomputing
    # gate and up instead would cost two of the step's three forward GEMMs again in backward (about
    # a fifth more GEMM work per training step); the elementwise h is nearly free to recompute, and
    # the composed ops this replaces kept gate, up and h alive (3·A·F).
    ctx.n_banks = len(w_gate)
    ctx.save_for_backward(x, gate, up, counts, token_sorted, weight_sorted, *w_gate, *w_up, *w_down)


def _op_backward(ctx, dy, _d_gate, _d_up):
    x, gate, up, counts, token_sorted, weight_sorted, *ws = ctx.saved_tensors
    n = ctx.n_banks
    w_gate, w_up, w_down = ws[:n], ws[n : 2 * n], ws[2 * n :]
    needs_x, needs_gate, needs_up, needs_down = ctx.needs_input_grad[:4]
    needs_weight = ctx.needs_input_grad[7]
    needs_gate, needs_up, needs_down = list(needs_gate), list(needs_up), list(needs_down)
    dx, dw_gate, dw_up, dw_down, d_weight = _swiglu_moe_backward_op(
        dy, x, gate, up, w_gate, w_up, w_down, counts, token_sorted, weight_sorted,
        needs_x, needs_gate, needs_up, needs_down, needs_weight,
    )
    bank_sizes = [w.shape[0] for w in w_gate]
    return (
        dx if needs_x else None,
        _split_bank_grads(dw_gate, bank_sizes, needs_gate),
        _split_bank_grads(dw_up, bank_sizes, needs_up),
        _split_bank_grads(dw_down, bank_sizes, needs_down),
        None, None, None,
        d_weight if needs_weight else None,
        None,
    )


_swiglu_moe_op.register_autograd(_op_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------


def _check_swiglu_inputs(x, w_gate, w_up, w_down, counts, token_sorted, order, weight_sorted, token_idx):
    if not (len(w_gate) == len(w_up) == len(w_down)):
        raise ValueError(
            f"got {len(w_gate)} gate, {len(w_up)} up and {len(w_down)} down banks; each bank needs all three."
        )
    _check_inputs(x, w_gate, counts, row_index=token_sorted)
    _check_inputs(x, w_up, counts, row_index=token_sorted)
    d_model = x.shape[1]
    for i, (g, u, d) in enumerate(zip(w_gate, w_up, w_down)):
        if u.shape != g.shape or d.shape != (g.shape[0], d_model, g.shape[1]):
            raise ValueError(
                f"bank {i} has w_gate {tuple(g.shape)}, w_up {tuple(u.shape)} and w_down {tuple(d.shape)}; "
                f"they must be [E_b, F, D], [E_b, F, D] and [E_b, D, F] with D = x.shape[1] = {d_model}."
            )
        if d.dtype != x.dtype or d.device != x.device:
            raise ValueError(
                f"w_down of bank {i} is {d.dtype} on {d.device}; it must match x ({x.dtype} on {x.device})."
            )
    n_rows = token_sorted.shape[0]
    _check_index("order", order, n_rows, x.device)
    _check_index("token_idx", token_idx, n_rows, x.device)
    w = weight_sorted
    if w.shape != (n_rows,) or not w.is_floating_point() or w.device != x.device:
        raise ValueError(
            f"weight_sorted is {w.dtype} with shape {tuple(w.shape)} on {w.device}; it must be a "
            f"floating-point [{n_rows}] tensor on {x.device}."
        )


def triton_swiglu_moe(x_TD: Tensor, w_gate: list[Tensor], w_up: list[Tensor], w_down: list[Tensor],
                      counts_E: Tensor, token_sorted_A: Tensor, order_A: Tensor, weight_sorted_A: Tensor,
                      token_idx_A: Tensor) -> Tensor:
    """y [T, D] = Σ over each token's assignments of weight · SwiGLU_expert(x), differentiable in x, every
    bank's weights and the routing weights (the router's gradient).

    w_gate / w_up [E_b, F, D] and w_down [E_b, D, F] per bank, whose experts concatenated are the E
    global experts counted by counts_E [E] (rows per expert, zeros allowed, summing to A). Sorted row r
    (expert order) reads token token_sorted_A[r] and goes to assignment slot order_A[r] (a permutation
    of the A slots) with routing weight weight_sorted_A[r]; token_idx_A [A] is the token of each slot.
    The sums and the permutation are not checked, because that would need a host sync.
    """
    # Under autocast the GEMMs run in its dtype like every nn.Linear beside them; the routing weights
    # keep their precision (the kernels apply them in fp32).
    x_TD, w_gate, w_up, w_down = autocast_inputs(x_TD.device.type, x_TD, list(w_gate), list(w_up), list(w_down))
    args = (x_TD, w_gate, w_up, w_down, counts_E, token_sorted_A, order_A, weight_sorted_A, token_idx_A)
    _check_swiglu_inputs(*args)
    y, _, _ = torch.ops.modular.triton_swiglu_moe(*args)
    return y


def swiglu_moe(x_TD: Tensor, banks: list, counts_E: Tensor, token_sorted_A: Tensor, order_A: Tensor,
               weight_sorted_A: Tensor, token_idx_A: Tensor) -> Tensor:
    """`triton_swiglu_moe` over SwiGLU banks (modules with w_gate, w_up, w_down): the MoE layer's entry."""
    weights = ([b.w_gate for b in banks], [b.w_up for b in banks], [b.w_down for b in banks])
    return triton_swiglu_moe(x_TD, *weights, counts_E, token_sorted_A, order_A, weight_sorted_A, token_idx_A)
