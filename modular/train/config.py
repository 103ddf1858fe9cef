"""The `train` config group: optimisation, schedule, evaluation, logging and checkpoint cadence."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Optional

from modular.errors import require, require_positive_int


@dataclass
class WandbConfig:
    enabled: bool = False
    project: Optional[str] = None  # a project makes the run online (unless WANDB_MODE=offline); else offline
    entity: Optional[str] = None


@dataclass
class TensorBoardConfig:
    enabled: bool = False  # needs the tensorboard package: pip install "modular-moe[tensorboard]"
    dir: Optional[str] = None  # event files go here; None: <run.dir>/tensorboard


@dataclass
class TrainConfig:
    max_steps: int = 300
    batch_size: int = 16
    seq_len: int = 128
    grad_accum: int = 1  # micro-batches per optimizer step (batch_size is per micro-batch)
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # the schedule decays to lr · min_lr_ratio
    schedule: str = "cosine"  # cosine | wsd (warmup-stable-decay) | constant
    warmup_steps: int = 30
    decay_fraction: float = 0.2  # wsd: the last fraction of steps decays
    weight_decay: float = 0.1
    no_decay: List[str] = field(default_factory=lambda: ["norm", "bias", "embed"])  # name fragments
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    dtype: str = "auto"  # auto (fp32 on CPU, bf16 autocast on CUDA) | fp32 | bf16
    device: str = "auto"  # auto | cpu | cuda
    compile: bool = False
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 8  # validation batches per domain per evaluation
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    max_nonfinite: int = 5  # stop after this many non-finite losses in a row
    threads: int = 0  # torch CPU threads; 0 = torch's default
    check_memory: bool = True  # refuse, before allocating, a run whose estimated memory exceeds what is available
    progress: bool = True
    wandb: WandbConfig = field(default_factory=WandbConfig)
    tensorboard: TensorBoardConfig = field(default_factory=TensorBoardConfig)
    init_from: Optional[str] = None  # a checkpoint folder (model.safetensors) to start from when run.dir has none
    # one of run.dir's own checkpoints to go back to instead of the latest (e.g. when the latest is damaged);
    # used once: it is not saved with the run, and newer checkpoints move to checkpoints/superseded/
    resume_from: Optional[str] = None


def validate_train(cfg) -> None:
    t = cfg.train
    for key in ("max_steps", "batch_size", "seq_len", "grad_accum", "log_every", "eval_every", "eval_batches",
                "checkpoint_every", "keep_checkpoints", "max_nonfinite"):
        require_positive_int(t[key], f"train.{key}")
    require(
        t.seq_len <= cfg.model.max_seq_len,
        f"train.seq_len={t.seq_len} exceeds model.max_seq_len={cfg.model.max_seq_len}; "
        "use a shorter seq_len or a larger max_seq_len.",
    )
    require(t.lr > 0 and math.isfinite(t.lr), f"train.lr={t.lr} is not allowed; it must be a number > 0.")
    require(0 <= t.min_lr_ratio <= 1, f"train.min_lr_ratio={t.min_lr_ratio} is not allowed; it must be in [0, 1].")
    require(t.schedule in ("cosine", "wsd", "constant"),
            f"train.schedule='{t.schedule}' is unknown; allowed: cosine, wsd, constant.")
    require(isinstance(t.warmup_steps, int) and t.warmup_steps >= 0,
            f"train.warmup_steps={t.warmup_steps} is not allowed; it must be an integer >= 0.")
    require(0 < t.decay_fraction <= 1, f"train.decay_fraction={t.decay_fraction} is not allowed; it must be in (0, 1].")
    require(t.weight_decay >= 0, f"train.weight_decay={t.weight_decay} is not allowed; it must be >= 0.")
    require(0 <= t.beta1 < 1 and 0 <= t.beta2 < 1,
            f"train.beta1={t.beta1}, train.beta2={t.beta2} are not allowed; betas must be in [0, 1).")
    require(t.grad_clip >= 0, f"train.grad_clip={t.grad_clip} is not allowed; it must be >= 0 (0 disables).")
    require(t.dtype in ("auto", "fp32", "bf16"), f"train.dtype='{t.dtype}' is unknown; allowed: auto, fp32, bf16.")
    require(t.device in ("auto", "cpu", "cuda"), f"train.device='{t.device}' is unknown; allowed: auto, cpu, cuda.")
    require(isinstance(t.threads, int) and t.threads >= 0,
            f"train.threads={t.threads} is not allowed; it must be an integer >= 0 (0 = torch's default).")
    if t.tensorboard.enabled:
        from modular.train.loggers import require_tensorboard

        require_tensorboard()
