"""The stage loop of `modular continual`: one stage per domain of the stream, evaluated on every domain.

Per stage: grow (add a bank per MoE layer, initialised from the new domain's routing), freeze, train
with replay and a re-warmed WSD schedule (optionally distilling from the model before the stage),
review the router, merge to a budget, then evaluate every domain (one row of R[stage][domain]) and
save a checkpoint in the run folder. A stopped stream resumes at the stage and step where it stopped.

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

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from modular.atomic import atomic_write_json, atomic_write_text, read_json
from modular.continual import lifecycle
from modular.continual.config import FREEZABLE, INITS, MERGE_METHODS, ROUTER_INITS, STRATEGIES
from modular.errors import ConfigError, RunFolderError
from modular.run.checkpointer import checkpointer_for
from modular.train import checkpoint as ckpt

GROWING = ("add_freeze", "add_freeze_merge")
AVALANCHE = ("ewc", "lwf", "avalanche_replay")


def validate_continual(cfg, world_size: int = 1) -> None:
    """Checks that need the data config too; one sentence each, before anything is written.

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
    checks = [("strategy", c.strategy, STRATEGIES), ("init", c.init, INITS), ("router_init", c.router_init, ROUTER_INITS),
              ("merge_method", c.merge_method, MERGE_METHODS), ("copy_from", c.copy_from, ("top", "all"))]
    for key, value, allowed in checks:
        if value not in allowed:
            raise ConfigError(f"continual.{key}='{value}' is unknown; allowed: {', '.join(allowed)}.")
    for target in c.freeze:
        if target not in FREEZABLE:
            raise ConfigError(f"continual.freeze contains '{target}', which does not exist; "
                              f"freezable parts are: {', '.join(FREEZABLE)}.")
    if c.steps_per_stage < 1:
        raise ConfigError(f"continual.steps_per_stage={c.steps_per_stage} is not allowed; it must be >= 1.")
    if c.first_stage_steps is not None and c.first_stage_steps < 0:
        raise ConfigError(f"continual.first_stage_steps={c.first_stage_steps} is not allowed; it must be >= 0 "
                          "(or null for steps_per_stage).")
    if c.first_stage_steps == 0 and not cfg.train.init_from:
        raise ConfigError("continual.first_stage_steps=0 trains nothing on the first domain, so the model must come "
                          "from train.init_from (a checkpoint that already knows it); set train.init_from=FOLDER "
                          "or first_stage_steps >= 1.")
    if not 0.0 <= c.replay < 1.0:
        raise ConfigError(f"continual.replay={c.replay} is not allowed; it must be in [0, 1).")
    if c.replay > 0 and len(c.stream) < 2:
        raise ConfigError(f"continual.replay={c.replay} needs an earlier stage to replay, but the stream has one domain.")
    if c.strategy in GROWING:
        if c.add_experts < 1:
            raise ConfigError(f"continual.add_experts={c.add_experts} is not allowed with strategy {c.strategy}; "
                              "add at least 1 expert per stage.")
        from modular.config import experts_per_moe_layer

        if not experts_per_moe_layer(cfg):
            raise ConfigError(f"continual.strategy={c.strategy} grows experts, but the model has no MoE layer; "
                              "use a model with moe_layers, or strategy=naive.")
    ep = int(cfg.parallel.ep)
    if c.strategy in GROWING and c.add_experts % ep:
        raise ConfigError(f"continual.add_experts={c.add_experts} cannot be split evenly over parallel.ep={ep} "
                          f"ranks; add a multiple of {ep} experts per stage.")
    if c.strategy == "add_freeze_merge":
        if c.merge_budget is None:
            raise ConfigError("continual.merge_budget is null but strategy add_freeze_merge needs one; "
                              "set e.g. continual.merge_budget=12.")
        from modular.config import experts_per_moe_layer

        base = max(experts_per_moe_layer(cfg))
        if c.merge_budget < base + 1:
            raise ConfigError(
                f"continual.merge_budget={c.merge_budget} is below the {base} frozen original experts it must keep "
                f"plus one merged expert; use a budget of at least {base + 1}."
            )
        if (c.merge_budget - base) % ep:  # the merged experts form one bank, split over the EP ranks
            raise ConfigError(
                f"continual.merge_budget={c.merge_budget} would leave a merged bank of {c.merge_budget - base} "
                f"experts beside the {base} original ones, which cannot be split evenly over parallel.ep={ep} ranks; "
                f"use {base} plus a multiple of {ep} (e.g. {base + ep})."
            )
        if ep > 1 and c.merge_method in ("task_arithmetic", "ties"):  # one merged expert per parent: any count
            raise ConfigError(
                f"continual.merge_method={c.merge_method} merges experts by parent, so its merged bank may not split "
                f"evenly over parallel.ep={ep} ranks; use merge_method=frequency or cluster under expert parallelism."
            )
    if world_size > 1:
        validate_under_torchrun(cfg, world_size)
    if c.strategy in AVALANCHE:
        from modular.continual.avalanche_adapter import validate_avalanche

        validate_avalanche(cfg)
    for key in ("review_steps", "stage_warmup_steps", "eval_batches", "usage_batches"):
        if c[key] < 0 or (key in ("eval_batches", "usage_batches") and c[key] < 1):
            raise ConfigError(f"continual.{key}={c[key]} is not allowed; it must be a positive integer.")
    if c.router_margin < 0:
        raise ConfigError(f"continual.router_margin={c.router_margin} is not allowed; it must be >= 0.")
    if c.distill_weight < 0:
        raise ConfigError(f"continual.distill_weight={c.distill_weight} is not allowed; it must be >= 0.")


def stage_steps(c, s: int) -> int:
    """Optimizer steps of stage s: first_stage_steps for stage 0 when set, else steps_per_stage."""
    return c.first_stage_steps if s == 0 and c.first_stage_steps is not None else c.steps_per_stage


def validate_under_torchrun(cfg, world_size: int) -> None:
    """What does not run on several processes is refused, not run differently from one process."""
    from modular.parallel.expert_parallel import BATCH_GLOBAL_ROUTERS

    c, r = cfg.continual, cfg.routing
    if c.strategy in AVALANCHE:  # their hooks, importances and buffers are written for one process
        allowed = ", ".join(s for s in STRATEGIES if s not in AVALANCHE)
        raise ConfigError(f"continual.strategy={c.strategy} runs in one process only, but torchrun started "
                          f"WORLD_SIZE={world_size}; under torchrun use one of: {allowed}.")
    if c.distill_weight > 0 and (r.type in BATCH_GLOBAL_ROUTERS or r.capacity_factor is not None):
        # The teacher evaluates each rank's slice alone, so a router that chooses over the whole batch
        # would pick other experts for it than in one process.
        raise ConfigError(
            f"continual.distill_weight={c.distill_weight} under torchrun (WORLD_SIZE={world_size}) needs a router "
            f"that picks experts token by token, but routing.type={r.type} with capacity_factor={r.capacity_factor} "
            "chooses over the whole batch; set continual.distill_weight=0 or use a top-k router without capacity."
        )


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


def distillation_hook(teacher, weight: float, temperature: float):
    """KL(teacher ‖ student) on temperature-softened next-token distributions, scaled by T² (Hinton et al.)."""

    def hook(batch, out):
        with torch.no_grad():
            teacher_logits = teacher(batch.inputs).logits.float()
        t = temperature
        log_p_student = F.log_softmax(out.logits.float() / t, dim=-1)
        p_teacher = F.softmax(teacher_logits / t, dim=-1)
        kl = F.kl_div(log_p_student, p_teacher, reduction="batchmean") / batch.inputs.shape[1]
        return weight * t * t * kl

    return hook


class ContinualRun:
    """The stream of one run folder. `parallel`: modular.parallel's ParallelContext under torchrun, else None."""

    def __init__(self, cfg, run_dir: Path, tokenizer, val_sets: dict, config_record: dict, parallel=None):
        self.cfg = cfg
        self.c = cfg.continual
        self.run_dir = Path(run_dir)
        self.tokenizer = tokenizer
        self.val_sets = val_sets
        self.config_record = config_record
        self.parallel = parallel
        self.main = parallel is None or parallel.is_main  # one process writes the run folder and prints
        self.state_path = self.run_dir / "continual_state.json"
        state = {"stages": [], "initial": None, "global_step": 0}
        if self.main and self.state_path.exists():
            state = json.loads(self.state_path.read_text())
        self.state = state if parallel is None else parallel.broadcast_object(state)

    # -- helpers ----------------------------------------------------------------------------
    def _save_state(self) -> None:
        if self.main:
            atomic_write_json(self.state_path, self.state)

    def _print(self, text: str) -> None:
        if self.main:
            print(text)

    def _loader(self, weights: dict[str, float], seed_offset: int, sharded: bool = True):
        """The mixture's batches: under torchrun each rank's rows of one global batch, or (sharded=False)
        the whole global batch on every rank, for passes that every rank must see alike."""
        from modular.data.loader import MixtureLoader

        t, p = self.cfg.train, self.parallel
        batch_size, shard = t.batch_size, {}
        if p is not None and sharded:
            shard = {"shard": p.rank, "num_shards": p.world_size}
        elif p is not None:
            batch_size = t.batch_size * p.world_size
        return MixtureLoader.from_config(self.cfg.data, batch_size, t.seq_len, weights=weights,
                                         seed=self.cfg.seed + seed_offset, progress=t.progress, tokenizer=self.tokenizer,
                                         **shard)

    def _full_experts(self, model):
        """Every expert whole on every rank for the block (one-process lifecycle code), split again after."""
        if self.parallel is None:
            return contextlib.nullcontext(model)
        from modular.parallel.expert_parallel import full_experts

        return full_experts(model, self.parallel)

    def _weights_for_stage(self, s: int) -> dict[str, float]:
        stream = list(self.c.stream)
        domain = stream[s]
        if self.c.strategy == "joint":
            return {d: 1.0 for d in stream}
        replay = self.c.replay if self.c.strategy in ("replay", *GROWING) else 0.0
        if s == 0 or replay <= 0:
            return {domain: 1.0}
        earlier = stream[:s]
        return {domain: 1.0 - replay, **{d: replay / len(earlier) for d in earlier}}

    def _evaluate(self, model) -> dict:
        from modular.run.setup import autocast_for, resolve_device
        from modular.train.evaluate import evaluate

        device = resolve_device(self.cfg.train.device)
        return evaluate(model, self.val_sets, device, autocast_for(self.cfg.train.dtype, device))

    @torch.no_grad()
    def _routing_by_domain(self, model) -> dict:
        """Share of each domain's routed assignments that each bank receives (averaged over MoE layers).

        Runs on the sharded model under torchrun: in evaluation every rank routes its own copy of the same
        batches, so the counts are the one-process counts and no expert needs gathering.
        """
        shares = {}
        for domain, val in self.val_sets.items():
            inputs = [b.inputs for i, b in enumerate(val) if i < 2]
            usage = lifecycle.measure_usage(model, inputs)
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

    def _measurement_batches(self, weights: dict[str, float]) -> list[torch.Tensor]:
        """continual.usage_batches whole global batches of the mixture: every rank measures alike."""
        loader = self._loader(weights, seed_offset=10_000, sharded=False)
        return [next(loader).inputs for _ in range(self.c.usage_batches)]

    def _usage_on(self, model, domain: str) -> dict[int, torch.Tensor]:
        return lifecycle.measure_usage(model, self._measurement_batches({domain: 1.0}))

    def _router_inputs_on(self, model, weights: dict[str, float]) -> dict[int, lifecycle.RouterInputs]:
        return lifecycle.measure_router_inputs(model, self._measurement_batches(weights))

    # -- stages -----------------------------------------------------------------------------
    def grow(self, model, s: int) -> dict[int, int]:
        """Add a bank to every MoE layer for stage s; returns the number of old banks per layer."""
        domain = self.c.stream[s]
        old_banks = {i: len(layer.mlp.banks) for i, layer in enumerate(model.layers) if layer.is_moe}
        usage = self._usage_on(model, domain) if self.c.init in ("copy", "upcycle") else {}
        inputs_new = inputs_old = {}
        if self.c.router_init == "contrast":
            inputs_new = self._router_inputs_on(model, {domain: 1.0})
            inputs_old = self._router_inputs_on(model, {d: 1.0 for d in self.c.stream[:s]})
        g = torch.Generator().manual_seed(self.cfg.seed * 1000 + s)
        for i, layer in enumerate(model.layers):
            if layer.is_moe:
                inputs = (inputs_new[i], inputs_old[i]) if i in inputs_new else None
                lifecycle.add_experts(layer.mlp, self.c.add_experts, init=self.c.init, copy_from=self.c.copy_from,
                                      router_init=self.c.router_init, usage=usage.get(i), noise=self.c.noise,
                                      generator=g, domain_inputs=inputs, margin=self.c.router_margin)
        return old_banks

    def merge(self, model, s: int) -> dict:
        """Merge every MoE layer to the budget; returns row sources for the optimizer (see carry_optimizer_state).

        Written for one process: under torchrun it runs inside `_full_experts` (see `_merge_and_carry`).
        """
        usage = self._usage_on(model, self.c.stream[s])
        row_sources = {}
        for i, layer in enumerate(model.layers):
            if not layer.is_moe or layer.mlp.num_experts <= self.c.merge_budget:
                continue
            moe = layer.mlp
            names = list(moe.banks[0].expert_param_names) + ["router_weight"]
            # global expert index -> (old parameter, row) for every stacked parameter, before the merge
            where = {name: [(getattr(b, name), r) for b in moe.banks for r in range(b.num_experts)] for name in names}
            origins = lifecycle.merge_layer(moe, self.c.merge_budget, method=self.c.merge_method, usage=usage[i],
                                            density=self.c.merge_density)
            kept = moe.banks[0].num_experts
            for name in names:
                sources = [where[name][o.survivor_of] if o.survivor_of is not None else None for o in origins[kept:]]
                row_sources[id(getattr(moe.banks[1], name))] = sources
        return row_sources

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
            self.state["initial"] = {d: r["ppl"] for d, r in self._evaluate(model).items()}
            self._save_state()
        if done:
            optimizer = self._resume(model, done)
            self._print(f"resuming the stream after stage {done - 1} ({stream[done - 1]})")

        for s in range(done, len(stream)):
            domain = stream[s]
            steps = stage_steps(self.c, s)
            t0 = time.perf_counter()
            stage_dir = self.run_dir / "stages" / f"{s:02d}-{domain}"
            teacher = None
            if self.c.distill_weight > 0 and s > 0:
                teacher = copy.deepcopy(model).eval()  # sharded like the model; shares its process groups
                for p in teacher.parameters():
                    p.requires_grad_(False)
            old_banks = None
            params_before = summarize(model, self.cfg.train.seq_len)
            if s > 0 and self.c.strategy in GROWING:
                with self._full_experts(model):
                    old_banks = self.grow(model, s)
            self._apply_freeze(model, s, old_banks)
            lifecycle.unmask_experts(model)
            summary = summarize(model, self.cfg.train.seq_len)

            trainer = self._trainer(stage_config(self.cfg, steps), stage_dir, model,
                                    self._loader(self._weights_for_stage(s), seed_offset=s), {"stage": s, "domain": domain})
            if teacher is not None:
                teacher.to(trainer.device)
                trainer.loss_hooks.append(distillation_hook(teacher, self.c.distill_weight, self.c.distill_temperature))
            if not trainer.resume() and optimizer is not None:
                lifecycle.carry_optimizer_state(optimizer, trainer.optimizer)
            if self.c.strategy in AVALANCHE:
                from modular.continual.avalanche_adapter import prepare_stage

                prepare_stage(self, model, s, trainer)
            trainer.fit(progress_desc=f"stage {s} {domain}")
            if trainer.stopped_by_signal is not None:
                self._save_state()
                return {"stopped_by_signal": trainer.stopped_by_signal}
            optimizer = trainer.optimizer
            tokens = trainer.tokens
            if self.c.strategy in AVALANCHE:
                from modular.continual.avalanche_adapter import finish_stage

                finish_stage(self, model, s, trainer)
            review_tokens = 0
            if self.c.review_steps > 0 and s > 0:
                review_tokens = self._review(model, s, stage_dir)
            if self.c.strategy == "add_freeze_merge":
                optimizer = self._merge_and_carry(model, s, old_banks, optimizer)
            results = self._evaluate(model)
            after = summarize(model, self.cfg.train.seq_len)
            self.state["global_step"] += steps + (self.c.review_steps if s > 0 else 0)
            # A teacher (distillation, or LwF's previous model) runs one forward pass per training token.
            teacher_flops = (float(params_before["flops_per_token"]) * tokens
                             if s > 0 and (self.c.distill_weight > 0 or self.c.strategy == "lwf") else 0.0)
            record = {
                "stage": s,
                "domain": domain,
                "steps": steps,
                "tokens": tokens,
                "review_tokens": review_tokens,
                # training FLOPs at the parameters active during the stage (added experts, before a merge),
                # plus the teacher's forward passes
                "flops": float(summary["train_flops_per_token"]) * (tokens + review_tokens) + teacher_flops,
                "params_total": after["total_params"],
                "params_active": after["active_params"],
                "params_total_during_stage": summary["total_params"],
                "params_active_before": params_before["active_params"],
                "experts_per_layer": {str(i): layer.mlp.num_experts for i, layer in enumerate(model.layers)
                                      if layer.is_moe},
                "eval": {d: {"loss": r["loss"], "ppl": r["ppl"], "bpb": r["bpb"]} for d, r in results.items()},
                "routing": self._routing_by_domain(model),
                "old_banks": {str(k): v for k, v in (old_banks or {}).items()} or None,
                "seconds": round(time.perf_counter() - t0, 1),
            }
            if self.c.strategy == "add_freeze_merge":
                record["old_banks"] = {str(i): 1 for i, layer in enumerate(model.layers) if layer.is_moe}
            self._save_checkpoint(model, optimizer, s, domain, tokens)
            self.state["stages"].append(record)
            self._save_state()
            self._print(f"stage {s} ({domain}) done: " + ", ".join(f"{d} ppl {r['ppl']:.2f}" for d, r in results.items()))
        return self.state

    def _trainer(self, stage_cfg, stage_dir: Path, model, loader, log_prefix: dict):
        from modular.train.trainer import Trainer

        return Trainer(stage_cfg, stage_dir, model, loader, {}, config_record=self.config_record,
                       log_prefix=log_prefix, parallel=self.parallel)

    def _resume(self, model, done: int):
        """Load the checkpoint written after stage `done - 1` (at any world size); returns its optimizer."""
        from modular.run.setup import resolve_device
        from modular.train.optimizer import build_optimizer

        last = ckpt.find_resume_checkpoint(self.run_dir, how_to_go_back=None)
        if last is None:
            raise RunFolderError(f"{self.state_path} records {done} finished stages, but {self.run_dir} has no "
                                 "checkpoint of them; the run folder is damaged.")
        checkpointer = checkpointer_for(self.parallel)  # each rank slices the full checkpoint to its experts
        trainer_state = checkpointer.restore(model, last, resolve_device(self.cfg.train.device))
        old_banks = {int(k): v for k, v in (self.state["stages"][-1].get("old_banks") or {}).items()}
        self._apply_freeze(model, done - 1, old_banks)
        optimizer = build_optimizer(model, self.cfg.train)
        checkpointer.restore_optimizer(optimizer, model, last)
        ckpt.set_rng_state(trainer_state["rng"])
        return optimizer

    def _merge_and_carry(self, model, s: int, old_banks: dict[int, int] | None, optimizer):
        """Merge to the budget; returns a new optimizer that carries the moments of every surviving expert.

        Under torchrun the moments are made whole with the weights (the merge moves them between rows that
        different ranks hold) and cut to each rank's rows once the experts are split again.
        """
        from modular.parallel import optimizer_state
        from modular.train.optimizer import build_optimizer

        if self.parallel is not None:
            optimizer_state.gather_optimizer_state(optimizer, model, self.parallel)
        with self._full_experts(model):
            row_sources = self.merge(model, s)
            self._apply_freeze(model, s, {i: 1 for i in (old_banks or {})} if old_banks else None)
            new_optimizer = build_optimizer(model, self.cfg.train)
            lifecycle.carry_optimizer_state(optimizer, new_optimizer, row_sources)
        if self.parallel is not None:
            optimizer_state.shard_optimizer_state(new_optimizer, model)
        return new_optimizer

    def _save_checkpoint(self, model, optimizer, s: int, domain: str, tokens: int) -> None:
        from modular.models.structure import model_structure

        state = {"structure": model_structure(model), "stage": s, "domain": domain, "tokens": tokens}
        keep = max(1, self.cfg.train.keep_checkpoints)
        # under torchrun gathered on save: rank 0 writes the one-process checkpoint, which loads at any world size
        checkpointer_for(self.parallel).save(self.run_dir, self.state["global_step"], model, optimizer, state,
                                             self.config_record, keep=keep)

    def _apply_freeze(self, model, s: int, old_banks: dict[int, int] | None) -> None:
        lifecycle.unfreeze_all(model)
        if s > 0 and self.c.strategy in GROWING and old_banks:
            lifecycle.freeze(model, list(self.c.freeze), old_banks)

    def _review(self, model, s: int, stage_dir: Path) -> int:
        """Train only the router rows on a small replay mix of every domain seen so far.

        Only the rows the stage trained: rows frozen by continual.freeze (old_router) stay bitwise
        unchanged through the review too, so the review teaches the new rows which tokens to leave alone.
        """
        trainable = {id(p): p.requires_grad for p in model.parameters()}
        for p in model.parameters():
            p.requires_grad_(False)
        for layer in model.moe_layers:
            for bank in layer.banks:
                bank.router_weight.requires_grad_(trainable[id(bank.router_weight)])
        review_cfg = stage_config(self.cfg, self.c.review_steps, lr=self.c.review_lr or self.cfg.train.lr)
        seen = list(self.c.stream)[: s + 1]
        trainer = self._trainer(review_cfg, stage_dir / "review", model,
                                self._loader({d: 1.0 for d in seen}, seed_offset=20_000 + s),
                                {"stage": s, "phase": "router_review"})
        trainer.resume()
        trainer.fit(progress_desc=f"stage {s} router review")
        for p in model.parameters():
            p.requires_grad_(trainable[id(p)])
        return trainer.tokens


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
        on_main(parallel, lambda: _check_resume(cfg, folder))
        establish()  # everything was checked: the folder may now be created and the run's overrides saved
        record = to_dict(cfg)
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
