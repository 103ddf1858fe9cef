"""`modular train` and `modular eval`: compose the config, build data and model, run the Trainer.

A run folder remembers the overrides it was started with (`overrides.json`), so `modular train
run.dir=DIR` resumes with the same config, and later overrides (e.g. a larger train.max_steps) apply on top.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from modular.atomic import atomic_write_json, atomic_write_text
from modular.config import compose_config, to_dict
from modular.errors import ConfigError, UserError


def _override_value(overrides: list[str], key: str) -> str | None:
    value = None
    for o in overrides:
        if o.split("=", 1)[0].lstrip("+") == key:
            value = o.split("=", 1)[1]
    return value


def compose_run(overrides: list[str]):
    """(cfg, all overrides, run folder). A folder with overrides.json contributes its saved overrides first."""
    run_dir = _override_value(overrides, "run.dir")
    saved: list[str] = []
    if run_dir and (Path(run_dir) / "overrides.json").exists():
        saved = json.loads((Path(run_dir) / "overrides.json").read_text())
    all_overrides = [o for o in saved if not o.startswith("run.dir=")] + list(overrides)
    cfg = compose_config(all_overrides)
    if cfg.run.dir:
        folder = Path(cfg.run.dir)
    else:
        folder = Path("runs") / f"{cfg.run.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        all_overrides.append(f"run.dir={folder}")
    return cfg, all_overrides, folder


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


def check_run_dir(folder: Path) -> None:
    if folder.exists() and not folder.is_dir():
        raise UserError(f"run.dir={folder} is a file, not a folder; choose another run.dir.")


def train_command(overrides: list[str]) -> int:
    from modular.parallel.mesh import run_command

    cfg, all_overrides, folder = compose_run(overrides)
    return run_command(cfg, all_overrides, folder, _train)


def _train(cfg, all_overrides: list[str], folder: Path, parallel) -> int:
    from modular.models import build_model
    from modular.train import checkpoint as ckpt
    from modular.train.evaluate import format_eval_table
    from modular.train.trainer import Trainer

    main = parallel is None or parallel.is_main  # one process prints and writes the run's files
    print_ = print if main else (lambda *args: None)
    check_run_dir(folder)
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    _tokenizer, loader, val_sets = prepare_data(cfg, parallel=parallel)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg)
    if cfg.train.init_from and ckpt.latest_checkpoint(folder) is None:
        ckpt.load_initial_weights(model, cfg.train.init_from)

    folder.mkdir(parents=True, exist_ok=True)
    record = to_dict(cfg)
    if main:
        atomic_write_json(folder / "overrides.json", all_overrides)
        atomic_write_text(folder / "config.json", json.dumps(record, indent=2) + "\n")
    trainer = Trainer(cfg, folder, model, loader, val_sets, config_record=record, parallel=parallel)
    if trainer.resume():
        print_(f"resuming {folder} from step {trainer.step}")
    else:
        print_(f"training in {folder}" + (f" on {parallel.world_size} processes (dp={parallel.dp}, ep={parallel.ep}, "
                                          f"{parallel.backend})" if parallel else ""))
    if trainer.step >= cfg.train.max_steps:
        print_(f"{folder} already reached train.max_steps={cfg.train.max_steps}; raise it to train further.")
        return 0
    results = trainer.fit()
    if results:
        print_(format_eval_table(results))
    if trainer.stopped_by_signal is not None:
        print_(f"resume with: modular train run.dir={folder}")
        return 128 + int(trainer.stopped_by_signal)
    return 0


def load_run_model(overrides: list[str], command: str):
    """(model in eval mode, cfg, run folder, checkpoint) of run.dir's latest checkpoint, verified first."""
    from modular.models import build_model
    from modular.models.structure import apply_structure
    from modular.train import checkpoint as ckpt

    if not _override_value(overrides, "run.dir"):
        raise ConfigError(f"modular {command} needs run.dir=DIR, a folder written by modular train, continual "
                          "or upcycle.")
    cfg, _, folder = compose_run(overrides)
    if not folder.is_dir():
        raise UserError(f"run.dir={folder} does not exist; give the folder of a train or continual run.")
    checkpoint = ckpt.latest_checkpoint(folder)
    if checkpoint is None:
        raise UserError(f"run.dir={folder} has no checkpoint yet; train first (modular train run.dir={folder}).")
    ckpt.verify_checkpoint(checkpoint)
    model = build_model(cfg)
    trainer_state = ckpt.read_trainer_state(checkpoint)
    apply_structure(model, trainer_state.get("structure", {}))
    ckpt.load_model_weights(model, checkpoint)
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


def eval_command(overrides: list[str]) -> int:
    from modular.data.loader import validation_sets
    from modular.train import checkpoint as ckpt
    from modular.train.evaluate import evaluate, format_eval_table
    from modular.train.trainer import autocast_for, resolve_device

    model, cfg, _folder, checkpoint = load_run_model(overrides, "eval")
    val_sets = validation_sets(cfg.data, cfg.train.batch_size, cfg.train.seq_len, max_batches=cfg.train.eval_batches,
                               progress=cfg.train.progress)
    device = resolve_device(cfg.train.device)
    model.to(device)
    results = evaluate(model, val_sets, device, autocast_for(cfg.train.dtype, device))
    print(f"{checkpoint} (step {ckpt.read_trainer_state(checkpoint)['step']})")
    print(format_eval_table(results))
    return 0
