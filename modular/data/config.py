"""Typed config of the data group (`data=...`): domains, tokenizer, cache and reading options.
Also the checks that turn a bad value into one ConfigError sentence, and `resolve_path` for corpus paths.

Corpus paths (`train`, `val`, `tokenizer.path`) are one of:
  * an absolute path, or a path relative to the current working directory (`~` is expanded);
  * `pkg://<package>/<path inside it>`, e.g. `pkg://modular/data/sample/en/train.jsonl`, which finds
    the embedded sample wherever the package is installed and from any working directory.
`train` and `val` may also name a directory (every corpus file below it) or a glob. Corpus files are
.jsonl and .txt (plain, .gz or .zst), .parquet and .arrow, and folders written by `datasets.save_to_disk`.
"""

# OmegaConf 2.3 reads typing.Optional / typing.Dict in structured configs but not `X | None` or `dict[...]`.
from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from modular.errors import ConfigError

PKG_PREFIX = "pkg://"
TOKENIZER_KINDS = ("byte", "hf")
BAD_BYTES_POLICIES = ("error", "replace")
_DOMAIN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass
class DomainConfig:
    """One domain: where its text is, and how often the training mixture draws from it."""

    train: str = MISSING  # file, directory or glob of corpus files (see modular.data.formats)
    val: Optional[str] = None  # None: split `train` by document hash (see modular.data.split)
    weight: float = 1.0  # relative sampling weight in the training mixture
    text_field: Optional[str] = None  # the JSON key / column holding the text; None: data.text_field


@dataclass
class TokenizerConfig:
    kind: str = "byte"  # byte | hf
    path: Optional[str] = None  # hf only: a tokenizer.json file or a folder holding one


@dataclass
class DataConfig:
    # Empty on purpose: a default here would be merged key by key with a preset's domains.
    # The default corpus comes from the `data=sample` preset (or `sample_data_config()` in Python).
    domains: Dict[str, DomainConfig] = field(default_factory=dict)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    cache_dir: Optional[str] = None  # None: $MODULAR_CACHE/shards, else ~/.cache/modular/shards
    num_workers: int = 2  # tokenisation processes; 0 or 1 tokenises in this process
    val_fraction: float = 0.05  # share of documents held out when a domain has no `val` path
    on_bad_bytes: str = "error"  # error | replace (invalid UTF-8 becomes U+FFFD)
    text_field: str = "text"  # the JSON Lines key (or Parquet/Arrow column) holding a document's text


SAMPLE_DOMAINS = ("en", "de", "fr", "es", "code_py")


def sample_data_config(domains: tuple[str, ...] = SAMPLE_DOMAINS, **overrides: Any) -> DataConfig:
    """The embedded sample corpus as a DataConfig (what the `data=sample` preset holds)."""
    unknown = [d for d in domains if d not in SAMPLE_DOMAINS]
    if unknown:
        raise ConfigError(f"sample domain {unknown[0]!r} does not exist; "
                          f"the sample has {', '.join(SAMPLE_DOMAINS)}.")
    root = f"{PKG_PREFIX}modular/data/sample"
    paths = {d: DomainConfig(train=f"{root}/{d}/train.jsonl", val=f"{root}/{d}/val.jsonl") for d in domains}
    return validate_data_config(DataConfig(domains=paths, **overrides))


def default_cache_dir() -> Path:
    root = os.environ.get("MODULAR_CACHE")
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "modular") / "shards"


def resolve_path(spec: str) -> Path:
    """An absolute Path for a config path: `pkg://` inside an installed package, else cwd-relative."""
    if spec.startswith(PKG_PREFIX):
        package, _, inner = spec[len(PKG_PREFIX):].partition("/")
        spec_ = importlib.util.find_spec(package) if package and "." not in package else None
        if spec_ is None or not spec_.submodule_search_locations:
            raise ConfigError(f"path {spec!r} names package {package!r}, which is not installed; "
                              f"use pkg://<package>/<path>, e.g. pkg://modular/data/sample/en/train.jsonl.")
        roots = [Path(p) for p in spec_.submodule_search_locations]
        # A namespace package may span several folders: take the one that has the path.
        found = [root for root in roots if (root / inner).exists()]
        return ((found or roots)[0] / inner).absolute()
    return Path(os.path.expanduser(spec)).absolute()


def as_data_config(cfg: DataConfig | DictConfig | dict) -> DataConfig:
    """A validated DataConfig from a dataclass, a hydra DictConfig (interpolations resolved) or a dict."""
    if not isinstance(cfg, DataConfig):
        try:
            merged = OmegaConf.merge(OmegaConf.structured(DataConfig), cfg)
            cfg = OmegaConf.to_object(merged)
        except MissingMandatoryValue as e:
            raise ConfigError(f"data.{e.full_key} is required: a corpus file, a directory or a glob.") \
                from None
        except OmegaConfBaseException as e:
            key = f"data.{e.full_key}" if getattr(e, "full_key", None) else "the data config"
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ConfigError(f"{key} is not valid: {reason}.") from None
    return validate_data_config(cfg)


def validate_data_config(cfg: DataConfig) -> DataConfig:
    """Raise ConfigError naming the first bad value; return cfg unchanged when all values are allowed."""
    if not cfg.domains:
        raise ConfigError("data.domains is empty; name at least one domain, e.g. data=sample.")
    for name, dom in cfg.domains.items():
        if not _DOMAIN_NAME.match(str(name)):
            raise ConfigError(f"domain name {name!r} is not allowed; use letters, digits, '_', '.' or '-'.")
        if not isinstance(dom.train, str) or not dom.train or dom.train == MISSING:
            raise ConfigError(f"data.domains.{name}.train is required: a corpus file, a directory "
                              "or a glob.")
        if dom.val is not None and not dom.val:
            raise ConfigError(f"data.domains.{name}.val is an empty string; give a path, or null for the "
                              "hash split.")
        if not (isinstance(dom.weight, (int, float)) and math.isfinite(dom.weight) and dom.weight > 0):
            raise ConfigError(f"data.domains.{name}.weight={dom.weight!r} is not allowed; use a number > 0.")
        if dom.text_field is not None and not dom.text_field:
            raise ConfigError(f"data.domains.{name}.text_field is an empty string; name the JSON key or column "
                              "holding the text, or null for data.text_field.")
    tok = cfg.tokenizer
    if tok.kind not in TOKENIZER_KINDS:
        raise ConfigError(f"data.tokenizer.kind={tok.kind!r} is unknown; "
                          f"use one of {', '.join(TOKENIZER_KINDS)}.")
    if tok.kind == "hf" and not tok.path:
        raise ConfigError("data.tokenizer.path is required with kind=hf: a tokenizer.json file or a folder "
                          "holding one.")
    if tok.kind == "byte" and tok.path:
        raise ConfigError(f"data.tokenizer.path={tok.path!r} is only used with kind=hf; "
                          "set it to null for kind=byte.")
    if not isinstance(cfg.num_workers, int) or cfg.num_workers < 0:
        raise ConfigError(f"data.num_workers={cfg.num_workers!r} is not allowed; use an integer >= 0.")
    percent = cfg.val_fraction * 100
    if not (abs(percent - round(percent)) < 1e-9 and 1 <= round(percent) <= 99):
        # The hash rule buckets documents into 100 bins (as the shared corpora did), so whole percents only.
        raise ConfigError(f"data.val_fraction={cfg.val_fraction!r} is not allowed; "
                          "use a whole percentage from 0.01 to 0.99.")
    if cfg.on_bad_bytes not in BAD_BYTES_POLICIES:
        raise ConfigError(f"data.on_bad_bytes={cfg.on_bad_bytes!r} is unknown; "
                          f"use one of {', '.join(BAD_BYTES_POLICIES)}.")
    if not cfg.text_field:
        raise ConfigError("data.text_field is empty; name the JSON key holding the text, e.g. text.")
    return cfg


# ---------------------------------------------------------------------------------------------
# Domains from the command line. Hydra cannot add a key to a typed dict of dataclasses
# (`+data.domains.legal.train=...` fails with "dict is not a subclass of DomainConfig"), so these
# overrides are applied here, in order, after the rest of the config is composed.

DOMAINS_KEY = "data.domains"
DOMAIN_FIELDS = tuple(f.name for f in dataclasses.fields(DomainConfig))


def is_domain_override(override: str) -> bool:
    """True for overrides of data.domains, one domain or one domain's field (with +, ++ or ~)."""
    key = override.split("=", 1)[0].lstrip("+~")
    return key == DOMAINS_KEY or key.startswith(DOMAINS_KEY + ".")


def _parse_domain_override(override: str):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_override(override)
    except Exception as e:  # noqa: BLE001  (hydra's grammar errors come in several types; all are user input)
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"Override '{override}' does not parse ({reason}); write it as "
                          "+data.domains.NAME.train=PATH.") from None
    if parsed.is_sweep_override():
        raise ConfigError(f"Override '{override}' lists alternatives, which only a sweep (-m) can run.")
    key = parsed.key_or_group
    parts = key.split(".")[2:]  # after data.domains
    if len(parts) > 2:
        raise ConfigError(f"Unknown config key '{key}'; a domain's keys are data.domains.NAME."
                          f"{{{','.join(DOMAIN_FIELDS)}}}.")
    if parts and not _DOMAIN_NAME.match(parts[0]):
        raise ConfigError(f"domain name {parts[0]!r} in '{override}' is not allowed; use letters, digits, '_', '.' "
                          "or '-'.")
    if len(parts) == 2 and parts[1] not in DOMAIN_FIELDS:
        raise ConfigError(f"Unknown config key '{key}'; allowed keys in a domain are: {', '.join(DOMAIN_FIELDS)}.")
    value = None if parsed.is_delete() else parsed.value()
    return parsed, parts, value


def check_domain_override(override: str) -> None:
    """One sentence for a malformed domain override, before anything is composed."""
    _parsed, parts, value = _parse_domain_override(override)
    if _parsed.is_delete():
        return
    if not parts:
        if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
            raise ConfigError(f"{override} is not allowed; data.domains must be a dict of domains, e.g. "
                              "data.domains={legal:{train:legal.jsonl}}.")
        for name, fields in value.items():
            _check_domain_dict(f"{DOMAINS_KEY}.{name}", fields)
    elif len(parts) == 1:
        if not isinstance(value, dict):
            raise ConfigError(f"{override} is not allowed; a domain is a dict such as {{train:PATH,val:PATH}}, or set "
                              f"one field: +{DOMAINS_KEY}.{parts[0]}.train=PATH.")
        _check_domain_dict(f"{DOMAINS_KEY}.{parts[0]}", value)
    elif isinstance(value, (dict, list)):
        raise ConfigError(f"{override} is not allowed; {parts[1]} takes a single value.")
    else:
        _check_domain_dict(f"{DOMAINS_KEY}.{parts[0]}", {parts[1]: value})


def _check_domain_dict(key: str, fields: dict) -> None:
    unknown = [k for k in fields if k not in DOMAIN_FIELDS]
    if unknown:
        raise ConfigError(f"Unknown config key '{key}.{unknown[0]}'; allowed keys in a domain are: "
                          f"{', '.join(DOMAIN_FIELDS)}.")
    weight = fields.get("weight", 1.0)
    if isinstance(weight, bool) or not (isinstance(weight, (int, float)) or "${" in str(weight)):  # or an interpolation
        raise ConfigError(f"{key}.weight={weight} is not allowed; it must be a number > 0.")


def apply_domain_overrides(cfg, overrides: list[str]) -> None:
    """Apply data.domains overrides to a composed config (a DictConfig with a `data` node), in order."""
    from omegaconf import open_dict

    for override in overrides:
        parsed, parts, value = _parse_domain_override(override)
        domains = cfg.data.domains
        try:
            with open_dict(cfg.data), open_dict(domains):
                if not parts:
                    if parsed.is_delete():
                        cfg.data.domains = {}
                    else:
                        cfg.data.domains = {name: _domain_node(f"{DOMAINS_KEY}.{name}", fields)
                                            for name, fields in value.items()}
                elif len(parts) == 1:
                    if parsed.is_delete():
                        domains.pop(parts[0], None)
                    else:
                        domains[parts[0]] = _domain_node(f"{DOMAINS_KEY}.{parts[0]}", value)
                else:
                    name, field_name = parts
                    if name not in domains:
                        if parsed.is_delete():
                            continue
                        domains[name] = OmegaConf.structured(DomainConfig)
                    default = DomainConfig.__dataclass_fields__[field_name].default
                    domains[name][field_name] = default if parsed.is_delete() else value
        except OmegaConfBaseException as e:
            shown = override.split("=", 1)[1] if "=" in override else ""
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(f"{override.split('=', 1)[0].lstrip('+~')}={shown} is not allowed: "
                              f"{reason.rstrip('.')}.") from None


def _domain_node(key: str, fields: dict):
    _check_domain_dict(key, fields)
    return OmegaConf.merge(OmegaConf.structured(DomainConfig), fields)
