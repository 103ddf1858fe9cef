"""The `continual` config group: the stream of domains, the strategy, and its per-stage policy.

Stage 0 trains the model on the first domain of the stream; every later stage brings one new domain
and applies the policy: grow experts, freeze what must not be forgotten, replay, re-warm the learning
rate, review the router, distil from the previous model, merge back to a budget, grow the vocabulary.
"""

# OmegaConf 2.3 reads typing.Optional / typing.List in structured configs but not `X | None` or `list[...]`.
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

INITS = ("random", "copy", "mean", "upcycle")
ROUTER_INITS = ("copy", "mean", "zero", "random", "masked", "contrast")
FREEZABLE = ("old_experts", "old_router", "attention", "embeddings", "norms", "dense_ffn", "shared_experts",
             "old_adapters")
INFERENCE_METHODS = ("classifier", "likelihood")
INFERENCE_MODES = ("hard", "soft")


@dataclass
class InferenceConfig:
    """How a domain-routed model picks the route of text that has no domain label (evaluation, generation,
    export reports): a per-sequence domain posterior from the prefix."""

    method: str = "classifier"  # classifier (hashed n-grams, trained as domains arrive) | likelihood (p(prefix | route))
    mode: str = "hard"  # hard: the most likely domain's route | soft: mix the routes' predictions by the posterior
    prefix: int = 64  # tokens of each sequence the posterior is computed from
    min_posterior: float = 0.5  # below it no seen domain is likely: the anchor route (the base model)
    buckets: int = 65536  # classifier: hashed n-gram features (1-, 2- and 3-grams of token ids)
    steps: int = 200  # classifier: optimizer steps after each stage, on all seen domains
    batch_size: int = 64  # classifier: windows per step
    lr: float = 0.05
MERGE_METHODS = ("frequency", "cluster", "task_arithmetic", "ties")


@dataclass
class GrowVocabConfig:
    """Vocabulary growth before a stage whose domain the tokenizer splits badly (byte-level BPE tokenizers)."""

    max_new_tokens: int = 0  # tokens a stage may add (0: never grow)
    domains: Optional[List[str]] = None  # stream domains that may grow (null: every stage after the first)
    # grow only when the current tokenizer needs more than this many tokens per byte of the new domain's text
    tokens_per_byte_threshold: float = 0.4
    # merges hold a character that makes up less than this share of the earlier domains' training text
    new_char_share: float = 1e-5
    sample_bytes: int = 4_000_000  # the new domain's training text the merges are learnt on (its first bytes)
    min_frequency: int = 2  # a merge must occur at least this often in that sample


@dataclass
class ContinualConfig:
    stream: List[str] = field(default_factory=lambda: ["en", "de", "code_py"])  # domains of data.domains, in order
    steps_per_stage: int = 120  # optimizer steps of every stage (overrides any per-strategy budget)
    # steps of stage 0 when it differs (null: steps_per_stage), e.g. a longer base stage; 0 with
    # train.init_from: the initial model already knows the first domain, stage 0 only evaluates it
    first_stage_steps: Optional[int] = None
    strategy: str = "add_freeze"  # a name in modular.continual.strategies.STRATEGY_REGISTRY
    # growth (add_* strategies): new experts per MoE layer at every stage after the first
    add_experts: int = 2
    init: str = "copy"  # random | copy (of the most-used experts on the new domain, or all) | mean | upcycle
    copy_from: str = "top"  # top | all
    noise: float = 0.0  # relative Gaussian noise added to copied expert weights (breaks symmetry)
    router_init: str = "copy"  # new router rows: copy | mean | zero | random | masked (never routed: -inf logits)
    # | contrast (copied, then moved along the Fisher direction separating the new domain's router inputs
    #   from the earlier domains': the new experts start preferred by the new domain, avoided by the old)
    router_margin: float = 1.0  # contrast: logit shift, in standard deviations of the old experts' logits
    # freezing (add_* strategies): what stays bitwise unchanged during a stage
    freeze: List[str] = field(default_factory=lambda: ["old_experts", "old_router"])
    # replay: the share of each batch drawn from earlier domains (uniformly over them)
    replay: float = 0.0
    # learning rate per stage: re-warm to train.lr, hold, decay over the last decay_fraction (WSD)
    stage_warmup_steps: int = 10
    stage_decay_fraction: float = 0.2
    # router review after a stage: only router rows train, on a small replay mix of every seen domain
    review_steps: int = 0
    review_lr: Optional[float] = None  # default: train.lr
    # distillation against the model as it was before the stage (KL on logits, weight and temperature)
    distill_weight: float = 0.0
    distill_temperature: float = 1.0
    # merging (add_freeze_merge): reduce every MoE layer to at most merge_budget experts after each stage
    merge_budget: Optional[int] = None
    merge_method: str = "frequency"  # frequency | cluster | task_arithmetic | ties
    merge_density: float = 0.2  # ties: share of each task vector kept
    # regularisers of the ewc / lwf baselines (applied through the Avalanche adapter)
    ewc_lambda: float = 100.0
    lwf_alpha: float = 1.0
    lwf_temperature: float = 2.0
    avalanche_mem_size: int = 200  # avalanche_replay: windows kept in the replay buffer
    # domain-owned routing (isolate): each domain's rows use the anchor bank, the bank added for it and the
    # banks of the domains domain_banks lists for it; its own low-rank trunk deltas (adapter_*); and the
    # route of unlabelled text is inferred per sequence (inference.*)
    domain_banks: Dict[str, List[str]] = field(default_factory=dict)
    adapter_targets: List[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    adapter_rank: int = 8
    adapter_alpha: Optional[float] = None  # the deltas are scaled by alpha / rank; null = rank (scale 1)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    # vocabulary growth: new tokens, embedding and output-head rows for a domain the tokenizer splits badly
    grow_vocab: GrowVocabConfig = field(default_factory=GrowVocabConfig)
    # evaluation
    eval_batches: int = 8  # validation batches per domain after every stage
    usage_batches: int = 4  # batches of the new domain in the routing pass that picks experts to copy
    plots: bool = True


def validate_continual_values(cfg) -> None:
    """The continual group's own values (names and ranges), checked for every composed config.

    What running a stream needs of the other groups (its domains in data.domains, MoE layers to grow,
    experts divisible over parallel.ep, torchrun's WORLD_SIZE) is `modular.continual.validate_continual`'s,
    run by `modular continual` only: a `modular train data=sample_en` must not be refused because the
    default stream names domains that data preset lacks.
    """
    from modular.continual.strategies.base import (
        strategy_class,  # the registry (loaded at compose, not import)
    )
    from modular.errors import ConfigError

    c = cfg.continual
    strategy_class(c.strategy)
    checks = [("init", c.init, INITS), ("router_init", c.router_init, ROUTER_INITS),
              ("inference.method", c.inference.method, INFERENCE_METHODS),
              ("inference.mode", c.inference.mode, INFERENCE_MODES),
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
    if not 0.0 <= c.replay < 1.0:
        raise ConfigError(f"continual.replay={c.replay} is not allowed; it must be in [0, 1).")
    for key in ("review_steps", "stage_warmup_steps", "eval_batches", "usage_batches"):
        if c[key] < 0 or (key in ("eval_batches", "usage_batches") and c[key] < 1):
            raise ConfigError(f"continual.{key}={c[key]} is not allowed; it must be a positive integer.")
    if c.router_margin < 0:
        raise ConfigError(f"continual.router_margin={c.router_margin} is not allowed; it must be >= 0.")
    if c.distill_weight < 0:
        raise ConfigError(f"continual.distill_weight={c.distill_weight} is not allowed; it must be >= 0.")
    inf = c.inference
    for key, value, ok, allowed in [("prefix", inf.prefix, isinstance(inf.prefix, int) and inf.prefix >= 2, "an integer >= 2"),
                                    ("min_posterior", inf.min_posterior, 0 <= inf.min_posterior <= 1, "in [0, 1]"),
                                    ("buckets", inf.buckets, isinstance(inf.buckets, int) and inf.buckets >= 1, "an integer >= 1"),
                                    ("steps", inf.steps, isinstance(inf.steps, int) and inf.steps >= 0, "an integer >= 0"),
                                    ("batch_size", inf.batch_size, isinstance(inf.batch_size, int) and inf.batch_size >= 1,
                                     "an integer >= 1"),
                                    ("lr", inf.lr, inf.lr > 0, "> 0")]:
        if not ok:
            raise ConfigError(f"continual.inference.{key}={value} is not allowed; it must be {allowed}.")
