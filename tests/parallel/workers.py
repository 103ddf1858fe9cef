"""What each rank of a 2-process gloo test runs: `python workers.py SCENARIO OUT_DIR [ARGS_JSON]`.

The launcher (conftest.run_parallel) sets RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT. Each rank
writes OUT_DIR/rank{r}.pt; the test compares them with a single-process reference it computes itself.
Shared with the tests: `build`, `global_batch`, `step_once` define the reference computation.
"""

from __future__ import annotations

import json
import os
import sys
from datetime import timedelta
from pathlib import Path

import torch

from modular.config import compose_config
from modular.models import build_model
from modular.train.optimizer import build_optimizer

BASE = ["model=tiny", "experts.num_experts=4", "experts.ffn_dim=32", "train.lr=1e-3", "train.grad_clip=1.0"]
ROUTINGS = {
    "topk": [],
    "expert_choice": ["routing=expert_choice"],
    "capacity": ["routing=capacity"],
    "sinkhorn": ["routing=sinkhorn"],
    "aux_free_shared": ["routing=aux_free", "experts=shared", "experts.num_experts=4", "experts.ffn_dim=32",
                        "experts.shared_ffn_dim=32"],
    "lowrank": ["experts=lowrank", "experts.num_experts=4", "experts.ffn_dim=32", "experts.rank=4"],
    "hash": ["routing=hash"],
}
ROWS_PER_RANK, SEQ = 2, 16


def build(overrides: list[str]):
    cfg = compose_config([*BASE, *overrides])
    torch.manual_seed(0)
    return cfg, build_model(cfg)


def global_batch(world: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 259, (world * ROWS_PER_RANK, SEQ + 1), generator=g)


def rows_of(tokens: torch.Tensor, rank: int) -> torch.Tensor:
    return tokens[rank * ROWS_PER_RANK:(rank + 1) * ROWS_PER_RANK]


def step_once(model, forward_model, tokens, optimizer, ctx=None) -> dict:
    """Forward, backward, (reduce), clip, step: the single-process path when ctx is None."""
    from modular.parallel import data_parallel

    model.train()
    out = forward_model(tokens[:, :-1], tokens[:, 1:])
    out.loss.backward()
    if ctx is None:
        norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], 1.0)
    else:
        data_parallel.reduce_expert_gradients(model, ctx)
        norm = data_parallel.clip_grad_norm_(model, 1.0, ctx)
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    stats = {i: {"tokens_per_expert": s["tokens_per_expert"].clone(), "dropped": s["dropped_assignments"],
                 "entropy": s["entropy"], "num_tokens": s["num_tokens"]} for i, s in model.moe_stats().items()}
    aux = {i: dict(layer.mlp.aux_losses) for i, layer in enumerate(model.layers) if layer.is_moe}
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {"logits": out.logits.detach(), "loss": float(out.loss.detach()),
            "lm_loss": float(out.lm_loss.detach()), "aux_loss": float(out.aux_loss.detach()), "norm": float(norm), "grads": grads, "stats": stats, "aux": aux}


def eval_logits(model, tokens) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(tokens[:, :-1]).logits


# -- rank side ------------------------------------------------------------------------------------


def _gathered(model, tensors: dict, ctx) -> dict:
    from modular.parallel.expert_parallel import expert_parameter_names, gather_experts

    sharded = expert_parameter_names(model)
    return {n: gather_experts(t, ctx) if n in sharded else t for n, t in tensors.items()}


def _ctx_dp_only(ctx):
    """A (dp=2, ep=1) view of the same two processes: each rank its own EP group of one."""
    import torch.distributed as dist

    from modular.parallel.mesh import ParallelContext

    singles = [dist.new_group([r]) for r in range(ctx.world_size)]
    return ParallelContext(rank=ctx.rank, world_size=ctx.world_size, local_rank=0, dp=ctx.world_size, ep=1,
                           device=ctx.device, backend=ctx.backend, ep_group=singles[ctx.rank],
                           dp_group=None)


def _parallel_step(overrides, ctx, prepare=None) -> dict:
    from modular.parallel.checkpoint import full_model_state, full_optimizer_state
    from modular.parallel.data_parallel import wrap_data_parallel
    from modular.parallel.expert_parallel import parallelize_moe_layers

    cfg, model = build(overrides)
    parallelize_moe_layers(model, ctx)
    if prepare is not None:
        prepare(model, ctx)
    forward_model = wrap_data_parallel(model, ctx)
    optimizer = build_optimizer(model, cfg.train)
    tokens = global_batch(ctx.world_size)
    result = step_once(model, forward_model, rows_of(tokens, ctx.rank), optimizer, ctx)
    result["grads"] = _gathered(model, result["grads"], ctx)
    result["params"] = full_model_state(model, ctx)
    result["optimizer"] = full_optimizer_state(optimizer, model, ctx)
    result["bias"] = {i: layer.mlp.router.expert_bias.clone() for i, layer in enumerate(model.layers)
                      if hasattr(layer.mlp.router, "expert_bias")}
    result["shapes"] = {n: tuple(p.shape) for n, p in model.named_parameters()}
    return result, model, optimizer


def scenario_equivalence(ctx, out: Path, args: dict) -> dict:
    results = {}
    for name in args["routings"]:
        results[name], _, _ = _parallel_step(ROUTINGS[name], ctx)
    dp_ctx = _ctx_dp_only(ctx)
    results["dp_only_topk"], _, _ = _parallel_step(ROUTINGS["topk"], dp_ctx)
    return results


def scenario_layer_uneven(ctx, out: Path, args: dict) -> dict:
    """One MoE layer, uneven and empty token sets per rank; loss = Σ y·c (sums, so ranks simply add up)."""
    from modular.parallel.expert_parallel import ExpertPlacement, shard_bank

    results = {}
    for case in args["cases"]:
        layer, x_TD, c_TD = uneven_case(case)
        sizes = case["sizes"]
        start = sum(sizes[: ctx.rank])
        mine = slice(start, start + sizes[ctx.rank])
        for bank in layer.banks:
            shard_bank(bank, ctx)
        layer.place(ExpertPlacement(ctx))
        layer.train()
        x = x_TD[mine].clone().requires_grad_(True)
        y = layer(x)
        (y * c_TD[mine]).sum().backward()
        router_grads = [bank.router_weight.grad.clone() for bank in layer.banks]
        for g in router_grads:  # dense: each rank holds its tokens' share; the experts already hold the sum
            torch.distributed.all_reduce(g)
        results[case["name"]] = {
            "y": y.detach(), "x_grad": x.grad.detach(),
            "router_grads": router_grads,
            "expert_grads": {n: _gathered_one(_grad_or_zeros(getattr(bank, n)), ctx) for bank in layer.banks[:1]
                             for n in bank.expert_param_names},
            "tokens_per_expert": layer.last_stats["tokens_per_expert"].clone(),
            "aux": dict(layer.aux_losses),
        }
    return results


def _grad_or_zeros(p):  # a rank whose experts received no rows has no gradient for them (zeros in one process)
    return p.grad if p.grad is not None else torch.zeros_like(p)


def _gathered_one(t, ctx):
    from modular.parallel.expert_parallel import gather_experts

    return gather_experts(t, ctx)


def uneven_case(case: dict):
    """The layer and the global token set of an uneven-tokens case (built the same way by the test)."""
    from modular.config import compose_config
    from modular.models.moe import MoELayer

    cfg = compose_config(["model=tiny", *case.get("overrides", [])])
    torch.manual_seed(3)
    layer = MoELayer(16, 4, cfg.experts, cfg.routing)
    if case.get("only_first_rank_experts"):  # every token prefers experts 0 and 1: rank 1 receives nothing
        with torch.no_grad():
            layer.banks[0].router_weight[2:] = -layer.banks[0].router_weight[:2].abs().sum(0) * 5
    g = torch.Generator().manual_seed(4)
    total = sum(case["sizes"])
    x_TD = torch.randn(total, 16, generator=g)
    if case.get("only_first_rank_experts"):
        x_TD = x_TD.abs()
    c_TD = torch.randn(total, 16, generator=g)
    return layer, x_TD, c_TD


def scenario_growth(ctx, out: Path, args: dict) -> dict:
    """add_bank under EP, then freeze the old experts and router and take a step; then merge to a budget."""
    from modular.continual import lifecycle
    from modular.models.structure import model_structure
    from modular.parallel.checkpoint import full_model_state, save_checkpoint
    from modular.parallel.expert_parallel import full_experts

    def grow_and_freeze(model, ctx):
        for layer in model.moe_layers:
            torch.manual_seed(5)
            layer.add_bank(layer.new_bank(4))
        lifecycle.freeze(model, ["old_experts", "old_router"])

    result, model, optimizer = _parallel_step(ROUTINGS["topk"], ctx, prepare=grow_and_freeze)
    result["new_bank_slices"] = [layer.banks[1].ep_slice for layer in model.moe_layers]
    result["new_bank_rows"] = [layer.banks[1].w_gate.shape[0] for layer in model.moe_layers]
    # gather-on-save, for the test to load at one process
    save_checkpoint(out / "ckpt", 1, model, optimizer, {"structure": model_structure(model)}, {}, ctx)
    eval_tokens = global_batch(1, seed=9)  # the same batch on every rank, as evaluation gives
    result["eval_logits"] = eval_logits(model, eval_tokens)
    # merge the added experts down to a budget, written for one process, inside full_experts
    with full_experts(model, ctx):
        for layer in model.moe_layers:
            lifecycle.merge_layer(layer, 6, method="frequency", keep_banks=1)
    result["merged_slices"] = [[b.ep_slice for b in layer.banks] for layer in model.moe_layers]
    result["merged_logits"] = eval_logits(model, eval_tokens)
    result["merged_params"] = full_model_state(model, ctx)
    # lifecycle growth by copying the most used experts, again inside full_experts
    with full_experts(model, ctx):
        for layer in model.moe_layers:
            lifecycle.add_experts(layer, 2, init="copy", router_init="copy")
    result["copied_logits"] = eval_logits(model, eval_tokens)
    return result


def scenario_load_single(ctx, out: Path, args: dict) -> dict:
    """Load a one-process checkpoint into EP=2 and evaluate."""
    from modular.parallel.checkpoint import load_model_weights, load_optimizer_state
    from modular.parallel.expert_parallel import parallelize_moe_layers

    cfg, model = build(ROUTINGS["topk"])
    torch.manual_seed(123)  # a different init: the loaded weights must replace it everywhere
    model = build_model(cfg)
    parallelize_moe_layers(model, ctx)
    load_model_weights(model, Path(args["checkpoint"]), ctx)
    optimizer = build_optimizer(model, cfg.train)
    load_optimizer_state(optimizer, model, Path(args["checkpoint"]), ctx)
    moments = {n: optimizer.state[p]["exp_avg"].clone() for n, p in model.named_parameters() if p in optimizer.state}
    return {"eval_logits": eval_logits(model, global_batch(1, seed=9)), "moments": moments,
            "shapes": {n: tuple(p.shape) for n, p in model.named_parameters()}}


def scenario_all(ctx, out: Path, args: dict) -> dict:
    """Several scenarios in one launch (starting two Python processes with torch costs more than running them)."""
    return {name: SCENARIOS[name](ctx, out / name, scenario_args) for name, scenario_args in args.items()}


SCENARIOS = {"equivalence": scenario_equivalence, "layer_uneven": scenario_layer_uneven, "growth": scenario_growth,
             "load_single": scenario_load_single, "all": scenario_all}


def main() -> None:
    scenario, out = sys.argv[1], Path(sys.argv[2])
    args = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
    torch.set_num_threads(1)
    from modular.parallel.mesh import init_parallel

    cfg = compose_config([*BASE, f"parallel.ep={int(os.environ['WORLD_SIZE'])}"])
    ctx = init_parallel(cfg, timeout=timedelta(seconds=120))
    result = SCENARIOS[scenario](ctx, out, args)
    torch.save(result, out / f"rank{ctx.rank}.pt")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
