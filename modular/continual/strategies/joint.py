"""joint: every stage trains on the uniform mixture of all stream domains (the upper bound, same budget)."""

from modular.continual import policies
from modular.continual.strategies.base import Strategy, register_strategy


@register_strategy("joint")
class Joint(Strategy):
    def mixture(self, s: int) -> dict[str, float]:
        return policies.all_domains(self.c, s)
