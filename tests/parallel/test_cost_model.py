"""The cost model of docs/scaling.md: bytes per token, the batch-independent comm/GEMM ratio, crossovers."""

from __future__ import annotations

import pytest

from modular.parallel.cost_model import (
    H100_NODE,
    Hardware,
    a2a_bytes_per_token,
    comm_over_gemm,
    crossover_ep,
    effective_bandwidth,
    expert_flops_per_token,
    layer_time,
)


def test_bytes_per_token():
    # Mixtral shapes at EP=8 in bf16: 2 (dispatch + combine) · 2 (top-2) · 4096 · 2 bytes · 7/8, twice in training
    assert a2a_bytes_per_token(4096, 2, 8, "bf16", training=False) == 2 * 2 * 4096 * 2 * 7 / 8
    assert a2a_bytes_per_token(4096, 2, 8, "bf16") == 57344
    assert a2a_bytes_per_token(4096, 2, 8, "fp32") == 2 * a2a_bytes_per_token(4096, 2, 8, "bf16")
    assert a2a_bytes_per_token(4096, 2, 1) == 0.0


def test_expert_flops():
    assert expert_flops_per_token(64, 32, 2, training=False) == 2 * 3 * 2 * 64 * 32
    assert expert_flops_per_token(64, 32, 2) == 3 * expert_flops_per_token(64, 32, 2, training=False)


@pytest.mark.parametrize("tokens, d, k", [(1024, 256, 1), (8192, 4096, 2), (65536, 7168, 8)])
def test_ratio_depends_only_on_ffn_width_and_ep(tokens, d, k):
    hw = Hardware("no latency", gemm_flops=5e14, bw_intra=3e11, bw_inter=4e10, ranks_per_node=8)
    for ep in (2, 8, 32):
        t = layer_time(tokens, d, 1408, k, ep, hw)
        assert t.comm_s / t.gemm_s == pytest.approx(comm_over_gemm(1408, ep, hw), rel=1e-9)


def test_bandwidth_inside_and_across_nodes():
    assert effective_bandwidth(8, H100_NODE) == pytest.approx(H100_NODE.bw_intra)
    assert H100_NODE.bw_inter < effective_bandwidth(16, H100_NODE) < H100_NODE.bw_intra
    assert effective_bandwidth(256, H100_NODE) == pytest.approx(H100_NODE.bw_inter, rel=0.05)


def test_wider_experts_move_the_crossover_out():
    narrow = crossover_ep(8192, 2048, 256, 2, H100_NODE)
    medium = crossover_ep(8192, 2048, 2048, 2, H100_NODE)
    wide = crossover_ep(8192, 2048, 14336, 2, H100_NODE)
    assert narrow == 2 and medium == 16 and wide is None
