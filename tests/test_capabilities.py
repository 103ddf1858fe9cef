"""Capabilities are stated by their owners: no code outside a router's, bank's, export format's or continual
strategy's own package compares against its registered name (callers ask the class instead), and the
registries hold what the capabilities promise."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from modular.continual.strategies import STRATEGY_REGISTRY
from modular.experts import EXPERT_REGISTRY, bank_class_of
from modular.export.formats import EXPORT_FORMATS, format_names
from modular.routing import ROUTER_REGISTRY

PACKAGE = Path(__file__).resolve().parents[1] / "modular"
OWNERS = {"router": "routing", "bank": "experts", "format": "export", "strategy": "continual/strategies"}


def _registered_names() -> dict[str, set[str]]:
    format_names()  # registers the built-in formats
    return {"router": set(ROUTER_REGISTRY), "bank": set(EXPERT_REGISTRY), "format": set(EXPORT_FORMATS),
            "strategy": set(STRATEGY_REGISTRY)}


def _constants(node: ast.AST) -> list[str]:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return [c for elt in node.elts for c in _constants(elt)]
    return []


def _name_tests(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, compared string) of every comparison whose operands include a string literal."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            for operand in (node.left, *node.comparators):
                found += [(node.lineno, c) for c in _constants(operand)]
    return found


def test_no_router_bank_format_or_strategy_name_is_tested_outside_its_package():
    names = _registered_names()
    offences = []
    for path in sorted(PACKAGE.rglob("*.py")):
        where = path.relative_to(PACKAGE).as_posix()
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for kind, owner in OWNERS.items():
            if where.startswith(owner + "/"):
                continue
            offences += [f"{path.relative_to(PACKAGE.parent)}:{line} compares with {kind} name '{value}'"
                         for line, value in _name_tests(tree) if value in names[kind]]
        for node in ast.walk(tree):
            if isinstance(node, ast.Compare) and any(
                    isinstance(x, ast.Attribute) and x.attr == "registry_name" for x in (node.left, *node.comparators)):
                offences.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} compares a registry_name")
    assert not offences, "\n".join(offences)


def test_the_scan_finds_a_name_test():
    """The scan above can fail: a planted name test is found."""
    tree = ast.parse("if cfg.routing.type == 'expert_choice' or kind in ('swiglu', 'gelu'):\n    pass\n")
    assert {value for _, value in _name_tests(tree)} == {"expert_choice", "swiglu", "gelu"}


def test_routers_state_their_capabilities():
    from helpers import tiny_cfg

    cfg = tiny_cfg("routing.type=expert_choice", "routing.capacity_factor=1.5").routing
    ec = ROUTER_REGISTRY["expert_choice"]
    assert ec.owns_capacity and ec.chooses_over_batch(cfg, training=False)
    assert not ec.routes_every_token(cfg) and ec.experts_per_token(cfg, 8) == pytest.approx(3.0)
    topk = ROUTER_REGISTRY["topk"]
    plain = tiny_cfg().routing
    assert topk.softmax_top_k_misfits(plain) == [] and topk.weights_sum_to_one(plain)
    assert topk.softmax_top_k_misfits(tiny_cfg("routing.score=sigmoid").routing) == ["routing.score=sigmoid"]
    assert "expert_bias" in topk.per_expert_buffers
    assert ROUTER_REGISTRY["sinkhorn"].chooses_over_batch(plain, training=True)
    assert not ROUTER_REGISTRY["sinkhorn"].chooses_over_batch(plain, training=False)
    assert not ROUTER_REGISTRY["hash"].routes_by_logits


def test_a_router_resizes_exactly_the_buffers_it_declares():
    from helpers import tiny_cfg

    router = ROUTER_REGISTRY["topk"](tiny_cfg("routing.bias_balancing=true").routing, 4)
    router.expert_bias.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    router.register_buffer("scratch", torch.ones(4))  # a 1-D buffer of length E that is not per-expert state
    router.resize(6, keep=torch.tensor([3, 0, 1, 2]))
    assert router.expert_bias.tolist() == [4.0, 1.0, 2.0, 3.0, 0.0, 0.0]
    assert router.scratch.shape == (4,)  # left alone: it was never declared per-expert


def test_banks_express_themselves_as_swiglu():
    from helpers import tiny_cfg

    cfg = tiny_cfg("experts.type=lowrank", "experts.rank=4").experts
    bank = EXPERT_REGISTRY["lowrank"].from_config(16, 3, cfg, 0.02)
    bank.reset_parameters()
    for p in bank.parameters():
        torch.nn.init.normal_(p, std=0.1)
    state = dict(bank.state_dict())
    assert bank_class_of(set(state)) is EXPERT_REGISTRY["lowrank"]
    gate, up, down = bank_class_of(set(state)).swiglu_from_state(state)
    x = torch.randn(5, 16)
    counts = torch.tensor([5, 0, 0])
    expected = bank(x, counts)
    got = down[0] @ (torch.nn.functional.silu(gate[0] @ x.T) * (up[0] @ x.T))
    torch.testing.assert_close(got.T, expected, rtol=1e-5, atol=1e-6)
    assert not EXPERT_REGISTRY["gelu"].expressible_as_swiglu()
    assert set(bank.expert_rows(1)) == {*bank.expert_param_names, "router_weight"}


def test_export_formats_say_what_they_cannot_express():
    from helpers import tiny_cfg
    from modular.export.formats import export_format
    from modular.models import build_model

    cfg = tiny_cfg("experts.num_experts=4", "experts.ffn_dim=32", "experts.shared_experts=1")
    model = build_model(cfg)
    assert any("shared experts" in m for m in export_format("mixtral").cannot_express(model, cfg))
    assert export_format("qwen2-moe").cannot_express(model, cfg) == []
    assert export_format("moe").cannot_express(model, cfg) == []
    assert format_names()[:4] == ["llama-dense", "mixtral", "qwen2-moe", "moe"]
