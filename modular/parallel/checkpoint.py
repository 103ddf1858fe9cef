"""Checkpoints of a parallel run, by gather-on-save: rank 0 writes the ordinary single-process checkpoint.

Saving all-gathers every sharded expert weight (and its Adam moments) over the EP group, and rank 0
writes the full, unsharded model.safetensors / optimizer.pt in the format of `modular.train.checkpoint`
(atomic, with manifest). Such a checkpoint loads at any world size: one process reads it as usual; a
parallel run slices each expert stack to the rows its EP rank holds. Simple and portable; the price
is that rank 0 holds the full model once while saving (fine up to models that fit one host's memory;
beyond that, torch.distributed.checkpoint's sharded format is the next step).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from modular.errors import CheckpointError
from modular.parallel.expert_parallel import expert_parameter_names, gather_experts, parallelize_moe_layers
from modular.train import checkpoint as ckpt


class _StateView:
    """Stands in for a model or optimizer in `ckpt.save_checkpoint`: its state_dict is the gathered one."""

    def __init__(self, state: dict):
        self._state = state

    def state_dict(self) -> dict:
        return self._state


def _optimizer_index(optimizer) -> list[torch.nn.Parameter]:
    """Parameters in the order optimizer.state_dict() numbers them."""
    return [p for group in optimizer.param_groups for p in group["params"]]


def full_model_state(model, ctx) -> dict:
    """The model's state dict with every expert stack whole (on all ranks of DP replica 0; {} elsewhere)."""
    if ctx.dp_rank != 0:
        return {}
    sharded = expert_parameter_names(model)
    state = model.state_dict()
    return {name: gather_experts(t, ctx) if name in sharded else t for name, t in state.items()}


def full_optimizer_state(optimizer, model, ctx) -> dict:
    """optimizer.state_dict() with the moments of every expert stack whole (DP replica 0; {} elsewhere)."""
    if ctx.dp_rank != 0 or optimizer is None:
        return {}
    sharded_ids = {id(p) for n, p in model.named_parameters() if n in expert_parameter_names(model)}
    state = optimizer.state_dict()
    for index, p in enumerate(_optimizer_index(optimizer)):
        if id(p) not in sharded_ids or index not in state["state"]:
            continue
        state["state"][index] = {k: gather_experts(v, ctx) if torch.is_tensor(v) and v.shape == p.shape else v
                                 for k, v in state["state"][index].items()}
    return state


def save_checkpoint(run_dir, step: int, model, optimizer, trainer_state: dict, config: dict, ctx,
                    keep: int = 3) -> Path:
    """Gather on every rank, write on rank 0, wait for it: returns the folder (the same on every rank)."""
    model_state = full_model_state(model, ctx)
    optimizer_state = full_optimizer_state(optimizer, model, ctx)
    folder = Path(run_dir) / ckpt.CHECKPOINT_DIR / ckpt.step_dir_name(step)
    error = None
    if ctx.is_main:
        try:
            folder = ckpt.save_checkpoint(run_dir, step, _StateView(model_state), _StateView(optimizer_state),
                                          trainer_state, config, keep=keep)
        except BaseException as exc:  # noqa: BLE001  (the other ranks must stop too, not wait for us)
            error = exc
    failed = ctx.broadcast_object(repr(error) if error is not None else None)
    if error is not None:
        raise error
    if failed is not None:
        raise CheckpointError(f"Rank 0 could not write checkpoint {folder}: {failed}.")
    return folder


def load_model_weights(model, folder: Path, ctx) -> None:
    """Load a full checkpoint into a (possibly) sharded model: each expert stack is sliced to this rank.

    Banks that are still whole (e.g. rebuilt by apply_structure) are sharded first.
    """
    parallelize_moe_layers(model, ctx)
    sharded = expert_parameter_names(model)
    loaded = load_file(Path(folder) / "model.safetensors")
    expected = {name: tuple(t.shape) for name, t in ckpt.unique_state_dict(model).items()}
    for name, (_start, _stop, full) in sharded.items():
        if name in expected:
            expected[name] = (full,) + expected[name][1:]  # compare with the whole stack, then slice
    problems = ckpt.describe_mismatch(expected, {name: tuple(t.shape) for name, t in loaded.items()})
    if problems:
        raise CheckpointError(f"Checkpoint {folder} does not fit this model ({problems}).")
    for name, (start, stop, _) in sharded.items():
        loaded[name] = loaded[name][start:stop]
    model.load_state_dict(loaded, strict=False)


def load_optimizer_state(optimizer, model, folder: Path, ctx) -> None:
    """Load a full optimizer.pt, slicing the moments of every expert stack to this rank's rows."""
    try:
        state = torch.load(Path(folder) / "optimizer.pt", map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001  (an unpickler refusing a non-tensor object)
        raise CheckpointError(
            f"Checkpoint file {Path(folder) / 'optimizer.pt'} holds more than tensors and plain data and was not "
            f"loaded ({type(exc).__name__})."
        ) from None
    sharded = expert_parameter_names(model)
    spans = {id(p): sharded[n] for n, p in model.named_parameters() if n in sharded}
    for index, p in enumerate(_optimizer_index(optimizer)):
        if id(p) not in spans or index not in state.get("state", {}):
            continue
        start, stop, full = spans[id(p)]
        state["state"][index] = {
            k: v[start:stop] if torch.is_tensor(v) and v.dim() == p.dim() and v.shape[0] == full else v
            for k, v in state["state"][index].items()
        }
    try:
        optimizer.load_state_dict(state)
    except (KeyError, ValueError, TypeError) as exc:  # not an optimizer state, or one of other parameters
        raise CheckpointError(f"Checkpoint file {Path(folder) / 'optimizer.pt'} does not hold this model's optimizer "
                              f"state ({type(exc).__name__}); it cannot be resumed.") from None
