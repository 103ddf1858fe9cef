"""isolate: domain-owned experts and trunk adapters, routed per sequence — no forgetting by construction.

After the first stage the shared trunk and everything an earlier domain computes with is frozen. Each
new domain gets a bank of its own (its rows are routed by the learned top-k router among the anchor's
experts and its own only) and zero-initialised low-rank deltas on the trunk (continual.adapter_*),
applied to its rows only; training batches carry each row's domain. Unlabelled text is routed by a
per-sequence domain posterior (continual.inference: a hashed n-gram classifier trained after every
stage, or the prefix likelihood under each route), with the anchor route as the fallback.
"""

from modular.continual import policies
from modular.continual.strategies.base import Strategy, register_strategy


@register_strategy("isolate")
class Isolate(Strategy):
    routes_by_domain = True  # the stage loop evaluates it under oracle and inferred routing

    def build_pieces(self) -> list[policies.Policy]:
        return [policies.Distillation(self.cfg), policies.DomainRoutes(self.cfg), policies.TrunkAdapters(self.cfg),
                policies.DomainFreezing(self.cfg), policies.RouterReview(self.cfg),
                policies.ClassifierTraining(self.cfg)]

    @classmethod
    def piece_types(cls):
        return [*super().piece_types(), policies.DomainRoutes, policies.TrunkAdapters]

    def mixture(self, s: int):
        # earlier domains' rows would only pass through frozen parameters: replay buys nothing here
        # unless asked for (continual.replay)
        return policies.replay_mixture(self.c, s)
