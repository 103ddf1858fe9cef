"""`modular train` and `modular eval`: compose the config, build data and model, run the Trainer.

A run folder remembers the overrides it was started with (`overrides.json`), so `modular train
run.dir=DIR` resumes with the same config, and later overrides (e.g. a larger train.max_steps) apply on top.
Nothing is written to the folder until the config, the data and the checkpoint to resume from are known
to be good; while training, the folder is locked against a second command.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from modular.atomic import atomic_write_json, atomic_write_text
from modular.config import to_dict
from modular.run.setup import claimed_run_folder, compose_run, load_run_model, prepare_data, saved_overrides


def train_command(overrides: list[str]) -> int:
    from modular.parallel.mesh import run_command

    cfg, all_overrides, folder = compose_run(overrides)
    return run_command(cfg, all_overrides, folder, _train)


def _train(cfg, all_overrides: list[str], folder: Path, parallel) -> int:
    from modular.models import build_model
    from modular.run.budget import check_budget
    from modular.run.checkpointer import Checkpointer
    from modular.train import checkpoint as ckpt
    from modular.train.evaluate import format_eval_table
    from modular.train.trainer import Trainer

    main = parallel is None or parallel.is_main  # one process prints and writes the run's files
    print_ = print if main else (lambda *args: None)
    with claimed_run_folder(folder, "train", parallel) as establish:
        if cfg.train.threads > 0:
            torch.set_num_threads(cfg.train.threads)
        check_budget(cfg, "train", parallel)
        _tokenizer, loader, val_sets = prepare_data(cfg, parallel=parallel)
        checkpoint = ckpt.find_resume_checkpoint(folder, cfg.train.resume_from)
        torch.manual_seed(cfg.seed)
        model = build_model(cfg)
        if cfg.train.init_from and checkpoint is None:
            Checkpointer().restore_initial(model, cfg.train.init_from)
        record = to_dict(cfg)
        trainer = Trainer(cfg, folder, model, loader, val_sets, config_record=record, parallel=parallel)
        resumed = checkpoint is not None and trainer.resume(checkpoint)
        # Everything was checked: the folder may now be created (or changed) and the run's overrides saved.
        establish()
        if main:
            if checkpoint is not None and cfg.train.resume_from:
                for moved in ckpt.supersede_newer(folder, checkpoint):
                    print(f"moved {moved.name}, newer than train.resume_from, to {moved.parent}")
            atomic_write_json(folder / "overrides.json", saved_overrides(all_overrides))
            atomic_write_text(folder / "config.json", json.dumps(record, indent=2) + "\n")
        if resumed:
            print_(f"resuming {folder} from step {trainer.step}")
        else:
            print_(f"training in {folder}" + (f" on {parallel.world_size} processes (dp={parallel.dp}, "
                                              f"ep={parallel.ep}, {parallel.backend})" if parallel else ""))
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
    from modular.run.setup import autocast_for, resolve_device
    from modular.train import checkpoint as ckpt
    from modular.train.evaluate import evaluate, format_eval_table

    model, cfg, _folder, checkpoint = load_run_model(overrides, "eval")
    val_sets = validation_sets(cfg.data, cfg.train.batch_size, cfg.train.seq_len, max_batches=cfg.train.eval_batches,
                               progress=cfg.train.progress)
    device = resolve_device(cfg.train.device)
    model.to(device)
    autocast = autocast_for(cfg.train.dtype, device)
    print(f"{checkpoint} (step {ckpt.read_trainer_state(checkpoint)['step']})")
    if not model.domains:
        print(format_eval_table(evaluate(model, val_sets, device, autocast)))
        return 0
    # A domain-routed run: each sequence takes the route its prefix's domain posterior picks (no labels),
    # and beside it the route of its true domain (the anchor's for a domain the run never saw).
    from modular.continual.domain_inference import DomainRouter

    router = DomainRouter(model, cfg.continual.inference, autocast)

    def oracle(domain, inputs):
        d = model.domains.index(domain) if domain in model.domains else 0
        return torch.full((inputs.shape[0],), d, dtype=torch.int64, device=inputs.device)

    inferred = evaluate(model, val_sets, device, autocast, route=lambda domain, inputs: router.route(inputs))
    inf = cfg.continual.inference
    print(f"routed by the inferred domain ({inf.method}, {inf.prefix}-token prefix, {inf.mode}):")
    print(format_eval_table(inferred))
    print("routed by each sequence's true domain (oracle):")
    print(format_eval_table(evaluate(model, val_sets, device, autocast, route=oracle)))
    return 0
