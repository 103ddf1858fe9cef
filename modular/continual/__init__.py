"""Continual pretraining: stages that add, freeze and merge experts as new domains arrive.

`stream` is the stage loop, `strategies/` the registered strategies and `policies` the pieces they are
composed of, `lifecycle` the expert operations, `domain_inference` the routes of unlabelled text,
`merge` the expert-merging math (shared with the dense export), `report` and `metrics` the account of
a run. `validate_continual` checks everything a stream needs before `modular continual` writes anything.
"""


def validate_continual(cfg, world_size: int = 1) -> None:
    """Every check of a continual run: the group's values and what the stream needs of the other groups and of
    torchrun's `world_size` processes. Imported lazily so `import modular.continual` stays light."""
    from modular.continual.stream import validate_continual as validate_stream

    validate_stream(cfg, world_size)
