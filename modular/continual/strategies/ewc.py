"""ewc: Avalanche's Elastic Weight Consolidation on our model (modular/continual/avalanche_adapter.py).

After each stage the diagonal Fisher of the token cross-entropy and a snapshot of the weights are saved
to the run folder; every later stage adds ewc_lambda/2 · Σ F (θ − θ*)² for each earlier stage.
"""

from modular.continual import avalanche_adapter as av
from modular.continual.strategies.avalanche_base import AvalancheStrategy
from modular.continual.strategies.base import register_strategy


@register_strategy("ewc")
class EWC(AvalancheStrategy):
    def attach(self, run, model, s: int, trainer) -> None:
        super().attach(run, model, s, trainer)
        if s > 0:
            stages = [av.load_ewc_state(av.stage_file(run.run_dir, "ewc", k), model, trainer.device) for k in range(s)]
            trainer.loss_hooks.append(av.ewc_hook(model, stages, self.c.ewc_lambda, trainer.device))

    def after_training(self, run, model, s: int, trainer) -> None:
        super().after_training(run, model, s, trainer)
        windows = av.stage_windows(trainer.loader, av.FISHER_BATCHES)
        importances, params = av.compute_ewc_state(model, windows, trainer.tcfg.batch_size, trainer.device,
                                                   trainer.optimizer, s)
        av.save_ewc_state(av.stage_file(run.run_dir, "ewc", s), importances, params, av.stage_meta(self.c, s))
