"""`all_to_all_single` with uneven splits inside autograd: rows go out forward, gradients come back.

The backward is the same collective with the splits swapped. It always runs on every rank that ran
the forward with grad enabled, even when its own rows are zero, so no rank waits on another.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_ND: Tensor, out_splits: list[int], in_splits: list[int], group) -> Tensor:
        ctx.splits = (out_splits, in_splits)
        ctx.group = group
        out = x_ND.new_empty((sum(out_splits),) + tuple(x_ND.shape[1:]))
        dist.all_to_all_single(out, x_ND.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad_MD: Tensor):
        out_splits, in_splits = ctx.splits
        grad_in = grad_MD.new_empty((sum(in_splits),) + tuple(grad_MD.shape[1:]))
        dist.all_to_all_single(grad_in, grad_MD.contiguous(), in_splits, out_splits, group=ctx.group)
        return grad_in, None, None, None


def all_to_all(x_ND: Tensor, out_splits: list[int], in_splits: list[int], group=None) -> Tensor:
    """Send x's rows in chunks of `in_splits` (one per rank of `group`), receive `out_splits` rows back.

    x [N, ...] with N = sum(in_splits) → [M, ...] with M = sum(out_splits), ordered by source rank.
    """
    return _AllToAll.apply(x_ND, list(out_splits), list(in_splits), group)


def exchange_counts(send_counts: Tensor, group=None) -> Tensor:
    """Equal-sized all-to-all of a count vector [P·L] (L per destination rank) → what every rank sends me."""
    recv = torch.empty_like(send_counts)
    dist.all_to_all_single(recv, send_counts.contiguous(), group=group)
    return recv
