"""Where training metrics go: `metrics.jsonl` in the run folder always, wandb when enabled.

Both sit behind one `log(record)` interface. wandb runs offline unless the user names a project
(and WANDB_MODE does not say offline), so no network call happens by default.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from modular.atomic import atomic_write_text, read_jsonl


class JsonlLogger:
    """One JSON object per line; flushed per record so a killed run keeps what it logged."""

    def __init__(self, path: Path, resume_step: int | None = None):
        self.path = Path(path)
        if resume_step is not None and self.path.exists():
            # Records past the checkpoint we resume from are replayed by the resumed run: drop them (and a
            # torn last line, which a crash or a full disk leaves behind).
            kept = [r for r in read_jsonl(self.path) if not isinstance(r, dict) or r.get("step", 0) <= resume_step]
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self.file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115  (open for the logger's life)

    def log(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


class WandbLogger:
    def __init__(self, wandb_cfg, run_dir: Path, run_name: str, config: dict):
        import wandb

        online = wandb_cfg.project is not None and os.environ.get("WANDB_MODE", "") != "offline"
        self.run = wandb.init(project=wandb_cfg.project or "modular", entity=wandb_cfg.entity, name=run_name,
                              dir=str(run_dir), config=config, mode="online" if online else "offline",
                              resume="allow", id=run_name)

    def log(self, record: dict) -> None:
        flat = {}

        def walk(prefix: str, value) -> None:
            if isinstance(value, dict):
                for k, v in value.items():
                    walk(f"{prefix}/{k}" if prefix else str(k), v)
            elif isinstance(value, (int, float)):
                flat[prefix] = value

        walk("", record)
        self.run.log(flat, step=int(record.get("step", 0)))

    def close(self) -> None:
        self.run.finish()


class Loggers:
    def __init__(self, loggers: list):
        self.loggers = loggers

    def log(self, record: dict) -> None:
        for logger in self.loggers:
            logger.log(record)

    def close(self) -> None:
        for logger in self.loggers:
            logger.close()
