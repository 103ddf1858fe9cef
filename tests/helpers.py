"""Shared test helpers: composing small configs in-process."""

from modular.config import compose_config


def tiny_cfg(*overrides: str):
    return compose_config(["model=tiny", *overrides])
