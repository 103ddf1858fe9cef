"""One Hugging Face model folder from our weights: config.json, generation_config.json, safetensors, tokenizer.

Everything is staged in a temporary sibling and renamed into place (see `writer.staged_dir`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from modular.export.adapters import StateDictAdapter
from modular.export.hf_config import dtype_name, generation_config
from modular.export.hf_tokenizer import write_tokenizer_files
from modular.export.writer import DEFAULT_MAX_SHARD_SIZE, save_safetensors, staged_dir, write_json

EXPORT_INFO = "modular_export.json"  # provenance: what was exported, how, and whether it is exact


def config_dict(cfg) -> dict:
    try:
        from omegaconf import OmegaConf

        if OmegaConf.is_config(cfg):
            return OmegaConf.to_container(cfg, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    return dict(cfg) if isinstance(cfg, Mapping) else {}


def write_hf_folder(adapter: StateDictAdapter, state_dict: Mapping[str, Tensor], cfg, tokenizer, out_dir: str | os.PathLike,
                    *, overwrite: bool = False, dtype: torch.dtype | None = None,
                    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE, info: dict | None = None) -> Path:
    """Map `state_dict` (our keys) with `adapter` and write a folder `from_pretrained` loads offline.

    tokenizer: a modular Tokenizer, a tokenizers.Tokenizer, a tokenizer path, or None (no tokenizer files).
    dtype: the weights' dtype on disk; None keeps the model's.
    """
    hf_state = adapter.to_hf(state_dict, cfg)  # checks the fit before anything touches the disk
    floating = [t for t in hf_state.values() if t.is_floating_point()]
    disk_dtype = dtype or (floating[0].dtype if floating else torch.float32)
    with staged_dir(out_dir, overwrite) as tmp:
        special: dict = {}
        if tokenizer is not None:
            special = write_tokenizer_files(tokenizer, tmp, int(cfg.model.vocab_size), int(cfg.model.max_seq_len))
        hf_config = adapter.hf_config(state_dict, cfg, special_ids=special, dtype=disk_dtype)
        hf_config.save_pretrained(str(tmp))
        generation_config(special).save_pretrained(str(tmp))
        files = save_safetensors(hf_state, tmp, max_shard_size, dtype=disk_dtype)
        write_json(tmp / EXPORT_INFO, {
            "architecture": adapter.architecture,
            "dtype": dtype_name(disk_dtype),
            "weight_files": files,
            "tokenizer": tokenizer is not None,
            **(info or {}),
            "source_config": config_dict(cfg),
        })
    return Path(out_dir).expanduser().resolve()
