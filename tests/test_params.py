"""Total and active parameter counts against hand counts."""

from helpers import tiny_cfg
from modular.models import build_model
from modular.models.summary import summarize


def test_param_counts_all_moe_swiglu():
    # tiny: V=259, D=64, 2 layers, 4 heads (hd=16), 2 kv heads; 4 SwiGLU experts of F=32, top-2, tied.
    cfg = tiny_cfg("experts.num_experts=4", "experts.ffn_dim=32", "routing.top_k=2")
    s = summarize(build_model(cfg))
    attn = 64 * 64 + 64 * 32 + 64 * 32 + 64 * 64  # q, k, v, o = 12288
    norms = 2 * 64
    router = 4 * 64
    experts = 4 * 3 * 32 * 64  # 24576
    layer = attn + norms + router + experts  # 37248
    total = 259 * 64 + 2 * layer + 64  # embedding (tied) + layers + final norm = 91136
    assert s["total_params"] == total == 91136
    active = total - 2 * (experts - 2 * 3 * 32 * 64)  # only 2 of 4 experts per token
    assert s["active_params"] == active == 66560
    # forward FLOPs: 2 per matmul parameter (incl. the tied output projection) + attention 2·L·T·D
    matmul = active - 2 * norms - 64
    assert s["flops_per_token"] == 2 * matmul + 2 * 2 * 256 * 64


def test_param_counts_interleaved_lowrank_with_shared_expert():
    cfg = tiny_cfg("model.moe_layers=[1]", "experts.type=lowrank", "experts.num_experts=4",
                   "experts.ffn_dim=32", "experts.rank=4", "experts.shared_experts=1",
                   "experts.shared_ffn_dim=16", "routing.top_k=1")
    s = summarize(build_model(cfg))
    attn, norms = 12288, 128
    dense = attn + norms + 3 * 64 * 172  # layer 0: dense SwiGLU FFN of 172 = 45440
    base = 3 * 32 * 64  # the low-rank bank's shared base FFN
    per_expert = 4 * 64 + 32 * 4 + 4 * 64 + 32 * 4 + 4 * 32 + 64 * 4  # A,B of gate, up, down = 1152
    shared = 3 * 64 * 16
    moe = attn + norms + 4 * 64 + base + 4 * per_expert + shared  # 26496
    total = 259 * 64 + dense + moe + 64
    assert s["total_params"] == total == 88576
    assert s["active_params"] == total - 3 * per_expert == 85120
    assert [layer["ffn"] for layer in s["layers"]] == ["dense", "moe"]


def test_per_layer_expert_counts():
    cfg = tiny_cfg("model.n_layers=3", "experts.num_experts_per_layer=[2,4,8]")
    model = build_model(cfg)
    assert [m.num_experts for m in model.moe_layers] == [2, 4, 8]
