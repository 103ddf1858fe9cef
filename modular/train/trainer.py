"""The training loop: batches from the domain mixture, AdamW with a schedule, evaluation, checkpoints.

`Trainer` owns one run folder. It resumes from the folder's latest checkpoint by itself, and a resumed
run continues exactly (on the CPU the losses equal an uninterrupted run's bit for bit): weights,
optimizer moments, schedule position, data position and every RNG state come back. SIGINT/SIGTERM
finish the current step, save a checkpoint and return.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import time
from pathlib import Path

import torch

from modular.errors import UserError
from modular.models.structure import model_structure
from modular.parallel import data_parallel
from modular.parallel.expert_parallel import parallelize_moe_layers
from modular.parallel.mesh import current as current_parallel
from modular.run.checkpointer import checkpointer_for
from modular.run.setup import autocast_for, resolve_device
from modular.train import checkpoint as ckpt
from modular.train.evaluate import evaluate
from modular.train.loggers import JsonlLogger, Loggers, TensorBoardLogger, WandbLogger
from modular.train.optimizer import build_optimizer
from modular.train.schedule import schedule_from_config


class TrainingError(UserError):
    """Training cannot go on (e.g. the loss stayed non-finite); exit code 1."""

    exit_code = 1


class _StopRequest:
    """Turns SIGINT/SIGTERM into a flag the loop checks between steps."""

    def __init__(self):
        self.signal: int | None = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread: no signal handling
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signal = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


class Trainer:
    """Train `model` on `loader` (a MixtureLoader), evaluating on `val_sets` ({domain: ValidationSet})."""

    def __init__(self, cfg, run_dir: str | Path, model, loader, val_sets: dict, *, config_record: dict | None = None,
                 log_prefix: dict | None = None, parallel=None):
        self.cfg = cfg
        self.tcfg = cfg.train
        self.run_dir = Path(run_dir)
        self.model = model
        self.loader = loader
        self.val_sets = val_sets
        self.config_record = config_record or {}
        self.log_prefix = log_prefix or {}
        # modular.parallel's ParallelContext under torchrun (default: the one set up in this process), else None.
        self.parallel = parallel if parallel is not None else current_parallel()
        if self.parallel is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise UserError(  # each process would train alone and write the same run folder
                f"This process is one of WORLD_SIZE={os.environ['WORLD_SIZE']} started by torchrun, but its command "
                "did not set up modular.parallel (init_parallel); run it as one process or use `modular train`."
            )
        self.checkpointer = checkpointer_for(self.parallel)  # one process, or gathered on save under torchrun
        self.device = resolve_device(self.tcfg.device)
        self.autocast = autocast_for(self.tcfg.dtype, self.device)
        self.model.to(self.device)
        from modular.kernels import resolve_backend

        self.model.set_backend(resolve_backend(cfg.kernels.backend, self.device))
        if self.parallel is not None:
            parallelize_moe_layers(self.model, self.parallel)  # each EP rank keeps its share of the experts
        self.forward_model = self._forward_model()
        self.optimizer = build_optimizer(self.model, self.tcfg)
        self.lr_at = schedule_from_config(self.tcfg)
        self.step = 0
        self.tokens = 0
        self.skipped_steps = 0
        self.last_eval: dict | None = None
        self.stopped_by_signal: int | None = None
        self.loss_hooks: list = []  # callables (batch, output) -> extra loss added to the step's loss

    def _forward_model(self):
        """What the loop calls: the model, inside DDP under data parallelism, compiled if asked."""
        model = self.model if self.parallel is None else data_parallel.wrap_data_parallel(self.model, self.parallel)
        return torch.compile(model) if self.tcfg.compile else model

    # -- state ----------------------------------------------------------------------------------
    def trainer_state(self) -> dict:
        return {"tokens": self.tokens, "skipped_steps": self.skipped_steps, "loader": self.loader.state_dict(),
                "structure": model_structure(self.model), "last_eval": self.last_eval}

    def save(self) -> Path:
        return self.checkpointer.save(self.run_dir, self.step, self.model, self.optimizer, self.trainer_state(),
                                      self.config_record, keep=self.tcfg.keep_checkpoints)

    def resume(self, checkpoint: Path | None = None) -> bool:
        """Continue from `checkpoint` (verified), else from the run folder's latest checkpoint, if it has one."""
        folder = checkpoint or ckpt.find_resume_checkpoint(self.run_dir, how_to_go_back=None)
        if folder is None:
            return False
        state = self.checkpointer.restore(self.model, folder, self.device)
        self.forward_model = self._forward_model()  # DDP and compile follow the (possibly new) parameters
        self.optimizer = build_optimizer(self.model, self.tcfg)  # the structure may have changed the parameters
        self.checkpointer.restore_optimizer(self.optimizer, self.model, folder)
        self.loader.load_state_dict(state["loader"])
        ckpt.set_rng_state(state["rng"])
        self.step = int(state["step"])
        self.tokens = int(state["tokens"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.last_eval = state.get("last_eval")
        return True

    # -- loop -----------------------------------------------------------------------------------
    def train_step(self) -> dict:
        """One optimizer step over grad_accum micro-batches. Returns the step's scalars."""
        lr = self.lr_at(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        accum = self.tcfg.grad_accum
        lm_total, aux_total = 0.0, 0.0
        finite = True
        for micro in range(accum):
            batch = next(self.loader).to(self.device, non_blocking=True)
            if self.parallel is not None:  # DDP reduces once per optimizer step, after the last micro-batch
                data_parallel.set_grad_sync(self.forward_model, micro == accum - 1)
            with self.autocast():
                out = self.forward_model(batch.inputs, batch.targets, **self.routing_of(batch))
                loss = out.loss
                for hook in self.loss_hooks:  # e.g. distillation or EWC terms of a continual stage
                    loss = loss + hook(batch, out)
            loss = loss / accum
            if not torch.isfinite(loss):
                finite = False
                if self.parallel is None:  # in parallel every rank runs every backward (they hold collectives)
                    break
            loss.backward()
            lm_total += float(out.lm_loss.detach()) / accum
            aux_total += float(out.aux_loss.detach()) / accum
            self.tokens += batch.targets.numel() * (self.parallel.world_size if self.parallel is not None else 1)
        if self.parallel is not None:  # the global batch: expert gradients averaged, one verdict, mean losses
            data_parallel.reduce_expert_gradients(self.model, self.parallel)
            finite = self.parallel.all_true(finite)
            lm_total, aux_total = self.parallel.mean(lm_total, aux_total)
        params = [p for p in self.model.parameters() if p.grad is not None]
        grad_norm = float("nan")
        if finite:
            clip = self.tcfg.grad_clip if self.tcfg.grad_clip > 0 else float("inf")
            if self.parallel is None:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, clip))
            else:  # the norm of the whole model's gradient, expert slices of every EP rank included
                grad_norm = float(data_parallel.clip_grad_norm_(self.model, clip, self.parallel))
            finite = math.isfinite(grad_norm)
        if finite:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return {"loss": lm_total + aux_total, "lm_loss": lm_total, "aux_loss": aux_total, "lr": lr,
                "grad_norm": grad_norm, "finite": finite}

    def routing_of(self, batch) -> dict:
        """The model's routing inputs for a batch: each row's domain id when the model routes by domain."""
        if not self.model.domains:
            return {}
        return {"domain_ids": self.model.domain_ids_of(batch.domain_names, batch.domain_ids)}

    def moe_record(self) -> dict:
        record = {}
        for i, layer in enumerate(self.model.layers):
            if layer.is_moe and layer.mlp.last_stats is not None:
                s = layer.mlp.last_stats
                record[f"layer_{i}"] = {
                    "tokens_per_expert": s["tokens_per_expert"].tolist(),
                    "entropy": round(s["entropy"], 5),
                    "max_imbalance": round(s["max_imbalance"], 4),
                    "dropped_tokens": s["dropped_tokens"],
                    "aux": {k: round(v, 6) for k, v in layer.mlp.aux_losses.items()},
                }
        return record

    def run_eval(self, logger) -> dict:
        results = evaluate(self.model, self.val_sets, self.device, self.autocast)
        self.last_eval = results
        logger.log({**self.log_prefix, "step": self.step, "tokens": self.tokens, "eval": results})
        return results

    def fit(self, max_steps: int | None = None, progress_desc: str = "train") -> dict:
        """Train until `max_steps` (default train.max_steps); returns the last evaluation."""
        from tqdm.auto import tqdm

        max_steps = self.tcfg.max_steps if max_steps is None else max_steps
        resumed_from = self.step
        self.run_dir.mkdir(parents=True, exist_ok=True)
        main = self.parallel is None or self.parallel.is_main  # one process logs, shows progress and prints
        loggers = [JsonlLogger(self.run_dir / "metrics.jsonl", resume_step=self.step)] if main else []
        if main and self.tcfg.wandb.enabled:
            loggers.append(WandbLogger(self.tcfg.wandb, self.run_dir, self.run_dir.name, self.config_record))
        if main and self.tcfg.tensorboard.enabled:
            tb = self.tcfg.tensorboard
            loggers.append(TensorBoardLogger(Path(tb.dir) if tb.dir else self.run_dir / "tensorboard", self.step))
        logger = Loggers(loggers)
        self.model.train()
        consecutive_nonfinite = 0
        window = {"loss": 0.0, "n": 0, "tokens": 0, "t0": time.perf_counter()}
        bar = tqdm(total=max_steps, initial=self.step, desc=progress_desc,
                   disable=not (self.tcfg.progress and main), dynamic_ncols=True, leave=True)
        try:
            with _StopRequest() as stop:
                while self.step < max_steps:
                    tokens_before = self.tokens
                    out = self.train_step()
                    if not out["finite"]:
                        self.skipped_steps += 1
                        consecutive_nonfinite += 1
                        if consecutive_nonfinite >= self.tcfg.max_nonfinite:
                            raise TrainingError(
                                f"The loss was non-finite for {consecutive_nonfinite} steps in a row (step {self.step}); "
                                f"lower train.lr (now {self.tcfg.lr}) or check the data. Last good checkpoint: "
                                f"{ckpt.latest_checkpoint(self.run_dir)}."
                            )
                    else:
                        consecutive_nonfinite = 0
                        window["loss"] += out["loss"]
                        window["n"] += 1
                    window["tokens"] += self.tokens - tokens_before
                    bar.update(1)
                    if self.step % self.tcfg.log_every == 0 or self.step == max_steps:
                        elapsed = time.perf_counter() - window["t0"]
                        tps = window["tokens"] / elapsed if elapsed > 0 else 0.0
                        mean_loss = window["loss"] / max(1, window["n"])
                        logger.log({**self.log_prefix, "step": self.step, "tokens": self.tokens, "loss": mean_loss,
                                    "lm_loss": out["lm_loss"], "aux_loss": out["aux_loss"], "lr": out["lr"],
                                    "grad_norm": out["grad_norm"], "tokens_per_s": tps,
                                    "skipped_steps": self.skipped_steps, "moe": self.moe_record()})
                        bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{out['lr']:.2e}", tok_s=f"{tps:,.0f}")
                        window = {"loss": 0.0, "n": 0, "tokens": 0, "t0": time.perf_counter()}
                    if self.val_sets and (self.step % self.tcfg.eval_every == 0 or self.step == max_steps):
                        results = self.run_eval(logger)
                        if main:
                            bar.write(f"step {self.step}: " + ", ".join(
                                f"{d} loss {r['loss']:.3f} bpb {r['bpb']:.3f}" for d, r in results.items()))
                    if self.step % self.tcfg.checkpoint_every == 0 or self.step == max_steps:
                        self.save()
                    stop_now = stop.signal is not None
                    if self.parallel is not None:  # all ranks stop after the same step, or the others would wait
                        stop_now = self.parallel.any_true(stop_now)
                    if stop_now:
                        self.stopped_by_signal = stop.signal or int(signal.SIGTERM)
                        folder = self.save()
                        if main:
                            bar.write(f"stopped by signal {self.stopped_by_signal} at step {self.step}; "
                                      f"checkpoint saved to {folder}")
                        break
        finally:
            bar.close()
            logger.close()
        if self.val_sets and self.step > resumed_from and self.last_eval is None:
            self.run_eval(Loggers([]))
        return self.last_eval or {}

