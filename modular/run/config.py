"""The `run` config group: where a run writes its outputs."""

# OmegaConf 2.3 reads typing.Optional in structured configs but not `X | None`.
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

from modular.errors import require


@dataclass
class RunConfig:
    """Where a run writes its outputs."""

    name: str = "modular"
    dir: Optional[str] = None  # default: runs/<name>-<timestamp>/


def validate_run(cfg) -> None:
    require(
        isinstance(cfg.run.name, str) and re.fullmatch(r"[A-Za-z0-9._-]+", cfg.run.name or "") is not None,
        f"run.name='{cfg.run.name}' is not allowed; use letters, digits, '.', '_' and '-'.",
    )
