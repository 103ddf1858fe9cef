"""The stage loop of `modular continual`: one stage per domain of the stream, evaluated on every domain.

Per stage: the strategy's hooks before the stage (e.g. grow a bank per MoE layer, freeze), training on
its mixture with a re-warmed WSD schedule (with whatever it attaches: a distillation teacher, a
regulariser), its hooks after (review the router, merge to a budget, persist), then evaluation of
every domain (one row of R[stage][domain]) and a checkpoint in the run folder. The loop knows no
strategy by name (modular/continual/strategies/). A stopped stream resumes at the stage and step where
it stopped.

Under torchrun (expert and data parallelism, modular.parallel) every rank trains its slice of each
global batch and evaluates the same validation batches; the lifecycle operations written for one
process (growth, merging) run on every rank inside `full_experts`, which leaves each rank with its
share of the same experts. Rank 0 alone writes the run folder; checkpoints are gathered on save, so a
stream saved at one world size resumes at another.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from modular.atomic import atomic_write_json, atomic_write_text, read_json
from modular.continual import lifecycle
from modular.continual.config import validate_continual_values
from modular.continual.strategies.base import strategy_class
from modular.errors import ConfigError, RunFolderError
from modular.run.checkpointer import checkpointer_for
from modular.train import checkpoint as ckpt


def validate_continual(cfg, world_size: int = 1) -> None:
    """Checks of the continual group; one sentence each, before anything is written. The strategy checks
    its own keys (and its pieces': growth, merging, distillation…).

    `world_size` is the number of processes torchrun started (1 without torchrun).
    """
    c = cfg.continual
    domains = list(cfg.data.domains)
    if not c.stream:
        raise ConfigError("continual.stream is empty; name at least one domain of data.domains, e.g. [en, de].")
    for d in c.stream:
        if d not in domains:
            raise ConfigError(f"continual.stream names domain '{d}', which is not in data.domains "
                              f"({', '.join(domains)}).")
    if len(set(c.stream)) != len(c.stream):
        raise ConfigError(f"continual.stream={list(c.stream)} lists a domain twice; each stage brings a new domain.")
    validate_continual_values(cfg)
    strategy = strategy_class(c.strategy)
    if c.first_stage_steps == 0 and not cfg.train.init_from:
        raise ConfigError("continual.first_stage_steps=0 trains nothing on the first domain, so the model must come "
                          "from train.init_from (a checkpoint that already knows it); set train.init_from=FOLDER "
                          "or first_stage_steps >= 1.")
    if c.replay > 0 and len(c.stream) < 2:
        raise ConfigError(f"continual.replay={c.replay} needs an earlier stage to replay, but the stream has one domain.")
    strategy.validate(cfg, world_size)


def stage_steps(c, s: int) -> int:
    """Optimizer steps of stage s: first_stage_steps for stage 0 when set, else steps_per_stage."""
    return c.first_stage_steps if s == 0 and c.first_stage_steps is not None else c.steps_per_stage


def stage_config(cfg, steps: int, lr: float | None = None):
    """The train config of one stage: the stage's step budget and a re-warmed WSD schedule."""
    stage = copy.deepcopy(cfg)
    OmegaConf.set_struct(stage, False)
    stage.train.max_steps = steps
    stage.train.schedule = "wsd"
    stage.train.warmup_steps = min(cfg.continual.stage_warmup_steps, max(0, steps - 1))
    stage.train.decay_fraction = cfg.continual.stage_decay_fraction
    stage.train.eval_every = max(1, steps)  # evaluated by the stream after the stage
    stage.train.checkpoint_every = max(1, min(cfg.train.checkpoint_every, steps))
    if lr is not None:
        stage.train.lr = lr
    return stage


def stage_folder(run_dir: Path, stream, s: int) -> Path:
    """Where stage s keeps its checkpoints, metrics and what it grew (e.g. a tokenizer)."""
    return Path(run_dir) / "stages" / f"{s:02d}-{list(stream)[s]}"


SCHEDULE_KEYS = ("max_steps", "schedule", "warmup_steps", "decay_fraction", "lr", "eval_every", "checkpoint_every")


def stage_schedules(cfg) -> list[dict]:
    """What each stage's trainer runs with (train.* as the stage loop sets it): recorded in config.json."""
    c = cfg.continual
    out = []
    for s, domain in enumerate(c.stream):
        entry = {"stage": s, "domain": domain,
                 "train": {k: stage_config(cfg, stage_steps(c, s)).train[k] for k in SCHEDULE_KEYS}}
        if c.review_steps > 0 and s > 0:
            review = stage_config(cfg, c.review_steps, lr=c.review_lr or cfg.train.lr)
            entry["router_review"] = {k: review.train[k] for k in SCHEDULE_KEYS}
        out.append(entry)
    return out


class ContinualRun:
    """The stream of one run folder. `parallel`: modular.parallel's ParallelContext under torchrun, else None.

    The loop knows stages, not strategies: what a strategy does before, during and after a stage are its
    hooks (modular/continual/strategies/), which call back the services below (loaders, trainers, usage
    measurements, experts made whole under expert parallelism).
    """

    def __init__(self, cfg, run_dir: Path, tokenizer, val_sets: dict, config_record: dict, parallel=None):
        self.cfg = cfg
        self.c = cfg.continual
        self.run_dir = Path(run_dir)
        self.tokenizer = tokenizer
        self.val_sets = val_sets
        self.config_record = config_record
        self.parallel = parallel
        self.main = parallel is None or parallel.is_main  # one process writes the run folder and prints
        self.strategy = strategy_class(self.c.strategy)(cfg)
        self.grown_tokenizer_path: str | None = None  # the folder of the grown tokenizer in use, if it grew
        self.stage_notes: dict = {}  # what pieces report about the current stage (e.g. "vocab"), kept in its record
        self.state_path = self.run_dir / "continual_state.json"
        state = {"stages": [], "initial": None, "global_step": 0}
        if self.main and self.state_path.exists():
            state = json.loads(self.state_path.read_text())
        self.state = state if parallel is None else parallel.broadcast_object(state)

    # -- services for strategies ------------------------------------------------------------
    def stage_dir(self, s: int) -> Path:
        return stage_folder(self.run_dir, self.c.stream, s)

    def stage_schedule(self, steps: int, lr: float | None = None):
        return stage_config(self.cfg, steps, lr)

    def loader(self, weights: dict[str, float], seed_offset: int, sharded: bool = True, batch_size: int | None = None,
               seq_len: int | None = None):
        """The mixture's batches: under torchrun each rank's rows of one global batch, or (sharded=False)
        the whole global batch on every rank, for passes that every rank must see alike. Batch size and
        window length default to train.batch_size and train.seq_len."""
        from modular.data.loader import MixtureLoader

        t, p = self.cfg.train, self.parallel
        batch_size, shard = batch_size or t.batch_size, {}
        if p is not None and sharded:
            shard = {"shard": p.rank, "num_shards": p.world_size}
        elif p is not None:
            batch_size = batch_size * p.world_size
        return MixtureLoader.from_config(self.cfg.data, batch_size, seq_len or t.seq_len, weights=weights,
                                         seed=self.cfg.seed + seed_offset, progress=t.progress, tokenizer=self.tokenizer,
                                         **shard)

    def main_first(self, fn):
        """fn() on rank 0, then on the other ranks (rank 0 writes what the others read); fn() in one process."""
        return fn() if self.parallel is None else self.parallel.main_first(fn)

    def use_tokenizer(self, tokenizer, grown_path) -> None:
        """Tokenize with `tokenizer` from now on (a grown vocabulary): training batches, validation sets, and
        the checkpoints' record of it (`grown_path`: its folder in the run folder)."""
        from modular.data.loader import validation_sets

        t, p = self.cfg.train, self.parallel
        batch = t.batch_size * (p.world_size if p is not None else 1)
        self.tokenizer = tokenizer
        self.grown_tokenizer_path = str(grown_path)
        self.val_sets = self.main_first(lambda: validation_sets(
            self.cfg.data, batch, t.seq_len, max_batches=t.eval_batches, domains=list(self.c.stream),
            progress=t.progress, tokenizer=tokenizer))

    def print_(self, text: str) -> None:
        self._print(text)

    def full_experts(self, model):
        """Every expert whole on every rank for the block (one-process lifecycle code), split again after."""
        if self.parallel is None:
            return contextlib.nullcontext(model)
        from modular.parallel.expert_parallel import full_experts

        return full_experts(model, self.parallel)

    def trainer(self, stage_cfg, stage_dir: Path, model, loader, log_prefix: dict):
        from modular.config import to_dict
        from modular.train.trainer import Trainer

        # each stage's checkpoints record the train config the stage ran with
        return Trainer(stage_cfg, stage_dir, model, loader, {}, config_record=to_dict(stage_cfg),
                       log_prefix=log_prefix, parallel=self.parallel)

    def measurement_batches(self, weights: dict[str, float]) -> list[torch.Tensor]:
        """continual.usage_batches whole global batches of the mixture: every rank measures alike."""
        loader = self.loader(weights, seed_offset=10_000, sharded=False)
        return [next(loader).inputs for _ in range(self.c.usage_batches)]

    def usage_on(self, model, domain: str) -> dict[int, torch.Tensor]:
        return lifecycle.measure_usage(model, self.measurement_batches({domain: 1.0}))

    def router_inputs_on(self, model, weights: dict[str, float]) -> dict[int, lifecycle.RouterInputs]:
        return lifecycle.measure_router_inputs(model, self.measurement_batches(weights))

    # -- helpers ----------------------------------------------------------------------------
    def _save_state(self) -> None:
        if self.main:
            atomic_write_json(self.state_path, self.state)

    def _print(self, text: str) -> None:
        if self.main:
            print(text)

    def _evaluate(self, model, route=None) -> dict:
        from modular.run.setup import autocast_for, resolve_device
        from modular.train.evaluate import evaluate

        device = resolve_device(self.cfg.train.device)
        return evaluate(model, self.val_sets, device, autocast_for(self.cfg.train.dtype, device), route=route)

    def oracle_route(self, model):
        """route(domain, inputs): every row of a domain's validation set takes that domain's route (the anchor
        route for a domain the model has not seen yet)."""
        def route(domain, inputs):
            d = model.domains.index(domain) if domain in model.domains else 0
            return torch.full((inputs.shape[0],), d, dtype=torch.int64, device=inputs.device)

        return route

    def inferred_route(self, model, hard: bool = False):
        """route(domain, inputs): the route the domain posterior of each row's prefix picks (no labels);
        continual.inference.mode=soft gives mixture weights unless `hard`."""
        from modular.continual.domain_inference import DomainRouter
        from modular.run.setup import autocast_for, resolve_device

        router = DomainRouter(model, self.c.inference, autocast_for(self.cfg.train.dtype,
                                                                    resolve_device(self.cfg.train.device)))
        if hard:
            return lambda domain, inputs: router.hard_route(router.posterior(inputs))
        return lambda domain, inputs: router.route(inputs)

    @torch.no_grad()
    def _domain_inference_record(self, model, s: int) -> dict:
        """Accuracy per seen domain at prefixes of 16, 64 and 256 tokens, where each domain's validation
        sequences are routed (hard), the leak of earlier domains to later ones, and the inference cost."""
        from modular.continual.domain_inference import DomainRouter, accuracy_at
        from modular.models.summary import summarize

        inf = self.c.inference
        router = DomainRouter(model, inf)
        device = next(model.parameters()).device
        seen = list(self.c.stream)[: s + 1]
        windows = {}
        for domain in seen:
            tokens = self.val_sets[domain].shard.tokens
            n = min(64, (len(tokens) - 1) // 256)
            if n >= 1:
                windows[model.domains.index(domain)] = torch.as_tensor(
                    np.array(tokens[: n * 256]).reshape(n, 256), dtype=torch.int64, device=device)
        accuracy = accuracy_at(router, windows, (16, 64, 256)) if windows else {}
        routed_as, leak = {}, {}
        for domain in seen:
            picks = torch.cat([router.hard_route(router.posterior(b.inputs.to(device))).cpu()
                               for b in self.val_sets[domain]])
            routed_as[domain] = {model.domains[k]: round(float((picks == k).double().mean()), 4)
                                 for k in range(len(model.domains))}
            j = model.domains.index(domain)
            if j < s:  # an earlier domain: the share of its sequences a later domain's route took
                leak[domain] = round(float((picks > j).double().mean()), 4)
        if inf.method == "classifier":
            per_sequence = model.domain_classifier.flops_per_sequence(inf.prefix)
        else:  # one forward pass of the prefix per route
            per_sequence = float(summarize(model, inf.prefix)["flops_per_token"]) * inf.prefix * len(model.domains)
        return {
            "domain_accuracy": {model.domains[k]: {str(p): round(acc[k], 4) for p, acc in accuracy.items()}
                                for k in windows},
            "routed_as": routed_as,
            "leak": leak,
            "inference": {"method": inf.method, "mode": inf.mode, "prefix": inf.prefix,
                          "flops_per_sequence": per_sequence},
        }

    @torch.no_grad()
    def _routing_by_domain(self, model, route=None) -> dict:
        """Share of each domain's routed assignments that each bank receives (averaged over MoE layers),
        with each domain's rows routed by `route` (default: the model's plain forward).

        Runs on the sharded model under torchrun: in evaluation every rank routes its own copy of the same
        batches, so the counts are the one-process counts and no expert needs gathering.
        """
        shares = {}
        device = next(model.parameters()).device
        for domain, val in self.val_sets.items():
            batches = [b.inputs.to(device) for i, b in enumerate(val) if i < 2]
            if route is None:
                usage = lifecycle.measure_usage(model, batches)
            else:
                usage = lifecycle.measure_usage(model, batches, [route(domain, b) for b in batches])
            per_layer = []
            for i, counts in usage.items():
                sizes = model.layers[i].mlp.bank_sizes()
                per_bank = torch.stack([c.sum() for c in torch.split(counts, sizes)])
                per_layer.append(per_bank / per_bank.sum().clamp_min(1))
            if per_layer:
                width = max(len(p) for p in per_layer)
                padded = [torch.cat([p, p.new_zeros(width - len(p))]) for p in per_layer]
                shares[domain] = [round(float(x), 4) for x in torch.stack(padded).mean(0)]
        return shares

    def apply_freeze(self, model, s: int, old_banks: dict[int, int] | None) -> None:
        """Everything trainable, then what the strategy freezes for stage s (also on resume)."""
        lifecycle.unfreeze_all(model)
        self.strategy.freeze(self, model, s, old_banks)

    # -- the loop ---------------------------------------------------------------------------
    def run(self) -> dict:
        from modular.models import build_model
        from modular.models.summary import summarize
        from modular.run.setup import resolve_device

        stream = list(self.c.stream)
        torch.manual_seed(self.cfg.seed)
        model = build_model(self.cfg)
        if self.cfg.train.init_from:  # e.g. an upcycled model; a checkpoint of this run takes precedence below
            ckpt.load_initial_weights(model, self.cfg.train.init_from)
        model.to(resolve_device(self.cfg.train.device))  # evaluation and sharding (NCCL) need it on its device
        if self.parallel is not None:
            from modular.parallel.expert_parallel import parallelize_moe_layers

            parallelize_moe_layers(model, self.parallel)  # each EP rank keeps its share of rank 0's experts
        done = len(self.state["stages"])
        optimizer = None
        if self.state["initial"] is None:
            initial = self._evaluate(model)
            self.state["initial"] = {d: r["ppl"] for d, r in initial.items()}
            self.state["initial_bpb"] = {d: r["bpb"] for d, r in initial.items()}
            self._save_state()
        if done:
            optimizer = self._resume(model, done)
            self._print(f"resuming the stream after stage {done - 1} ({stream[done - 1]})")

        strategy = self.strategy
        for s in range(done, len(stream)):
            domain = stream[s]
            steps = stage_steps(self.c, s)
            t0 = time.perf_counter()
            self.stage_notes = {}
            strategy.before_stage(self, model, s)
            params_before = summarize(model, self.cfg.train.seq_len)
            old_banks = strategy.grow(self, model, s)
            self.apply_freeze(model, s, old_banks)
            lifecycle.unmask_experts(model)
            summary = summarize(model, self.cfg.train.seq_len)

            trainer = self.trainer(self.stage_schedule(steps), self.stage_dir(s), model,
                                   self.loader(strategy.mixture(s), seed_offset=s), {"stage": s, "domain": domain})
            if not trainer.resume() and optimizer is not None:
                lifecycle.carry_optimizer_state(optimizer, trainer.optimizer)
            strategy.attach(self, model, s, trainer)
            trainer.fit(progress_desc=f"stage {s} {domain}")
            if trainer.stopped_by_signal is not None:
                self._save_state()
                return {"stopped_by_signal": trainer.stopped_by_signal}
            optimizer = trainer.optimizer
            tokens = trainer.tokens
            strategy.after_training(self, model, s, trainer)
            optimizer = strategy.after_stage(self, model, s, optimizer, old_banks)
            review_tokens = strategy.extra_tokens()
            by_domain = strategy.routes_by_domain
            # a domain-routed model's honest matrix routes unlabelled text by the inferred domain
            results = self._evaluate(model, self.inferred_route(model) if by_domain else None)
            after = summarize(model, self.cfg.train.seq_len)
            self.state["global_step"] += steps + strategy.extra_steps(s)
            old_banks = strategy.old_banks_after(model, old_banks)
            record = {
                "stage": s,
                "domain": domain,
                "steps": steps,
                "tokens": tokens,
                "review_tokens": review_tokens,
                # training FLOPs at the parameters active during the stage (added experts, before a merge),
                # plus what the strategy spends besides (a teacher's forward passes)
                "flops": (float(summary["train_flops_per_token"]) * (tokens + review_tokens)
                          + strategy.extra_flops(s, tokens, params_before)),
                "params_total": after["total_params"],
                "params_active": after["active_params"],
                "params_total_during_stage": summary["total_params"],
                "params_active_before": params_before["active_params"],
                "experts_per_layer": {str(i): layer.mlp.num_experts for i, layer in enumerate(model.layers)
                                      if layer.is_moe},
                "vocab_size": model.vocab_size,
                "eval": {d: {"loss": r["loss"], "ppl": r["ppl"], "bpb": r["bpb"]} for d, r in results.items()},
                "routing": self._routing_by_domain(model, self.inferred_route(model, hard=True) if by_domain else None),
                "old_banks": {str(k): v for k, v in (old_banks or {}).items()} or None,
                **self.stage_notes,
            }
            if by_domain:
                oracle = self._evaluate(model, self.oracle_route(model))
                record["eval_oracle"] = {d: {"loss": r["loss"], "ppl": r["ppl"], "bpb": r["bpb"]}
                                         for d, r in oracle.items()}
                record["routing_oracle"] = self._routing_by_domain(model, self.oracle_route(model))
                record.update(self._domain_inference_record(model, s))
            record["seconds"] = round(time.perf_counter() - t0, 1)
            self._save_checkpoint(model, optimizer, s, domain, tokens)
            self.state["stages"].append(record)
            self._save_state()
            self._print(f"stage {s} ({domain}) done: " + ", ".join(f"{d} ppl {r['ppl']:.2f}" for d, r in results.items()))
        return self.state

    def _resume(self, model, done: int):
        """Load the checkpoint written after stage `done - 1` (at any world size); returns its optimizer."""
        from modular.continual.vocabulary import load_run_tokenizer
        from modular.run.setup import resolve_device
        from modular.train.optimizer import build_optimizer

        last = ckpt.find_resume_checkpoint(self.run_dir, how_to_go_back=None)
        if last is None:
            raise RunFolderError(f"{self.state_path} records {done} finished stages, but {self.run_dir} has no "
                                 "checkpoint of them; the run folder is damaged.")
        grown = ckpt.read_trainer_state(last).get("tokenizer")
        if grown:  # the vocabulary grew in an earlier stage: the run goes on with that tokenizer
            self.use_tokenizer(load_run_tokenizer(self.run_dir, grown), self.run_dir / grown["path"])
        checkpointer = checkpointer_for(self.parallel)  # each rank slices the full checkpoint to its experts
        trainer_state = checkpointer.restore(model, last, resolve_device(self.cfg.train.device))
        old_banks = {int(k): v for k, v in (self.state["stages"][-1].get("old_banks") or {}).items()}
        self.apply_freeze(model, done - 1, old_banks)
        optimizer = build_optimizer(model, self.cfg.train)
        checkpointer.restore_optimizer(optimizer, model, last)
        ckpt.set_rng_state(trainer_state["rng"])
        return optimizer

    def _save_checkpoint(self, model, optimizer, s: int, domain: str, tokens: int) -> None:
        from modular.continual.vocabulary import tokenizer_record
        from modular.models.structure import model_structure

        state = {"structure": model_structure(model), "stage": s, "domain": domain, "tokens": tokens}
        grown = tokenizer_record(self.run_dir, self.tokenizer, self.grown_tokenizer_path)
        if grown:  # eval, export and resume read the run's text with it
            state["tokenizer"] = grown
        keep = max(1, self.cfg.train.keep_checkpoints)
        # under torchrun gathered on save: rank 0 writes the one-process checkpoint, which loads at any world size
        checkpointer_for(self.parallel).save(self.run_dir, self.state["global_step"], model, optimizer, state,
                                             self.config_record, keep=keep)


def _world_size() -> int:
    """Processes torchrun started (1 without it; a malformed value is init_parallel's to report)."""
    value = os.environ.get("WORLD_SIZE", "1")
    return int(value) if value.isdigit() else 1


def continual_command(overrides: list[str]) -> int:
    from modular.parallel.mesh import run_command
    from modular.run.setup import compose_run

    cfg, all_overrides, folder = compose_run(overrides)
    validate_continual(cfg, world_size=_world_size())
    if cfg.train.resume_from:
        raise ConfigError(f"train.resume_from={cfg.train.resume_from} is for modular train; a continual stream "
                          "resumes after its last finished stage.")
    return run_command(cfg, all_overrides, folder, _continual)


def _continual(cfg, all_overrides: list[str], folder: Path, parallel) -> int:
    from modular.config import to_dict
    from modular.continual.report import write_report
    from modular.run.budget import check_budget
    from modular.run.setup import claimed_run_folder, on_main, prepare_data, saved_overrides

    main = parallel is None or parallel.is_main
    print_ = print if main else (lambda *args: None)
    with claimed_run_folder(folder, "continual", parallel) as establish:
        if cfg.train.threads > 0:
            torch.set_num_threads(cfg.train.threads)
        check_budget(cfg, "continual", parallel)
        stream = list(cfg.continual.stream)
        tokenizer, _, val_sets = prepare_data(cfg, domains=stream, parallel=parallel)
        val_sets = {d: val_sets[d] for d in stream}
        strategy_class(cfg.continual.strategy).check_run(cfg, tokenizer, folder)
        on_main(parallel, lambda: _check_resume(cfg, folder))
        establish()  # everything was checked: the folder may now be created and the run's overrides saved
        record = {**to_dict(cfg), "stage_schedules": stage_schedules(cfg)}  # what each stage's trainer runs with
        if main:
            atomic_write_json(folder / "overrides.json", saved_overrides(all_overrides))
            atomic_write_text(folder / "config.json", json.dumps(record, indent=2) + "\n")
        where = (f" on {parallel.world_size} processes (dp={parallel.dp}, ep={parallel.ep}, {parallel.backend})"
                 if parallel is not None else "")
        first = cfg.continual.first_stage_steps
        print_(f"continual run in {folder}{where}: stream {' → '.join(stream)}, strategy {cfg.continual.strategy}, "
               f"{cfg.continual.steps_per_stage} steps per stage" + (f" ({first} in stage 0)" if first is not None else ""))
        run = ContinualRun(cfg, folder, tokenizer, val_sets, record, parallel=parallel)
        state = run.run()
        if "stopped_by_signal" in state:
            print_(f"stopped; resume with: modular continual run.dir={folder}")
            return 128 + int(state["stopped_by_signal"])
        if main:
            report = write_report(folder, cfg, run.state)
            print(report["markdown_matrix"])
            print(f"report: {folder / 'report.md'} and {folder / 'report.json'}")
        return 0


def _check_resume(cfg, folder: Path) -> None:
    """Before anything is written: the stream's state file reads, and the checkpoint it resumes from (or the
    train.init_from it starts from) verifies and fits the composed model, so a refused start leaves the folder
    as it was."""
    from modular.models import build_model
    from modular.run.checkpointer import Checkpointer

    state_path = folder / "continual_state.json"
    if state_path.is_file():
        state = read_json(state_path, "the stages the stream has finished")
        if not (isinstance(state, dict) and isinstance(state.get("stages"), list)):
            raise RunFolderError(f"{state_path} is damaged: it should hold the stream's state (a JSON object with "
                                 "its finished stages).")
    checkpoint = ckpt.find_resume_checkpoint(folder, how_to_go_back=None)
    if checkpoint is not None:
        Checkpointer().restore(build_model(cfg), checkpoint)
    elif cfg.train.init_from:
        Checkpointer().restore_initial(build_model(cfg), cfg.train.init_from)
