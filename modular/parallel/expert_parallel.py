"""Expert parallelism: each EP rank holds an equal, contiguous slice of every bank's experts, and an MoE
layer's tokens travel to the ranks holding their experts by all-to-all and come back the same way.

A sharded bank keeps its global `num_experts` and its full router rows (`router_weight` [E_b, D]: every
rank routes over all experts); only the stacked expert weights (`expert_param_names`, leading dim E_b)
are cut to E_b/ep rows, marked by `bank.ep_slice = (start, stop)`. Parameters keep their identity
(sharding swaps `.data`), so optimizer state keyed by parameter survives (re)sharding.

Statistics and losses: in training every rank holds its own slice of one global batch, so the
load-balancing loss uses expert counts and mean probabilities over all ranks, routers whose choice
depends on the whole batch (expert choice, Sinkhorn, capacity limits) route over the logits of all
ranks (gathered), and `last_stats` counts the global batch. Evaluation gives every rank the same
batches, so there each rank routes and counts its own (identical) tokens.

Legend: T tokens on this rank, D d_model, E global experts, P EP ranks, L experts held here,
A (token, expert) assignments on this rank, N rows received for this rank's experts.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import Tensor

from modular.errors import ConfigError
from modular.kernels import combine
from modular.models.dispatchers import Dispatcher
from modular.parallel.all_to_all import all_to_all, exchange_counts
from modular.routing import RouterOutput

# -- placing experts ------------------------------------------------------------------------------


def expert_slice(bank) -> tuple[int, int] | None:
    """(start, stop) of the bank's experts held on this rank, or None for an unsharded (full) bank."""
    return getattr(bank, "ep_slice", None)


def _broadcast_module(module: torch.nn.Module, ctx) -> None:
    """Rank 0's parameters and buffers on every rank (new experts may be drawn from per-rank RNG)."""
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src=0, group=ctx.world_group)


def shard_bank(bank, ctx, broadcast: bool = True):
    """Keep this EP rank's share of `bank`'s experts (in place). Rank 0's full bank is the reference."""
    if expert_slice(bank) is not None:
        return bank
    if bank.num_experts % ctx.ep:
        raise ConfigError(
            f"a bank of {bank.num_experts} experts cannot be split evenly over parallel.ep={ctx.ep} ranks; "
            f"add a multiple of {ctx.ep} experts."
        )
    if broadcast:
        _broadcast_module(bank, ctx)
    per_rank = bank.num_experts // ctx.ep
    start = ctx.ep_rank * per_rank
    with torch.no_grad():
        for name in bank.expert_param_names:
            p = getattr(bank, name)
            p.data = p.data[start:start + per_rank].clone()
            p.grad = None
    bank.ep_slice = (start, start + per_rank)
    return bank


def gather_bank(bank, ctx):
    """Make `bank` whole again on every rank (in place): all-gather its expert slices over the EP group."""
    if expert_slice(bank) is None:
        return bank
    with torch.no_grad():
        for name in bank.expert_param_names:
            p = getattr(bank, name)
            p.data = gather_experts(p.data, ctx)
            p.grad = None
    bank.ep_slice = None
    return bank


def gather_experts(local_L: Tensor, ctx) -> Tensor:
    """[E_b/ep, ...] slices of the EP group's ranks → the full [E_b, ...] stack, in rank order."""
    if ctx.ep == 1:
        return local_L
    parts = [torch.empty_like(local_L) for _ in range(ctx.ep)]
    dist.all_gather(parts, local_L.contiguous(), group=ctx.ep_group)
    return torch.cat(parts, dim=0)


def parallelize_moe_layers(model, ctx) -> None:
    """Shard every MoE layer's banks over the EP ranks and place the layer across the ranks.

    Idempotent; banks already sharded stay as they are (a resumed model may mix both).
    """
    for layer in model.moe_layers:
        for bank in layer.banks:
            shard_bank(bank, ctx)
        if layer.placement is None:
            layer.place(ExpertPlacement(ctx))


@contextmanager
def full_experts(model, ctx):
    """Inside, every MoE layer holds all of its experts on every rank and runs as in one process.

    For lifecycle operations written for one process (merging, usage-based growth): on leaving, rank 0's
    banks and router buffers go to every rank and each bank is split over the EP ranks again. Parameters
    of banks that survive keep their identity; the caller rebuilds the optimizer as it would anyway.
    """
    for layer in model.moe_layers:
        for bank in layer.banks:
            gather_bank(bank, ctx)
        layer.place(None)
    yield model
    # Not in a `finally`: after an error on one rank, the others must not wait in these collectives.
    for layer in model.moe_layers:
        with torch.no_grad():
            for buf in layer.router.buffers():
                dist.broadcast(buf.data, src=0, group=ctx.world_group)
    parallelize_moe_layers(model, ctx)


def expert_parameter_names(model) -> dict[str, tuple[int, int, int]]:
    """{qualified parameter name: (start, stop, full expert count)} of every sharded expert weight."""
    found = {}
    for module_name, module in model.named_modules():
        span = expert_slice(module)
        if span is None:
            continue
        for name in module.expert_param_names:
            found[f"{module_name}.{name}"] = (span[0], span[1], module.num_experts)
    return found


# -- the layer's placement: dispatcher and reducer ------------------------------------------------


class ExpertPlacement:
    """Set by `MoELayer.place` under torchrun: where new banks' experts go, the all-to-all dispatcher
    (expert parallelism; data parallelism alone keeps the one-process dispatchers) and the reducer."""

    def __init__(self, ctx):
        self.ctx = ctx
        self.dispatcher = AllToAllDispatcher(ctx) if ctx.ep > 1 else None
        self.reducer = AllReduceReducer(ctx)

    def __deepcopy__(self, memo):  # a copied model (e.g. a distillation teacher) shares the process groups
        return self

    def shard_bank(self, bank):
        return shard_bank(bank, self.ctx)


class AllToAllDispatcher(Dispatcher):
    """Rows travel to the EP ranks holding their experts by all-to-all, are computed there bank by bank
    (each rank holds an equal slice of every bank), and come back the same way."""

    def __init__(self, ctx):
        self.ctx = ctx
        self._placement: dict[tuple[int, ...], tuple[Tensor, list[int]]] = {}

    def _local_placement(self, layer) -> tuple[Tensor, list[int]]:
        """key_E [E]: dest_rank · L + local expert id for every global expert; local bank sizes."""
        sizes = tuple(layer.bank_sizes())
        if sizes not in self._placement:
            P = self.ctx.ep
            local = [s // P for s in sizes]
            L = sum(local)
            keys, first_local = [], 0
            for size, per_rank in zip(sizes, local):
                j = torch.arange(size)
                keys.append((j // per_rank) * L + first_local + j % per_rank)
                first_local += per_rank
            self._placement[sizes] = (torch.cat(keys), local)
        return self._placement[sizes]

    def __call__(self, layer, x_TD: Tensor, routed: RouterOutput) -> Tensor:
        T = x_TD.shape[0]
        P, group = self.ctx.ep, self.ctx.ep_group
        key_E, local_sizes = self._local_placement(layer)
        L = sum(local_sizes)
        key_A = key_E.to(routed.expert_idx.device)[routed.expert_idx]  # dest rank · L + local expert
        order_A = torch.argsort(key_A, stable=True)
        token_sorted_A = routed.token_idx[order_A]
        send_counts = torch.bincount(key_A, minlength=P * L)  # [P·L]
        recv_counts = exchange_counts(send_counts, group)  # [P·L]: rows each source sends each of my experts
        send_splits = send_counts.view(P, L).sum(1).tolist()
        recv_splits = recv_counts.view(P, L).sum(1).tolist()
        x_recv_ND = all_to_all(x_TD[token_sorted_A], recv_splits, send_splits, group)
        # Received rows are grouped by source rank; regroup them by local expert for the grouped GEMM.
        # Stable, so an expert sees rank 0's tokens first, then rank 1's: the single-process order.
        expert_of_row = torch.arange(L, device=x_TD.device).repeat(P).repeat_interleave(recv_counts)
        regroup = torch.argsort(expert_of_row, stable=True)
        counts_L = recv_counts.view(P, L).sum(0)
        y_local_ND = layer.run_experts(x_recv_ND[regroup], counts_L, local_sizes)
        y_local_ND = _keep_in_graph(y_local_ND, x_recv_ND)
        y_recv_ND = y_local_ND[torch.argsort(regroup)]
        y_back_AD = all_to_all(y_recv_ND, send_splits, recv_splits, group)
        return combine(y_back_AD, token_sorted_A, routed.weight[order_A], T)


class AllReduceReducer:
    """Training under torchrun: statistics and balancing losses over the global batch (every rank's slice)."""

    def __init__(self, ctx):
        self.ctx = ctx
        self.world_size = ctx.world_size

    def gather_rows(self, t: Tensor) -> tuple[Tensor, int]:
        """All ranks' rows of `t` in rank order, this rank's rows live (differentiable), the rest detached;
        and the index of this rank's first row."""
        ctx = self.ctx
        sizes_t = torch.tensor([t.shape[0]], dtype=torch.int64, device=t.device)
        all_sizes = [torch.empty_like(sizes_t) for _ in range(ctx.world_size)]
        dist.all_gather(all_sizes, sizes_t, group=ctx.world_group)
        sizes = [int(s) for s in all_sizes]
        longest = max(sizes)
        padded = t.detach().new_zeros((longest,) + tuple(t.shape[1:]))
        padded[: t.shape[0]] = t.detach()
        parts = [torch.empty_like(padded) for _ in range(ctx.world_size)]
        dist.all_gather(parts, padded, group=ctx.world_group)
        rows = [part[:n] for part, n in zip(parts, sizes)]
        rows[ctx.rank] = t
        return torch.cat(rows, dim=0), sum(sizes[: ctx.rank])

    def sum(self, t: Tensor) -> Tensor:
        out = t.clone()
        dist.all_reduce(out, group=self.ctx.world_group)
        return out

    def global_losses(self, layer, pre: RouterOutput, load_E: Tensor) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """(this rank's share of each auxiliary loss, the global-batch values to log).

        DDP averages gradients over the ranks, so each rank's share is scaled for the shares' mean to be
        the global-batch loss. Switch loss E·Σ f_e·P_e: f from the global load, this rank's share of P is
        Σ_its tokens p / T_all, times the world size. Per-token losses (z-loss) are each rank's own mean;
        logged, they are weighted by each rank's tokens."""
        E, W = layer.num_experts, self.world_size
        losses = dict(pre.losses)
        probs_TE = pre.probs
        T = probs_TE.shape[0]
        T_all = self.sum(torch.tensor([float(T)], dtype=torch.float64, device=probs_TE.device))[0]
        if T == 0:  # a mean over no tokens is nan: this rank adds nothing to the per-token losses
            losses.update({n: pre.logits.sum() * 0.0 for n in losses if n != "load_balancing"})
        if "load_balancing" in losses:
            f_E = load_E.to(torch.float64) / load_E.sum().clamp_min(1)
            losses["load_balancing"] = (E * (f_E.to(probs_TE.dtype) * probs_TE.sum(0)).sum()
                                        * (W / T_all.clamp_min(1.0)).to(probs_TE.dtype))
        names = list(losses)
        # Summed over ranks: the balancing shares / W (their mean), the per-token losses × tokens.
        parts = [losses[n].detach().to(torch.float64) * (1.0 / W if n == "load_balancing" else T) for n in names]
        totals = self.sum(torch.stack(parts)) if parts else torch.zeros(0, dtype=torch.float64)
        logged = {n: totals[j] if n == "load_balancing" else totals[j] / T_all.clamp_min(1.0)
                  for j, n in enumerate(names)}
        return losses, logged


def _keep_in_graph(y_ND: Tensor, x_ND: Tensor) -> Tensor:
    """A rank that received no rows gets an output the grouped GEMM built without autograd history.

    The return all-to-all must still be part of the graph there, or that rank would skip its backward
    collective while the others wait in theirs.
    """
    if torch.is_grad_enabled() and x_ND.requires_grad and not y_ND.requires_grad:
        return y_ND + x_ND.sum() * 0.0
    return y_ND
