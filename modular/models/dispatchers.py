"""Dispatchers: how an MoE layer's routed rows reach their experts and come back, chosen once per layer.

A dispatcher takes the layer's tokens x [T, D] and the router's assignments and returns y [T, D] =
Σ over each token's assignments of weight · expert(x). One process has three: the generic one
(gather rows by expert → every bank's grouped matmuls → weighted scatter back), and two fused SwiGLU
steps (torch on the CPU, Triton on CUDA) for layers whose banks are all plain SwiGLU experts. Expert
parallelism adds the all-to-all dispatcher (modular.parallel.expert_parallel). The reducer is the
other half of a layer's placement: it makes statistics and batch-wide routing see the global batch
(identity here, all-reduce under torchrun).
"""

from __future__ import annotations

import torch
from torch import Tensor

from modular.kernels import combine, permute, sort_by_expert
from modular.kernels.torch_gmm import can_fuse_swiglu_moe, torch_swiglu_moe
from modular.routing.base import RouterOutput
from modular.routing.losses import assignment_counts


class Dispatcher:
    """y [T, D] from x [T, D] and assignments; `layer.run_experts` computes sorted rows bank by bank."""

    def __call__(self, layer, x_TD: Tensor, routed: RouterOutput) -> Tensor:
        raise NotImplementedError


class LocalDispatcher(Dispatcher):
    """Any banks: permute rows into per-expert segments, run the banks, combine with the routing weights."""

    def __call__(self, layer, x_TD: Tensor, routed: RouterOutput) -> Tensor:
        x_sorted, token_sorted, order, counts = permute(x_TD, routed.token_idx, routed.expert_idx, layer.num_experts)
        y_sorted = layer.run_experts(x_sorted, counts)
        return combine(y_sorted, token_sorted, routed.weight[order], x_TD.shape[0])


class FusedTorchSwiGLU(Dispatcher):
    """SwiGLU banks on the torch backend on the CPU: gather, experts and combine as one autograd Function
    that streams expert by expert (kernels/torch_gmm.py). On a GPU (where that stream's per-expert
    launches and host reads of the counts cost more than they save) and for dtypes other than the
    weights' it falls back to the generic path, whose grouped matmuls are torch._grouped_mm there."""

    def __init__(self):
        self.fallback = LocalDispatcher()

    def __call__(self, layer, x_TD: Tensor, routed: RouterOutput) -> Tensor:
        if x_TD.is_cuda:
            return self.fallback(layer, x_TD, routed)
        w_gate, w_up, w_down = layer.stacked_swiglu_weights()
        if not can_fuse_swiglu_moe(x_TD, w_gate, w_down):
            return self.fallback(layer, x_TD, routed)
        token_sorted, order, counts = sort_by_expert(routed.token_idx, routed.expert_idx, layer.num_experts)
        return torch_swiglu_moe(x_TD, w_gate, w_up, w_down, counts, token_sorted, routed.weight[order])


class FusedTritonSwiGLU(Dispatcher):
    """SwiGLU banks on Triton: gather and scatter fused into the expert GEMMs, one launch per projection
    over every bank (kernels/triton_swiglu.py), with no host sync."""

    def __call__(self, layer, x_TD: Tensor, routed: RouterOutput) -> Tensor:
        from modular.kernels.triton_swiglu import triton_swiglu_moe

        order = torch.argsort(routed.expert_idx, stable=True)
        counts = assignment_counts(routed.expert_idx, layer.num_experts)
        weights = [bank.swiglu_parameters() for bank in layer.banks]
        w_gate, w_up, w_down = ([w[j] for w in weights] for j in range(3))
        return triton_swiglu_moe(x_TD, w_gate, w_up, w_down, counts, routed.token_idx[order], order,
                                 routed.weight[order], routed.token_idx)


def local_dispatcher(backend: str, banks) -> Dispatcher:
    """The one-process dispatcher for a layer's banks on a kernel backend."""
    plain_swiglu = all(bank.swiglu_parameters() is not None for bank in banks)
    if plain_swiglu and backend == "triton":
        return FusedTritonSwiGLU()
    if plain_swiglu and backend == "torch":
        return FusedTorchSwiGLU()
    return LocalDispatcher()


class LocalReducer:
    """One process: the batch is the global batch; nothing to gather or sum."""

    world_size = 1

    def gather_rows(self, t: Tensor) -> tuple[Tensor, int]:
        """All ranks' rows of `t` and where this rank's start: here `t` itself at 0."""
        return t, 0

    def sum(self, t: Tensor) -> Tensor:
        return t
