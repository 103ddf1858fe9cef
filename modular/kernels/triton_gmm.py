"""Triton grouped GEMM for mixture-of-experts: ``Y = X·W_eᵀ`` over contiguous per-expert row segments.
Forward, dX and dW kernels (fp32 accumulation), several banks per launch, fused gather and scatter; torch ops.
"""

from __future__ import annotations

import collections
import os
import threading

import torch
import triton
import triton.language as tl
from torch import Tensor

from modular.kernels.autocast import autocast_inputs

# Legend: N expert-sorted rows (token slots), T tokens (gather source), K input features, M output
# features, E experts over all banks, E_b experts of one bank. Weights are stored like nn.Linear:
# w[e] is [M, K] and a segment computes x_seg @ w[e].T.

__all__ = [
    "GroupedMM",
    "triton_gather_grouped_mm",
    "triton_grouped_mm",
    "triton_grouped_mm_multi",
    "triton_scatter_grouped_mm",
]

# Triton decides at decoration time whether @triton.jit compiles or interprets, so the choice is
# frozen at import; the checks below must agree with what the kernels actually are.
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# Persistent grid size in the interpreter: a few programs so that every program walks several tiles
# (the code path a real GPU takes), while the interpreter's per-program cost stays small.
_INTERPRET_PROGRAMS = 3


# ----------------------------------------------------------------------------------------------------
# Autotune spaces. The interpreter fails on more than one config, and it is ~1000x slower than a GPU,
# so it gets one config with blocks small enough that the tests still cover partial tiles, several
# row blocks per expert, several column blocks and a masked tail of the reduction.
# ----------------------------------------------------------------------------------------------------


def _cfg(rows, cols, inner, group, warps, stages):
    return triton.Config(
        {"BLOCK_ROWS": rows, "BLOCK_COLS": cols, "BLOCK_INNER": inner, "GROUP_ROWS": group},
        num_warps=warps,
        num_stages=stages,
    )


if _INTERPRET:
    _GMM_CONFIGS = [_cfg(32, 64, 64, 2, 4, 1)]
    _DW_CONFIGS = [_cfg(32, 64, 64, 2, 4, 1)]  # rows = reduction chunk; cols, inner = dW tile
else:
    # Hopper-class configs; OutOfResources ones are skipped by the autotuner. Small row blocks matter
    # for many small experts (less padding waste per segment), large ones for few big experts.
    _GMM_CONFIGS = [
        _cfg(128, 128, 64, 8, 8, 3),
        _cfg(128, 256, 64, 8, 8, 3),
        _cfg(128, 128, 64, 8, 4, 4),
        _cfg(128, 64, 64, 8, 4, 4),
        _cfg(64, 128, 64, 8, 4, 4),
        _cfg(64, 256, 64, 8, 8, 3),
        _cfg(64, 64, 64, 8, 4, 4),
        _cfg(128, 128, 32, 8, 4, 5),
    ]
    # For dW, BLOCK_COLS x BLOCK_INNER is the [M, K] output tile and BLOCK_ROWS the reduction chunk.
    _DW_CONFIGS = [
        _cfg(64, 128, 128, 8, 8, 3),
        _cfg(64, 128, 256, 8, 8, 3),
        _cfg(32, 128, 128, 8, 4, 4),
        _cfg(64, 64, 128, 8, 4, 4),
        _cfg(64, 128, 64, 8, 4, 4),
        _cfg(64, 64, 64, 8, 4, 4),
        _cfg(128, 128, 128, 8, 8, 3),
    ]
    if os.environ.get("MODULAR_GMM_AUTOTUNE", "1") == "0":
        # First config only: no tuning sweep (each config is a compile and a benchmark) for short
        # runs and GPU test suites that see many shapes once.
        _GMM_CONFIGS, _DW_CONFIGS = _GMM_CONFIGS[:1], _DW_CONFIGS[:1]


# ----------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------


@triton.autotune(
    configs=_GMM_CONFIGS,
    # The fused variants (gathered loads, scattered or scaled stores, the row-dot epilogue) have other best
    # tiles than the plain GEMM at the same shape: each variant is tuned on its own.
    key=["n_cols", "n_inner", "rows_hint", "MULTI_BANK", "GATHER_A", "SCATTER_C", "SCALE", "ROW_DOT", "GATHER_H"],
    # Each config writes the row-dot partial sums of its own column blocks only; stale ones from a
    # config benchmarked before must not survive into the sum.
    reset_to_zero=["row_dot"],
)
@triton.heuristics({"EVEN_INNER": lambda args: args["n_inner"] % args["BLOCK_INNER"] == 0})
@triton.jit(do_not_specialize=["rows_hint"])
def _gmm_kernel(
    A, B, C,  # A [n_rows or T, n_inner]; B_e [n_inner, n_cols] via strides; C [n_rows or more, n_cols]
    counts,  # [n_experts] rows per expert, segments contiguous in expert order
    bank_table,  # int64 [2 * n_banks]: data_ptr of each bank, then its first global expert (MULTI_BANK)
    a_index,  # [n_rows] row of A read by each row (GATHER_A)
    c_index,  # [n_rows] row of C written by each row (SCATTER_C)
    row_scale,  # [n_rows] factor applied to each result row (SCALE)
    H, h_index, row_dot,  # ROW_DOT: row_dot[r, col_block] = sum over the block of result[r] * H[h_index[r]]
    n_rows, n_cols, n_inner, n_experts, n_banks,
    rows_hint,  # autotune key only: rows per expert, rounded to a power of two
    stride_a_row, stride_a_inner,
    stride_b_expert, stride_b_inner, stride_b_col,
    stride_c_row, stride_c_col,
    stride_h_row, stride_h_col, stride_row_dot,
    BLOCK_E: tl.constexpr, BLOCK_BANKS: tl.constexpr, MULTI_BANK: tl.constexpr,
    GATHER_A: tl.constexpr, SCATTER_C: tl.constexpr, SCALE: tl.constexpr,
    ROW_DOT: tl.constexpr, GATHER_H: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, EVEN_INNER: tl.constexpr,
    BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr, BLOCK_INNER: tl.constexpr, GROUP_ROWS: tl.constexpr,
):
    """C[seg_e] = A[seg_e] @ B_e for every expert e; a persistent grid walks all (row, col) block tiles."""
    # The tile -> expert map is rebuilt on device by every program from `counts` (one small vector
    # load and two prefix sums): no host sync, no extra launch, and the grid never depends on counts.
    e_range = tl.arange(0, BLOCK_E)
    counts_e = tl.load(counts + e_range, mask=e_range < n_experts, other=0).to(tl.int32)
    rows_end_e = tl.cumsum(counts_e, 0)
    blocks_e = tl.cdiv(counts_e, BLOCK_ROWS)
    blocks_end_e = tl.cumsum(blocks_e, 0)
    total_row_blocks = tl.sum(blocks_e, 0)
    col_blocks = tl.cdiv(n_cols, BLOCK_COLS)
    total_tiles = total_row_blocks * col_blocks
    tiles_per_group = GROUP_ROWS * col_blocks
    if MULTI_BANK:
        bank_range = tl.arange(0, BLOCK_BANKS)
        bank_first_e = tl.load(bank_table + n_banks + bank_range, mask=bank_range < n_banks, other=2**30)

    for tile in range(tl.program_id(0), total_tiles, tl.num_programs(0)):
        # Grouped order: GROUP_ROWS neighbouring row blocks (mostly one expert) sweep the column
        # blocks together, so concurrently running tiles share weight columns and A rows in L2.
        group = tile // tiles_per_group
        first_row_block = group * GROUP_ROWS
        group_size = tl.minimum(total_row_blocks - first_row_block, GROUP_ROWS)
        in_group = tile % tiles_per_group
        row_block = first_row_block + in_group % group_size
        col_block = in_group // group_size

        # Empty experts own no row blocks, so they never match here.
        expert = tl.sum((blocks_end_e <= row_block).to(tl.int32), 0)
        is_expert = e_range == expert
        block_in_expert = row_block - tl.sum(tl.where(is_expert, blocks_end_e - blocks_e, 0), 0)
        seg_end = tl.sum(tl.where(is_expert, rows_end_e, 0), 0)
        seg_start = seg_end - tl.sum(tl.where(is_expert, counts_e, 0), 0)
        # Clamp so that counts summing past n_rows cannot read or write out of bounds.
        seg_end = tl.minimum(seg_end, n_rows)

        rows = seg_start + block_in_expert * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        row_mask = rows < seg_end
        if GATHER_A:
            a_rows = tl.load(a_index + rows, mask=row_mask, other=0).to(tl.int64)
        else:
            a_rows = rows.to(tl.int64)
        cols = col_block * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
        col_mask = cols < n_cols
        inner = tl.arange(0, BLOCK_INNER)

        if MULTI_BANK:
            # Banks are separate parameters: look the bank's base pointer up instead of copying all
            # banks into one tensor every step. An empty bank shares its first expert with the next
            # bank, and the last bank starting at or before `expert` is the one that owns it.
            bank = tl.sum((bank_first_e <= expert).to(tl.int32), 0) - 1
            bank_first = tl.sum(tl.where(bank_range == bank, bank_first_e, 0), 0)
            b_bank = tl.load(bank_table + bank).to(tl.pointer_type(B.dtype.element_ty))
            # The launcher guarantees 16-byte aligned banks; without this hint the compiler cannot
            # vectorise the weight loads, and the software pipeline falls back to plain loads.
            b_bank = tl.multiple_of(b_bank, 16)
            b_base = b_bank + (expert - bank_first).to(tl.int64) * stride_b_expert
        else:
            b_base = B + expert.to(tl.int64) * stride_b_expert

        a_ptrs = A + a_rows[:, None] * stride_a_row + inner[None, :] * stride_a_inner
        b_ptrs = b_base + inner[:, None] * stride_b_inner + cols[None, :] * stride_b_col
        acc = tl.zeros((BLOCK_ROWS, BLOCK_COLS), dtype=tl.float32)
        for k in range(0, n_inner, BLOCK_INNER):
            if EVEN_INNER:
                a = tl.load(a_ptrs, mask=row_mask[:, None], other=0.0)
                b = tl.load(b_ptrs, mask=col_mask[None, :], other=0.0)
            else:
                inner_mask = inner < n_inner - k
                a = tl.load(a_ptrs, mask=row_mask[:, None] & inner_mask[None, :], other=0.0)
                b = tl.load(b_ptrs, mask=inner_mask[:, None] & col_mask[None, :], other=0.0)
            if UPCAST:  # the interpreter's bf16 tl.dot is wrong; fp32 is exact for bf16 products
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
            a_ptrs += BLOCK_INNER * stride_a_inner
            b_ptrs += BLOCK_INNER * stride_b_inner

        out_mask = row_mask[:, None] & col_mask[None, :]
        if ROW_DOT:
            # d(routing weight) = <dY row, unweighted output row> = <dY row @ W_e, H row>: this tile's
            # share, from the fp32 accumulator, before the weight is applied. One slot per column block
            # keeps it free of atomics and deterministic; the caller sums the slots.
            if GATHER_H:
                h_rows = tl.load(h_index + rows, mask=row_mask, other=0).to(tl.int64)
            else:
                h_rows = rows.to(tl.int64)
            h_ptrs = H + h_rows[:, None] * stride_h_row + cols[None, :] * stride_h_col
            h = tl.load(h_ptrs, mask=out_mask, other=0.0)
            partial = tl.sum(acc * h.to(tl.float32), 1)
            tl.store(row_dot + rows.to(tl.int64) * stride_row_dot + col_block, partial, mask=row_mask)
        if SCALE:
            acc = acc * tl.load(row_scale + rows, mask=row_mask, other=0.0).to(tl.float32)[:, None]
        if SCATTER_C:
            c_rows = tl.load(c_index + rows, mask=row_mask, other=0).to(tl.int64)
        else:
            c_rows = rows.to(tl.int64)
        c_ptrs = C + c_rows[:, None] * stride_c_row + cols[None, :] * stride_c_col
        tl.store(c_ptrs, acc.to(C.dtype.element_ty), mask=out_mask)


@triton.autotune(configs=_DW_CONFIGS, key=["n_out", "n_in", "rows_hint", "SUBSET", "GATHER_DY", "GATHER_X", "SCALE"])
@triton.jit(do_not_specialize=["rows_hint"])
def _gmm_dw_kernel(
    DY, X, DW,  # DY [n_rows or more, n_out], X [n_rows or T, n_in], DW [n_active, n_out, n_in]
    counts,  # [n_experts]
    active_experts,  # int32 [n_active]: global expert of each DW slice (SUBSET)
    dy_index,  # [n_rows] row of DY of each row (GATHER_DY)
    x_index,  # [n_rows] row of X of each row (GATHER_X)
    row_scale,  # [n_rows] factor on each DY row (SCALE)
    n_rows, n_out, n_in, n_experts,
    rows_hint,  # autotune key only
    stride_dy_row, stride_dy_col,
    stride_x_row, stride_x_col,
    stride_dw_expert, stride_dw_out, stride_dw_in,
    BLOCK_E: tl.constexpr, SUBSET: tl.constexpr, GATHER_DY: tl.constexpr, GATHER_X: tl.constexpr,
    SCALE: tl.constexpr, INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr, BLOCK_INNER: tl.constexpr, GROUP_ROWS: tl.constexpr,
):
    """DW[a] = DY[seg_e]ᵀ @ X[seg_e]: a program per (expert, out block, in block) reduces over the segment.

    Each output element is owned by exactly one program, so there are no atomics, the result is
    deterministic, and an empty expert's tile is written as zeros.
    """
    pid = tl.program_id(0)
    out_blocks = tl.cdiv(n_out, BLOCK_COLS)
    in_blocks = tl.cdiv(n_in, BLOCK_INNER)
    tiles_per_expert = out_blocks * in_blocks
    # Expert-major order: tiles of one expert run together and share its rows of DY and X in L2;
    # inside an expert, grouped order for the same reason as in the forward kernel.
    slot = pid // tiles_per_expert
    tile = pid % tiles_per_expert
    tiles_per_group = GROUP_ROWS * in_blocks
    first_out_block = (tile // tiles_per_group) * GROUP_ROWS
    group_size = tl.minimum(out_blocks - first_out_block, GROUP_ROWS)
    out_block = first_out_block + (tile % tiles_per_group) % group_size
    in_block = (tile % tiles_per_group) // group_size

    if SUBSET:  # noqa: SIM108  (a compile-time branch of the kernel, kept as a statement)
        expert = tl.load(active_experts + slot)
    else:
        expert = slot
    e_range = tl.arange(0, BLOCK_E)
    counts_e = tl.load(counts + e_range, mask=e_range < n_experts, other=0).to(tl.int32)
    rows_end_e = tl.cumsum(counts_e, 0)
    is_expert = e_range == expert
    seg_end = tl.sum(tl.where(is_expert, rows_end_e, 0), 0)
    seg_start = seg_end - tl.sum(tl.where(is_expert, counts_e, 0), 0)
    seg_end = tl.minimum(seg_end, n_rows)

    outs = out_block * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    ins = in_block * BLOCK_INNER + tl.arange(0, BLOCK_INNER)
    out_mask = outs < n_out
    in_mask = ins < n_in
    acc = tl.zeros((BLOCK_COLS, BLOCK_INNER), dtype=tl.float32)
    for r in range(seg_start, seg_end, BLOCK_ROWS):
        rows = r + tl.arange(0, BLOCK_ROWS)
        row_mask = rows < seg_end
        if GATHER_DY:
            dy_rows = tl.load(dy_index + rows, mask=row_mask, other=0).to(tl.int64)
        else:
            dy_rows = rows.to(tl.int64)
        if GATHER_X:
            x_rows = tl.load(x_index + rows, mask=row_mask, other=0).to(tl.int64)
        else:
            x_rows = rows.to(tl.int64)
        dy = tl.load(
            DY + dy_rows[:, None] * stride_dy_row + outs[None, :] * stride_dy_col,
            mask=row_mask[:, None] & out_mask[None, :],
            other=0.0,
        )
        x = tl.load(
            X + x_rows[:, None] * stride_x_row + ins[None, :] * stride_x_col,
            mask=row_mask[:, None] & in_mask[None, :],
            other=0.0,
        )
        if SCALE:
            scale = tl.load(row_scale + rows, mask=row_mask, other=0.0).to(tl.float32)
            dy = (dy.to(tl.float32) * scale[:, None]).to(DY.dtype.element_ty)
        if UPCAST:
            dy = dy.to(tl.float32)
            x = x.to(tl.float32)
        acc = tl.dot(tl.trans(dy), x, acc, input_precision=INPUT_PRECISION)

    dw_ptrs = (
        DW
        + slot.to(tl.int64) * stride_dw_expert
        + outs[:, None] * stride_dw_out
        + ins[None, :] * stride_dw_in
    )
    tl.store(dw_ptrs, acc.to(DW.dtype.element_ty), mask=out_mask[:, None] & in_mask[None, :])


# ----------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MIN_BLOCK_COLS = min(c.kwargs["BLOCK_COLS"] for c in _GMM_CONFIGS)
_TABLE_CACHE_SIZE = 256
_table_cache: collections.OrderedDict = collections.OrderedDict()
_table_lock = threading.Lock()
_SM_COUNTS: dict[int, int] = {}


def _cached_device_tensor(key, values: list[int], dtype: torch.dtype, device: torch.device) -> Tensor:
    """A small constant table on `device`, built once per distinct content.

    The key is the content itself (data pointers, bank sizes), so a hit is always correct, even
    when a parameter was freed and another allocated at the same address. On CUDA a miss copies
    from pinned memory without blocking: no host sync on the hot path.
    """
    key = (device, dtype, key)
    with _table_lock:
        table = _table_cache.get(key)
        if table is not None:
            _table_cache.move_to_end(key)
            return table
    table = torch.tensor(values, dtype=dtype)
    table = table.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else table.to(device)
    with _table_lock:
        _table_cache[key] = table
        if len(_table_cache) > _TABLE_CACHE_SIZE:
            _table_cache.popitem(last=False)
    return table


def _num_programs(device: torch.device) -> int:
    if _INTERPRET:
        return _INTERPRET_PROGRAMS
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNTS:
        _SM_COUNTS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNTS[index]


def _input_precision(dtype: torch.dtype) -> str | None:
    # fp32 inputs follow torch's matmul precision setting, so that this path and the torch path
    # agree: TF32 only where the user allowed it. Half-precision inputs take the backend default.
    if dtype != torch.float32:
        return None
    if _INTERPRET or torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


def _rows_hint(n_rows: int, n_experts: int) -> int:
    return triton.next_power_of_2(max(1, n_rows // max(1, n_experts)))


def _block(n: int) -> int:
    # Vector length for per-expert / per-bank scans; at least 16 so tiny E never meets odd layouts.
    return max(16, triton.next_power_of_2(n))


def _bank_table(ws: list[Tensor], device: torch.device) -> Tensor:
    """int64 [2B]: each bank's data_ptr, then its first global expert.

    Why a pointer table rather than torch.cat(banks): the concatenation copies every bank's weights
    on each forward (a read and a write of all expert weights, ~2x the GEMM's own weight traffic)
    and keeps the copy alive for backward, i.e. one extra copy of all expert weights in memory; the
    table is 16 bytes per bank, cached, and costs one scalar load per tile.
    benchmarks/gmm_gpu.py --banks 2 measures both.
    """
    firsts = [0]
    for w in ws[:-1]:
        firsts.append(firsts[-1] + w.shape[0])
    ptrs = [w.data_ptr() for w in ws]
    return _cached_device_tensor(("banks", tuple(ptrs), tuple(firsts)), ptrs + firsts, torch.int64, device)


def _launch_gmm(a: Tensor, ws: list[Tensor], counts: Tensor, out: Tensor, n_rows: int, transpose_w: bool,
                a_index: Tensor | None = None, c_index: Tensor | None = None, row_scale: Tensor | None = None,
                dot_with: Tensor | None = None, dot_index: Tensor | None = None) -> Tensor | None:
    """out[c_row(r)] = scale[r] · a[a_row(r)] @ B_e(r) for the n_rows expert-sorted rows r.

    B_e = w_e.T (forward) when `transpose_w`, else w_e (dX). With `dot_with`, also returns the fp32
    per-row sums of (a[a_row(r)] @ B_e) · dot_with[dot_row(r)], taken before the scale.
    """
    n_cols = out.shape[1]
    n_inner = a.shape[1]
    row_dot = None
    if dot_with is not None:
        # Zero-filled: slots beyond the chosen config's column blocks must add nothing.
        slots = triton.cdiv(n_cols, _MIN_BLOCK_COLS)
        row_dot = torch.zeros((n_rows, slots), dtype=torch.float32, device=a.device)
    if n_rows == 0 or n_cols == 0:
        return None if row_dot is None else row_dot.sum(1)
    if n_inner == 0:
        # Every product is empty: the rows are zeros (scatter rows included).
        rows = c_index if c_index is not None else slice(0, n_rows)
        out[rows] = 0
        return None if row_dot is None else row_dot.sum(1)
    # One stride set is shared by all banks and the kernel assumes 16-byte aligned bank pointers, so
    # banks that are not contiguous or aligned (a view at an odd offset) are copied here.
    if len(ws) > 1:
        ws = [
            w if w.is_contiguous() and w.data_ptr() % 16 == 0
            else w.clone(memory_format=torch.contiguous_format)
            for w in ws
        ]
    n_experts = counts.shape[0]
    w0 = ws[0]
    if transpose_w:  # B_e = w_e.T: [K, M]
        stride_b_inner, stride_b_col = w0.stride(2), w0.stride(1)
    else:  # B_e = w_e: [M, K]
        stride_b_inner, stride_b_col = w0.stride(1), w0.stride(2)
    multi = len(ws) > 1
    num_programs = _num_programs(a.device)
    # Unused pointer arguments get a harmless stand-in; row_dot gets its own because the autotuner zeroes it.
    dummy = counts
    h = dot_with if dot_with is not None else a

    def grid(meta):
        # Upper bound on row blocks without reading counts: each expert adds at most one partial block.
        row_blocks = triton.cdiv(n_rows, meta["BLOCK_ROWS"]) + n_experts
        return (max(1, min(num_programs, row_blocks * triton.cdiv(n_cols, meta["BLOCK_COLS"]))),)

    _gmm_kernel[grid](
        a, w0, out, counts,
        _bank_table(ws, a.device) if multi else dummy,
        a_index if a_index is not None else dummy,
        c_index if c_index is not None else dummy,
        row_scale if row_scale is not None else dummy,
        h, dot_index if dot_index is not None else dummy,
        row_dot if row_dot is not None else torch.empty(1, dtype=torch.float32, device=a.device),
        n_rows, n_cols, n_inner, n_experts, len(ws), _rows_hint(n_rows, n_experts),
        a.stride(0), a.stride(1),
        w0.stride(0), stride_b_inner, stride_b_col,
        out.stride(0), out.stride(1),
        h.stride(0), h.stride(1), row_dot.stride(0) if row_dot is not None else 0,
        BLOCK_E=_block(n_experts),
        BLOCK_BANKS=_block(len(ws)),
        MULTI_BANK=multi,
        GATHER_A=a_index is not None,
        SCATTER_C=c_index is not None,
        SCALE=row_scale is not None,
        ROW_DOT=row_dot is not None,
        GATHER_H=dot_index is not None,
        INPUT_PRECISION=_input_precision(a.dtype),
        UPCAST=_INTERPRET and a.dtype == torch.bfloat16,
    )
    return None if row_dot is None else row_dot.sum(1)


def _launch_dw(dy: Tensor, x: Tensor, counts: Tensor, n_rows: int, bank_sizes: list[int],
               needs_grad: list[bool], dy_index: Tensor | None = None, x_index: Tensor | None = None,
               row_scale: Tensor | None = None) -> Tensor:
    """dW of the banks with needs_grad, stacked [sum of their E_b, M, K], in one launch over their experts.

    dW_e = Σ_r scale[r] · dy[dy_row(r)]ᵀ x[x_row(r)] over the rows r of expert e.
    """
    n_out, n_in = dy.shape[1], x.shape[1]
    n_experts = counts.shape[0]
    firsts = [sum(bank_sizes[:b]) for b in range(len(bank_sizes))]
    active = [
        e for b, first in enumerate(firsts) if needs_grad[b] for e in range(first, first + bank_sizes[b])
    ]
    dw = torch.empty((len(active), n_out, n_in), dtype=x.dtype, device=x.device)
    if not active or n_out == 0 or n_in == 0:
        return dw
    subset = len(active) != n_experts
    # Frozen banks are common in continual training; leaving out their experts saves their dW GEMMs.
    active_t = (
        _cached_device_tensor(("active", tuple(bank_sizes), tuple(needs_grad)), active, torch.int32, x.device)
        if subset
        else counts
    )

    def grid(meta):
        tiles_per_expert = triton.cdiv(n_out, meta["BLOCK_COLS"]) * triton.cdiv(n_in, meta["BLOCK_INNER"])
        return (len(active) * tiles_per_expert,)

    _gmm_dw_kernel[grid](
        dy, x, dw, counts, active_t,
        dy_index if dy_index is not None else counts,
        x_index if x_index is not None else counts,
        row_scale if row_scale is not None else counts,
        n_rows, n_out, n_in, n_experts, _rows_hint(n_rows, n_experts),
        dy.stride(0), dy.stride(1),
        x.stride(0), x.stride(1),
        dw.stride(0), dw.stride(1), dw.stride(2),
        BLOCK_E=_block(n_experts),
        SUBSET=subset,
        GATHER_DY=dy_index is not None,
        GATHER_X=x_index is not None,
        SCALE=row_scale is not None,
        INPUT_PRECISION=_input_precision(x.dtype),
        UPCAST=_INTERPRET and x.dtype == torch.bfloat16,
    )
    return dw


def _split_bank_grads(dw: Tensor, bank_sizes: list[int], needs_grad: list[bool]) -> list[Tensor | None]:
    # Views of one buffer: a custom op may not return outputs that alias, so the split happens outside it.
    grads = iter(dw.split([size for size, needed in zip(bank_sizes, needs_grad) if needed], dim=0))
    return [next(grads) if needed else None for needed in needs_grad]


def _check_index(name: str, index: Tensor | None, n_rows: int, device: torch.device) -> None:
    if index is None:
        return
    if index.dim() != 1 or index.dtype not in (torch.int64, torch.int32) or index.shape[0] != n_rows:
        raise ValueError(
            f"{name} is {index.dtype} with shape {tuple(index.shape)}; it must be 1-D int64 or int32 "
            f"with one entry per expert-sorted row ({n_rows})."
        )
    if index.device != device:
        raise ValueError(f"{name} is on {index.device}; it must be on {device}.")


def _check_inputs(x: Tensor, ws: list[Tensor], counts: Tensor, row_index: Tensor | None = None,
                  out_index: Tensor | None = None, row_weight: Tensor | None = None,
                  n_out_rows: int = -1) -> None:
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [rows, K], got shape {tuple(x.shape)}.")
    if not ws:
        raise ValueError("at least one weight bank [E_b, M, K] is needed, got an empty list.")
    if x.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"x has dtype {x.dtype}; allowed are float32, float16 and bfloat16.")
    if x.device.type != "cuda" and not _INTERPRET:
        raise RuntimeError(
            f"the Triton grouped GEMM needs CUDA tensors (got {x.device}); on CPU use the torch expert "
            "path or set TRITON_INTERPRET=1 before importing modular.kernels.triton_gmm."
        )
    m = ws[0].shape[1] if ws[0].dim() == 3 else None
    for i, w in enumerate(ws):
        if w.dim() != 3 or w.shape[1] != m or w.shape[2] != x.shape[1]:
            raise ValueError(
                f"weight bank {i} has shape {tuple(w.shape)}; every bank must be [E_b, M, K] with "
                f"K = x.shape[1] = {x.shape[1]} and the same M as bank 0 ({m})."
            )
        if w.dtype != x.dtype or w.device != x.device:
            raise ValueError(
                f"weight bank {i} is {w.dtype} on {w.device}; it must match x ({x.dtype} on {x.device})."
            )
    n_experts = sum(w.shape[0] for w in ws)
    if counts.dim() != 1 or counts.shape[0] != n_experts:
        raise ValueError(
            f"counts has shape {tuple(counts.shape)}; it must be [E] with E = {n_experts} experts "
            "over all banks."
        )
    if counts.dtype not in (torch.int64, torch.int32) or counts.device != x.device:
        raise ValueError(
            f"counts is {counts.dtype} on {counts.device}; it must be int64 or int32 on {x.device}."
        )
    n_rows = _n_rows(x, row_index)
    _check_index("row_index", row_index, n_rows, x.device)
    _check_index("out_index", out_index, n_rows, x.device)
    if row_weight is not None and (
        row_weight.shape != (n_rows,) or not row_weight.is_floating_point() or row_weight.device != x.device
    ):
        raise ValueError(
            f"row_weight is {row_weight.dtype} with shape {tuple(row_weight.shape)} on {row_weight.device}; "
            f"it must be a floating-point [{n_rows}] tensor on {x.device}."
        )
    if out_index is not None and n_out_rows < n_rows:
        raise ValueError(f"n_out_rows is {n_out_rows}; it must be at least the number of rows ({n_rows}).")
    if max(x.shape[0], n_rows, n_out_rows) >= 2**31:
        raise ValueError(f"at most 2**31 - 1 rows are supported, got {max(x.shape[0], n_rows, n_out_rows)}.")


def _n_rows(x: Tensor, row_index: Tensor | None) -> int:
    """Number of expert-sorted rows: the gather index's length, else x's rows."""
    return row_index.shape[0] if row_index is not None else x.shape[0]


# ----------------------------------------------------------------------------------------------------
# Forward / backward bodies, shared by the torch.library ops and the plain autograd.Function
# ----------------------------------------------------------------------------------------------------


def _forward(x, ws, counts, row_index, out_index, row_weight, n_out_rows):
    n_rows = _n_rows(x, row_index)
    if out_index is None:
        out = torch.empty((n_rows, ws[0].shape[1]), dtype=x.dtype, device=x.device)
    elif n_out_rows == n_rows:  # out_index is a permutation: every row gets written
        out = torch.empty((n_out_rows, ws[0].shape[1]), dtype=x.dtype, device=x.device)
    else:  # rows no slot writes (e.g. dropped tokens) must read as zeros
        out = torch.zeros((n_out_rows, ws[0].shape[1]), dtype=x.dtype, device=x.device)
    _launch_gmm(x, ws, counts, out, n_rows, transpose_w=True, a_index=row_index, c_index=out_index,
                row_scale=row_weight)
    return out


def _grad_x(dy, x, ws, counts, row_index, out_index, row_weight, needs_x: bool, needs_weight: bool):
    """(dx [T or 0, K], d row_weight [N or 0]); zero-row results stand for "not requested"."""
    n_rows = _n_rows(x, row_index)
    k = ws[0].shape[2]
    dx = dy.new_empty((x.shape[0] if needs_x else 0, k))
    d_weight = dy.new_empty((0,)) if row_weight is None else row_weight.new_empty((0,))
    if not (needs_x or needs_weight):
        return dx, d_weight
    # Rows of dx in expert-sorted order; with a gather they are summed into tokens below.
    dx_rows = dx if (needs_x and row_index is None) else dy.new_empty((n_rows, k))
    row_dot = _launch_gmm(dy, ws, counts, dx_rows, n_rows, transpose_w=False, a_index=out_index,
                          row_scale=row_weight, dot_with=x if needs_weight else None,
                          dot_index=row_index if needs_weight else None)
    if needs_x and row_index is not None:
        # A token gathered by several slots (top-k) receives the sum of their gradients.
        dx = torch.zeros_like(dx).index_add_(0, row_index, dx_rows)
    if needs_weight:
        d_weight = row_dot.to(row_weight.dtype)
    return dx, d_weight


def _grad_w(dy, x, counts, row_index, out_index, row_weight, bank_sizes, needs_grad):
    return _launch_dw(dy, x, counts, _n_rows(x, row_index), bank_sizes, needs_grad,
                      dy_index=out_index, x_index=row_index, row_scale=row_weight)


# ----------------------------------------------------------------------------------------------------
# torch.library ops: opaque to torch.compile (which cannot trace data_ptr tables), with fake kernels
# for shape propagation and an autograd formula built from the two backward ops.
# ----------------------------------------------------------------------------------------------------


@torch.library.custom_op("modular::triton_grouped_mm", mutates_args=())
def _grouped_mm_op(x: Tensor, ws: list[Tensor], counts: Tensor, row_index: Tensor | None,
                   out_index: Tensor | None, row_weight: Tensor | None, n_out_rows: int) -> Tensor:
    return _forward(x, ws, counts, row_index, out_index, row_weight, n_out_rows)


@_grouped_mm_op.register_fake
def _(x, ws, counts, row_index, out_index, row_weight, n_out_rows):
    n_rows = n_out_rows if out_index is not None else _n_rows(x, row_index)
    return x.new_empty((n_rows, ws[0].shape[1]))


@torch.library.custom_op("modular::triton_grouped_mm_grad_x", mutates_args=())
def _grouped_mm_grad_x_op(dy: Tensor, x: Tensor, ws: list[Tensor], counts: Tensor, row_index: Tensor | None,
                          out_index: Tensor | None, row_weight: Tensor | None, needs_x: bool,
                          needs_weight: bool) -> tuple[Tensor, Tensor]:
    return _grad_x(dy.contiguous(), x, ws, counts, row_index, out_index, row_weight, needs_x, needs_weight)


@_grouped_mm_grad_x_op.register_fake
def _(dy, x, ws, counts, row_index, out_index, row_weight, needs_x, needs_weight):
    dx = dy.new_empty((x.shape[0] if needs_x else 0, ws[0].shape[2]))
    weight_like = dy if row_weight is None else row_weight
    n_weight = _n_rows(x, row_index) if (needs_weight and row_weight is not None) else 0
    return dx, weight_like.new_empty((n_weight,))


@torch.library.custom_op("modular::triton_grouped_mm_grad_w", mutates_args=())
def _grouped_mm_grad_w_op(dy: Tensor, x: Tensor, counts: Tensor, row_index: Tensor | None,
                          out_index: Tensor | None, row_weight: Tensor | None, bank_sizes: list[int],
                          needs_grad: list[bool]) -> Tensor:
    return _grad_w(dy.contiguous(), x, counts, row_index, out_index, row_weight, bank_sizes, needs_grad)


@_grouped_mm_grad_w_op.register_fake
def _(dy, x, counts, row_index, out_index, row_weight, bank_sizes, needs_grad):
    n_active = sum(size for size, needed in zip(bank_sizes, needs_grad) if needed)
    return x.new_empty((n_active, dy.shape[1], x.shape[1]))


def _setup_context(ctx, inputs, output):
    x, ws, counts, row_index, out_index, row_weight, _ = inputs
    ctx.save_for_backward(x, counts, row_index, out_index, row_weight, *ws)


def _op_backward(ctx, dy):
    x, counts, row_index, out_index, row_weight, *ws = ctx.saved_tensors
    needs_x, needs_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[5]
    needs_ws = list(ctx.needs_input_grad[1])
    dx = d_weight = None
    if needs_x or needs_weight:
        dx, d_weight = _grouped_mm_grad_x_op(dy, x, ws, counts, row_index, out_index, row_weight, needs_x,
                                             needs_weight)
    dws: list[Tensor | None] = [None] * len(ws)
    if any(needs_ws):
        bank_sizes = [w.shape[0] for w in ws]
        dw = _grouped_mm_grad_w_op(dy, x, counts, row_index, out_index, row_weight, bank_sizes, needs_ws)
        dws = _split_bank_grads(dw, bank_sizes, needs_ws)
    return (dx if needs_x else None), dws, None, None, None, (d_weight if needs_weight else None), None


_grouped_mm_op.register_autograd(_op_backward, setup_context=_setup_context)


class GroupedMM(torch.autograd.Function):
    """The same computation as the library op, as a plain autograd.Function (no dispatcher overhead).

    ``GroupedMM.apply(x, counts, row_index, out_index, row_weight, n_out_rows, *ws)`` with None for
    unused options and n_out_rows = -1 without out_index; prefer the functions below.
    """

    @staticmethod
    def forward(ctx, x, counts, row_index, out_index, row_weight, n_out_rows, *ws):
        ws = list(ws)
        _check_inputs(x, ws, counts, row_index, out_index, row_weight, n_out_rows)
        ctx.save_for_backward(x, counts, row_index, out_index, row_weight, *ws)
        return _forward(x, ws, counts, row_index, out_index, row_weight, n_out_rows)

    @staticmethod
    def backward(ctx, dy):
        x, counts, row_index, out_index, row_weight, *ws = ctx.saved_tensors
        needs_x, needs_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[4]
        needs_ws = list(ctx.needs_input_grad[6:])
        # An upstream gradient may be an expanded scalar (stride 0, e.g. y.sum().backward()); the
        # kernels take any strides, but contiguous rows are what makes their loads coalesced.
        dy = dy.contiguous()
        dx = d_weight = None
        if needs_x or needs_weight:
            dx, d_weight = _grad_x(dy, x, ws, counts, row_index, out_index, row_weight, needs_x, needs_weight)
        dws: list[Tensor | None] = [None] * len(ws)
        if any(needs_ws):
            bank_sizes = [w.shape[0] for w in ws]
            dw = _grad_w(dy, x, counts, row_index, out_index, row_weight, bank_sizes, needs_ws)
            dws = _split_bank_grads(dw, bank_sizes, needs_ws)
        return ((dx if needs_x else None), None, None, None, (d_weight if needs_weight else None), None, *dws)


# ----------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------


def _as_banks(w: Tensor | list[Tensor]) -> list[Tensor]:
    return [w] if isinstance(w, Tensor) else list(w)


def triton_grouped_mm(x: Tensor, w: Tensor, counts: Tensor) -> Tensor:
    """``y[seg_e] = x[seg_e] @ w[e].T`` for contiguous expert segments; differentiable in x and w.

    x [N, K]; w [E, M, K]; counts [E] int64 rows per expert on x.device (zeros allowed; must sum
    to N, which is not checked because that would need a host sync). Returns [N, M] in x.dtype.
    """
    return triton_grouped_mm_multi(x, [w], counts)


def triton_grouped_mm_multi(x: Tensor, ws: list[Tensor], counts: Tensor) -> Tensor:
    """One launch over several expert banks: ``ws[b]`` is [E_b, M, K] and counts is [sum E_b].

    Global expert ids concatenate the banks in order; gradients flow to each bank's own tensor
    (None for banks that do not require grad, whose dW is not computed).
    """
    x, ws = autocast_inputs(x.device.type, x, _as_banks(ws))
    _check_inputs(x, ws, counts)
    return torch.ops.modular.triton_grouped_mm(x, ws, counts, None, None, None, -1)


def triton_gather_grouped_mm(x: Tensor, w: Tensor | list[Tensor], counts: Tensor,
                             row_index: Tensor) -> Tensor:
    """Grouped GEMM that reads its rows as ``x[row_index]`` without materialising the permuted copy.

    x [T, K] in token order; row_index [N] token of each expert-sorted row; w one bank or a list of
    banks. Returns [N, M] in expert-sorted order. dx sums the rows of each token with index_add_,
    which is not bitwise deterministic on CUDA.
    """
    x, ws = autocast_inputs(x.device.type, x, _as_banks(w))
    _check_inputs(x, ws, counts, row_index=row_index)
    return torch.ops.modular.triton_grouped_mm(x, ws, counts, row_index, None, None, -1)


def triton_scatter_grouped_mm(h: Tensor, w: Tensor | list[Tensor], counts: Tensor, out_index: Tensor,
                              row_weight: Tensor, n_out_rows: int | None = None) -> Tensor:
    """Grouped GEMM whose epilogue weights each row and writes it to its slot: the last expert GEMM.

    ``y[out_index[r]] = row_weight[r] · h[r] @ w[e(r)].T`` for the expert-sorted rows r of h [N, F].
    y has n_out_rows rows (default N, and then out_index must be a permutation); rows no r writes
    are zero. With the token-major slot layout (slot = token · top_k + j) the combine is
    ``y.view(T, top_k, M).sum(1)``. Differentiable in h, w and row_weight (the router's gradient).
    """
    h, ws = autocast_inputs(h.device.type, h, _as_banks(w))  # row_weight keeps its precision
    n_out_rows = h.shape[0] if n_out_rows is None else n_out_rows
    _check_inputs(h, ws, counts, out_index=out_index, row_weight=row_weight, n_out_rows=n_out_rows)
    return torch.ops.modular.triton_grouped_mm(h, ws, counts, None, out_index, row_weight, n_out_rows)
