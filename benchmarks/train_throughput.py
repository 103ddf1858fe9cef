"""Training tokens/s on the CPU: the default MoE against a dense model with the same active parameters.

Both models train side by side in one process on the same batches of the embedded sample corpus
(forward, backward, AdamW step), alternating in rounds so that machine noise hits both alike.
Prints a table and the MoE/dense ratio (target: >= 0.8).

    python benchmarks/train_throughput.py [--steps 20] [--rounds 3] [--threads 2] [overrides ...]
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from modular.config import compose_config
from modular.data.loader import MixtureLoader
from modular.models import build_model
from modular.models.summary import summarize
from modular.train.optimizer import build_optimizer


def make(overrides: list[str]):
    cfg = compose_config(overrides)
    torch.manual_seed(0)
    model = build_model(cfg)
    return cfg, model, build_optimizer(model, cfg.train)


def run_steps(model, optimizer, batches) -> float:
    start = time.perf_counter()
    for batch in batches:
        out = model(batch.inputs, batch.targets)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per model per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("overrides", nargs="*", help="extra overrides applied to both models")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    candidates = {"moe (default)": [*args.overrides], "dense, same active": ["model=dense", *args.overrides]}
    built = {name: make(o) for name, o in candidates.items()}
    cfg = next(iter(built.values()))[0]
    t = cfg.train
    loader = MixtureLoader.from_config(cfg.data, t.batch_size, t.seq_len, seed=0, progress=False)
    batches = [next(loader) for _ in range(args.steps)]
    tokens_per_round = sum(b.targets.numel() for b in batches)
    for _, model, opt in built.values():  # warm-up: allocator, first-call overheads
        run_steps(model, opt, batches[:3])
    seconds = {name: [] for name in built}
    for _ in range(args.rounds):
        for name, (_, model, opt) in built.items():
            seconds[name].append(run_steps(model, opt, batches))

    print(f"# train throughput, {platform.machine()} {platform.processor() or ''} torch {torch.__version__}, "
          f"{args.threads} threads, batch {t.batch_size}x{t.seq_len}, {args.steps} steps x {args.rounds} rounds")
    print("| model | total params | active params | train FLOPs/token | tokens/s (best round) | ratio to dense |")
    print("|---|---:|---:|---:|---:|---:|")
    rates = {name: tokens_per_round / min(s) for name, s in seconds.items()}
    dense_rate = rates["dense, same active"]
    for name, (_cfg, model, _) in built.items():
        s = summarize(model, t.seq_len)
        print(f"| {name} | {s['total_params']:,} | {s['active_params']:,} | {s['train_flops_per_token']:,} | "
              f"{rates[name]:,.0f} | {rates[name] / dense_rate:.2f} |")


if __name__ == "__main__":
    main()
