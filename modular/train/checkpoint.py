"""Checkpoints: weights in safetensors, the rest in JSON or tensor-only torch files, written atomically.

Layout of `run_dir/checkpoints/step_NNNNNNN/`: model.safetensors, optimizer.pt, trainer.json (step,
tokens, data position, RNG states, model structure), config.json, and manifest.json (size and sha256
of every file, written last). A folder becomes visible only by an atomic rename once complete, and
loading verifies the manifest first, so a truncated or tampered file is detected, never loaded.
Loading never runs code from a file: safetensors, JSON and `torch.load(weights_only=True)` only.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from modular.atomic import fsync_dir, sha256_file
from modular.errors import CheckpointError

CHECKPOINT_DIR = "checkpoints"
FILES = ("model.safetensors", "optimizer.pt", "trainer.json", "config.json")


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


def unique_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict without tied duplicates (safetensors stores each tensor once)."""
    state, seen = {}, {}
    for name, tensor in model.state_dict().items():
        key = (tensor.data_ptr(), tensor.shape, tensor.dtype) if tensor.numel() else None
        if key is not None and key in seen:
            continue
        if key is not None:
            seen[key] = name
        state[name] = tensor.detach().contiguous().cpu()
    return state


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state().tolist(),
        "cuda": [s.tolist() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def save_checkpoint(run_dir: str | os.PathLike, step: int, model: torch.nn.Module, optimizer, trainer_state: dict,
                    config: dict, keep: int = 3) -> Path:
    """Write checkpoint `step` atomically and keep the newest `keep` ones. Returns its folder."""
    root = Path(run_dir) / CHECKPOINT_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(step)
    tmp = root / f".{step_dir_name(step)}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        save_file(unique_state_dict(model), tmp / "model.safetensors")
        torch.save(optimizer.state_dict() if optimizer is not None else {}, tmp / "optimizer.pt")
        (tmp / "trainer.json").write_text(json.dumps({**trainer_state, "step": step, "rng": rng_state()}))
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        manifest = {name: {"bytes": (tmp / name).stat().st_size, "sha256": sha256_file(tmp / name)} for name in FILES}
        for name in FILES:
            with open(tmp / name, "rb") as f:
                os.fsync(f.fileno())
        (tmp / "manifest.json").write_text(json.dumps({"step": step, "files": manifest}, indent=2))
        fsync_dir(tmp)
        if final.exists():  # re-saving the same step (e.g. a signal right after a periodic save)
            trash = root / f".{step_dir_name(step)}.old"
            os.replace(final, trash)
            os.replace(tmp, final)
            shutil.rmtree(trash)
        else:
            os.replace(tmp, final)
        fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoint folders, oldest first."""
    root = Path(run_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and (p / "manifest.json").exists()]
    return sorted(found, key=lambda p: p.name)


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def verify_checkpoint(folder: Path) -> dict:
    """Check every file against the manifest; raise CheckpointError naming the first bad file."""
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"Checkpoint {folder} has no readable manifest.json ({exc}); it is incomplete.") from None
    for name, expected in manifest.get("files", {}).items():
        path = folder / name
        if not path.exists():
            raise CheckpointError(f"Checkpoint {folder} is missing {name}; it cannot be loaded.")
        size = path.stat().st_size
        if size != expected["bytes"]:
            raise CheckpointError(
                f"Checkpoint file {path} is truncated or corrupt: {size} bytes, the manifest says {expected['bytes']}."
            )
        if sha256_file(path) != expected["sha256"]:
            raise CheckpointError(f"Checkpoint file {path} is corrupt: its sha256 does not match the manifest.")
    return manifest


def read_trainer_state(folder: Path) -> dict:
    return json.loads((folder / "trainer.json").read_text())


def read_config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def load_model_weights(model: torch.nn.Module, folder: Path) -> None:
    """Load model.safetensors into `model`, naming every missing, unexpected or mis-shaped tensor."""
    loaded = load_file(folder / "model.safetensors")
    expected = unique_state_dict(model)
    missing = sorted(set(expected) - set(loaded))
    unexpected = sorted(set(loaded) - set(expected))
    shapes = sorted(f"{k} {tuple(loaded[k].shape)} vs model {tuple(expected[k].shape)}"
                    for k in set(loaded) & set(expected) if loaded[k].shape != expected[k].shape)
    if missing or unexpected or shapes:
        parts = []
        if shapes:
            parts.append(f"shape mismatch: {', '.join(shapes[:6])}{' …' if len(shapes) > 6 else ''}")
        if missing:
            parts.append(f"missing from the checkpoint: {', '.join(missing[:6])}{' …' if len(missing) > 6 else ''}")
        if unexpected:
            parts.append(f"not in the model: {', '.join(unexpected[:6])}{' …' if len(unexpected) > 6 else ''}")
        raise CheckpointError(f"Checkpoint {folder} does not fit this model ({'; '.join(parts)}).")
    model.load_state_dict(loaded, strict=False)


def load_optimizer_state(optimizer, folder: Path) -> None:
    try:
        state = torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001  (an unpickler refusing a non-tensor object)
        raise CheckpointError(
            f"Checkpoint file {folder / 'optimizer.pt'} holds more than tensors and plain data and was not loaded "
            f"({type(exc).__name__})."
        ) from None
    optimizer.load_state_dict(state)


def load_initial_weights(model: torch.nn.Module, init_from: str | os.PathLike) -> None:
    """Start a run from another run's weights (e.g. an upcycled model): `init_from` holds model.safetensors."""
    folder = Path(init_from).expanduser()
    if not (folder / "model.safetensors").is_file():
        raise CheckpointError(f"train.init_from={folder} has no model.safetensors; give a checkpoint folder.")
    load_model_weights(model, folder)
