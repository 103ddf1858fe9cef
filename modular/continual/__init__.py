"""Continual pretraining: stages that add, freeze and merge experts as new domains arrive.

`merge` holds the expert-merging math (shared with the dense export). `validate_continual` checks
everything a stream needs before `modular continual` writes anything.
"""


def validate_continual(cfg, world_size: int = 1) -> None:
    """Every check of a continual run: the group's values and what the stream needs of the other groups and of
    torchrun's `world_size` processes. Imported lazily so `import modular.continual` stays light."""
    from modular.continual.stream import validate_continual as validate_stream

    validate_stream(cfg, world_size)
