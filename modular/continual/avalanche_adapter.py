"""Avalanche baselines (EWC, LwF, Replay) applied to our language models through an adapter."""

from __future__ import annotations

import importlib.util

from modular.errors import ConfigError


def require_avalanche(strategy: str) -> None:
    if importlib.util.find_spec("avalanche") is None:
        raise ConfigError(
            f"continual.strategy={strategy} uses avalanche-lib, which is not installed; "
            'install it with: pip install "modular-moe[avalanche]".'
        )


def prepare_stage(run, model, stage: int, trainer) -> None:
    raise NotImplementedError


def finish_stage(run, model, stage: int, trainer) -> None:
    raise NotImplementedError
