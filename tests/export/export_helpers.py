"""Small models and comparisons for the export tests (tiny sizes: the whole folder runs in well under a minute)."""

from __future__ import annotations

import torch

from modular.config import compose_config
from modular.models import build_model

TINY = ["model=tiny", "model.d_model=32", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_dim=48",
        "model.n_layers=2", "experts.num_experts=4", "experts.ffn_dim=24"]


def cfg_of(*overrides: str):
    return compose_config([*TINY, *overrides])


def build(*overrides: str, seed: int = 0):
    """(model in eval mode, cfg) with norms away from 1 so that their mapping is exercised too."""
    cfg = cfg_of(*overrides)
    torch.manual_seed(seed)
    model = build_model(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.2)
    return model, cfg


def make_experts_identical(model) -> None:
    """Copy expert 0 of bank 0 into every expert of every bank (the 'dense-equivalent' MoE)."""
    with torch.no_grad():
        for moe in model.moe_layers:
            first = moe.banks[0]
            for bank in moe.banks:
                for name in bank.expert_param_names:
                    getattr(bank, name).copy_(getattr(first, name)[0:1].expand_as(getattr(bank, name)))


def ids(vocab: int = 259, batch: int = 2, length: int = 17, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def hf_model(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True, dtype=torch.float32).eval()


@torch.no_grad()
def assert_same_logits(ours, hf, input_ids, atol: float = 1e-5) -> None:
    # fp32 on the CPU: the two models sum the same products in different orders, ~1e-6 apart.
    torch.testing.assert_close(ours(input_ids).logits, hf(input_ids=input_ids).logits, rtol=1e-5, atol=atol)
