"""The MoE layer with kernels.backend=triton equals backend=torch (Triton's interpreter on the CPU)."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from helpers import tiny_cfg
from modular.models.moe import MoELayer

pytest.importorskip("triton")


@pytest.mark.parametrize("expert_type", ["swiglu", "gelu"])
def test_moe_layer_triton_equals_torch(expert_type):
    cfg = tiny_cfg(f"experts.type={expert_type}", "experts.num_experts=5", "experts.ffn_dim=32")
    torch.manual_seed(0)
    layer = MoELayer(32, 5, cfg.experts, cfg.routing, init_std=0.3)
    layer.add_bank(layer.new_bank(3))  # two banks: the multi-bank path
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(48, 32)

    def run(backend):
        layer.set_backend(backend)
        xi = x.clone().requires_grad_(True)
        y = layer(xi)
        upstream = torch.randn_like(y, generator=torch.Generator().manual_seed(1))
        grads = torch.autograd.grad(y, [xi, *layer.parameters()], upstream)
        return y, grads

    y_torch, g_torch = run("torch")
    y_triton, g_triton = run("triton")
    # fp32 both sides, different summation order: a few ulps of sums over 32 terms of size ~1
    torch.testing.assert_close(y_triton, y_torch, rtol=1e-4, atol=1e-5)
    for a, b in zip(g_triton, g_torch):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
