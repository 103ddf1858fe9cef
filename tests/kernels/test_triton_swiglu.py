"""The Triton SwiGLU expert step (one torch.library op) against a float64 per-token loop: forward, gradients.

Without a GPU the kernels run in the Triton interpreter (set below, before the kernel module is imported).
"""

import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("MODULAR_GMM_AUTOTUNE", "0")  # on a GPU: one config, no tuning sweep per tiny shape

pytest.importorskip("triton")

from modular.kernels.triton_swiglu import triton_swiglu_moe

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
T, D, FFN = 9, 16, 24
BANK_SIZES = [2, 2]
# Each token's experts, slots in token-major order like the router's. Token 4 keeps one choice and
# token 7 none (as after capacity dropping); expert 2, the first of bank 1, gets no rows, the others
# 6, 5 and 4 (uneven, all within one partial row block of the interpreter's 32 rows).
EXPERTS_OF_TOKEN = [[0, 1], [1, 3], [0, 3], [3, 1], [0], [1, 0], [3, 0], [], [0, 1]]
EMPTY_EXPERT = (1, 0)  # (bank, expert in bank)

# Largest error allowed, relative to the largest reference value of the same tensor (measured: about
# 2e-7 in fp32, 4e-4 to 7.5e-4 in fp16 and up to 1.8e-2 in bf16 under the interpreter).
# fp32: the interpreter multiplies in IEEE fp32; a few roundings of 2**-24 over sums of <= 24 terms.
# fp16: the GEMMs accumulate in fp32, but every stored intermediate (gate, up, h, the weighted rows, y,
# dH, d_gate, d_up, the dx rows, the dW tiles) is rounded to fp16 (unit roundoff 2**-11 ~ 4.9e-4). A
# value passes through at most about six such roundings, each relative to intermediates of the size of
# the result, so ~2.9e-3 is the worst case; a wrong formula (a missing term or factor) is off by O(1).
# bf16: the same six roundings with unit roundoff 2**-8 ~ 3.9e-3 give ~2.3e-2 (the interpreter truncates
# instead of rounding to nearest, up to a full ulp each); a GPU runs its tl.dot natively in bf16.
TOL = {torch.float32: 2e-6, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def _problem(dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    token_idx = torch.tensor([t for t, es in enumerate(EXPERTS_OF_TOKEN) for _ in es])
    expert_idx = torch.tensor([e for es in EXPERTS_OF_TOKEN for e in es])
    n_slots = token_idx.numel()

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(DEVICE, dtype)

    x = rand(T, D)
    w_gate = [rand(n, FFN, D, scale=D**-0.5) for n in BANK_SIZES]
    w_up = [rand(n, FFN, D, scale=D**-0.5) for n in BANK_SIZES]
    w_down = [rand(n, D, FFN, scale=FFN**-0.5) for n in BANK_SIZES]
    weight = (torch.rand(n_slots, generator=gen) * 0.9 + 0.1).to(DEVICE, dtype)
    dy = rand(T, D)
    return x, w_gate, w_up, w_down, weight, token_idx.to(DEVICE), expert_idx.to(DEVICE), dy


def _ours(x, w_gate, w_up, w_down, weight, token_idx, expert_idx):
    """The layer's call: sorted by expert, the routing weight gathered into sorted order by autograd."""
    order = torch.argsort(expert_idx, stable=True)
    counts = torch.bincount(expert_idx, minlength=sum(BANK_SIZES))
    token_sorted, weight_sorted = token_idx[order], weight[order]
    return triton_swiglu_moe(x, w_gate, w_up, w_down, counts, token_sorted, order, weight_sorted, token_idx)


def _reference(x, w_gate, w_up, w_down, weight, token_idx, expert_idx):
    """y[t] = Σ over the assignments a of t of weight_a · SwiGLU_e(x_t), e = e_a:
    W_down[e] (silu(W_gate[e] x_t) ⊙ W_up[e] x_t)."""
    wg, wu, wd = torch.cat(w_gate), torch.cat(w_up), torch.cat(w_down)
    rows = []
    for t in range(x.shape[0]):
        y_t = x.new_zeros(wd.shape[1])
        for a in (token_idx == t).nonzero().flatten().tolist():
            e = int(expert_idx[a])
            h = F.silu(wg[e] @ x[t]) * (wu[e] @ x[t])
            y_t = y_t + weight[a] * (wd[e] @ h)
        rows.append(y_t)
    return torch.stack(rows)


def _split(params):
    """[x, *w_gate, *w_up, *w_down, weight] -> (x, w_gate, w_up, w_down, weight)."""
    n = len(BANK_SIZES)
    return params[0], params[1 : 1 + n], params[1 + n : 1 + 2 * n], params[1 + 2 * n : 1 + 3 * n], params[-1]


def _leaves(tensors, dtype=None):
    return [t.detach().to(dtype or t.dtype).requires_grad_() for t in tensors]


def _assert_close(got, ref, dtype):
    assert got.shape == ref.shape and got.dtype == dtype
    err = (got.double() - ref).abs().max().item()
    scale = ref.abs().max().item()
    assert err <= TOL[dtype] * scale, f"error {err:.3g} is {err / scale:.3g} of the scale {scale:.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_forward_and_all_gradients_match_float64_per_token_loop(dtype):
    x, w_gate, w_up, w_down, weight, token_idx, expert_idx, dy = _problem(dtype)
    ours = _leaves([x, *w_gate, *w_up, *w_down, weight])
    ref = _leaves([x, *w_gate, *w_up, *w_down, weight], torch.float64)

    y = _ours(*_split(ours), token_idx, expert_idx)
    y_ref = _reference(*_split(ref), token_idx, expert_idx)
    _assert_close(y, y_ref, dtype)
    assert (y[7] == 0).all()  # a token with no assignment gets nothing

    grads = torch.autograd.grad(y, ours, dy)
    grads_ref = torch.autograd.grad(y_ref, ref, dy.double())
    for got, want in zip(grads, grads_ref):
        _assert_close(got, want, dtype)
    # The expert without rows gets an exact zero gradient in every projection (not stale memory).
    _, g_gate, g_up, g_down, _ = _split(grads)
    bank, expert = EMPTY_EXPERT
    for g in (g_gate, g_up, g_down):
        assert (g[bank][expert] == 0).all()


def test_frozen_banks_and_inputs_get_no_gradient():
    # Continual training freezes old banks: their dW and, here, dx are neither computed nor returned.
    x, w_gate, w_up, w_down, weight, token_idx, expert_idx, dy = _problem(torch.float32)
    w_gate[1], w_up[1], w_down[1], weight = trainable = _leaves([w_gate[1], w_up[1], w_down[1], weight])
    y = _ours(x, w_gate, w_up, w_down, weight, token_idx, expert_idx)
    grads = torch.autograd.grad(y, trainable, dy)

    all_params = _leaves([x, *w_gate, *w_up, *w_down, weight])
    y_all = _ours(*_split(all_params), token_idx, expert_idx)
    grads_all = torch.autograd.grad(y_all, all_params, dy)
    for got, want in zip(grads, [grads_all[2], grads_all[4], grads_all[6], grads_all[7]]):
        assert torch.equal(got, want)


def test_no_grad_forward_equals_training_forward():
    x, w_gate, w_up, w_down, weight, token_idx, expert_idx, _ = _problem(torch.float32)
    with torch.no_grad():
        y = _ours(x, w_gate, w_up, w_down, weight, token_idx, expert_idx)
    params = _leaves([x, *w_gate])
    assert torch.equal(y, _ours(params[0], params[1:], w_up, w_down, weight, token_idx, expert_idx))


def test_no_assignments_at_all():
    # Every token dropped: y and every gradient are zeros (empty experts' dW written, not left stale).
    x, w_gate, w_up, w_down, weight, token_idx, expert_idx, dy = _problem(torch.float32)
    params = _leaves([x, *w_gate, *w_up, *w_down, weight[:0]])
    y = _ours(*_split(params), token_idx[:0], expert_idx[:0])
    assert torch.equal(y, torch.zeros_like(y))
    for g in torch.autograd.grad(y, params, dy):
        assert torch.equal(g, torch.zeros_like(g))


def _op_args():
    x, w_gate, w_up, w_down, weight, token_idx, expert_idx, _ = _problem(torch.float32)
    order = torch.argsort(expert_idx, stable=True)
    counts = torch.bincount(expert_idx, minlength=sum(BANK_SIZES))
    x, *w_gate = _leaves([x, *w_gate])
    w_down[0].requires_grad_()
    weight_sorted = weight[order].requires_grad_()
    return (x, w_gate, w_up, w_down, counts, token_idx[order], order, weight_sorted, token_idx)


def test_op_passes_opcheck():
    # Schema, fake (shape-only) kernels, autograd registration, and AOT dispatch with static and
    # dynamic shapes, as torch.compile relies on all of them.
    torch.library.opcheck(torch.ops.modular.triton_swiglu_moe.default, _op_args())


def test_torch_compile_fullgraph_matches_eager():
    # aot_eager traces the op through its fake kernels and autograd formula like inductor does, without
    # a C++ compile. fullgraph=True fails if dynamo breaks the graph, i.e. if it tried to trace into the op.
    x, w_gate, w_up, w_down, counts, token_sorted, order, weight_sorted, token_idx = _op_args()

    def loss(x, wg0, wg1, w_up, w_down, weight_sorted):
        y = triton_swiglu_moe(x * 2, [wg0, wg1], w_up, w_down, counts, token_sorted, order, weight_sorted,
                              token_idx)
        return (y**2).sum()

    params = [x, *w_gate, w_down[0], weight_sorted]
    args = (x, *w_gate, w_up, w_down, weight_sorted)
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    got_loss = compiled(*args)
    want_loss = loss(*args)
    assert torch.equal(got_loss, want_loss)
    for got, want in zip(torch.autograd.grad(got_loss, params), torch.autograd.grad(want_loss, params)):
        assert torch.equal(got, want)


def test_bad_bank_shapes_raise_one_clear_sentence():
    x, w_gate, w_up, w_down, weight, token_idx, expert_idx, _ = _problem(torch.float32)
    w_down = [w.transpose(1, 2) for w in w_down]
    with pytest.raises(ValueError, match=r"\[E_b, D, F\] with D = x.shape\[1\] = 16"):
        _ours(x, w_gate, w_up, w_down, weight, token_idx, expert_idx)
