"""Training tokens/s: the MoE against a dense model with the same active parameters, on the CPU or (--gpu) a GPU.

CPU mode: both models train side by side in one process on the same batches of the embedded sample
corpus (forward, backward, AdamW step), alternating in rounds so that machine noise hits both alike.
Prints a table and the MoE/dense ratio (target: >= 0.8).

    python benchmarks/train_throughput.py [--steps 20] [--rounds 3] [--threads 2] [overrides ...]

GPU mode (--gpu): a model large enough to load an H100/H200 (GPU_MODEL: d_model 2048, 16 layers,
8 SwiGLU experts top-2) trained in bf16 through the Trainer users run (`Trainer.train_step`: autocast,
forward, backward, clipping, AdamW), once per row of --rows: the MoE with kernels.backend=triton or
torch, the dense model with the same active parameters, each eager or with train.compile=true
(suffix "+compile"). Each finished row is appended to --out as one JSON line, so a run cut short
keeps what it measured; --table prints the markdown table of such a file. MFU = model FLOPs/s
(`modular info`'s training FLOPs per token: 6 per active matmul parameter + 6·layers·seq_len·d_model
for attention, Kaplan et al.) over the bf16 dense peak: the datasheet's 989 TFLOP/s and a dense
8192³ bf16 matmul measured in the same process (row "matmul").

    python benchmarks/train_throughput.py --gpu --rows matmul,triton,dense,torch --out rows.jsonl [overrides ...]
    python benchmarks/train_throughput.py --table rows.jsonl
    python benchmarks/train_throughput.py --gpu --dry-run --out rows.jsonl   # the same code on the CPU, tiny
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modular.config import compose_config
from modular.data.loader import MixtureLoader
from modular.models import build_model
from modular.models.summary import summarize
from modular.train.optimizer import build_optimizer

# ---------------------------------------------------------------------------------------------------
# CPU mode
# ---------------------------------------------------------------------------------------------------


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


def cpu_main(args) -> int:
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
    return 0


# ---------------------------------------------------------------------------------------------------
# GPU mode
# ---------------------------------------------------------------------------------------------------

# ~1.8B parameters, ~0.6B active per token: AdamW state (16 bytes per parameter) plus bf16 activations
# of 8 x 2048 tokens fit an 80 GB card; one step is ~60 TFLOP, a fraction of a second on an H100/H200.
GPU_MODEL = ["model=base", "model.d_model=2048", "model.n_layers=16", "model.n_heads=16", "model.n_kv_heads=8",
             "model.max_seq_len=2048", "experts=swiglu", "experts.num_experts=8", "experts.ffn_dim=2048",
             "routing=topk", "routing.top_k=2", "train.batch_size=8", "train.seq_len=2048"]
# The dense model with the same active parameters: every FFN dense with top_k · expert width.
GPU_DENSE = ["model.moe_layers=none", "model.ffn_dim=4096"]
# --dry-run: the same code on the CPU with a toy model, Triton's interpreter and torch.compile on the CPU.
DRY_MODEL = ["model=tiny", "train.batch_size=2", "train.seq_len=32", "train.threads=1"]
DRY_DENSE = ["model.moe_layers=none", "model.ffn_dim=512"]  # tiny's experts: 8 x 256, top-2
ROWS = ("matmul", "triton", "torch", "dense", "triton+compile", "torch+compile", "dense+compile")
H100_H200_BF16_DENSE_PEAK = 989e12  # datasheet, SXM, dense (no sparsity)


def row_overrides(row: str, dry_run: bool, extra: list[str]) -> list[str]:
    """The config overrides of one table row (not "matmul")."""
    kind, _, suffix = row.partition("+")
    base = DRY_MODEL if dry_run else GPU_MODEL
    if kind == "dense":
        base = base + (DRY_DENSE if dry_run else GPU_DENSE)
    else:
        base = base + [f"kernels.backend={kind}"]
    return [*base, "train.dtype=bf16", f"train.compile={str(suffix == 'compile').lower()}", "train.progress=false",
            "train.warmup_steps=0", *extra]


def measure_matmul(device: str, dry_run: bool) -> dict:
    """A dense n³ bf16 matmul's TFLOP/s: the peak this device reaches with cuBLAS."""
    n = 256 if dry_run else 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    if dry_run:
        start = time.perf_counter()
        a @ b
        ms = (time.perf_counter() - start) * 1e3
    else:
        from triton.testing import do_bench

        ms = do_bench(lambda: a @ b, warmup=100, rep=500)
    return {"row": "matmul", "n": n, "tflops": 2 * n**3 / (ms * 1e-3) / 1e12}


def measure_row(row: str, steps: int, warmup: int, dry_run: bool, extra: list[str]) -> dict:
    """Tokens/s of Trainer.train_step for one row, with its first-step time and peak memory."""
    from modular.train.run import prepare_data
    from modular.train.trainer import Trainer

    overrides = row_overrides(row, dry_run, extra)
    cfg = compose_config(overrides)
    device = "cpu" if dry_run else "cuda"
    _, loader, _ = prepare_data(cfg)
    torch.manual_seed(cfg.seed)
    with torch.device(device):  # parameters created and initialised on the device: seconds, not minutes
        model = build_model(cfg)
    summary = summarize(model, cfg.train.seq_len)
    with tempfile.TemporaryDirectory(prefix="throughput-") as run_dir:
        trainer = Trainer(cfg, run_dir, model, loader, {})
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        trainer.train_step()  # Triton autotuning, torch.compile, allocator warm-up
        first_step_s = time.perf_counter() - start
        for _ in range(warmup - 1):
            trainer.train_step()
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        losses = [trainer.train_step()["loss"] for _ in range(steps)]
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
        del trainer
    tokens = steps * cfg.train.batch_size * cfg.train.seq_len
    return {"row": row, "overrides": overrides, "tokens_per_s": tokens / seconds, "step_ms": 1e3 * seconds / steps,
            "first_step_s": first_step_s, "peak_gib": peak, "last_loss": losses[-1],
            "total_params": summary["total_params"], "active_params": summary["active_params"],
            "train_flops_per_token": summary["train_flops_per_token"],
            "batch": f"{cfg.train.batch_size}x{cfg.train.seq_len}"}


def gpu_main(args) -> int:
    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    elif not torch.cuda.is_available():
        print("train_throughput.py --gpu needs a CUDA GPU and none is visible; use --dry-run on a CPU.", file=sys.stderr)
        return 1
    rows = args.rows.split(",")
    bad = [r for r in rows if r not in ROWS]
    if bad:
        print(f"error: --rows has {', '.join(bad)}; allowed are {', '.join(ROWS)}.", file=sys.stderr)
        return 2
    device = "cpu" if args.dry_run else "cuda"
    failed = False
    for row in rows:
        try:
            record = (measure_matmul(device, args.dry_run) if row == "matmul"
                      else measure_row(row, args.steps, args.warmup, args.dry_run, args.overrides))
        except Exception as err:  # noqa: BLE001  (OOM, compile or kernel errors: record the row and go on)
            failed = True
            record = {"row": row, "error": f"{type(err).__name__}: {str(err).strip().splitlines()[0][:300] if str(err).strip() else ''}"}
            import traceback

            traceback.print_exc()
        record["device"] = torch.cuda.get_device_name(0) if device == "cuda" else f"CPU dry run ({platform.machine()})"
        print(json.dumps(record), flush=True)
        if args.out:
            with open(args.out, "a") as f:  # one line per finished row: a run cut short keeps the rest
                f.write(json.dumps(record) + "\n")
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
        if row.endswith("+compile"):
            torch._dynamo.reset()
    return 1 if failed else 0


def gpu_table(records: list[dict]) -> list[str]:
    """Markdown table of GPU-mode rows: tokens/s, step time, MFU (datasheet and measured peak), memory."""
    matmul = next((r for r in records if r["row"] == "matmul" and "tflops" in r), None)
    measured_peak = matmul["tflops"] * 1e12 if matmul else None
    dense = {r["row"].replace("dense", ""): r for r in records if r["row"].startswith("dense") and "tokens_per_s" in r}
    lines = []
    if matmul:
        lines.append(f"dense {matmul['n']}³ bf16 matmul: {matmul['tflops']:.0f} TFLOP/s (measured peak); "
                     f"datasheet peak {H100_H200_BF16_DENSE_PEAK / 1e12:.0f} TFLOP/s")
    lines += [("| row | batch | params total / active | tokens/s | step ms | first step s | MFU (989) | "
              "MFU (measured) | ÷ dense | peak GiB | loss |"),
              "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in records:
        if r["row"] == "matmul":
            continue
        if "error" in r:
            lines.append(f"| {r['row']} | FAILED: {r['error']} | | | | | | | | | |")
            continue
        flops = r["train_flops_per_token"] * r["tokens_per_s"]
        mfu_sheet = flops / H100_H200_BF16_DENSE_PEAK
        mfu_measured = f"{flops / measured_peak:.3f}" if measured_peak else "—"
        twin = dense.get(r["row"].replace("triton", "").replace("torch", "").replace("dense", ""))
        vs_dense = f"{r['tokens_per_s'] / twin['tokens_per_s']:.2f}" if twin and not r["row"].startswith("dense") else ""
        peak = f"{r['peak_gib']:.1f}" if r.get("peak_gib") is not None else "—"
        lines.append(
            f"| {r['row']} | {r['batch']} | {r['total_params'] / 1e9:.2f}B / {r['active_params'] / 1e9:.2f}B | "
            f"{r['tokens_per_s']:,.0f} | {r['step_ms']:.1f} | {r['first_step_s']:.1f} | {mfu_sheet:.3f} | "
            f"{mfu_measured} | {vs_dense} | {peak} | {r['last_loss']:.3f} |"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per model (per round on the CPU)")
    parser.add_argument("--rounds", type=int, default=3, help="CPU mode: rounds")
    parser.add_argument("--threads", type=int, default=2, help="CPU mode: torch threads")
    parser.add_argument("--gpu", action="store_true", help="GPU mode: one row per --rows entry (see above)")
    parser.add_argument("--rows", default="matmul,triton,dense,torch",
                        help=f"GPU mode: comma-separated, from {', '.join(ROWS)}")
    parser.add_argument("--warmup", type=int, default=3, help="GPU mode: untimed steps first (the first compiles)")
    parser.add_argument("--out", help="GPU mode: append each row as one JSON line to this file")
    parser.add_argument("--dry-run", action="store_true", help="GPU mode on the CPU: toy model, nothing timed for real")
    parser.add_argument("--table", metavar="JSONL", help="print the markdown table of a --out file and exit")
    parser.add_argument("overrides", nargs="*", help="extra overrides applied to every model")
    args = parser.parse_args(argv)
    if args.table:
        records = [json.loads(line) for line in Path(args.table).read_text().splitlines() if line.strip()]
        devices = sorted({r.get("device", "?") for r in records})
        print(f"# train throughput, {', '.join(devices)}, torch {torch.__version__}, bf16 autocast, Trainer.train_step\n")
        print("\n".join(gpu_table(records)))
        return 0
    if args.gpu:
        return gpu_main(args)
    return cpu_main(args)


if __name__ == "__main__":
    sys.exit(main())
