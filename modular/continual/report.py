"""The account of a continual run: report.json, report.md (readable tables) and PNG plots.

Everything comes from the stream state (one record per stage) and the initial evaluation:
the perplexity matrix, forgetting and transfer, compute and parameters per stage, routing per domain.
"""

from __future__ import annotations

from pathlib import Path

from modular.atomic import atomic_open, atomic_write_json, atomic_write_text
from modular.continual.metrics import summarize_matrix


def build_report(cfg, state: dict) -> dict:
    stages = state["stages"]
    domains = list(cfg.continual.stream)
    matrix = [[st["eval"][d]["ppl"] for d in domains] for st in stages]
    matrix_bpb = [[st["eval"][d]["bpb"] for d in domains] for st in stages]
    initial = [state["initial"][d] for d in domains]
    # Perplexity is per token: once the vocabulary grows, stages count different tokens, and only bits per byte
    # compares them; forgetting, transfer and plasticity are then measured in bits per byte.
    vocab = [st["vocab"] for st in stages if st.get("vocab")]
    metric = "bpb" if any(v.get("grew") for v in vocab) and state.get("initial_bpb") else "ppl"
    if metric == "bpb":
        metrics = summarize_matrix(matrix_bpb, [state["initial_bpb"][d] for d in domains]) if matrix else {}
    else:
        metrics = summarize_matrix(matrix, initial) if matrix else {}
    flops = [st["flops"] for st in stages]
    report = {
        "strategy": cfg.continual.strategy,
        "domains": domains,
        "metric": metric,  # what the matrix of the tables, forgetting, transfer and plasticity measure
        "vocab": vocab,
        "vocab_size": [st.get("vocab_size") for st in stages],
        "stages": [{"stage": st["stage"], "domain": st["domain"], "steps": st["steps"], "tokens": st["tokens"],
                    "review_tokens": st.get("review_tokens", 0), "experts_per_layer": st["experts_per_layer"],
                    "seconds": st.get("seconds")} for st in stages],
        "initial": initial,
        "matrix": matrix,
        "matrix_bpb": matrix_bpb,
        "initial_bpb": [state["initial_bpb"][d] for d in domains] if state.get("initial_bpb") else None,
        **metrics,
        "flops": flops,
        "flops_total": sum(flops),
        "tokens_total": sum(st["tokens"] + st.get("review_tokens", 0) for st in stages),
        "params_total": [st["params_total"] for st in stages],
        "params_active": [st["params_active"] for st in stages],
        "params_total_during_stage": [st.get("params_total_during_stage") for st in stages],
        "active_params_unchanged_by_growth": all(
            st.get("params_active_before") is None or st["stage"] == 0
            or abs(st.get("params_active_before") - st["params_active"]) <= 0.01 * st["params_active"]
            for st in stages
        ),
        # active parameters per token of the final model over the first stage's (growth should keep it ~1)
        "active_params_ratio": (stages[-1]["params_active"] / stages[0]["params_active"]) if stages else None,
        "routing": [st["routing"] for st in stages],
    }
    if any("eval_oracle" in st for st in stages):  # a domain-routed run: the matrix above is under inferred routing
        oracle = [[st["eval_oracle"][d]["ppl"] for d in domains] for st in stages]
        oracle_bpb = [[st["eval_oracle"][d]["bpb"] for d in domains] for st in stages]
        report.update({
            "routing_mode": "inferred",
            "matrix_oracle": oracle,
            "matrix_oracle_bpb": oracle_bpb,
            # forgetting, transfer and plasticity under oracle routing, in the report's metric
            "oracle": (summarize_matrix(oracle_bpb, report["initial_bpb"]) if metric == "bpb"
                       else summarize_matrix(oracle, initial)),
            "domain_accuracy": [st.get("domain_accuracy", {}) for st in stages],
            "routed_as": [st.get("routed_as", {}) for st in stages],
            "leak": [st.get("leak", {}) for st in stages],
            "inference": stages[-1].get("inference"),
            "routing_oracle": [st.get("routing_oracle", {}) for st in stages],
        })
    return report


def _fmt(x, digits: int = 2) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def _metric(report: dict, oracle: bool = False) -> tuple[str, list[list[float]], list[float], int]:
    """(name, matrix, initial row, digits) of what the report's tables measure (`oracle`: the matrix under
    each sequence's true route, for a domain-routed run)."""
    if report.get("metric") == "bpb":
        return "bits per byte", report["matrix_oracle_bpb" if oracle else "matrix_bpb"], report["initial_bpb"], 4
    return "perplexity", report["matrix_oracle" if oracle else "matrix"], report["initial"], 2


def markdown_matrix(report: dict, oracle: bool = False) -> str:
    domains = report["domains"]
    _, matrix, initial, digits = _metric(report, oracle)
    lines = ["| after stage | " + " | ".join(domains) + " | mean |", "|---|" + "---:|" * (len(domains) + 1)]
    lines.append("| (initial) | " + " | ".join(_fmt(x, digits) for x in initial) + " | "
                 + _fmt(sum(initial) / len(domains), digits) + " |")
    for st, row in zip(report["stages"], matrix):
        lines.append(f"| {st['stage']} {st['domain']} | " + " | ".join(_fmt(x, digits) for x in row) + " | "
                     + _fmt(sum(row) / len(row), digits) + " |")
    return "\n".join(lines)


def markdown_vocab(report: dict) -> list[str]:
    """The tokenizer's growth and its effect, stage by stage (why it grew or did not)."""
    if not report.get("vocab"):
        return []
    out = ["## Vocabulary", "",
           "Per-token perplexity is not comparable across vocabularies: the tables above measure bits per byte."
           if report.get("metric") == "bpb" else "The vocabulary did not grow.", "",
           "| domain | grew | new tokens | vocabulary | tokens per byte before → after | earlier tokens changed |",
           "|---|---|---:|---:|---|---|"]
    for v in report["vocab"]:
        changed = ", ".join(f"{d} {share:.4%}" for d, share in (v.get("changed_share") or {}).items()) or "–"
        before, after = v.get("tokens_per_byte_before"), v.get("tokens_per_byte_after")
        tpb = f"{before:.3f} → {after:.3f}" if before is not None else "–"
        out.append(f"| {v['domain']} | {'yes' if v.get('grew') else 'no'} | {v.get('new_tokens', 0):,} | "
                   f"{_fmt(v.get('vocab_size_after'))} | {tpb} | {changed} |")
    out += [""] + [f"- {v['domain']}: {v['reason']}" for v in report["vocab"]] + [""]
    return out


def markdown(report: dict) -> str:
    domains = report["domains"]
    name, _, _, digits = _metric(report)
    unit = "bpb" if report.get("metric") == "bpb" else "ppl"
    out = [f"# Continual run: {report['strategy']}, stream {' → '.join(domains)}", ""]
    if "matrix_oracle" in report:
        out += [f"## Validation {name} R[stage][domain], routed by the inferred domain", "",
                ("Each validation sequence takes the route its prefix's domain posterior picks "
                 f"({report['inference']['method']}, {report['inference']['prefix']} tokens, "
                 f"{report['inference']['mode']} routing): no labels."), "", markdown_matrix(report), "",
                "## The same under oracle routing (each sequence's true domain)", "",
                markdown_matrix(report, oracle=True), ""]
    else:
        out += [f"## Validation {name} R[stage][domain]", "", markdown_matrix(report), ""]
    if report["matrix"]:
        out += ["## Forgetting and transfer", "",
                f"| domain | plasticity ({unit} after its stage) | forgetting ({unit}) | forgetting (%) |",
                "|---|---:|---:|---:|"]
        for j, d in enumerate(domains):
            if j < len(report["plasticity"]):
                rel = report["forgetting_relative"][j]
                out.append(f"| {d} | {_fmt(report['plasticity'][j], digits)} | {_fmt(report['forgetting'][j], digits)} | "
                           f"{_fmt(rel * 100 if rel is not None else None, 1)} |")
        out += ["", f"- final average {name}: {_fmt(report['final_average_perplexity'], digits)}",
                (f"- mean forgetting on earlier domains: "
                 f"{_fmt(report['mean_forgetting_relative'] * 100 if report['mean_forgetting_relative'] is not None else None, 1)}%"),
                f"- backward transfer ({unit}, + = later stages helped): {_fmt(report['backward_transfer'], digits)}",
                f"- forward transfer ({unit}, + = earlier stages helped): {_fmt(report['forward_transfer'], digits)}",
                ""]
    out += markdown_vocab(report)
    out += ["## Compute and parameters", "",
            "| stage | domain | tokens | training FLOPs | params total | params active | experts per MoE layer |",
            "|---|---|---:|---:|---:|---:|---|"]
    for j, st in enumerate(report["stages"]):
        experts = ", ".join(f"{v}" for v in st["experts_per_layer"].values()) or "dense"
        out.append(f"| {st['stage']} | {st['domain']} | {st['tokens'] + st['review_tokens']:,} | "
                   f"{report['flops'][j]:.3e} | {report['params_total'][j]:,} | {report['params_active'][j]:,} | "
                   f"{experts} |")
    out += ["", (f"Total: {report['tokens_total']:,} tokens, {report['flops_total']:.3e} training FLOPs. "
                 f"Active parameters per token {'stay the same as experts are added (top-k unchanged)' if report['active_params_unchanged_by_growth'] else 'changed across stages'}."),
            ""]
    if report.get("domain_accuracy"):
        final = report["domain_accuracy"][-1]
        out += ["## Domain inference (final model)", "",
                "| domain | accuracy @16 | @64 | @256 | routed as (validation sequences) |", "|---|---:|---:|---:|---|"]
        for d, acc in final.items():
            routed = ", ".join(f"{k} {v:.0%}" for k, v in report["routed_as"][-1].get(d, {}).items() if v)
            out.append(f"| {d} | {_fmt(acc.get('16'), 3)} | {_fmt(acc.get('64'), 3)} | {_fmt(acc.get('256'), 3)} | "
                       f"{routed} |")
        leak = report["leak"][-1]
        leaks = ", ".join(f"{d} {v:.1%}" for d, v in leak.items()) or "–"
        out += ["", f"- leak (share of an earlier domain's sequences routed to a later domain): {leaks}",
                (f"- inference cost: {report['inference']['flops_per_sequence']:.3g} FLOPs per sequence "
                 f"({report['inference']['method']})"), ""]
    if any(report["routing"]):
        out += ["## Routing: share of each domain's tokens per expert bank (after each stage)", ""]
        for st, routing in zip(report["stages"], report["routing"]):
            if not routing:
                continue
            width = max(len(v) for v in routing.values())
            out += [f"After stage {st['stage']} ({st['domain']}):", "",
                    "| domain | " + " | ".join(f"bank {b}" for b in range(width)) + " |",
                    "|---|" + "---:|" * width]
            for d, shares in routing.items():
                out.append(f"| {d} | " + " | ".join(f"{x:.0%}" for x in shares) + " |")
            out.append("")
    return "\n".join(out) + "\n"


def write_plots(folder: Path, report: dict) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    domains = report["domains"]
    name, matrix, _, digits = _metric(report)
    written = []
    if matrix:
        fig, ax = plt.subplots(figsize=(1.4 * len(domains) + 2, 0.6 * len(matrix) + 2))
        im = ax.imshow(matrix, cmap="viridis_r", aspect="auto")
        ax.set_xticks(range(len(domains)), domains)
        ax.set_yticks(range(len(report["stages"])), [f"{s['stage']} {s['domain']}" for s in report["stages"]])
        ax.set_xlabel("evaluated domain")
        ax.set_ylabel("after stage")
        lo, hi = im.get_clim()
        for i, row in enumerate(matrix):
            for j, v in enumerate(row):
                dark_cell = (v - lo) / max(hi - lo, 1e-9) > 0.5  # viridis_r: high perplexity is dark
                ax.text(j, i, f"{v:.{digits - 1}f}", ha="center", va="center", color="white" if dark_cell else "black",
                        fontsize=8)
        fig.colorbar(im, ax=ax, label=f"validation {name}")
        ax.set_title(f"R[stage][domain] — {report['strategy']}")
        written.append(_save(fig, folder / "matrix.png"))

        fig, ax = plt.subplots(figsize=(6, 4))
        x = list(range(len(matrix)))
        for j, d in enumerate(domains):
            ax.plot(x, [row[j] for row in matrix], marker="o", label=d)
        ax.set_xticks(x, [f"{s['stage']} {s['domain']}" for s in report["stages"]])
        ax.set_xlabel("after stage")
        ax.set_ylabel(f"validation {name}")
        ax.set_yscale("log")
        ax.legend()
        ax.set_title(f"{name.capitalize()} per domain across stages")
        written.append(_save(fig, folder / "perplexity.png"))
    panels = [("routing", "inferred routing" if "routing_oracle" in report else "")]
    if "routing_oracle" in report:
        panels.append(("routing_oracle", "oracle routing"))
    finals = [(report[key][-1] if report[key] else {}, title) for key, title in panels]
    if finals[0][0]:
        fig, axes = plt.subplots(1, len(finals), figsize=(6 * len(finals), 4), squeeze=False)
        for ax, (routing, title) in zip(axes[0], finals):
            width = max(len(v) for v in routing.values())
            bottom = [0.0] * len(routing)
            names = list(routing)
            for b in range(width):
                shares = [routing[d][b] if b < len(routing[d]) else 0.0 for d in names]
                ax.bar(names, shares, bottom=bottom, label=f"bank {b}")
                bottom = [x + y for x, y in zip(bottom, shares)]
            ax.set_ylabel("share of routed tokens")
            ax.set_title("Expert-bank usage per domain (final model)" + (f", {title}" if title else ""))
            ax.legend()
        written.append(_save(fig, folder / "routing.png"))
    return written


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def write_report(folder: Path, cfg, state: dict) -> dict:
    report = build_report(cfg, state)
    atomic_write_json(folder / "report.json", report)
    atomic_write_text(folder / "report.md", markdown(report))
    if cfg.continual.plots:
        report["plots"] = [str(p) for p in write_plots(folder, report)]
    report["markdown_matrix"] = markdown_matrix(report)
    return report
