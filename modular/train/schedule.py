"""Learning-rate schedules: linear warmup, then cosine decay or warmup-stable-decay (WSD).

WSD holds the peak rate and decays only over the last `decay_fraction` of steps; continual stages
re-warm and re-decay with it, which is why it exists beside cosine.
"""

from __future__ import annotations

import math


def lr_at(step: int, *, lr: float, max_steps: int, warmup_steps: int, schedule: str = "cosine",
          min_lr_ratio: float = 0.1, decay_fraction: float = 0.2) -> float:
    """The learning rate for optimizer step `step` (0-based)."""
    min_lr = lr * min_lr_ratio
    if warmup_steps > 0 and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    if schedule == "cosine":
        span = max(1, max_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))
    if schedule == "wsd":
        decay_steps = max(1, round(decay_fraction * max_steps))
        decay_start = max(warmup_steps, max_steps - decay_steps)
        if step < decay_start:
            return lr
        progress = min(1.0, (step - decay_start) / max(1, max_steps - decay_start))
        return lr - (lr - min_lr) * progress
    raise ValueError(f"unknown schedule {schedule!r}")


def schedule_from_config(train_cfg):
    """A function step -> lr for the train config."""

    def at(step: int) -> float:
        return lr_at(step, lr=train_cfg.lr, max_steps=train_cfg.max_steps, warmup_steps=train_cfg.warmup_steps,
                     schedule=train_cfg.schedule, min_lr_ratio=train_cfg.min_lr_ratio,
                     decay_fraction=train_cfg.decay_fraction)

    return at
