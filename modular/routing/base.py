"""The router interface: logits for every global expert in, a flat list of (token, expert, weight) out.

A flat assignment list covers token choice (k per token) and expert choice (C per expert) alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from modular.errors import ConfigError

ROUTER_REGISTRY: dict[str, type[Router]] = {}
MASKED_LOGIT = -1.0e4  # exp(-1e4) underflows to exactly 0 in fp32 and bf16: an expert never routed to


def register_router(name: str):
    """Class decorator: make a Router subclass selectable as `routing.type=<name>`."""

    def wrap(cls):
        if not issubclass(cls, Router):
            raise TypeError(f"{cls.__name__} must subclass modular.routing.Router to be registered")
        ROUTER_REGISTRY[name] = cls
        cls.registry_name = name
        return cls

    return wrap


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


class Router(nn.Module):
    """Base class. Subclasses implement `route(logits, token_ids)`; the weights live in the expert banks."""

    registry_name = "router"
    uses_token_ids = False  # hash routing needs the input token ids instead of the hidden states

    def __init__(self, cfg, num_experts: int):
        super().__init__()
        self.cfg = cfg
        self.num_experts = num_experts
        self.top_k = int(cfg.top_k)
        self.jitter = float(cfg.jitter)
        # Added to the logits: 0 normally; MASKED_LOGIT for experts that must not be routed to yet
        # (growth that keeps the model's function until a stage starts training the new experts).
        self.register_buffer("logit_offset", torch.zeros(num_experts), persistent=True)

    def resize(self, num_experts: int, keep: Tensor | None = None) -> None:
        """Follow a new expert count: `keep` lists the old experts that survive, in order (default: all
        old experts first, new ones appended); per-expert state of new experts starts at zero."""
        for name, buf in list(self.named_buffers(recurse=False)):
            if buf.ndim == 1 and buf.numel() == self.num_experts:
                old = buf if keep is None else buf[keep]
                new = torch.zeros(num_experts, dtype=buf.dtype, device=buf.device)
                n = min(num_experts, old.numel())
                new[:n] = old[:n]
                setattr(self, name, new)
        self.num_experts = num_experts

    def forward(self, x: Tensor, router_weight: Tensor, token_ids: Tensor | None = None) -> RouterOutput:
        # x: [T, D]; router_weight: [E, D] (the concatenated router rows of every bank)
        if self.training and self.jitter > 0:
            noise = torch.empty_like(x).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
            x = x * noise
        logits = x @ router_weight.t() + self.logit_offset.to(x.dtype)  # [T, E]
        return self.route(logits, token_ids)

    def route(self, logits: Tensor, token_ids: Tensor | None) -> RouterOutput:
        raise NotImplementedError

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
