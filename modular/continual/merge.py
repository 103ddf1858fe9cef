"""Expert-merging math: pure functions that fold a stack of expert weights [E, ...] into one [...].

Shared by the dense export (collapse an MoE layer into one FFN) and continual learning (merge experts to a budget).

Legend: E experts (the leading dimension of every stacked tensor), `...` the weight's own shape.
Averaging parameters is exact only when the experts are equal; it is a good approximation when they
stay close to a common base (sparse upcycling, low-rank experts), and meaningless for experts trained
from independent initialisations (their hidden units are permuted against each other). Sums of whole
FFNs, by contrast, are exact: see `concat_swiglu`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from modular.errors import ConfigError


def _as_weights(weights_E, num_experts: int, like: Tensor) -> Tensor:
    weights = torch.as_tensor(weights_E, dtype=torch.float64, device=like.device).reshape(-1)
    if weights.numel() != num_experts:
        raise ConfigError(f"merge weights have {weights.numel()} entries for {num_experts} experts; give one per expert.")
    if not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()):
        raise ConfigError(f"merge weights {weights.tolist()} are not allowed; they must be finite and >= 0.")
    return weights


def _check_stack(w_E: Tensor, name: str = "experts") -> None:
    if w_E.dim() < 1 or w_E.shape[0] < 1:
        raise ConfigError(f"{name} has shape {tuple(w_E.shape)}; it needs a leading expert dimension of size >= 1.")


def weighted_average(w_E: Tensor, weights_E) -> Tensor:
    """Σ_e a_e·w_e / Σ_e a_e, accumulated in float64; weights must be >= 0 with a positive sum."""
    _check_stack(w_E)
    a = _as_weights(weights_E, w_E.shape[0], w_E)
    total = float(a.sum())
    if total <= 0:
        raise ConfigError(f"merge weights {a.tolist()} sum to {total}; at least one weight must be > 0.")
    shape = (-1,) + (1,) * (w_E.dim() - 1)
    return ((w_E.double() * a.reshape(shape)).sum(0) / total).to(w_E.dtype)


def task_arithmetic(experts_E: Tensor, base: Tensor, scale: float) -> Tensor:
    """Task arithmetic (Ilharco et al., 2023): base + scale·Σ_e (expert_e − base)."""
    _check_stack(experts_E)
    _check_base(experts_E, base)
    tau = experts_E.double() - base.double()  # [E, ...] task vectors
    return (base.double() + float(scale) * tau.sum(0)).to(experts_E.dtype)


def trim_to_density(tau_E: Tensor, density: float) -> Tensor:
    """Keep the ⌈density·n⌉ largest-magnitude entries of each task vector (each e separately), zero the rest."""
    if not 0 < density <= 1:
        raise ConfigError(f"density={density} is not allowed; it must be in (0, 1].")
    flat = tau_E.reshape(tau_E.shape[0], -1)  # [E, n]
    n = flat.shape[1]
    keep = max(1, math.ceil(density * n))
    if keep >= n:
        return tau_E.clone()
    # topk, not a threshold: ties at the threshold must not keep more than `keep` entries.
    idx = flat.abs().topk(keep, dim=1).indices
    mask = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, idx, True)
    return (flat * mask).reshape(tau_E.shape)


def elect_sign(tau_E: Tensor) -> Tensor:
    """Per entry, the sign with the larger total magnitude over experts: sign(Σ_e τ_e), with 0 counted as +."""
    return torch.where(tau_E.sum(0) >= 0, 1.0, -1.0).to(tau_E.dtype)


def disjoint_mean(tau_E: Tensor, sign: Tensor) -> Tensor:
    """Per entry, the mean over the experts whose (non-zero) value agrees with the elected sign; 0 if none."""
    agree = (torch.sign(tau_E) == sign.unsqueeze(0)) & (tau_E != 0)  # [E, ...]
    count = agree.sum(0)
    total = (tau_E * agree).sum(0)
    return torch.where(count > 0, total / count.clamp_min(1), torch.zeros_like(total))


def ties(experts_E: Tensor, base: Tensor, density: float = 0.2, scale: float = 1.0) -> Tensor:
    """TIES-merging (Yadav et al., 2023): trim each task vector to `density`, elect signs, disjoint mean.

    Returns base + scale·merged task vector. density=0.2 and scale=1.0 are the paper's defaults.
    """
    _check_stack(experts_E)
    _check_base(experts_E, base)
    tau = trim_to_density(experts_E.double() - base.double(), density)  # [E, ...]
    merged = disjoint_mean(tau, elect_sign(tau))
    return (base.double() + float(scale) * merged).to(experts_E.dtype)


def _check_base(experts_E: Tensor, base: Tensor) -> None:
    if tuple(base.shape) != tuple(experts_E.shape[1:]):
        raise ConfigError(
            f"the merge base has shape {tuple(base.shape)} but each expert has shape {tuple(experts_E.shape[1:])}; "
            "they must match."
        )


def concat_swiglu(gate_EFD: Tensor, up_EFD: Tensor, down_EDF: Tensor, weights_E) -> tuple[Tensor, Tensor, Tensor]:
    """Σ_e a_e·FFN_e(x) as ONE SwiGLU FFN of width E·F: exact, because hidden units are independent.

    gate/up [E, F, D] → [E·F, D]; down [E, D, F] → [D, E·F] with expert e's columns scaled by a_e.
    """
    _check_stack(gate_EFD, "gate")
    E, F, D = gate_EFD.shape
    a = _as_weights(weights_E, E, gate_EFD).to(down_EDF.dtype)
    gate = gate_EFD.reshape(E * F, D)
    up = up_EFD.reshape(E * F, D)
    down = (down_EDF * a.reshape(E, 1, 1)).permute(1, 0, 2).reshape(D, E * F)  # [D, E, F] → [D, E·F]
    return gate, up, down
