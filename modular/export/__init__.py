"""Hugging Face export and import: MoE → Mixtral/Qwen2-MoE (lossless), MoE → merged dense Llama (a domain-routed
model: one domain's route, every domain merged, or base + PEFT adapters), dense Llama (safetensors or GGUF) →
ModularLM and sparse upcycling, plus the export report.
"""

import importlib
import sys
import types

# Where each public name lives. Imported on first use, so `import modular.export.config` (which
# modular.config does for the export group's schema) loads no adapter, writer or transformers code.
_HOMES = {
    "ADAPTERS": "adapters", "LlamaAdapter": "adapters", "MixtralAdapter": "adapters", "Qwen2MoeAdapter": "adapters",
    "StateDictAdapter": "adapters",
    "MERGE_METHODS": "dense", "Calibration": "dense", "calibrate": "dense", "expert_frequencies": "dense",
    "export_dense": "dense", "merged_state_dict": "dense",
    "generation_config": "hf_config", "llama_config": "hf_config", "mixtral_config": "hf_config",
    "qwen2_moe_config": "hf_config",
    "byte_level_tokenizer": "hf_tokenizer", "write_tokenizer_files": "hf_tokenizer",
    "MOE_FORMATS": "moe", "choose_moe_adapter": "moe", "export_moe": "moe",
    "EXPORT_FORMATS": "formats", "ExportFormat": "formats", "export_format": "formats",
    "register_export_format": "formats",
    "evaluate": "report", "export_report": "report", "load_hf_model": "report",
    "load_hf_llama": "upcycle", "save_source_tokenizer": "upcycle", "upcycle": "upcycle",
    "export_domain_dense": "domains", "export_all_domains_dense": "domains", "route_state_dict": "domains",
    "dense_route_state": "domains", "merge_domain_states": "domains",
    "export_peft": "peft_adapters", "load_peft_model": "peft_adapters",
}
__all__ = list(_HOMES)


def __getattr__(name):
    if name in _HOMES:
        return getattr(importlib.import_module(f"modular.export.{_HOMES[name]}"), name)
    raise AttributeError(f"module 'modular.export' has no attribute {name!r}")


class _Package(types.ModuleType):
    """Loading a submodule binds it on its package; for `upcycle` the function of that name must win
    (as it did when this package imported everything eagerly), so that binding is skipped."""

    def __setattr__(self, name, value):
        if isinstance(value, types.ModuleType) and name in _HOMES:
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
