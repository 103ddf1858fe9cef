"""`modular compare RUN_OR_SWEEP...`: the key figures of runs side by side, as a table, compare.md and compare.png.
Continual runs come from report.json, train runs from metrics.jsonl; a sweep folder stands for its members.

Continual: final average perplexity, mean forgetting on earlier domains, plasticity (mean perplexity of
each new domain right after its stage), final perplexity per domain, training FLOPs, parameters total /
active. Train: steps, tokens, final train loss, final validation loss (mean over domains, and each),
tokens per second (median over the logged windows). compare.md and compare.png go to --out, by default
the first sweep folder given, else the folder holding the first run.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from modular.atomic import atomic_open, atomic_write_text
from modular.errors import ConfigError, UserError
from modular.sweep import read_manifest

USAGE = "usage: modular compare RUN_OR_SWEEP [RUN_OR_SWEEP ...] [--out DIR]"


def load_run(folder: Path, label: str | None = None, status: str | None = None, error: str | None = None) -> dict:
    """One row: what kind of run the folder holds and its key figures (status 'unfinished' when it has none)."""
    folder = Path(folder)
    row = {"label": label or folder.name, "path": str(folder), "status": status or "done", "error": error,
           "kind": None}
    report = folder / "report.json"
    metrics = folder / "metrics.jsonl"
    if report.is_file():
        row.update(kind="continual", **_continual_figures(_read_json(report)))
    elif metrics.is_file():
        row.update(kind="train", **_train_figures(metrics))
    elif (folder / "continual_state.json").is_file() or (folder / "stages").is_dir():
        row["kind"] = "continual"
    elif status in (None, "done"):
        row["status"] = "unfinished"
    if row["kind"] and status is None and not _has_results(row):
        row["status"] = "unfinished"
    return row


def _has_results(row: dict) -> bool:
    return row.get("final_average_perplexity") is not None or row.get("final_loss") is not None


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is not readable JSON ({e}); is the run folder damaged?") from None


def _continual_figures(r: dict) -> dict:
    plasticity = r.get("plasticity") or []
    new_domains = plasticity[1:] if len(plasticity) > 1 else plasticity  # stage 0 has no earlier model
    matrix = r.get("matrix") or []
    return {
        "strategy": r.get("strategy"),
        "domains": r.get("domains") or [],
        "final_average_perplexity": r.get("final_average_perplexity"),
        "mean_forgetting": r.get("mean_forgetting_relative"),
        "plasticity": sum(new_domains) / len(new_domains) if new_domains else None,
        "final_perplexity": matrix[-1] if matrix else [],
        "flops": r.get("flops_total"),
        "tokens": r.get("tokens_total"),
        "params_total": (r.get("params_total") or [None])[-1],
        "params_active": (r.get("params_active") or [None])[-1],
    }


def _train_figures(path: Path) -> dict:
    losses, speeds, curve, last_eval, step, tokens = [], [], [], None, 0, 0
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise UserError(f"{path} is not readable ({e.strerror}).") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise UserError(f"{path}: line {number} is not JSON; is the run folder damaged?") from None
        step, tokens = max(step, record.get("step", 0)), max(tokens, record.get("tokens", 0))
        if "loss" in record:
            losses.append(record["loss"])
            curve.append((record["step"], record["loss"]))
            if record.get("tokens_per_s"):
                speeds.append(record["tokens_per_s"])
        if "eval" in record:
            last_eval = record
    val = {d: r["loss"] for d, r in (last_eval or {}).get("eval", {}).items()}
    return {
        "steps": step, "tokens": tokens, "final_loss": losses[-1] if losses else None,
        "final_val_loss": sum(val.values()) / len(val) if val else None, "val_loss": val,
        "val_step": (last_eval or {}).get("step"), "tokens_per_s": statistics.median(speeds) if speeds else None,
        "curve": curve,
    }


def collect(paths: list[Path | str]) -> tuple[list[dict], list[Path]]:
    """(rows, sweep folders among the paths): each sweep folder expands to its members, in manifest order."""
    rows, sweeps = [], []
    for path in map(Path, paths):
        if not path.is_dir():
            raise UserError(f"{path} is not a run or sweep folder; give folders written by modular train, "
                            "continual or a sweep (-m).")
        manifest = read_manifest(path)
        if manifest is None:
            rows.append(load_run(path))
            continue
        sweeps.append(path)
        for m in manifest.get("members", []):
            status = m.get("status") if m.get("status") != "done" else None
            rows.append(load_run(path / m["name"], label=m.get("label"), status=status, error=m.get("error")))
    return rows, sweeps


def _fmt(x, spec: str = ".2f") -> str:
    return "–" if x is None else format(x, spec)


def _millions(x) -> str:
    return "–" if x is None else f"{x / 1e6:.2f}M"


def markdown_tables(rows: list[dict]) -> str:
    out = []
    continual = [r for r in rows if r["kind"] == "continual"]
    train = [r for r in rows if r["kind"] == "train"]
    other = [r for r in rows if r["kind"] is None]
    if continual:
        out += [("| run | status | strategy | final avg ppl | mean forgetting | new-domain ppl | final ppl per domain "
                 "| training FLOPs | params total / active |"), "|---|---|---|---:|---:|---:|---|---:|---:|"]
        for r in continual:
            per_domain = ", ".join(f"{d} {_fmt(x)}" for d, x in zip(r.get("domains", []), r.get("final_perplexity", [])))
            forgetting = r.get("mean_forgetting")
            out.append(f"| {r['label']} | {_status(r)} | {r.get('strategy') or '–'} | "
                       f"{_fmt(r.get('final_average_perplexity'))} | "
                       f"{'–' if forgetting is None else f'{forgetting * 100:+.1f}%'} | {_fmt(r.get('plasticity'))} | "
                       f"{per_domain or '–'} | {_fmt(r.get('flops'), '.3e')} | "
                       f"{_millions(r.get('params_total'))} / {_millions(r.get('params_active'))} |")
        out.append("")
    if train:
        out += [("| run | status | steps | tokens | final train loss | final val loss (mean) | val loss per domain "
                 "| tokens/s |"), "|---|---|---:|---:|---:|---:|---|---:|"]
        for r in train:
            per_domain = ", ".join(f"{d} {x:.3f}" for d, x in r.get("val_loss", {}).items())
            out.append(f"| {r['label']} | {_status(r)} | {r.get('steps', 0):,} | {r.get('tokens', 0):,} | "
                       f"{_fmt(r.get('final_loss'), '.4f')} | {_fmt(r.get('final_val_loss'), '.4f')} | "
                       f"{per_domain or '–'} | {_fmt(r.get('tokens_per_s'), ',.0f')} |")
        out.append("")
    if other:
        out += ["| run | status | error |", "|---|---|---|"]
        out += [f"| {r['label']} | {r['status']} | {r.get('error') or ''} |" for r in other]
        out.append("")
    return "\n".join(out)


def _status(r: dict) -> str:
    return r["status"] if not r.get("error") else f"{r['status']}: {r['error']}"


def write_plot(path: Path, rows: list[dict]) -> Path | None:
    """Bars of the continual figures and the train loss curves; None when no run has figures yet."""
    continual = [r for r in rows if r["kind"] == "continual" and _has_results(r)]
    train = [r for r in rows if r["kind"] == "train" and r.get("curve")]
    if not continual and not train:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = ([("final_average_perplexity", "final average perplexity", 1), ("mean_forgetting", "mean forgetting (%)", 100),
               ("plasticity", "new-domain perplexity", 1), ("flops", "training FLOPs", 1)] if continual else [])
    n = len(panels) + (2 if train else 0)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3 + 0.3 * max(len(continual), len(train))), squeeze=False,
                             layout="constrained")
    labels = [r["label"] for r in continual]
    for ax, (key, title, scale) in zip(axes[0], panels):
        values = [(r.get(key) or 0.0) * scale for r in continual]
        bars = ax.barh(range(len(labels)), values, color="tab:blue")
        ax.bar_label(bars, fmt="%.3g", fontsize=7)
        ax.set_yticks(range(len(labels)), labels if ax is axes[0][0] else [""] * len(labels))
        ax.invert_yaxis()
        ax.set_title(title)
    if train:
        ax_loss, ax_val = axes[0][len(panels)], axes[0][len(panels) + 1]
        for r in train:
            steps, losses = zip(*r["curve"])
            ax_loss.plot(steps, losses, label=r["label"])
        ax_loss.set_xlabel("step")
        ax_loss.set_title("train loss")
        ax_loss.legend(fontsize=7)
        names = [r["label"] for r in train]
        bars = ax_val.barh(range(len(names)), [r.get("final_val_loss") or 0.0 for r in train], color="tab:green")
        ax_val.bar_label(bars, fmt="%.4g", fontsize=7)
        ax_val.set_yticks(range(len(names)), names)
        ax_val.invert_yaxis()
        ax_val.set_title("final validation loss (mean)")
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def compare_paths(paths: list[Path | str], out: Path | str | None = None, echo: bool = True) -> dict:
    """Compare runs and sweeps; write compare.md and compare.png to `out` (see the module docstring)."""
    if not paths:
        raise ConfigError(f"modular compare needs at least one run or sweep folder; {USAGE}.")
    rows, sweeps = collect(paths)
    folder = Path(out) if out is not None else (sweeps[0] if sweeps else Path(paths[0]).resolve().parent)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"--out {folder} is a file, not a folder; choose a folder for compare.md and compare.png.")
    tables = markdown_tables(rows)
    if echo:
        print(tables)
    folder.mkdir(parents=True, exist_ok=True)
    md = folder / "compare.md"
    sources = ", ".join(str(p) for p in paths)
    atomic_write_text(md, f"# Runs compared: {sources}\n\n{tables}")
    plot = write_plot(folder / "compare.png", rows)
    if echo:
        print(f"wrote {md}" + (f" and {plot}" if plot else ""))
    return {"rows": rows, "markdown": tables, "files": [str(md)] + ([str(plot)] if plot else [])}


def compare_command(args: list[str]) -> int:
    """`modular compare RUN_OR_SWEEP... [--out DIR]` (also compare.out=DIR)."""
    paths, out = [], None
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--out":
            if i + 1 >= len(args):
                raise ConfigError(f"--out needs a folder; {USAGE}.")
            out, i = args[i + 1], i + 2
            continue
        if arg.startswith(("--out=", "compare.out=")):
            out = arg.split("=", 1)[1]
        elif arg.startswith("-"):
            raise ConfigError(f"modular compare does not know the option {arg}; {USAGE}.")
        else:
            paths.append(arg)
        i += 1
    compare_paths(paths, out)
    return 0  # the comparison worked; failed or unfinished runs are rows of it
