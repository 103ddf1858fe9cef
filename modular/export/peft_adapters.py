"""A domain-routed model as Hugging Face's convention for domain adapters: the anchor's route as a dense Llama
folder (`base/`) plus one PEFT LoRA folder per later domain (`<domain>/`) that `peft` loads onto it.

Each adapter is exactly that domain's dense route (domains.dense_route_state) on top of the base: the domain's
low-rank trunk deltas are LoRA weights (q/k/v/o, dense FFNs, lm_head; the embedding delta as PEFT's
lora_embedding_A/B), with lora_alpha / r equal to our alpha / rank; norm scale deltas and each MoE layer's merged
FFN (which differs from the anchor's merged FFN by a full-rank matrix) are PEFT `modules_to_save`.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor

from modular.errors import ConfigError
from modular.export.adapters import LlamaAdapter, pad_swiglu
from modular.export.dense import DEFAULT_TIES_DENSITY
from modular.export.domains import dense_route_state, domain_deltas, route_cfg
from modular.export.folder import write_hf_folder
from modular.export.writer import DEFAULT_MAX_SHARD_SIZE, staged_dir, write_json

BASE_FOLDER = "base"
PEFT_INFO = "modular_peft.json"  # what each adapter holds and how exact it is

# Our adapter place → the HF module it adapts ({i}: the layer index).
_HF_MODULES = {
    "q_proj": "model.layers.{i}.self_attn.q_proj", "k_proj": "model.layers.{i}.self_attn.k_proj",
    "v_proj": "model.layers.{i}.self_attn.v_proj", "o_proj": "model.layers.{i}.self_attn.o_proj",
    "gate_proj": "model.layers.{i}.mlp.gate_proj", "up_proj": "model.layers.{i}.mlp.up_proj",
    "down_proj": "model.layers.{i}.mlp.down_proj",
    "input_layernorm": "model.layers.{i}.input_layernorm",
    "post_attention_layernorm": "model.layers.{i}.post_attention_layernorm",
    "embed_tokens": "model.embed_tokens", "norm": "model.norm", "lm_head": "lm_head",
}
_SWIGLU = ("gate_proj", "up_proj", "down_proj")


def require_peft():
    try:
        import peft
    except ImportError:
        raise ConfigError("export.peft=true needs the peft package, which is not installed; install it with "
                          "pip install 'modular-moe[peft]' (or pip install peft).") from None
    return peft


def _common_width(states: Mapping[str, Mapping[str, Tensor]], n_layers: int) -> int:
    return max(int(s[f"layers.{i}.mlp.gate_proj.weight"].shape[0]) for s in states.values() for i in range(n_layers))


def _padded(state: Mapping[str, Tensor], n_layers: int, width: int) -> dict[str, Tensor]:
    """Every FFN zero-padded to `width` hidden units (exact), so base and adapters share one module shape."""
    out = dict(state)
    for i in range(n_layers):
        keys = [f"layers.{i}.mlp.{n}.weight" for n in _SWIGLU]
        for key, w in zip(keys, pad_swiglu(*(out[k] for k in keys), width)):
            out[key] = w
    return out


def _copy_padded(target: Tensor, source: Tensor) -> None:
    """target ← source in its leading rows and columns, zeros elsewhere (zero-padded hidden units stay zero)."""
    target.zero_()
    target[: source.shape[0], : source.shape[1]].copy_(source)


@torch.no_grad()
def _adapter_model(hf_base, model, domain: str, state: Mapping[str, Tensor], base_state: Mapping[str, Tensor],
                   n_layers: int, base_path: Path):
    """A PeftModel on a copy of `hf_base` that computes `domain`'s dense route; returns (peft model, record)."""
    peft = require_peft()
    from modular.models.adapters import EmbeddingDelta, LowRankDelta

    lora, saved = {}, []
    for _, i, place, delta in domain_deltas(model, domain):
        name = _HF_MODULES[place].format(i=i)
        if isinstance(delta, (LowRankDelta, EmbeddingDelta)):
            lora[name] = delta
        else:  # a norm scale delta: the whole (tiny) norm module is saved
            saved.append(name)
    moe_layers = [i for i, layer in enumerate(model.layers) if layer.is_moe]
    for i in moe_layers:  # the route's merged FFN, where it differs from the base's
        if any(not torch.equal(state[f"layers.{i}.mlp.{n}.weight"], base_state[f"layers.{i}.mlp.{n}.weight"])
               for n in _SWIGLU):
            saved.append(f"model.layers.{i}.mlp")
    placeholder = not lora
    if placeholder:  # PEFT needs one LoRA target; a zero LoRA (B = 0) adds exactly nothing
        lora["model.layers.0.self_attn.q_proj"] = None
    ranks = {name: (d.rank, d.alpha) if d is not None else (1, 1.0) for name, d in lora.items()}
    r, alpha = next(iter(ranks.values()))
    config = peft.LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=0.0, bias="none", target_modules=sorted(lora),
        modules_to_save=saved or None, base_model_name_or_path=str(base_path),
        rank_pattern={n: ra[0] for n, ra in ranks.items() if ra[0] != r},
        alpha_pattern={n: ra[1] for n, ra in ranks.items() if ra[1] != alpha})
    pm = peft.get_peft_model(copy.deepcopy(hf_base), config)
    root = pm.base_model.model
    for name, delta in lora.items():
        module = root.get_submodule(name)
        if delta is None:
            module.lora_B["default"].weight.zero_()
        elif isinstance(delta, EmbeddingDelta):  # ours: A [V, r], B [D, r]; PEFT: A [r, V], B [D, r]
            module.lora_embedding_A["default"].copy_(delta.lora_A.t())
            module.lora_embedding_B["default"].copy_(delta.lora_B)
        else:  # a dense FFN narrower than the common width: its padded hidden units get zero rows/columns
            _copy_padded(module.lora_A["default"].weight, delta.lora_A)
            _copy_padded(module.lora_B["default"].weight, delta.lora_B)
        if delta is not None and abs(module.scaling["default"] - delta.scale) > 1e-12 * max(1.0, delta.scale):
            raise ConfigError(f"PEFT scales {name} by {module.scaling['default']} but the domain delta by {delta.scale}.")
    for name in saved:
        copy_of = root.get_submodule(name).modules_to_save["default"]
        ours = name.removeprefix("model.")
        if name.endswith(".mlp"):
            for n in _SWIGLU:
                getattr(copy_of, n).weight.copy_(state[f"{ours}.{n}.weight"])
        else:
            copy_of.weight.copy_(state[f"{ours}.weight"])
    lora_params = sum(p.numel() for n, p in pm.named_parameters() if "lora_" in n)
    saved_params = sum(p.numel() for name in saved
                       for p in root.get_submodule(name).modules_to_save["default"].parameters())
    record = {"domain": domain, "lora_targets": sorted(n for n, d in lora.items() if d is not None),
              "placeholder_lora": "model.layers.0.self_attn.q_proj (zero: the domain has no low-rank deltas)"
              if placeholder else None,
              "modules_to_save": saved, "lora_parameters": lora_params, "saved_parameters": saved_params,
              "exact": "equals the domain's dense route (LoRA = its deltas; modules_to_save = its norms and merged FFNs)"}
    return pm, record


def export_peft(model, cfg, tokenizer, out_dir: str | os.PathLike, calibration_by_domain: Mapping[str, Sequence],
                merge: str = "frequency", seed_ffn=None, *, density: float = DEFAULT_TIES_DENSITY,
                scale: float | None = None, overwrite: bool = False, dtype: torch.dtype | None = None,
                max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE) -> Path:
    """Write `out_dir/base` (the anchor's dense route, a LlamaForCausalLM folder) and `out_dir/<domain>` (a PEFT
    LoRA folder) for every later domain; peft's PeftModel of the base and out_dir/<domain> computes that domain's
    dense route (export_domain_dense's model). Returns out_dir."""
    require_peft()
    from modular.export.report import load_hf_model

    n = int(cfg.model.n_layers)
    states, records, tied = {}, {}, {}
    for domain in model.domains:
        if domain not in calibration_by_domain:
            raise ConfigError(f"domain {domain} has no validation data in data.domains to calibrate its route; add "
                              f"it (+data.domains.{domain}.val=PATH).")
        states[domain], records[domain], tied[domain] = dense_route_state(
            model, cfg, domain, calibration_by_domain[domain], merge, seed_ffn, density, scale)
    width = _common_width(states, n)
    states = {d: _padded(s, n, width) for d, s in states.items()}
    anchor = model.domains[0]
    # A base with tied embeddings would let an adapter's lm_head LoRA, once merged (merge_and_unload), move the
    # embedding too: when any domain adapts either, the base keeps them as two matrices.
    base_tied = all(tied.values())
    base_state = dict(states[anchor])
    if not base_tied:
        base_state["lm_head.weight"] = base_state["lm_head.weight"].clone()
    out = Path(out_dir).expanduser().resolve()
    with staged_dir(out, overwrite) as tmp:
        write_hf_folder(LlamaAdapter(), base_state, route_cfg(cfg, base_tied), tokenizer, tmp / BASE_FOLDER,
                        dtype=dtype, max_shard_size=max_shard_size,
                        info={"kind": "domain-dense", "exact": not records[anchor]["layers"], **records[anchor]})
        hf_base = load_hf_model(tmp / BASE_FOLDER)
        hf_base.name_or_path = str(out / BASE_FOLDER)  # where the base will be once the folder is in place (PEFT records it)
        adapters = {}
        for domain in model.domains[1:]:
            pm, adapters[domain] = _adapter_model(hf_base, model, domain, states[domain], states[anchor], n,
                                                  out / BASE_FOLDER)
            if dtype is not None:
                pm = pm.to(dtype)
            pm.save_pretrained(str(tmp / domain), save_embedding_layers=False)
            adapters[domain]["route"] = records[domain]
            write_json(tmp / domain / PEFT_INFO, adapters[domain])
        write_json(tmp / PEFT_INFO, {"base": BASE_FOLDER, "anchor": anchor, "adapters": list(adapters),
                                     "merge": merge, "ffn_width": width,
                                     "load": "peft.PeftModel.from_pretrained with the base (AutoModelForCausalLM) "
                                             "and a domain's folder"})
    return out


def load_peft_model(folder: str | os.PathLike, domain: str | None = None, dtype: torch.dtype = torch.float32):
    """The base of a PEFT export (domain None or its anchor) or base + the domain's adapter, loaded as a user
    would: transformers' Auto class and peft's PeftModel, offline."""
    from modular.export.report import load_hf_model

    folder = Path(folder)
    base = load_hf_model(folder / BASE_FOLDER, dtype=dtype)
    if domain is None or not (folder / domain / "adapter_config.json").is_file():
        return base
    require_peft()
    from modular.hf_folders import peft_adapter

    return peft_adapter(base, folder / domain).eval()
