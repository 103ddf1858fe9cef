"""Lists every host-device synchronisation in one training step (forward, backward, clipping, AdamW) on a GPU.
Runs Trainer.train_step under torch.cuda.set_sync_debug_mode: "warn" to find all sites, then "error" for pass/fail.

Each synchronising CUDA call (`.item()`, `.tolist()`, `float(t)`, `bool(t)`, `nonzero`, `bincount` …)
warns once per call; the warnings are captured with the Python stack at the call, grouped by the
innermost frame inside this repository, and printed as a table (site, count, the torch-side call,
the chain of calls in the repo). After warm-up steps (first-call set-up is not a per-step cost),
one step per backend of --backends is checked.

    python benchmarks/sync_check.py [--backends triton,torch] [--json sites.json] [overrides ...]
    python benchmarks/sync_check.py --dry-run   # the same code on the CPU: sync calls found by a proxy

--dry-run has no CUDA sync debug mode, so it counts the package's Python-visible sync calls instead
(Tensor.item, .tolist, .cpu, .nonzero, bool(), float(), int()); that checks the script, and is a lower
bound of what a GPU reports (syncs inside torch functions, like bincount's, are missed).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import traceback
import warnings
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from modular.config import compose_config  # noqa: E402  (after the path set-up, for runs from a checkout)
from modular.models import build_model  # noqa: E402

SYNC_MESSAGE = "synchroniz"  # torch: "called a synchronizing CUDA operation"
# A model of the GPU run's shape with fewer layers: every layer has the same sync sites.
GPU_MODEL = ["model=base", "model.d_model=1024", "model.n_layers=2", "model.n_heads=8", "model.n_kv_heads=4",
             "experts.num_experts=8", "experts.ffn_dim=1024", "routing.top_k=2", "train.batch_size=4",
             "train.seq_len=512"]
DRY_MODEL = ["model=tiny", "train.batch_size=2", "train.seq_len=32", "train.threads=1"]
PROXY_METHODS = ("item", "tolist", "cpu", "nonzero", "__bool__", "__float__", "__int__")


def _in_repo(filename: str) -> bool:
    """A frame of the package itself (not of this script, not of torch)."""
    return Path(filename).resolve().is_relative_to(REPO / "modular")


def _site(stack: list[traceback.FrameSummary]) -> dict:
    """The innermost repo frame (the call to fix), the frame below it (torch's side) and the repo chain."""
    repo_frames = [f for f in stack if _in_repo(f.filename)]
    inner = repo_frames[-1] if repo_frames else stack[-1]
    below = stack[stack.index(inner) + 1] if stack.index(inner) + 1 < len(stack) else None

    def where(f):
        return f"{Path(f.filename).resolve().relative_to(REPO) if _in_repo(f.filename) else Path(f.filename).name}:{f.lineno}"

    return {
        "site": f"{where(inner)} ({inner.name})",
        "code": (inner.line or "").strip(),
        "via": f"{where(below)} ({below.name})" if below is not None else "",
        "chain": " ← ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(repo_frames[-5:-1])),
    }


@contextlib.contextmanager
def _proxy_sync_warnings():
    """CPU stand-in for the sync debug mode: the Python-visible sync calls warn like it does."""
    originals = {name: getattr(torch.Tensor, name) for name in PROXY_METHODS}

    def wrap(name, fn):
        def method(self, *args, **kwargs):
            # Only calls made by the package itself: torch's CPU internals (e.g. AdamW's step counter,
            # a CPU tensor on a GPU too) are not syncs there.
            if _in_repo(sys._getframe(1).f_code.co_filename):
                warnings.warn(f"called a synchronizing CUDA operation (dry-run proxy: Tensor.{name})", UserWarning,
                              stacklevel=2)
            return fn(self, *args, **kwargs)
        return method

    for name, fn in originals.items():
        setattr(torch.Tensor, name, wrap(name, fn))
    try:
        yield
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)


def find_sync_sites(step, dry_run: bool = False) -> list[dict]:
    """Runs step() once and returns its sync sites: [{site, code, via, chain, count}], in first-seen order."""
    sites: dict[str, dict] = {}

    def showwarning(message, category, filename, lineno, file=None, line=None):
        if SYNC_MESSAGE not in str(message):
            return original_showwarning(message, category, filename, lineno, file, line)
        # Without this function, the warnings module's frames and (dry run) the proxy's own frame.
        here = Path(__file__).resolve()
        stack = [f for f in traceback.extract_stack()[:-1]
                 if Path(f.filename).name != "warnings.py" and not (f.name == "method" and Path(f.filename).resolve() == here)]
        site = _site(stack)
        entry = sites.setdefault(site["site"], {**site, "count": 0})
        entry["count"] += 1

    original_showwarning = warnings.showwarning
    with warnings.catch_warnings():
        warnings.simplefilter("always")  # every call, not once per location
        warnings.showwarning = showwarning
        mode = _proxy_sync_warnings() if dry_run else _sync_debug_mode("warn")
        with mode:
            step()
    return list(sites.values())


@contextlib.contextmanager
def _sync_debug_mode(mode: str):
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode(mode)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(0)


def error_mode_verdict(step) -> str:
    """'pass' when a step runs under set_sync_debug_mode("error"), else where it first failed."""
    try:
        with _sync_debug_mode("error"):
            step()
    except RuntimeError as err:
        frames = [f for f in traceback.extract_tb(err.__traceback__) if _in_repo(f.filename)]
        where = f" at {Path(frames[-1].filename).name}:{frames[-1].lineno} ({frames[-1].name})" if frames else ""
        return f"fail{where}: {str(err).strip().splitlines()[0][:160]}"
    return "pass"


def check_backend(backend: str, dry_run: bool, warmup: int, extra: list[str]) -> dict:
    from modular.train.run import prepare_data
    from modular.train.trainer import Trainer

    overrides = [*(DRY_MODEL if dry_run else GPU_MODEL), f"kernels.backend={backend}", "train.dtype=bf16",
                 "train.progress=false", *extra]
    cfg = compose_config(overrides)
    _, loader, _ = prepare_data(cfg)
    torch.manual_seed(cfg.seed)
    with torch.device("cpu" if dry_run else "cuda"):
        model = build_model(cfg)
    with tempfile.TemporaryDirectory(prefix="sync-check-") as run_dir:
        trainer = Trainer(cfg, run_dir, model, loader, {})
        for _ in range(warmup):  # first calls allocate, autotune and build cached tables
            trainer.train_step()
        if not dry_run:
            torch.cuda.reset_peak_memory_stats()
        sites = find_sync_sites(trainer.train_step, dry_run)
        verdict = "not run (dry run: no CUDA)" if dry_run else error_mode_verdict(trainer.train_step)
        peak = torch.cuda.max_memory_allocated() / 2**30 if not dry_run else None
    return {"backend": backend, "overrides": overrides, "sites": sites, "error_mode": verdict, "peak_gib": peak,
            "syncs_per_step": sum(s["count"] for s in sites)}


def report(results: list[dict], dry_run: bool) -> list[str]:
    lines = []
    for r in results:
        if "error" in r:
            lines.append(f"### kernels.backend={r['backend']}: FAILED to run: {r['error']}\n")
            continue
        verdict = "PASS (no host sync)" if not r["sites"] else f"FAIL: {r['syncs_per_step']} syncs at {len(r['sites'])} sites"
        peak = f"{r['peak_gib']:.1f} GiB" if r["peak_gib"] is not None else "—"
        lines.append(f"### kernels.backend={r['backend']}: {verdict}; set_sync_debug_mode('error'): "
                     f"{r['error_mode']}; peak memory {peak}\n")
        if r["sites"]:
            lines += ["| # | sync site (innermost repo frame) | code | calls/step | via | called from |",
                      "|---:|---|---|---:|---|---|"]
            for i, s in enumerate(r["sites"], 1):
                code = s["code"].replace("|", "\\|")
                lines.append(f"| {i} | {s['site']} | `{code}` | {s['count']} | {s['via']} | {s['chain']} |")
        lines.append("")
    if dry_run:
        lines.append("(dry run: CPU proxy — the package's Tensor.item/tolist/cpu/nonzero/bool/float/int calls; "
                     "a GPU reports more)")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="triton,torch", help="comma-separated kernels.backend values")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before the checked one")
    parser.add_argument("--json", help="also write the sites to this JSON file")
    parser.add_argument("--dry-run", action="store_true", help="on the CPU, with a proxy for the sync debug mode")
    parser.add_argument("overrides", nargs="*", help="extra overrides for the model and training config")
    args = parser.parse_args(argv)
    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    elif not torch.cuda.is_available():
        print("sync_check.py needs a CUDA GPU and none is visible; use --dry-run on a CPU.", file=sys.stderr)
        return 1
    results = []
    for backend in args.backends.split(","):
        try:
            results.append(check_backend(backend, args.dry_run, args.warmup, args.overrides))
        except Exception as err:  # noqa: BLE001  (report this backend's failure, go on with the next)
            traceback.print_exc()
            results.append({"backend": backend, "error": f"{type(err).__name__}: {str(err).strip()[:300]}"})
    device = "CPU dry run" if args.dry_run else torch.cuda.get_device_name(0)
    print(f"# host syncs in one Trainer.train_step ({device}, torch {torch.__version__}, bf16 autocast)\n")
    print("\n".join(report(results, args.dry_run)))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
