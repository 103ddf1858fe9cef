"""Per-domain validation: loss, perplexity and bits per byte (comparable across tokenizers)."""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F


@torch.no_grad()
def evaluate(model, val_sets: dict, device: torch.device, autocast=contextlib.nullcontext, route=None) -> dict[str, dict]:
    """{domain: {loss, ppl, bpb, tokens}} over each domain's validation windows (the same every call).

    route(domain, inputs) → None, [B] domain ids (each row's route) or [B, K] weights (the routes'
    predictions mixed): how a domain-routed model evaluates the rows (default: its plain forward)."""
    was_training = model.training
    model.eval()
    results = {}
    try:
        for domain, val in val_sets.items():
            total_nats, total_tokens = 0.0, 0
            for batch in val:
                inputs, targets = batch.inputs.to(device), batch.targets.to(device)
                how = route(domain, inputs) if route is not None else None
                with autocast():
                    if how is not None and how.is_floating_point():
                        logp = mixture_logprobs(model, inputs, how)
                        total_nats -= float(logp.gather(-1, targets.unsqueeze(-1)).sum())
                    else:
                        logits = model(inputs, **({"domain_ids": how} if how is not None else {})).logits
                        total_nats += float(F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                                            targets.reshape(-1), reduction="sum"))
                total_tokens += targets.numel()
            loss = total_nats / max(1, total_tokens)
            results[domain] = {
                "loss": loss,
                "ppl": math.exp(min(loss, 700.0)),
                "bpb": total_nats / (math.log(2) * val.num_bytes) if val.num_bytes else float("nan"),
                "tokens": total_tokens,
            }
    finally:
        model.train(was_training)
    return results


def mixture_logprobs(model, inputs_BT, weights_BK, min_weight: float = 1e-3):
    """[B, T, V] log Σ_k w_k p_k(next token) over the routes with weight ≥ min_weight (soft routing)."""
    total = None
    for k in range(weights_BK.shape[1]):
        w = weights_BK[:, k]
        if float(w.max()) < min_weight:
            continue
        ids = torch.full((inputs_BT.shape[0],), k, dtype=torch.int64, device=inputs_BT.device)
        logp = torch.log_softmax(model(inputs_BT, domain_ids=ids).logits.float(), dim=-1)
        term = logp + w.clamp_min(1e-30).log().to(logp.dtype)[:, None, None]
        total = term if total is None else torch.logaddexp(total, term)
    return total



def format_eval_table(results: dict[str, dict]) -> str:
    lines = [f"{'domain':<12} {'loss':>8} {'ppl':>10} {'bits/byte':>10} {'tokens':>9}"]
    for domain, r in results.items():
        lines.append(f"{domain:<12} {r['loss']:>8.4f} {r['ppl']:>10.3f} {r['bpb']:>10.4f} {r['tokens']:>9}")
    if len(results) > 1:
        mean_loss = sum(r["loss"] for r in results.values()) / len(results)
        mean_bpb = sum(r["bpb"] for r in results.values()) / len(results)
        lines.append(f"{'mean':<12} {mean_loss:>8.4f} {math.exp(mean_loss):>10.3f} {mean_bpb:>10.4f}")
    return "\n".join(lines)
