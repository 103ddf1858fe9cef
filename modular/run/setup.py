"""What every command that uses a run does first: compose its config (with the overrides the run folder was
started with), read its data, pick the device and autocast, and load its model from a checkpoint.

train, eval, continual and export all start here, so they agree on every one of these steps.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import torch

from modular.atomic import read_json
from modular.config import compose_config, parse_override
from modular.errors import ConfigError, ResourceError, RunFolderError

OVERRIDES_FILE = "overrides.json"
# Saved overrides a resume does not take back: where the run is (a moved folder is found where it is named
# now) and which checkpoint to go back to (used once, never saved: later resumes take the latest).
NOT_RESUMED = ("run.dir", "train.resume_from")


# -- config -------------------------------------------------------------------------------------------


def override_value(overrides: list[str], key: str) -> str | None:
    """The value the last override of `key` sets, as hydra reads it (quotes removed), or None."""
    value = None
    for o in overrides:
        parsed = parse_override(o)
        if parsed is not None and parsed.key_or_group == key:
            value = parsed.value()
            value = None if value is None else str(value)
    return value


def merge_overrides(saved: list[str], given: list[str]) -> list[str]:
    """The overrides of a resumed run: the saved ones, then the given ones; a key set twice keeps its last value
    (where hydra would apply the later one anyway), so the saved list does not grow on every resume."""
    merged: dict[object, str] = {}
    for i, o in enumerate([*saved, *given]):
        parsed = parse_override(o)
        if parsed is None or parsed.is_add() or parsed.is_force_add() or parsed.is_delete():  # kept as written
            merged[("raw", i)] = o
            continue
        key = (parsed.key_or_group, parsed.package)
        merged.pop(key, None)
        merged[key] = o
    return list(merged.values())


def compose_run(overrides: list[str]):
    """(cfg, all overrides, run folder). A folder with overrides.json contributes its saved overrides first."""
    run_dir = override_value(overrides, "run.dir")
    saved: list[str] = []
    if run_dir and (Path(run_dir) / OVERRIDES_FILE).is_file():
        saved = read_json(Path(run_dir) / OVERRIDES_FILE, "the list of overrides the run was started with")
        if not (isinstance(saved, list) and all(isinstance(o, str) for o in saved)):
            raise RunFolderError(f"{Path(run_dir) / OVERRIDES_FILE} is damaged: it should hold the list of overrides "
                                 "the run was started with, as JSON strings.")
        saved = [o for o in saved if _key(o) not in NOT_RESUMED]
    all_overrides = merge_overrides(saved, list(overrides))
    cfg = compose_config(all_overrides)
    if cfg.run.dir:
        folder = Path(cfg.run.dir)
    else:
        folder = Path("runs") / f"{cfg.run.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        all_overrides.append(f"run.dir={folder}")
    return cfg, all_overrides, folder


def saved_overrides(all_overrides: list[str]) -> list[str]:
    """What overrides.json keeps: everything but train.resume_from (run.dir is kept: it records where the run
    was made, and is replaced by wherever it is named from on every resume)."""
    return [o for o in all_overrides if _key(o) != "train.resume_from"]


def _key(override: str) -> str | None:
    parsed = parse_override(override)
    return None if parsed is None else parsed.key_or_group


# -- data ---------------------------------------------------------------------------------------------


def prepare_data(cfg, domains: list[str] | None = None, parallel=None):
    """Tokenizer, training mixture and validation sets; every data error surfaces here, before any write.

    With `parallel` (modular.parallel's ParallelContext) each rank's loader yields its own rows of one
    global batch of world_size · train.batch_size rows; every rank evaluates the same validation batches
    of that global size, so evaluation reads as in one process. Rank 0 builds (or checks) the token-shard
    cache first, then the other ranks read it.
    """
    if parallel is None:
        return _prepare_data(cfg, domains, None)
    return parallel.main_first(lambda: _prepare_data(cfg, domains, parallel))


def _prepare_data(cfg, domains: list[str] | None, parallel):
    from modular.data.loader import MixtureLoader, validation_sets
    from modular.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(cfg.data.tokenizer)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(
            f"The tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size={cfg.model.vocab_size}; "
            f"set model.vocab_size={tokenizer.vocab_size} (or larger)."
        )
    t = cfg.train
    weights = {d: float(cfg.data.domains[d].weight) for d in (domains or cfg.data.domains)}
    shard = {} if parallel is None else {"shard": parallel.rank, "num_shards": parallel.world_size}
    loader = MixtureLoader.from_config(cfg.data, t.batch_size, t.seq_len, weights=weights, seed=cfg.seed,
                                       progress=t.progress, tokenizer=tokenizer, **shard)
    val_batch = t.batch_size * (parallel.world_size if parallel is not None else 1)
    val_sets = validation_sets(cfg.data, val_batch, t.seq_len, max_batches=t.eval_batches, progress=t.progress,
                               tokenizer=tokenizer)
    return tokenizer, loader, val_sets


# -- device -------------------------------------------------------------------------------------------


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ResourceError("train.device=cuda was asked for, but no CUDA device is available; use auto or cpu.")
    return torch.device(name)


def autocast_for(dtype: str, device: torch.device):
    """fp32 on the CPU by default; bf16 autocast where the device supports it."""
    use_bf16 = dtype == "bf16" or (dtype == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())
    if not use_bf16:
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)


# -- the run folder -----------------------------------------------------------------------------------


def on_main(parallel, fn):
    """fn() on rank 0 alone (one process writes the run folder); its error is raised on every rank."""
    if parallel is None:
        return fn()
    return parallel.main_only(fn)


@contextlib.contextmanager
def claimed_run_folder(folder: Path, command: str, parallel=None):
    """The run folder of a command that writes it: refused if it is a file or another program's folder, and
    locked while the command runs (by rank 0 under torchrun). Yields `establish`: call it once the inputs are
    validated, to create the folder and its marker; nothing is created before that."""
    from modular.run.folder import RunFolder

    run = RunFolder(folder, command)
    on_main(parallel, run.open)
    try:
        yield lambda: on_main(parallel, run.establish)
    finally:
        if parallel is None or parallel.is_main:
            run.close()


# -- a run's model ------------------------------------------------------------------------------------


def load_run_model(overrides: list[str], command: str):
    """(model in eval mode, cfg, run folder, checkpoint) of run.dir's latest checkpoint (or train.resume_from's),
    restored through the one verified path."""
    from modular.models import build_model
    from modular.run.checkpointer import Checkpointer
    from modular.run.folder import RunFolder
    from modular.train import checkpoint as ckpt

    if not override_value(overrides, "run.dir"):
        raise ConfigError(f"modular {command} needs run.dir=DIR, a folder written by modular train, continual "
                          "or upcycle.")
    cfg, _, folder = compose_run(overrides)
    if RunFolder(folder, command).state() in ("new", "empty"):
        raise RunFolderError(f"run.dir={folder} {'does not exist' if not folder.exists() else 'is empty'}; give the "
                             "folder of a train or continual run.")
    checkpoint = ckpt.find_resume_checkpoint(folder, cfg.train.resume_from)
    if checkpoint is None:
        raise RunFolderError(f"run.dir={folder} has no checkpoint yet; train first (modular train run.dir={folder}).")
    model = build_model(cfg)
    trainer_state = Checkpointer().restore(model, checkpoint)
    use_run_tokenizer(cfg, folder, trainer_state, model)
    return model.eval(), cfg, folder, checkpoint


def use_run_tokenizer(cfg, folder: Path, trainer_state: dict, model) -> None:
    """After a continual run grew the vocabulary, its checkpoints record the grown tokenizer: point cfg at it
    (data.tokenizer, model.vocab_size), so evaluation and export read text exactly as the model was trained."""
    from modular.continual.vocabulary import load_run_tokenizer

    grown = trainer_state.get("tokenizer")
    if not grown:
        return
    tokenizer = load_run_tokenizer(folder, grown)
    cfg.data.tokenizer.kind = "hf"
    cfg.data.tokenizer.path = str(tokenizer.path)
    cfg.model.vocab_size = model.vocab_size
