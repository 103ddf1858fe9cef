"""Token-choice top-k routing (Mixtral, Switch, DeepSeek-V3): each token picks its k best experts.

Scores are a softmax over experts or independent sigmoids. With `bias_balancing` a per-expert bias is
added to the scores for *selection only* and nudged after every training forward towards equal load,
the auxiliary-loss-free balancing of DeepSeek-V3; the combine weights never see the bias.
"""

from __future__ import annotations

import torch
from torch import Tensor

from modular.routing.base import Router, RouterOutput, flat_token_choice, register_router
from modular.routing.losses import load_balancing_loss, z_loss


def router_probs(logits: Tensor, score: str) -> Tensor:
    """Scores in at least float32 (bf16 softmax over many experts loses the small probabilities)."""
    dtype = torch.promote_types(logits.dtype, torch.float32)
    if score == "softmax":
        return torch.softmax(logits, dim=-1, dtype=dtype)
    return torch.sigmoid(logits.to(dtype))


@register_router("topk")
class TopKRouter(Router):
    per_expert_buffers = ("logit_offset", "expert_bias")
    supports_expert_subsets = True

    @classmethod
    def weights_sum_to_one(cls, cfg) -> bool:
        return bool(cfg.normalize)

    @classmethod
    def weight_at_zero_logits(cls, cfg, num_experts: int) -> float:
        return 0.5 if cfg.score == "sigmoid" else 1.0 / num_experts

    @classmethod
    def softmax_top_k_misfits(cls, cfg) -> list[str]:
        misfits = []
        if cfg.score != "softmax":
            misfits.append(f"routing.score={cfg.score}")
        if cfg.bias_balancing:
            misfits.append("routing.bias_balancing=true")
        return misfits

    def __init__(self, cfg, num_experts: int):
        super().__init__(cfg, num_experts)
        self.score = cfg.score
        self.normalize = bool(cfg.normalize)
        self.bias_balancing = bool(cfg.bias_balancing)
        self.bias_update_rate = float(cfg.bias_update_rate)
        # Selection-only bias; a buffer so it is saved in checkpoints but never trained by the optimizer.
        self.register_buffer("expert_bias", torch.zeros(num_experts), persistent=True)

    def route(self, logits: Tensor, token_ids: Tensor | None, experts: Tensor | None = None) -> RouterOutput:
        """experts: the global ids of the logits' columns when they are a subset (domain-owned routing)."""
        scores = router_probs(logits, self.score)  # [T, E]
        bias = self.expert_bias if experts is None else self.expert_bias[experts]
        selection = scores + bias.to(scores.dtype) if self.bias_balancing else scores
        _, expert_idx = torch.topk(selection, self.top_k, dim=-1)  # [T, k]
        weight = scores.gather(-1, expert_idx)  # [T, k]
        if self.normalize:
            weight = weight / weight.sum(dim=-1, keepdim=True)
        token_idx, expert_flat, weight_flat = flat_token_choice(expert_idx, weight)
        probs = scores if self.score == "softmax" else scores / scores.sum(dim=-1, keepdim=True)
        return RouterOutput(
            token_idx=token_idx,
            expert_idx=expert_flat,
            weight=weight_flat.to(logits.dtype),
            probs=probs,
            logits=logits,
            losses={
                "load_balancing": load_balancing_loss(probs, expert_flat, logits.shape[-1]),
                "z_loss": z_loss(logits),
            },
        )

    @torch.no_grad()
    def update_selection(self, load_E: Tensor) -> None:
        """DeepSeek-V3's step: raise the bias of under-loaded experts, lower it for over-loaded ones."""
        if not self.bias_balancing:
            return
        load = load_E.to(self.expert_bias.dtype)
        self.expert_bias += self.bias_update_rate * torch.sign(load.mean() - load)
