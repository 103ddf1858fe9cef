"""The MoE layer against a naive per-token float64 reference, for every router × expert type."""

import math

import pytest
import torch
import torch.nn.functional as F

from helpers import tiny_cfg
from modular.models.moe import MoELayer
from modular.routing.hash_router import token_hash

D, E, T = 16, 6, 40
EXPERT_TYPES = ["swiglu", "gelu", "lowrank"]
ROUTERS = {
    "topk": [],
    "sigmoid": ["routing.score=sigmoid"],
    "aux_free": ["routing.score=sigmoid", "routing.bias_balancing=true"],
    "unnormalized": ["routing.normalize=false"],
    "expert_choice": ["routing.type=expert_choice", "routing.capacity_factor=1.0"],
    "sinkhorn": ["routing.type=sinkhorn"],
    "hash": ["routing.type=hash", "routing.top_k=2"],
}


def expert_fn(layer, e, x):
    """One expert applied to one token, written out from the weights."""
    bank = layer.banks[0]
    kind = bank.registry_name
    if kind == "swiglu":
        return bank.w_down[e] @ (F.silu(bank.w_gate[e] @ x) * (bank.w_up[e] @ x))
    if kind == "gelu":
        return bank.w_out[e] @ F.gelu(bank.w_in[e] @ x)
    if kind == "lowrank":
        w_gate = bank.base_gate + bank.b_gate[e] @ bank.a_gate[e]
        w_up = bank.base_up + bank.b_up[e] @ bank.a_up[e]
        w_down = bank.base_down + bank.b_down[e] @ bank.a_down[e]
        return w_down @ (F.silu(w_gate @ x) * (w_up @ x))
    raise AssertionError(kind)


def naive_sinkhorn(logits, iters):
    q = torch.exp(logits - logits.max())
    q = q / q.sum()
    n_tok, n_exp = q.shape
    for _ in range(iters):
        q = q / (q.sum(0, keepdim=True) * n_exp)
        q = q / (q.sum(1, keepdim=True) * n_tok)
    return q


def reference_choices(layer, x, token_ids):
    """[(token, expert, weight)] computed independently of modular.routing."""
    cfg = layer.routing_cfg
    k = cfg.top_k
    logits = x @ layer.router_weight().t()
    choices = []
    if cfg.type == "hash":
        for t in range(x.shape[0]):
            h = int(token_hash(token_ids[t : t + 1])[0]) % E
            choices += [(t, (h + j) % E, torch.tensor(1.0 / k, dtype=x.dtype)) for j in range(k)]
        return choices
    if cfg.type == "expert_choice":
        probs = torch.softmax(logits, dim=-1)
        capacity = min(x.shape[0], math.ceil(cfg.capacity_factor * k * x.shape[0] / E))
        for e in range(E):
            for t in torch.argsort(probs[:, e], descending=True)[:capacity].tolist():
                choices.append((t, e, probs[t, e]))
        return choices
    scores = torch.sigmoid(logits) if cfg.score == "sigmoid" else torch.softmax(logits, dim=-1)
    select = scores.detach().clone()
    if cfg.type == "sinkhorn":
        select = naive_sinkhorn(logits.detach(), cfg.sinkhorn_iters)
    if cfg.bias_balancing:
        select = select + layer.router.expert_bias
    for t in range(x.shape[0]):
        top = torch.argsort(select[t], descending=True)[:k].tolist()
        total = sum(scores[t, e] for e in top) if cfg.normalize else 1.0
        choices += [(t, e, scores[t, e] / total) for e in top]
    return choices


def reference_moe(layer, x, token_ids):
    y = torch.zeros_like(x)
    rows = [torch.zeros(D, dtype=x.dtype) for _ in range(x.shape[0])]
    for t, e, w in reference_choices(layer, x, token_ids):
        rows[t] = rows[t] + w * expert_fn(layer, e, x[t])
    y = torch.stack(rows)
    if layer.shared_experts is not None:
        ffn = layer.shared_experts.ffn
        y = y + torch.stack([ffn.down_proj.weight @ (F.silu(ffn.gate_proj.weight @ xt) * (ffn.up_proj.weight @ xt))
                             for xt in x])
    return y


def make_layer(expert_type, router_overrides, shared=0, seed=0):
    cfg = tiny_cfg(f"experts.type={expert_type}", f"experts.num_experts={E}", "experts.ffn_dim=12",
                   "experts.rank=3", f"experts.shared_experts={shared}", "experts.shared_ffn_dim=8",
                   *router_overrides)
    torch.manual_seed(seed)
    layer = MoELayer(D, E, cfg.experts, cfg.routing, init_std=0.5)
    for p in layer.parameters():  # random, never zero (low-rank B starts at zero otherwise)
        torch.nn.init.normal_(p, std=0.5)
    layer.router.expert_bias = torch.randn(E) * 0.1 if hasattr(layer.router, "expert_bias") else None
    return layer


def inputs_with_an_empty_expert(layer, seed=1):
    """Random tokens, with expert E-1's router row pointing away from all of them so it gets none."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(D, generator=g)
    u = u / u.norm()
    x = torch.randn(T, D, generator=g) * 0.5 + 3.0 * u
    with torch.no_grad():
        layer.banks[0].router_weight[E - 1] = -4.0 * u
    # token ids whose hash never lands on expert E-1's slots (only matters for hash routing)
    candidates = [i for i in range(2000) if int(token_hash(torch.tensor([i]))[0]) % E not in (E - 1, E - 2)]
    token_ids = torch.tensor(candidates[:T])
    return x, token_ids


@pytest.mark.parametrize("expert_type", EXPERT_TYPES)
@pytest.mark.parametrize("router", list(ROUTERS))
def test_moe_layer_matches_float64_reference(expert_type, router):
    layer = make_layer(expert_type, ROUTERS[router], shared=1 if router == "topk" else 0).double()
    layer.train()
    if layer.routing_cfg.type == "topk" and layer.router.bias_balancing:
        layer.router.bias_update_rate = 0.0  # the bias update happens after selection; keep it fixed here
    x, token_ids = inputs_with_an_empty_expert(layer)
    x = x.double().requires_grad_(True)

    y = layer(x, token_ids)
    counts = layer.last_stats["tokens_per_expert"]
    if router == "expert_choice":
        assert counts.tolist() == [counts[0]] * E  # balanced by construction
    elif router == "sinkhorn":
        assert counts[E - 1] > 0  # balancing sends tokens even to the expert the router disfavours
    else:
        assert counts[E - 1] == 0, "the test must exercise an empty expert"
        assert len(set(counts.tolist())) > 1, "the test must exercise uneven experts"

    y_ref = reference_moe(layer, x, token_ids)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12)  # float64 both sides: only reordering

    upstream = torch.randn_like(y)
    params = list(layer.parameters())
    grads = torch.autograd.grad(y, [x, *params], upstream, allow_unused=True)
    grads_ref = torch.autograd.grad(y_ref, [x, *params], upstream, allow_unused=True)
    names = ["x"] + [n for n, _ in layer.named_parameters()]
    for name, g, g_ref in zip(names, grads, grads_ref):
        if g_ref is None:
            assert g is None or torch.count_nonzero(g) == 0, name
            continue
        torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-11, msg=lambda m, name=name: f"{name}: {m}")
    if router not in ("hash",):
        assert grads[names.index("banks.0.router_weight")].abs().sum() > 0  # the router learns


@pytest.mark.parametrize("expert_type", EXPERT_TYPES)
def test_moe_layer_float32_close_to_float64_reference(expert_type):
    layer = make_layer(expert_type, [], shared=1)
    x, token_ids = inputs_with_an_empty_expert(layer)
    y = layer(x, token_ids)
    layer64 = layer.double()
    y_ref = reference_moe(layer64, x.double(), token_ids)
    # fp32 epsilon 1.2e-7, sums over D=16 and F=12 terms of magnitude ~10: error well below 1e-4 relative
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-4, atol=1e-4)


def test_multiple_banks_equal_one_bank_with_the_same_experts():
    layer = make_layer("swiglu", [])
    extra = layer.new_bank(3)
    for p in extra.parameters():
        torch.nn.init.normal_(p, std=0.5)
    layer.add_bank(extra)
    assert layer.num_experts == E + 3 and layer.bank_sizes() == [E, 3]
    x = torch.randn(T, D)
    y = layer(x)
    merged = make_layer("swiglu", [])
    merged = MoELayer(D, E + 3, layer.experts_cfg, layer.routing_cfg)
    with torch.no_grad():
        for name in ("w_gate", "w_up", "w_down", "router_weight"):
            getattr(merged.banks[0], name).copy_(torch.cat([getattr(b, name) for b in layer.banks]))
    torch.testing.assert_close(y, merged(x), rtol=1e-5, atol=1e-6)
    assert layer.last_stats["tokens_per_expert"].shape == (E + 3,)


def test_capacity_drops_lowest_weight_assignments():
    layer = make_layer("swiglu", ["routing.capacity_factor=0.5"])
    x = torch.randn(T, D)
    layer(x)
    stats = layer.last_stats
    capacity = math.ceil(0.5 * 2 * T / E)
    assert stats["tokens_per_expert"].max() <= capacity
    assert stats["dropped_assignments"] == 2 * T - int(stats["tokens_per_expert"].sum()) > 0


def test_stats_are_reachable_from_the_model_after_a_step():
    from modular.models import build_model

    cfg = tiny_cfg()
    model = build_model(cfg)
    ids = torch.randint(0, cfg.model.vocab_size, (2, 16))
    out = model(ids, ids)
    out.loss.backward()
    stats = model.moe_stats()
    assert sorted(stats) == [0, 1]
    for s in stats.values():
        assert int(s["tokens_per_expert"].sum()) == 2 * 16 * cfg.routing.top_k
        assert 0 < s["entropy"] <= math.log(cfg.experts.num_experts) + 1e-6
        assert s["max_imbalance"] >= 1.0
        assert s["dropped_tokens"] == 0
    assert out.aux_loss > 0
