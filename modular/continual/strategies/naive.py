"""naive: train the whole model on each new domain in turn (no growth, no freezing, no replay)."""

from modular.continual.strategies.base import Strategy, register_strategy


@register_strategy("naive")
class Naive(Strategy):
    """The lower bound every strategy must beat: the base class as it is."""
