"""The shared base of the Avalanche baselines (ewc, lwf, avalanche_replay): one process, Avalanche's knobs."""

from modular.continual import avalanche_adapter as av
from modular.continual.strategies.base import Strategy


class AvalancheStrategy(Strategy):
    """A baseline whose regulariser or memory comes from avalanche-lib (modular/continual/avalanche_adapter.py)."""

    one_process_only = True  # Avalanche's importances, teachers and buffers are written for one process

    @classmethod
    def validate(cls, cfg, world_size: int) -> None:
        super().validate(cfg, world_size)
        av.validate_avalanche(cfg)
