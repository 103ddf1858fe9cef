"""`modular export` and `modular upcycle`: thin commands over the export library (the CLI calls these).

export: the latest checkpoint of run.dir → an HF folder (+ export_report.json); upcycle: an HF Llama →
a new run folder whose first `modular train` starts from the upcycled MoE.
"""

from __future__ import annotations

from pathlib import Path

import torch

from modular.atomic import read_json
from modular.errors import ConfigError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
UPCYCLE_RECORD = "upcycle.json"
UPCYCLED_WEIGHTS = "upcycled/model.safetensors"
# Keys the source model fixes; an override of one of them would not fit the source's weights.
_ARCHITECTURE_KEYS = ("model.vocab_size", "model.d_model", "model.n_layers", "model.n_heads", "model.n_kv_heads",
                      "model.ffn_dim", "model.rope_theta", "model.norm_eps", "model.tie_embeddings", "model.moe_layers",
                      "experts.", "model=")


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _seed_source(cfg, folder: Path) -> str | None:
    if cfg.export.seed_model:
        return str(cfg.export.seed_model)
    record = folder / UPCYCLE_RECORD
    if record.is_file():
        upcycled = read_json(record, "the record of the upcycled source")
        return upcycled.get("source") if isinstance(upcycled, dict) else None
    return None


def check_export_out(out: Path, run_dir: Path) -> None:
    """An export replaces its output folder, so it must never be, contain or sit inside the run it reads,
    except in the run's own export/ folder (the default place)."""
    out_abs, run_abs = out.expanduser().resolve(), run_dir.expanduser().resolve()
    inside_exports = out_abs.is_relative_to(run_abs / "export") and out_abs != run_abs / "export"
    if out_abs == run_abs or run_abs.is_relative_to(out_abs) or (out_abs.is_relative_to(run_abs) and not inside_exports):
        where = ("is" if out_abs == run_abs else "contains" if run_abs.is_relative_to(out_abs) else "is inside")
        raise ConfigError(f"export.out={out} {where} the run folder run.dir={run_dir}, which an export must never "
                          f"overwrite; write it outside the run, or under {run_dir / 'export'} (the default).")


def export_command(overrides: list[str]) -> int:
    """`modular export run.dir=RUN export.format=llama-dense|mixtral|qwen2-moe|moe export.merge=...`
    (domain-routed runs: export.domain=NAME, export.peft=true)."""
    from modular.data.loader import validation_sets
    from modular.data.tokenizer import load_tokenizer
    from modular.export.dense import routing_mass_is_one
    from modular.export.formats import export_format
    from modular.export.upcycle import load_hf_llama
    from modular.run.setup import load_run_model

    model, cfg, folder, checkpoint = load_run_model(overrides, "export")
    e = cfg.export
    routed = bool(getattr(model, "domains", None))
    if e.domain is not None or e.peft:
        from modular.export.domains import domain_index

        if e.domain is not None:
            domain_index(model, e.domain)
        elif len(model.domains) < 2:
            raise ConfigError(f"export.peft=true writes one adapter per domain after the first, but this run has "
                              f"{'no domain routes' if not routed else 'only the anchor domain ' + model.domains[0]}; "
                              "export it without export.peft.")
        if e.peft:
            from modular.export.peft_adapters import require_peft

            require_peft()
    fmt = export_format(e.format, e)
    fmt.check(model, cfg)
    name = "peft" if e.peft else e.format + (f"-{e.domain}" if e.domain is not None else "")
    out = Path(e.out) if e.out else folder / "export" / name
    check_export_out(out, folder)
    dtype = None if e.dtype == "auto" else DTYPES[e.dtype]
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    seed_source = _seed_source(cfg, folder)
    seed_model = None
    needs_seed = getattr(fmt, "needs_seed", lambda: False)()
    if seed_source and (e.report or needs_seed):
        seed_model, _ = load_hf_llama(seed_source)
    t = cfg.train
    calibration = None
    dense_routes = routed and e.format == "llama-dense"  # each route calibrated on its own domain's text
    if dense_routes or fmt.needs_calibration or (not fmt.exact and not routing_mass_is_one(cfg)):
        sets = validation_sets(cfg.data, t.batch_size, t.seq_len, max_batches=e.calibration_batches,
                               progress=t.progress, tokenizer=tokenizer)
        if dense_routes:
            calibration = {d: [batch.inputs for batch in sets[d]] for d in model.domains if d in sets}
        else:
            calibration = [batch.inputs for val in sets.values() for batch in val]
    if e.peft:
        from modular.export.peft_adapters import export_peft

        export_peft(model, cfg, tokenizer, out, calibration, e.merge, seed_model, density=e.density, scale=e.scale,
                    overwrite=e.overwrite, dtype=dtype, max_shard_size=e.max_shard_size)
    else:
        fmt.write(model, cfg, tokenizer, out, seed_model=seed_model, calibration_batches=calibration,
                  overwrite=e.overwrite, dtype=dtype, max_shard_size=e.max_shard_size)
    what = f"domain {e.domain}'s route" if e.domain is not None else \
        "the anchor's route + PEFT adapters" if e.peft else "every domain merged" if routed else checkpoint
    print(f"exported {what} ({checkpoint}) as {e.format}{' + peft' if e.peft else ''} to {out}")
    if e.report:
        sets = validation_sets(cfg.data, t.batch_size, t.seq_len, max_batches=t.eval_batches, progress=t.progress,
                               tokenizer=tokenizer)
        if seed_model is not None and seed_model.vocab_size != model.vocab_size:
            # a grown vocabulary: the seed cannot read the new token ids, and its loss per token would not compare
            print(f"the seed model has {seed_model.vocab_size} tokens, the run grew its vocabulary to "
                  f"{model.vocab_size}: the report leaves the seed out")
            seed_model = None
        report = run_report(model, e, out, {d: list(v) for d, v in sets.items()}, seed_model)
        print(format_report(report))
    return 0


def report_routes(model, export_cfg, domains) -> dict[str, int] | None:
    """{validation domain: the route our model is compared under}: export.domain's for every domain, else each
    domain's own (its oracle route; a domain the model never saw takes the anchor's); None without domains."""
    if not getattr(model, "domains", None):
        return None
    if export_cfg.domain is not None:
        return {d: model.domains.index(export_cfg.domain) for d in domains}
    return {d: model.domains.index(d) if d in model.domains else 0 for d in domains}


def run_report(model, export_cfg, out: Path, eval_batches: dict, seed_model=None) -> dict:
    """export_report.json of an export just written (a PEFT export: each domain's base + adapter)."""
    from modular.export.report import evaluate, export_report

    routes = report_routes(model, export_cfg, eval_batches)
    exported = None
    export_dir = out
    if export_cfg.peft:
        from modular.export.peft_adapters import BASE_FOLDER, load_peft_model

        export_dir = out / BASE_FOLDER
        exported = {}
        for route in sorted(set(routes.values())):  # each domain's text through its own adapter (the anchor's: base)
            texts = {d: batches for d, batches in eval_batches.items() if routes[d] == route}
            exported.update(evaluate(load_peft_model(out, model.domains[route]), texts))
    return export_report(model, export_dir, eval_batches, seed_model=seed_model, out_path=out / "export_report.json",
                         routes=routes, exported_results=exported)


def format_report(report: dict) -> str:
    def ppl(cell):
        return f"{cell['perplexity']:10.3f}" if cell else f"{'-':>10}"

    routed = any("route" in row for row in report["domains"].values())
    route_head = f" {'route':<10}" if routed else ""
    lines = [f"{'domain':<12}{route_head} {'moe':>10} {'exported':>10} {'seed':>10} {'retained':>9}"]
    for domain, row in list(report["domains"].items()) + [("mean", report["mean"])]:
        share = row["retained_share"]
        route = f" {row.get('route', ''):<10}" if routed else ""
        lines.append(f"{domain:<12}{route} {ppl(row['moe'])} {ppl(row['exported'])} {ppl(row['seed'])} "
                     f"{'-' if share is None else f'{share:.1%}':>9}")
    return "\n".join(lines)


def upcycle_command(overrides: list[str]) -> int:
    """`modular upcycle upcycle.source=PATH upcycle.num_experts=E run.dir=RUN [routing.* data.* train.* ...]`."""
    from safetensors.torch import save_file

    from modular.atomic import atomic_write_json
    from modular.config import compose_config, to_dict
    from modular.export.upcycle import load_hf_llama, resolve_source, upcycle, write_source_tokenizer
    from modular.export.writer import staged_dir
    from modular.run.folder import write_marker
    from modular.train.checkpoint import WEIGHTS, unique_state_dict, write_manifest

    fixed = [o for o in overrides if _key(o).startswith(_ARCHITECTURE_KEYS) or o.startswith("model=")]
    if fixed:
        raise ConfigError(f"{fixed[0]} is not allowed with modular upcycle; the source model fixes the architecture "
                          "(choose the experts with upcycle.num_experts, upcycle.top_k and upcycle.layers).")
    cfg = compose_config(overrides)
    u = cfg.upcycle
    if not u.source:
        raise ConfigError("modular upcycle needs upcycle.source=PATH, a local HF Llama folder or a .gguf file.")
    if not cfg.run.dir:
        raise ConfigError("modular upcycle needs run.dir=DIR, the new run folder to write.")
    folder = Path(cfg.run.dir).expanduser().resolve()
    if folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()  # an empty folder holds nothing to protect
    if folder.exists():
        raise ConfigError(f"run.dir={folder} already exists; modular upcycle starts a new run, so name a new folder.")
    passthrough = [o for o in overrides if not _key(o).startswith(("upcycle.", "run.dir"))]
    dense, dense_cfg = load_hf_llama(u.source, overrides=passthrough)
    layers = list(u.layers) if not isinstance(u.layers, str) else u.layers
    moe, moe_cfg = upcycle(dense, dense_cfg, int(u.num_experts), u.top_k, noise=float(u.noise), layers=layers,
                           seed=int(cfg.seed))
    ids = torch.randint(0, int(dense_cfg.model.vocab_size), (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        step0_diff = float((moe.eval()(ids).logits - dense.eval()(ids).logits).abs().max())

    source_folder, gguf_file = resolve_source(u.source)
    with staged_dir(folder) as tmp:
        write_marker(tmp, "upcycle")
        extra = []
        tokenizer_written = write_source_tokenizer(source_folder, gguf_file, tmp / "tokenizer", required=False)
        # Paths inside the run folder are written relative to it (${run.dir}), so a moved run folder still
        # finds them; the folder itself is recorded as the user named it (relative stays relative).
        if tokenizer_written:
            extra += ["data.tokenizer.kind=hf", "data.tokenizer.path=${run.dir}/tokenizer"]
        (tmp / "upcycled").mkdir()
        save_file(unique_state_dict(moe), str(tmp / UPCYCLED_WEIGHTS), metadata={"format": "pt"})
        write_manifest(tmp / "upcycled", WEIGHTS)  # train.init_from verifies it like every checkpoint
        # A folder holding model.safetensors, so the trainer can load it with checkpoint.load_model_weights.
        init = ["train.init_from=${run.dir}/" + str(Path(UPCYCLED_WEIGHTS).parent)]
        # The architecture last: it must win over a passthrough routing.top_k (upcycle.top_k decided it).
        run_dir = [o for o in overrides if _key(o) == "run.dir"][-1]  # as the user wrote it (quotes included)
        run_overrides = passthrough + extra + modular_overrides_from_cfg(moe_cfg) + init + [run_dir]
        compose_config(run_overrides)  # the run folder must compose exactly like `modular train` will
        atomic_write_json(tmp / "overrides.json", run_overrides)
        atomic_write_json(tmp / "config.json", to_dict(moe_cfg))
        atomic_write_json(tmp / UPCYCLE_RECORD, {
            "source": str(Path(u.source).expanduser()), "num_experts": int(u.num_experts),
            "top_k": int(moe_cfg.routing.top_k), "layers": layers if isinstance(layers, str) else list(layers),
            "noise": float(u.noise), "step0_max_abs_logit_diff": step0_diff, "weights": UPCYCLED_WEIGHTS,
            "tokenizer": "tokenizer" if tokenizer_written else None,
        })
    print(f"upcycled {u.source}: {len(moe.moe_layers)} MoE layers x {u.num_experts} experts, top-{moe_cfg.routing.top_k}; "
          f"step-0 max |logit difference| to the dense model {step0_diff:.2e}")
    print(f"wrote {folder}; train it with: modular train run.dir={folder}")
    return 0


def modular_overrides_from_cfg(cfg) -> list[str]:
    """Overrides that recompose the upcycled architecture (model and experts groups, routing.top_k)."""
    m, e = cfg.model, cfg.experts
    moe_layers = m.moe_layers if isinstance(m.moe_layers, str) else "[" + ",".join(str(i) for i in m.moe_layers) + "]"
    return [
        f"model.vocab_size={m.vocab_size}", f"model.d_model={m.d_model}", f"model.n_layers={m.n_layers}",
        f"model.n_heads={m.n_heads}", f"model.n_kv_heads={m.n_kv_heads}", f"model.ffn_dim={m.ffn_dim}",
        f"model.max_seq_len={m.max_seq_len}", f"model.rope_theta={float(m.rope_theta)!r}",
        f"model.norm_eps={float(m.norm_eps)!r}", f"model.tie_embeddings={str(bool(m.tie_embeddings)).lower()}",
        f"model.init_std={float(m.init_std)!r}", f"model.moe_layers={moe_layers}",
        f"experts.type={e.type}", f"experts.num_experts={e.num_experts}", f"experts.ffn_dim={e.ffn_dim}",
        "experts.shared_experts=0", f"routing.top_k={cfg.routing.top_k}",
    ]
