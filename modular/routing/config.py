"""The `routing` config group: the router of every MoE layer, its auxiliary losses and the capacity policy.

`validate_routing` checks the group against the registry and the experts of every MoE layer.
"""

# OmegaConf 2.3 reads typing.Optional in structured configs but not `X | None`.
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from modular.errors import require, require_positive_int


@dataclass
class RoutingConfig:
    """The router of every MoE layer, its auxiliary losses and the dispatcher's capacity policy."""

    type: str = "topk"  # a name in modular.routing.ROUTER_REGISTRY
    top_k: int = 2
    score: str = "softmax"  # topk: softmax | sigmoid
    normalize: bool = True  # renormalise the selected weights to sum to 1 (Mixtral)
    bias_balancing: bool = False  # auxiliary-loss-free balancing by a selection-only bias (DeepSeek-V3)
    bias_update_rate: float = 0.001
    capacity_factor: Optional[float] = None  # None = dropless (token choice); required for expert_choice
    drop_policy: str = "probs"  # which assignments an over-full expert keeps: probs | position
    sinkhorn_iters: int = 8
    jitter: float = 0.0  # multiplicative input noise during training (Switch Transformer)
    aux_loss_weight: float = 0.01  # Switch load-balancing loss
    z_loss_weight: float = 0.001  # router z-loss (ST-MoE)


def validate_routing(cfg) -> None:
    from modular.models.config import experts_per_moe_layer, moe_layer_indices
    from modular.routing import ROUTER_REGISTRY

    r = cfg.routing
    require(
        r.type in ROUTER_REGISTRY,
        f"routing.type='{r.type}' is unknown; registered routers are: {', '.join(sorted(ROUTER_REGISTRY))}.",
    )
    require_positive_int(r.top_k, "routing.top_k")
    for i, n_exp in zip(moe_layer_indices(cfg.model), experts_per_moe_layer(cfg)):
        require(
            r.top_k <= n_exp,
            f"routing.top_k={r.top_k} exceeds the {n_exp} experts of layer {i}; top_k must be <= the expert count.",
        )
    require(r.score in ("softmax", "sigmoid"), f"routing.score='{r.score}' is unknown; allowed: softmax, sigmoid.")
    require(
        r.drop_policy in ("probs", "position"),
        f"routing.drop_policy='{r.drop_policy}' is unknown; allowed: probs, position.",
    )
    if r.capacity_factor is not None:
        require(
            r.capacity_factor > 0,
            f"routing.capacity_factor={r.capacity_factor} is not allowed; it must be > 0 (or null for dropless).",
        )
    ROUTER_REGISTRY[r.type].validate_config(r)  # the checks only this router needs
    require_positive_int(r.sinkhorn_iters, "routing.sinkhorn_iters")
    require(0 <= r.jitter < 1, f"routing.jitter={r.jitter} is not allowed; it must be in [0, 1).")
    for key in ("aux_loss_weight", "z_loss_weight", "bias_update_rate"):
        require(r[key] >= 0 and math.isfinite(r[key]), f"routing.{key}={r[key]} is not allowed; it must be >= 0.")
