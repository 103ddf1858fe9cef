"""`modular export` and `modular upcycle`: thin commands over the export library (the CLI calls these).

export: the latest checkpoint of run.dir → an HF folder (+ export_report.json); upcycle: an HF Llama →
a new run folder whose first `modular train` starts from the upcycled MoE.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

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
        return json.loads(record.read_text(encoding="utf-8")).get("source")
    return None


def export_command(overrides: list[str]) -> int:
    """`modular export run.dir=RUN export.format=llama-dense|mixtral|qwen2-moe|moe export.merge=...`."""
    from modular.data.loader import validation_sets
    from modular.data.tokenizer import load_tokenizer
    from modular.export.dense import routing_mass_is_one
    from modular.export.formats import export_format
    from modular.export.report import export_report
    from modular.export.upcycle import load_hf_llama
    from modular.train.run import load_run_model

    model, cfg, folder, checkpoint = load_run_model(overrides, "export")
    e = cfg.export
    fmt = export_format(e.format, e)
    fmt.check(model, cfg)
    out = Path(e.out) if e.out else folder / "export" / e.format
    dtype = None if e.dtype == "auto" else DTYPES[e.dtype]
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    seed_source = _seed_source(cfg, folder)
    seed_model = None
    needs_seed = getattr(fmt, "needs_seed", lambda: False)()
    if seed_source and (e.report or needs_seed):
        seed_model, _ = load_hf_llama(seed_source)
    t = cfg.train
    calibration = None
    if fmt.needs_calibration or (not fmt.exact and not routing_mass_is_one(cfg)):
        sets = validation_sets(cfg.data, t.batch_size, t.seq_len, max_batches=e.calibration_batches,
                               progress=t.progress, tokenizer=tokenizer)
        calibration = [batch.inputs for val in sets.values() for batch in val]
    fmt.write(model, cfg, tokenizer, out, seed_model=seed_model, calibration_batches=calibration,
              overwrite=e.overwrite, dtype=dtype, max_shard_size=e.max_shard_size)
    print(f"exported {checkpoint} as {e.format} to {out}")
    if e.report:
        sets = validation_sets(cfg.data, t.batch_size, t.seq_len, max_batches=t.eval_batches, progress=t.progress,
                               tokenizer=tokenizer)
        if seed_model is not None and seed_model.vocab_size != model.vocab_size:
            # a grown vocabulary: the seed cannot read the new token ids, and its loss per token would not compare
            print(f"the seed model has {seed_model.vocab_size} tokens, the run grew its vocabulary to "
                  f"{model.vocab_size}: the report leaves the seed out")
            seed_model = None
        report = export_report(model, out, {d: list(v) for d, v in sets.items()}, seed_model=seed_model,
                               out_path=out / "export_report.json")
        print(format_report(report))
    return 0


def format_report(report: dict) -> str:
    def ppl(cell):
        return f"{cell['perplexity']:10.3f}" if cell else f"{'-':>10}"

    lines = [f"{'domain':<12} {'moe':>10} {'exported':>10} {'seed':>10} {'retained':>9}"]
    for domain, row in list(report["domains"].items()) + [("mean", report["mean"])]:
        share = row["retained_share"]
        lines.append(f"{domain:<12} {ppl(row['moe'])} {ppl(row['exported'])} {ppl(row['seed'])} "
                     f"{'-' if share is None else f'{share:.1%}':>9}")
    return "\n".join(lines)


def upcycle_command(overrides: list[str]) -> int:
    """`modular upcycle upcycle.source=PATH upcycle.num_experts=E run.dir=RUN [routing.* data.* train.* ...]`."""
    from safetensors.torch import save_file

    from modular.atomic import atomic_write_json
    from modular.config import compose_config, to_dict
    from modular.export.upcycle import load_hf_llama, resolve_source, upcycle, write_source_tokenizer
    from modular.export.writer import staged_dir
    from modular.train.checkpoint import unique_state_dict

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
        extra = []
        tokenizer_written = write_source_tokenizer(source_folder, gguf_file, tmp / "tokenizer", required=False)
        if tokenizer_written:
            extra += ["data.tokenizer.kind=hf", f"data.tokenizer.path={folder / 'tokenizer'}"]
        (tmp / "upcycled").mkdir()
        save_file(unique_state_dict(moe), str(tmp / UPCYCLED_WEIGHTS), metadata={"format": "pt"})
        # A folder holding model.safetensors, so the trainer can load it with checkpoint.load_model_weights.
        init = [f"train.init_from={(folder / UPCYCLED_WEIGHTS).parent}"]
        # The architecture last: it must win over a passthrough routing.top_k (upcycle.top_k decided it).
        run_overrides = passthrough + extra + modular_overrides_from_cfg(moe_cfg) + init + [f"run.dir={folder}"]
        compose_config(run_overrides)  # the run folder must compose exactly like `modular train` will
        atomic_write_json(tmp / "overrides.json", run_overrides)
        atomic_write_json(tmp / "config.json", to_dict(moe_cfg))
        atomic_write_json(tmp / UPCYCLE_RECORD, {
            "source": str(Path(u.source).expanduser().resolve()), "num_experts": int(u.num_experts),
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
