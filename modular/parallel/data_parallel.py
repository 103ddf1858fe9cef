"""Data parallelism: DDP for the dense parameters, a DP all-reduce for the expert slices, global-norm clipping.

Every rank computes the loss of its own slice of the global batch; gradients are averaged so they
equal the gradient of the global batch's mean loss:
- dense parameters (attention, norms, embeddings, router rows, shared experts, low-rank bases) are
  replicated on all W = dp·ep ranks: torch DDP averages them over the world during backward;
- an expert slice already holds, after the all-to-all backward, the sum over its EP group's losses;
  `reduce_expert_gradients` sums it over the DP replicas of that slice and divides by W.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
from torch import nn

from modular.parallel.expert_parallel import expert_parameter_names


def expert_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The stacked expert weights (sharded over EP, replicated over DP), in model order."""
    names = expert_parameter_names(model)
    return [p for n, p in model.named_parameters() if n in names]


def wrap_data_parallel(model: nn.Module, ctx) -> nn.Module:
    """DDP over the dense parameters (expert weights are left to `reduce_expert_gradients`).

    Rebuild it after the set of trainable parameters changes (freezing, new banks): DDP registers
    them once. Returns the model itself when it has no trainable dense parameter.
    """
    ignored = sorted(expert_parameter_names(model))
    dense_trainable = any(p.requires_grad for n, p in model.named_parameters() if n not in ignored)
    if not dense_trainable:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    DDP._set_params_and_buffers_to_ignore_for_model(model, ignored)
    # Hash routing never back-propagates into the router rows: DDP must not wait for their gradients.
    unused = any(layer.router.uses_token_ids for layer in model.moe_layers)
    with warnings.catch_warnings():
        # Router buffers (selection bias, logit offsets) are updated identically on every rank: no broadcast.
        warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
        return DDP(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
                   broadcast_buffers=False, find_unused_parameters=unused)


def set_grad_sync(forward_model: nn.Module, sync: bool) -> None:
    """Whether the next backward all-reduces DDP's gradients (what `DDP.no_sync()` toggles): with gradient
    accumulation only the last micro-batch's backward does, so the reduction runs once per optimizer step."""
    ddp = getattr(forward_model, "_orig_mod", forward_model)  # under torch.compile
    if hasattr(ddp, "require_backward_grad_sync"):
        ddp.require_backward_grad_sync = sync


@torch.no_grad()
def reduce_expert_gradients(model: nn.Module, ctx) -> None:
    """Average the expert gradients like DDP does the dense ones (see the module docstring).

    An expert weight gets a gradient (zeros where unused) on every rank as soon as any rank's tokens
    reached its bank, as in one process where that bank took part in the forward.
    """
    params = [p for p in expert_parameters(model) if p.requires_grad]
    if not params:
        return
    device = params[0].device
    has_grad = torch.tensor([p.grad is not None for p in params], dtype=torch.int64, device=device)
    dist.all_reduce(has_grad, op=dist.ReduceOp.MAX, group=ctx.world_group)
    grads = []
    for p, flag in zip(params, has_grad.tolist()):
        if flag and p.grad is None:
            p.grad = torch.zeros_like(p)
        if p.grad is not None:
            grads.append(p.grad)
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    if ctx.dp > 1:
        dist.all_reduce(flat, group=ctx.dp_group)
    flat /= ctx.world_size
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


@torch.no_grad()
def clip_grad_norm_(model: nn.Module, max_norm: float, ctx) -> torch.Tensor:
    """Clip by the norm of the whole model's gradient across ranks (torch.nn.utils.clip_grad_norm_'s rule).

    Dense gradients are the same on every rank; expert slices differ across the EP group, so their
    squared norms are summed over it. Every rank gets the same norm and the same clip coefficient.
    """
    experts = {id(p) for p in expert_parameters(model)}
    dense = [p.grad for p in model.parameters() if p.grad is not None and id(p) not in experts]
    expert = [p.grad for p in model.parameters() if p.grad is not None and id(p) in experts]
    device = next(model.parameters()).device
    dense_sq = torch.zeros((), dtype=torch.float64, device=device)
    expert_sq = torch.zeros((), dtype=torch.float64, device=device)
    for g in dense:
        dense_sq += g.double().square().sum()
    for g in expert:
        expert_sq += g.double().square().sum()
    if ctx.ep > 1:
        dist.all_reduce(expert_sq, group=ctx.ep_group)
    total = (dense_sq + expert_sq).sqrt().float()
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for g in dense + expert:
        g.mul_(coef.to(g.dtype))
    return total
