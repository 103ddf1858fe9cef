"""Continual pretraining: stages that add, freeze and merge experts as new domains arrive.

`stream` is the stage loop, `strategies/` the registered strategies and `policies` the pieces they are
composed of, `lifecycle` the expert operations, `merge` the expert-merging math (shared with the dense
export), `report` and `metrics` the account of a run.
"""


def validate_continual(cfg, world_size: int = 1) -> None:
    """The checks of the continual group (see modular.continual.stream.validate_continual)."""
    from modular.continual.stream import validate_continual as validate

    validate(cfg, world_size)
