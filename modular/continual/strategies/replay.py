"""replay: train the whole model on each new domain with continual.replay of each batch from earlier ones."""

from modular.continual import policies
from modular.continual.strategies.base import Strategy, register_strategy


@register_strategy("replay")
class Replay(Strategy):
    def mixture(self, s: int) -> dict[str, float]:
        return policies.replay_mixture(self.c, s)
