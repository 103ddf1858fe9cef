"""The `train` config group: optimisation, schedule, evaluation, logging and checkpoint cadence."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional


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
    progress: bool = True
    wandb: WandbConfig = field(default_factory=WandbConfig)
    tensorboard: TensorBoardConfig = field(default_factory=TensorBoardConfig)
    init_from: Optional[str] = None  # a checkpoint folder (model.safetensors) to start from when run.dir has none
