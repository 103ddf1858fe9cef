"""add_freeze: grow a bank of experts for every new domain, freeze what continual.freeze names, replay."""

from modular.continual import policies
from modular.continual.strategies.base import Strategy, register_strategy


@register_strategy("add_freeze")
class AddFreeze(Strategy):
    def build_pieces(self) -> list[policies.Policy]:
        # the teacher (distillation) is copied before expert growth (and after vocabulary growth): the model as
        # it was before the stage, reading the stage's tokens
        return [policies.VocabularyGrowth(self.cfg), policies.Distillation(self.cfg), policies.Growth(self.cfg),
                policies.Freezing(self.cfg), policies.RouterReview(self.cfg)]

    @classmethod
    def piece_types(cls):
        return [*super().piece_types(), policies.Growth, policies.Freezing]

    def mixture(self, s: int) -> dict[str, float]:
        return policies.replay_mixture(self.c, s)
