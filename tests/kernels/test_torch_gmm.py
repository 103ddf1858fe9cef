"""The torch path of the grouped matmul and the fused SwiGLU MoE step, against float64 references.

References are written out row by row in float64; the implementations run in float32 (torch's
grouped_mm has no float64 kernel). Tolerances: fp32 rounding is ~6e-8 relative per operation, and
every output here is a sum of at most 64 products of O(1) terms followed by at most two more such
sums, so errors stay below ~1e-5 relative to the largest entry; we allow 1e-4 of it.
"""

import pytest
import torch
import torch.nn.functional as F

from helpers import tiny_cfg
from modular.kernels import grouped_mm
from modular.kernels.torch_gmm import (
    GroupedMM,
    SwiGLUMoE,
    can_use_grouped_mm,
    segment_offsets,
    torch_grouped_mm,
    torch_swiglu_moe,
)
from modular.models.dispatchers import FusedTorchSwiGLU, LocalDispatcher
from modular.models.moe import MoELayer

IMPLS = ["grouped_mm", "segments", "padded_bmm"]
# uneven segments, empty experts first, in the middle and last
COUNTS = [0, 5, 1, 0, 9, 3, 0]


def close(actual, expected):
    """assert_close scaled to the reference's magnitude (see the module docstring)."""
    scale = expected.abs().max().clamp_min(1.0)
    torch.testing.assert_close(actual.double(), expected, rtol=0.0, atol=1e-4 * float(scale))


def naive_grouped_mm(x, w, counts):
    """Row by row: the expert of row i is the segment it falls in."""
    expert_of_row = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    return torch.stack([w[e] @ x[i] for i, e in enumerate(expert_of_row.tolist())]) if len(expert_of_row) else \
        x.new_zeros(0, w.shape[1]) + 0 * w.sum()


def random_problem(counts, K=8, M=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(sum(counts), K, generator=g, dtype=torch.float64)
    w = torch.randn(len(counts), M, K, generator=g, dtype=torch.float64)
    upstream = torch.randn(sum(counts), M, generator=g, dtype=torch.float64)
    return x, w, upstream


@pytest.mark.parametrize("impl", IMPLS)
def test_forward_and_gradients_match_float64_reference(impl):
    x64, w64, upstream = random_problem(COUNTS)
    x64.requires_grad_(True)
    w64.requires_grad_(True)
    y_ref = naive_grouped_mm(x64, w64, COUNTS)
    dx_ref, dw_ref = torch.autograd.grad(y_ref, [x64, w64], upstream)

    x = x64.detach().float().requires_grad_(True)
    w = w64.detach().float().requires_grad_(True)
    y = torch_grouped_mm(x, w, torch.tensor(COUNTS), impl)
    dx, dw = torch.autograd.grad(y, [x, w], upstream.float())
    close(y, y_ref.detach())
    close(dx, dx_ref)
    close(dw, dw_ref)
    for e, n in enumerate(COUNTS):
        if n == 0:
            assert torch.count_nonzero(dw[e]) == 0, f"empty expert {e} must get an exactly zero gradient"


@pytest.mark.parametrize("impl", IMPLS)
def test_sum_backward_with_stride_zero_gradient(impl):
    """`y.sum().backward()` hands backward an expanded (stride-0) gradient; torch's own formula fails on it."""
    x64, w64, _ = random_problem(COUNTS, seed=1)
    x = x64.float().requires_grad_(True)
    w = w64.float().requires_grad_(True)
    torch_grouped_mm(x, w, torch.tensor(COUNTS), impl).sum().backward()
    x64.requires_grad_(True)
    w64.requires_grad_(True)
    naive_grouped_mm(x64, w64, COUNTS).sum().backward()
    close(x.grad, x64.grad)
    close(w.grad, w64.grad)


def test_grouped_mm_weight_gradient_is_the_2d_by_2d_form():
    """torch._grouped_mm(dY^T [M, N], x [N, K], offs) → [E, M, K]: the offsets split the contraction."""
    counts = torch.tensor(COUNTS)
    x64, _, upstream = random_problem(COUNTS, seed=2)
    dw = torch._grouped_mm(upstream.float().t(), x64.float(), offs=segment_offsets(counts))
    starts = [sum(COUNTS[:e]) for e in range(len(COUNTS))]
    expected = torch.stack([upstream[s:s + n].t() @ x64[s:s + n] for s, n in zip(starts, COUNTS)])
    assert dw.shape == (len(COUNTS), upstream.shape[1], x64.shape[1])
    close(dw, expected)


def test_no_rows_at_all():
    counts = torch.zeros(4, dtype=torch.long)
    for impl in IMPLS:
        x = torch.zeros(0, 8, requires_grad=True)
        w = torch.randn(4, 12, 8, requires_grad=True)
        y = torch_grouped_mm(x, w, counts, impl)
        assert y.shape == (0, 12)
        y.sum().backward()
        assert w.grad is not None and torch.count_nonzero(w.grad) == 0, impl


def test_auto_falls_back_where_grouped_mm_cannot_run():
    """float64, and widths whose row stride is not a multiple of 16 bytes, take the per-segment loop."""
    counts = torch.tensor(COUNTS)
    x64, w64, _ = random_problem(COUNTS)
    assert not can_use_grouped_mm(x64, w64)
    close(torch_grouped_mm(x64, w64, counts), naive_grouped_mm(x64, w64, COUNTS))
    x, w = torch.randn(sum(COUNTS), 3), torch.randn(len(COUNTS), 5, 3)  # K=3, M=5: unaligned
    assert not can_use_grouped_mm(x, w)
    close(grouped_mm(x, w, counts, "torch"), naive_grouped_mm(x.double(), w.double(), COUNTS))
    assert can_use_grouped_mm(x64.float(), w64.float())


def test_bfloat16_forward_is_close():
    counts = torch.tensor(COUNTS)
    x64, w64, _ = random_problem(COUNTS, K=16, M=8)
    y = GroupedMM.apply(x64.bfloat16(), w64.bfloat16(), segment_offsets(counts))
    expected = naive_grouped_mm(x64.bfloat16().double(), w64.bfloat16().double(), COUNTS)
    # bf16 output rounding (2^-8 relative) dominates; products are exact in fp32 accumulation
    torch.testing.assert_close(y.double(), expected, rtol=1e-2, atol=1e-2 * float(expected.abs().max()))


# -- the fused SwiGLU MoE step ---------------------------------------------------------------------------

def naive_swiglu_moe(x, w_gate, w_up, w_down, experts, tokens, weights):
    """y[t] = Σ over assignments (t, e, w): w · W_down[e] (silu(W_gate[e] x_t) ⊙ W_up[e] x_t)."""
    rows = [x.new_zeros(x.shape[1]) for _ in range(x.shape[0])]
    for e, t, w in zip(experts.tolist(), tokens.tolist(), weights):
        xt = x[t]
        rows[t] = rows[t] + w * (w_down[e] @ (F.silu(w_gate[e] @ xt) * (w_up[e] @ xt)))
    return torch.stack(rows)


def swiglu_problem(E=6, D=8, Fd=12, T=10, A=23, seed=0):
    g = torch.Generator().manual_seed(seed)
    experts = torch.randint(0, E - 2, (A,), generator=g)  # experts E-2 and E-1 stay empty
    experts[experts == 1] = 2  # and expert 1
    tokens = torch.randint(0, T, (A,), generator=g)  # tokens repeat across assignments, some get none
    params = [torch.randn(T, D, generator=g, dtype=torch.float64),
              torch.randn(E, Fd, D, generator=g, dtype=torch.float64) * 0.5,
              torch.randn(E, Fd, D, generator=g, dtype=torch.float64) * 0.5,
              torch.randn(E, D, Fd, generator=g, dtype=torch.float64) * 0.5,
              torch.rand(A, generator=g, dtype=torch.float64)]
    order = torch.argsort(experts, stable=True)
    counts = torch.bincount(experts, minlength=E)
    return params, experts, tokens, order, counts


@pytest.mark.parametrize("chunk_rows", [1, 8, 1000], ids=["expert-by-expert", "chunks", "one-chunk"])
@pytest.mark.parametrize("dims", [(8, 12), (16, 4), (5, 3)], ids=["F>D", "F<D", "unaligned"])
def test_swiglu_moe_matches_float64_reference(dims, chunk_rows):
    D, Fd = dims
    params, experts, tokens, order, counts = swiglu_problem(D=D, Fd=Fd)
    ref_params = [p.clone().requires_grad_(True) for p in params]
    x, wg, wu, wd, weights = ref_params
    y_ref = naive_swiglu_moe(x, wg, wu, wd, experts, tokens, weights)
    upstream = torch.randn_like(y_ref)
    grads_ref = torch.autograd.grad(y_ref, ref_params, upstream)

    ours = [p.detach().float().requires_grad_(True) for p in params]
    x, wg, wu, wd, weights = ours
    y = SwiGLUMoE.apply(x, wg, wu, wd, weights[order], tokens[order], counts, chunk_rows)
    grads = torch.autograd.grad(y, ours, upstream.float())
    close(y, y_ref.detach())
    for _name, g, g_ref in zip(["x", "w_gate", "w_up", "w_down", "weights"], grads, grads_ref):
        close(g, g_ref)
    assert torch.count_nonzero(grads[1][[1, 4, 5]]) == 0  # empty experts: exactly zero


def test_swiglu_moe_sum_backward_and_single_backward():
    params, experts, tokens, order, counts = swiglu_problem(seed=3)
    ours = [p.detach().float().requires_grad_(True) for p in params]
    y = torch_swiglu_moe(*ours[:4], counts, tokens[order], ours[4][order])
    y.sum().backward(retain_graph=True)  # stride-0 upstream gradient
    ref_params = [p.clone().requires_grad_(True) for p in params]
    naive_swiglu_moe(*ref_params[:4], experts, tokens, ref_params[4]).sum().backward()
    for p, p_ref in zip(ours, ref_params):
        close(p.grad, p_ref.grad)
    with pytest.raises(RuntimeError, match="only once"):
        y.sum().backward()


def test_swiglu_moe_frozen_weights_get_no_gradient():
    params, _experts, tokens, order, counts = swiglu_problem(seed=4)
    x, wg, wu, wd, weights = [p.detach().float() for p in params]
    wd.requires_grad_(True)
    x.requires_grad_(True)
    y = torch_swiglu_moe(x, wg, wu, wd, counts, tokens[order], weights[order])
    y.backward(torch.randn_like(y))
    assert wg.grad is None and wu.grad is None
    assert x.grad is not None and wd.grad is not None


def test_swiglu_moe_under_no_grad():
    params, experts, tokens, order, counts = swiglu_problem(seed=5)
    x, wg, wu, wd, weights = [p.float().requires_grad_(True) for p in params]
    with torch.no_grad():
        y = torch_swiglu_moe(x, wg, wu, wd, counts, tokens[order], weights[order])
    assert not y.requires_grad
    close(y, naive_swiglu_moe(*params[:4], experts, tokens, params[4]))


def make_layer(num_banks=1, seed=0):
    cfg = tiny_cfg("experts.type=swiglu", "experts.num_experts=5", "experts.ffn_dim=12", "routing.top_k=2")
    torch.manual_seed(seed)
    layer = MoELayer(16, 5, cfg.experts, cfg.routing, init_std=0.5)
    for _ in range(num_banks - 1):
        layer.add_bank(layer.new_bank(3))
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.5)
    return layer


@pytest.mark.parametrize("num_banks", [1, 2])
def test_layer_fused_step_equals_generic_path(num_banks):
    """The MoE layer's fused torch step and its gather → bank.forward → combine path agree, gradients too."""
    layer = make_layer(num_banks)
    layer.banks[0].requires_grad_(False)  # a frozen bank next to a trained one
    x = torch.randn(40, 16)
    upstream = torch.randn(40, 16)
    results = []
    for fused in (True, False):
        layer.dispatcher = FusedTorchSwiGLU() if fused else LocalDispatcher()
        xi = x.clone().requires_grad_(True)
        y = layer(xi)
        params = [p for p in layer.parameters() if p.requires_grad]
        results.append((y, torch.autograd.grad(y, [xi, *params], upstream)))
    (y_fused, g_fused), (y_generic, g_generic) = results
    torch.testing.assert_close(y_fused, y_generic, rtol=1e-5, atol=1e-5)
    for a, b in zip(g_fused, g_generic):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert all(p.grad is None for p in layer.banks[0].parameters())
