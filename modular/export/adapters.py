"""State-dict adapters: one small explicit mapping per Hugging Face format (Llama, Mixtral, Qwen2-MoE).

`to_hf` writes the keys of HF's *on-disk* checkpoint layout (what `save_pretrained` writes and every
loader reads: one tensor per expert); `from_hf` also accepts transformers 5's fused in-memory layout.

Our keys mirror HF Llama without the `model.` prefix; an MoE layer holds banks of stacked experts:
`layers.{i}.mlp.banks.{b}.{w_gate [E,F,D], w_up [E,F,D], w_down [E,D,F], router_weight [E,D]}`.
Banks concatenate into global expert ids, so exporting several banks is a concatenation; importing
always gives one bank. Low-rank banks are materialised (W + B·A per expert): exact, just bigger.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from modular.errors import CheckpointError, ConfigError

try:
    from modular.routing.base import MASKED_LOGIT
except ImportError:  # routers without logit offsets: nothing is ever masked
    MASKED_LOGIT = -1.0e4

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
NORMS = ("input_layernorm", "post_attention_layernorm")
SWIGLU = ("gate_proj", "up_proj", "down_proj")


def _get(hf_config: Any, key: str, default: Any = None) -> Any:
    """Read a field from a PretrainedConfig or a config.json dict."""
    if isinstance(hf_config, Mapping):
        return hf_config.get(key, default)
    return getattr(hf_config, key, default)


# ---------------------------------------------------------------------------------------------
# Reading our state dict


def num_layers(state_dict: Mapping[str, Tensor]) -> int:
    indices = {int(m.group(1)) for k in state_dict if (m := re.match(r"layers\.(\d+)\.", k))}
    return max(indices) + 1 if indices else 0


def is_moe_layer(state_dict: Mapping[str, Tensor], i: int) -> bool:
    return f"layers.{i}.mlp.banks.0.router_weight" in state_dict


def _bank_tensors(state_dict: Mapping[str, Tensor], i: int, b: int) -> dict[str, Tensor]:
    p = f"layers.{i}.mlp.banks.{b}."
    return {k[len(p):]: v for k, v in state_dict.items() if k.startswith(p)}


def bank_classes(state_dict: Mapping[str, Tensor], i: int) -> list:
    """The registered expert type of each bank of MoE layer i (None if none matches), told apart by the
    names of its tensors."""
    from modular.experts import bank_class_of

    classes = []
    b = 0
    while f"layers.{i}.mlp.banks.{b}.router_weight" in state_dict:
        classes.append(bank_class_of(set(_bank_tensors(state_dict, i, b))))
        b += 1
    return classes


def _swiglu_types() -> str:
    from modular.experts import EXPERT_REGISTRY

    return ", ".join(name for name, cls in EXPERT_REGISTRY.items() if cls.expressible_as_swiglu())


def routable(state_dict: Mapping[str, Tensor], i: int) -> Tensor:
    """[E] bool: the experts of MoE layer i a token can be routed to.

    A router's `logit_offset` of MASKED_LOGIT (-1e4) makes exp() underflow to exactly 0: such an expert
    (added by growth, not yet trained) never receives a token or weight, so exports leave it out exactly.
    """
    offset = state_dict.get(f"layers.{i}.mlp.router.logit_offset")
    E = int(sum(state_dict[f"layers.{i}.mlp.banks.{b}.router_weight"].shape[0]
                for b in range(len(bank_classes(state_dict, i)))))
    if offset is None:
        return torch.ones(E, dtype=torch.bool)
    return offset.detach().cpu() > MASKED_LOGIT / 2


def logit_offset_misfits(state_dict: Mapping[str, Tensor], i: int) -> list[str]:
    offset = state_dict.get(f"layers.{i}.mlp.router.logit_offset")
    if offset is None:
        return []
    live = offset.detach().cpu()[routable(state_dict, i)]
    if bool(live.any()):
        return [f"layer {i} has non-zero router logit offsets {live[live != 0].tolist()[:4]} (HF routers have no bias)"]
    return []


def swiglu_experts(state_dict: Mapping[str, Tensor], i: int, routable_only: bool = True
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(gate [E,F,D], up [E,F,D], down [E,D,F], router [E,D]) of MoE layer i, banks concatenated.

    Low-rank experts are materialised: W_e = base + B_e·A_e for each projection (what LowRankBank computes).
    routable_only drops masked experts (see `routable`), which contribute exactly nothing.
    """
    gates, ups, downs, routers = [], [], [], []
    for b, bank_class in enumerate(bank_classes(state_dict, i)):
        if bank_class is None or not bank_class.expressible_as_swiglu():
            kind = bank_class.registry_name if bank_class is not None else "unknown"
            raise ConfigError(
                f"layer {i} bank {b} holds {kind} experts; only {_swiglu_types()} experts are SwiGLU FFNs "
                "that Hugging Face Llama/Mixtral/Qwen2-MoE can hold."
            )
        gate, up, down = bank_class.swiglu_from_state(_bank_tensors(state_dict, i, b))
        if gates and gate.shape[1] != gates[0].shape[1]:
            raise ConfigError(
                f"layer {i} bank {b} has expert width {gate.shape[1]} but bank 0 has {gates[0].shape[1]}; "
                "all experts of a layer must have the same width to be stacked."
            )
        gates.append(gate)
        ups.append(up)
        downs.append(down)
        routers.append(state_dict[f"layers.{i}.mlp.banks.{b}.router_weight"])
    stacks = torch.cat(gates), torch.cat(ups), torch.cat(downs), torch.cat(routers)
    if routable_only:
        keep = routable(state_dict, i).to(stacks[0].device)
        if not bool(keep.all()):
            stacks = tuple(t[keep] for t in stacks)
    return stacks  # type: ignore[return-value]


def shared_expert(state_dict: Mapping[str, Tensor], i: int) -> tuple[Tensor, Tensor, Tensor] | None:
    """(gate [S,D], up [S,D], down [D,S]) of layer i's shared experts (n shared experts are one FFN), or None."""
    p = f"layers.{i}.mlp.shared_experts.ffn."
    if p + "gate_proj.weight" not in state_dict:
        return None
    return tuple(state_dict[p + f"{n}.weight"] for n in SWIGLU)  # type: ignore[return-value]


def dense_ffn(state_dict: Mapping[str, Tensor], i: int) -> tuple[Tensor, Tensor, Tensor]:
    p = f"layers.{i}.mlp."
    return tuple(state_dict[p + f"{n}.weight"] for n in SWIGLU)  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------
# Shared parts: embeddings, attention, norms, output head


def _backbone_to_hf(sd: Mapping[str, Tensor], n_layers: int, tied: bool) -> dict[str, Tensor]:
    out = {"model.embed_tokens.weight": sd["embed_tokens.weight"], "model.norm.weight": sd["norm.weight"]}
    if not tied:
        out["lm_head.weight"] = sd["lm_head.weight"]
    for i in range(n_layers):
        for n in ATTENTION:
            out[f"model.layers.{i}.self_attn.{n}.weight"] = sd[f"layers.{i}.self_attn.{n}.weight"]
        for n in NORMS:
            out[f"model.layers.{i}.{n}.weight"] = sd[f"layers.{i}.{n}.weight"]
    return out


def _backbone_from_hf(hf: Mapping[str, Tensor], n_layers: int, tied: bool) -> dict[str, Tensor]:
    out = {"embed_tokens.weight": _take(hf, "model.embed_tokens.weight"), "norm.weight": _take(hf, "model.norm.weight")}
    # Tied: HF may or may not store lm_head; our state dict always names the shared tensor twice.
    out["lm_head.weight"] = out["embed_tokens.weight"] if tied else _take(hf, "lm_head.weight")
    for i in range(n_layers):
        for n in ATTENTION:
            out[f"layers.{i}.self_attn.{n}.weight"] = _take(hf, f"model.layers.{i}.self_attn.{n}.weight")
        for n in NORMS:
            out[f"layers.{i}.{n}.weight"] = _take(hf, f"model.layers.{i}.{n}.weight")
    return out


def _take(hf: Mapping[str, Tensor], key: str) -> Tensor:
    if key not in hf:
        raise CheckpointError(f"the Hugging Face checkpoint has no tensor '{key}'; it is not the architecture its config names.")
    return hf[key]


def _check_unused(hf: Mapping[str, Tensor], used: set[str], what: str) -> None:
    extra = sorted(k for k in hf if k not in used and not k.endswith("rotary_emb.inv_freq"))
    if extra:
        more = f" and {len(extra) - 3} more" if len(extra) > 3 else ""
        raise CheckpointError(
            f"the {what} checkpoint has tensors this adapter does not map ({', '.join(extra[:3])}{more}); "
            "it holds features modular cannot represent."
        )


def _router_buffers(i: int, num_experts: int, like: Tensor) -> dict[str, Tensor]:
    """The per-expert buffers of a top-k router (selection bias, logit offsets…), all zero: HF routers have
    none of them. Read off the class so a buffer added there is never forgotten here."""
    from modular.routing.topk import TopKRouter

    return {f"layers.{i}.mlp.router.{name}": like.new_zeros(num_experts) for name in TopKRouter.per_expert_buffers}


def _moe_routing_misfits(cfg, state_dict: Mapping[str, Tensor], n_layers: int) -> list[str]:
    from modular.routing import ROUTER_REGISTRY

    r = cfg.routing
    misfits = [f"{m} (HF MoE models route by top-k softmax)"
               for m in ROUTER_REGISTRY[r.type].softmax_top_k_misfits(r)]
    if r.capacity_factor is not None:
        misfits.append(f"routing.capacity_factor={r.capacity_factor} (HF MoE models are dropless)")
    counts, widths = set(), set()
    for i in range(n_layers):
        if not is_moe_layer(state_dict, i):
            continue
        classes = bank_classes(state_dict, i)
        bad = sorted({c.registry_name if c is not None else "unknown" for c in classes
                      if c is None or not c.expressible_as_swiglu()})
        if bad:
            misfits.append(f"layer {i} has {'/'.join(bad)} experts (HF MoE experts are SwiGLU)")
            continue
        misfits.extend(logit_offset_misfits(state_dict, i))
        gate, _, _, router = swiglu_experts(state_dict, i)
        counts.add(int(router.shape[0]))
        widths.add(int(gate.shape[1]))
        if int(router.shape[0]) < int(r.top_k):
            misfits.append(f"layer {i} has {int(router.shape[0])} routable experts, fewer than routing.top_k={r.top_k}")
    if len(counts) > 1:
        misfits.append(f"expert counts differ between layers ({sorted(counts)}; HF configs have one count)")
    if len(widths) > 1:
        misfits.append(f"expert widths differ between layers ({sorted(widths)})")
    return misfits


def _layer_shape(state_dict: Mapping[str, Tensor], n_layers: int) -> tuple[int, int]:
    """(experts per layer, expert width) of the first MoE layer."""
    for i in range(n_layers):
        if is_moe_layer(state_dict, i):
            gate, _, _, router = swiglu_experts(state_dict, i)
            return int(router.shape[0]), int(gate.shape[1])
    raise ConfigError("the model has no MoE layer; export it with format=llama-dense.")


# ---------------------------------------------------------------------------------------------
# Adapters


class StateDictAdapter:
    """One HF format. `misfits` lists what does not fit (empty = exportable losslessly)."""

    model_type = ""
    architecture = ""

    def misfits(self, state_dict: Mapping[str, Tensor], cfg) -> list[str]:
        raise NotImplementedError

    def hf_config(self, state_dict: Mapping[str, Tensor], cfg, special_ids: dict | None = None,
                  dtype: torch.dtype = torch.float32):
        raise NotImplementedError

    def to_hf(self, state_dict: Mapping[str, Tensor], cfg) -> dict[str, Tensor]:
        raise NotImplementedError

    def from_hf(self, hf_state_dict: Mapping[str, Tensor], hf_config) -> dict[str, Tensor]:
        raise NotImplementedError

    def check(self, state_dict: Mapping[str, Tensor], cfg) -> None:
        misfits = self.misfits(state_dict, cfg)
        if misfits:
            raise ConfigError(
                f"the model does not fit {self.architecture}: {'; '.join(misfits)}."
            )


class LlamaAdapter(StateDictAdapter):
    """Ours (every layer dense) ↔ HF Llama. FFNs narrower than the widest are zero-padded (exact)."""

    model_type = "llama"
    architecture = "LlamaForCausalLM"

    def misfits(self, state_dict, cfg) -> list[str]:
        n = int(cfg.model.n_layers)
        moe = [i for i in range(n) if is_moe_layer(state_dict, i)]
        return [f"layers {moe} are MoE layers (merge them first: export_dense)"] if moe else []

    def intermediate_size(self, state_dict, cfg) -> int:
        return max(int(dense_ffn(state_dict, i)[0].shape[0]) for i in range(int(cfg.model.n_layers)))

    def hf_config(self, state_dict, cfg, special_ids=None, dtype=torch.float32):
        from modular.export.hf_config import llama_config

        return llama_config(cfg, intermediate_size=self.intermediate_size(state_dict, cfg),
                            special_ids=special_ids, dtype=dtype)

    def to_hf(self, state_dict, cfg) -> dict[str, Tensor]:
        self.check(state_dict, cfg)
        n = int(cfg.model.n_layers)
        width = self.intermediate_size(state_dict, cfg)
        out = _backbone_to_hf(state_dict, n, bool(cfg.model.tie_embeddings))
        for i in range(n):
            gate, up, down = pad_swiglu(*dense_ffn(state_dict, i), width)
            out[f"model.layers.{i}.mlp.gate_proj.weight"] = gate
            out[f"model.layers.{i}.mlp.up_proj.weight"] = up
            out[f"model.layers.{i}.mlp.down_proj.weight"] = down
        return out

    def from_hf(self, hf_state_dict, hf_config) -> dict[str, Tensor]:
        n = int(_get(hf_config, "num_hidden_layers"))
        tied = bool(_get(hf_config, "tie_word_embeddings", False))
        out = _backbone_from_hf(hf_state_dict, n, tied)
        for i in range(n):
            for name in SWIGLU:
                out[f"layers.{i}.mlp.{name}.weight"] = _take(hf_state_dict, f"model.layers.{i}.mlp.{name}.weight")
        _check_unused(hf_state_dict, {_hf_name(k) for k in out} | {"lm_head.weight"}, "Llama")
        return out


def _hf_name(ours: str) -> str:
    return ours if ours == "lm_head.weight" else f"model.{ours}"


def pad_swiglu(gate: Tensor, up: Tensor, down: Tensor, width: int) -> tuple[Tensor, Tensor, Tensor]:
    """Widen a SwiGLU FFN to `width` hidden units with zeros: silu(0)·0 = 0 and zero down columns, so exact."""
    extra = width - gate.shape[0]
    if extra <= 0:
        return gate, up, down
    zeros_in = gate.new_zeros(extra, gate.shape[1])
    return (torch.cat([gate, zeros_in]), torch.cat([up, zeros_in]),
            torch.cat([down, down.new_zeros(down.shape[0], extra)], dim=1))


class MixtralAdapter(StateDictAdapter):
    """Ours (every layer MoE, softmax top-k renormalised, SwiGLU experts, no shared experts) ↔ HF Mixtral."""

    model_type = "mixtral"
    architecture = "MixtralForCausalLM"

    def misfits(self, state_dict, cfg) -> list[str]:
        n = int(cfg.model.n_layers)
        misfits = _moe_routing_misfits(cfg, state_dict, n)
        from modular.routing import ROUTER_REGISTRY

        if not ROUTER_REGISTRY[cfg.routing.type].weights_sum_to_one(cfg.routing):
            misfits.append("routing.normalize=false (Mixtral renormalises the top-k weights; Qwen2-MoE need not)")
        dense = [i for i in range(n) if not is_moe_layer(state_dict, i)]
        if dense:
            misfits.append(f"layers {dense} are dense (every Mixtral layer is an MoE)")
        shared = [i for i in range(n) if shared_expert(state_dict, i) is not None]
        if shared:
            misfits.append(f"layers {shared} have shared experts (Mixtral has none; Qwen2-MoE has one)")
        return misfits

    def hf_config(self, state_dict, cfg, special_ids=None, dtype=torch.float32):
        from modular.export.hf_config import mixtral_config

        experts, width = _layer_shape(state_dict, int(cfg.model.n_layers))
        return mixtral_config(cfg, num_experts=experts, ffn_dim=width, special_ids=special_ids, dtype=dtype)

    def to_hf(self, state_dict, cfg) -> dict[str, Tensor]:
        self.check(state_dict, cfg)
        n = int(cfg.model.n_layers)
        out = _backbone_to_hf(state_dict, n, bool(cfg.model.tie_embeddings))
        for i in range(n):
            gate, up, down, router = swiglu_experts(state_dict, i)
            p = f"model.layers.{i}.block_sparse_moe."
            out[p + "gate.weight"] = router
            for e in range(router.shape[0]):  # w1 = gate, w3 = up, w2 = down (Mistral's names)
                out[p + f"experts.{e}.w1.weight"] = gate[e]
                out[p + f"experts.{e}.w3.weight"] = up[e]
                out[p + f"experts.{e}.w2.weight"] = down[e]
        return out

    def from_hf(self, hf_state_dict, hf_config) -> dict[str, Tensor]:
        n = int(_get(hf_config, "num_hidden_layers"))
        E = int(_get(hf_config, "num_local_experts"))
        tied = bool(_get(hf_config, "tie_word_embeddings", False))
        out = _backbone_from_hf(hf_state_dict, n, tied)
        used = {_hf_name(k) for k in out} | {"lm_head.weight"}
        for i in range(n):
            fused = f"model.layers.{i}.mlp.experts.gate_up_proj"
            if fused in hf_state_dict:  # transformers 5 in memory: gate_up [E, 2F, D] = cat(gate, up), down [E, D, F]
                gate, up = _take(hf_state_dict, fused).chunk(2, dim=1)
                down = _take(hf_state_dict, f"model.layers.{i}.mlp.experts.down_proj")
                router = _take(hf_state_dict, f"model.layers.{i}.mlp.gate.weight")
                used |= {fused, f"model.layers.{i}.mlp.experts.down_proj", f"model.layers.{i}.mlp.gate.weight"}
            else:
                p = f"model.layers.{i}.block_sparse_moe."
                names = {w: [p + f"experts.{e}.{w}.weight" for e in range(E)] for w in ("w1", "w2", "w3")}
                gate = torch.stack([_take(hf_state_dict, k) for k in names["w1"]])
                up = torch.stack([_take(hf_state_dict, k) for k in names["w3"]])
                down = torch.stack([_take(hf_state_dict, k) for k in names["w2"]])
                router = _take(hf_state_dict, p + "gate.weight")
                used |= {k for keys in names.values() for k in keys} | {p + "gate.weight"}
            out.update(_moe_to_ours(i, gate, up, down, router))
        _check_unused(hf_state_dict, used, "Mixtral")
        return out


def _moe_to_ours(i: int, gate: Tensor, up: Tensor, down: Tensor, router: Tensor) -> dict[str, Tensor]:
    p = f"layers.{i}.mlp.banks.0."
    return {p + "w_gate": gate.contiguous(), p + "w_up": up.contiguous(), p + "w_down": down.contiguous(),
            p + "router_weight": router, **_router_buffers(i, int(router.shape[0]), router)}


class Qwen2MoeAdapter(StateDictAdapter):
    """Ours ↔ HF Qwen2-MoE: softmax top-k with or without renormalisation, dense layers, one shared expert.

    Qwen2-MoE gates its shared expert with sigmoid(w·x); ours has no gate. Exact mapping: w = 0 gives a
    constant sigmoid(0) = 0.5, and the shared expert's down_proj is doubled (both steps exact in floating
    point). A model without shared experts gets a width-1 all-zero shared expert, which adds exactly 0.
    Importing refuses a non-zero shared_expert_gate (a token-dependent gate modular cannot represent).
    """

    model_type = "qwen2_moe"
    architecture = "Qwen2MoeForCausalLM"
    placeholder_width = 1

    def misfits(self, state_dict, cfg) -> list[str]:
        n = int(cfg.model.n_layers)
        misfits = _moe_routing_misfits(cfg, state_dict, n)
        widths = {int(shared_expert(state_dict, i)[0].shape[0]) if shared_expert(state_dict, i) is not None else None
                  for i in range(n) if is_moe_layer(state_dict, i)}
        if len(widths) > 1:
            misfits.append(f"shared-expert widths differ between MoE layers ({sorted(widths, key=str)})")
        dense_widths = {int(dense_ffn(state_dict, i)[0].shape[0]) for i in range(n) if not is_moe_layer(state_dict, i)}
        if len(dense_widths) > 1:
            misfits.append(f"dense FFN widths differ between layers ({sorted(dense_widths)})")
        return misfits

    def _shapes(self, state_dict, cfg) -> dict:
        n = int(cfg.model.n_layers)
        experts, width = _layer_shape(state_dict, n)
        moe = [i for i in range(n) if is_moe_layer(state_dict, i)]
        dense = [i for i in range(n) if i not in moe]
        shared = shared_expert(state_dict, moe[0])
        return {
            "num_experts": experts, "ffn_dim": width, "dense_layers": dense,
            "shared_ffn_dim": int(shared[0].shape[0]) if shared is not None else self.placeholder_width,
            "dense_ffn_dim": int(dense_ffn(state_dict, dense[0])[0].shape[0]) if dense else int(cfg.model.ffn_dim),
        }

    def hf_config(self, state_dict, cfg, special_ids=None, dtype=torch.float32):
        from modular.export.hf_config import qwen2_moe_config

        return qwen2_moe_config(cfg, **self._shapes(state_dict, cfg), special_ids=special_ids, dtype=dtype)

    def to_hf(self, state_dict, cfg) -> dict[str, Tensor]:
        self.check(state_dict, cfg)
        n = int(cfg.model.n_layers)
        out = _backbone_to_hf(state_dict, n, bool(cfg.model.tie_embeddings))
        for i in range(n):
            p = f"model.layers.{i}.mlp."
            if not is_moe_layer(state_dict, i):
                for name, w in zip(SWIGLU, dense_ffn(state_dict, i)):
                    out[p + f"{name}.weight"] = w
                continue
            gate, up, down, router = swiglu_experts(state_dict, i)
            out[p + "gate.weight"] = router
            for e in range(router.shape[0]):
                out[p + f"experts.{e}.gate_proj.weight"] = gate[e]
                out[p + f"experts.{e}.up_proj.weight"] = up[e]
                out[p + f"experts.{e}.down_proj.weight"] = down[e]
            shared = shared_expert(state_dict, i)
            if shared is None:
                D = router.shape[1]
                w = self.placeholder_width
                shared = (router.new_zeros(w, D), router.new_zeros(w, D), router.new_zeros(D, w))
            s_gate, s_up, s_down = shared
            out[p + "shared_expert.gate_proj.weight"] = s_gate
            out[p + "shared_expert.up_proj.weight"] = s_up
            out[p + "shared_expert.down_proj.weight"] = s_down * 2  # undoes sigmoid(0) = 0.5
            out[p + "shared_expert_gate.weight"] = router.new_zeros(1, router.shape[1])
        return out

    def from_hf(self, hf_state_dict, hf_config) -> dict[str, Tensor]:
        n = int(_get(hf_config, "num_hidden_layers"))
        E = int(_get(hf_config, "num_experts"))
        tied = bool(_get(hf_config, "tie_word_embeddings", False))
        sparse_step = int(_get(hf_config, "decoder_sparse_step", 1))
        mlp_only = set(_get(hf_config, "mlp_only_layers", None) or [])
        out = _backbone_from_hf(hf_state_dict, n, tied)
        used = {_hf_name(k) for k in out} | {"lm_head.weight"}
        for i in range(n):
            p = f"model.layers.{i}.mlp."
            if i in mlp_only or E == 0 or (i + 1) % sparse_step != 0:  # Qwen2MoeDecoderLayer's rule
                for name in SWIGLU:
                    out[f"layers.{i}.mlp.{name}.weight"] = _take(hf_state_dict, p + f"{name}.weight")
                    used.add(p + f"{name}.weight")
                continue
            if p + "experts.gate_up_proj" in hf_state_dict:
                gate, up = _take(hf_state_dict, p + "experts.gate_up_proj").chunk(2, dim=1)
                down = _take(hf_state_dict, p + "experts.down_proj")
                used |= {p + "experts.gate_up_proj", p + "experts.down_proj"}
            else:
                names = {w: [p + f"experts.{e}.{w}.weight" for e in range(E)] for w in SWIGLU}
                gate, up, down = (torch.stack([_take(hf_state_dict, k) for k in names[w]]) for w in SWIGLU)
                used |= {k for keys in names.values() for k in keys}
            router = _take(hf_state_dict, p + "gate.weight")
            out.update(_moe_to_ours(i, gate, up, down, router))
            shared_gate = _take(hf_state_dict, p + "shared_expert_gate.weight")
            if bool(shared_gate.any()):
                raise CheckpointError(
                    f"layer {i} has a non-zero shared_expert_gate (a token-dependent sigmoid gate); modular's "
                    "shared experts are ungated, so only checkpoints with a zero gate can be imported."
                )
            s_gate, s_up, s_down = (_take(hf_state_dict, p + f"shared_expert.{n_}.weight") for n_ in SWIGLU)
            used |= {p + "gate.weight", p + "shared_expert_gate.weight"}
            used |= {p + f"shared_expert.{n_}.weight" for n_ in SWIGLU}
            if bool(s_down.any()):  # an all-zero shared expert is the placeholder for "no shared expert"
                q = f"layers.{i}.mlp.shared_experts.ffn."
                out[q + "gate_proj.weight"] = s_gate
                out[q + "up_proj.weight"] = s_up
                out[q + "down_proj.weight"] = s_down / 2
        _check_unused(hf_state_dict, used, "Qwen2-MoE")
        return out


ADAPTERS: dict[str, type[StateDictAdapter]] = {
    "llama": LlamaAdapter,
    "mixtral": MixtralAdapter,
    "qwen2_moe": Qwen2MoeAdapter,
}


def adapter_for(model_type: str) -> StateDictAdapter:
    if model_type not in ADAPTERS:
        raise ConfigError(f"model_type '{model_type}' has no adapter; supported: {', '.join(ADAPTERS)}.")
    return ADAPTERS[model_type]()
