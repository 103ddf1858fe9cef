"""The `continual` config group: the stream of domains, the strategy, and its per-stage policy.

Stage 0 trains the model on the first domain of the stream; every later stage brings one new domain
and applies the policy: grow experts, freeze what must not be forgotten, replay, re-warm the learning
rate, review the router, distil from the previous model, merge back to a budget, grow the vocabulary.
"""

# OmegaConf 2.3 reads typing.Optional / typing.List in structured configs but not `X | None` or `list[...]`.
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

INITS = ("random", "copy", "mean", "upcycle")
ROUTER_INITS = ("copy", "mean", "zero", "random", "masked", "contrast")
FREEZABLE = ("old_experts", "old_router", "attention", "embeddings", "norms", "dense_ffn", "shared_experts")
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
    # vocabulary growth: new tokens, embedding and output-head rows for a domain the tokenizer splits badly
    grow_vocab: GrowVocabConfig = field(default_factory=GrowVocabConfig)
    # evaluation
    eval_batches: int = 8  # validation batches per domain after every stage
    usage_batches: int = 4  # batches of the new domain in the routing pass that picks experts to copy
    plots: bool = True
