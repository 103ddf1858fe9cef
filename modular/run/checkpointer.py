"""The checkpointer of a run, chosen once: one process writes and reads checkpoints as they are; under torchrun
expert stacks are gathered on save (rank 0 writes) and sliced to each rank on load.

`restore` is the one path by which every checkpoint comes back — resume, `train.init_from`, eval, export and
continual stages: verify the manifest, rebuild the model's structure (grown or merged banks), load the weights.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from modular.errors import CheckpointError
from modular.models.structure import apply_structure
from modular.train import checkpoint as ckpt


class Checkpointer:
    """Checkpoints of a one-process run, in modular.train.checkpoint's format."""

    def save(self, run_dir: str | os.PathLike, step: int, model, optimizer, trainer_state: dict, config: dict,
             keep: int) -> Path:
        return ckpt.save_checkpoint(run_dir, step, model, optimizer, trainer_state, config, keep=keep)

    def load_model(self, model, folder: Path) -> None:
        ckpt.load_model_weights(model, folder)

    def load_optimizer(self, optimizer, model, folder: Path) -> None:
        ckpt.load_optimizer_state(optimizer, folder)

    def restore(self, model, folder: Path, device: torch.device | None = None) -> dict:
        """Verify checkpoint `folder`, give `model` its structure and weights; returns its trainer state."""
        ckpt.verify_checkpoint(folder)
        state = ckpt.read_trainer_state(folder)
        apply_structure(model, state.get("structure", {}))
        if device is not None:
            model.to(device)
        self.load_model(model, folder)
        return state

    def restore_optimizer(self, optimizer, model, folder: Path) -> None:
        """The optimizer state of a checkpoint `restore` verified (moments follow the model's parameters)."""
        self.load_optimizer(optimizer, model, folder)

    def restore_initial(self, model, init_from: str | os.PathLike) -> None:
        """`train.init_from`: the weights of another run's checkpoint, or of a weights-only folder (an upcycled
        model), verified like every checkpoint; the model's structure comes from it when it records one."""
        folder = Path(init_from).expanduser()
        if not (folder / "model.safetensors").is_file():
            raise CheckpointError(f"train.init_from={init_from} has no model.safetensors; give a checkpoint folder.")
        ckpt.verify_checkpoint(folder, required=ckpt.WEIGHTS)
        if (folder / "trainer.json").is_file():
            apply_structure(model, ckpt.read_trainer_state(folder).get("structure", {}))
        ckpt.load_model_weights(model, folder)  # before sharding: a one-process load in every case


class GatheredCheckpointer(Checkpointer):
    """Checkpoints of a torchrun run: gathered on save so they load at any world size, sliced on load."""

    def __init__(self, parallel):
        self.parallel = parallel

    def save(self, run_dir, step, model, optimizer, trainer_state, config, keep):
        from modular.parallel import checkpoint as parallel_ckpt

        return parallel_ckpt.save_checkpoint(run_dir, step, model, optimizer, trainer_state, config, self.parallel,
                                             keep=keep)

    def load_model(self, model, folder):
        from modular.parallel import checkpoint as parallel_ckpt

        parallel_ckpt.load_model_weights(model, folder, self.parallel)

    def load_optimizer(self, optimizer, model, folder):
        from modular.parallel import checkpoint as parallel_ckpt

        parallel_ckpt.load_optimizer_state(optimizer, model, folder, self.parallel)


def checkpointer_for(parallel) -> Checkpointer:
    """The checkpointer of a run: `parallel` is modular.parallel's ParallelContext under torchrun, else None."""
    return Checkpointer() if parallel is None else GatheredCheckpointer(parallel)
