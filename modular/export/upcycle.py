"""Dense → MoE: load a Hugging Face Llama (safetensors folder or GGUF file) as a ModularLM, and sparse-upcycle it.

Upcycling (Komatsuzaki et al., 2023) copies each chosen dense FFN into E experts behind a new router,
initialised so that the MoE computes exactly the dense model's function at step 0.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
from pathlib import Path

import torch

from modular.errors import CheckpointError, ConfigError, DataError
from modular.export.adapters import LlamaAdapter, _get
from modular.export.writer import load_safetensors_folder
from modular.hf_folders import refuse_custom_code

SUPPORTED_MODEL_TYPES = ("llama", "mistral")
GGUF_INSTALL_HINT = 'reading GGUF files needs the gguf package; install it with pip install "modular-moe[gguf]"'


# ---------------------------------------------------------------------------------------------
# Loading a dense Hugging Face model


def resolve_source(source: str | os.PathLike) -> tuple[Path, str | None]:
    """(folder, gguf file name or None) for an HF folder, a .gguf file, or a folder holding one .gguf file."""
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ConfigError(f"upcycle source {path} is a file but not a .gguf; give a .gguf file or an HF model folder.")
        return path.resolve().parent, path.name
    if not path.is_dir():
        raise ConfigError(f"upcycle source {path} does not exist; give a local HF model folder or a .gguf file.")
    if (path / "config.json").is_file():
        return path.resolve(), None
    ggufs = sorted(p.name for p in path.glob("*.gguf"))
    if len(ggufs) == 1:
        return path.resolve(), ggufs[0]
    if len(ggufs) > 1:
        raise ConfigError(f"upcycle source {path} holds several .gguf files ({', '.join(ggufs)}); name one of them.")
    raise ConfigError(f"upcycle source {path} has no config.json and no .gguf file; it is not a Hugging Face model.")


def llama_misfits(hf_config) -> list[str]:
    """The features of an HF config that our decoder (Llama's math) cannot compute, as short phrases."""
    misfits = []
    model_type = _get(hf_config, "model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        misfits.append(f"model_type={model_type!r} (supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    if _get(hf_config, "attention_bias", False):
        misfits.append("attention_bias=true")
    if _get(hf_config, "mlp_bias", False):
        misfits.append("mlp_bias=true")
    act = _get(hf_config, "hidden_act", "silu")
    if act not in ("silu", "swish"):
        misfits.append(f"hidden_act={act!r} (only silu)")
    hidden, heads = int(_get(hf_config, "hidden_size")), int(_get(hf_config, "num_attention_heads"))
    head_dim = _get(hf_config, "head_dim", None)
    if head_dim is not None and int(head_dim) != hidden // heads:
        misfits.append(f"head_dim={head_dim} (must be hidden_size / num_attention_heads = {hidden // heads})")
    rope = _get(hf_config, "rope_parameters", None) or _get(hf_config, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    if rope_type not in ("default", None):
        misfits.append(f"rope_type={rope_type!r} (only the default rotary embedding, no scaling)")
    window = _get(hf_config, "sliding_window", None)
    max_pos = int(_get(hf_config, "max_position_embeddings", 0) or 0)
    if window is not None and model_type == "mistral" and int(window) < max_pos:
        misfits.append(f"sliding_window={window} (only full causal attention)")
    return misfits


def _rope_theta(hf_config) -> float:
    rope = _get(hf_config, "rope_parameters", None)
    if isinstance(rope, dict) and "rope_theta" in rope:
        return float(rope["rope_theta"])
    return float(_get(hf_config, "rope_theta", 10000.0))


def modular_overrides(hf_config) -> list[str]:
    """Config overrides that make our decoder the HF model's architecture (every layer dense)."""
    hidden = int(_get(hf_config, "hidden_size"))
    heads = int(_get(hf_config, "num_attention_heads"))
    kv_heads = int(_get(hf_config, "num_key_value_heads", None) or heads)
    return [
        f"model.vocab_size={int(_get(hf_config, 'vocab_size'))}",
        f"model.d_model={hidden}",
        f"model.n_layers={int(_get(hf_config, 'num_hidden_layers'))}",
        f"model.n_heads={heads}",
        f"model.n_kv_heads={kv_heads}",
        f"model.ffn_dim={int(_get(hf_config, 'intermediate_size'))}",
        f"model.max_seq_len={int(_get(hf_config, 'max_position_embeddings', 2048) or 2048)}",
        f"model.rope_theta={_rope_theta(hf_config)!r}",
        f"model.norm_eps={float(_get(hf_config, 'rms_norm_eps', 1e-6))!r}",
        f"model.tie_embeddings={str(bool(_get(hf_config, 'tie_word_embeddings', False))).lower()}",
        f"model.init_std={float(_get(hf_config, 'initializer_range', 0.02) or 0.02)!r}",
        "model.moe_layers=none",
    ]


def _read_hf_folder(folder: Path) -> tuple[dict, dict]:
    """(config.json as a dict, HF state dict) of a safetensors folder; no code from the folder is run."""
    refuse_custom_code(folder)
    try:
        hf_config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{folder / 'config.json'} is not readable JSON ({exc}).") from None
    misfits = llama_misfits(hf_config)
    if misfits:
        raise ConfigError(f"{folder} cannot be loaded as a Llama model: {'; '.join(misfits)}.")
    return hf_config, load_safetensors_folder(folder)


def gguf_available() -> bool:
    return importlib.util.find_spec("gguf") is not None


def _read_gguf(folder: Path, gguf_file: str, dtype: torch.dtype) -> tuple[object, dict]:
    """(HF config, HF state dict) of a GGUF file, dequantised by transformers' GGUF loader."""
    if not gguf_available():
        raise ConfigError(GGUF_INSTALL_HINT + ".")
    from modular.hf_folders import auto_causal_lm, auto_config

    path = folder / gguf_file
    try:
        hf_config = auto_config(folder, gguf_file=gguf_file)
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001  (gguf: ValueError/KeyError/struct errors on a corrupt file)
        raise CheckpointError(f"{path} is not a readable GGUF model ({_first_line(exc)}).") from None
    misfits = llama_misfits(hf_config)
    if misfits:
        raise ConfigError(f"{path} cannot be loaded as a Llama model: {'; '.join(misfits)}.")
    try:
        hf_model = auto_causal_lm(folder, gguf_file=gguf_file, dtype=dtype)
    except Exception as exc:  # noqa: BLE001  (transformers/gguf raise many types; all mean "cannot load it")
        raise CheckpointError(f"{path} could not be dequantised into a Llama model ({_first_line(exc)}).") from None
    return hf_model.config, hf_model.state_dict()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def load_hf_llama(source: str | os.PathLike, *, dtype: torch.dtype = torch.float32, overrides: list[str] | None = None):
    """(ModularLM, composed config) computing the same function as a local HF Llama folder or GGUF file.

    Safetensors folders are read directly (config.json parsed as JSON, never remote code); GGUF files
    go through transformers' GGUF loader, which dequantises every tensor. `overrides` are extra config
    overrides (e.g. `train.seq_len=...`) composed after the architecture's own.
    """
    from modular.config import compose_config
    from modular.models import build_model

    folder, gguf_file = resolve_source(source)
    if gguf_file is None:
        hf_config, hf_state = _read_hf_folder(folder)
    else:
        hf_config, hf_state = _read_gguf(folder, gguf_file, dtype)
    cfg = compose_config(modular_overrides(hf_config) + list(overrides or []))
    state = LlamaAdapter().from_hf(hf_state, hf_config)
    model = build_model(cfg)
    from modular.train.checkpoint import describe_mismatch

    problems = describe_mismatch({k: tuple(v.shape) for k, v in model.state_dict().items()},
                                 {k: tuple(v.shape) for k, v in state.items()})
    if problems:
        raise CheckpointError(f"the weights in {source} do not fit the model its config describes ({problems}).")
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True)
    return model.to(dtype), cfg


def write_source_tokenizer(folder: Path, gguf_file: str | None, target: Path, required: bool = True) -> bool:
    """Save the source's tokenizer (fast form: tokenizer.json + tokenizer_config.json) into `target`.

    Returns False, without writing, when the source has no tokenizer and `required` is False.
    """
    from modular.hf_folders import auto_tokenizer

    if gguf_file is not None and not gguf_available():
        raise ConfigError(GGUF_INSTALL_HINT + ".")
    try:
        tok = auto_tokenizer(folder, gguf_file=gguf_file)
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001  (no tokenizer files, or GGUF without tokenizer metadata)
        if not required:
            return False
        source = folder / gguf_file if gguf_file else folder
        raise CheckpointError(f"the tokenizer of {source} cannot be loaded offline ({_first_line(exc)}).") from None
    if not getattr(tok, "is_fast", False):
        if not required:
            return False
        raise CheckpointError(f"the tokenizer of {folder} has no fast (tokenizer.json) form to export.")
    target.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(target))
    return True


def save_source_tokenizer(source: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Write the source model's tokenizer as out_dir/tokenizer.json (+ tokenizer_config.json), offline.

    Use it with data.tokenizer.kind=hf data.tokenizer.path=<out_dir> to train the upcycled model on the
    tokenizer it was pretrained with. Returns the tokenizer.json path.
    """
    from modular.export.writer import staged_dir

    folder, gguf_file = resolve_source(source)
    with staged_dir(out_dir, overwrite=False) as tmp:
        write_source_tokenizer(folder, gguf_file, tmp)
    return Path(out_dir).expanduser().resolve() / "tokenizer.json"


# ---------------------------------------------------------------------------------------------
# Sparse upcycling


def upcycle_routing_misfits(cfg) -> list[str]:
    from modular.routing import ROUTER_REGISTRY

    r = cfg.routing
    misfits = []
    if not ROUTER_REGISTRY[r.type].routes_every_token(r):
        misfits.append(f"routing.type={r.type} (a token may get no expert, so the dense function is lost)")
    if r.capacity_factor is not None:
        misfits.append(f"routing.capacity_factor={r.capacity_factor} (dropped tokens lose their FFN output)")
    return misfits


def _moe_layer_list(layers, n_layers: int) -> list[int]:
    if isinstance(layers, str):
        if layers == "all":
            return list(range(n_layers))
        raise ConfigError(f"upcycle layers={layers!r} is not allowed; use 'all' or a list of layer indices.")
    chosen = sorted({int(i) for i in layers})
    bad = [i for i in chosen if not 0 <= i < n_layers]
    if bad or not chosen:
        raise ConfigError(f"upcycle layers={list(layers)} is not allowed; give layer indices from 0 to {n_layers - 1}.")
    return chosen


@torch.no_grad()
def upcycle(model, cfg, num_experts: int, top_k: int | None = None, *, noise: float = 0.0, layers="all",
            seed: int = 0):
    """(MoE ModularLM, its config): each chosen dense FFN becomes a swiglu bank of `num_experts` copies.

    The routing settings come from cfg.routing (top_k overrides routing.top_k). At step 0 the MoE equals
    the dense model: with renormalised weights (top-k/Sinkhorn with normalize=true, hash) the router is
    random (N(0, init_std)) and any choice of identical experts gives the same output; without
    renormalisation the router starts at zero, so every selected weight is s0 (1/E for softmax, 1/2 for
    sigmoid) and down_proj is scaled by 1/(k·s0). noise > 0 adds noise·std(W)·N(0,1) to each expert copy
    (breaking symmetry; the step-0 equality then holds only up to that noise). The aux-free selection
    bias starts at zero; it only moves selection among identical experts.
    """
    from modular.config import validate
    from modular.experts.swiglu import SwiGLUBank
    from modular.models import build_model
    from modular.routing import ROUTER_REGISTRY

    if any(layer.is_moe for layer in model.layers):
        raise ConfigError("upcycle needs a dense model, but this one already has MoE layers; load the dense seed.")
    if not isinstance(num_experts, int) or num_experts < 1:
        raise ConfigError(f"upcycle num_experts={num_experts!r} is not allowed; it must be an integer >= 1.")
    if noise < 0:
        raise ConfigError(f"upcycle noise={noise} is not allowed; it must be >= 0.")
    misfits = upcycle_routing_misfits(cfg)
    if misfits:
        raise ConfigError(f"upcycling could not keep the dense model's function: {'; '.join(misfits)}.")
    n = len(model.layers)
    chosen = _moe_layer_list(layers, n)
    widths = {model.layers[i].mlp.ffn_dim for i in chosen}
    if len(widths) > 1:
        raise ConfigError(f"the chosen layers have FFN widths {sorted(widths)}; one expert width is needed.")
    k = int(top_k if top_k is not None else cfg.routing.top_k)

    new_cfg = copy.deepcopy(cfg)
    new_cfg.model.moe_layers = "all" if chosen == list(range(n)) else chosen
    new_cfg.experts.type = SwiGLUBank.registry_name  # copies of a dense SwiGLU FFN
    new_cfg.experts.num_experts = num_experts
    new_cfg.experts.num_experts_per_layer = None
    new_cfg.experts.ffn_dim = widths.pop()
    new_cfg.experts.shared_experts = 0
    new_cfg.routing.top_k = k
    validate(new_cfg)

    moe_model = build_model(new_cfg)
    dense_state = model.state_dict()
    moe_state = moe_model.state_dict()
    for key, value in dense_state.items():
        if key in moe_state and moe_state[key].shape == value.shape:
            moe_state[key] = value.clone()
    generator = torch.Generator().manual_seed(seed)
    r = new_cfg.routing
    router_class = ROUTER_REGISTRY[r.type]
    if router_class.weights_sum_to_one(r):
        selected_weight = None
    else:
        selected_weight = router_class.weight_at_zero_logits(r, num_experts)
    for i in chosen:
        p = f"layers.{i}.mlp."
        gate, up, down = (dense_state[p + f"{n_}.weight"] for n_ in ("gate_proj", "up_proj", "down_proj"))
        if selected_weight is not None:
            down = down / (k * selected_weight)  # k selected experts, each weighted s0: Σ = k·s0
        b = p + "banks.0."
        for name, w in (("w_gate", gate), ("w_up", up), ("w_down", down)):
            copies = w.unsqueeze(0).repeat(num_experts, 1, 1)  # [E, out, in]
            if noise > 0:
                copies = copies + noise * w.float().std() * torch.randn(copies.shape, generator=generator).to(w.dtype)
            moe_state[b + name] = copies
        router = moe_state[b + "router_weight"]
        if selected_weight is None:  # renormalised: any choice of identical experts gives the dense output
            moe_state[b + "router_weight"] = (torch.randn(router.shape, generator=generator)
                                              * float(new_cfg.model.init_std)).to(router.dtype)
        else:
            moe_state[b + "router_weight"] = torch.zeros_like(router)
        bias_key = p + "router.expert_bias"
        if bias_key in moe_state:
            moe_state[bias_key] = torch.zeros_like(moe_state[bias_key])
    moe_model.load_state_dict(moe_state, strict=True)
    dtype = next(model.parameters()).dtype
    return moe_model.to(dtype), new_cfg
