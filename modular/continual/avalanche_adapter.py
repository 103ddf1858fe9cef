"""Avalanche baselines (EWC, LwF, Replay) applied to our language models through an adapter.

Avalanche's strategies classify: a model maps x [N, ...] to logits [N, C] and a criterion compares them
with labels y [N]. A language model maps inputs [B, T] to logits [B, T, V]; the adapter flattens the
B·T next-token predictions into rows, so each token is one "sample" and the vocabulary the class set.

    stage s ─► the strategy's attach: EWC penalty / LwF distillation as a Trainer loss hook, or a replay loader
            ─► trainer.fit()
            ─► its after_training: EWC importances + snapshot / LwF teacher / replay buffer update, written to
               run_dir/avalanche/{ewc,lwf,replay}_stageNN.safetensors (atomic; safetensors only, never pickle)

The strategies themselves are modular/continual/strategies/{ewc,lwf,avalanche_replay}.py.

A resumed run reads what earlier stages wrote; nothing lives only in memory between stages.
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from modular.atomic import atomic_open
from modular.data.loader import Batch
from modular.errors import CheckpointError, ConfigError

FISHER_BATCHES = 16  # EWC: importances from at most this many of the stage's training batches
REPLAY_SHARE = 0.5  # avalanche_replay without continual.replay: Avalanche's memory batch = the data batch
_REPLAY_SALT = 0xA7A1  # keeps the replay wrapper's random stream apart from the loader's


def require_avalanche(strategy: str) -> None:
    if importlib.util.find_spec("avalanche") is None:
        raise ConfigError(
            f"continual.strategy={strategy} uses avalanche-lib, which is not installed; "
            'install it with: pip install "modular-moe[avalanche]".'
        )


def validate_avalanche(cfg) -> None:
    """The knobs of the ewc / lwf / avalanche_replay baselines; one sentence each."""
    c = cfg.continual
    require_avalanche(c.strategy)
    checks = [("ewc_lambda", c.ewc_lambda, c.ewc_lambda >= 0, ">= 0"),
              ("lwf_alpha", c.lwf_alpha, c.lwf_alpha >= 0, ">= 0"),
              ("lwf_temperature", c.lwf_temperature, c.lwf_temperature > 0, "> 0"),
              ("avalanche_mem_size", c.avalanche_mem_size, c.avalanche_mem_size >= 1, ">= 1")]
    for key, value, ok, allowed in checks:
        if not ok:
            raise ConfigError(f"continual.{key}={value} is not allowed with strategy {c.strategy}; it must be {allowed}.")


# -- per-stage files and the replay strategy's stage steps ---------------------------------------


def stage_file(run_dir, kind: str, stage: int) -> Path:
    """Where a strategy keeps what stage `stage` leaves for the next ones (kind: ewc, lwf, replay)."""
    return Path(run_dir) / "avalanche" / f"{kind}_stage{stage:02d}.safetensors"


def stage_meta(c, stage: int) -> dict:
    return {"stage": str(stage), "domain": c.stream[stage]}


def save_lwf_teacher(run_dir, model, stage: int, meta: dict) -> None:
    """The model after stage `stage`: the next stage's LwF teacher (the one before it is no longer needed)."""
    from modular.train.checkpoint import unique_state_dict

    _save_tensors(stage_file(run_dir, "lwf", stage), unique_state_dict(model), meta)
    old = stage_file(run_dir, "lwf", stage - 2)  # stage + 1 needs only this stage's model; a rerun of it the one before
    if stage >= 2 and old.exists():
        old.unlink()


def attach_replay_loader(run_dir, cfg, stage: int, trainer) -> None:
    """Wrap the stage's loader so a share of every batch comes from the buffer saved after stage - 1."""
    c = cfg.continual
    buffer = load_replay_buffer(stage_file(run_dir, "replay", stage - 1), c.avalanche_mem_size)
    windows, domain_idx = buffer_windows(buffer)
    if windows.shape[1] != cfg.train.seq_len + 1:
        raise ConfigError(f"the replay buffer holds windows of {windows.shape[1] - 1} tokens but "
                          f"train.seq_len={cfg.train.seq_len}; resume with the run's seq_len.")
    loader = ReplayLoader(trainer.loader, windows, [c.stream[i] for i in domain_idx.tolist()],
                          share=c.replay if c.replay > 0 else REPLAY_SHARE, seed=[cfg.seed, stage])
    # Trainer.resume() gave the saved state to the inner loader already (the wrapper's state is a superset);
    # loading it once more into the wrapper checks that the buffer is the one the stage started with.
    from modular.train import checkpoint as ckpt

    last = ckpt.latest_checkpoint(trainer.run_dir)
    if last is not None:
        loader.load_state_dict(ckpt.read_trainer_state(last)["loader"])
    trainer.loader = loader


def update_stage_buffer(run_dir, cfg, stage: int, trainer) -> None:
    """Add the windows stage `stage` trained on to the buffer and save it (idempotent: a rerun rewrites it)."""
    c = cfg.continual
    buffer = (load_replay_buffer(stage_file(run_dir, "replay", stage - 1), c.avalanche_mem_size) if stage > 0
              else new_replay_buffer(c.avalanche_mem_size))
    inner = trainer.loader.loader if isinstance(trainer.loader, ReplayLoader) else trainer.loader
    # A stage that trained no steps offers the windows it would have drawn, enough to fill the memory.
    steps = inner.step or -(-c.avalanche_mem_size // inner.batch_size)
    update_replay_buffer(buffer, StageWindows(inner, steps, stage), seed=cfg.seed * 1000 + stage)
    save_replay_buffer(stage_file(run_dir, "replay", stage), buffer, stage_meta(c, stage))


# -- EWC ----------------------------------------------------------------------------------------


def lm_criterion(out, y: torch.Tensor) -> torch.Tensor:
    """Avalanche's criterion(model(x), y) for an LM: token cross-entropy over the flattened [B·T, V] logits."""
    return F.cross_entropy(out.logits.float().flatten(0, 1), y.flatten())


def _strategy_view(model, device, **fields) -> SimpleNamespace:
    """The few attributes of an Avalanche strategy that its plugins read (no training loop behind it)."""
    return SimpleNamespace(model=model, device=device, _criterion=lm_criterion, **fields)


def _windows_dataset(windows: torch.Tensor):
    """[N, T + 1] token windows as Avalanche's (x, y) samples: inputs and next-token targets."""
    from avalanche.benchmarks.utils import AvalancheDataset

    return AvalancheDataset([torch.utils.data.TensorDataset(windows[:, :-1], windows[:, 1:])])


def compute_ewc_state(model, windows: torch.Tensor, batch_size: int, device, optimizer=None, stage: int = 0):
    """EWCPlugin.after_training_exp on the stage's windows: ({name: importance}, {name: parameter snapshot}).

    Avalanche's importance is the squared gradient of each mini-batch's mean loss, averaged over the
    mini-batches (an empirical-Fisher approximation); here the loss is the token cross-entropy.
    """
    from avalanche.training.plugins import EWCPlugin

    plugin = EWCPlugin(ewc_lambda=1.0, mode="separate")
    optimizer = optimizer or torch.optim.SGD(model.parameters(), lr=0.0)  # only its zero_grad() is used
    view = _strategy_view(model, device, optimizer=optimizer, train_mb_size=batch_size,
                          experience=SimpleNamespace(dataset=_windows_dataset(windows)),
                          clock=SimpleNamespace(train_exp_counter=stage))
    was_training = model.training
    plugin.after_training_exp(view)
    model.zero_grad(set_to_none=True)  # the last mini-batch's gradients must not leak into the next step
    model.train(was_training)
    importances = {k: v.data.detach().cpu() for k, v in plugin.importances[stage].items()}
    params = {k: v.data.detach().cpu() for k, v in plugin.saved_params[stage].items()}
    return importances, params


def ewc_hook(model, stages: list[tuple[dict, dict]], ewc_lambda: float, device):
    """Loss hook λ/2 · Σ_stages Σ_i F_i (θ_i − θ*_i)² computed by Avalanche's EWCPlugin ("separate" mode).

    `ewc_lambda` follows Kirkpatrick et al. (the ½ included); Avalanche's penalty is λ·Σ F Δ², so the plugin
    gets λ/2 and EWCPlugin(ewc_lambda=x) in Avalanche equals continual.ewc_lambda=2x here.
    """
    from avalanche.training.plugins import EWCPlugin
    from avalanche.training.utils import ParamData

    plugin = EWCPlugin(ewc_lambda=ewc_lambda / 2, mode="separate")
    for k, (importances, params) in enumerate(stages):
        plugin.importances[k] = {n: ParamData(f"imp_{n}", init_tensor=t.to(device), device=device)
                                 for n, t in importances.items()}
        plugin.saved_params[k] = {n: ParamData(n, init_tensor=t.to(device), device=device) for n, t in params.items()}
    view = _strategy_view(model, device, clock=SimpleNamespace(train_exp_counter=len(stages)))

    def hook(batch, out):
        view.loss = 0.0
        plugin.before_backward(view)  # adds ewc_lambda * penalty to view.loss
        return view.loss

    return hook


def save_ewc_state(path: Path, importances: dict, params: dict, meta: dict) -> None:
    tensors = {**{f"importance.{k}": v for k, v in importances.items()}, **{f"param.{k}": v for k, v in params.items()}}
    _save_tensors(path, tensors, meta)


def load_ewc_state(path: Path, model, device) -> tuple[dict, dict]:
    tensors = _load_tensors(path, "EWC importances")
    importances = {k[len("importance."):]: v for k, v in tensors.items() if k.startswith("importance.")}
    params = {k[len("param."):]: v for k, v in tensors.items() if k.startswith("param.")}
    for name, p in model.named_parameters():
        if name in params and params[name].shape != p.shape:
            raise CheckpointError(f"{path} holds {name} with shape {tuple(params[name].shape)} but the model's is "
                                  f"{tuple(p.shape)}; it belongs to another model.")
    return importances, params


# -- LwF ----------------------------------------------------------------------------------------


class _TokenRows(nn.Module):
    """The teacher as Avalanche's LwF calls it: inputs [B, T] -> logits as rows [B·T, V] (float32)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x).logits.float().flatten(0, 1)


def lwf_hook(teacher, alpha: float, temperature: float, stage: int = 1):
    """Loss hook α · KL(teacher_T ‖ student_T), averaged over tokens, by Avalanche's LearningWithoutForgetting.

    Its post_adapt() reads classification labels from the experience to find the "seen classes"; for an LM
    every vocabulary entry is a seen class, so the adapter sets the teacher and the class set directly.
    No T² factor: Avalanche's LwF has none (modular's continual.distill_weight hook has it).
    """
    from avalanche.training.regularization import LearningWithoutForgetting

    for p in teacher.parameters():
        p.requires_grad_(False)
    lwf = LearningWithoutForgetting(alpha=alpha, temperature=temperature)
    lwf.prev_model = _TokenRows(teacher.eval())
    lwf.prev_classes_by_task[0] = set(range(teacher.vocab_size))
    lwf.expcount = stage

    def hook(batch, out):
        return lwf(batch.inputs, out.logits.float().flatten(0, 1), None)  # model is unused without task heads

    return hook


def load_teacher(teacher, path: Path) -> None:
    tensors = _load_tensors(path, "LwF teacher")
    from modular.train.checkpoint import unique_state_dict

    expected = unique_state_dict(teacher)
    if set(tensors) != set(expected) or any(tensors[k].shape != expected[k].shape for k in expected):
        raise CheckpointError(f"{path} does not fit this model; the LwF teacher belongs to another model.")
    teacher.load_state_dict(tensors, strict=False)


# -- Replay -------------------------------------------------------------------------------------


class StageWindows(torch.utils.data.Dataset):
    """The windows a MixtureLoader drew in its first `steps` batches, built on demand: (window [T + 1], domain)."""

    def __init__(self, loader, steps: int, domain_index: int):
        self.loader, self.steps, self.domain_index = loader, steps, domain_index

    def __len__(self) -> int:
        return self.steps * self.loader.batch_size

    def __getitem__(self, i: int):
        step, row = divmod(int(i), self.loader.batch_size)
        return self.loader.batch_at(step).tokens[row], torch.tensor(self.domain_index)


def stage_windows(loader, max_batches: int) -> torch.Tensor:
    """[N, T + 1] the windows of the first (at most) `max_batches` batches the stage's loader drew."""
    inner = loader.loader if isinstance(loader, ReplayLoader) else loader
    # A stage that trained no steps (the initial model already knew its domain): the batches it would have drawn.
    return torch.cat([inner.batch_at(k).tokens for k in range(min(inner.step, max_batches) or max_batches)])


def new_replay_buffer(mem_size: int):
    """Avalanche ReplayPlugin's default storage: reservoir sampling, memory split equally over experiences."""
    from avalanche.training.storage_policy import ExperienceBalancedBuffer

    return ExperienceBalancedBuffer(max_size=mem_size, adaptive_size=True)


def update_replay_buffer(buffer, windows: torch.utils.data.Dataset, seed: int) -> None:
    """buffer.post_adapt on one experience, then keep only the chosen windows (as tensors, not lazy views)."""
    from avalanche.benchmarks.utils import AvalancheDataset

    with torch.random.fork_rng(devices=[]):  # reservoir weights come from torch.rand: seed it, leave training's RNG
        torch.manual_seed(seed)
        buffer.post_adapt(None, SimpleNamespace(dataset=AvalancheDataset([windows])))
    for group in buffer.buffer_groups.values():
        tokens, domains = _stack(group.buffer)
        group.buffer = AvalancheDataset([torch.utils.data.TensorDataset(tokens, domains)])


def _stack(dataset) -> tuple[torch.Tensor, torch.Tensor]:
    items = [dataset[i] for i in range(len(dataset))]
    if not items:
        return torch.zeros(0, 0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)
    return torch.stack([w for w, _ in items]), torch.stack([torch.as_tensor(d) for _, d in items]).long()


def buffer_windows(buffer) -> tuple[torch.Tensor, torch.Tensor]:
    """All windows of the buffer: tokens [M, T + 1] and the stream index of each one's domain [M]."""
    return _stack(buffer.buffer)


def save_replay_buffer(path: Path, buffer, meta: dict) -> None:
    tensors = {}
    for g, group in buffer.buffer_groups.items():
        tensors[f"group{g}.tokens"], tensors[f"group{g}.domains"] = _stack(group.buffer)
        tensors[f"group{g}.weights"] = group._buffer_weights.clone()  # reservoir keys: the next update needs them
    _save_tensors(path, tensors, {**meta, "experiences": str(buffer._num_exps)})


def load_replay_buffer(path: Path, mem_size: int):
    from avalanche.benchmarks.utils import AvalancheDataset
    from avalanche.training.storage_policy import ReservoirSamplingBuffer
    from safetensors import safe_open

    tensors = _load_tensors(path, "replay buffer")
    with safe_open(str(path), "pt") as f:
        experiences = int(f.metadata()["experiences"])
    buffer = new_replay_buffer(mem_size)
    buffer._num_exps = experiences
    for g, size in enumerate(buffer.get_group_lengths(experiences)):
        group = ReservoirSamplingBuffer(size)
        tokens, domains = tensors[f"group{g}.tokens"][:size], tensors[f"group{g}.domains"][:size]
        group.buffer = AvalancheDataset([torch.utils.data.TensorDataset(tokens, domains)])
        group._buffer_weights = tensors[f"group{g}.weights"][:size]
        buffer.buffer_groups[g] = group
    return buffer


class ReplayLoader:
    """A loader whose batches replace a `share` of rows with windows drawn uniformly from the replay buffer.

    Avalanche's ReplayDataLoader appends a memory batch to each data batch; here the batch keeps its size
    (same compute per step as the other baselines) and the last n rows come from the buffer, with
    n = ⌊share·B⌋ plus one with probability frac(share·B). Batch k depends only on (seed, k) and the inner
    loader's batch k, so the state is the inner loader's plus a check of the buffer.
    """

    def __init__(self, loader, windows: torch.Tensor, window_domains: list[str], share: float, seed: list[int]):
        if len(windows) == 0:
            raise ConfigError("the replay buffer is empty; continual.avalanche_mem_size must be >= 1.")
        self.loader, self.windows, self.share, self.seed = loader, windows, float(share), list(seed)
        self.domain_names = tuple(loader.domain_names) + tuple(
            sorted(set(window_domains) - set(loader.domain_names), key=window_domains.index))
        self.window_domain_ids = torch.tensor([self.domain_names.index(d) for d in window_domains])
        self.digest = hashlib.sha256(windows.numpy().tobytes()).hexdigest()[:16]

    @property
    def step(self) -> int:
        return self.loader.step

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        k = self.loader.step
        batch = next(self.loader)
        rng = np.random.default_rng([_REPLAY_SALT, *self.seed, k])
        B = batch.tokens.shape[0]
        n = int(self.share * B)
        n += int(rng.random() < self.share * B - n)
        picks = torch.from_numpy(rng.integers(0, len(self.windows), size=n))
        tokens, domain_ids = batch.tokens.clone(), batch.domain_ids.clone()  # inner ids index the same leading names
        if n:
            tokens[B - n:] = self.windows[picks]
            domain_ids[B - n:] = self.window_domain_ids[picks]
        return Batch(tokens, domain_ids, self.domain_names)

    def state_dict(self) -> dict:
        return {**self.loader.state_dict(), "replay": self._replay_state()}

    def load_state_dict(self, state, strict: bool = True) -> None:
        self.loader.load_state_dict(state, strict=strict)
        if strict and state.get("replay") != self._replay_state():
            raise CheckpointError(f"the saved replay loader has {state.get('replay')!r} but this one has "
                                  f"{self._replay_state()!r}; resume with the same replay buffer and share.")

    def _replay_state(self) -> dict:
        return {"share": self.share, "windows": len(self.windows), "digest": self.digest}


# -- files --------------------------------------------------------------------------------------


def _save_tensors(path: Path, tensors: dict, meta: dict) -> None:
    from safetensors.torch import save

    data = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=meta)
    with atomic_open(path, "wb") as f:
        f.write(data)


def _load_tensors(path: Path, what: str) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.exists():
        raise CheckpointError(f"the {what} saved after an earlier stage is missing ({path}); the run cannot "
                              "go on with this strategy without it.")
    try:
        return load_file(path)
    except (OSError, SafetensorError) as exc:  # a truncated or foreign file: say which, never a traceback
        raise CheckpointError(f"{path} cannot be read as safetensors ({type(exc).__name__}); it is corrupt.") from None
