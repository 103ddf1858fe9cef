"""Routers: which experts each token goes to, with what weight, plus auxiliary losses and statistics.

Routers are chosen by name from `ROUTER_REGISTRY`; users add their own with `@register_router("name")`.
"""

from modular.routing import expert_choice, hash_router, sinkhorn, topk  # noqa: F401  (registration)
from modular.routing.base import ROUTER_REGISTRY, Router, RouterOutput, build_router, register_router
from modular.routing.capacity import apply_capacity, expert_capacity
from modular.routing.context import RoutingContext
from modular.routing.losses import load_balancing_loss, z_loss
from modular.routing.stats import RoutingStats

__all__ = [
    "ROUTER_REGISTRY",
    "Router",
    "RouterOutput",
    "RoutingContext",
    "RoutingStats",
    "apply_capacity",
    "build_router",
    "expert_capacity",
    "load_balancing_loss",
    "register_router",
    "z_loss",
]
