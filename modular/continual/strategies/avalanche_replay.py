"""avalanche_replay: Avalanche's experience replay on our model (modular/continual/avalanche_adapter.py).

After each stage reservoir sampling keeps training windows in a buffer split equally over the stages
seen; later stages replace a share of every batch's rows (continual.replay, default half) with windows
drawn from it, so the batch size stays the same.
"""

from modular.continual import avalanche_adapter as av
from modular.continual.strategies.avalanche_base import AvalancheStrategy
from modular.continual.strategies.base import register_strategy


@register_strategy("avalanche_replay")
class AvalancheReplay(AvalancheStrategy):
    def attach(self, run, model, s: int, trainer) -> None:
        super().attach(run, model, s, trainer)
        if s > 0:
            av.attach_replay_loader(run.run_dir, self.cfg, s, trainer)

    def after_training(self, run, model, s: int, trainer) -> None:
        super().after_training(run, model, s, trainer)
        av.update_stage_buffer(run.run_dir, self.cfg, s, trainer)
