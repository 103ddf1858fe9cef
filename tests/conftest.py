"""Test setup: Triton's interpreter when there is no GPU, wandb offline, small thread counts."""

import os

import torch

if not torch.cuda.is_available():
    # Must be set before any @triton.jit function is defined, i.e. before modular.kernels.triton_* imports.
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("WANDB_MODE", "offline")
if "MODULAR_CACHE" not in os.environ:
    # Token shards built by tests go to a throwaway cache, not the user's ~/.cache/modular.
    import tempfile

    os.environ["MODULAR_CACHE"] = tempfile.mkdtemp(prefix="modular-test-cache-")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
