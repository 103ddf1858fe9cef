"""Hash routing (Roller et al., 2021), the baseline with no learning: a token id's hash picks its experts.

Slot j of token t goes to expert (hash(t) + j) mod E, so the k experts of a token are distinct and
every occurrence of a token id goes to the same experts. Combine weights are 1/k.
"""

from __future__ import annotations

import torch
from torch import Tensor

from modular.errors import ConfigError
from modular.routing.base import Router, RouterOutput, flat_token_choice, register_router


def token_hash(token_ids: Tensor) -> Tensor:
    """A fixed multiplicative hash (Knuth) of the token ids, in [0, 2^31)."""
    return ((token_ids.to(torch.int64) + 1) * 2654435761) % 2147483647


@register_router("hash")
class HashRouter(Router):
    uses_token_ids = True
    routes_by_logits = False

    @classmethod
    def weights_sum_to_one(cls, cfg) -> bool:
        return True  # 1/k each

    def route(self, logits: Tensor, token_ids: Tensor | None) -> RouterOutput:
        if token_ids is None:
            raise ConfigError("routing.type='hash' routes by token id, but this MoE layer was called without token ids.")
        T, E = logits.shape
        base = token_hash(token_ids.reshape(-1)) % E  # [T]
        expert_idx = (base[:, None] + torch.arange(self.top_k, device=logits.device)[None, :]) % E  # [T, k]
        weight = torch.full(expert_idx.shape, 1.0 / self.top_k, dtype=logits.dtype, device=logits.device)
        token_idx, expert_flat, weight_flat = flat_token_choice(expert_idx, weight)
        probs = torch.zeros(T, E, dtype=logits.dtype, device=logits.device)
        probs.scatter_(1, expert_idx, 1.0 / self.top_k)
        return RouterOutput(token_idx=token_idx, expert_idx=expert_flat, weight=weight_flat, probs=probs,
                            logits=logits, losses={})
