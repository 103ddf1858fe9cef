"""Hugging Face export and import: MoE → Mixtral/Qwen2-MoE (lossless), MoE → merged dense Llama,
dense Llama (safetensors or GGUF) → ModularLM and sparse upcycling, plus the export report.
"""

from modular.export.adapters import ADAPTERS, LlamaAdapter, MixtralAdapter, Qwen2MoeAdapter, StateDictAdapter
from modular.export.dense import (
    MERGE_METHODS,
    Calibration,
    calibrate,
    expert_frequencies,
    export_dense,
    merged_state_dict,
)
from modular.export.formats import EXPORT_FORMATS, ExportFormat, export_format, register_export_format
from modular.export.hf_config import generation_config, llama_config, mixtral_config, qwen2_moe_config
from modular.export.hf_tokenizer import byte_level_tokenizer, write_tokenizer_files
from modular.export.moe import MOE_FORMATS, choose_moe_adapter, export_moe
from modular.export.report import evaluate, export_report, load_hf_model
from modular.export.upcycle import load_hf_llama, save_source_tokenizer, upcycle

__all__ = [
    "ADAPTERS",
    "EXPORT_FORMATS",
    "MERGE_METHODS",
    "MOE_FORMATS",
    "Calibration",
    "ExportFormat",
    "LlamaAdapter",
    "MixtralAdapter",
    "Qwen2MoeAdapter",
    "StateDictAdapter",
    "byte_level_tokenizer",
    "calibrate",
    "choose_moe_adapter",
    "evaluate",
    "expert_frequencies",
    "export_dense",
    "export_format",
    "export_moe",
    "export_report",
    "generation_config",
    "llama_config",
    "load_hf_llama",
    "load_hf_model",
    "merged_state_dict",
    "mixtral_config",
    "qwen2_moe_config",
    "register_export_format",
    "save_source_tokenizer",
    "upcycle",
    "write_tokenizer_files",
]
