"""Tests of the Triton grouped GEMM against a float64 loop over expert segments, forward and gradients.

Without a GPU the kernels run in the Triton interpreter (set below, before the kernel module is imported).
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# On a GPU, one config per kernel: these small shapes would otherwise each pay a tuning sweep.
# test_autotuned_kernels_on_gpu reruns the gradient tests with the sweep on.
os.environ.setdefault("MODULAR_GMM_AUTOTUNE", "0")

from modular.kernels.triton_gmm import (
    GroupedMM,
    triton_gather_grouped_mm,
    triton_grouped_mm,
    triton_grouped_mm_multi,
    triton_scatter_grouped_mm,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
REPO = Path(__file__).resolve().parents[2]

# Rows per expert. The interpreter's row block is 32 (64 x 64 output and reduction blocks), so this
# holds empty experts (first, middle and last), experts smaller than a block (1, 5), one that spans
# four row blocks with a partial tail (100) and one of exactly one block (32); 7 row blocks in all,
# so the last group of the grouped tile order (2 row blocks) is partial.
COUNTS = [0, 5, 100, 1, 0, 32, 0]


def _reference(x, ws, counts, row_index=None, out_index=None, row_weight=None, n_out_rows=None):
    """y[seg_e] = x[seg_e] @ w_e.T in float64, one segment at a time, with the optional gather of
    x rows, per-row weight and scatter of output rows."""
    w = torch.cat([w.double() for w in ws])
    x = x.double() if row_index is None else x.double()[row_index]
    out, start = [], 0
    for e, count in enumerate(counts):
        out.append(x[start : start + count] @ w[e].T)
        start += count
    y = torch.cat(out)
    if row_weight is not None:
        y = y * row_weight.double()[:, None]
    if out_index is not None:
        y = y.new_zeros((n_out_rows, y.shape[1])).index_put((out_index,), y)
    return y


def _assert_within_bound(actual, ref, abs_ref, n_terms, dtype):
    """|actual - ref| <= n_terms · u32 · abs_ref + eps(dtype) · |ref|, elementwise.

    The kernels multiply exactly (fp16/bf16 products are exact in fp32) and accumulate in fp32, so
    the classic summation bound gives |error| <= n·u·Σ|a·b| with u = 2**-24 and n the number of
    summed terms; abs_ref is that Σ|a·b| (the same formula on |a|, |b|). The result is then
    rounded once to the output dtype: eps(dtype)·|ref| covers it with a full ulp, because the
    interpreter truncates fp32 -> bf16 instead of rounding to nearest.
    """
    actual = actual.double()
    bound = n_terms * 2.0**-24 * abs_ref + torch.finfo(dtype).eps * ref.abs() + 1e-300
    excess = ((actual - ref).abs() / bound).max().item()
    assert excess <= 1.0, f"error is {excess:.3g} x the bound"
    # Guard against a vacuous check: the bound must be far below the values it bounds.
    assert bound.mean() < 0.05 * ref.abs().mean()


def _inputs(dtype, counts=COUNTS, k=80, m=96, bank_sizes=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    n, n_experts = sum(counts), len(counts)
    bank_sizes = bank_sizes or [n_experts]
    x = torch.randn(n, k, generator=gen).to(DEVICE, dtype)
    ws = [torch.randn(size, m, k, generator=gen).to(DEVICE, dtype) for size in bank_sizes]
    dy = torch.randn(n, m, generator=gen).to(DEVICE, dtype)
    return x, ws, torch.tensor(counts, device=DEVICE), dy


def _grads_reference(x, ws, counts, dy, row_index=None, out_index=None, row_weight=None, n_out_rows=None):
    """Reference gradients of x, each bank (and row_weight if given), with the Σ|a·b| magnitudes used
    by the error bound."""
    options = {"row_index": row_index, "out_index": out_index, "n_out_rows": n_out_rows}

    def grads(x, ws, row_weight, dy):
        leaves = [x.detach().double().requires_grad_()] + [w.detach().double().requires_grad_() for w in ws]
        if row_weight is not None:
            leaves.append(row_weight.detach().double().requires_grad_())
        n_banks = len(ws)
        y = _reference(leaves[0], leaves[1 : 1 + n_banks], counts,
                       row_weight=leaves[-1] if row_weight is not None else None, **options)
        return torch.autograd.grad(y, leaves, dy.double())

    # Gradients are linear in each input, so the same formula on |inputs| and |dy| gives Σ|a·b|.
    abs_weight = None if row_weight is None else row_weight.abs()
    return grads(x, ws, row_weight, dy), grads(x.abs(), [w.abs() for w in ws], abs_weight, dy.abs())


# tl.dot in the interpreter (and on sm_90 for fp32 with tf32 disabled) keeps fp32 semantics.
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("k,m", [(80, 96), (64, 40)])  # masked reduction tail / even reduction dim
def test_forward_matches_float64_reference(dtype, k, m):
    x, (w,), counts, _ = _inputs(dtype, k=k, m=m)
    y = triton_grouped_mm(x, w, counts)
    assert y.shape == (sum(COUNTS), m) and y.dtype == dtype
    # For fp16, x and w are already fp16-rounded: the reference uses exactly the kernel's inputs.
    _assert_within_bound(y, _reference(x, [w], COUNTS), _reference(x.abs(), [w.abs()], COUNTS), k, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gradients_match_float64_reference(dtype):
    x, (w,), counts, dy = _inputs(dtype)
    x.requires_grad_()
    w.requires_grad_()
    dx, dw = torch.autograd.grad(triton_grouped_mm(x, w, counts), [x, w], dy)
    (dx_ref, dw_ref), (dx_abs, dw_abs) = _grads_reference(x, [w], COUNTS, dy)
    assert dx.dtype == dw.dtype == dtype
    _assert_within_bound(dx, dx_ref, dx_abs, w.shape[1], dtype)  # dx sums over M
    _assert_within_bound(dw, dw_ref, dw_abs, max(COUNTS), dtype)  # dW sums over an expert's rows
    empty = [e for e, count in enumerate(COUNTS) if count == 0]
    assert torch.all(dw[empty] == 0)


@pytest.mark.skipif(DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1", reason="needs Triton")
def test_bfloat16_forward_and_gradients():
    # bf16 tl.dot is wrong in the interpreter; the kernel upcasts there, and runs native bf16 on a GPU.
    x, (w,), counts, dy = _inputs(torch.bfloat16)
    x.requires_grad_()
    w.requires_grad_()
    y = triton_grouped_mm(x, w, counts)
    y_ref, y_abs = _reference(x, [w], COUNTS), _reference(x.abs(), [w.abs()], COUNTS)
    _assert_within_bound(y, y_ref, y_abs, 80, torch.bfloat16)
    dx, dw = torch.autograd.grad(y, [x, w], dy)
    (dx_ref, dw_ref), (dx_abs, dw_abs) = _grads_reference(x, [w], COUNTS, dy)
    _assert_within_bound(dx, dx_ref, dx_abs, w.shape[1], torch.bfloat16)
    _assert_within_bound(dw, dw_ref, dw_abs, max(COUNTS), torch.bfloat16)


def test_sum_backward_with_stride_zero_gradient():
    # y.sum() hands backward an expanded scalar (all strides 0).
    x, (w,), counts, _ = _inputs(torch.float32)
    x.requires_grad_()
    w.requires_grad_()
    triton_grouped_mm(x, w, counts).sum().backward()
    ones = torch.ones(sum(COUNTS), w.shape[1], device=DEVICE)
    (dx_ref, dw_ref), (dx_abs, dw_abs) = _grads_reference(x, [w], COUNTS, ones)
    _assert_within_bound(x.grad, dx_ref, dx_abs, w.shape[1], torch.float32)
    _assert_within_bound(w.grad, dw_ref, dw_abs, max(COUNTS), torch.float32)


def test_multi_bank_forward_and_gradient_of_each_bank():
    # Banks of 2, 3 and 2 experts; the middle one is frozen, as after `freeze_bank`.
    x, ws, counts, dy = _inputs(torch.float32, bank_sizes=[2, 3, 2])
    x.requires_grad_()
    ws[0].requires_grad_()
    ws[2].requires_grad_()
    y = triton_grouped_mm_multi(x, ws, counts)
    _assert_within_bound(y, _reference(x, ws, COUNTS), _reference(x.abs(), [w.abs() for w in ws], COUNTS), 80,
                         torch.float32)
    y.backward(dy)
    assert ws[1].grad is None
    (dx_ref, *dws_ref), (dx_abs, *dws_abs) = _grads_reference(x, ws, COUNTS, dy)
    _assert_within_bound(x.grad, dx_ref, dx_abs, ws[0].shape[1], torch.float32)
    for b in (0, 2):
        assert ws[b].grad.shape == ws[b].shape
        _assert_within_bound(ws[b].grad, dws_ref[b], dws_abs[b], max(COUNTS), torch.float32)


def test_multi_bank_equals_one_concatenated_bank():
    # Same tiles, same reduction order: the pointer table must not change a single bit. The empty
    # middle bank (a bank whose experts were all removed) shares its first expert id with the next.
    x, ws, counts, dy = _inputs(torch.float32, bank_sizes=[4, 0, 3])
    ws = [w.requires_grad_() for w in ws]
    w_cat = torch.cat([w.detach() for w in ws]).requires_grad_()
    y_multi = triton_grouped_mm_multi(x, ws, counts)
    y_cat = triton_grouped_mm(x, w_cat, counts)
    assert torch.equal(y_multi, y_cat)
    grads = torch.autograd.grad(y_multi, ws, dy)
    (grad_cat,) = torch.autograd.grad(y_cat, [w_cat], dy)
    assert torch.equal(torch.cat(grads), grad_cat)


def test_no_rows_at_all():
    x, (w,), counts, _ = _inputs(torch.float32, counts=[0, 0, 0])
    x.requires_grad_()
    w.requires_grad_()
    y = triton_grouped_mm(x, w, counts)
    assert y.shape == (0, w.shape[1])
    y.sum().backward()
    assert x.grad.shape == (0, w.shape[2])
    assert torch.all(w.grad == 0)


def test_non_contiguous_inputs():
    # x as a column slice, w as a transposed [E, K, M] storage: the kernels read through strides.
    x_wide, ws, counts, _ = _inputs(torch.float32, k=96, m=80)
    x = x_wide[:, 8:88]
    w = ws[0].transpose(1, 2)  # [E, 96, 80] viewed as out x in
    assert not x.is_contiguous() and not w.is_contiguous()
    y = triton_grouped_mm(x, w, counts)
    y_ref, y_abs = _reference(x, [w], COUNTS), _reference(x.abs(), [w.abs()], COUNTS)
    _assert_within_bound(y, y_ref, y_abs, 80, torch.float32)
    y_multi = triton_grouped_mm_multi(x, [w[:3], w[3:]], counts)  # non-contiguous banks are copied
    assert torch.equal(y_multi, y)
    # A contiguous bank at an offset that is not 16-byte aligned is copied too (the kernel assumes alignment).
    storage = torch.empty(w[3:].numel() + 1, device=DEVICE)
    misaligned = storage[1:].view(w[3:].shape).copy_(w[3:])
    assert misaligned.is_contiguous() and misaligned.data_ptr() % 16 != 0
    assert torch.equal(triton_grouped_mm_multi(x, [w[:3], misaligned], counts), y)


def test_gather_variant_reads_token_rows_directly():
    # Top-2 routing of 80 tokens: slots sorted by expert, row_index names each slot's token.
    gen = torch.Generator().manual_seed(1)
    n_tokens, top_k, n_experts = 80, 2, len(COUNTS)
    expert_of_slot = torch.repeat_interleave(torch.arange(n_experts), torch.tensor(COUNTS))
    assert expert_of_slot.numel() <= n_tokens * top_k
    n_slots = expert_of_slot.numel()
    token_of_slot = torch.randperm(n_tokens * top_k, generator=gen)[:n_slots] // top_k
    x = torch.randn(n_tokens, 80, generator=gen).to(DEVICE).requires_grad_()
    w = torch.randn(n_experts, 96, 80, generator=gen).to(DEVICE).requires_grad_()
    dy = torch.randn(n_slots, 96, generator=gen).to(DEVICE)
    counts = torch.tensor(COUNTS, device=DEVICE)
    row_index = token_of_slot.to(DEVICE)
    y = triton_gather_grouped_mm(x, w, counts, row_index)
    _assert_within_bound(y, _reference(x, [w], COUNTS, row_index=row_index),
                         _reference(x.abs(), [w.abs()], COUNTS, row_index=row_index), 80, torch.float32)
    dx, dw = torch.autograd.grad(y, [x, w], dy)
    (dx_ref, dw_ref), (dx_abs, dw_abs) = _grads_reference(x, [w], COUNTS, dy, row_index=row_index)
    _assert_within_bound(dx, dx_ref, dx_abs, 96 + top_k, torch.float32)  # + the index_add_ of the slots
    _assert_within_bound(dw, dw_ref, dw_abs, max(COUNTS), torch.float32)


def _slot_layout(n_out_rows, seed=2):
    """Row r of the expert-sorted rows writes slot out_index[r]; a random routing weight per row."""
    gen = torch.Generator().manual_seed(seed)
    n_rows = sum(COUNTS)
    out_index = torch.randperm(n_out_rows, generator=gen)[:n_rows].to(DEVICE)
    row_weight = torch.rand(n_rows, generator=gen).add(0.1).to(DEVICE)
    return out_index, row_weight


@pytest.mark.parametrize("n_out_rows", [sum(COUNTS), sum(COUNTS) + 12])  # a permutation / with dropped slots
def test_scatter_variant_weights_and_places_rows(n_out_rows):
    h, (w,), counts, _ = _inputs(torch.float32)
    out_index, row_weight = _slot_layout(n_out_rows)
    h.requires_grad_()
    w.requires_grad_()
    row_weight.requires_grad_()
    y = triton_scatter_grouped_mm(h, w, counts, out_index, row_weight, n_out_rows=n_out_rows)
    options = {"out_index": out_index, "n_out_rows": n_out_rows}
    y_ref = _reference(h, [w], COUNTS, row_weight=row_weight, **options)
    y_abs = _reference(h.abs(), [w.abs()], COUNTS, row_weight=row_weight.abs(), **options)
    # Dropped slots are exactly zero (their bound is zero too).
    _assert_within_bound(y, y_ref, y_abs, 80 + 1, torch.float32)  # K products, then one weight product
    dy = torch.randn(n_out_rows, w.shape[1], generator=torch.Generator().manual_seed(3)).to(DEVICE)
    dh, dw, d_weight = torch.autograd.grad(y, [h, w, row_weight], dy)
    (dh_ref, dw_ref, dweight_ref), (dh_abs, dw_abs, dweight_abs) = _grads_reference(
        h, [w], COUNTS, dy, row_weight=row_weight, **options
    )
    m, f = w.shape[1], w.shape[2]
    _assert_within_bound(dh, dh_ref, dh_abs, m + 1, torch.float32)
    _assert_within_bound(dw, dw_ref, dw_abs, max(COUNTS) + 1, torch.float32)
    # d weight[r] = <dy[slot], unweighted output>: M-term products summed over F more terms.
    _assert_within_bound(d_weight, dweight_ref, dweight_abs, m + f, torch.float32)


def test_scatter_variant_with_multi_bank_and_top2_combine():
    # The end of a SwiGLU expert layer: 69 tokens x top-2 = 138 slots, experts in two banks.
    h, ws, counts, _ = _inputs(torch.float32, bank_sizes=[3, 4])
    out_index, row_weight = _slot_layout(sum(COUNTS))
    y = triton_scatter_grouped_mm(h, ws, counts, out_index, row_weight).view(69, 2, -1).sum(1)
    y_ref = _reference(h, ws, COUNTS, out_index=out_index, row_weight=row_weight, n_out_rows=138)
    y_abs = _reference(h.abs(), [w.abs() for w in ws], COUNTS, out_index=out_index, row_weight=row_weight,
                       n_out_rows=138)
    _assert_within_bound(y, y_ref.view(69, 2, -1).sum(1), y_abs.view(69, 2, -1).sum(1), 80 + 2, torch.float32)


def test_plain_autograd_function_matches_library_op():
    x, ws, counts, dy = _inputs(torch.float32, bank_sizes=[3, 4])
    x.requires_grad_()
    ws = [w.requires_grad_() for w in ws]
    y_fn = GroupedMM.apply(x, counts, None, None, None, -1, *ws)
    y_op = triton_grouped_mm_multi(x, ws, counts)
    assert torch.equal(y_fn, y_op)
    for a, b in zip(torch.autograd.grad(y_fn, [x, *ws], dy), torch.autograd.grad(y_op, [x, *ws], dy)):
        assert torch.equal(a, b)


def test_library_op_passes_opcheck():
    # Schema, fake (meta) kernel and autograd registration, as torch.compile relies on them.
    x, ws, counts, _ = _inputs(torch.float32, counts=[3, 0, 40], k=64, m=32, bank_sizes=[1, 2])
    x.requires_grad_()
    ws[1].requires_grad_()
    op = torch.ops.modular.triton_grouped_mm.default
    torch.library.opcheck(op, (x, ws, counts, None, None, None, -1))
    row_index = torch.randint(0, 20, (43,), device=DEVICE)
    torch.library.opcheck(op, (x[:20], ws, counts, row_index, None, None, -1))
    # Gather, weight and scatter at once (50 output rows, 7 of them written by no row).
    out_index = torch.randperm(50)[:43].to(DEVICE)
    row_weight = torch.rand(43, device=DEVICE, requires_grad=True)
    torch.library.opcheck(op, (x[:20], ws, counts, row_index, out_index, row_weight, 50))


def test_torch_compile_fullgraph_forward_and_backward():
    # aot_eager traces the op through its fake kernel and autograd formula like inductor does,
    # without a C++ compile, so it fits the interpreter's time budget.
    x, ws, counts, _ = _inputs(torch.float32, counts=[5, 0, 40, 1], k=64, m=32, bank_sizes=[3, 1])
    x.requires_grad_()
    ws = [w.requires_grad_() for w in ws]

    def loss(x, w0, w1, counts):
        return (triton_grouped_mm_multi(x * 2, [w0, w1], counts).relu() ** 2).sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(x, *ws, counts), [x, *ws])
    want = torch.autograd.grad(loss(x, *ws, counts), [x, *ws])
    for a, b in zip(got, want):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda x, w, c: (x[:, :10], w, c), "K = x.shape[1] = 10"),
        (lambda x, w, c: (x, w.double(), c), "must match x"),
        (lambda x, w, c: (x, w, c[:-1]), "E = 7 experts"),
        (lambda x, w, c: (x, w, c.float()), "int64 or int32"),
        (lambda x, w, c: (x.int(), w.int(), c), "allowed are float32, float16 and bfloat16"),
        (lambda x, w, c: (x[0], w, c), "must be 2-D"),
    ],
)
def test_bad_inputs_raise_one_clear_sentence(make, message):
    x, (w,), counts, _ = _inputs(torch.float32)
    with pytest.raises((ValueError, TypeError), match=re.escape(message)):
        triton_grouped_mm(*make(x, w, counts))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message printed without a GPU")
def test_gpu_benchmark_exits_with_a_clear_message_without_cuda():
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    script = str(REPO / "benchmarks" / "gmm_gpu.py")
    proc = subprocess.run([sys.executable, script], capture_output=True, text=True, env=env, timeout=120,
                          check=False)
    assert proc.returncode == 1
    assert "needs a CUDA GPU" in proc.stderr and "Traceback" not in proc.stderr


def _gmm_gpu_benchmark():
    """benchmarks/gmm_gpu.py as a module (benchmarks/ is not a package)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import gmm_gpu
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    return gmm_gpu


def _one_call(fn):
    """A stand-in for triton.testing.do_bench: runs fn once, reports 1 ms."""
    fn()
    return 1.0


def test_gpu_benchmark_code_runs_on_a_tiny_shape():
    # Not a timing: runs every variant of benchmarks/gmm_gpu.py once with a stand-in clock, so that
    # the script keeps working when the op signatures change.
    gmm_gpu = _gmm_gpu_benchmark()
    res = gmm_gpu.measure(8, 2, 4, 32, 32, torch.float32, skew=1.0, n_banks=2, device=DEVICE, bench=_one_call)
    assert {"triton fwd", "triton dX", "triton dW", "concat banks + triton fwd", "triton fwd+bwd"} <= set(res)


def test_gpu_benchmark_layer_mode_runs_on_a_tiny_shape():
    # benchmarks/gmm_gpu.py --layer's code once with a stand-in clock: the three MoE implementations
    # (fused, permute + triton, permute + torch._grouped_mm) are checked equal inside measure_layer.
    gmm_gpu = _gmm_gpu_benchmark()
    # 8 tokens x top-2 over 4 experts; sizes multiples of 4 (torch._grouped_mm's 16-byte strides on CPU).
    res = gmm_gpu.measure_layer(8, 4, 32, 16, 2, torch.float32, device=DEVICE, bench=_one_call)
    assert set(res["ms"]) | set(res["skipped"]) == set(gmm_gpu.LAYER_VARIANTS)
    assert {"ours fused", "permute + triton gmm", "dense SwiGLU (same FLOPs)"} <= set(res["ms"])
    assert all(diff <= 1e-4 for diff in res["max_rel_diff"].values()), res["max_rel_diff"]
    if hasattr(torch, "_grouped_mm"):
        assert "permute + torch._grouped_mm" in res["max_rel_diff"], res["skipped"]
    table = gmm_gpu.layer_table([("tiny", res)])
    assert len(table) == 2 + len(gmm_gpu.LAYER_VARIANTS)
    assert all(f"| {name} |" in "\n".join(table) for name in gmm_gpu.LAYER_VARIANTS)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the interpreter runs one config; needs a GPU")
def test_autotuned_kernels_on_gpu():
    # With several configs the autotuner benchmarks each one on the real buffers; the row-dot
    # partial sums (scatter variant) must be reset between configs, which only shows here.
    env = {**os.environ, "PYTHONPATH": str(REPO), "MODULAR_GMM_AUTOTUNE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k",
         "gradient or scatter"],
        capture_output=True, text=True, env=env, timeout=900, check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:]
