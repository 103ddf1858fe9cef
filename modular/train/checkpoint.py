"""Checkpoints: weights in safetensors, the rest in JSON or tensor-only torch files, written atomically.

Layout of `run_dir/checkpoints/step_NNNNNNN/`: model.safetensors, optimizer.pt, trainer.json (step,
tokens, data position, RNG states, model structure), config.json, and manifest.json (size and sha256
of every file, written last). A folder becomes visible only by an atomic rename once complete, and
loading verifies the manifest first (`verify_checkpoint`, the one check every load goes through), so a
truncated, tampered or unlisted file is detected, never loaded; a damaged latest checkpoint is named, never
skipped. Loading never runs code from a file: safetensors, JSON and `torch.load(weights_only=True)` only.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from modular.atomic import follow_umask, fsync_dir, sha256_file
from modular.errors import CheckpointError, ResourceError

CHECKPOINT_DIR = "checkpoints"
FILES = ("model.safetensors", "optimizer.pt", "trainer.json", "config.json")
WEIGHTS = ("model.safetensors",)  # a weights-only checkpoint (e.g. an upcycled model) lists just these
SUPERSEDED_DIR = "superseded"  # checkpoints newer than an explicit train.resume_from are moved here
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


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
    try:
        tmp.mkdir()
        save_file(unique_state_dict(model), tmp / "model.safetensors")
        follow_umask(tmp / "model.safetensors")
        torch.save(optimizer.state_dict() if optimizer is not None else {}, tmp / "optimizer.pt")
        (tmp / "trainer.json").write_text(json.dumps({**trainer_state, "step": step, "rng": rng_state()}))
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        write_manifest(tmp, FILES, step=step)
        if final.exists():  # re-saving the same step (e.g. a signal right after a periodic save)
            trash = root / f".{step_dir_name(step)}.old"
            os.replace(final, trash)
            os.replace(tmp, final)
            shutil.rmtree(trash)
        else:
            os.replace(tmp, final)
        fsync_dir(root)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if _disk_full(exc):
            previous = latest_checkpoint(run_dir)
            raise ResourceError(
                f"The disk holding {root} is full, so checkpoint {final.name} was not written"
                + (f" ({previous.name} is intact)" if previous is not None else "")
                + f"; free some space and resume with modular train run.dir={run_dir}."
            ) from None
        raise
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _disk_full(exc: BaseException) -> bool:
    """A write that failed for lack of space: an OSError, or safetensors' own error type quoting it."""
    if isinstance(exc, OSError):
        return exc.errno in _DISK_FULL
    return type(exc).__name__ == "SafetensorError" and ("No space left" in str(exc) or "os error 28" in str(exc))


def write_manifest(folder: Path, names: tuple[str, ...], step: int | None = None) -> None:
    """Make `names` durable and record each one's size and sha256 in manifest.json, written last."""
    files = {name: {"bytes": (folder / name).stat().st_size, "sha256": sha256_file(folder / name)} for name in names}
    for name in names:
        with open(folder / name, "rb") as f:
            os.fsync(f.fileno())
    (folder / "manifest.json").write_text(json.dumps({"step": step, "files": files}, indent=2))
    fsync_dir(folder)


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Checkpoint folders, oldest first: every `step_*` folder, whether or not its manifest verifies.

    A half-written checkpoint never has this name (it is renamed into place once complete), so a folder
    here that fails verification is damaged and must be reported, not skipped.
    """
    root = Path(run_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_")]
    return sorted(found, key=lambda p: p.name)


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def verify_checkpoint(folder: Path, required: tuple[str, ...] = FILES) -> dict:
    """Check every file against the manifest; raise CheckpointError naming the first problem.

    The manifest itself must be a JSON object whose "files" lists at least `required`, each with its size
    and sha256: an empty, malformed or incomplete manifest is a damaged checkpoint.
    """
    folder = Path(folder)
    path = folder / "manifest.json"
    if not path.is_file():
        raise CheckpointError(f"Checkpoint {folder} is damaged: it has no manifest.json.")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"Checkpoint {folder} is damaged: its manifest.json is not readable JSON "
                              f"({type(exc).__name__}).") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    well_formed = isinstance(files, dict) and all(
        Path(name).name == name and name not in ("", ".", "..") and isinstance(entry, dict)
        and isinstance(entry.get("bytes"), int) and isinstance(entry.get("sha256"), str)
        for name, entry in files.items())
    if not well_formed:
        raise CheckpointError(f"Checkpoint {folder} is damaged: its manifest.json is not an object listing each "
                              "file of the folder with its bytes and sha256.")
    unlisted = [name for name in required if name not in files]
    if unlisted:
        raise CheckpointError(f"Checkpoint {folder} is damaged: its manifest.json does not list {', '.join(unlisted)}.")
    for name, expected in files.items():
        file = folder / name
        if not file.is_file():
            raise CheckpointError(f"Checkpoint {folder} is missing {name}; it cannot be loaded.")
        size = file.stat().st_size
        if size != expected["bytes"]:
            raise CheckpointError(
                f"Checkpoint file {file} is truncated or corrupt: {size} bytes, the manifest says {expected['bytes']}."
            )
        if sha256_file(file) != expected["sha256"]:
            raise CheckpointError(f"Checkpoint file {file} is corrupt: its sha256 does not match the manifest.")
    return manifest


def find_resume_checkpoint(run_dir: str | os.PathLike, resume_from: str | os.PathLike | None = None,
                           how_to_go_back: str | None = "train") -> Path | None:
    """The verified checkpoint a run continues from: `resume_from` (one of the run's own), else the latest.

    A damaged latest checkpoint raises CheckpointError naming it and the newest earlier one that verifies;
    `how_to_go_back` ("train", or None where a command cannot resume from an earlier one) shapes the advice.
    """
    found = list_checkpoints(run_dir)
    if resume_from:
        wanted = Path(resume_from).expanduser().resolve()
        match = [p for p in found if p.resolve() == wanted]
        if not match:
            names = ", ".join(p.name for p in found) or "none yet"
            raise CheckpointError(f"train.resume_from={resume_from} is not a checkpoint of run.dir={run_dir}; its "
                                  f"checkpoints are: {names}.")
        verify_checkpoint(match[0])
        return match[0]
    if not found:
        return None
    try:
        verify_checkpoint(found[-1])
    except CheckpointError as damaged:
        earlier = next((p for p in reversed(found[:-1]) if _verifies(p)), None)
        if earlier is None:
            advice = f"no earlier checkpoint verifies; move {found[-1]} away to start the run again."
        elif how_to_go_back == "train":
            advice = (f"the newest earlier one that verifies is {earlier}; resume from it with modular train "
                      f"run.dir={run_dir} train.resume_from={earlier}.")
        else:
            advice = f"the newest earlier one that verifies is {earlier}, but this command cannot go back to it."
        raise CheckpointError(f"{str(damaged).rstrip('.')}; {advice}") from None
    return found[-1]


def _verifies(folder: Path) -> bool:
    try:
        verify_checkpoint(folder)
    except CheckpointError:
        return False
    return True


def supersede_newer(run_dir: str | os.PathLike, checkpoint: Path) -> list[Path]:
    """Move the checkpoints newer than `checkpoint` (a run going back to it) to checkpoints/superseded/.

    Nothing is deleted: they stay there for the user to inspect. Returns their new paths.
    """
    moved = []
    for newer in [p for p in list_checkpoints(run_dir) if p.name > checkpoint.name]:
        target = Path(run_dir) / CHECKPOINT_DIR / SUPERSEDED_DIR / newer.name
        suffix = 1
        while target.exists():
            target = target.with_name(f"{newer.name}.{suffix}")
            suffix += 1
        target.parent.mkdir(exist_ok=True)
        os.replace(newer, target)
        moved.append(target)
    return moved


def read_trainer_state(folder: Path) -> dict:
    return json.loads((folder / "trainer.json").read_text())


def describe_mismatch(expected: dict[str, tuple], found: dict[str, tuple]) -> str | None:
    """Name every tensor that is mis-shaped, missing or unexpected between two {name: shape} maps (six of each)."""

    def listed(names: list[str]) -> str:
        return ", ".join(names[:6]) + (" …" if len(names) > 6 else "")

    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    shapes = sorted(f"{k} {tuple(found[k])} vs model {tuple(expected[k])}"
                    for k in set(found) & set(expected) if tuple(found[k]) != tuple(expected[k]))
    parts = []
    if shapes:
        parts.append(f"shape mismatch: {listed(shapes)}")
    if missing:
        parts.append(f"missing from the checkpoint: {listed(missing)}")
    if unexpected:
        parts.append(f"not in the model: {listed(unexpected)}")
    return "; ".join(parts) or None


def load_model_weights(model: torch.nn.Module, folder: Path) -> None:
    """Load model.safetensors into `model`, naming every missing, unexpected or mis-shaped tensor."""
    loaded = load_file(folder / "model.safetensors")
    expected = unique_state_dict(model)
    problems = describe_mismatch({k: v.shape for k, v in expected.items()}, {k: v.shape for k, v in loaded.items()})
    if problems:
        raise CheckpointError(f"Checkpoint {folder} does not fit this model ({problems}).")
    model.load_state_dict(loaded, strict=False)


def load_optimizer_state(optimizer, folder: Path) -> None:
    try:
        state = torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001  (an unpickler refusing a non-tensor object)
        raise CheckpointError(
            f"Checkpoint file {folder / 'optimizer.pt'} holds more than tensors and plain data and was not loaded "
            f"({type(exc).__name__})."
        ) from None
    try:
        optimizer.load_state_dict(state)
    except (KeyError, ValueError, TypeError) as exc:  # not an optimizer state, or one of other parameters
        raise CheckpointError(f"Checkpoint file {folder / 'optimizer.pt'} does not hold this model's optimizer state "
                              f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else exc!r}); it cannot "
                              "be resumed.") from None


def load_initial_weights(model: torch.nn.Module, init_from: str | os.PathLike) -> None:
    """Start a run from another run's weights (a checkpoint, or an upcycled model): verified like every load."""
    from modular.run.checkpointer import Checkpointer

    Checkpointer().restore_initial(model, init_from)
