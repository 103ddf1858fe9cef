"""The expert-bank interface and registry.

A bank holds E_b experts as stacked weights with a leading expert dimension, and its E_b rows of the
router. It computes all its experts at once on tokens already sorted into per-expert segments.
Legend: E experts in the bank, D model width, F expert hidden width, N routed rows.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from modular.errors import ConfigError
from modular.registry import registrar

EXPERT_REGISTRY: dict[str, type[ExpertBank]] = {}


register_expert = registrar(EXPERT_REGISTRY, lambda: ExpertBank, "experts.type")
register_expert.__doc__ = "Class decorator: make an ExpertBank subclass selectable as `experts.type=<name>`."


class ExpertBank(nn.Module):
    """Base class. Subclasses define their stacked weights in `__init__` and `forward(x_sorted, counts)`.

    `expert_param_names` lists parameters whose leading dimension is the expert dimension: growth,
    merging and expert parallelism slice and concatenate exactly these (plus `router_weight`).
    """

    registry_name = "bank"
    expert_param_names: tuple[str, ...] = ()

    def __init__(self, d_model: int, ffn_dim: int, num_experts: int, init_std: float = 0.02):
        super().__init__()
        self.d_model = d_model
        self.ffn_dim = ffn_dim
        self.num_experts = num_experts
        self.init_std = init_std
        self.backend = "torch"  # set by the MoE layer from kernels.backend
        self.router_weight = nn.Parameter(torch.empty(num_experts, d_model))  # [E, D]: this bank's router rows

    @classmethod
    def from_config(cls, d_model: int, num_experts: int, cfg, init_std: float) -> ExpertBank:
        return cls(d_model, cfg.ffn_dim, num_experts, init_std)

    def reset_parameters(self) -> None:
        for p in self.parameters():
            nn.init.normal_(p, mean=0.0, std=self.init_std)

    def forward(self, x_sorted_ND: Tensor, counts_E: Tensor) -> Tensor:
        raise NotImplementedError

    # -- capabilities: how a bank's experts can be expressed elsewhere (export, merging, kernels) --------
    @classmethod
    def state_names(cls) -> set[str]:
        """The names of a bank's saved tensors that identify its type (expert stacks and router rows)."""
        return set(cls.expert_param_names) | {"router_weight"}

    @classmethod
    def expressible_as_swiglu(cls) -> bool:
        """True when every expert is exactly a dense SwiGLU FFN (what HF Llama/Mixtral/Qwen2-MoE hold)."""
        return False

    @classmethod
    def swiglu_from_state(cls, tensors: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """(gate [E, F, D], up [E, F, D], down [E, D, F]) of a saved bank's tensors (names without prefix)."""
        raise NotImplementedError(f"{cls.__name__} experts are not SwiGLU FFNs")

    @classmethod
    def base_swiglu_from_state(cls, tensors: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor] | None:
        """The shared dense FFN the bank's experts are deltas on (the natural task-vector base), or None."""
        return None

    @classmethod
    def parameter_counts(cls, experts_cfg, d_model: int) -> tuple[int, int]:
        """(parameters of one expert, parameters a bank shares besides its router rows) for these sizes,
        counted on a bank built on the meta device (nothing is allocated)."""
        with torch.device("meta"):
            bank = cls.from_config(d_model, 1, experts_cfg, 0.02)
        return bank.params_per_expert(), bank.shared_params()

    @classmethod
    def validate_config(cls, experts_cfg, d_model: int) -> None:
        """Checks of experts.* that only this expert type needs; raise ConfigError with one sentence."""

    def expert_rows(self, index: int) -> dict[str, Tensor]:
        """The rows of every expert stack that belong to expert `index` of this bank (plus its router row)."""
        return {name: getattr(self, name)[index] for name in (*self.expert_param_names, "router_weight")}

    def swiglu_parameters(self) -> tuple[nn.Parameter, nn.Parameter, nn.Parameter] | None:
        """(w_gate [E, F, D], w_up [E, F, D], w_down [E, D, F]) when this bank computes exactly a stack of
        plain SwiGLU experts from these parameters (the fused kernels can then run it), else None."""
        return None

    def params_per_expert(self) -> int:
        """Parameters one token's pass through one expert touches (for active-parameter counts)."""
        return sum(getattr(self, n)[0].numel() for n in self.expert_param_names)

    def shared_params(self) -> int:
        """Parameters every routed token touches once, whichever expert of the bank (e.g. a low-rank base)."""
        names = set(self.expert_param_names) | {"router_weight"}
        return sum(p.numel() for n, p in self.named_parameters(recurse=False) if n not in names)

    def matmul_flops_per_token(self) -> int:
        """Forward FLOPs (2 per multiply-add) of one token through one expert, shared parts included."""
        return 2 * (self.params_per_expert() + self.shared_params())

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, d_model={self.d_model}, ffn_dim={self.ffn_dim}"


def bank_class_of(names: set[str]) -> type[ExpertBank] | None:
    """The registered bank type whose saved tensors these names are (the most specific match), or None."""
    matches = [cls for cls in EXPERT_REGISTRY.values() if cls.state_names() <= names]
    return max(matches, key=lambda cls: len(cls.state_names()), default=None)


def build_bank(cfg, d_model: int, num_experts: int, init_std: float) -> ExpertBank:
    if cfg.type not in EXPERT_REGISTRY:
        raise ConfigError(
            f"experts.type='{cfg.type}' is unknown; registered expert types are: {', '.join(sorted(EXPERT_REGISTRY))}."
        )
    bank = EXPERT_REGISTRY[cfg.type].from_config(d_model, num_experts, cfg, init_std)
    bank.reset_parameters()
    return bank
