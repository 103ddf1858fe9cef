"""The MoE layer with kernels.backend=triton equals backend=torch (Triton's interpreter on the CPU, native on a GPU)."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("MODULAR_GMM_AUTOTUNE", "0")  # on a GPU: one config, no tuning sweep per tiny shape

from helpers import tiny_cfg
from modular.models.moe import MoELayer

pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _layer(expert_type):
    cfg = tiny_cfg(f"experts.type={expert_type}", "experts.num_experts=5", "experts.ffn_dim=32")
    torch.manual_seed(0)
    layer = MoELayer(32, 5, cfg.experts, cfg.routing, init_std=0.3)
    layer.add_bank(layer.new_bank(3))  # two banks: the multi-bank path
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return layer.to(DEVICE)


def _run(layer, x, backend, autocast=False):
    layer.set_backend(backend)
    xi = x.clone().requires_grad_(True)
    with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=autocast):
        y = layer(xi)
    upstream = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE, y.dtype)
    grads = torch.autograd.grad(y, [xi, *layer.parameters()], upstream)
    return y, grads


@pytest.mark.parametrize("expert_type", ["swiglu", "gelu"])
def test_moe_layer_triton_equals_torch(expert_type):
    layer = _layer(expert_type)
    x = torch.randn(48, 32).to(DEVICE)
    y_torch, g_torch = _run(layer, x, "torch")
    y_triton, g_triton = _run(layer, x, "triton")
    # fp32 both sides, different summation order: a few ulps of sums over 32 terms of size ~1
    torch.testing.assert_close(y_triton, y_torch, rtol=1e-4, atol=1e-5)
    for a, b in zip(g_triton, g_torch):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("expert_type", ["swiglu", "gelu"])
def test_experts_run_in_the_autocast_dtype_on_both_backends(expert_type):
    # Under bf16 autocast (train.dtype=bf16) the expert GEMMs must run in bf16 like every nn.Linear
    # beside them; custom ops and autograd Functions are opaque to autocast, so the kernels cast.
    layer = _layer(expert_type)
    x = torch.randn(48, 32).to(DEVICE)
    y_torch, g_torch = _run(layer, x, "torch", autocast=True)
    y_triton, g_triton = _run(layer, x, "triton", autocast=True)
    assert y_torch.dtype == y_triton.dtype == torch.bfloat16
    # Gradients reach the fp32 parameters in fp32 (through the differentiable casts).
    assert all(g.dtype == torch.float32 for g in g_triton[1:])
    # Same bf16 inputs and routing on both sides; they differ in where intermediates are rounded to
    # bf16 (unit roundoff 2**-8 ~ 3.9e-3): gate, up, h, the weighted rows, the output and each
    # gradient pass through at most about six such roundings, each relative to values of the size
    # of the largest entry, so ~2.3e-2 of the largest entry is the worst case; a wrong formula is off by O(1).
    for a, b in zip([y_triton, *g_triton], [y_torch, *g_torch]):
        err = (a.double() - b.double()).abs().max().item()
        scale = b.double().abs().max().item()
        assert err <= 3e-2 * scale, f"{err:.3g} vs scale {scale:.3g}"
