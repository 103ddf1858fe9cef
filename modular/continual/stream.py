"""The stage loop of `modular continual`: one stage per domain of the stream, evaluated on every domain.

Per stage: grow (add a bank per MoE layer, initialised from the new domain's routing), freeze, train
with replay and a re-warmed WSD schedule (optionally distilling from the model before the stage),
review the router, merge to a budget, then evaluate every domain (one row of R[stage][domain]) and
save a checkpoint in the run folder. A stopped stream resumes at the stage and step where it stopped.
"""

from __future__ import annotations

import copy
import json
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from modular.atomic import atomic_write_json, atomic_write_text
from modular.continual import lifecycle
from modular.continual.config import FREEZABLE, INITS, MERGE_METHODS, ROUTER_INITS, STRATEGIES
from modular.errors import ConfigError
from modular.train import checkpoint as ckpt

GROWING = ("add_freeze", "add_freeze_merge")
AVALANCHE = ("ewc", "lwf", "avalanche_replay")


def validate_continual(cfg) -> None:
    """Checks that need the data config too; one sentence each, before anything is written."""
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
    if c.strategy in AVALANCHE:
        from modular.continual.avalanche_adapter import validate_avalanche

        validate_avalanche(cfg)
    for key in ("review_steps", "stage_warmup_steps", "eval_batches", "usage_batches"):
        if c[key] < 0 or (key in ("eval_batches", "usage_batches") and c[key] < 1):
            raise ConfigError(f"continual.{key}={c[key]} is not allowed; it must be a positive integer.")
    if c.distill_weight < 0:
        raise ConfigError(f"continual.distill_weight={c.distill_weight} is not allowed; it must be >= 0.")


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
    def __init__(self, cfg, run_dir: Path, tokenizer, val_sets: dict, config_record: dict):
        self.cfg = cfg
        self.c = cfg.continual
        self.run_dir = Path(run_dir)
        self.tokenizer = tokenizer
        self.val_sets = val_sets
        self.config_record = config_record
        self.state_path = self.run_dir / "continual_state.json"
        self.state = {"stages": [], "initial": None, "global_step": 0}
        if self.state_path.exists():
            self.state = json.loads(self.state_path.read_text())

    # -- helpers ----------------------------------------------------------------------------
    def _save_state(self) -> None:
        atomic_write_json(self.state_path, self.state)

    def _loader(self, weights: dict[str, float], seed_offset: int):
        from modular.data.loader import MixtureLoader

        t = self.cfg.train
        return MixtureLoader.from_config(self.cfg.data, t.batch_size, t.seq_len, weights=weights,
                                         seed=self.cfg.seed + seed_offset, progress=t.progress, tokenizer=self.tokenizer)

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
        from modular.train.evaluate import evaluate
        from modular.train.trainer import autocast_for, resolve_device

        device = resolve_device(self.cfg.train.device)
        return evaluate(model, self.val_sets, device, autocast_for(self.cfg.train.dtype, device))

    @torch.no_grad()
    def _routing_by_domain(self, model) -> dict:
        """Share of each domain's routed assignments that each bank receives (averaged over MoE layers)."""
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

    def _usage_on(self, model, domain: str) -> dict[int, torch.Tensor]:
        loader = self._loader({domain: 1.0}, seed_offset=10_000)
        batches = [next(loader).inputs for _ in range(self.c.usage_batches)]
        return lifecycle.measure_usage(model, batches)

    # -- stages -----------------------------------------------------------------------------
    def grow(self, model, s: int) -> dict[int, int]:
        """Add a bank to every MoE layer for stage s; returns the number of old banks per layer."""
        domain = self.c.stream[s]
        old_banks = {i: len(layer.mlp.banks) for i, layer in enumerate(model.layers) if layer.is_moe}
        usage = self._usage_on(model, domain) if self.c.init in ("copy", "upcycle") else {}
        g = torch.Generator().manual_seed(self.cfg.seed * 1000 + s)
        for i, layer in enumerate(model.layers):
            if layer.is_moe:
                lifecycle.add_experts(layer.mlp, self.c.add_experts, init=self.c.init, copy_from=self.c.copy_from,
                                      router_init=self.c.router_init, usage=usage.get(i), noise=self.c.noise,
                                      generator=g)
        return old_banks

    def merge(self, model, s: int) -> dict:
        """Merge every MoE layer to the budget; returns row sources for the optimizer (see carry_optimizer_state)."""
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
        from modular.models.structure import apply_structure, model_structure
        from modular.models.summary import summarize
        from modular.train.optimizer import build_optimizer
        from modular.train.trainer import Trainer

        stream = list(self.c.stream)
        torch.manual_seed(self.cfg.seed)
        model = build_model(self.cfg)
        if self.cfg.train.init_from:  # e.g. an upcycled model; a checkpoint of this run takes precedence below
            ckpt.load_initial_weights(model, self.cfg.train.init_from)
        done = len(self.state["stages"])
        optimizer = None
        old_banks_prev: dict[int, int] | None = None
        if self.state["initial"] is None:
            self.state["initial"] = {d: r["ppl"] for d, r in self._evaluate(model).items()}
            self._save_state()
        if done:
            last = ckpt.latest_checkpoint(self.run_dir)
            ckpt.verify_checkpoint(last)
            trainer_state = ckpt.read_trainer_state(last)
            apply_structure(model, trainer_state["structure"])
            ckpt.load_model_weights(model, last)
            old_banks_prev = {int(k): v for k, v in (self.state["stages"][-1].get("old_banks") or {}).items()}
            self._apply_freeze(model, done - 1, old_banks_prev)
            optimizer = build_optimizer(model, self.cfg.train)
            ckpt.load_optimizer_state(optimizer, last)
            ckpt.set_rng_state(trainer_state["rng"])
            print(f"resuming the stream after stage {done - 1} ({stream[done - 1]})")

        for s in range(done, len(stream)):
            domain = stream[s]
            steps = stage_steps(self.c, s)
            t0 = time.perf_counter()
            stage_dir = self.run_dir / "stages" / f"{s:02d}-{domain}"
            teacher = None
            if self.c.distill_weight > 0 and s > 0:
                teacher = copy.deepcopy(model).eval()
                for p in teacher.parameters():
                    p.requires_grad_(False)
            old_banks = None
            params_before = summarize(model, self.cfg.train.seq_len)
            if s > 0 and self.c.strategy in GROWING:
                old_banks = self.grow(model, s)
            self._apply_freeze(model, s, old_banks)
            lifecycle.unmask_experts(model)
            summary = summarize(model, self.cfg.train.seq_len)

            stage_cfg = stage_config(self.cfg, steps)
            loader = self._loader(self._weights_for_stage(s), seed_offset=s)
            trainer = Trainer(stage_cfg, stage_dir, model, loader, {}, config_record=self.config_record,
                              log_prefix={"stage": s, "domain": domain})
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
                row_sources = self.merge(model, s)
                self._apply_freeze(model, s, {i: 1 for i in (old_banks or {})} if old_banks else None)
                new_opt = build_optimizer(model, self.cfg.train)
                lifecycle.carry_optimizer_state(optimizer, new_opt, row_sources)
                optimizer = new_opt
            results = self._evaluate(model)
            after = summarize(model, self.cfg.train.seq_len)
            self.state["global_step"] += steps + (self.c.review_steps if s > 0 else 0)
            record = {
                "stage": s,
                "domain": domain,
                "steps": steps,
                "tokens": tokens,
                "review_tokens": review_tokens,
                # training FLOPs at the parameters active during the stage (added experts, before a merge)
                "flops": float(summary["train_flops_per_token"]) * (tokens + review_tokens),
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
            ckpt.save_checkpoint(self.run_dir, self.state["global_step"], model, optimizer,
                                 {"structure": model_structure(model), "stage": s, "domain": domain,
                                  "tokens": tokens},
                                 self.config_record, keep=max(1, self.cfg.train.keep_checkpoints))
            self.state["stages"].append(record)
            self._save_state()
            print(f"stage {s} ({domain}) done: " + ", ".join(f"{d} ppl {r['ppl']:.2f}" for d, r in results.items()))
        return self.state

    def _apply_freeze(self, model, s: int, old_banks: dict[int, int] | None) -> None:
        lifecycle.unfreeze_all(model)
        if s > 0 and self.c.strategy in GROWING and old_banks:
            lifecycle.freeze(model, list(self.c.freeze), old_banks)

    def _review(self, model, s: int, stage_dir: Path) -> int:
        """Train only the router rows on a small replay mix of every domain seen so far."""
        from modular.train.trainer import Trainer

        trainable = {id(p): p.requires_grad for p in model.parameters()}
        for p in model.parameters():
            p.requires_grad_(False)
        for layer in model.moe_layers:
            for bank in layer.banks:
                bank.router_weight.requires_grad_(True)
        review_cfg = stage_config(self.cfg, self.c.review_steps, lr=self.c.review_lr or self.cfg.train.lr)
        seen = list(self.c.stream)[: s + 1]
        loader = self._loader({d: 1.0 for d in seen}, seed_offset=20_000 + s)
        trainer = Trainer(review_cfg, stage_dir / "review", model, loader, {}, config_record=self.config_record,
                          log_prefix={"stage": s, "phase": "router_review"})
        trainer.resume()
        trainer.fit(progress_desc=f"stage {s} router review")
        for p in model.parameters():
            p.requires_grad_(trainable[id(p)])
        return trainer.tokens


def continual_command(overrides: list[str]) -> int:
    from modular.config import to_dict
    from modular.continual.report import write_report
    from modular.train.run import compose_run, prepare_data

    cfg, all_overrides, folder = compose_run(overrides)
    validate_continual(cfg)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("modular continual runs in one process for now (WORLD_SIZE="
                          f"{os.environ['WORLD_SIZE']}); launch it without torchrun, or use modular train under torchrun.")
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"run.dir={folder} is a file, not a folder; choose another run.dir.")
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    tokenizer, _, val_sets = prepare_data(cfg, domains=list(cfg.continual.stream))
    val_sets = {d: val_sets[d] for d in cfg.continual.stream}
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(folder / "overrides.json", all_overrides)
    record = to_dict(cfg)
    atomic_write_text(folder / "config.json", json.dumps(record, indent=2) + "\n")
    first = cfg.continual.first_stage_steps
    print(f"continual run in {folder}: stream {' → '.join(cfg.continual.stream)}, strategy {cfg.continual.strategy}, "
          f"{cfg.continual.steps_per_stage} steps per stage" + (f" ({first} in stage 0)" if first is not None else ""))
    run = ContinualRun(cfg, folder, tokenizer, val_sets, record)
    state = run.run()
    if "stopped_by_signal" in state:
        print(f"stopped; resume with: modular continual run.dir={folder}")
        return 128 + int(state["stopped_by_signal"])
    report = write_report(folder, cfg, run.state)
    print(report["markdown_matrix"])
    print(f"report: {folder / 'report.md'} and {folder / 'report.json'}")
    return 0
