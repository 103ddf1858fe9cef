"""EP=2 (and DP=2) on two gloo processes equals one process on the same global batch: forward, backward,
global-norm clipping and one AdamW step, for every router; uneven and empty token sets; growth, freezing
and merging under EP; checkpoints that move between EP=2 and one process.

fp32 throughout; tolerance 1e-5 absolute: the two runs do the same arithmetic on differently shaped
matmuls (a batch of 2 rows per rank instead of 4), so they differ only by float32 rounding (~1e-7).
"""

from __future__ import annotations

import pytest
import torch
import workers
from workers import ROUTINGS, build, eval_logits, global_batch, step_once

from modular.train import checkpoint as ckpt
from modular.train.optimizer import build_optimizer

ATOL = 1e-5


def reference_step(overrides, prepare=None) -> dict:
    cfg, model = build(overrides)
    if prepare is not None:
        prepare(model)
    optimizer = build_optimizer(model, cfg.train)
    result = step_once(model, model, global_batch(2), optimizer)
    result["params"] = model.state_dict()
    result["optimizer"] = optimizer.state_dict()
    result["bias"] = {i: layer.mlp.router.expert_bias.clone() for i, layer in enumerate(model.layers)
                      if hasattr(layer.mlp.router, "expert_bias")}
    return result, model, optimizer


def assert_close(name, got, want, atol=ATOL):
    assert got.shape == want.shape, (name, got.shape, want.shape)
    err = (got.double() - want.double()).abs().max().item() if got.numel() else 0.0
    assert err <= atol, f"{name}: max abs difference {err:.3g} > {atol}"


def assert_same_step(parallel: list[dict], ref: dict, what: str) -> None:
    rank0 = parallel[0]
    assert_close(f"{what} logits", torch.cat([r["logits"] for r in parallel]), ref["logits"])
    assert sum(r["loss"] for r in parallel) / len(parallel) == pytest.approx(ref["loss"], abs=ATOL)
    assert sum(r["aux_loss"] for r in parallel) / len(parallel) == pytest.approx(ref["aux_loss"], abs=ATOL)
    assert rank0["norm"] == pytest.approx(ref["norm"], rel=1e-5)
    assert set(rank0["grads"]) == set(ref["grads"]), what
    for name, g in ref["grads"].items():
        assert_close(f"{what} grad {name}", rank0["grads"][name], g)
    for name, p in ref["params"].items():
        assert_close(f"{what} param {name} after the step", rank0["params"][name], p)
    ref_state = ref["optimizer"]["state"]
    assert set(rank0["optimizer"]["state"]) == set(ref_state), what
    for index, state in ref_state.items():
        assert_close(f"{what} exp_avg[{index}]", rank0["optimizer"]["state"][index]["exp_avg"], state["exp_avg"])
    for layer, stats in ref["stats"].items():
        got = rank0["stats"][layer]
        assert torch.equal(got["tokens_per_expert"], stats["tokens_per_expert"]), (what, layer)
        assert got["dropped"] == stats["dropped"] and got["num_tokens"] == stats["num_tokens"], (what, layer)
        assert got["entropy"] == pytest.approx(stats["entropy"], abs=1e-5)
        for loss_name, value in ref["aux"][layer].items():
            assert rank0["aux"][layer][loss_name] == pytest.approx(value, abs=ATOL), (what, layer, loss_name)
    for layer, bias in ref["bias"].items():
        assert_close(f"{what} selection bias", rank0["bias"][layer], bias)


UNEVEN = [
    {"name": "five_and_two", "sizes": [5, 2]},
    {"name": "all_on_one_rank", "sizes": [7, 0]},
    {"name": "nothing_for_rank_1_experts", "sizes": [4, 3], "only_first_rank_experts": True},
    {"name": "expert_choice_uneven", "sizes": [6, 1], "overrides": ["routing=expert_choice"]},
    {"name": "capacity_uneven", "sizes": [2, 5], "overrides": ["routing=capacity"]},
]


def one_process_checkpoint(run_dir):
    """A model after one single-process step, saved the ordinary way; returns (folder, model, optimizer)."""
    cfg, model = build(ROUTINGS["topk"])
    optimizer = build_optimizer(model, cfg.train)
    step_once(model, model, global_batch(2), optimizer)
    return ckpt.save_checkpoint(run_dir, 1, model, optimizer, {}, {}), model, optimizer


@pytest.fixture(scope="module")
def launched(parallel_runner, tmp_path_factory):
    """Every scenario of this module in one 2-process launch: {scenario: [rank 0 result, rank 1 result]}."""
    out = tmp_path_factory.mktemp("ep2")
    folder, _, _ = one_process_checkpoint(out / "one_process")
    ranks = parallel_runner("all", out, {"equivalence": {"routings": list(ROUTINGS)}, "layer_uneven": {"cases": UNEVEN},
                                         "growth": {}, "load_single": {"checkpoint": str(folder)}})
    return out, {name: [rank[name] for rank in ranks] for name in ranks[0]}


@pytest.fixture(scope="module")
def equivalence(launched):
    return launched[1]["equivalence"]


@pytest.mark.parametrize("routing", list(ROUTINGS))
def test_ep2_step_equals_one_process(equivalence, routing):
    parallel = [rank[routing] for rank in equivalence]
    ref, _, _ = reference_step(ROUTINGS[routing])
    assert_same_step(parallel, ref, routing)
    # each rank really holds half of every expert stack
    assert parallel[0]["shapes"]["layers.0.mlp.banks.0.router_weight"] == (4, 64)
    expert = "layers.0.mlp.banks.0." + ("a_gate" if routing == "lowrank" else "w_gate")
    assert parallel[0]["shapes"][expert][0] == 2 and parallel[1]["shapes"][expert][0] == 2


def test_dp2_step_equals_one_process(equivalence):
    parallel = [rank["dp_only_topk"] for rank in equivalence]
    ref, _, _ = reference_step(ROUTINGS["topk"])
    assert_same_step(parallel, ref, "dp=2")
    assert parallel[0]["shapes"]["layers.0.mlp.banks.0.w_gate"][0] == 4  # ep=1: every rank holds every expert


@pytest.fixture(scope="module")
def uneven(launched):
    return launched[1]["layer_uneven"]


@pytest.mark.parametrize("case", UNEVEN, ids=[c["name"] for c in UNEVEN])
def test_uneven_and_zero_token_counts(uneven, case):
    layer, x_TD, c_TD = workers.uneven_case(case)
    layer.train()
    x = x_TD.clone().requires_grad_(True)
    y = layer(x)
    (y * c_TD).sum().backward()
    got = [rank[case["name"]] for rank in uneven]
    assert [r["y"].shape[0] for r in got] == case["sizes"]
    assert_close("y", torch.cat([r["y"] for r in got]), y.detach())
    assert_close("x grad", torch.cat([r["x_grad"] for r in got]), x.grad)
    for bank, g in zip(layer.banks, got[0]["router_grads"]):
        assert_close("router grad", g, bank.router_weight.grad)
    for name, g in got[0]["expert_grads"].items():
        assert_close(f"expert grad {name}", g, getattr(layer.banks[0], name).grad)
    assert torch.equal(got[0]["tokens_per_expert"], layer.last_stats["tokens_per_expert"])
    for name, value in layer.aux_losses.items():
        assert got[0]["aux"][name] == pytest.approx(value, abs=ATOL), name
    if case.get("only_first_rank_experts"):
        assert layer.last_stats["tokens_per_expert"][2:].sum() == 0  # rank 1's experts received no rows


def _grow_and_freeze(model):
    from modular.continual import lifecycle

    for layer in model.moe_layers:
        torch.manual_seed(5)
        layer.add_bank(layer.new_bank(4))
    lifecycle.freeze(model, ["old_experts", "old_router"])


@pytest.fixture(scope="module")
def growth(launched):
    return launched[0] / "growth", launched[1]["growth"]


def test_add_bank_under_ep_places_new_experts_evenly_then_frozen_step_matches(growth):
    _, ranks = growth
    assert [r["new_bank_slices"] for r in ranks] == [[(0, 2), (0, 2)], [(2, 4), (2, 4)]]
    assert ranks[0]["new_bank_rows"] == [2, 2]
    ref, _, _ = reference_step(ROUTINGS["topk"], prepare=_grow_and_freeze)
    assert_same_step(ranks, ref, "grown and frozen")
    _, fresh = build(ROUTINGS["topk"])
    for name, p in fresh.state_dict().items():  # frozen: the original experts and router rows did not move
        if ".banks.0." in name:
            assert_close(f"frozen {name}", ranks[0]["params"][name], p, atol=0.0)


def test_checkpoint_saved_at_ep2_loads_in_one_process_with_the_same_logits(growth):
    from modular.continual import lifecycle
    from modular.models.structure import apply_structure

    out, ranks = growth
    folder = out / "ckpt" / ckpt.CHECKPOINT_DIR / ckpt.step_dir_name(1)
    ckpt.verify_checkpoint(folder)
    cfg, model = build(ROUTINGS["topk"])
    apply_structure(model, ckpt.read_trainer_state(folder)["structure"])
    ckpt.load_model_weights(model, folder)  # the ordinary single-process loader: the file is unsharded
    lifecycle.freeze(model, ["old_experts", "old_router"])  # as when it was saved: frozen parts have no moments
    optimizer = build_optimizer(model, cfg.train)
    ckpt.load_optimizer_state(optimizer, folder)
    assert_close("logits after loading at EP=1", eval_logits(model, global_batch(1, seed=9)), ranks[0]["eval_logits"])
    assert_close("EP ranks evaluate alike", ranks[1]["eval_logits"], ranks[0]["eval_logits"], atol=0.0)
    _, _, ref_optimizer = reference_step(ROUTINGS["topk"], prepare=_grow_and_freeze)
    for p, q in zip(ref_optimizer.param_groups[0]["params"], optimizer.param_groups[0]["params"]):
        assert_close("loaded Adam moment", optimizer.state[q]["exp_avg"], ref_optimizer.state[p]["exp_avg"])


def test_merge_and_lifecycle_growth_inside_full_experts_match_one_process(growth):
    from modular.continual import lifecycle

    _, ranks = growth
    _, model, _ = reference_step(ROUTINGS["topk"], prepare=_grow_and_freeze)
    tokens = global_batch(1, seed=9)
    assert_close("before merging", eval_logits(model, tokens), ranks[0]["eval_logits"])
    for layer in model.moe_layers:
        lifecycle.merge_layer(layer, 6, method="frequency", keep_banks=1)
    assert [r["merged_slices"][0] for r in ranks] == [[(0, 2), (0, 1)], [(2, 4), (1, 2)]]
    assert_close("after merging", ranks[0]["merged_logits"], eval_logits(model, tokens))
    for name, p in model.state_dict().items():
        assert_close(f"merged {name}", ranks[0]["merged_params"][name], p)
    for layer in model.moe_layers:
        lifecycle.add_experts(layer, 2, init="copy", router_init="copy")
    assert_close("after add_experts", ranks[0]["copied_logits"], eval_logits(model, tokens))


def test_checkpoint_saved_in_one_process_loads_at_ep2(launched, tmp_path):
    ranks = launched[1]["load_single"]
    _, model, optimizer = one_process_checkpoint(tmp_path)  # the same model the launch loaded
    want = eval_logits(model, global_batch(1, seed=9))
    for rank in ranks:
        assert_close("logits at EP=2", rank["eval_logits"], want)
    name = "layers.1.mlp.banks.0.w_down"
    assert ranks[0]["shapes"][name][0] == 2
    moment = optimizer.state[dict(model.named_parameters())[name]]["exp_avg"]
    assert_close("moment slice rank 0", ranks[0]["moments"][name], moment[:2])
    assert_close("moment slice rank 1", ranks[1]["moments"][name], moment[2:])
