"""Continual strategies: one registered class each, composed of the policy pieces in ../policies.py.

A user's own strategy is one class (`@register_strategy("mine")` on a `Strategy` subclass, imported
before the run starts) and one YAML preset (`configs/continual/mine.yaml` with `strategy: mine`).
"""

from modular.continual.strategies import (  # noqa: F401  (registration)
    add_freeze,
    add_freeze_merge,
    avalanche_replay,
    ewc,
    isolate,
    joint,
    lwf,
    naive,
    replay,
)
from modular.continual.strategies.base import STRATEGY_REGISTRY, Strategy, register_strategy, strategy_class

__all__ = ["STRATEGY_REGISTRY", "Strategy", "register_strategy", "strategy_class"]
