"""Typed configuration: one dataclass per config group, registered as hydra structured configs.

`compose_config(overrides)` turns command-line overrides into a validated `Config`; every bad key,
type or value raises `ConfigError` with one sentence naming the key, the bad value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from modular.config_path import config_search_path, hydra_with_search_path
from modular.continual.config import ContinualConfig, validate_continual_values
from modular.data.config import DataConfig
from modular.errors import ConfigError
from modular.experts.config import ExpertsConfig, validate_experts
from modular.export.config import ExportConfig, UpcycleConfig, validate_export, validate_upcycle
from modular.generate.config import GenerateConfig, validate_generate
from modular.kernels.config import KernelsConfig, validate_kernels
from modular.models.config import ModelConfig, experts_per_moe_layer, moe_layer_indices, validate_model
from modular.parallel.config import ParallelConfig, validate_parallel
from modular.routing.config import RoutingConfig, validate_routing
from modular.run.config import RunConfig, validate_run
from modular.train.config import TrainConfig, validate_train

# The presets ship inside the package (configs/ at the repository root is a link to them), so an installed
# wheel composes the same configs as a checkout; MODULAR_CONFIG_DIR points elsewhere (and replaces them),
# while --config-dir and MODULAR_CONFIG_PATH add user folders in front of them (config_search_path).
CONFIG_DIR = Path(os.environ.get("MODULAR_CONFIG_DIR", Path(__file__).resolve().parent / "configs"))

# Each group's schema and validator live with its package; they are re-exported here for callers that
# compose configs (`from modular.config import ModelConfig, moe_layer_indices, ...`).
__all__ = [
    "CONFIG_DIR",
    "GROUP_SCHEMAS",
    "Config",
    "ContinualConfig",
    "DataConfig",
    "ExpertsConfig",
    "ExportConfig",
    "GenerateConfig",
    "KernelsConfig",
    "ModelConfig",
    "ParallelConfig",
    "RoutingConfig",
    "RunConfig",
    "TrainConfig",
    "UpcycleConfig",
    "compose_config",
    "experts_per_moe_layer",
    "group_presets",
    "moe_layer_indices",
    "parse_override",
    "quote_non_ascii",
    "to_dict",
    "validate",
    "validate_train",
]


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
    generate: GenerateConfig = field(default_factory=GenerateConfig)
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
    "generate": GenerateConfig,
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
    """The presets of a group in every config folder of the search path (user folders and the packaged one)."""
    names = {p.stem for root in config_search_path(CONFIG_DIR) if (root / group).is_dir()
             for p in (root / group).glob("*.yaml")}
    return sorted(names)


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
            if not presets:
                raise ConfigError(f"The config folder {CONFIG_DIR} has no {parts[0]}/ presets, so {override} cannot be "
                                  "chosen; set MODULAR_CONFIG_DIR to a configs/ folder (one subfolder per group).")
            if value not in presets:
                raise ConfigError(f"Unknown {parts[0]} preset '{value}'; available presets are: {', '.join(presets)}.")
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


# Characters hydra's grammar gives a meaning to; a value holding none of them is a plain string.
_STRUCTURAL = re.compile(r"['\"\[\]{}(),\\]")


def quote_non_ascii(override: str) -> str:
    """Quote a plain value with non-ASCII characters (run.dir=runs/café), which hydra's lexer cannot read bare."""
    key, sep, value = override.partition("=")
    if sep and not value.isascii() and not _STRUCTURAL.search(value) and "${" not in value:
        return f"{key}='{value}'"
    return override


def parse_override(override: str):
    """hydra's reading of one override (key_or_group, value(), is_change()...), or None when it cannot parse it."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        return OverridesParser.create().parse_override(quote_non_ascii(override))
    except Exception:  # noqa: BLE001  (any parse failure: compose_config reports grammar errors itself)
        return None


def compose_config(overrides: list[str] | None = None, config_name: str = "config"):
    """Compose the hydra config from `configs/` and the overrides, then validate it. Returns a DictConfig."""
    from hydra import compose
    from omegaconf import OmegaConf

    from modular.data.config import apply_domain_overrides, check_domain_override, is_domain_override

    overrides = [quote_non_ascii(o) for o in overrides or []]
    domain_overrides = [o for o in overrides if is_domain_override(o)]  # applied after composing
    overrides = [o for o in overrides if not is_domain_override(o)]
    if not CONFIG_DIR.is_dir():  # before the overrides, whose preset names are looked up there
        raise ConfigError(f"Config folder '{CONFIG_DIR}' does not exist; set MODULAR_CONFIG_DIR to the configs/ folder.")
    for override in overrides:
        _check_override(override)
    for override in domain_overrides:
        check_domain_override(override)
    register_configs()
    try:
        with hydra_with_search_path(CONFIG_DIR):
            cfg = compose(config_name=config_name, overrides=overrides)
    except Exception as exc:  # noqa: BLE001  (hydra/omegaconf raise many types; all are user input)
        raise ConfigError(_unreadable(overrides, exc) or _one_sentence(exc)) from None
    apply_domain_overrides(cfg, domain_overrides)
    try:
        OmegaConf.resolve(cfg)
    except Exception as exc:  # noqa: BLE001  (an interpolation error of any type is the user's input)
        raise ConfigError(_one_sentence(exc)) from None
    validate(cfg)
    return cfg


def _unreadable(overrides: list[str], exc: BaseException) -> str | None:
    """A sentence for what hydra's lexer cannot read (e.g. non-ASCII inside a list), or for a preset file that is
    not UTF-8 (hydra names neither the override nor the file)."""
    if isinstance(exc, UnicodeDecodeError) or isinstance(exc.__cause__ or exc.__context__, UnicodeDecodeError):
        for path in sorted(CONFIG_DIR.rglob("*.yaml")):
            try:
                path.read_bytes().decode("utf-8")
            except UnicodeDecodeError as bad:
                return f"Config file {path} is not UTF-8 (byte {bad.start} is {bad.object[bad.start]:#04x}); save it as UTF-8."
        return None
    if "token recognition error" not in str(exc) and "LexerNoViableAlt" not in str(exc):
        return None
    culprit = next((o for o in overrides if not o.isascii()), None)
    if culprit is None:
        return None
    key, _, value = culprit.partition("=")
    how = ("quote each list element that holds them, e.g. [a,'é']" if value.startswith(("[", "{")) else
           f"quote the value: \"{key}='{value}'\" in a shell")
    return f"Override {culprit} holds characters hydra cannot read without quotes; {how}"


def composition_record(overrides: list[str] | None = None, config_name: str = "config") -> dict:
    """What hydra chose while composing: the config folders searched and the preset of every group."""
    from hydra import compose
    from omegaconf import OmegaConf

    from modular.data.config import is_domain_override

    overrides = [o for o in overrides or [] if not is_domain_override(o)]
    register_configs()
    try:
        with hydra_with_search_path(CONFIG_DIR):
            cfg = compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
    except Exception as exc:  # noqa: BLE001  (hydra/omegaconf raise many types; all are user input)
        raise ConfigError(_one_sentence(exc)) from None
    choices = OmegaConf.to_container(cfg.hydra.runtime.choices)
    return {"searchpath": [str(p) for p in config_search_path(CONFIG_DIR)],
            "runtime": {"choices": {group: choices[group] for group in GROUP_SCHEMAS if group in choices}}}


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
# Validation: one pass over every group of a composed config, before anything is built.


def validate(cfg) -> None:
    """Each group's semantic checks, in one pass. Raises ConfigError naming the key, the bad value and what is allowed.

    Checks that need more than the config (the data files, the processes torchrun started, a run folder)
    belong to the command that uses them, e.g. `modular.continual.validate_continual` for `modular continual`.
    """
    validate_model(cfg)
    validate_experts(cfg)
    validate_routing(cfg)
    validate_kernels(cfg)
    validate_train(cfg)
    validate_export(cfg)
    validate_upcycle(cfg)
    validate_generate(cfg)
    validate_parallel(cfg, experts_per_moe_layer(cfg), moe_layer_indices(cfg.model))
    from modular.data.config import as_data_config

    as_data_config(cfg.data)
    validate_continual_values(cfg)
    validate_run(cfg)


def to_dict(cfg) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg, resolve=True)
