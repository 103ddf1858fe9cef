"""Registries of pluggable classes (routers, expert banks, export formats, continual strategies).

`registrar(registry, base, key)` makes the `@register_xxx("name")` decorator of one registry: it checks
the class subclasses `base` (given as a callable, since the decorator is defined before the base class
in its module), stores it under `name` and records the name on the class.
"""

from __future__ import annotations

from collections.abc import Callable


def registrar(registry: dict, base: Callable[[], type], key: str, name_attr: str = "registry_name"):
    """The decorator factory of one registry; `key` is the config key the names select (for messages)."""

    def register(name: str):
        def wrap(cls):
            parent = base()
            if not issubclass(cls, parent):
                raise TypeError(f"{cls.__name__} must subclass {parent.__module__}.{parent.__name__} to be selectable "
                                f"as {key}={name}")
            registry[name] = cls
            setattr(cls, name_attr, name)
            return cls

        return wrap

    return register
