"""Domain inference without labels: a per-sequence posterior over the domains a model knows, from a prefix.

Two methods (continual.inference.method):
- classifier: hashed 1-, 2- and 3-grams of the prefix's token ids, multinomial logistic regression
  (models/domain_classifier.py, kept as buffers on the model, so checkpoints, resume and export carry
  it); trained after each stage on windows of every domain seen so far.
- likelihood: posterior ∝ prior × p(prefix | the domain's route), one forward pass of the prefix per
  domain (`likelihood_posterior`).
Hard routing takes the most likely domain; soft mixing mixes the routes' next-token distributions by
the posterior. When no seen domain is likely (max posterior < min_posterior) a sequence takes the
anchor route (domain 0: the base model). Legend: B sequences, P prefix tokens, K domains.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from modular.errors import ConfigError
from modular.models.domain_classifier import DomainClassifier  # noqa: F401  (re-exported: part of this API)
from modular.train.evaluate import mixture_logprobs  # noqa: F401  (re-exported: soft routing)


@torch.no_grad()
def likelihood_posterior(model, prefix_BP: Tensor, num_domains: int, prior: Tensor | None = None,
                         autocast=contextlib.nullcontext) -> Tensor:
    """[B, K] posterior ∝ prior × p(prefix | route of domain k), the prefix scored under each route."""
    B, P = prefix_BP.shape
    if P < 2:
        raise ConfigError("the likelihood posterior needs a prefix of at least 2 tokens (continual.inference.prefix).")
    scores = []
    for k in range(num_domains):
        ids = torch.full((B,), k, dtype=torch.int64, device=prefix_BP.device)
        with autocast():
            logits = model(prefix_BP[:, :-1], domain_ids=ids).logits.float()
        logp = -F.cross_entropy(logits.reshape(-1, logits.shape[-1]), prefix_BP[:, 1:].reshape(-1),
                                reduction="none").reshape(B, P - 1).sum(1)
        scores.append(logp)
    log_prior = (prior if prior is not None else torch.full((num_domains,), 1.0 / num_domains)).log()
    return torch.softmax(torch.stack(scores, dim=1) + log_prior.to(prefix_BP.device), dim=1)


class DomainRouter:
    """Picks routes for unlabelled sequences: the posterior from the prefix, then hard or soft routing."""

    def __init__(self, model, inference_cfg, autocast=contextlib.nullcontext):
        self.model = model
        self.cfg = inference_cfg
        self.autocast = autocast

    @property
    def num_domains(self) -> int:
        return len(self.model.domains)

    def posterior(self, inputs_BT: Tensor, prefix_len: int | None = None) -> Tensor:
        """[B, K] over the model's domains from each row's first `prefix_len` (inference.prefix) tokens."""
        prefix = inputs_BT[:, : prefix_len or self.cfg.prefix]
        if self.cfg.method == "likelihood":
            return likelihood_posterior(self.model, prefix, self.num_domains, autocast=self.autocast)
        classifier = getattr(self.model, "domain_classifier", None)
        if classifier is None or int(classifier.trained_on) < 1:
            raise ConfigError("domain inference with method=classifier was asked for, but this model has no trained "
                              "domain classifier; run a continual stage with continual=isolate first, or use "
                              "continual.inference.method=likelihood.")
        with torch.no_grad():
            probs = torch.softmax(classifier(prefix), dim=1)
        return probs[:, : self.num_domains]

    def hard_route(self, posterior_BK: Tensor) -> Tensor:
        """[B] the most likely domain, or the anchor (0) where no domain reaches min_posterior."""
        best, domain = posterior_BK.max(dim=1)
        return torch.where(best >= self.cfg.min_posterior, domain, torch.zeros_like(domain))

    def route(self, inputs_BT: Tensor) -> Tensor:
        """What a sequence is evaluated or generated with: [B] domain ids (hard) or [B, K] weights (soft)."""
        posterior = self.posterior(inputs_BT)
        if self.cfg.mode == "soft":
            weights = posterior.clone()
            unsure = posterior.max(dim=1).values < self.cfg.min_posterior
            weights[unsure] = 0.0
            weights[unsure, 0] = 1.0
            return weights
        return self.hard_route(posterior)


def accuracy_at(router: DomainRouter, windows: dict[int, Tensor], prefixes: tuple[int, ...]) -> dict:
    """{prefix: {domain id: share of its windows whose most likely domain is itself}} (no anchor fallback)."""
    return {p: {k: float((router.posterior(w, p).argmax(dim=1) == k).double().mean()) for k, w in windows.items()}
            for p in prefixes}


def posterior_entropy_bits(posterior_BK: Tensor) -> float:
    p = posterior_BK.clamp_min(1e-12)
    return float(-(p * p.log()).sum(1).mean() / math.log(2))
