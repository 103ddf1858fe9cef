"""The router interface: logits for every global expert in, a flat list of (token, expert, weight) out.

A flat assignment list covers token choice (k per token) and expert choice (C per expert) alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from modular.errors import ConfigError
from modular.registry import registrar

ROUTER_REGISTRY: dict[str, type[Router]] = {}
MASKED_LOGIT = -1.0e4  # exp(-1e4) underflows to exactly 0 in fp32 and bf16: an expert never routed to


register_router = registrar(ROUTER_REGISTRY, lambda: Router, "routing.type")
register_router.__doc__ = "Class decorator: make a Router subclass selectable as `routing.type=<name>`."


@dataclass
class RouterOutput:
    """Assignments A of tokens to global experts. Legend: T tokens, E experts, A assignments."""

    token_idx: Tensor  # [A] int64: the token of each assignment
    expert_idx: Tensor  # [A] int64: its global expert id
    weight: Tensor  # [A] float: combine weight (differentiable w.r.t. the router)
    probs: Tensor  # [T, E] the router's score distribution (for the balancing loss and entropy)
    logits: Tensor  # [T, E]
    losses: dict[str, Tensor] = field(default_factory=dict)  # unweighted auxiliary losses
    dropped_assignments: int = 0

    def rows(self, offset: int, num_tokens: int) -> RouterOutput:
        """The assignments of tokens [offset, offset + num_tokens), re-indexed from 0 (a rank's share of a
        routing over every rank's tokens); the whole output when it covers exactly those tokens."""
        if offset == 0 and self.probs.shape[0] == num_tokens:
            return RouterOutput(self.token_idx, self.expert_idx, self.weight, self.probs, self.logits,
                                dict(self.losses), self.dropped_assignments)
        keep = (self.token_idx >= offset) & (self.token_idx < offset + num_tokens)
        return RouterOutput(token_idx=self.token_idx[keep] - offset, expert_idx=self.expert_idx[keep],
                            weight=self.weight[keep], probs=self.probs[offset:offset + num_tokens],
                            logits=self.logits[offset:offset + num_tokens], losses=dict(self.losses))


class Router(nn.Module):
    """Base class. Subclasses implement `route(logits, token_ids)`; the weights live in the expert banks.

    Capabilities: what callers (the MoE forward, expert parallelism, export, upcycling, summaries) may
    ask of a router instead of testing its name. Class attributes and classmethods of the config, so
    they can be asked before a router exists.
    """

    registry_name = "router"
    uses_token_ids = False  # hash routing needs the input token ids instead of the hidden states
    owns_capacity = False  # the router itself fixes how many tokens each expert takes (expert choice)
    routes_by_logits = True  # its choice follows the logits (so a masked logit offset keeps an expert unused)
    # route(logits, token_ids, experts=ids) chooses among a subset of the experts (domain-owned routing)
    supports_expert_subsets = False
    # Buffers with one entry per global expert: growth appends entries (zero), merges keep survivors'.
    per_expert_buffers: tuple[str, ...] = ("logit_offset",)

    def __init__(self, cfg, num_experts: int):
        super().__init__()
        self.cfg = cfg
        self.num_experts = num_experts
        self.top_k = int(cfg.top_k)
        self.jitter = float(cfg.jitter)
        # Added to the logits: 0 normally; MASKED_LOGIT for experts that must not be routed to yet
        # (growth that keeps the model's function until a stage starts training the new experts).
        self.register_buffer("logit_offset", torch.zeros(num_experts), persistent=True)

    # -- capabilities -------------------------------------------------------------------------
    @classmethod
    def chooses_over_batch(cls, cfg, training: bool) -> bool:
        """True when a token's experts depend on the other tokens of the batch (not only on itself)."""
        return False

    @property
    def batch_global(self) -> bool:
        return self.chooses_over_batch(self.cfg, self.training)

    @classmethod
    def experts_per_token(cls, cfg, num_experts: int) -> float:
        """Routed experts per token on average (k for token choice)."""
        return float(min(int(cfg.top_k), num_experts))

    @classmethod
    def weights_sum_to_one(cls, cfg) -> bool:
        """True when every routed token's combine weights sum to exactly 1 by construction."""
        return False

    @classmethod
    def weight_at_zero_logits(cls, cfg, num_experts: int) -> float:
        """The combine weight of each selected expert when every logit is 0, before any renormalisation."""
        return 1.0 / num_experts

    @classmethod
    def routes_every_token(cls, cfg) -> bool:
        """True when every token reaches its experts (token choice); False when a token may get none."""
        return True

    @classmethod
    def softmax_top_k_misfits(cls, cfg) -> list[str]:
        """Why this router's choice is not a plain softmax top-k (what Mixtral and Qwen2-MoE compute); [] if it is."""
        return [f"routing.type={cfg.type}"]

    @classmethod
    def validate_config(cls, cfg) -> None:
        """Checks of routing.* that only this router needs; raise ConfigError with one sentence."""

    # -- compute ------------------------------------------------------------------------------
    def logits(self, x: Tensor, router_weight: Tensor, experts: Tensor | None = None) -> Tensor:
        """[T, E] logits: jitter (training), then x·Wᵀ plus the logit offsets. `experts`: the global ids of
        router_weight's rows when it holds a subset of the experts."""
        if self.training and self.jitter > 0:
            noise = torch.empty_like(x).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
            x = x * noise
        offset = self.logit_offset if experts is None else self.logit_offset[experts]
        return x @ router_weight.t() + offset.to(x.dtype)  # [T, E]

    def forward(self, x: Tensor, router_weight: Tensor, token_ids: Tensor | None = None) -> RouterOutput:
        # x: [T, D]; router_weight: [E, D] (the concatenated router rows of every bank)
        return self.route(self.logits(x, router_weight), token_ids)

    def route(self, logits: Tensor, token_ids: Tensor | None) -> RouterOutput:
        raise NotImplementedError

    def update_selection(self, load_E: Tensor) -> None:
        """After a training forward: the number of assignments each expert got over the (global) batch."""

    def resize(self, num_experts: int, keep: Tensor | None = None) -> None:
        """Follow a new expert count: `keep` lists the old experts that survive, in order (default: all
        old experts first, new ones appended); per-expert state of new experts starts at zero."""
        for name in self.per_expert_buffers:
            buf = getattr(self, name)
            old = buf if keep is None else buf[keep]
            new = torch.zeros(num_experts, dtype=buf.dtype, device=buf.device)
            n = min(num_experts, old.numel())
            new[:n] = old[:n]
            setattr(self, name, new)
        self.num_experts = num_experts

    def reset_experts(self, experts: Tensor) -> None:
        """Per-expert state of `experts` (a bool mask or indices) back to zero: merged experts start fresh."""
        for name in self.per_expert_buffers:
            getattr(self, name)[experts] = 0.0

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, top_k={self.top_k}"


def build_router(cfg, num_experts: int) -> Router:
    if cfg.type not in ROUTER_REGISTRY:
        raise ConfigError(
            f"routing.type='{cfg.type}' is unknown; registered routers are: {', '.join(sorted(ROUTER_REGISTRY))}."
        )
    return ROUTER_REGISTRY[cfg.type](cfg, num_experts)


def flat_token_choice(expert_idx_TK: Tensor, weight_TK: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Flatten [T, k] choices into assignment lists ordered by token, then slot."""
    T, k = expert_idx_TK.shape
    token_idx = torch.arange(T, device=expert_idx_TK.device).repeat_interleave(k)
    return token_idx, expert_idx_TK.reshape(-1), weight_TK.reshape(-1)
