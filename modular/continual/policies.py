"""The policy pieces a continual strategy is composed of: growth, freezing, replay, vocabulary growth,
distillation, router review and merging, each configured by its `continual.*` keys.

A piece implements the stage hooks it needs (all optional, called in the order the strategy lists its
pieces); the stage loop (stream.py) calls the strategy, the strategy calls its pieces:

    before_stage(run, model, s)          e.g. a grown vocabulary; the distillation teacher: the model as it was
    grow(run, model, s) -> old banks     a bank per MoE layer for the new domain
    freeze(run, model, s, old_banks)     what stays bitwise unchanged (also applied on resume)
    attach(run, model, s, trainer)       loss hooks, regularisers, loaders
    after_training(run, model, s, trainer)   persist what the next stage needs
    after_stage(run, model, s, optimizer, old_banks) -> optimizer   review, merge
    extra_flops(s, tokens, params_before)    FLOPs spent besides training the model (a teacher's forwards)
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from modular.continual import lifecycle
from modular.errors import ConfigError


class Policy:
    """One composable piece of a strategy; every hook is a no-op unless overridden."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.c = cfg.continual

    @classmethod
    def validate(cls, cfg, world_size: int) -> None:
        """Checks of this piece's keys (`world_size`: processes torchrun started, 1 without it)."""

    @classmethod
    def check_run(cls, cfg, tokenizer, run_dir) -> None:
        """Checks that need the loaded tokenizer or the run folder (before the run writes anything)."""

    def before_stage(self, run, model, s: int) -> None:
        pass

    def grow(self, run, model, s: int) -> dict[int, int] | None:
        return None

    def freeze(self, run, model, s: int, old_banks: dict[int, int] | None) -> None:
        pass

    def attach(self, run, model, s: int, trainer) -> None:
        pass

    def after_training(self, run, model, s: int, trainer) -> None:
        pass

    def after_stage(self, run, model, s: int, optimizer, old_banks: dict[int, int] | None):
        return optimizer

    def extra_flops(self, s: int, tokens: int, params_before: dict) -> float:
        return 0.0

    def extra_tokens(self) -> int:
        """Tokens trained besides the stage's own steps (the router review's), for FLOPs and the record."""
        return 0

    def extra_steps(self, s: int) -> int:
        """Optimizer steps besides the stage's own (the router review's), for the global step count."""
        return 0


# -- replay ---------------------------------------------------------------------------------------


def replay_mixture(c, s: int) -> dict[str, float]:
    """The stage's domain, with continual.replay of each batch drawn uniformly from the earlier domains."""
    stream = list(c.stream)
    domain = stream[s]
    if s == 0 or c.replay <= 0:
        return {domain: 1.0}
    earlier = stream[:s]
    return {domain: 1.0 - c.replay, **{d: c.replay / len(earlier) for d in earlier}}


def new_domain_only(c, s: int) -> dict[str, float]:
    """The stage's domain alone (continual.replay is not applied)."""
    return {list(c.stream)[s]: 1.0}


def all_domains(c, s: int) -> dict[str, float]:
    """The uniform mixture of every domain of the stream (the joint upper bound)."""
    return {d: 1.0 for d in c.stream}


# -- growth and freezing --------------------------------------------------------------------------


class Growth(Policy):
    """Before every stage after the first, add continual.add_experts experts per MoE layer as a new bank,
    initialised by continual.init / copy_from / router_init from the new domain's routing."""

    @classmethod
    def validate(cls, cfg, world_size: int) -> None:
        from modular.config import experts_per_moe_layer

        c = cfg.continual
        if c.add_experts < 1:
            raise ConfigError(f"continual.add_experts={c.add_experts} is not allowed with strategy {c.strategy}; "
                              "add at least 1 expert per stage.")
        if not experts_per_moe_layer(cfg):
            raise ConfigError(f"continual.strategy={c.strategy} grows experts, but the model has no MoE layer; "
                              "use a model with moe_layers, or strategy=naive.")
        ep = int(cfg.parallel.ep)
        if c.add_experts % ep:
            raise ConfigError(f"continual.add_experts={c.add_experts} cannot be split evenly over parallel.ep={ep} "
                              f"ranks; add a multiple of {ep} experts per stage.")

    def grow(self, run, model, s: int) -> dict[int, int] | None:
        if s == 0:
            return None
        with run.full_experts(model):
            return self._grow(run, model, s)

    def _grow(self, run, model, s: int) -> dict[int, int]:
        """Add a bank to every MoE layer for stage s; returns the number of old banks per layer."""
        c = self.c
        domain = c.stream[s]
        old_banks = {i: len(layer.mlp.banks) for i, layer in enumerate(model.layers) if layer.is_moe}
        usage = run.usage_on(model, domain) if c.init in ("copy", "upcycle") else {}
        inputs_new = inputs_old = {}
        if c.router_init == "contrast":
            inputs_new = run.router_inputs_on(model, {domain: 1.0})
            inputs_old = run.router_inputs_on(model, {d: 1.0 for d in c.stream[:s]})
        g = torch.Generator().manual_seed(self.cfg.seed * 1000 + s)
        for i, layer in enumerate(model.layers):
            if layer.is_moe:
                inputs = (inputs_new[i], inputs_old[i]) if i in inputs_new else None
                lifecycle.add_experts(layer.mlp, c.add_experts, init=c.init, copy_from=c.copy_from,
                                      router_init=c.router_init, usage=usage.get(i), noise=c.noise,
                                      generator=g, domain_inputs=inputs, margin=c.router_margin)
        return old_banks


class Freezing(Policy):
    """After growth, continual.freeze keeps what must not be forgotten bitwise unchanged (the old banks,
    their router rows, optionally the shared trunk: the vocabulary rows the stage's domain added still train)."""

    def freeze(self, run, model, s: int, old_banks: dict[int, int] | None) -> None:
        if s > 0 and old_banks:
            lifecycle.freeze(model, list(self.c.freeze), old_banks, current_domain=list(self.c.stream)[s])


# -- vocabulary growth ---------------------------------------------------------------------------


class VocabularyGrowth(Policy):
    """continual.grow_vocab.max_new_tokens > 0: before a stage whose domain the tokenizer splits badly (more
    tokens per byte than grow_vocab.tokens_per_byte_threshold), learn merges on its training text, append up to
    that many tokens and grow the embedding and output head (lifecycle.grow_vocabulary). The grown tokenizer,
    saved in the stage folder, is the run's from then on: training, evaluation, checkpoints. Runs before the
    other pieces' hooks, so that a distillation teacher copied before the stage reads the grown vocabulary."""

    @classmethod
    def validate(cls, cfg, world_size: int) -> None:
        from modular.continual.strategies.base import strategy_class

        c, g = cfg.continual, cfg.continual.grow_vocab
        if not isinstance(g.max_new_tokens, int) or g.max_new_tokens < 0:
            raise ConfigError(f"continual.grow_vocab.max_new_tokens={g.max_new_tokens} is not allowed; use an integer "
                              ">= 0 (0: never grow).")
        if g.max_new_tokens == 0:
            return
        if cfg.data.tokenizer.kind == "byte":
            raise ConfigError(f"continual.grow_vocab.max_new_tokens={g.max_new_tokens} needs a BPE tokenizer, but "
                              "data.tokenizer.kind=byte has a fixed vocabulary of 256 bytes (nothing to grow); train "
                              "one with `modular tokenizer train` and set data.tokenizer.kind=hf, or set "
                              "continual.grow_vocab.max_new_tokens=0.")
        stream = list(c.stream)
        for d in g.domains or []:
            if d not in stream:
                raise ConfigError(f"continual.grow_vocab.domains names '{d}', which is not in continual.stream "
                                  f"({', '.join(stream)}).")
            if d == stream[0]:
                raise ConfigError(f"continual.grow_vocab.domains names '{d}', the first domain of the stream; growth "
                                  "keeps earlier domains' text tokenized as before, so it needs a later stage.")
        for key, value, ok, allowed in (
                ("tokens_per_byte_threshold", g.tokens_per_byte_threshold, 0 <= g.tokens_per_byte_threshold < 1,
                 "a number in [0, 1) (0: always grow)"),
                ("new_char_share", g.new_char_share, 0 <= g.new_char_share < 1, "a number in [0, 1)"),
                ("sample_bytes", g.sample_bytes, isinstance(g.sample_bytes, int) and g.sample_bytes >= 1,
                 "an integer >= 1"),
                ("min_frequency", g.min_frequency, isinstance(g.min_frequency, int) and g.min_frequency >= 1,
                 "an integer >= 1")):
            if not ok:
                raise ConfigError(f"continual.grow_vocab.{key}={value} is not allowed; use {allowed}.")
        limit, size = cfg.model.max_vocab_size, cfg.model.vocab_size
        stages = len(cls.growing_domains(c))
        if limit is not None and size + stages * g.max_new_tokens > limit:
            raise ConfigError(f"continual.grow_vocab.max_new_tokens={g.max_new_tokens} over {stages} stage(s) could "
                              f"grow the vocabulary from {size} to {size + stages * g.max_new_tokens} tokens, beyond "
                              f"model.max_vocab_size={limit}; lower max_new_tokens or raise model.max_vocab_size.")
        if not strategy_class(c.strategy).follows_vocabulary_growth:
            raise ConfigError(f"continual.strategy={c.strategy} cannot follow a growing vocabulary (it keeps a model "
                              "of the old vocabulary); set continual.grow_vocab.max_new_tokens=0 or use another strategy.")

    @classmethod
    def check_run(cls, cfg, tokenizer, run_dir) -> None:
        from modular.continual.stream import stage_folder
        from modular.data.vocab_growth import check_writable, rust_tokenizer_of

        stream = list(cfg.continual.stream)
        growing = cls.growing_domains(cfg.continual)
        if not growing:
            return
        rust_tokenizer_of(tokenizer)
        if tokenizer.vocab_size != cfg.model.vocab_size:
            raise ConfigError(f"continual.grow_vocab appends ids after the tokenizer's {tokenizer.vocab_size} tokens, "
                              f"but model.vocab_size={cfg.model.vocab_size}; set model.vocab_size="
                              f"{tokenizer.vocab_size}.")
        for d in growing:
            check_writable(stage_folder(run_dir, stream, stream.index(d)) / "tokenizer")

    @staticmethod
    def growing_domains(c) -> list[str]:
        """The stream domains that may grow the vocabulary (every one after the first unless named)."""
        if c.grow_vocab.max_new_tokens <= 0:
            return []
        return list(c.grow_vocab.domains) if c.grow_vocab.domains is not None else list(c.stream)[1:]

    def before_stage(self, run, model, s: int) -> None:
        domain = list(self.c.stream)[s]
        if domain not in self.growing_domains(self.c):
            if s > 0 and self.c.grow_vocab.max_new_tokens > 0:
                run.stage_notes["vocab"] = {"domain": domain, "grew": False,
                                            "reason": f"{domain} is not in continual.grow_vocab.domains."}
            return
        growth = run.main_first(lambda: self._grow(run, model, s))
        if growth.grew:
            run.use_tokenizer(growth.tokenizer, growth.tokenizer_path)
        run.stage_notes["vocab"] = growth.record()
        run.print_(f"vocabulary: {growth.reason}")

    def _grow(self, run, model, s: int):
        from modular.data.corpus import iter_documents

        g, data, stream = self.c.grow_vocab, self.cfg.data, list(self.c.stream)
        sample, size = [], 0
        for doc in iter_documents(data, stream[s], "train"):
            if size >= g.sample_bytes:
                break
            sample.append(doc.text)
            size += len(doc.text.encode("utf-8"))

        def earlier_train():
            return (doc.text for d in stream[:s] for doc in iter_documents(data, d, "train"))

        earlier_val = {d: [doc.text for doc in iter_documents(data, d, "val")] for d in stream[:s]}
        return lifecycle.grow_vocabulary(
            model, run.tokenizer, sample, domain=stream[s], out_dir=run.stage_dir(s) / "tokenizer",
            max_new_tokens=g.max_new_tokens, earlier_texts=earlier_train, earlier_val_texts=earlier_val,
            tokens_per_byte_threshold=g.tokens_per_byte_threshold, new_char_share=g.new_char_share,
            max_vocab_size=self.cfg.model.max_vocab_size, min_frequency=g.min_frequency)


# -- distillation ---------------------------------------------------------------------------------


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


class Distillation(Policy):
    """continual.distill_weight > 0: every stage after the first distils from the model as it was before
    the stage (KL on every token of the batch); the teacher's forward passes count as FLOPs."""

    @classmethod
    def validate(cls, cfg, world_size: int) -> None:
        from modular.routing import ROUTER_REGISTRY

        c, r = cfg.continual, cfg.routing
        if c.distill_weight < 0:
            raise ConfigError(f"continual.distill_weight={c.distill_weight} is not allowed; it must be >= 0.")
        if world_size > 1 and c.distill_weight > 0 and (
                ROUTER_REGISTRY[r.type].chooses_over_batch(r, training=False) or r.capacity_factor is not None):
            # The teacher evaluates each rank's slice alone, so a router that chooses over the whole batch
            # would pick other experts for it than in one process.
            raise ConfigError(
                f"continual.distill_weight={c.distill_weight} under torchrun (WORLD_SIZE={world_size}) needs a "
                f"router that picks experts token by token, but routing.type={r.type} with capacity_factor="
                f"{r.capacity_factor} chooses over the whole batch; set continual.distill_weight=0 or use a top-k "
                "router without capacity."
            )

    def __init__(self, cfg):
        super().__init__(cfg)
        self.teacher = None

    def active(self, s: int) -> bool:
        return self.c.distill_weight > 0 and s > 0

    def before_stage(self, run, model, s: int) -> None:
        self.teacher = None
        if self.active(s):
            self.teacher = copy.deepcopy(model).eval()  # sharded like the model; shares its process groups
            for p in self.teacher.parameters():
                p.requires_grad_(False)

    def attach(self, run, model, s: int, trainer) -> None:
        if self.teacher is not None:
            self.teacher.to(trainer.device)
            trainer.loss_hooks.append(distillation_hook(self.teacher, self.c.distill_weight,
                                                        self.c.distill_temperature))

    def extra_flops(self, s: int, tokens: int, params_before: dict) -> float:
        # the teacher runs one forward pass per training token
        return float(params_before["flops_per_token"]) * tokens if self.active(s) else 0.0


# -- router review --------------------------------------------------------------------------------


class RouterReview(Policy):
    """continual.review_steps > 0: after a stage only the router rows it trained learn, on a small replay
    mix of every domain seen so far (rows frozen by continual.freeze stay bitwise unchanged)."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.tokens = 0

    def after_stage(self, run, model, s: int, optimizer, old_banks):
        self.tokens = 0
        if self.c.review_steps > 0 and s > 0:
            self.tokens = self._review(run, model, s)
        return optimizer

    def extra_tokens(self) -> int:
        return self.tokens

    def extra_steps(self, s: int) -> int:
        return self.c.review_steps if s > 0 else 0

    def _review(self, run, model, s: int) -> int:
        trainable = {id(p): p.requires_grad for p in model.parameters()}
        for p in model.parameters():
            p.requires_grad_(False)
        for layer in model.moe_layers:
            for bank in layer.banks:
                bank.router_weight.requires_grad_(trainable[id(bank.router_weight)])
        seen = list(self.c.stream)[: s + 1]
        trainer = run.trainer(run.stage_schedule(self.c.review_steps, lr=self.c.review_lr or self.cfg.train.lr),
                              run.stage_dir(s) / "review", model,
                              run.loader({d: 1.0 for d in seen}, seed_offset=20_000 + s),
                              {"stage": s, "phase": "router_review"})
        trainer.resume()
        trainer.fit(progress_desc=f"stage {s} router review")
        for p in model.parameters():
            p.requires_grad_(trainable[id(p)])
        return trainer.tokens


# -- merging --------------------------------------------------------------------------------------


class Merging(Policy):
    """After every stage, merge each MoE layer back to continual.merge_budget experts (the original bank
    kept as it is, the added ones merged by continual.merge_method), carrying the survivors' moments."""

    @classmethod
    def validate(cls, cfg, world_size: int) -> None:
        from modular.config import experts_per_moe_layer

        c = cfg.continual
        ep = int(cfg.parallel.ep)
        if c.merge_budget is None:
            raise ConfigError(f"continual.merge_budget is null but strategy {c.strategy} needs one; "
                              "set e.g. continual.merge_budget=12.")
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

    def __init__(self, cfg, freezing: Freezing | None):
        super().__init__(cfg)
        self.freezing = freezing

    def after_stage(self, run, model, s: int, optimizer, old_banks):
        """Merge to the budget; returns a new optimizer that carries the moments of every surviving expert.

        Under torchrun the moments are made whole with the weights (the merge moves them between rows that
        different ranks hold) and cut to each rank's rows once the experts are split again.
        """
        from modular.parallel import optimizer_state
        from modular.train.optimizer import build_optimizer

        if run.parallel is not None:
            optimizer_state.gather_optimizer_state(optimizer, model, run.parallel)
        with run.full_experts(model):
            row_sources = self._merge(run, model, s)
            lifecycle.unfreeze_all(model)
            if self.freezing is not None and old_banks:
                self.freezing.freeze(run, model, s, {i: 1 for i in old_banks})
            new_optimizer = build_optimizer(model, self.cfg.train)
            lifecycle.carry_optimizer_state(optimizer, new_optimizer, row_sources)
        if run.parallel is not None:
            optimizer_state.shard_optimizer_state(new_optimizer, model)
        return new_optimizer

    def _merge(self, run, model, s: int) -> dict:
        """Merge every MoE layer to the budget; returns row sources for the optimizer (see carry_optimizer_state)."""
        c = self.c
        usage = run.usage_on(model, c.stream[s])
        row_sources = {}
        for i, layer in enumerate(model.layers):
            if not layer.is_moe or layer.mlp.num_experts <= c.merge_budget:
                continue
            moe = layer.mlp
            names = list(moe.banks[0].expert_param_names) + ["router_weight"]
            # global expert index -> (old parameter, row) for every stacked parameter, before the merge
            where = {name: [(getattr(b, name), r) for b in moe.banks for r in range(b.num_experts)] for name in names}
            origins = lifecycle.merge_layer(moe, c.merge_budget, method=c.merge_method, usage=usage[i],
                                            density=c.merge_density)
            kept = moe.banks[0].num_experts
            for name in names:
                sources = [where[name][o.survivor_of] if o.survivor_of is not None else None for o in origins[kept:]]
                row_sources[id(getattr(moe.banks[1], name))] = sources
        return row_sources

    def old_banks_after(self, model) -> dict[int, int]:
        """After a merge every MoE layer holds the kept original bank and one merged bank."""
        return {i: 1 for i, layer in enumerate(model.layers) if layer.is_moe}


# -- domain-owned routing (isolate) ---------------------------------------------------------------

ISOLATE_FREEZE = ["old_experts", "old_router", "attention", "embeddings", "norms", "dense_ffn", "shared_experts",
                  "old_adapters"]


class DomainRoutes(Policy):
    """Domain-owned experts: the first domain's bank is the shared anchor; every later domain gets a bank
    of continual.add_experts experts of its own, and its rows are routed by the learned top-k router among
    the anchor's experts and its own (plus continual.domain_banks[domain]'s) only."""

    @classmethod
    def validate(cls, cfg, world_size: int) -> None:
        from modular.config import experts_per_moe_layer
        from modular.routing import ROUTER_REGISTRY

        c, r = cfg.continual, cfg.routing
        router = ROUTER_REGISTRY[r.type]
        if not router.supports_expert_subsets or router.chooses_over_batch(r, training=True) or \
                r.capacity_factor is not None:
            raise ConfigError(f"continual.strategy={c.strategy} routes each domain among its own experts, which "
                              f"needs a token-choice router without capacity (routing.type=topk), not "
                              f"routing.type={r.type} with capacity_factor={r.capacity_factor}.")
        if r.bias_balancing:
            raise ConfigError(f"continual.strategy={c.strategy} keeps earlier domains' routing bitwise unchanged, but "
                              "routing.bias_balancing=true moves every expert's selection bias while training; set "
                              "routing.bias_balancing=false.")
        counts = experts_per_moe_layer(cfg)
        if not counts:
            raise ConfigError(f"continual.strategy={c.strategy} gives each domain experts of its own, but the model "
                              "has no MoE layer; use a model with moe_layers.")
        if c.add_experts < 1:
            raise ConfigError(f"continual.add_experts={c.add_experts} is not allowed with strategy {c.strategy}: a "
                              "domain with no bank of its own has no experts to route to beyond the anchor; add at "
                              "least 1 expert per stage.")
        if r.top_k > min(counts):
            raise ConfigError(f"routing.top_k={r.top_k} exceeds the anchor bank's {min(counts)} experts.")
        ep = int(cfg.parallel.ep)
        if c.add_experts % ep:
            raise ConfigError(f"continual.add_experts={c.add_experts} cannot be split evenly over parallel.ep={ep} "
                              f"ranks; add a multiple of {ep} experts per stage.")
        stream = list(c.stream)
        for domain, others in dict(c.domain_banks).items():
            if domain not in stream:
                raise ConfigError(f"continual.domain_banks names domain '{domain}', which is not in continual.stream "
                                  f"({', '.join(stream)}).")
            for other in others:
                if other not in stream or stream.index(other) == 0:
                    raise ConfigError(f"continual.domain_banks.{domain} names '{other}', which has no bank to route "
                                      f"to; name later domains of continual.stream ({', '.join(stream[1:])}).")
                if stream.index(other) > stream.index(domain):
                    raise ConfigError(f"continual.domain_banks.{domain} names '{other}', whose bank is added after "
                                      f"{domain}'s stage; a domain may use the banks of earlier domains only.")

    def grow(self, run, model, s: int) -> dict[int, int] | None:
        from modular.models.domain_classifier import DomainClassifier

        c = self.c
        domain = c.stream[s]
        if model.domain_classifier is None:
            model.domain_classifier = DomainClassifier(c.inference.buckets).to(model.embed_tokens.weight.device)
        if s == 0:
            lifecycle.set_domain_route(model, domain)  # the anchor: bank 0
            return None
        old_banks = {i: len(layer.mlp.banks) for i, layer in enumerate(model.layers) if layer.is_moe}
        with run.full_experts(model):
            # copy init from the experts the new domain's text uses under the anchor route (no domain id yet)
            usage = run.usage_on(model, domain) if c.init in ("copy", "upcycle") else {}
            g = torch.Generator().manual_seed(self.cfg.seed * 1000 + s)
            for i, layer in enumerate(model.layers):
                if layer.is_moe:
                    lifecycle.add_experts(layer.mlp, c.add_experts, init=c.init, copy_from=c.copy_from,
                                          router_init="copy" if c.router_init == "contrast" else c.router_init,
                                          usage=usage.get(i), noise=c.noise, generator=g, domain=domain)
        lifecycle.set_domain_route(model, domain, list(dict(c.domain_banks).get(domain, [])))
        model.domain_classifier.resize(len(model.domains))
        return old_banks


class TrunkAdapters(Policy):
    """Domain-owned trunk capacity: every domain after the first gets zero-initialised low-rank deltas on
    continual.adapter_targets (rank continual.adapter_rank), applied to its rows only."""

    @classmethod
    def validate(cls, cfg, world_size: int) -> None:
        from modular.models.adapters import TARGETS

        c, m = cfg.continual, cfg.model
        for target in c.adapter_targets:
            if target not in TARGETS:
                raise ConfigError(f"continual.adapter_targets contains '{target}', which does not exist; adapter "
                                  f"targets are: {', '.join(TARGETS)}.")
        if not (isinstance(c.adapter_rank, int) and c.adapter_rank >= 1):
            raise ConfigError(f"continual.adapter_rank={c.adapter_rank} is not allowed; it must be an integer >= 1.")
        if c.adapter_targets:
            head_dim = m.d_model // m.n_heads
            widths = {"q_proj": m.d_model, "o_proj": m.d_model, "k_proj": m.n_kv_heads * head_dim,
                      "v_proj": m.n_kv_heads * head_dim, "dense_ffn": min(m.d_model, m.ffn_dim),
                      "lm_head": min(m.d_model, m.vocab_size), "embeddings": m.d_model, "norms": m.d_model}
            narrowest = min(c.adapter_targets, key=lambda t: widths[t])
            if c.adapter_rank > widths[narrowest]:
                raise ConfigError(f"continual.adapter_rank={c.adapter_rank} is larger than {narrowest}, whose "
                                  f"narrowest side is {widths[narrowest]}; use a rank <= {widths[narrowest]}.")
        if c.adapter_alpha is not None and not c.adapter_alpha > 0:
            raise ConfigError(f"continual.adapter_alpha={c.adapter_alpha} is not allowed; it must be > 0 (or null).")

    def grow(self, run, model, s: int) -> dict[int, int] | None:
        if s > 0 and self.c.adapter_targets:
            g = torch.Generator().manual_seed(self.cfg.seed * 1000 + 500 + s)
            lifecycle.add_adapters(model, self.c.stream[s], list(self.c.adapter_targets), self.c.adapter_rank,
                                   self.c.adapter_alpha, generator=g)
        return None


class DomainFreezing(Policy):
    """After the first stage the shared trunk, every earlier bank and router row and every earlier domain's
    deltas are frozen: what an earlier domain computes cannot move."""

    def freeze(self, run, model, s: int, old_banks: dict[int, int] | None) -> None:
        if s > 0:
            lifecycle.freeze(model, ISOLATE_FREEZE, old_banks, current_domain=self.c.stream[s])


class ClassifierTraining(Policy):
    """After every stage the domain classifier learns the domains seen so far (the new one and replayed
    windows of the earlier ones), so unlabelled text can be routed."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.flops = 0.0
        self.result: dict = {}

    def after_stage(self, run, model, s: int, optimizer, old_banks):
        inf = self.c.inference
        self.flops = 0.0
        if inf.method != "classifier":
            return optimizer
        seen = list(self.c.stream)[: s + 1]
        # windows as long as the longest prefix accuracy is reported at (256), so every prefix length trains
        loader = run.loader({d: 1.0 for d in seen}, seed_offset=30_000 + s, sharded=False, batch_size=inf.batch_size,
                            seq_len=max(self.cfg.train.seq_len, 256))
        g = torch.Generator().manual_seed(self.cfg.seed * 1000 + 700 + s)

        def sample(step):
            batch = next(loader)
            return batch.inputs, model.domain_ids_of(batch.domain_names, batch.domain_ids)

        self.result = model.domain_classifier.fit(sample, inf.steps, inf.lr, g)
        self.flops = self.result["flops"]
        return optimizer

    def extra_flops(self, s: int, tokens: int, params_before: dict) -> float:
        return self.flops
