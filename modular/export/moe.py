"""MoE → Hugging Face MoE, lossless: MixtralForCausalLM where the model fits Mixtral, else Qwen2MoeForCausalLM.

A model that fits neither is refused with the list of features that do not fit; nothing is approximated.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from modular.errors import ConfigError
from modular.export.adapters import MixtralAdapter, Qwen2MoeAdapter, StateDictAdapter
from modular.export.folder import write_hf_folder
from modular.export.formats import ExportFormat, register_export_format
from modular.export.writer import DEFAULT_MAX_SHARD_SIZE

# export.format name → the state-dict adapter that writes it ("moe": the first of them that fits)
MOE_ADAPTERS: dict[str, type[StateDictAdapter]] = {"mixtral": MixtralAdapter, "qwen2-moe": Qwen2MoeAdapter}
MOE_FORMATS = ("moe", *MOE_ADAPTERS)


def choose_moe_adapter(state_dict, cfg, format: str = "moe") -> StateDictAdapter:
    """The adapter for `format`; "moe" prefers Mixtral (the most widely supported) and falls back to Qwen2-MoE."""
    if format not in MOE_FORMATS:
        raise ConfigError(f"export format '{format}' is unknown for an MoE export; allowed: {', '.join(MOE_FORMATS)}.")
    if format in MOE_ADAPTERS:
        adapter: StateDictAdapter = MOE_ADAPTERS[format]()
        adapter.check(state_dict, cfg)
        return adapter
    mixtral, qwen = MixtralAdapter(), Qwen2MoeAdapter()
    mixtral_misfits = mixtral.misfits(state_dict, cfg)
    if not mixtral_misfits:
        return mixtral
    qwen_misfits = qwen.misfits(state_dict, cfg)
    if not qwen_misfits:
        return qwen
    raise ConfigError(
        f"the model fits no Hugging Face MoE format: for Mixtral, {'; '.join(mixtral_misfits)}; for Qwen2-MoE, "
        f"{'; '.join(qwen_misfits)} — export a merged dense model instead (format=llama-dense)."
    )


def export_moe(model, cfg, tokenizer, out_dir: str | os.PathLike, *, format: str = "moe", overwrite: bool = False,
               dtype: torch.dtype | None = None, max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
               domain: str | None = None) -> Path:
    """Write `model` as an HF MoE folder that `AutoModelForCausalLM.from_pretrained` loads with no custom code.

    The export is exact: the reloaded model computes our logits (up to float rounding) — same router
    (softmax, top-k, renormalised or not), same experts (banks concatenated, low-rank ones materialised).
    domain: a domain-routed model's domain whose route is written (its deltas merged, its experts alone):
    exact too. Returns the folder.
    """
    state_dict, cfg, info = _state_of(model, cfg, domain)
    adapter = choose_moe_adapter(state_dict, cfg, format)
    return write_hf_folder(adapter, state_dict, cfg, tokenizer, out_dir, overwrite=overwrite, dtype=dtype,
                           max_shard_size=max_shard_size,
                           info={"kind": "moe", "exact": True, "model_type": adapter.model_type, **info})


def _state_of(model, cfg, domain: str | None):
    """(state dict, cfg, provenance) of what an MoE export writes: the model, or one domain's route of it."""
    if domain is None:
        return model.state_dict(), cfg, {}
    from modular.export.domains import domain_deltas, route_cfg, route_state_dict

    state, tied = route_state_dict(model, domain)
    deltas = sorted({place for _, _, place, _ in domain_deltas(model, domain)})
    return state, route_cfg(cfg, tied), {"domain": domain, "deltas": deltas}


class _MoEFormat(ExportFormat):
    """The MoE itself, exactly, in a Hugging Face MoE architecture."""

    def cannot_express(self, model, cfg) -> list[str]:
        from modular.export.domains import domain_routing_feature, has_domain_routes

        domain = getattr(self.export_cfg, "domain", None)
        if domain is None and has_domain_routes(model):
            return [domain_routing_feature(model)]
        state_dict, cfg, _ = _state_of(model, cfg, domain)
        if self.name in MOE_ADAPTERS:
            return MOE_ADAPTERS[self.name]().misfits(state_dict, cfg)
        try:
            choose_moe_adapter(state_dict, cfg, self.name)
        except ConfigError as exc:
            return [str(exc).rstrip(".")]
        return []

    def write(self, model, cfg, tokenizer, out_dir, *, seed_model=None, calibration_batches=None, overwrite=False,
              dtype=None, max_shard_size=DEFAULT_MAX_SHARD_SIZE) -> Path:
        return export_moe(model, cfg, tokenizer, out_dir, format=self.name, overwrite=overwrite, dtype=dtype,
                          max_shard_size=max_shard_size, domain=getattr(self.export_cfg, "domain", None))


@register_export_format("mixtral")
class MixtralFormat(_MoEFormat):
    """MixtralForCausalLM: every layer MoE, renormalised softmax top-k, SwiGLU experts, no shared experts."""


@register_export_format("qwen2-moe")
class Qwen2MoeFormat(_MoEFormat):
    """Qwen2MoeForCausalLM: softmax top-k with or without renormalisation, dense layers, one shared expert."""


@register_export_format("moe")
class AutoMoeFormat(_MoEFormat):
    """Mixtral where the model fits it, else Qwen2-MoE."""
