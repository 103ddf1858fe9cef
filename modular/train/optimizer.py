"""AdamW with weight-decay groups: no decay on norms, biases and embeddings (by name fragment).

Only parameters with requires_grad are handed to the optimizer, so a frozen parameter gets no step,
no weight decay and no moments.
"""

from __future__ import annotations

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float, no_decay: list[str]) -> list[dict]:
    decay, plain = [], []
    seen = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (plain if any(fragment in name for fragment in no_decay) or p.ndim < 2 else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "name": "decay"}]
    if plain:
        groups.append({"params": plain, "weight_decay": 0.0, "name": "no_decay"})
    return groups


def build_optimizer(model: nn.Module, train_cfg) -> torch.optim.AdamW:
    groups = param_groups(model, train_cfg.weight_decay, list(train_cfg.no_decay))
    return torch.optim.AdamW(groups, lr=train_cfg.lr, betas=(train_cfg.beta1, train_cfg.beta2),
                             eps=train_cfg.eps)
