"""The strategy interface and registry: a continual strategy is one class composed of policy pieces.

`@register_strategy("name")` makes a `Strategy` subclass selectable as `continual.strategy=name`. A
strategy says which batches each stage trains on (`mixture`) and lists its pieces (modular/continual/
policies.py: growth, freezing, distillation, review, merging, or its own), whose hooks the stage loop
runs through it. Vocabulary growth, distillation and the router review are in every strategy: they act
when their keys (continual.grow_vocab, continual.distill_weight, continual.review_steps) ask for them.
"""

from __future__ import annotations

from modular.continual import policies
from modular.errors import ConfigError
from modular.registry import registrar

STRATEGY_REGISTRY: dict[str, type[Strategy]] = {}


register_strategy = registrar(STRATEGY_REGISTRY, lambda: Strategy, "continual.strategy", "name")
register_strategy.__doc__ = "Class decorator: make a Strategy subclass selectable as `continual.strategy=<name>`."


class Strategy:
    """Base class: train every stage on its own domain, with the universal pieces (vocabulary growth,
    distillation, review)."""

    name = "strategy"
    one_process_only = False  # its state lives in one process (refused under torchrun)
    routes_by_domain = False  # its model routes rows by domain: evaluated under oracle and inferred routing
    follows_vocabulary_growth = True  # False: it keeps a model of the old vocabulary (grow_vocab is refused)

    def __init__(self, cfg):
        self.cfg = cfg
        self.c = cfg.continual
        self.pieces = self.build_pieces()

    # -- what a subclass says -----------------------------------------------------------------
    def build_pieces(self) -> list[policies.Policy]:
        """The policy pieces, in the order their hooks run (vocabulary growth first: the others see its result)."""
        return [policies.VocabularyGrowth(self.cfg), policies.Distillation(self.cfg), policies.RouterReview(self.cfg)]

    @classmethod
    def piece_types(cls) -> list[type[policies.Policy]]:
        """The piece classes whose checks apply (validation runs before any piece exists)."""
        return [policies.VocabularyGrowth, policies.Distillation, policies.RouterReview]

    @classmethod
    def grows_experts(cls) -> bool:
        """True when its stages add continual.add_experts experts per MoE layer (memory budgets ask)."""
        return any(issubclass(p, (policies.Growth, policies.DomainRoutes)) for p in cls.piece_types())

    def mixture(self, s: int) -> dict[str, float]:
        """Domain weights of stage s's training batches."""
        return policies.new_domain_only(self.c, s)

    @classmethod
    def validate(cls, cfg, world_size: int) -> None:
        """The checks of this strategy and its pieces; one sentence each (ConfigError)."""
        if world_size > 1 and cls.one_process_only:
            allowed = ", ".join(n for n, s in STRATEGY_REGISTRY.items() if not s.one_process_only)
            raise ConfigError(f"continual.strategy={cfg.continual.strategy} runs in one process only, but torchrun "
                              f"started WORLD_SIZE={world_size}; under torchrun use one of: {allowed}.")
        for piece in cls.piece_types():
            piece.validate(cfg, world_size)

    @classmethod
    def check_run(cls, cfg, tokenizer, run_dir) -> None:
        """Checks that need the data (the tokenizer) and the run folder, before anything is written."""
        for piece in cls.piece_types():
            piece.check_run(cfg, tokenizer, run_dir)

    # -- the stage hooks, run through every piece ------------------------------------------------
    def before_stage(self, run, model, s: int) -> None:
        for piece in self.pieces:
            piece.before_stage(run, model, s)

    def grow(self, run, model, s: int) -> dict[int, int] | None:
        """Grow the model for stage s; returns the number of old banks per MoE layer (None: no growth)."""
        old_banks = None
        for piece in self.pieces:
            old_banks = piece.grow(run, model, s) or old_banks
        return old_banks

    def freeze(self, run, model, s: int, old_banks: dict[int, int] | None) -> None:
        for piece in self.pieces:
            piece.freeze(run, model, s, old_banks)

    def attach(self, run, model, s: int, trainer) -> None:
        for piece in self.pieces:
            piece.attach(run, model, s, trainer)

    def after_training(self, run, model, s: int, trainer) -> None:
        for piece in self.pieces:
            piece.after_training(run, model, s, trainer)

    def after_stage(self, run, model, s: int, optimizer, old_banks: dict[int, int] | None):
        """Review, merge…; returns the optimizer the next stage carries state from."""
        for piece in self.pieces:
            optimizer = piece.after_stage(run, model, s, optimizer, old_banks)
        return optimizer

    def old_banks_after(self, model, old_banks: dict[int, int] | None) -> dict[int, int] | None:
        """The old banks per MoE layer once the stage is over (what resuming must freeze again)."""
        return old_banks

    def extra_flops(self, s: int, tokens: int, params_before: dict) -> float:
        return sum(piece.extra_flops(s, tokens, params_before) for piece in self.pieces)

    def extra_tokens(self) -> int:
        return sum(piece.extra_tokens() for piece in self.pieces)

    def extra_steps(self, s: int) -> int:
        return sum(piece.extra_steps(s) for piece in self.pieces)


def strategy_class(name: str) -> type[Strategy]:
    from modular.continual import strategies  # noqa: F401  (registration of the built-in strategies)

    if name not in STRATEGY_REGISTRY:
        raise ConfigError(f"continual.strategy='{name}' is unknown; allowed: {', '.join(STRATEGY_REGISTRY)}.")
    return STRATEGY_REGISTRY[name]
