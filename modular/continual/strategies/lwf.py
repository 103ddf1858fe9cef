"""lwf: Avalanche's Learning without Forgetting on our model (modular/continual/avalanche_adapter.py).

Every stage after the first adds lwf_alpha · KL(previous model ‖ current model) on temperature-softened
next-token distributions; the previous model is saved to the run folder after each stage.
"""

import copy

from modular.continual import avalanche_adapter as av
from modular.continual.strategies.avalanche_base import AvalancheStrategy
from modular.continual.strategies.base import register_strategy


@register_strategy("lwf")
class LwF(AvalancheStrategy):
    follows_vocabulary_growth = False  # the saved teacher has the previous stage's vocabulary

    def attach(self, run, model, s: int, trainer) -> None:
        super().attach(run, model, s, trainer)
        if s > 0:
            teacher = copy.deepcopy(model).eval()
            av.load_teacher(teacher, av.stage_file(run.run_dir, "lwf", s - 1))
            trainer.loss_hooks.append(av.lwf_hook(teacher, self.c.lwf_alpha, self.c.lwf_temperature, s))

    def after_training(self, run, model, s: int, trainer) -> None:
        super().after_training(run, model, s, trainer)
        av.save_lwf_teacher(run.run_dir, model, s, av.stage_meta(self.c, s))

    def extra_flops(self, s: int, tokens: int, params_before: dict) -> float:
        teacher = float(params_before["flops_per_token"]) * tokens if s > 0 else 0.0  # the previous model's forwards
        return super().extra_flops(s, tokens, params_before) + teacher
