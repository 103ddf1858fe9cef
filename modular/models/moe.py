"""The MoE FFN slot: router → dispatcher → expert banks → combine → shared experts → statistics.

This is the one MoE forward, in one process and under expert parallelism alike: where experts live
and how rows reach them is the layer's dispatcher (models/dispatchers.py; all-to-all in
modular.parallel), and what the statistics and batch-wide routing see is its reducer (identity in
one process, all-reduce under torchrun). Banks are concatenated into global expert ids (bank 0's
experts first); the router sees all their rows at once. Auxiliary losses (weighted) and statistics
stay on the device after every forward; reading them (`aux_losses`, `last_stats`) syncs the host.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from modular.experts import ExpertBank, SharedExperts, build_bank
from modular.models.dispatchers import Dispatcher, LocalReducer, local_dispatcher
from modular.routing import ROUTER_REGISTRY, RouterOutput, apply_capacity, build_router, expert_capacity
from modular.routing.context import RoutingContext
from modular.routing.losses import assignment_counts, z_loss
from modular.routing.stats import RoutingStats, routing_stats_vector


class MoELayer(nn.Module):
    def __init__(self, d_model: int, num_experts: int, experts_cfg, routing_cfg, init_std: float = 0.02,
                 backend: str = "torch"):
        super().__init__()
        self.d_model = d_model
        self.experts_cfg = experts_cfg
        self.routing_cfg = routing_cfg
        self.init_std = init_std
        self.top_k = int(routing_cfg.top_k)
        self.banks = nn.ModuleList([build_bank(experts_cfg, d_model, num_experts, init_std)])
        # The expert each one was initialised from (continual growth by copy), for task-arithmetic merges.
        self.expert_parents: list[int | None] = [None] * num_experts
        self.router = build_router(routing_cfg, num_experts)
        self.shared_experts = None
        if experts_cfg.shared_experts > 0:
            shared_dim = experts_cfg.shared_ffn_dim or experts_cfg.ffn_dim
            self.shared_experts = SharedExperts(d_model, shared_dim, experts_cfg.shared_experts)
        self.loss_weights = {"load_balancing": float(routing_cfg.aux_loss_weight),
                             "z_loss": float(routing_cfg.z_loss_weight)}
        capacity_factor = routing_cfg.capacity_factor
        # Token choice with a capacity factor: over-full experts drop assignments (routing/capacity.py).
        self.capacity_factor = (float(capacity_factor)
                                if capacity_factor is not None and not self.router.owns_capacity else None)
        # Where experts live: None in one process; modular.parallel sets an ExpertPlacement under torchrun.
        self.placement = None
        self.reducer = LocalReducer()
        self.backend = backend
        self.dispatcher: Dispatcher = local_dispatcher(backend, self.banks)
        # Domain-owned routing: for each domain id (ModularLM.domains), the global experts its rows may be
        # routed to (a mask before top-k); None = every token may use every expert. Rows without a domain
        # take domain 0's route (the anchor).
        self.domain_access: list[list[int]] | None = None
        self.bank_domains: list[str | None] = [None]  # the domain each bank was added for (None: anchor, shared)
        self._access_tensors: dict[tuple, Tensor] = {}
        self.aux_loss: Tensor | None = None
        self._aux_losses: dict[str, Tensor] = {}
        self._stats: RoutingStats | None = None

    # -- structure ------------------------------------------------------------------------------
    @property
    def num_experts(self) -> int:
        return sum(bank.num_experts for bank in self.banks)

    def bank_sizes(self) -> list[int]:
        return [bank.num_experts for bank in self.banks]

    def router_weight(self) -> Tensor:
        """[E, D]: the router rows of every bank, in global expert order."""
        return torch.cat([bank.router_weight for bank in self.banks], dim=0)

    def set_backend(self, backend: str) -> None:
        """Choose the kernels and, with them, the dispatcher; called again whenever the banks change."""
        self.backend = backend
        for bank in self.banks:
            bank.backend = backend
        if self.placement is not None and self.placement.dispatcher is not None:
            self.dispatcher = self.placement.dispatcher
        else:
            self.dispatcher = local_dispatcher(backend, self.banks)

    def place(self, placement) -> None:
        """Put the layer's experts where `placement` says (modular.parallel), or back in this process (None)."""
        self.placement = placement
        self.reducer = placement.reducer if placement is not None else LocalReducer()
        self.set_backend(self.backend)

    def set_banks(self, banks: list[ExpertBank], owners: list[str | None] | None = None) -> None:
        """Replace the banks (merging, loading a grown structure); the router and parents follow the caller."""
        self.banks = nn.ModuleList(banks)
        self.bank_domains = list(owners) if owners is not None else [None] * len(banks)
        self.set_backend(self.backend)

    def add_bank(self, bank: ExpertBank, domain: str | None = None) -> None:
        """Append a bank of new experts (continual growth), added for `domain`; the router follows the new
        expert count."""
        if self.placement is not None:  # expert parallel: this rank keeps its share of the new experts
            bank = self.placement.shard_bank(bank)
        self.banks.append(bank)
        self.bank_domains = [*self.bank_domains, *[None] * (len(self.banks) - 1 - len(self.bank_domains)), domain]
        self.expert_parents = self.expert_parents + [None] * bank.num_experts
        self.router.resize(self.num_experts)
        self.set_backend(self.backend)

    def new_bank(self, num_experts: int) -> ExpertBank:
        return build_bank(self.experts_cfg, self.d_model, num_experts, self.init_std)

    def stacked_swiglu_weights(self) -> tuple[Tensor, Tensor, Tensor]:
        """(w_gate [E, F, D], w_up [E, F, D], w_down [E, D, F]) over all (plain SwiGLU) banks, global order."""
        weights = [bank.swiglu_parameters() for bank in self.banks]
        if len(weights) == 1:
            return weights[0]
        return tuple(torch.cat([w[j] for w in weights], dim=0) for j in range(3))

    def run_experts(self, x_sorted_ND: Tensor, counts_E: Tensor, bank_sizes: list[int] | None = None) -> Tensor:
        """Rows sorted into per-expert segments (counts_E rows each) through their experts, bank by bank.

        bank_sizes: experts of each bank held here (under expert parallelism a rank holds a slice)."""
        if len(self.banks) == 1:
            return self.banks[0](x_sorted_ND, counts_E)
        counts_per_bank = torch.split(counts_E, bank_sizes or self.bank_sizes())
        rows_per_bank = [int(c.sum()) for c in counts_per_bank]
        x_per_bank = torch.split(x_sorted_ND, rows_per_bank)
        return torch.cat([bank(x, c) for bank, x, c in zip(self.banks, x_per_bank, counts_per_bank)], dim=0)

    # -- compute --------------------------------------------------------------------------------
    def forward(self, x: Tensor, ctx: RoutingContext | Tensor | None = None) -> Tensor:
        """x [..., D] → [..., D]; ctx: the routing context (or bare token ids)."""
        ctx = RoutingContext.of(ctx)
        shape = x.shape
        x_TD = x.reshape(-1, self.d_model)
        # Training under torchrun: every rank holds a slice of one global batch; evaluation gives every
        # rank the same batches, so each routes and counts its own (identical) tokens.
        global_batch = self.training and self.reducer.world_size > 1
        pre, post, load_E = self._route(x_TD, ctx, global_batch)
        if self.training:
            self.router.update_selection(load_E)
        y_TD = self.dispatcher(self, x_TD, post)
        if self.shared_experts is not None:
            y_TD = y_TD + self.shared_experts(x_TD)
        if global_batch:
            losses, logged = self.reducer.global_losses(self, pre, load_E)
        else:
            losses = pre.losses
            logged = {name: value.detach() for name, value in losses.items()}
        self.aux_loss = sum((self.loss_weights.get(name, 0.0) * value for name, value in losses.items()),
                            start=x_TD.new_zeros(()))
        self._aux_losses = logged
        vector = routing_stats_vector(post.probs, post.expert_idx, post.token_idx, post.weight, self.num_experts,
                                      post.dropped_assignments)
        self._stats = RoutingStats(self.reducer.sum(vector) if global_batch else vector, self.num_experts,
                                   self.bank_sizes())
        return y_TD.reshape(shape)

    def _route(self, x_TD: Tensor, ctx: RoutingContext, global_batch: bool
               ) -> tuple[RouterOutput, RouterOutput, Tensor]:
        """(assignments before capacity, after capacity, each expert's load over the global batch)."""
        router, T, E = self.router, x_TD.shape[0], self.num_experts
        ids_T = ctx.flat_token_ids()
        if self.domain_access is not None:
            routed = self._route_by_domain(x_TD, ctx, ids_T)
            load_E = assignment_counts(routed.expert_idx, E)
            return routed, routed, (self.reducer.sum(load_E) if global_batch else load_E)
        logits_TE = router.logits(x_TD, self.router_weight())
        if global_batch and (router.batch_global or self.capacity_factor is not None):
            # The choice depends on the whole batch: route over every rank's logits, keep this rank's rows.
            all_logits, offset = self.reducer.gather_rows(logits_TE)
            all_ids = self.reducer.gather_rows(ids_T)[0] if ids_T is not None and router.uses_token_ids else None
            routed = router.route(all_logits, all_ids)
            load_E = assignment_counts(routed.expert_idx, E)  # already the global batch's
            pre = routed.rows(offset, T)
            if "z_loss" in pre.losses:  # this rank's share: the mean over ranks is the global-batch value
                pre.losses["z_loss"] = z_loss(pre.logits)
            if self.capacity_factor is None:
                return pre, pre, load_E
            capacity = expert_capacity(all_logits.shape[0], E, self.top_k, self.capacity_factor)
            post = apply_capacity(routed, capacity, E, self.routing_cfg.drop_policy).rows(offset, T)
            post.dropped_assignments = pre.expert_idx.numel() - post.expert_idx.numel()
            post.losses = pre.losses
            return pre, post, load_E
        pre = router.route(logits_TE, ids_T)
        load_E = assignment_counts(pre.expert_idx, E)
        if global_batch:
            load_E = self.reducer.sum(load_E)
        post = pre
        if self.capacity_factor is not None:
            capacity = expert_capacity(T, E, self.top_k, self.capacity_factor)
            post = apply_capacity(pre, capacity, E, self.routing_cfg.drop_policy)
        return pre, post, load_E

    def allowed_experts(self, domain: int, device) -> Tensor:
        """[n] the global experts rows of `domain` may be routed to (ascending)."""
        key = (domain, str(device))
        if key not in self._access_tensors:
            if not 0 <= domain < len(self.domain_access):
                raise ValueError(f"domain id {domain} has no route in this layer ({len(self.domain_access)} domains).")
            self._access_tensors[key] = torch.tensor(sorted(self.domain_access[domain]), dtype=torch.int64,
                                                     device=device)
        return self._access_tensors[key]

    def set_domain_access(self, access: list[list[int]] | None) -> None:
        """Which experts each domain may use (see `domain_access`)."""
        self.domain_access = [sorted(int(e) for e in experts) for experts in access] if access is not None else None
        self._access_tensors = {}

    def _route_by_domain(self, x_TD: Tensor, ctx: RoutingContext, ids_T: Tensor | None) -> RouterOutput:
        """Each domain's rows routed by the learned router among the experts the domain may use only.

        Per domain present in the batch: logits over its experts (the router rows and per-expert state of
        those experts alone, so what a domain computes never depends on another domain's experts), top-k,
        expert ids mapped back to global ids. Losses are the token-weighted mean over the domains."""
        router, T, E = self.router, x_TD.shape[0], self.num_experts
        present = ctx.present_domains() or (0,)
        token_domain = ctx.token_domains(T)
        weight_ED = self.router_weight()
        parts, losses = [], {}
        probs_TE = x_TD.new_zeros((T, E), dtype=torch.promote_types(x_TD.dtype, torch.float32))
        logits_TE = x_TD.new_full((T, E), float("-inf"))
        for d in present:
            allowed = self.allowed_experts(d, x_TD.device)
            rows = None if len(present) == 1 else (token_domain == d).nonzero().squeeze(1)
            x_g = x_TD if rows is None else x_TD.index_select(0, rows)
            logits_g = router.logits(x_g, weight_ED.index_select(0, allowed), experts=allowed)
            routed = router.route(logits_g, ids_T if rows is None or ids_T is None else ids_T[rows], experts=allowed)
            token_idx = routed.token_idx if rows is None else rows[routed.token_idx]
            parts.append((token_idx, allowed[routed.expert_idx], routed.weight))
            if rows is None:
                probs_TE = probs_TE.index_copy(1, allowed, routed.probs.to(probs_TE.dtype))
                logits_TE = logits_TE.index_copy(1, allowed, routed.logits.to(logits_TE.dtype))
            else:
                probs_TE[rows.unsqueeze(1), allowed.unsqueeze(0)] = routed.probs.to(probs_TE.dtype)
                logits_TE[rows.unsqueeze(1), allowed.unsqueeze(0)] = routed.logits.to(logits_TE.dtype)
            share = 1.0 if rows is None else rows.numel() / max(T, 1)
            for name, value in routed.losses.items():
                losses[name] = losses.get(name, 0.0) + share * value
        token_idx, expert_idx, weight = (torch.cat([p[j] for p in parts]) for j in range(3))
        return RouterOutput(token_idx=token_idx, expert_idx=expert_idx, weight=weight, probs=probs_TE,
                            logits=logits_TE, losses=losses)

    # -- what the last forward left -------------------------------------------------------------
    @property
    def aux_losses(self) -> dict[str, float]:
        """Unweighted auxiliary losses of the last forward (global batch under torchrun), on the host."""
        return {name: float(value) for name, value in self._aux_losses.items()}

    @property
    def routing_stats(self) -> RoutingStats | None:
        """Statistics of the last forward, still on the device."""
        return self._stats

    @property
    def last_stats(self) -> dict | None:
        """Statistics of the last forward on the host: tokens per expert, entropy, imbalance, drops."""
        return self._stats.as_dict() if self._stats is not None else None

    def extra_repr(self) -> str:
        return f"banks={self.bank_sizes()}, top_k={self.top_k}, router={type(self.router).__name__}"


def router_class(routing_cfg):
    """The registered router class of a routing config (for capability questions before a layer exists)."""
    return ROUTER_REGISTRY[routing_cfg.type]
