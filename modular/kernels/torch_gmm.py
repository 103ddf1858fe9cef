"""The torch path of the grouped matmul (the CPU default): `torch._grouped_mm` behind our own backward.

Legend: N sorted rows, K input width, M output width, E experts; w [E, M, K] is stacked nn.Linear
weights and counts [E] the rows of each expert's contiguous segment of x [N, K].

`torch._grouped_mm` runs on the CPU (fp32/bf16/fp16) as a C++ loop of one BLAS call per segment,
but its autograd formula breaks on a stride-0 gradient (`y.sum().backward()`), so `GroupedMM` wraps
it: dX is one more grouped matmul against w, dW the "2D x 2D" form whose offsets split the
contraction (dY^T [M, N] @ x [N, K] -> [E, M, K]); an empty expert's dW comes out zero.
Where the op cannot run (float64, widths that break its 16-byte stride rule), the per-segment loop
does the same work with autograd; padded bmm is kept as a measured alternative (slower here).
`SwiGLUMoE` is the MoE layer's whole routed SwiGLU step (gather, experts, weighted combine) as one
Function that streams expert by expert: the fastest CPU path measured (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import torch
from torch import Tensor

from modular.kernels.autocast import autocast_inputs

IMPLS = ("auto", "grouped_mm", "segments", "padded_bmm")
_GMM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def segment_offsets(counts_E: Tensor) -> Tensor:
    """[E] int32 end offsets of the segments (what torch._grouped_mm takes)."""
    return torch.cumsum(counts_E, 0, dtype=torch.int32)


def can_use_grouped_mm(x: Tensor, w: Tensor) -> bool:
    """torch._grouped_mm needs fp32/bf16/fp16 and row strides that are multiples of 16 bytes."""
    if not hasattr(torch, "_grouped_mm") or x.dtype not in _GMM_DTYPES or w.dtype != x.dtype:
        return False
    align = 16 // x.element_size()
    return w.shape[-1] % align == 0 and w.shape[-2] % align == 0


def _rowmajor(t: Tensor) -> Tensor:
    """Contiguous rows with an aligned stride (materialises stride-0 and other odd gradients)."""
    if t.numel() == 0:
        return t.new_empty(t.shape)  # an empty tensor counts as contiguous whatever its strides
    if t.stride(-1) == 1 and t.stride(0) % (16 // t.element_size()) == 0 and t.stride(0) >= t.shape[-1]:
        return t
    return t.contiguous()


def _gmm(a: Tensor, b: Tensor, offs: Tensor) -> Tensor:
    return torch._grouped_mm(a, b, offs=offs)


class GroupedMM(torch.autograd.Function):
    """y [N, M] = x[seg_e] @ w[e].T per segment, forward and backward on torch._grouped_mm."""

    @staticmethod
    def forward(ctx, x_NK: Tensor, w_EMK: Tensor, offs_E: Tensor) -> Tensor:
        x_NK = _rowmajor(x_NK)
        ctx.save_for_backward(x_NK, w_EMK, offs_E)
        return _gmm(x_NK, w_EMK.transpose(-2, -1), offs_E)

    @staticmethod
    def backward(ctx, dy_NM: Tensor):
        x_NK, w_EMK, offs_E = ctx.saved_tensors
        dy_NM = _rowmajor(dy_NM)
        dx = _gmm(dy_NM, w_EMK, offs_E) if ctx.needs_input_grad[0] else None  # [N, M] @ [E, M, K]
        dw = _gmm(dy_NM.t(), x_NK, offs_E) if ctx.needs_input_grad[1] else None  # [M, N] @ [N, K] → [E, M, K]
        return dx, dw, None


def grouped_mm_segments(x_NK: Tensor, w_EMK: Tensor, counts_E: Tensor) -> Tensor:
    """One matmul per non-empty segment; autograd gives the backward (any dtype, any width)."""
    sizes = counts_E.tolist()
    # unbind, not w[e]: indexing one expert per call would make E full-size zero gradients of w.
    experts = w_EMK.unbind(0)
    outputs = [seg @ experts[e].t() for e, seg in enumerate(torch.split(x_NK, sizes)) if sizes[e] > 0]
    if not outputs:  # no rows at all: an empty product keeps w in the graph (its gradient is zero)
        return x_NK @ experts[0].t()
    return torch.cat(outputs, dim=0)


def grouped_mm_padded_bmm(x_NK: Tensor, w_EMK: Tensor, counts_E: Tensor) -> Tensor:
    """Scatter rows into [E, max count, K] zero padding, one bmm, gather back (autograd backward)."""
    E, N = w_EMK.shape[0], x_NK.shape[0]
    capacity = int(counts_E.max()) if E else 0
    expert_of_row = torch.repeat_interleave(torch.arange(E, device=x_NK.device), counts_E)  # [N]
    starts = torch.cumsum(counts_E, 0) - counts_E
    slot = expert_of_row * capacity + torch.arange(N, device=x_NK.device) - starts[expert_of_row]  # [N]
    x_pad = x_NK.new_zeros(E * capacity, x_NK.shape[1]).index_copy(0, slot, x_NK)
    y_pad = torch.bmm(x_pad.view(E, capacity, x_NK.shape[1]), w_EMK.transpose(1, 2))  # [E, C, M]
    return y_pad.reshape(E * capacity, w_EMK.shape[1]).index_select(0, slot)


def torch_grouped_mm(x_NK: Tensor, w_EMK: Tensor, counts_E: Tensor, impl: str = "auto") -> Tensor:
    """x [N, K], w [E, M, K], counts [E] (sum N) → [N, M]. `auto` is grouped_mm where it can run."""
    if impl == "auto":
        impl = "grouped_mm" if can_use_grouped_mm(x_NK, w_EMK) else "segments"
    if impl == "grouped_mm":
        return GroupedMM.apply(x_NK, w_EMK, segment_offsets(counts_E))
    if impl == "segments":
        return grouped_mm_segments(x_NK, w_EMK, counts_E)
    if impl == "padded_bmm":
        return grouped_mm_padded_bmm(x_NK, w_EMK, counts_E)
    raise ValueError(f"grouped matmul impl='{impl}' is unknown; allowed: {', '.join(IMPLS)}.")


CHUNK_ROWS = 1  # rows per chunk in SwiGLUMoE: 1 = expert by expert, the smallest workspaces (peak memory in RESULTS.md)


class SwiGLUMoE(torch.autograd.Function):
    """The routed SwiGLU step of an MoE layer on the torch path, streamed chunk by chunk.

    y [T, D] = Σ over assignments a of token t: w_a · SwiGLU_{e_a}(x_t), for assignments sorted by
    expert (counts_E rows each; token_A, weight_A per sorted row). A chunk is a run of consecutive
    experts of at least chunk_rows rows (1: expert by expert): gather its rows, gate and up GEMMs,
    silu(gate) ⊙ up scaled by the routing weight ((w·h) W = w·(h W)), down GEMM into the gathered
    rows' buffer, one scatter-add into y. No [A, D] buffer is ever built: on a CPU a fresh large
    buffer costs its page faults (~0.3 ms/MB measured here). The temporaries live in workspaces
    allocated once per pass and reused by every chunk (cache-sized when chunks are single experts).
    Kept for backward: the gate and up pre-activations, which the backward overwrites with their own
    gradients; it therefore runs once per forward (retain_graph=True raises).
    """

    @staticmethod
    def forward(ctx, x_TD: Tensor, w_gate_EFD: Tensor, w_up_EFD: Tensor, w_down_EDF: Tensor, weight_A: Tensor,
                token_A: Tensor, counts_E: Tensor, chunk_rows: int) -> Tensor:
        ffn = w_gate_EFD.shape[1]
        chunks = _chunks(counts_E.tolist(), chunk_rows)
        rows = max((r1 - r0 for r0, r1, _ in chunks), default=0)
        buf_RD, h_RF = x_TD.new_empty(rows, x_TD.shape[1]), x_TD.new_empty(rows, ffn)  # workspaces
        out_TD = x_TD.new_zeros(x_TD.shape)
        saved = [] if any(ctx.needs_input_grad) else None  # inference keeps nothing
        for r0, r1, experts in chunks:
            tok_c, R = token_A[r0:r1], r1 - r0
            x_c = torch.index_select(x_TD, 0, tok_c, out=buf_RD[:R])  # [R, D]
            gate, up = x_c.new_empty(R, ffn), x_c.new_empty(R, ffn)
            for e, a, b in experts:
                torch.mm(x_c[a:b], w_gate_EFD[e].t(), out=gate[a:b])
                torch.mm(x_c[a:b], w_up_EFD[e].t(), out=up[a:b])
            h = torch.sigmoid(gate, out=h_RF[:R]).mul_(gate).mul_(up).mul_(weight_A[r0:r1].unsqueeze(-1))
            y_c = x_c  # the gathered rows are spent: the expert outputs take their place
            for e, a, b in experts:
                torch.mm(h[a:b], w_down_EDF[e].t(), out=y_c[a:b])
            out_TD.index_add_(0, tok_c, y_c)
            if saved is not None:
                saved.append((gate, up))
        ctx.save_for_backward(x_TD, w_gate_EFD, w_up_EFD, w_down_EDF, weight_A, token_A)
        ctx.chunks, ctx.rows, ctx.pre_activations = chunks, rows, saved
        return out_TD

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy_TD: Tensor):
        if ctx.pre_activations is None:
            raise RuntimeError("the torch SwiGLU MoE step reuses its saved buffers, so its backward runs only once "
                               "per forward (retain_graph=True is not supported); set layer.fused_swiglu=False.")
        x_TD, w_gate_EFD, w_up_EFD, w_down_EDF, weight_A, token_A = ctx.saved_tensors
        saved, ctx.pre_activations = ctx.pre_activations, None
        need_x, need_gate, need_up, need_down, need_weight = ctx.needs_input_grad[:5]
        nonempty = [e for _, _, experts in ctx.chunks for e, _, _ in experts]
        dx_TD = torch.zeros_like(x_TD) if need_x else None
        dw_gate = _expert_grad_buffer(w_gate_EFD, nonempty) if need_gate else None
        dw_up = _expert_grad_buffer(w_up_EFD, nonempty) if need_up else None
        dw_down = _expert_grad_buffer(w_down_EDF, nonempty) if need_down else None
        d_weight = torch.empty_like(weight_A) if need_weight else None
        ffn = w_gate_EFD.shape[1]
        buf_RD = x_TD.new_empty(ctx.rows, x_TD.shape[1])  # workspaces, reused by every chunk
        sig_RF, silu_RF, h_RF, dh_RF = (x_TD.new_empty(ctx.rows, ffn) for _ in range(4))
        for (r0, r1, experts), (gate, up) in zip(ctx.chunks, saved):
            tok_c, w_c, R = token_A[r0:r1], weight_A[r0:r1].unsqueeze(-1), r1 - r0
            dy_c = torch.index_select(dy_TD, 0, tok_c, out=buf_RD[:R])  # contiguous whatever dy's strides
            sig = torch.sigmoid(gate, out=sig_RF[:R])
            silu = torch.mul(gate, sig, out=silu_RF[:R])
            h = torch.mul(silu, up, out=h_RF[:R])  # recomputed, before the routing weight
            dh = dh_RF[:R]
            for e, a, b in experts:
                torch.mm(dy_c[a:b], w_down_EDF[e], out=dh[a:b])  # [n, D] @ [D, F]
            if need_weight:
                torch.linalg.vecdot(dh, h, out=d_weight[r0:r1])
            dh.mul_(w_c)
            if need_down:
                h.mul_(w_c)
                for e, a, b in experts:
                    torch.mm(dy_c[a:b].t(), h[a:b], out=dw_down[e])  # [D, n] @ [n, F]
            dh_up = torch.mul(dh, up, out=h)
            d_up = torch.mul(dh, silu, out=up)
            d_act = silu.sub_(gate).sub_(1).mul_(sig).neg_()  # dsilu/dg = σ(1 + g(1 − σ)) = −σ(gσ − g − 1)
            d_gate = torch.mul(dh_up, d_act, out=gate)
            if need_gate or need_up:
                x_c = torch.index_select(x_TD, 0, tok_c, out=buf_RD[:R])  # gathered again into dy's spent rows
                for e, a, b in experts:
                    if need_gate:
                        torch.mm(d_gate[a:b].t(), x_c[a:b], out=dw_gate[e])  # [F, n] @ [n, D]
                    if need_up:
                        torch.mm(d_up[a:b].t(), x_c[a:b], out=dw_up[e])
            if need_x:
                dx_c = buf_RD[:R]
                for e, a, b in experts:
                    torch.mm(d_gate[a:b], w_gate_EFD[e], out=dx_c[a:b]).addmm_(d_up[a:b], w_up_EFD[e])
                dx_TD.index_add_(0, tok_c, dx_c)
        return dx_TD, dw_gate, dw_up, dw_down, d_weight, None, None, None


def _chunks(sizes: list[int], chunk_rows: int) -> list[tuple[int, int, list[tuple[int, int, int]]]]:
    """Runs of consecutive non-empty experts of about chunk_rows rows:
    [(first row, end row, [(expert, first row in chunk, end row in chunk), ...]), ...]."""
    chunks, experts, start, r0 = [], [], 0, 0
    for e, n in enumerate(sizes):
        if n:
            experts.append((e, start - r0, start - r0 + n))
        start += n
        if experts and (start - r0 >= chunk_rows or e == len(sizes) - 1):
            chunks.append((r0, start, experts))
            experts, r0 = [], start
    return chunks


def _expert_grad_buffer(w: Tensor, written: list[int]) -> Tensor:
    """Uninitialised [E, ...] gradient; experts not in `written` (no rows: zero gradient) are zeroed."""
    grad = torch.empty_like(w)
    missing = sorted(set(range(w.shape[0])) - set(written))
    if missing:
        grad[missing] = 0
    return grad


def can_fuse_swiglu_moe(x_TD: Tensor, w_gate_EFD: Tensor, w_down_EDF: Tensor) -> bool:
    """The step is plain torch.mm per expert: any floating dtype, as long as all operands share it."""
    return x_TD.is_floating_point() and w_gate_EFD.dtype == x_TD.dtype == w_down_EDF.dtype


def torch_swiglu_moe(x_TD: Tensor, w_gate_EFD: Tensor, w_up_EFD: Tensor, w_down_EDF: Tensor, counts_E: Tensor,
                     token_sorted_A: Tensor, weight_sorted_A: Tensor) -> Tensor:
    """y [T, D] = Σ over each token's assignments of weight · SwiGLU_expert(x); rows sorted by expert."""
    x_TD, w_gate_EFD, w_up_EFD, w_down_EDF = autocast_inputs(x_TD.device.type, x_TD, w_gate_EFD, w_up_EFD, w_down_EDF)
    return SwiGLUMoE.apply(x_TD, w_gate_EFD, w_up_EFD, w_down_EDF, weight_sorted_A.to(x_TD.dtype), token_sorted_A,
                           counts_E, CHUNK_ROWS)
