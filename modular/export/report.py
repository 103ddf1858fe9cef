"""export_report.json: validation perplexity per domain of the MoE, of its export reloaded through
transformers (the merged dense model, or the HF MoE), of the seed model, and the share of gain kept.

Retained share = (loss_seed − loss_exported) / (loss_seed − loss_moe), in nats per token: 1 keeps the
whole gain, 0 none, negative is worse than the seed. It is null where there is no seed or no gain to keep.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from modular.atomic import atomic_write_json
from modular.errors import ConfigError

Batch = tuple[Tensor, Tensor]  # (inputs [B, T], targets [B, T] already shifted, -100 = ignore)


@torch.no_grad()
def mean_loss(logits_fn: Callable[[Tensor], Tensor], batches: Sequence[Batch]) -> tuple[float, int]:
    """(token-weighted mean cross-entropy in nats, tokens counted) of a logits function over batches."""
    total, count = 0.0, 0
    for batch in batches:
        inputs, targets = (batch.inputs, batch.targets) if hasattr(batch, "targets") else batch
        logits = logits_fn(inputs).float()
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1).to(logits.device),
                               ignore_index=-100, reduction="sum")
        total += float(loss)
        count += int((targets != -100).sum())
    if count == 0:
        raise ConfigError("an evaluation domain has no target tokens; give batches with targets other than -100.")
    return total / count, count


def modular_logits(model) -> Callable[[Tensor], Tensor]:
    device = next(model.parameters()).device
    return lambda ids: model(ids.to(device)).logits


def hf_logits(hf_model) -> Callable[[Tensor], Tensor]:
    device = next(hf_model.parameters()).device
    return lambda ids: hf_model(input_ids=ids.to(device)).logits


def load_hf_model(folder: str | os.PathLike, dtype: torch.dtype = torch.float32):
    """An exported folder loaded the way a user would: AutoModelForCausalLM, offline, no custom code."""
    from modular.hf_folders import auto_causal_lm

    return auto_causal_lm(folder, dtype=dtype).eval()


def evaluate(model_or_fn, eval_batches: Mapping[str, Sequence[Batch]]) -> dict[str, dict]:
    """{domain: {"loss", "perplexity", "tokens"}} for a ModularLM, an HF model or a logits function."""
    if callable(model_or_fn) and not isinstance(model_or_fn, torch.nn.Module):
        fn = model_or_fn
    elif hasattr(model_or_fn, "moe_stats"):
        fn = modular_logits(model_or_fn)
    else:
        fn = hf_logits(model_or_fn)
    was_training = getattr(model_or_fn, "training", False)
    if isinstance(model_or_fn, torch.nn.Module):
        model_or_fn.eval()
    try:
        results = {}
        for domain, batches in eval_batches.items():
            loss, tokens = mean_loss(fn, batches)
            results[domain] = {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": tokens}
        return results
    finally:
        if isinstance(model_or_fn, torch.nn.Module):
            model_or_fn.train(was_training)


def retained_share(loss_seed: float | None, loss_moe: float, loss_exported: float) -> float | None:
    if loss_seed is None:
        return None
    gain = loss_seed - loss_moe
    if gain <= 1e-12:  # the MoE did not improve on the seed: there is no gain to retain
        return None
    return (loss_seed - loss_exported) / gain


def evaluate_routes(model, eval_batches: Mapping[str, Sequence[Batch]], routes: Mapping[str, int]) -> dict[str, dict]:
    """evaluate() of a domain-routed ModularLM with every row of domain `name` routed as domain id routes[name]."""
    device = next(model.parameters()).device

    def routed(domain_id: int):
        return lambda ids: model(ids.to(device), domain_ids=torch.full((ids.shape[0],), domain_id, dtype=torch.int64,
                                                                       device=device)).logits

    was_training = model.training
    model.eval()
    try:
        return {domain: evaluate(routed(int(routes[domain])), {domain: batches})[domain]
                for domain, batches in eval_batches.items()}
    finally:
        model.train(was_training)


def export_report(moe_model, export_dir: str | os.PathLike, eval_batches: Mapping[str, Sequence[Batch]], *,
                  seed_model=None, out_path: str | os.PathLike | None = None, routes: Mapping[str, int] | None = None,
                  exported_results: Mapping[str, dict] | None = None) -> dict:
    """Evaluate the MoE, its export reloaded by transformers and the seed on every domain; write JSON to
    out_path if given.

    eval_batches: {domain: [(inputs [B, T], targets [B, T]), ...]} (or objects with .inputs/.targets).
    seed_model: a ModularLM, an HF model, an HF folder path, or None.
    routes: {domain: domain id} for a domain-routed MoE: its rows of each domain take that route (None: the
      plain forward). exported_results: the exported side already evaluated (evaluate()'s {domain: {...}});
      None loads export_dir with transformers.
    """
    if not eval_batches:
        raise ConfigError("eval_batches is empty; give at least one domain with batches.")
    moe = evaluate_routes(moe_model, eval_batches, routes) if routes is not None else evaluate(moe_model, eval_batches)
    exported = dict(exported_results) if exported_results is not None else \
        evaluate(load_hf_model(export_dir), eval_batches)
    seed = None
    if seed_model is not None:
        seed_model = load_hf_model(seed_model) if isinstance(seed_model, (str, os.PathLike)) else seed_model
        seed = evaluate(seed_model, eval_batches)
    domains = {}
    for domain in eval_batches:
        seed_loss = seed[domain]["loss"] if seed else None
        domains[domain] = {
            "tokens": moe[domain]["tokens"],
            "moe": {k: moe[domain][k] for k in ("loss", "perplexity")},
            "exported": {k: exported[domain][k] for k in ("loss", "perplexity")},
            "seed": {k: seed[domain][k] for k in ("loss", "perplexity")} if seed else None,
            "retained_share": retained_share(seed_loss, moe[domain]["loss"], exported[domain]["loss"]),
        }
        if routes is not None:  # which route of the MoE the row was compared with
            domains[domain]["route"] = moe_model.domains[int(routes[domain])]
    report = {
        "export_dir": str(Path(export_dir).resolve()),
        "domains": domains,
        "mean": _mean_row(domains),
        "definition": "retained_share = (loss_seed - loss_exported) / (loss_seed - loss_moe), in nats per token",
    }
    if out_path is not None:
        atomic_write_json(out_path, report)
    return report


def _mean_row(domains: dict) -> dict:
    """Unweighted mean over domains (each domain counts once, whatever its size)."""
    def mean(values):
        values = [v for v in values if v is not None]
        return sum(values) / len(values) if values else None

    row = {}
    for model in ("moe", "exported", "seed"):
        loss = mean(d[model]["loss"] if d[model] else None for d in domains.values())
        row[model] = None if loss is None else {"loss": loss, "perplexity": math.exp(min(loss, 700.0))}
    row["retained_share"] = retained_share(row["seed"]["loss"] if row["seed"] else None,
                                           row["moe"]["loss"], row["exported"]["loss"])
    return row
