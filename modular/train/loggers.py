"""Where training metrics go: `metrics.jsonl` in the run folder always, wandb and TensorBoard when enabled.

All sit behind one `log(record)` interface. wandb runs offline unless the user names a project
(and WANDB_MODE does not say offline), so no network call happens by default.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from modular.atomic import atomic_write_text, read_jsonl
from modular.errors import ConfigError


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
        self.run.log(flatten(record), step=int(record.get("step", 0)))

    def close(self) -> None:
        self.run.finish()


def flatten(record: dict) -> dict[str, float]:
    """Numbers of a nested record under slash-joined names: {"eval": {"en": {"loss": x}}} -> {"eval/en/loss": x}."""
    flat = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}/{k}" if prefix else str(k), v)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[prefix] = value

    walk("", record)
    return flat


def require_tensorboard() -> None:
    """One sentence when train.tensorboard.enabled=true but the package is missing (checked before a run starts)."""
    try:
        import tensorboard  # noqa: F401  (only whether it imports matters here)
    except ImportError:
        raise ConfigError("train.tensorboard.enabled=true needs the tensorboard package, which is not installed; "
                          "install it with pip install \"modular-moe[tensorboard]\".") from None


class TensorBoardLogger:
    """Scalars of every record as TensorBoard event files (`tensorboard --logdir <run.dir>/tensorboard`)."""

    def __init__(self, log_dir: Path, resume_step: int | None = None):
        require_tensorboard()
        from torch.utils.tensorboard import SummaryWriter

        # On resume, events past the checkpoint are replayed by the resumed run: TensorBoard drops the old ones.
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=resume_step + 1 if resume_step else None)

    def log(self, record: dict) -> None:
        step = int(record.get("step", 0))
        for name, value in flatten(record).items():
            if name != "step":
                self.writer.add_scalar(name, value, global_step=step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class Loggers:
    def __init__(self, loggers: list):
        self.loggers = loggers

    def log(self, record: dict) -> None:
        for logger in self.loggers:
            logger.log(record)

    def close(self) -> None:
        for logger in self.loggers:
            logger.close()
