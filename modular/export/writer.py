"""Writing a Hugging Face model folder atomically: staged in a hidden temporary sibling, renamed into place.

Weights go to safetensors (sharded with model.safetensors.index.json above `max_shard_size`); never pickle.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor

from modular.atomic import atomic_write_json, atomic_write_text, follow_umask, fsync_dir
from modular.errors import ConfigError

DEFAULT_MAX_SHARD_SIZE = "5GB"
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(size: int | str, name: str = "max_shard_size") -> int:
    """Bytes from an int or a string like '500MB', '2GB', '1GiB' (HF's convention: KB = 1000 bytes)."""
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]I?B|B)?\s*", str(size), flags=re.IGNORECASE)
    if not match or float(match.group(1)) <= 0:
        raise ConfigError(f"{name}={size!r} is not allowed; use a positive size such as 500MB, 5GB or 1GiB.")
    return int(float(match.group(1)) * _UNITS[(match.group(2) or "").upper()])


def check_output_dir(out_dir: str | os.PathLike, overwrite: bool) -> Path:
    """The resolved output folder; refuses an existing one unless overwrite (and always refuses a file)."""
    out = Path(out_dir).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output {out} is a file; name a folder for the export.")
    if out.exists() and not overwrite:
        raise ConfigError(f"output folder {out} already exists; choose a new folder or set export.overwrite=true "
                          "(overwrite=True from Python).")
    return out


@contextmanager
def staged_dir(out_dir: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder beside `out_dir`; on success it replaces `out_dir` in one rename.

    On any error the temporary folder is removed and `out_dir` is untouched, so no half-written export
    is ever visible under the requested name.
    """
    out = check_output_dir(out_dir, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        yield tmp
        for file in [tmp, *tmp.rglob("*")]:
            follow_umask(file)  # mkdtemp (0700) and safetensors (0600) are private; an export is meant to be shared
            if file.is_file():  # make the contents durable before the rename publishes them
                with open(file, "rb") as f:
                    os.fsync(f.fileno())
        if out.exists():
            check_output_dir(out, overwrite)  # re-check: it may have appeared meanwhile
            # A folder cannot be renamed over a non-empty folder: move the old one aside first.
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
        fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_safetensors(state_dict: Mapping[str, Tensor], folder: Path, max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
                     prefix: str = "model", dtype: torch.dtype | None = None) -> list[str]:
    """Write `state_dict` as HF-style safetensors: one file, or shards plus an index above max_shard_size.

    dtype casts floating tensors on the way out. Copies are made one shard at a time, so peak memory is
    the model plus one shard, not two models.
    """
    from safetensors.torch import save_file

    limit = parse_size(max_shard_size)

    def nbytes(t: Tensor) -> int:
        itemsize = torch.empty((), dtype=dtype).element_size() if dtype is not None and t.is_floating_point() \
            else t.element_size()
        return t.numel() * itemsize

    shards: list[list[str]] = [[]]
    size = 0
    for name, tensor in state_dict.items():
        if shards[-1] and size + nbytes(tensor) > limit:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes(tensor)

    def materialise(names: list[str]) -> dict[str, Tensor]:
        # Own, contiguous copies: safetensors refuses tensors that share storage (e.g. per-expert views).
        out = {}
        for k in names:
            t = state_dict[k].detach().to("cpu")
            if dtype is not None and t.is_floating_point():
                t = t.to(dtype)
            out[k] = t.contiguous().clone()
        return out

    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file(materialise(shards[0]), str(folder / f"{prefix}.safetensors"), metadata=metadata)
        return [f"{prefix}.safetensors"]
    names = [f"{prefix}-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for file_name, shard in zip(names, shards):
        save_file(materialise(shard), str(folder / file_name), metadata=metadata)
        weight_map.update({k: file_name for k in shard})
    total = sum(nbytes(t) for t in state_dict.values())
    atomic_write_json(folder / f"{prefix}.safetensors.index.json",
                      {"metadata": {"total_size": total}, "weight_map": weight_map})
    return names + [f"{prefix}.safetensors.index.json"]


def load_safetensors_folder(folder: Path) -> dict[str, Tensor]:
    """All tensors of an HF folder's safetensors weights (single file or index + shards)."""
    from safetensors.torch import load_file

    from modular.errors import CheckpointError

    index = folder / "model.safetensors.index.json"
    single = folder / "model.safetensors"
    try:
        if index.is_file():
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            state: dict[str, Tensor] = {}
            for file_name in sorted(set(weight_map.values())):
                state.update(load_file(str(folder / file_name)))
            return state
        if single.is_file():
            return load_file(str(single))
    except Exception as exc:  # noqa: BLE001  (safetensors' own error types for truncated or corrupt files)
        raise CheckpointError(f"the weights in {folder} cannot be read as safetensors ({_first_line(exc)}).") from None
    pickled = [p.name for p in folder.glob("*.bin")] + [p.name for p in folder.glob("*.pt")]
    if pickled:
        raise CheckpointError(
            f"{folder} holds only pickle weights ({pickled[0]}); modular reads safetensors only — convert them "
            "with transformers' save_pretrained(safe_serialization=True) in a trusted environment."
        )
    raise CheckpointError(f"{folder} has no model.safetensors or model.safetensors.index.json.")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def write_json(path: Path, obj) -> None:
    atomic_write_json(path, obj)


def write_text(path: Path, text: str) -> None:
    atomic_write_text(path, text)
