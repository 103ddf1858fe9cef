"""Text generation from a run: `modular generate run.dir=DIR prompt="..."` and `generate(model, tokenizer, prompt)`,
routed by the prompt's inferred domain on domain-routed runs (sampling.py; the `generate` config group in config.py).
"""

import importlib

_HOMES = {"generate": "sampling", "GenerationResult": "sampling", "choose_route": "sampling",
          "decode_tokens": "sampling", "generate_from_run": "sampling"}
__all__ = list(_HOMES)


def __getattr__(name):  # loaded on first use: composing a config imports only the group's schema (config.py)
    if name in _HOMES:
        return getattr(importlib.import_module(f"modular.generate.{_HOMES[name]}"), name)
    raise AttributeError(f"module 'modular.generate' has no attribute {name!r}")
