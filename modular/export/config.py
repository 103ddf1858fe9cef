"""The `export` and `upcycle` config groups: how `modular export` writes a run for Hugging Face, and how
`modular upcycle` turns a dense HF Llama into the MoE a run starts from. Checked by `validate_export`.
"""

# OmegaConf 2.3 reads typing.Optional in structured configs but not `X | None`.
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from modular.errors import ConfigError

MERGES = ("uniform", "frequency", "concat", "task_arithmetic", "ties")
DOMAIN_MERGES = ("task_arithmetic", "ties")
DTYPES = ("auto", "fp32", "bf16", "fp16")


@dataclass
class ExportConfig:
    format: str = "llama-dense"  # llama-dense (merged) | mixtral | qwen2-moe | moe (auto)
    out: Optional[str] = None  # the folder to write; null = <run.dir>/export/<format>
    merge: str = "frequency"  # llama-dense: uniform | frequency | concat | task_arithmetic | ties
    density: float = 0.2  # ties: share of each task vector kept
    scale: Optional[float] = None  # task_arithmetic / ties λ; null = 0.3 / 1.0
    calibration_batches: int = 8  # validation batches per domain that measure router frequencies
    seed_model: Optional[str] = None  # dense seed (HF folder or .gguf): merge base and report baseline;
    #                                   null = the upcycle source recorded in <run.dir>/upcycle.json, if any
    dtype: str = "auto"  # weights on disk: auto (the model's) | fp32 | bf16 | fp16
    max_shard_size: str = "5GB"
    overwrite: bool = False
    report: bool = True  # write <out>/export_report.json (validation perplexity per domain)
    # domain-routed runs (continual=isolate): export one domain's route (null: every domain merged into one model)
    domain: Optional[str] = None
    domain_merge: str = "ties"  # how the domains' routes merge relative to the anchor's: task_arithmetic | ties
    domain_scale: Optional[float] = None  # λ on the merged domain task vectors; null = 1.0
    domain_density: float = 1.0  # ties: share of each domain task vector kept
    peft: bool = False  # llama-dense: <out>/base (the anchor's route) + one PEFT LoRA folder per later domain


@dataclass
class UpcycleConfig:
    source: Optional[str] = None  # a local HF Llama folder (safetensors) or a .gguf file
    num_experts: int = 8  # copies of each dense FFN
    top_k: Optional[int] = None  # null = routing.top_k
    layers: Any = "all"  # "all" or a list of layer indices to upcycle
    noise: float = 0.0  # relative noise on each copy (breaks symmetry; step-0 equality then approximate)


def validate_export(cfg) -> None:
    from modular.export.formats import format_names

    e = cfg.export
    names = format_names(load=False)  # the built-in names and any registered format, no export code loaded
    if e.format not in names:
        raise ConfigError(f"export.format='{e.format}' is unknown; allowed: {', '.join(names)}.")
    if e.merge not in MERGES:
        raise ConfigError(f"export.merge='{e.merge}' is unknown; allowed: {', '.join(MERGES)}.")
    if not 0 < e.density <= 1:
        raise ConfigError(f"export.density={e.density} is not allowed; it must be in (0, 1].")
    if e.domain_merge not in DOMAIN_MERGES:
        raise ConfigError(f"export.domain_merge='{e.domain_merge}' is unknown; allowed: {', '.join(DOMAIN_MERGES)}.")
    if not 0 < e.domain_density <= 1:
        raise ConfigError(f"export.domain_density={e.domain_density} is not allowed; it must be in (0, 1].")
    if e.peft and e.format != "llama-dense":
        raise ConfigError(f"export.peft=true writes a dense Llama base with PEFT adapters, but export.format={e.format}; "
                          "use export.format=llama-dense.")
    if e.peft and e.domain is not None:
        raise ConfigError(f"export.peft=true writes the base and every domain's adapter, so export.domain={e.domain} "
                          "cannot be combined with it; leave export.domain unset.")
    if not (isinstance(e.calibration_batches, int) and e.calibration_batches >= 1):
        raise ConfigError(f"export.calibration_batches={e.calibration_batches} is not allowed; it must be an integer >= 1.")
    if e.dtype not in DTYPES:
        raise ConfigError(f"export.dtype='{e.dtype}' is unknown; allowed: {', '.join(DTYPES)}.")
    from modular.export.writer import parse_size

    parse_size(e.max_shard_size, "export.max_shard_size")


def validate_upcycle(cfg) -> None:
    u = cfg.upcycle
    if not (isinstance(u.num_experts, int) and u.num_experts >= 1):
        raise ConfigError(f"upcycle.num_experts={u.num_experts} is not allowed; it must be an integer >= 1.")
    if u.top_k is not None and not (isinstance(u.top_k, int) and 1 <= u.top_k <= u.num_experts):
        raise ConfigError(f"upcycle.top_k={u.top_k} is not allowed; it must be between 1 and "
                          f"upcycle.num_experts={u.num_experts}.")
    if not u.noise >= 0:
        raise ConfigError(f"upcycle.noise={u.noise} is not allowed; it must be >= 0.")
    layers = u.layers
    if isinstance(layers, str) and layers != "all":
        raise ConfigError(f"upcycle.layers='{layers}' is not allowed; use 'all' or a list of layer indices.")
