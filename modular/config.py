"""Typed configuration: one dataclass per config group, registered as hydra structured configs.

`compose_config(overrides)` turns command-line overrides into a validated `Config`; every bad key,
type or value raises `ConfigError` with one sentence naming the key, the bad value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

from modular.continual.config import ContinualConfig
from modular.data.config import DataConfig
from modular.errors import ConfigError
from modular.export.config import ExportConfig, UpcycleConfig, validate_export, validate_upcycle
from modular.parallel.config import ParallelConfig, validate_parallel
from modular.train.config import TrainConfig

# The presets ship inside the package (configs/ at the repository root is a link to them), so an installed
# wheel composes the same configs as a checkout; MODULAR_CONFIG_DIR points elsewhere.
CONFIG_DIR = Path(os.environ.get("MODULAR_CONFIG_DIR", Path(__file__).resolve().parent / "configs"))


@dataclass
class ModelConfig:
    """The decoder: sizes, attention, and which layers hold a mixture of experts."""

    name: str = "small"
    vocab_size: int = 259  # the byte tokenizer: 256 bytes + pad, bos, eos
    max_vocab_size: Optional[int] = None  # the most tokens vocabulary growth may take it to (null: no limit)
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2  # grouped-query attention: n_heads % n_kv_heads == 0
    ffn_dim: int = 688  # hidden size of the dense SwiGLU FFN (dense layers)
    max_seq_len: int = 512
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    init_std: float = 0.02
    # Which layers are MoE: "all", "none", "every_n" (with moe_every / moe_offset) or a list of indices.
    moe_layers: Any = "all"
    moe_every: int = 2
    moe_offset: int = 1


@dataclass
class ExpertsConfig:
    """The experts of every MoE layer: their kind, count and size, and the always-on shared experts."""

    type: str = "swiglu"  # a name in modular.experts.EXPERT_REGISTRY
    num_experts: int = 8
    ffn_dim: int = 256  # hidden size of one expert
    # Per-MoE-layer expert counts (one entry per MoE layer, in layer order); None = num_experts everywhere.
    num_experts_per_layer: Optional[List[int]] = None
    rank: int = 16  # low-rank experts: rank of each expert's delta on the shared base FFN
    shared_experts: int = 0  # always-on experts added to every token's output (DeepSeek-MoE)
    shared_ffn_dim: Optional[int] = None  # hidden size of one shared expert; None = ffn_dim


@dataclass
class RoutingConfig:
    """The router of every MoE layer, its auxiliary losses and the dispatcher's capacity policy."""

    type: str = "topk"  # a name in modular.routing.ROUTER_REGISTRY
    top_k: int = 2
    score: str = "softmax"  # topk: softmax | sigmoid
    normalize: bool = True  # renormalise the selected weights to sum to 1 (Mixtral)
    bias_balancing: bool = False  # auxiliary-loss-free balancing by a selection-only bias (DeepSeek-V3)
    bias_update_rate: float = 0.001
    capacity_factor: Optional[float] = None  # None = dropless (token choice); required for expert_choice
    drop_policy: str = "probs"  # which assignments an over-full expert keeps: probs | position
    sinkhorn_iters: int = 8
    jitter: float = 0.0  # multiplicative input noise during training (Switch Transformer)
    aux_loss_weight: float = 0.01  # Switch load-balancing loss
    z_loss_weight: float = 0.001  # router z-loss (ST-MoE)


@dataclass
class KernelsConfig:
    """Which implementation runs the experts' grouped matmuls."""

    backend: str = "auto"  # auto | torch | triton | megablocks


@dataclass
class RunConfig:
    """Where a run writes its outputs."""

    name: str = "modular"
    dir: Optional[str] = None  # default: runs/<name>-<timestamp>/


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    experts: ExpertsConfig = field(default_factory=ExpertsConfig)
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    kernels: KernelsConfig = field(default_factory=KernelsConfig)
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    continual: ContinualConfig = field(default_factory=ContinualConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    upcycle: UpcycleConfig = field(default_factory=UpcycleConfig)
    seed: int = 0


GROUP_SCHEMAS = {
    "model": ModelConfig,
    "experts": ExpertsConfig,
    "routing": RoutingConfig,
    "kernels": KernelsConfig,
    "run": RunConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "continual": ContinualConfig,
    "parallel": ParallelConfig,
    "export": ExportConfig,
    "upcycle": UpcycleConfig,
}

_registered = False


def register_configs() -> None:
    """Register the dataclasses with hydra's ConfigStore (idempotent)."""
    global _registered
    if _registered:
        return
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
    for group, schema in GROUP_SCHEMAS.items():
        cs.store(group=group, name=f"base_{group}", node=schema)
    _registered = True


# ---------------------------------------------------------------------------------------------
# Composition


def group_presets(group: str) -> list[str]:
    folder = CONFIG_DIR / group
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def _dataclass_fields(schema) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(schema)}


def _check_override(override: str) -> None:
    """Check an override's key and group before hydra sees it, so the message can name what is allowed."""
    if "=" not in override:
        raise ConfigError(f"Override '{override}' is not of the form key=value (e.g. model.d_model=512).")
    key, value = override.split("=", 1)
    key = key.lstrip("+~")
    if key == "" or key.startswith("hydra"):
        raise ConfigError(f"Override key '{key}' is not allowed; use a config key such as model.d_model.")
    parts = key.split(".")
    top = _dataclass_fields(Config)
    if parts[0] not in top:
        raise ConfigError(
            f"Unknown config key '{key}'; allowed top-level keys are: {', '.join(sorted(top))}."
        )
    if len(parts) == 1:
        if parts[0] in GROUP_SCHEMAS:
            presets = group_presets(parts[0])
            if value not in presets:
                raise ConfigError(
                    f"Unknown {parts[0]} preset '{value}'; available presets are: {', '.join(presets) or 'none'}."
                )
        else:
            _check_value_type(key, override, top[parts[0]].type)
        return
    schema = top[parts[0]].default_factory if top[parts[0]].default_factory is not dataclasses.MISSING else None
    for depth, part in enumerate(parts[1:], start=1):
        if schema is None or not dataclasses.is_dataclass(schema):
            return  # inside a free-form dict (e.g. data domains): hydra checks the rest
        fields = _dataclass_fields(schema)
        if part not in fields:
            group = ".".join(parts[:depth])
            raise ConfigError(
                f"Unknown config key '{key}'; allowed keys in {group} are: {', '.join(sorted(fields))}."
            )
        f = fields[part]
        if depth == len(parts) - 1 and not override.startswith("~"):
            _check_value_type(key, override, f.type)
        schema = f.default_factory if f.default_factory is not dataclasses.MISSING else None


_TYPE_WORDS = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string"}


def _parsed_value(override: str):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        return OverridesParser.create().parse_override(override).value()
    except Exception:  # noqa: BLE001  (any parse failure: hydra reports grammar errors itself)
        return None


def _matches(value, type_name: str) -> bool:
    if type_name == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if type_name == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if type_name == "bool":
        return isinstance(value, bool)
    if type_name == "str":
        return isinstance(value, (str, int, float)) and not isinstance(value, bool)
    return True


def _check_value_type(key: str, override: str, annotation) -> None:
    """Reject a value of the wrong type with a message naming the key, the value and the type wanted."""
    type_str = str(annotation).replace("typing.", "").replace(" ", "")
    optional = type_str.startswith("Optional[")
    inner = type_str[len("Optional["):-1] if optional else type_str
    value = _parsed_value(override)
    shown = override.split("=", 1)[1]
    if value is None:
        if not optional and inner not in ("Any",) and shown.strip().lower() in ("null", "none", "~"):
            raise ConfigError(f"{key}={shown} is not allowed; it must be {_TYPE_WORDS.get(inner, inner)}, not null.")
        return
    if inner.startswith("List["):
        element = inner[len("List["):-1]
        if not isinstance(value, list) or not all(_matches(v, element) for v in value):
            raise ConfigError(
                f"{key}={shown} is not allowed; it must be a list of {_TYPE_WORDS.get(element, element).split(' ', 1)[-1]}s"
                f"{' or null' if optional else ''}."
            )
        return
    if inner in _TYPE_WORDS and not _matches(value, inner):
        raise ConfigError(
            f"{key}={shown} is not allowed; it must be {_TYPE_WORDS[inner]}{' or null' if optional else ''}."
        )


def compose_config(overrides: list[str] | None = None, config_name: str = "config"):
    """Compose the hydra config from `configs/` and the overrides, then validate it. Returns a DictConfig."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    overrides = list(overrides or [])
    for override in overrides:
        _check_override(override)
    register_configs()
    if not CONFIG_DIR.is_dir():
        raise ConfigError(f"Config folder '{CONFIG_DIR}' does not exist; set MODULAR_CONFIG_DIR to the configs/ folder.")
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            cfg = compose(config_name=config_name, overrides=overrides)
    except Exception as exc:  # noqa: BLE001  (hydra/omegaconf raise many types; all are user input)
        raise ConfigError(_one_sentence(exc)) from None
    finally:
        GlobalHydra.instance().clear()
    try:
        OmegaConf.resolve(cfg)
    except Exception as exc:  # noqa: BLE001  (an interpolation error of any type is the user's input)
        raise ConfigError(_one_sentence(exc)) from None
    validate(cfg)
    return cfg


def _one_sentence(exc: BaseException) -> str:
    """Reduce a hydra/omegaconf exception to its first meaningful line, naming the key and value."""
    text = str(exc).strip()
    cause = exc.__cause__ or exc.__context__
    while cause is not None and ("Error merging" in text or "Could not override" in text or not text):
        inner = str(cause).strip()
        if inner:
            text = f"{text.splitlines()[0] if text else ''} {inner}".strip()
        cause = cause.__cause__ or cause.__context__
        if cause is None:
            break
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    keep = [ln for ln in lines if not ln.startswith(("full_key", "object_type", "reference_type", "Set the"))]
    full_key = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("full_key:")), "")
    message = " ".join(keep[:2]) if keep else type(exc).__name__
    if full_key and full_key not in message:
        message = f"{full_key}: {message}"
    return message.rstrip(".") + "."


# ---------------------------------------------------------------------------------------------
# Validation: semantic checks on a composed config, before anything is built.


def moe_layer_indices(model: ModelConfig | Any) -> list[int]:
    """The indices of the layers whose FFN is a mixture of experts."""
    pattern = model.moe_layers
    n = model.n_layers
    if isinstance(pattern, str):
        if pattern == "all":
            return list(range(n))
        if pattern == "none":
            return []
        if pattern == "every_n":
            return [i for i in range(n) if i % model.moe_every == model.moe_offset % model.moe_every]
        raise ConfigError(
            f"model.moe_layers='{pattern}' is not allowed; use 'all', 'none', 'every_n' or a list of layer indices."
        )
    try:
        indices = [int(i) for i in pattern]
    except (TypeError, ValueError):
        raise ConfigError(
            f"model.moe_layers={pattern!r} is not allowed; use 'all', 'none', 'every_n' or a list of layer indices."
        ) from None
    for i in indices:
        if not 0 <= i < n:
            raise ConfigError(
                f"model.moe_layers contains {i}, which is out of range; layer indices go from 0 to {n - 1}."
            )
    if len(set(indices)) != len(indices):
        raise ConfigError(f"model.moe_layers={indices} lists a layer twice; list each MoE layer once.")
    return sorted(indices)


def experts_per_moe_layer(cfg) -> list[int]:
    """Expert count of each MoE layer, in layer order."""
    moe = moe_layer_indices(cfg.model)
    per_layer = cfg.experts.num_experts_per_layer
    if per_layer is None:
        return [cfg.experts.num_experts] * len(moe)
    return [int(e) for e in per_layer]


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _positive_int(value, key: str) -> None:
    _require(isinstance(value, int) and value >= 1, f"{key}={value} is not allowed; it must be an integer >= 1.")


def validate(cfg) -> None:
    """Semantic checks across groups. Raises ConfigError naming the key, the bad value and what is allowed."""
    from modular.experts import EXPERT_REGISTRY
    from modular.routing import ROUTER_REGISTRY

    m, e, r, k = cfg.model, cfg.experts, cfg.routing, cfg.kernels
    for key in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "max_seq_len"):
        _positive_int(m[key], f"model.{key}")
    _require(
        m.max_vocab_size is None or (isinstance(m.max_vocab_size, int) and m.max_vocab_size >= m.vocab_size),
        f"model.max_vocab_size={m.max_vocab_size} is not allowed; it must be null or an integer >= "
        f"model.vocab_size={m.vocab_size}.",
    )
    _require(
        m.d_model % m.n_heads == 0,
        f"model.d_model={m.d_model} is not divisible by model.n_heads={m.n_heads}; "
        "d_model must be a multiple of n_heads.",
    )
    _require(
        m.n_heads % m.n_kv_heads == 0,
        f"model.n_kv_heads={m.n_kv_heads} does not divide model.n_heads={m.n_heads}; "
        "n_heads must be a multiple of n_kv_heads.",
    )
    _require((m.d_model // m.n_heads) % 2 == 0, f"model head size {m.d_model // m.n_heads} is odd; rotary embeddings need an even head size.")
    _require(m.rope_theta > 0, f"model.rope_theta={m.rope_theta} is not allowed; it must be > 0.")
    _require(m.norm_eps > 0, f"model.norm_eps={m.norm_eps} is not allowed; it must be > 0.")
    _require(m.init_std > 0, f"model.init_std={m.init_std} is not allowed; it must be > 0.")
    if isinstance(m.moe_layers, str) and m.moe_layers == "every_n":
        _positive_int(m.moe_every, "model.moe_every")
    moe = moe_layer_indices(m)

    _require(
        e.type in EXPERT_REGISTRY,
        f"experts.type='{e.type}' is unknown; registered expert types are: {', '.join(sorted(EXPERT_REGISTRY))}.",
    )
    _require(
        isinstance(e.num_experts, int) and e.num_experts >= 1,
        f"experts.num_experts={e.num_experts} is not allowed; a layer needs at least 1 expert.",
    )
    _positive_int(e.ffn_dim, "experts.ffn_dim")
    _require(
        isinstance(e.shared_experts, int) and e.shared_experts >= 0,
        f"experts.shared_experts={e.shared_experts} is not allowed; it must be an integer >= 0.",
    )
    if e.shared_ffn_dim is not None:
        _positive_int(e.shared_ffn_dim, "experts.shared_ffn_dim")
    EXPERT_REGISTRY[e.type].validate_config(e, m.d_model)
    if e.num_experts_per_layer is not None:
        counts = list(e.num_experts_per_layer)
        _require(
            len(counts) == len(moe),
            f"experts.num_experts_per_layer has {len(counts)} entries but the model has {len(moe)} MoE layers "
            f"({moe}); give one expert count per MoE layer.",
        )
        for c in counts:
            _require(
                isinstance(c, int) and c >= 1,
                f"experts.num_experts_per_layer contains {c}; every MoE layer needs at least 1 expert.",
            )

    _require(
        r.type in ROUTER_REGISTRY,
        f"routing.type='{r.type}' is unknown; registered routers are: {', '.join(sorted(ROUTER_REGISTRY))}.",
    )
    _positive_int(r.top_k, "routing.top_k")
    for i, n_exp in zip(moe, experts_per_moe_layer(cfg)):
        _require(
            r.top_k <= n_exp,
            f"routing.top_k={r.top_k} exceeds the {n_exp} experts of layer {i}; top_k must be <= the expert count.",
        )
    _require(r.score in ("softmax", "sigmoid"), f"routing.score='{r.score}' is unknown; allowed: softmax, sigmoid.")
    _require(
        r.drop_policy in ("probs", "position"),
        f"routing.drop_policy='{r.drop_policy}' is unknown; allowed: probs, position.",
    )
    if r.capacity_factor is not None:
        _require(
            r.capacity_factor > 0,
            f"routing.capacity_factor={r.capacity_factor} is not allowed; it must be > 0 (or null for dropless).",
        )
    ROUTER_REGISTRY[r.type].validate_config(r)
    _positive_int(r.sinkhorn_iters, "routing.sinkhorn_iters")
    _require(0 <= r.jitter < 1, f"routing.jitter={r.jitter} is not allowed; it must be in [0, 1).")
    for key in ("aux_loss_weight", "z_loss_weight", "bias_update_rate"):
        _require(r[key] >= 0 and math.isfinite(r[key]), f"routing.{key}={r[key]} is not allowed; it must be >= 0.")
    _require(
        k.backend in ("auto", "torch", "triton", "megablocks"),
        f"kernels.backend='{k.backend}' is unknown; allowed: auto, torch, triton, megablocks.",
    )
    validate_train(cfg)
    validate_export(cfg)
    validate_upcycle(cfg)
    validate_parallel(cfg, experts_per_moe_layer(cfg), moe)
    from modular.data.config import as_data_config

    as_data_config(cfg.data)
    _require(
        isinstance(cfg.run.name, str) and re.fullmatch(r"[A-Za-z0-9._-]+", cfg.run.name or "") is not None,
        f"run.name='{cfg.run.name}' is not allowed; use letters, digits, '.', '_' and '-'.",
    )


def validate_train(cfg) -> None:
    t = cfg.train
    for key in ("max_steps", "batch_size", "seq_len", "grad_accum", "log_every", "eval_every", "eval_batches",
                "checkpoint_every", "keep_checkpoints", "max_nonfinite"):
        _positive_int(t[key], f"train.{key}")
    _require(
        t.seq_len <= cfg.model.max_seq_len,
        f"train.seq_len={t.seq_len} exceeds model.max_seq_len={cfg.model.max_seq_len}; "
        "use a shorter seq_len or a larger max_seq_len.",
    )
    _require(t.lr > 0 and math.isfinite(t.lr), f"train.lr={t.lr} is not allowed; it must be a number > 0.")
    _require(0 <= t.min_lr_ratio <= 1, f"train.min_lr_ratio={t.min_lr_ratio} is not allowed; it must be in [0, 1].")
    _require(t.schedule in ("cosine", "wsd", "constant"),
             f"train.schedule='{t.schedule}' is unknown; allowed: cosine, wsd, constant.")
    _require(isinstance(t.warmup_steps, int) and t.warmup_steps >= 0,
             f"train.warmup_steps={t.warmup_steps} is not allowed; it must be an integer >= 0.")
    _require(0 < t.decay_fraction <= 1, f"train.decay_fraction={t.decay_fraction} is not allowed; it must be in (0, 1].")
    _require(t.weight_decay >= 0, f"train.weight_decay={t.weight_decay} is not allowed; it must be >= 0.")
    _require(0 <= t.beta1 < 1 and 0 <= t.beta2 < 1,
             f"train.beta1={t.beta1}, train.beta2={t.beta2} are not allowed; betas must be in [0, 1).")
    _require(t.grad_clip >= 0, f"train.grad_clip={t.grad_clip} is not allowed; it must be >= 0 (0 disables).")
    _require(t.dtype in ("auto", "fp32", "bf16"), f"train.dtype='{t.dtype}' is unknown; allowed: auto, fp32, bf16.")
    _require(t.device in ("auto", "cpu", "cuda"), f"train.device='{t.device}' is unknown; allowed: auto, cpu, cuda.")
    _require(isinstance(t.threads, int) and t.threads >= 0,
             f"train.threads={t.threads} is not allowed; it must be an integer >= 0 (0 = torch's default).")


def to_dict(cfg) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg, resolve=True)
