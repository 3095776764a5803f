"""The one training loop.

Techniques never copy this loop: they pass a :class:`Callback` (masks,
distillation losses, fake quantization) and, for unusual batches, a
``forward``/``loss_fn`` pair. Batches are drawn from a per-epoch permutation
seeded by ``(seed, epoch)``, so a run resumed from a checkpoint replays exactly
the batches, dropout masks and learning rates of an uninterrupted run.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from slimkit.batch import batch_len, default_forward, targets, to_device
from slimkit.errors import ConfigError
from slimkit.train import distributed, guard
from slimkit.train.callbacks import Callback
from slimkit.train.checkpoint import load_checkpoint, load_optimizer, save_checkpoint
from slimkit.train.config import TrainConfig
from slimkit.train.optim import build_optimizer, lr_factor, regularization

Forward = Callable[[nn.Module, Any], Any]
LossFn = Callable[[Any, Any], torch.Tensor]


def classification_loss(outputs: Any, batch: Any) -> torch.Tensor:
    logits = outputs.logits if hasattr(outputs, "logits") else outputs
    return nn.functional.cross_entropy(logits, targets(batch))


def regression_loss(outputs: Any, batch: Any) -> torch.Tensor:
    pred = outputs.logits if hasattr(outputs, "logits") else outputs
    target = targets(batch)
    return nn.functional.mse_loss(pred.reshape(target.shape), target.float())


@dataclass
class TrainResult:
    history: list[dict] = field(default_factory=list)  # one dict per finished epoch
    steps: int = 0
    best_epoch: int | None = None
    best_metric: float | None = None
    stopped_early: bool = False
    train_time_s: float = 0.0
    samples_per_s: float = 0.0


class Trainer:
    """Train ``model`` in place.

    ``evaluate(model) -> dict`` scores the validation data; by default it is
    :func:`slimkit.metrics.evaluate` on ``val_data`` for ``task``.
    """

    def __init__(
        self,
        model: nn.Module,
        config: TrainConfig,
        callbacks: Sequence[Callback] = (),
        forward: Forward | None = None,
        loss_fn: LossFn | None = None,
        task: str = "classification",
        collate_fn: Callable | None = None,
        evaluate: Callable[[nn.Module], dict] | None = None,
        param_groups: Callable[[nn.Module], list[dict]] | None = None,
    ):
        self.model = model
        self.config = config.for_task(task)  # monitor None -> the task's metric (a copy)
        self.callbacks = list(callbacks)
        self.forward = forward or default_forward
        self.loss_fn = loss_fn or (regression_loss if task == "regression" else classification_loss)
        self.task = task
        self.collate_fn = collate_fn
        self._evaluate = evaluate
        self.param_groups = param_groups  # model -> optimizer param groups (optional "lr_scale" each)
        self.optimizer: torch.optim.Optimizer | None = None
        self.state: dict = {}
        self._best_weights: dict[str, torch.Tensor] | None = None
        self._dist: distributed.DistEnv | None = None  # set under torchrun (see distributed.py)
        self._net: nn.Module = model  # what forward passes run through: the model or its DDP wrapper

    # -- public -----------------------------------------------------------
    @property
    def global_step(self) -> int:
        return self.state.get("global_step", 0)

    def fit(
        self, train_data: Dataset, val_data: Dataset | None = None, resume_from: str | Path | None = None
    ) -> TrainResult:
        was_training = self.model.training
        self._setup(train_data, resume_from)
        self._dist = distributed.current()
        self._net = distributed.wrap(self.model, self._dist)
        evaluate = self._evaluate or (self._default_evaluator(val_data) if val_data is not None else None)
        for cb in self.callbacks:
            cb.on_train_begin(self)
        if resume_from is not None:
            # After on_train_begin: a callback may add parameters to the optimizer there (distillation
            # projections), and the saved optimizer state covers them too.
            load_optimizer(resume_from, self.optimizer)
        start = time.perf_counter()
        while self.state["epoch"] < self.config.epochs and not self._should_stop():
            self._run_epoch(train_data, evaluate)
        self.state["train_time_s"] += time.perf_counter() - start
        self._finish(evaluate is not None)
        for cb in self.callbacks:
            cb.on_train_end(self)
        self.model.train(was_training)
        return self._result()

    def save_checkpoint(self, folder: str | Path) -> Path:
        """Everything needed to resume exactly: weights, optimizer, RNG, counters, callbacks."""
        state = dict(self.state, callbacks=[cb.state_dict() for cb in self.callbacks])
        if self._dist is not None and not self._dist.is_main:  # one writer under torchrun
            distributed.barrier(self._dist)
            return Path(folder)
        path = save_checkpoint(folder, self.model, self.optimizer, state, self._best_weights)
        distributed.barrier(self._dist)
        return path

    # -- set-up -----------------------------------------------------------
    def _setup(self, train_data: Dataset, resume_from: str | Path | None) -> None:
        cfg = self.config
        groups = self.param_groups(self.model) if self.param_groups is not None else None
        self.optimizer = build_optimizer(self.model, cfg, groups)
        self.steps_per_epoch = math.ceil(len(train_data) / cfg.batch_size)
        self.total_steps = self.steps_per_epoch * cfg.epochs
        if resume_from is None:
            torch.manual_seed(cfg.seed)
            self.state = {
                "epoch": 0,
                "step_in_epoch": 0,
                "global_step": 0,
                "history": [],
                "best_metric": None,
                "best_epoch": None,
                "bad_epochs": 0,
                "stopped_early": False,
                "epoch_loss_sum": 0.0,
                "epoch_samples": 0,
                "train_time_s": 0.0,
                "samples_seen": 0,
            }
            self._best_weights = None
            return
        self.state, self._best_weights = load_checkpoint(resume_from, self.model)
        for cb, cb_state in zip(self.callbacks, self.state.pop("callbacks", [])):
            cb.load_state_dict(cb_state)

    def _epoch_loader(self, train_data: Dataset, epoch: int) -> DataLoader:
        gen = torch.Generator().manual_seed(self.config.seed * 100_003 + epoch)
        order = torch.randperm(len(train_data), generator=gen).tolist()
        bs = self.config.batch_size
        batches = distributed.shard_batches([order[i : i + bs] for i in range(0, len(order), bs)], self._dist)
        # The loader gets its own generator: drawing its worker seed from the global RNG would
        # shift the dropout masks of a resumed run against an uninterrupted one.
        return DataLoader(
            train_data,
            batch_sampler=batches[self.state["step_in_epoch"] :],
            collate_fn=self.collate_fn,
            generator=gen,
        )

    def _default_evaluator(self, val_data: Dataset) -> Callable[[nn.Module], dict]:
        from slimkit.metrics.task import evaluate

        loader = DataLoader(val_data, batch_size=max(self.config.batch_size, 256), collate_fn=self.collate_fn)
        return lambda model: evaluate(model, loader, self.task, forward=self.forward)

    # -- the loop ---------------------------------------------------------
    def _run_epoch(self, train_data: Dataset, evaluate: Callable | None) -> None:
        cfg, st = self.config, self.state
        self.model.train()
        for cb in self.callbacks:
            cb.on_epoch_begin(self)
        loader = self._epoch_loader(train_data, st["epoch"])
        bar = tqdm(
            loader,
            total=self.steps_per_epoch,
            initial=st["step_in_epoch"],
            # None: no bar when stderr is not a terminal (a log file gets the one line per epoch below)
            disable=None if cfg.progress else True,
            desc=f"epoch {st['epoch'] + 1}/{cfg.epochs}",
            leave=False,
            dynamic_ncols=True,
        )
        tick, seen = time.perf_counter(), 0
        for batch in bar:
            n = self._train_step(batch)
            seen += n
            rate = seen / max(time.perf_counter() - tick, 1e-9)
            bar.set_postfix(
                loss=f"{st['epoch_loss_sum'] / max(st['epoch_samples'], 1):.4f}", samples_s=f"{rate:.0f}"
            )
            if self._should_stop():
                bar.close()
                return
        bar.close()
        self._end_epoch(evaluate, seen / max(time.perf_counter() - tick, 1e-9))

    def _train_step(self, batch: Any) -> int:
        cfg, st = self.config, self.state
        device = next(self.model.parameters()).device
        batch = to_device(batch, device)
        for group in self.optimizer.param_groups:
            factor = lr_factor(cfg, st["global_step"], self.steps_per_epoch, self.total_steps)
            group["lr"] = cfg.lr * group.get("lr_scale", 1.0) * factor
        outputs = self.forward(self._net, batch)
        loss = self.loss_fn(outputs, batch)
        for cb in self.callbacks:
            loss = cb.on_loss(self, batch, outputs, loss)
        penalty = regularization(self.model, cfg)
        total = loss if penalty is None else loss + penalty
        n = batch_len(batch)
        self.optimizer.zero_grad(set_to_none=True)
        (total * distributed.mean_loss_scale(n, self._dist, device)).backward()
        for cb in self.callbacks:
            cb.on_after_backward(self)
        # Refuses a NaN/inf loss or gradient before it reaches the weights (and clips, if asked).
        guard.check_step(self.model, loss, total, self._where, cfg.grad_clip)
        self.optimizer.step()
        st["global_step"] += 1
        st["step_in_epoch"] += 1
        st["epoch_loss_sum"] += float(loss.detach()) * n
        st["epoch_samples"] += n
        st["samples_seen"] += n
        for cb in self.callbacks:
            cb.on_step_end(self)
        return n

    def _where(self) -> str:
        st = self.state
        return f"epoch {st['epoch'] + 1}/{self.config.epochs}, batch {st['step_in_epoch'] + 1}/{self.steps_per_epoch}"

    def _end_epoch(self, evaluate: Callable | None, samples_per_s: float) -> None:
        cfg, st = self.config, self.state
        guard.check_weights(self.model, f"end of epoch {st['epoch'] + 1}/{cfg.epochs}")
        loss_sum, samples, samples_per_s = distributed.sum_across(
            [st["epoch_loss_sum"], st["epoch_samples"], samples_per_s], self._dist
        )
        metrics = {
            "epoch": st["epoch"] + 1,
            "train_loss": loss_sum / max(samples, 1),
            # The recipe's base rate (as scheduled), not a group's scaled one: a fine-tuned head's
            # rate (lr * head_lr_scale) is shown apart, labelled head_lr.
            "lr": cfg.lr
            * lr_factor(cfg, max(st["global_step"] - 1, 0), self.steps_per_epoch, self.total_steps),
            **self._head_lr(),
            "samples_per_s": samples_per_s,
        }
        if evaluate is not None:
            metrics.update({f"val_{k}": v for k, v in evaluate(self.model).items()})
            self._track_best(metrics)
        st["history"].append(metrics)
        st.update(epoch=st["epoch"] + 1, step_in_epoch=0, epoch_loss_sum=0.0, epoch_samples=0)
        for cb in self.callbacks:
            cb.on_epoch_end(self, metrics)
        if cfg.progress:
            shown = ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k != "epoch")
            tqdm.write(f"epoch {metrics['epoch']}/{cfg.epochs}: {shown}")

    def _head_lr(self) -> dict[str, float]:
        """``{"head_lr": ...}`` when a param group marked ``role: head`` runs at a scaled rate, else nothing."""
        for group in self.optimizer.param_groups:
            if group.get("role") == "head" and group.get("lr_scale", 1.0) != 1.0:
                return {"head_lr": group["lr"]}
        return {}

    def _track_best(self, metrics: dict) -> None:
        cfg, st = self.config, self.state
        if cfg.monitor not in metrics:
            raise ConfigError(
                "train.monitor",
                f"{cfg.monitor!r} is not among the validation metrics "
                f"({', '.join(k for k in metrics if k.startswith('val_'))})",
            )
        value = float(metrics[cfg.monitor])
        best = st["best_metric"]
        better = best is None or (value < best if cfg.monitor_mode == "min" else value > best)
        if better:
            st.update(best_metric=value, best_epoch=st["epoch"] + 1, bad_epochs=0)
            self._best_weights = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        else:
            st["bad_epochs"] += 1
            if cfg.early_stopping_patience and st["bad_epochs"] >= cfg.early_stopping_patience:
                st["stopped_early"] = True

    def _should_stop(self) -> bool:
        max_steps = self.config.max_steps
        return self.state["stopped_early"] or (
            max_steps is not None and self.state["global_step"] >= max_steps
        )

    def _finish(self, validated: bool) -> None:
        # Restore the best epoch's weights only when the whole run is over, not at a max_steps pause.
        done = self.state["epoch"] >= self.config.epochs or self.state["stopped_early"]
        if validated and done and self.config.restore_best and self._best_weights is not None:
            self.model.load_state_dict(copy.deepcopy(self._best_weights))

    def _result(self) -> TrainResult:
        st = self.state
        return TrainResult(
            history=list(st["history"]),
            steps=st["global_step"],
            best_epoch=st["best_epoch"],
            best_metric=st["best_metric"],
            stopped_early=st["stopped_early"],
            train_time_s=st["train_time_s"],
            samples_per_s=st["samples_seen"] / max(st["train_time_s"], 1e-9),
        )
