"""The `experts` config group: the kind, count and size of every MoE layer's experts, and shared experts.

`validate_experts` checks the group against the registry and the model.
"""

# OmegaConf 2.3 reads typing.Optional / typing.List in structured configs but not `X | None` or `list[...]`.
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

from modular.errors import require, require_positive_int


@dataclass
class ExpertsConfig:
    """The experts of every MoE layer: their kind, count and size, and the always-on shared experts."""

    type: str = "swiglu"  # a name in modular.experts.EXPERT_REGISTRY
    num_experts: int = 8
    ffn_dim: int = 256  # hidden size of one expert
    # Per-MoE-layer expert counts (one entry per MoE layer, in layer order); None = num_experts everywhere.
    num_experts_per_layer: Optional[List[int]] = None
    rank: int = 16  # low-rank experts: rank of each expert's delta on the shared base FFN
    shared_experts: int = 0  # always-on experts added to every token's output (DeepSeek-MoE)
    shared_ffn_dim: Optional[int] = None  # hidden size of one shared expert; None = ffn_dim


def validate_experts(cfg) -> None:
    from modular.experts import EXPERT_REGISTRY
    from modular.models.config import moe_layer_indices

    m, e = cfg.model, cfg.experts
    moe = moe_layer_indices(m)
    require(
        e.type in EXPERT_REGISTRY,
        f"experts.type='{e.type}' is unknown; registered expert types are: {', '.join(sorted(EXPERT_REGISTRY))}.",
    )
    require(
        isinstance(e.num_experts, int) and e.num_experts >= 1,
        f"experts.num_experts={e.num_experts} is not allowed; a layer needs at least 1 expert.",
    )
    require_positive_int(e.ffn_dim, "experts.ffn_dim")
    require(
        isinstance(e.shared_experts, int) and e.shared_experts >= 0,
        f"experts.shared_experts={e.shared_experts} is not allowed; it must be an integer >= 0.",
    )
    if e.shared_ffn_dim is not None:
        require_positive_int(e.shared_ffn_dim, "experts.shared_ffn_dim")
    EXPERT_REGISTRY[e.type].validate_config(e, m.d_model)  # the checks only this expert type needs
    if e.num_experts_per_layer is not None:
        counts = list(e.num_experts_per_layer)
        require(
            len(counts) == len(moe),
            f"experts.num_experts_per_layer has {len(counts)} entries but the model has {len(moe)} MoE layers "
            f"({moe}); give one expert count per MoE layer.",
        )
        for c in counts:
            require(
                isinstance(c, int) and c >= 1,
                f"experts.num_experts_per_layer contains {c}; every MoE layer needs at least 1 expert.",
            )
