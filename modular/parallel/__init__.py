"""Expert and data parallelism on torch.distributed: a (dp, ep) mesh from torchrun's environment,
experts sharded over EP ranks with all-to-all dispatch, DDP for everything else, gather-on-save.

Modules: config (ParallelConfig), mesh (ParallelContext, init_parallel, current), all_to_all (the
autograd collective), expert_parallel (sharding banks, the distributed MoE forward), data_parallel
(DDP, expert-gradient reduction, global-norm clipping), checkpoint (gather-on-save, slice-on-load),
optimizer_state (the Adam moments of expert slices, made whole for lifecycle operations), cost_model
(the all-to-all and expert-GEMM model of docs/scaling.md). Nothing here runs unless a run is launched
with more than one process; the single-process path never touches it.
"""

from modular.parallel.config import ParallelConfig

__all__ = ["ParallelConfig", "current", "init_parallel"]


def __getattr__(name):  # keep `import modular.parallel` light: modular.config imports this package
    if name in ("current", "init_parallel"):
        from modular.parallel import mesh

        return getattr(mesh, name)
    raise AttributeError(name)
