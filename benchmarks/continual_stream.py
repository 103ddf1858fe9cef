"""Continual strategies side by side on the real corpora: en → de → code_py → fr, equal budget per stage.

Runs `modular continual` once per strategy (naive, replay 5% and 25%, EWC through Avalanche, add+freeze,
add+freeze+merge to a budget, joint) with the same model, stream, steps and batch per stage, as the
members of one sweep (modular.sweep: the --out folder, sweep.json), then prints `modular compare`'s
table of it: final average perplexity, mean forgetting on earlier domains, new-domain perplexity (mean of
each domain's perplexity right after its own stage), final perplexity per domain, parameters and
training FLOPs per strategy (also written to --out/compare.md and compare.png).

With --base-steps N, stage 0 is shared: one naive run trains the base model on en for N steps, and
every strategy starts from it (`train.init_from`, `continual.first_stage_steps=0`: its stage 0 only
evaluates the base), so the strategies differ only in how they add de, code_py and fr.

    python benchmarks/continual_stream.py [--steps 150] [--base-steps 800] [--out runs/bench-continual]
                                          [--only add_freeze,naive] [overrides ...]
Runs resume: rerunning with the same --out and overrides skips finished strategies (and the base).
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

# old experts and router rows, and the shared trunk: attention, embeddings (and the tied head), norms
TRUNK_FROZEN = "continual.freeze=[old_experts,old_router,attention,embeddings,norms]"

STRATEGIES = {
    # domain-owned experts and trunk deltas, routed per sequence (one run gives the inferred and the
    # oracle-routed matrix); configs/continual/isolate.yaml
    "isolate": ["continual=isolate"],
    "naive": ["continual=naive"],
    "replay 5%": ["continual=replay", "continual.replay=0.05"],
    "replay 25%": ["continual=replay", "continual.replay=0.25"],
    "ewc (avalanche)": ["continual=ewc"],
    # the control for add_freeze_distill: the same replay and distillation, no growth
    "replay 25% + distill 1": ["continual=replay", "continual.replay=0.25", "continual.distill_weight=1.0"],
    "add+freeze": ["continual=add_freeze"],
    # the preset plus everything shared frozen (attention, embeddings, norms) and a router review on replay
    "add+freeze (shared frozen)": ["continual=add_freeze",
                                  TRUNK_FROZEN,
                                  "continual.review_steps=20"],
    # the same with the embeddings (and the tied output head) left trainable: new characters and words
    "add+freeze (attention frozen)": ["continual=add_freeze",
                                     "continual.freeze=[old_experts,old_router,attention,norms]",
                                     "continual.review_steps=20"],
    # new router rows that start preferred by the new domain's tokens and avoided by the earlier ones'
    "add+freeze (shared frozen + contrast)": ["continual=add_freeze",
                                             TRUNK_FROZEN,
                                             "continual.router_init=contrast", "continual.router_margin=4"],
    "add+freeze (shared frozen + contrast + review)": [
        "continual=add_freeze", TRUNK_FROZEN,
        "continual.router_init=contrast", "continual.router_margin=4", "continual.review_steps=20"],
    # the preset configs/continual/add_freeze_trunk.yaml
    "add+freeze (shared frozen + contrast 1 + review)": ["continual=add_freeze_trunk"],
    "add+freeze (shared frozen + contrast + review + 4 new)": [
        "continual=add_freeze", TRUNK_FROZEN,
        "continual.router_init=contrast", "continual.router_margin=4", "continual.review_steps=20",
        "continual.add_experts=4"],
    "add+freeze (contrast)": ["continual=add_freeze", "continual.router_init=contrast",
                              "continual.router_margin=4"],
    # the preset with distillation towards the model before each stage (KL on every token of the batch)
    "add+freeze (distill 1)": ["continual=add_freeze", "continual.distill_weight=1.0"],
    "add+freeze (distill 3)": ["continual=add_freeze", "continual.distill_weight=3.0"],
    # the preset configs/continual/add_freeze_distill.yaml
    "add+freeze (distill 1 + replay 25%)": ["continual=add_freeze_distill"],
    # growth on top of the strong baseline: does adding experts help replay 25%?
    "add+freeze (replay 25%)": ["continual=add_freeze", "continual.replay=0.25"],
    "add+freeze+merge": ["continual=add_freeze_merge"],
    "joint": ["continual=joint"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150, help="optimizer steps per stage (every strategy)")
    parser.add_argument("--out", default="runs/bench-continual")
    parser.add_argument("--only", default="", help="comma-separated strategy names (default: all)")
    parser.add_argument("--base-steps", type=int, default=0,
                        help="train a shared base on en for this many steps; every strategy starts from it")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("overrides", nargs="*", help="overrides applied to every strategy")
    args = parser.parse_args()
    os.environ.setdefault("WANDB_MODE", "offline")

    from modular.cli import main as cli

    common = ["data=corpora", "continual.stream=[en,de,code_py,fr]", f"continual.steps_per_stage={args.steps}",
              "train.progress=false", f"train.threads={args.threads}", *args.overrides]
    wanted = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = [name for name in wanted if name not in STRATEGIES]
    if unknown:
        raise SystemExit(f"--only names {unknown[0]!r}, which is not a row; rows: {', '.join(STRATEGIES)}.")
    if args.base_steps > 0:
        from modular.train.checkpoint import latest_checkpoint

        base = Path(args.out) / "base"
        if not (base / "report.json").exists():
            start = time.perf_counter()
            if cli(["continual", *common, "continual=naive", "continual.stream=[en]",
                    f"continual.first_stage_steps={args.base_steps}", f"run.dir={base}"]) != 0:
                raise SystemExit("the base run failed")
            print(f"base: {time.perf_counter() - start:.0f} s")
        common += ["continual.first_stage_steps=0", f"train.init_from={latest_checkpoint(base)}"]
    from modular.compare import compare_paths
    from modular.sweep import Member, run_sweep

    members = [Member("", name, STRATEGIES[name]) for name in STRATEGIES if not wanted or name in wanted]
    code = run_sweep("continual", common, members, args.out, compare=False)

    base_note = f" after a shared base of {args.base_steps} steps on en" if args.base_steps else ""
    print(f"\n# continual stream en → de → code_py → fr, {args.steps} steps per stage{base_note}; {platform.machine()}, "
          f"overrides: {' '.join(args.overrides) or '(defaults)'}")
    compare_paths([args.out], out=args.out)
    if code != 0:
        raise SystemExit(code)


if __name__ == "__main__":
    main()
