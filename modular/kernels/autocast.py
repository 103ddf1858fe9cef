"""Autocast for the expert kernels: inside `torch.autocast` their float inputs go to the autocast dtype.
Custom ops and autograd Functions are opaque to autocast, which would leave the experts in fp32 beside bf16 layers.
"""

from __future__ import annotations

import torch
from torch import Tensor


def autocast_inputs(device_type: str, *tensors):
    """A tuple of the tensors (or lists of tensors) cast to the autocast dtype of `device_type` when autocast is on
    there and the tensor is floating point; unchanged otherwise. The casts are differentiable, so
    gradients reach the fp32 parameters in fp32, as they do through an autocast nn.Linear."""
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)

    def cast(t):
        if isinstance(t, (list, tuple)):
            return [cast(u) for u in t]
        if isinstance(t, Tensor) and t.is_floating_point() and t.dtype != dtype:
            return t.to(dtype)
        return t

    return tuple(cast(t) for t in tensors)
