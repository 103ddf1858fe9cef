"""Expert lifecycle: add keeps the function when masked, freeze is bitwise, merges of identical experts are
no-ops, and the optimizer follows every operation."""

import copy

import pytest
import torch

from helpers import tiny_cfg
from modular.continual import lifecycle
from modular.errors import ConfigError
from modular.models import build_model
from modular.train.optimizer import build_optimizer

BASE = ["experts.num_experts=4", "experts.ffn_dim=16", "train.weight_decay=0.1", "train.lr=1e-2"]


def model_and_batch(*overrides, seed=0):
    cfg = tiny_cfg(*BASE, *overrides)
    torch.manual_seed(seed)
    model = build_model(cfg)
    ids = torch.randint(0, cfg.model.vocab_size, (2, 24))
    return cfg, model, ids


def train_steps(model, cfg, ids, steps=3):
    opt = build_optimizer(model, cfg.train)
    for _ in range(steps):
        out = model(ids, ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    return opt


def test_masked_add_keeps_the_models_function():
    _cfg, model, ids = model_and_batch()
    model.eval()
    before = model(ids).logits
    for layer in model.moe_layers:
        lifecycle.add_experts(layer, 3, init="random", router_init="masked")
    after = model(ids).logits
    assert all(layer.num_experts == 7 and layer.bank_sizes() == [4, 3] for layer in model.moe_layers)
    assert torch.equal(before, after)
    lifecycle.unmask_experts(model)
    assert not torch.equal(before, model(ids).logits)  # unmasked, the new experts take part


def test_copy_add_copies_the_most_used_experts():
    _cfg, model, ids = model_and_batch()
    usage = lifecycle.measure_usage(model, [ids])
    layer = model.moe_layers[0]
    top = torch.argsort(usage[0], descending=True)[:2].tolist()
    bank = lifecycle.add_experts(layer, 2, init="copy", copy_from="top", usage=usage[0])
    for j, src in enumerate(top):
        assert torch.equal(bank.w_gate[j], layer.banks[0].w_gate[src])
        assert torch.equal(bank.router_weight[j], layer.banks[0].router_weight[src])
    assert layer.expert_parents == [None] * 4 + top


def test_freeze_is_bitwise(tmp_path):
    cfg, model, ids = model_and_batch()
    for layer in model.moe_layers:
        lifecycle.add_experts(layer, 2, init="copy", noise=0.05, generator=torch.Generator().manual_seed(0))
    frozen_names = lifecycle.freeze(model, ["old_experts", "old_router", "attention", "embeddings", "norms"])
    snapshot = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_steps(model, cfg, ids, steps=4)
    params = dict(model.named_parameters())
    assert frozen_names
    for name in frozen_names:
        assert torch.equal(params[name], snapshot[name]), name
    new_bank = "layers.0.mlp.banks.1.w_gate"
    assert not torch.equal(params[new_bank], snapshot[new_bank])  # the new experts did train


def test_unknown_freeze_target():
    _cfg, model, _ = model_and_batch()
    with pytest.raises(ConfigError, match=r"'decoder'.*freezable parts are"):
        lifecycle.freeze(model, ["decoder"])


def make_identical(layer):
    with torch.no_grad():
        for bank in layer.banks:
            for name in bank.expert_param_names:
                p = getattr(bank, name)
                p.copy_(getattr(layer.banks[0], name)[0].expand_as(p))


@pytest.mark.parametrize("method", ["frequency", "cluster", "task_arithmetic", "ties"])
def test_merge_of_identical_experts_changes_nothing(method):
    _cfg, model, ids = model_and_batch()
    for layer in model.moe_layers:
        lifecycle.add_experts(layer, 4, init="copy", copy_from="all")
        make_identical(layer)
    model.eval()
    before = model(ids).logits
    usage = lifecycle.measure_usage(model, [ids])
    for i, layer in enumerate(model.moe_layers):
        lifecycle.merge_layer(layer, 5, method=method, usage=usage[[0, 1][i]])
        assert layer.num_experts == 5 and layer.bank_sizes() == [4, 1]
    torch.testing.assert_close(model(ids).logits, before, rtol=1e-5, atol=1e-5)


def test_merge_budget_below_the_kept_experts_is_refused():
    _cfg, model, _ = model_and_batch()
    layer = model.moe_layers[0]
    lifecycle.add_experts(layer, 2)
    with pytest.raises(ConfigError, match="merge_budget=4 is below the 4 experts"):
        lifecycle.merge_layer(layer, 4)


def test_frequency_merge_keeps_most_used_and_averages_the_rest():
    _cfg, model, _ = model_and_batch()
    layer = model.moe_layers[0]
    lifecycle.add_experts(layer, 3, init="random")
    old = {n: torch.cat([getattr(b, n) for b in layer.banks]).detach().clone() for n in ("w_up", "router_weight")}
    usage = torch.tensor([5.0, 5, 5, 5, 1, 9, 3], dtype=torch.float64)
    origins = lifecycle.merge_layer(layer, 6, method="frequency", usage=usage)
    merged = layer.banks[1]
    assert [o.survivor_of for o in origins] == [0, 1, 2, 3, 5, None]
    assert torch.equal(merged.w_up[0], old["w_up"][5])
    expected = (old["w_up"][4] * (1 + 1e-6) + old["w_up"][6] * (3 + 1e-6)) / (4 + 2e-6)
    torch.testing.assert_close(merged.w_up[1], expected)
    expected_row = (old["router_weight"][4] * (1 + 1e-6) + old["router_weight"][6] * (3 + 1e-6)) / (4 + 2e-6)
    torch.testing.assert_close(merged.router_weight[1], expected_row)


def test_task_arithmetic_merge_needs_parents():
    _cfg, model, _ = model_and_batch()
    layer = model.moe_layers[0]
    lifecycle.add_experts(layer, 2, init="random")
    with pytest.raises(ConfigError, match="has none"):
        lifecycle.merge_layer(layer, 5, method="task_arithmetic")


def test_remove_drops_least_used():
    _cfg, model, _ = model_and_batch()
    layer = model.moe_layers[0]
    lifecycle.add_experts(layer, 3, init="random")
    kept_row = layer.banks[1].w_down[2].detach().clone()
    origins = lifecycle.remove_experts(layer, 2, usage=torch.tensor([1.0, 1, 1, 1, 0, 3, 8]))
    assert layer.num_experts == 5 and [o.survivor_of for o in origins] == [0, 1, 2, 3, 6]
    assert torch.equal(layer.banks[1].w_down[0], kept_row)


def test_optimizer_state_follows_add_and_merge():
    cfg, model, ids = model_and_batch()
    opt = train_steps(model, cfg, ids, steps=2)
    layer = model.moe_layers[0]
    old_gate = layer.banks[0].w_gate
    old_state = copy.deepcopy(opt.state[old_gate])
    lifecycle.add_experts(layer, 2, init="copy", noise=0.05, generator=torch.Generator().manual_seed(1))
    new_opt = build_optimizer(model, cfg.train)
    lifecycle.carry_optimizer_state(opt, new_opt)
    assert torch.equal(new_opt.state[old_gate]["exp_avg"], old_state["exp_avg"])  # survivors keep theirs
    assert layer.banks[1].w_gate not in new_opt.state  # new parameters start fresh
    opt = train_steps_with(model, new_opt, ids)
    added_state = copy.deepcopy(opt.state[layer.banks[1].w_gate])
    lifecycle.add_experts(layer, 1, init="random")
    # merge banks 1..2 (3 experts) into 2: the most used of them survives with its moments
    usage = torch.tensor([1.0, 1, 1, 1, 9, 2, 1], dtype=torch.float64)
    where = [(b.w_gate, r) for b in layer.banks for r in range(b.num_experts)]
    origins = lifecycle.merge_layer(layer, 6, method="frequency", usage=usage)
    sources = {id(layer.banks[1].w_gate): [where[o.survivor_of] if o.survivor_of is not None else None
                                           for o in origins[4:]]}
    merged_opt = build_optimizer(model, cfg.train)
    lifecycle.carry_optimizer_state(opt, merged_opt, sources)
    state = merged_opt.state[layer.banks[1].w_gate]
    assert torch.equal(state["exp_avg"][0], added_state["exp_avg"][0])  # expert 4 survived as row 0
    assert torch.count_nonzero(state["exp_avg"][1]) == 0  # the merged expert starts with zero moments
    gone = {id(p) for g in opt.param_groups for p in g["params"]} - {id(p) for p in model.parameters()}
    assert gone and not any(id(p) in gone for p in merged_opt.state)  # removed ones leave nothing behind


def train_steps_with(model, opt, ids):
    out = model(ids, ids)
    out.loss.backward()
    opt.step()
    opt.zero_grad()
    return opt


def _inputs(generator, dim=16, tokens=200, shift=0.0):
    x = torch.randn(tokens, dim, generator=generator, dtype=torch.float64) @ torch.randn(dim, dim, generator=generator,
                                                                                        dtype=torch.float64)
    x = x + shift
    return x, lifecycle.RouterInputs(x.mean(0), torch.cov(x.T, correction=0))


def test_contrast_direction_puts_the_means_at_plus_and_minus_one_and_separates_tokens_better_than_the_means():
    g = torch.Generator().manual_seed(3)
    shift = torch.randn(16, generator=g, dtype=torch.float64)
    x_new, new = _inputs(g, shift=shift)
    x_old, old = _inputs(g, shift=-shift)
    for ridge in (0.0, 0.1):
        w = lifecycle.contrast_direction(new, old, ridge=ridge)
        assert float(w @ new.mean) == pytest.approx(1.0, abs=1e-9)
        assert float(w @ old.mean) == pytest.approx(-1.0, abs=1e-9)
    # Fisher's direction (ridge 0) against the covariance-blind one (a huge ridge: P ∝ I), both at ±1:
    # the share of tokens on their own domain's side of zero.
    def accuracy(w):
        return 0.5 * (float((x_new @ w > 0).double().mean()) + float((x_old @ w < 0).double().mean()))

    assert accuracy(lifecycle.contrast_direction(new, old, ridge=0.0)) > accuracy(
        lifecycle.contrast_direction(new, old, ridge=1e6))
    same = lifecycle.RouterInputs(new.mean, new.cov)
    assert torch.equal(lifecycle.contrast_direction(new, same), torch.zeros(16, dtype=torch.float64))


def test_contrast_router_init_raises_the_new_domain_and_lowers_the_old_by_the_margin():
    _cfg, model, ids = model_and_batch()
    other = torch.randint(0, 64, (2, 24))  # a different "domain": another token distribution
    inputs_new, inputs_old = lifecycle.measure_router_inputs(model, [ids]), lifecycle.measure_router_inputs(model, [other])
    usage = lifecycle.measure_usage(model, [ids])
    layer_index = next(i for i, layer in enumerate(model.layers) if layer.is_moe)
    layer = model.layers[layer_index].mlp
    old_rows = layer.router_weight().detach().to(torch.float64)
    new, old = inputs_new[layer_index], inputs_old[layer_index]
    bank = lifecycle.add_experts(layer, 2, init="copy", router_init="contrast", usage=usage[layer_index],
                                 domain_inputs=(new, old), margin=0.5)
    sources = layer.expert_parents[4:]
    scale = float((old_rows @ new.mean).std())
    new_rows, src_rows = bank.router_weight.detach().to(torch.float64), old_rows[sources]
    torch.testing.assert_close(new_rows @ new.mean - src_rows @ new.mean,
                               torch.full((2,), 0.5 * scale, dtype=torch.float64), rtol=0, atol=1e-5 * scale)
    torch.testing.assert_close(new_rows @ old.mean - src_rows @ old.mean,
                               torch.full((2,), -0.5 * scale, dtype=torch.float64), rtol=0, atol=1e-5 * scale)
    with pytest.raises(ConfigError, match="contrast"):
        lifecycle.add_experts(layer, 1, router_init="contrast")


def test_measured_router_inputs_are_the_mean_and_covariance_of_what_the_layer_sees():
    _cfg, model, ids = model_and_batch()
    layer_index = next(i for i, layer in enumerate(model.layers) if layer.is_moe)
    seen = []
    handle = model.layers[layer_index].mlp.register_forward_pre_hook(lambda _m, a: seen.append(a[0].detach()))
    stats = lifecycle.measure_router_inputs(model, [ids, ids[:, :10]])[layer_index]
    handle.remove()
    x = torch.cat([t.reshape(-1, t.shape[-1]) for t in seen]).to(torch.float64)
    torch.testing.assert_close(stats.mean, x.mean(0))
    torch.testing.assert_close(stats.cov, torch.cov(x.T, correction=0))
