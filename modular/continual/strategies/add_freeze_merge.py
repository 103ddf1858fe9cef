"""add_freeze_merge: add_freeze, then merge every MoE layer back to continual.merge_budget after each stage."""

from modular.continual import policies
from modular.continual.strategies.add_freeze import AddFreeze
from modular.continual.strategies.base import register_strategy


@register_strategy("add_freeze_merge")
class AddFreezeMerge(AddFreeze):
    def build_pieces(self) -> list[policies.Policy]:
        pieces = super().build_pieces()
        freezing = next(p for p in pieces if isinstance(p, policies.Freezing))
        return [*pieces, policies.Merging(self.cfg, freezing)]  # merged after the review

    @classmethod
    def piece_types(cls):
        return [*super().piece_types(), policies.Merging]

    def old_banks_after(self, model, old_banks):
        return next(p for p in self.pieces if isinstance(p, policies.Merging)).old_banks_after(model)
