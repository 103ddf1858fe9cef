"""Optimizer state of expert stacks sharded over EP ranks: made whole for lifecycle operations written for
one process, and cut back to each rank's rows once the experts are split again.

Under expert parallelism an expert weight holds rows [start, stop) of its bank, and so do its Adam
moments. An operation that moves moments between experts (a merge carries each survivor's moments to
its new row, `lifecycle.carry_optimizer_state`) needs rows another rank holds. Rather than map rows
through every rank's slice, the moments are gathered like the weights inside `full_experts`, the
one-process code runs unchanged, and `shard_optimizer_state` slices every stack to the rows its
(re-sharded) parameter holds. Parameters keep their identity throughout, so the state stays keyed right.
"""

from __future__ import annotations

import torch

from modular.parallel.expert_parallel import expert_parameter_names, gather_experts


def _spans(model) -> dict[int, tuple[int, int, int]]:
    """id(parameter) -> (start, stop, full expert count) of every sharded expert weight."""
    sharded = expert_parameter_names(model)
    return {id(p): sharded[name] for name, p in model.named_parameters() if name in sharded}


def _parameters(optimizer) -> list[torch.nn.Parameter]:
    """Every parameter of the optimizer, in param-group order (the same on every rank)."""
    return [p for group in optimizer.param_groups for p in group["params"]]


@torch.no_grad()
def gather_optimizer_state(optimizer, model, ctx) -> None:
    """In place: the moments of every sharded expert weight become the whole stack (all-gathered over EP).

    Call it on every rank while the experts are still sharded (before `full_experts` gathers the weights):
    all ranks hold state for the same parameters, so they run the same collectives in the same order.
    """
    spans = _spans(model)
    for p in _parameters(optimizer):
        state = optimizer.state.get(p)
        if id(p) not in spans or not state:
            continue
        for key, value in state.items():
            if torch.is_tensor(value) and value.shape == p.shape:  # moments; not the step count
                state[key] = gather_experts(value, ctx)


@torch.no_grad()
def shard_optimizer_state(optimizer, model) -> None:
    """In place: moments that cover a whole expert stack keep only the rows this rank's parameter holds."""
    spans = _spans(model)
    for p in _parameters(optimizer):
        state = optimizer.state.get(p)
        if id(p) not in spans or not state:
            continue
        start, stop, full = spans[id(p)]
        for key, value in state.items():
            if torch.is_tensor(value) and value.dim() == p.dim() and value.shape[0] == full != p.shape[0]:
                state[key] = value[start:stop].clone()
