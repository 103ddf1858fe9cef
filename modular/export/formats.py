"""Export formats: what `modular export export.format=NAME` can write, each registered with what it cannot express.

A format is one class: `cannot_express(model, cfg)` lists the model's features the format has no way to
hold (empty = it can write the model), and `write(...)` writes the folder. Register your own with
`@register_export_format("name")`; `export.format` accepts every registered name.
"""

from __future__ import annotations

from pathlib import Path

from modular.errors import ConfigError
from modular.registry import registrar

EXPORT_FORMATS: dict[str, type[ExportFormat]] = {}
# The built-in formats and the modules that register them: their names are known (config validation)
# without importing the export code.
BUILTIN_FORMATS = {"llama-dense": "modular.export.dense", "mixtral": "modular.export.moe",
                   "qwen2-moe": "modular.export.moe", "moe": "modular.export.moe"}


register_export_format = registrar(EXPORT_FORMATS, lambda: ExportFormat, "export.format", "name")
register_export_format.__doc__ = "Class decorator: make an ExportFormat subclass selectable as `export.format=<name>`."


class ExportFormat:
    """One way to hand a run to Hugging Face. `exact`: the written model computes ours (up to rounding)."""

    name = "format"
    exact = True
    needs_calibration = False  # write() wants calibration batches (router frequencies, routing mass)

    def __init__(self, export_cfg=None):
        self.export_cfg = export_cfg

    def cannot_express(self, model, cfg) -> list[str]:
        """Features of `model` this format has no way to hold; [] when it can write the model."""
        return []

    def write(self, model, cfg, tokenizer, out_dir: Path, *, seed_model=None, calibration_batches=None,
              overwrite: bool = False, dtype=None, max_shard_size="5GB") -> Path:
        raise NotImplementedError

    def check(self, model, cfg) -> None:
        misfits = self.cannot_express(model, cfg)
        if misfits:
            raise ConfigError(f"export.format={self.name} cannot express this model: {'; '.join(misfits)}.")


def export_format(name: str, export_cfg=None) -> ExportFormat:
    """The registered format `name` (with the export config it writes by)."""
    _register_builtin_formats()
    if name not in EXPORT_FORMATS:
        raise ConfigError(f"export.format='{name}' is unknown; registered formats are: {', '.join(EXPORT_FORMATS)}.")
    return EXPORT_FORMATS[name](export_cfg)


def format_names(load: bool = True) -> list[str]:
    """The registered format names (load=False: without importing the built-in formats' modules)."""
    if load:
        _register_builtin_formats()
    return list(dict.fromkeys([*BUILTIN_FORMATS, *EXPORT_FORMATS]))


def _register_builtin_formats() -> None:
    import importlib

    for module in dict.fromkeys(BUILTIN_FORMATS.values()):
        importlib.import_module(module)
