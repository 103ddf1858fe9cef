"""Expert banks: groups of experts created together, held as stacked weights, plus shared experts.

Expert kinds are chosen by name from `EXPERT_REGISTRY`; users add their own with `@register_expert`.
"""

from modular.experts import gelu, lowrank, swiglu  # noqa: F401  (registration)
from modular.experts.base import EXPERT_REGISTRY, ExpertBank, bank_class_of, build_bank, register_expert
from modular.experts.shared import SharedExperts

__all__ = ["EXPERT_REGISTRY", "ExpertBank", "SharedExperts", "bank_class_of", "build_bank", "register_expert"]
