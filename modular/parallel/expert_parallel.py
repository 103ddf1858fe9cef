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
from modular.kernels import combine, permute
from modular.parallel.all_to_all import all_to_all, exchange_counts
from modular.routing import RouterOutput, apply_capacity, expert_capacity, routing_stats
from modular.routing.losses import z_loss

# Routers whose assignments depend on other tokens of the batch, not on each token alone.
BATCH_GLOBAL_ROUTERS = ("expert_choice", "sinkhorn")


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
    """Shard every MoE layer's banks over the EP ranks and send its forward through `ParallelMoE`.

    Idempotent; banks already sharded stay as they are (a resumed model may mix both).
    """
    for layer in model.moe_layers:
        if layer.parallel is None:
            layer.parallel = ParallelMoE(ctx)
        for bank in layer.banks:
            shard_bank(bank, ctx)


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
        layer.parallel = None
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


# -- the distributed forward ----------------------------------------------------------------------


class ParallelMoE:
    """Set as `MoELayer.parallel`: the layer's forward across ranks, and where its new banks' experts go."""

    def __init__(self, ctx):
        self.ctx = ctx
        self._placement: dict[tuple[int, ...], tuple[Tensor, list[int]]] = {}

    def __deepcopy__(self, memo):  # a copied model (e.g. a distillation teacher) shares the process groups
        return self

    def shard_bank(self, bank):
        return shard_bank(bank, self.ctx)

    def forward(self, layer, x: Tensor, token_ids: Tensor | None) -> Tensor:
        shape = x.shape
        x_TD = x.reshape(-1, layer.d_model)
        T = x_TD.shape[0]
        ids_T = token_ids.reshape(-1) if token_ids is not None else None
        global_batch = layer.training  # training: the ranks' tokens are slices of one global batch
        saved_bias = self._bias(layer)
        pre, post = self._route(layer, x_TD, ids_T, global_batch)
        y_TD = self._dispatch(layer, x_TD, post)
        if layer.shared_experts is not None:
            y_TD = y_TD + layer.shared_experts(x_TD)
        losses, logged, stats = self._losses_and_stats(layer, pre, post, T, global_batch, saved_bias)
        layer.aux_loss = sum((layer.loss_weights.get(name, 0.0) * value for name, value in losses.items()),
                             start=x_TD.new_zeros(()))
        layer.aux_losses = logged
        layer.last_stats = stats
        layer.last_stats["bank_sizes"] = layer.bank_sizes()
        return y_TD.reshape(shape)

    # -- routing --------------------------------------------------------------------------------
    @staticmethod
    def _bias(layer) -> Tensor | None:
        router = layer.router
        if layer.training and getattr(router, "bias_balancing", False):
            return router.expert_bias.detach().clone()
        return None

    def _route(self, layer, x_TD: Tensor, ids_T: Tensor | None, global_batch: bool):
        """(assignments before capacity, after capacity) for this rank's tokens."""
        r = layer.routing_cfg
        E = layer.num_experts
        T = x_TD.shape[0]
        capped = r.capacity_factor is not None and r.type != "expert_choice"
        if global_batch and (r.type in BATCH_GLOBAL_ROUTERS or capped):
            logits_TE = router_logits(layer.router, x_TD, layer.router_weight())
            all_logits, offset = self._gather_rows(logits_TE)
            all_ids = None
            if ids_T is not None and layer.router.uses_token_ids:
                all_ids, _ = self._gather_rows(ids_T)
            routed = layer.router.route(all_logits, all_ids)
            pre = _rows_of(routed, offset, T, 0)
            if "z_loss" in pre.losses:  # this rank's share: the mean over ranks is the global-batch value
                pre.losses["z_loss"] = z_loss(pre.logits)
            if not capped:
                return pre, pre
            capacity = expert_capacity(all_logits.shape[0], E, layer.top_k, float(r.capacity_factor))
            kept = apply_capacity(routed, capacity, E, r.drop_policy)
            post = _rows_of(kept, offset, T, 0)
            post.dropped_assignments = pre.expert_idx.numel() - post.expert_idx.numel()
            post.losses = pre.losses
            return pre, post
        pre = layer.router(x_TD, layer.router_weight(), ids_T)
        post = pre
        if capped:  # evaluation: every rank has the whole (same) batch
            post = apply_capacity(pre, expert_capacity(T, E, layer.top_k, float(r.capacity_factor)), E,
                                  r.drop_policy)
        return pre, post

    def _gather_rows(self, t: Tensor) -> tuple[Tensor, int]:
        """All ranks' rows of `t` in rank order, this rank's rows live (differentiable), the rest detached."""
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

    # -- dispatch -------------------------------------------------------------------------------
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
        key_E, local = self._placement[sizes]
        return key_E, local

    def _dispatch(self, layer, x_TD: Tensor, routed: RouterOutput) -> Tensor:
        T = x_TD.shape[0]
        E = layer.num_experts
        if self.ctx.ep == 1:  # data parallel only: every rank holds every expert
            x_sorted, token_sorted, order, counts = permute(x_TD, routed.token_idx, routed.expert_idx, E)
            y_sorted = layer._run_banks(x_sorted, counts)
            return combine(y_sorted, token_sorted, routed.weight[order], T)
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
        y_local_ND = _run_local_banks(layer, x_recv_ND[regroup], counts_L, local_sizes)
        y_local_ND = _keep_in_graph(y_local_ND, x_recv_ND)
        y_recv_ND = y_local_ND[torch.argsort(regroup)]
        y_back_AD = all_to_all(y_recv_ND, send_splits, recv_splits, group)
        return combine(y_back_AD, token_sorted_A, routed.weight[order_A], T)

    # -- losses and statistics ------------------------------------------------------------------
    def _losses_and_stats(self, layer, pre: RouterOutput, post: RouterOutput, T: int, global_batch: bool,
                          saved_bias: Tensor | None):
        E = layer.num_experts
        losses = dict(pre.losses)
        if not global_batch:
            stats = routing_stats(post.probs, post.expert_idx, post.token_idx, E, post.dropped_assignments)
            return losses, {n: float(v.detach()) for n, v in losses.items()}, stats
        ctx = self.ctx
        W = ctx.world_size
        probs_TE = pre.probs
        others = [n for n in losses if n != "load_balancing"]
        if T == 0:  # a mean over no tokens is nan: this rank adds nothing to the per-token losses
            losses.update({n: pre.logits.sum() * 0.0 for n in others})
        with torch.no_grad():
            p = probs_TE.float().clamp_min(1e-12)
            p = p / p.sum(dim=-1, keepdim=True)
            entropy_sum = -(p * p.log()).sum()
            routed_tokens = torch.zeros(T, dtype=torch.bool, device=probs_TE.device)
            routed_tokens[post.token_idx] = True
            scalars = torch.stack([torch.tensor(float(T)), torch.tensor(float(post.dropped_assignments)),
                                   entropy_sum.cpu().double(), routed_tokens.sum().cpu().double()]
                                  + [losses[n].detach().cpu().double() * T for n in others])
            vec = torch.cat([torch.bincount(pre.expert_idx, minlength=E).double(),
                             torch.bincount(post.expert_idx, minlength=E).double(),
                             probs_TE.detach().double().sum(0), scalars.to(probs_TE.device)])
            dist.all_reduce(vec, group=ctx.world_group)
            pre_counts, post_counts, probs_sum = vec[:E], vec[E:2 * E], vec[2 * E:3 * E]
            T_all, dropped, entropy_all, routed_all = (float(v) for v in vec[3 * E:3 * E + 4])
            other_sums = vec[3 * E + 4:]
        logged = {}
        if "load_balancing" in losses:
            # Switch loss E·Σ f_e·P_e over the global batch, split so that the ranks' mean is that loss:
            # f from global counts; this rank's share of P is Σ_its tokens p / T_all, times W.
            f_E = pre_counts / pre_counts.sum().clamp_min(1)
            losses["load_balancing"] = E * (f_E.to(probs_TE.dtype) * probs_TE.sum(0)).sum() * (W / max(T_all, 1.0))
            logged["load_balancing"] = float(E * (f_E * probs_sum).sum() / max(T_all, 1.0))
        for name, total in zip(others, other_sums.tolist()):  # per-token means, weighted by each rank's tokens
            logged[name] = total / max(T_all, 1.0)
        logged = {name: logged[name] for name in pre.losses}  # the router's order
        if saved_bias is not None and layer.router.expert_bias.shape == saved_bias.shape:
            self._global_bias_update(layer.router, saved_bias, pre_counts)
        tokens_per_expert = post_counts.round().to(torch.int64).cpu()
        mean_load = tokens_per_expert.float().mean().clamp_min(1e-12)
        stats = {
            "tokens_per_expert": tokens_per_expert,
            "entropy": entropy_all / max(T_all, 1.0),
            "max_imbalance": float(tokens_per_expert.max().float() / mean_load),
            "dropped_assignments": round(dropped),
            "dropped_tokens": round(T_all - routed_all),
            "num_tokens": round(T_all),
        }
        return losses, logged, stats

    @staticmethod
    @torch.no_grad()
    def _global_bias_update(router, saved_bias: Tensor, global_load_E: Tensor) -> None:
        """Redo the selection-bias step of DeepSeek-V3 balancing with the global batch's load.

        Routers that took their decision over gathered logits already saw the global load: their update
        stands (it differs from the saved bias only by that step)."""
        if router.cfg.type in BATCH_GLOBAL_ROUTERS or router.cfg.capacity_factor is not None:
            return
        load = global_load_E.to(saved_bias.dtype)
        router.expert_bias.copy_(saved_bias + router.bias_update_rate * torch.sign(load.mean() - load))


def router_logits(router, x_TD: Tensor, router_weight_ED: Tensor) -> Tensor:
    """The logits `Router.forward` computes before `route` (jitter, then x·Wᵀ plus any logit offset)."""
    if router.training and router.jitter > 0:
        noise = torch.empty_like(x_TD).uniform_(1.0 - router.jitter, 1.0 + router.jitter)
        x_TD = x_TD * noise
    logits_TE = x_TD @ router_weight_ED.t()
    offset = getattr(router, "logit_offset", None)
    if offset is not None:
        logits_TE = logits_TE + offset.to(x_TD.dtype)
    return logits_TE


def _rows_of(routed: RouterOutput, offset: int, T: int, dropped: int) -> RouterOutput:
    """The assignments of tokens [offset, offset + T) of a routing over all ranks' tokens, re-indexed."""
    keep = (routed.token_idx >= offset) & (routed.token_idx < offset + T)
    return RouterOutput(token_idx=routed.token_idx[keep] - offset, expert_idx=routed.expert_idx[keep],
                        weight=routed.weight[keep], probs=routed.probs[offset:offset + T],
                        logits=routed.logits[offset:offset + T], losses=dict(routed.losses),
                        dropped_assignments=dropped)


def _run_local_banks(layer, x_sorted_ND: Tensor, counts_L: Tensor, local_sizes: list[int]) -> Tensor:
    if len(layer.banks) == 1:
        return layer.banks[0](x_sorted_ND, counts_L)
    counts_per_bank = torch.split(counts_L, local_sizes)
    rows_per_bank = [int(c.sum()) for c in counts_per_bank]
    x_per_bank = torch.split(x_sorted_ND, rows_per_bank)
    return torch.cat([bank(x, c) for bank, x, c in zip(layer.banks, x_per_bank, counts_per_bank)], dim=0)


def _keep_in_graph(y_ND: Tensor, x_ND: Tensor) -> Tensor:
    """A rank that received no rows gets an output the grouped GEMM built without autograd history.

    The return all-to-all must still be part of the graph there, or that rank would skip its backward
    collective while the others wait in theirs.
    """
    if torch.is_grad_enabled() and x_ND.requires_grad and not y_ND.requires_grad:
        return y_ND + x_ND.sum() * 0.0
    return y_ND
