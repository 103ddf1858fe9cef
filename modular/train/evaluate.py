"""Per-domain validation: loss, perplexity and bits per byte (comparable across tokenizers)."""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F


@torch.no_grad()
def evaluate(model, val_sets: dict, device: torch.device, autocast=contextlib.nullcontext) -> dict[str, dict]:
    """{domain: {loss, ppl, bpb, tokens}} over each domain's validation windows (the same every call)."""
    was_training = model.training
    model.eval()
    results = {}
    try:
        for domain, val in val_sets.items():
            total_nats, total_tokens = 0.0, 0
            for batch in val:
                inputs, targets = batch.inputs.to(device), batch.targets.to(device)
                with autocast():
                    logits = model(inputs).logits
                total_nats += float(F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                                    reduction="sum"))
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


def format_eval_table(results: dict[str, dict]) -> str:
    lines = [f"{'domain':<12} {'loss':>8} {'ppl':>10} {'bits/byte':>10} {'tokens':>9}"]
    for domain, r in results.items():
        lines.append(f"{domain:<12} {r['loss']:>8.4f} {r['ppl']:>10.3f} {r['bpb']:>10.4f} {r['tokens']:>9}")
    if len(results) > 1:
        mean_loss = sum(r["loss"] for r in results.values()) / len(results)
        mean_bpb = sum(r["bpb"] for r in results.values()) / len(results)
        lines.append(f"{'mean':<12} {mean_loss:>8.4f} {math.exp(mean_loss):>10.3f} {mean_bpb:>10.4f}")
    return "\n".join(lines)
