"""Vocabulary growth, en → ru: an English BPE, and a Russian stage at equal training FLOPs with and without growth.

A byte-level BPE (--vocab tokens) is trained on en; a base model trains on en (`modular continual`, stream [en]);
then two runs start from it (`train.init_from`, stage 0 only evaluates) and add ru with add_freeze and 25% en
replay: one as it is, one with `continual.grow_vocab.max_new_tokens=--new-tokens`. The grown run's steps are
cut so both spend the same training FLOPs (its output head is wider). Prints, per run: tokens per byte on ru
and en, bits per byte on ru and en after the stage (whole validation subsets, the same text for both
tokenizers), training bytes per second, and the share of en tokens the grown tokenizer changes.

    MODULAR_CORPORA=../shared/corpora python benchmarks/vocab_growth.py [--out runs/bench-vocab-growth]
        [--vocab 4096] [--new-tokens 2000] [--base-steps 600] [--stage-steps 400] [--threads 1] [overrides ...]
Reruns reuse what --out already holds (tokenizer, base, finished runs).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

DOMAINS = ("en", "de", "fr", "es", "code_py", "ru")
# a narrow version of model=small (4 MoE layers of 4 experts, top-2) that trains at a few thousand tokens per
# second on one shared CPU core; overrides given on the command line apply after it
MODEL = ["model.d_model=128", "experts.num_experts=4", "experts.ffn_dim=256"]


def bench_corpora(source: Path, out: Path, val_bytes: int) -> Path:
    """data=corpora's layout: train splits linked, en and ru val cut to their first documents (whole ones) so
    that evaluation covers all of it under either tokenizer; the other domains linked (prepare_data reads them)."""
    for d in DOMAINS:
        (out / d).mkdir(parents=True, exist_ok=True)
        for split in ("train", "val"):
            target, origin = out / d / f"{split}.jsonl", source / d / f"{split}.jsonl"
            if target.exists() or target.is_symlink():
                continue
            if split == "val" and d in ("en", "ru"):
                kept, size = [], 0
                for line in origin.read_text(encoding="utf-8").splitlines(keepends=True):
                    if size >= val_bytes:
                        break
                    kept.append(line)
                    size += len(json.loads(line)["text"].encode("utf-8"))
                target.write_text("".join(kept), encoding="utf-8")
            else:
                target.symlink_to(origin.resolve())
    return out


def texts(path: Path) -> list[str]:
    return [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines()]


def flops_per_token(overrides: list[str], vocab_size: int) -> float:
    from modular.config import compose_config
    from modular.models import build_model
    from modular.models.summary import summarize

    cfg = compose_config([*overrides, f"model.vocab_size={vocab_size}"])
    return float(summarize(build_model(cfg), cfg.train.seq_len)["train_flops_per_token"])


def stage_tokens_per_second(run: Path) -> float:
    """Mean training throughput of the ru stage, from its log windows (growth and evaluation not counted)."""
    rows = [json.loads(line) for line in (run / "stages" / "01-ru" / "metrics.jsonl").read_text().splitlines()]
    rates = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r]
    rates = rates[1:] or rates  # the first window holds start-up
    return sum(rates) / len(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/bench-vocab-growth")
    parser.add_argument("--vocab", type=int, default=4096, help="tokens of the English BPE")
    parser.add_argument("--new-tokens", type=int, default=2000, help="continual.grow_vocab.max_new_tokens")
    parser.add_argument("--base-steps", type=int, default=600, help="steps of the base model on en")
    parser.add_argument("--stage-steps", type=int, default=400, help="steps of the ru stage without growth")
    parser.add_argument("--val-bytes", type=int, default=100_000, help="validation text of en and ru, in bytes")
    parser.add_argument("--freeze", default="",
                        help="continual.freeze of the ru stage, e.g. old_experts,old_router,attention,embeddings,norms "
                             "(default: add_freeze's); the runs go to --out/<name>-frozen-<n parts>")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("overrides", nargs="*", help="overrides applied to every run")
    args = parser.parse_args()
    os.environ.setdefault("WANDB_MODE", "offline")
    out = Path(args.out).absolute()
    source = Path(os.environ.get("MODULAR_CORPORA", "../shared/corpora")).absolute()
    if not (source / "ru" / "train.jsonl").is_file():
        raise SystemExit(f"{source} holds no ru/train.jsonl; point MODULAR_CORPORA at the shared corpora.")
    os.environ["MODULAR_CORPORA"] = str(bench_corpora(source, out / "corpora", args.val_bytes))

    from modular.cli import main as cli
    from modular.data import vocab_growth as vg
    from modular.data.tokenizer import HFTokenizer, train_bpe
    from modular.train.checkpoint import latest_checkpoint

    started = time.perf_counter()
    bpe = out / "en_bpe"
    if not (bpe / "tokenizer.json").exists():
        train_bpe(texts(source / "en" / "train.jsonl"), args.vocab, bpe)
    english = HFTokenizer(bpe)
    common = ["data=corpora", "data.tokenizer.kind=hf", f"data.tokenizer.path={bpe}",
              f"model.vocab_size={english.vocab_size}", "train.progress=false", f"train.threads={args.threads}",
              "train.eval_batches=100000", "train.log_every=20", *MODEL, *args.overrides]
    base = out / "base"
    if not (base / "report.json").exists():
        assert cli(["continual", *common, "continual=naive", "continual.stream=[en]",
                    f"continual.first_stage_steps={args.base_steps}", f"run.dir={base}"]) == 0, "the base run failed"
    stage = [*common, "continual.stream=[en,ru]", "continual=add_freeze", "continual.replay=0.25",
             "continual.first_stage_steps=0", f"train.init_from={latest_checkpoint(base)}"]
    suffix = ""
    if args.freeze:
        stage.append(f"continual.freeze=[{args.freeze}]")
        suffix = f"-frozen-{len(args.freeze.split(','))}"
    # equal training FLOPs: the grown run's steps shrink by the ratio of FLOPs per token (its wider head)
    ratio = flops_per_token(stage, english.vocab_size) / flops_per_token(stage, english.vocab_size + args.new_tokens)
    runs = {"without growth": (out / f"plain{suffix}", [f"continual.steps_per_stage={args.stage_steps}"]),
            f"grown by {args.new_tokens}": (out / f"grown{suffix}", [f"continual.steps_per_stage={round(args.stage_steps * ratio)}",
                                                           f"continual.grow_vocab.max_new_tokens={args.new_tokens}"])}
    for run, extra in runs.values():
        if not (run / "report.json").exists():
            assert cli(["continual", *stage, *extra, f"run.dir={run}"]) == 0, f"{run} failed"

    val = {d: texts(out / "corpora" / d / "val.jsonl") for d in ("ru", "en")}
    rows = []
    for name, (run, _) in runs.items():
        st = json.loads((run / "continual_state.json").read_text())
        stage_1 = st["stages"][1]
        grown = stage_1.get("vocab", {}).get("grew")
        tokenizer = HFTokenizer(run / "stages" / "01-ru" / "tokenizer") if grown else english
        tpb = {d: vg.tokens_per_byte(tokenizer, val[d]) for d in val}
        bytes_per_token = 0.75 / tpb["ru"] + 0.25 / tpb["en"]  # the stage's rows: 75% ru, 25% en replay
        rows.append({
            "run": name, "steps": stage_1["steps"], "vocab": stage_1["vocab_size"], "tpb": tpb,
            "bpb": {d: stage_1["eval"][d]["bpb"] for d in ("ru", "en")},
            "bpb_before": {d: st["stages"][0]["eval"][d]["bpb"] for d in ("ru", "en")},
            "flops": stage_1["flops"], "bytes_per_s": stage_tokens_per_second(run) * bytes_per_token,
            "en_changed": vg.changed_token_share(english, tokenizer, val["en"]) if grown else 0.0,
            "growth_s": stage_1.get("vocab", {}).get("seconds"),
        })
    plain, grown = rows

    frozen = f" (continual.freeze=[{args.freeze}])" if args.freeze else ""
    print(f"\n# vocabulary growth en → ru: English BPE of {english.vocab_size} tokens, base {args.base_steps} steps on en, "
          f"ru stage add_freeze{frozen} + 25% en replay at equal training FLOPs; {platform.machine()}, "
          f"{os.cpu_count()} cores, train.threads={args.threads}, {time.strftime('%Y-%m-%d')}; "
          f"model: {' '.join(MODEL + args.overrides)}")
    print("| run | ru steps | vocabulary | tokens/byte ru | tokens/byte en | bpb ru after | bpb en after | "
          "training FLOPs | training bytes/s | en tokens changed |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['run']} | {r['steps']} | {r['vocab']:,} | {r['tpb']['ru']:.3f} | {r['tpb']['en']:.3f} | "
              f"{r['bpb']['ru']:.4f} | {r['bpb']['en']:.4f} | {r['flops']:.3e} | {r['bytes_per_s']:,.0f} | "
              f"{r['en_changed']:.4%} |")
    print(f"\nbefore the stage (the base): bpb ru {plain['bpb_before']['ru']:.4f}, en {plain['bpb_before']['en']:.4f}; "
          f"learning the merges took {grown['growth_s']} s")
    targets = [
        ("ru tokens per byte down >= 30%", 1 - grown["tpb"]["ru"] / plain["tpb"]["ru"], 0.30, True),
        ("ru bits per byte better with growth", plain["bpb"]["ru"] - grown["bpb"]["ru"], 0.0, True),
        ("en bits per byte within 1% of no growth", abs(grown["bpb"]["en"] / plain["bpb"]["en"] - 1), 0.01, False),
        ("en bits per byte within 1% of before the stage (grown)", abs(grown["bpb"]["en"] / grown["bpb_before"]["en"] - 1),
         0.01, False),
    ]
    for what, value, bound, above in targets:
        met = value >= bound if above else value <= bound
        print(f"- {what}: {value:+.4f} ({'met' if met else 'MISSED'})")
    print(f"(total {time.perf_counter() - started:.0f} s)")
    (out / f"results{suffix}.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
