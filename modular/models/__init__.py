"""Decoder assembly: embedding, attention, norms, dense FFNs and MoE FFN slots, composed from config."""

from modular.models.decoder import DecoderLayer, LMOutput, ModularLM
from modular.models.moe import MoELayer

__all__ = ["DecoderLayer", "LMOutput", "MoELayer", "ModularLM", "build_model"]


def build_model(cfg) -> ModularLM:
    """Build the model of a composed config, with the kernel backend resolved for the CPU."""
    import torch

    from modular.kernels import resolve_backend

    model = ModularLM(cfg)
    model.set_backend(resolve_backend(cfg.kernels.backend, torch.device("cpu")))
    return model
