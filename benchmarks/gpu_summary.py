"""The short summary of a benchmarks/gpu_check.sh run: versions, each step's status and time, the tables.
Reads the run's work folder (env.json, steps.tsv, logs/, train_rows.jsonl, sync.json) and prints markdown.

    python benchmarks/gpu_summary.py WORK_DIR > summary.md
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

# (step name, section title): the order of the sections, most important first.
SECTIONS = [
    ("warm_cache", "Triton cache warm-up (benchmarks/sm90_compile.py --warm), beside the kernel tests"),
    ("kernel_tests", "Kernel tests, native (fp32/fp16/bf16, MODULAR_GMM_AUTOTUNE=0)"),
    ("gmm_bf16", "Grouped GEMM, bf16 (benchmarks/gmm_gpu.py)"),
    ("gmm_layer", "MoE expert step, bf16 (benchmarks/gmm_gpu.py --layer)"),
    ("train_eager", "Training, bf16 (benchmarks/train_throughput.py --gpu)"),
    ("sync_check", "Host syncs in one training step (benchmarks/sync_check.py)"),
    ("train_compile", "Training under train.compile=true"),
    ("autotuned_tests", "Kernel tests with the autotune sweep on"),
]
MAX_SYNC_SITES = 25  # per backend; sync.json in results.tar.gz has them all, with their call chains
MAX_LOG_TAIL = 1200  # characters of a failed step's log shown in the summary


def _steps(work: Path) -> list[dict]:
    path = work / "steps.tsv"
    if not path.exists():
        return []
    steps = []
    for line in path.read_text().splitlines():
        name, status, seconds = (line.split("\t") + ["", ""])[:3]
        steps.append({"name": name, "status": status, "seconds": seconds})
    return steps


def _tables(text: str) -> list[str]:
    """Markdown tables of a log, each with the non-empty line just above it (its caption)."""
    lines = text.splitlines()
    out = []
    for i, line in enumerate(lines):
        if line.startswith("|") and (i == 0 or not lines[i - 1].startswith("|")):
            caption = next((lines[j] for j in range(i - 1, max(-1, i - 3), -1) if lines[j].strip()), "")
            if caption and not caption.startswith("|"):
                out.append("")
                out.append(caption)
        if line.startswith("|"):
            out.append(line)
    return out


def _pytest_summary(text: str) -> list[str]:
    """The final `N passed, M failed …` line and the FAILED / ERROR lines of a pytest log."""
    keep = [line for line in text.splitlines() if re.match(r"^(FAILED|ERROR) ", line)]
    final = [line for line in text.splitlines() if re.search(r"\b(passed|failed|error|no tests ran)\b.* in [\d.]+s", line)]
    return keep[:30] + final[-1:]


def _sync_tables(path: Path) -> list[str]:
    if not path.exists():
        return []
    lines = []
    for r in json.loads(path.read_text()):
        if "error" in r:
            lines.append(f"- kernels.backend={r['backend']}: FAILED to run: {r['error']}")
            continue
        verdict = "PASS" if not r["sites"] else f"FAIL, {r['syncs_per_step']} syncs/step at {len(r['sites'])} sites"
        peak = f"{r['peak_gib']:.1f} GiB" if r.get("peak_gib") is not None else "—"
        lines.append(f"\nkernels.backend={r['backend']}: {verdict}; error mode: {r['error_mode']}; peak {peak}")
        if r["sites"]:
            lines += ["| site | code | calls/step | via |", "|---|---|---:|---|"]
            for s in r["sites"][:MAX_SYNC_SITES]:
                code = s["code"].replace("|", "\\|")[:70]
                lines.append(f"| {s['site']} | `{code}` | {s['count']} | {s['via']} |")
            if len(r["sites"]) > MAX_SYNC_SITES:
                lines.append(f"| … {len(r['sites']) - MAX_SYNC_SITES} more in sync.json | | | |")
    return lines


def summarize_run(work: Path) -> str:
    out = ["# GPU check"]
    env_path = work / "env.json"
    if env_path.exists():
        env = json.loads(env_path.read_text())
        out.append(", ".join(f"{k} {v}" for k, v in env.items()))
    steps = _steps(work)
    out += ["", "| step | status | seconds |", "|---|---|---:|"]
    out += [f"| {s['name']} | {s['status']} | {s['seconds']} |" for s in steps]
    status = {s["name"]: s["status"] for s in steps}
    for name, title in SECTIONS:
        if name not in status:
            continue
        out += ["", f"## {title}: {status[name]}"]
        log_path = work / "logs" / f"{name}.log"
        text = log_path.read_text(errors="replace") if log_path.exists() else ""
        if name.endswith("tests"):
            body = _pytest_summary(text)
        elif name.startswith("train"):
            from train_throughput import gpu_table  # imports torch: only when there is a training table

            rows_path = work / f"{name}.jsonl"
            records = ([json.loads(line) for line in rows_path.read_text().splitlines() if line.strip()]
                       if rows_path.exists() else [])
            if name == "train_compile" and (work / "train_eager.jsonl").exists():  # ÷ dense and MFU need them
                records = [r for r in (json.loads(line) for line in (work / "train_eager.jsonl").read_text().splitlines()
                                       if line.strip()) if r["row"] == "matmul"] + records
            body = gpu_table(records) if records else []
        elif name == "warm_cache":
            body = [line for line in text.splitlines() if line.startswith(("warmed", "- "))]
        elif name == "sync_check":
            body = _sync_tables(work / "sync.json")
        else:
            body = _tables(text)
        out += body
        if status[name] != "ok" or not body:
            tail = text[-MAX_LOG_TAIL:].strip()
            out += ["", "log tail:", "```", tail or "(empty log)", "```"]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or not Path(argv[0]).is_dir():
        print("usage: python benchmarks/gpu_summary.py WORK_DIR (the folder benchmarks/gpu_check.sh writes)",
              file=sys.stderr)
        return 2
    sys.stdout.write(summarize_run(Path(argv[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
