"""The domain classifier a domain-routed model carries: a linear model on hashed token n-grams of a prefix.

Kept as buffers on the model (`ModularLM.domain_classifier`), so checkpoints, resume and export carry it
and the language model's optimizer never sees it; trained by modular.continual.domain_inference after
each stage. Legend: B sequences, P prefix tokens, F n-gram features, K domains.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_PRIME = 2147483647  # 2^31 - 1: every product below stays inside int64
_MULT = 1103515245
_NGRAM_SALT = (0, 0x1E3779B1, 0x05EBCA77)  # one per n, so a bigram and a unigram of equal value differ


def ngram_features(ids_BP: Tensor, buckets: int) -> Tensor:
    """[B, F] bucket ids of every 1-, 2- and 3-gram of each row (F = 3P - 3)."""
    ids = ids_BP.to(torch.int64) + 1  # 0 stays free as a neutral element
    grams = [ids]
    if ids.shape[1] > 1:
        grams.append(ids[:, :-1] * 1_000_003 + ids[:, 1:])
    if ids.shape[1] > 2:
        grams.append((ids[:, :-2] * 1_000_003 + ids[:, 1:-1]) * 1_000_003 + ids[:, 2:])
    hashed = [((g % _PRIME + salt) % _PRIME * _MULT) % _PRIME % buckets for g, salt in zip(grams, _NGRAM_SALT)]
    return torch.cat(hashed, dim=1)


class DomainClassifier(nn.Module):
    """logits [B, K] = mean over a prefix's hashed n-grams of W[bucket] + b: a linear model on n-gram counts.

    W and b are buffers (the language model's optimizer never sees them); `fit` trains them. Classes grow
    as domains arrive (`resize`); class k is ModularLM.domains[k].
    """

    def __init__(self, buckets: int, num_domains: int = 1):
        super().__init__()
        self.buckets = int(buckets)
        self.register_buffer("weight", torch.zeros(self.buckets, num_domains))  # [buckets, K]
        self.register_buffer("bias", torch.zeros(num_domains))  # [K]
        self.register_buffer("trained_on", torch.zeros((), dtype=torch.int64))  # domains it was trained on

    @property
    def num_domains(self) -> int:
        return self.weight.shape[1]

    def resize(self, num_domains: int) -> None:
        """Follow the model's domains: new classes start at zero."""
        if num_domains <= self.num_domains:
            return
        extra = num_domains - self.num_domains
        self.weight = torch.cat([self.weight, self.weight.new_zeros(self.buckets, extra)], dim=1)
        self.bias = torch.cat([self.bias, self.bias.new_zeros(extra)])

    @staticmethod
    def _logits(features_BF: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        return F.embedding_bag(features_BF, weight, mode="mean") + bias

    def forward(self, ids_BP: Tensor) -> Tensor:
        return self._logits(ngram_features(ids_BP, self.buckets).to(self.weight.device), self.weight, self.bias)

    @torch.enable_grad()
    def fit(self, sample_windows, steps: int, lr: float, generator: torch.Generator, min_prefix: int = 16,
            max_prefix: int = 256) -> dict:
        """Train on `sample_windows(step) -> (ids [B, L], labels [B])`; each step uses one random prefix
        length in [min_prefix, min(max_prefix, L)]. Returns {steps, loss, flops}."""
        weight = self.weight.clone().requires_grad_(True)
        bias = self.bias.clone().requires_grad_(True)
        optimizer = torch.optim.Adam([weight, bias], lr=lr)
        loss, flops = float("nan"), 0.0
        for step in range(steps):
            ids, labels = sample_windows(step)
            top = min(max_prefix, ids.shape[1])
            prefix = int(torch.randint(min(min_prefix, top), top + 1, (1,), generator=generator))
            features = ngram_features(ids[:, :prefix], self.buckets).to(weight.device)
            out = F.cross_entropy(self._logits(features, weight, bias), labels.to(weight.device))
            optimizer.zero_grad(set_to_none=True)
            out.backward()
            optimizer.step()
            loss = float(out.detach())
            flops += 6.0 * features.numel() * weight.shape[1]  # gather-sum forward and its backward
        with torch.no_grad():
            self.weight.copy_(weight)
            self.bias.copy_(bias)
            self.trained_on.fill_(weight.shape[1])
        return {"steps": steps, "loss": loss, "flops": flops}

    def flops_per_sequence(self, prefix: int) -> float:
        """Forward FLOPs of one prefix: 3P n-gram lookups summed over K classes, plus the softmax."""
        return 2.0 * 3 * prefix * self.num_domains + 5.0 * self.num_domains
