"""Distillation as a Callback of the one training loop.

The Trainer computes the student's outputs and the task loss as usual; in
``on_loss`` this callback runs the teacher on the same batch (eval mode, no
gradients, or from the cache), and returns the mixed loss. Intermediate layers
are read with forward hooks; projections for differing widths are created on
the first batch that shows the widths and added to the trainer's optimizer.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimkit.batch import batch_len, default_forward
from slimkit.distill.cache import TeacherCache, TeacherResult, batch_masks
from slimkit.distill.config import DistillConfig
from slimkit.distill.hooks import Taps, attention_modules, resolve_layer_map
from slimkit.distill.losses import attention_loss, kd_loss, masked_match_loss, match_loss, projection
from slimkit.distill.token_kd import teacher_top_k, token_kd_loss, top_k_kd_loss
from slimkit.errors import ConfigError
from slimkit.metrics.modes import eval_mode
from slimkit.train import distributed
from slimkit.train.callbacks import Callback


def output_tensors(outputs: Any) -> list[torch.Tensor]:
    """The prediction tensors of a forward: logits of a ModelOutput, or every tensor of a tuple."""
    if hasattr(outputs, "logits"):
        return [outputs.logits]
    if isinstance(outputs, torch.Tensor):
        return [outputs]
    if isinstance(outputs, (tuple, list)):
        return [t for o in outputs for t in output_tensors(o)]
    if isinstance(outputs, dict):  # a ModelOutput without logits: its first tensor (last_hidden_state)
        return [next(v for v in outputs.values() if isinstance(v, torch.Tensor))]
    raise TypeError(f"cannot find prediction tensors in a {type(outputs).__name__}")


def _key(name: str) -> str:
    return name.replace(".", "__") or "_root"


class DistillationCallback(Callback):
    """Add the teacher's signal to the student's loss (see :class:`DistillConfig` for the formula).

    ``forward(model, batch)`` runs a model on a batch; by default the trainer's
    own forward is used for the teacher too. The teacher is never trained and
    is given back in the train/eval mode it came in.
    """

    def __init__(self, teacher: nn.Module, config: DistillConfig, forward=None):
        self.teacher = teacher
        self.config = config
        self.forward = forward
        self.projections = nn.ModuleDict()
        self.layer_map: dict[str, str] = {}
        self.attention_map: dict[str, str] = {}
        self.cache = TeacherCache(config.cache) if config.cache else None
        self.terms: dict[str, float] = {}
        self._sums: dict[str, float] = {}  # sample-weighted sums of the terms over this epoch
        self._samples = 0
        self._taps: tuple[Taps, Taps] | None = None
        self._teacher_mode: contextlib.AbstractContextManager | None = None

    # -- checks before training -------------------------------------------------
    def resolve_layers(self, student: nn.Module) -> None:
        """Validate and fix the student->teacher layer pairs (structure only, no data)."""
        if not self.config.uses_layers:
            return
        self.layer_map = resolve_layer_map(student, self.teacher, self.config.layer_map)
        if self.config.attention_weight > 0:
            s_attn = attention_modules(student, self.layer_map)
            t_attn = attention_modules(self.teacher, self.layer_map.values())
            self.attention_map = {s_attn[s]: t_attn[t] for s, t in self.layer_map.items()}

    def check(self, student: nn.Module, batch: Any) -> None:
        """Run both models once on ``batch`` (no gradients, eval mode, both restored) and validate.

        Raises ConfigError for outputs that cannot be matched or widths without
        a projection; creates the projections. Call it before training so that
        errors come before any weight changes.
        """
        self.resolve_layers(student)
        forward = self.forward or default_forward
        s_taps, t_taps = self._make_taps(student, train_only=False)
        try:
            with torch.no_grad(), eval_mode(student), eval_mode(self.teacher):
                s_out = output_tensors(forward(student, batch))
                t_out = output_tensors(forward(self.teacher, batch))
            self._check_outputs(s_out, t_out)
            if self.config.output_loss == "token_kd":
                _labels(batch)
            self._ensure_projections(s_taps.take(), t_taps.take(), None)
        finally:
            s_taps.remove()
            t_taps.remove()

    def _check_outputs(self, s_out: list[torch.Tensor], t_out: list[torch.Tensor]) -> None:
        if self.config.output_loss == "none":
            return
        if len(s_out) != len(t_out):
            raise ConfigError("student", f"gives {len(s_out)} outputs but the teacher gives {len(t_out)}")
        for s, t in zip(s_out, t_out):
            if s.shape[-1] != t.shape[-1]:
                kinds = {"kd": "classes", "token_kd": "vocabulary entries"}
                what = kinds.get(self.config.output_loss, "output features")
                raise ConfigError(
                    "student",
                    f"has {s.shape[-1]} {what} but the teacher has {t.shape[-1]}: the outputs cannot be matched",
                )

    # -- training hooks -----------------------------------------------------------
    def on_train_begin(self, trainer) -> None:
        student = trainer.model
        if not self.layer_map and self.config.uses_layers:
            self.resolve_layers(student)
        self._check_devices(student)
        env = distributed.current(init=False)
        if self.config.cache and env is not None:
            # Each rank sees its own slices of the data: one cache file per rank, no two writers on one file.
            base = Path(self.config.cache)
            self.cache = TeacherCache(base.with_name(f"{base.stem}.rank{env.rank}{base.suffix}"))
        self._teacher_mode = eval_mode(self.teacher)
        self._teacher_mode.__enter__()
        self._taps = self._make_taps(student, train_only=True)
        self._add_to_optimizer(trainer)
        self._sums, self._samples = {}, 0

    def on_epoch_begin(self, trainer) -> None:
        self._sums, self._samples = {}, 0

    def on_loss(self, trainer, batch: Any, outputs: Any, loss: torch.Tensor) -> torch.Tensor:
        s_taps, _ = self._taps
        student_layers = s_taps.take()
        teacher = self._teacher_result(trainer, batch)
        new = self._ensure_projections(student_layers, teacher, trainer.model)
        if new:
            self._add_to_optimizer(trainer)
        terms = self._terms(output_tensors(outputs), student_layers, teacher, batch)
        cfg = self.config
        if cfg.output_loss == "none":
            total = loss
        elif cfg.alpha == 1:
            # the task loss is only logged: kept out of the graph, its backward (for a language model, a
            # softmax over tokens x vocabulary) is not computed to be multiplied by zero
            total = terms["output"]
        else:
            total = (1 - cfg.alpha) * loss + cfg.alpha * terms["output"]
        if "hidden" in terms:
            total = total + cfg.hidden_weight * terms["hidden"]
        if "attention" in terms:
            total = total + cfg.attention_weight * terms["attention"]
        self._record(terms, loss, batch_len(batch))
        return total

    def on_after_backward(self, trainer) -> None:
        # Projections live outside the student (and its DDP wrapper): average their gradients like DDP does.
        distributed.average_gradients(self.projections.parameters(), distributed.current(init=False))

    def on_epoch_end(self, trainer, metrics: dict[str, float]) -> None:
        # The history dict is the one the trainer keeps, so the terms land in TrainResult.history.
        # Summed over ranks under torchrun, so every rank logs the mean over all samples.
        names = sorted(self._sums)
        sums = distributed.sum_across(
            [self._sums[k] for k in names] + [self._samples], distributed.current(False)
        )
        metrics.update({f"distill_{k}": v / max(sums[-1], 1) for k, v in zip(names, sums)})

    def on_train_end(self, trainer) -> None:
        if self._taps is not None:
            for taps in self._taps:
                taps.remove()
            self._taps = None
        if self._teacher_mode is not None:
            self._teacher_mode.__exit__(None, None, None)
            self._teacher_mode = None
        if self.cache is not None:
            self.cache.save()

    # -- checkpoints ----------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The learned projections (tensors; checkpoints keep them), so a resumed run goes on with them."""
        return {"projections": {k: dict(p.state_dict()) for k, p in self.projections.items()}}

    def load_state_dict(self, state: dict) -> None:
        for key, tensors in state.get("projections", {}).items():
            if key not in self.projections:  # made on the first batch in the run that saved them
                weight = tensors["weight"]
                self.projections[key] = projection(weight.shape[1], weight.shape[0], conv=weight.dim() == 4)
            self.projections[key].load_state_dict(tensors)

    # -- internals ------------------------------------------------------------------
    def _make_taps(self, student: nn.Module, train_only: bool) -> tuple[Taps, Taps]:
        s_attn, t_attn = list(self.attention_map), list(self.attention_map.values())
        hidden = self.config.hidden_weight > 0
        s_names = list(self.layer_map) if hidden else []
        t_names = list(self.layer_map.values()) if hidden else []
        return (
            Taps(student, s_names, s_attn, train_only=train_only),
            Taps(self.teacher, t_names, t_attn),
        )

    def _check_devices(self, student: nn.Module) -> None:
        s_param = next(student.parameters(), None)
        t_param = next(self.teacher.parameters(), None)
        if s_param is not None and t_param is not None and s_param.device != t_param.device:
            raise ConfigError(
                "teacher", f"is on {t_param.device} but the student is on {s_param.device}; move it first"
            )

    def _teacher_result(self, trainer, batch: Any) -> TeacherResult:
        if self.cache is not None:
            hidden = self.config.hidden_weight > 0  # entries of an outputs-only run lack the layers
            kinds = [f"layer:{t}" for t in self.layer_map.values()] if hidden else []
            cached = self.cache.get(batch, kinds + list(self._top_k_kinds()))
            if cached is not None:
                device = next(trainer.model.parameters()).device
                return {k: [t.to(device) for t in v] for k, v in cached.items()}
        forward = self.forward or trainer.forward
        with torch.no_grad():
            out = output_tensors(forward(self.teacher, batch))
        result: TeacherResult = {"out": [t.detach() for t in out]}
        if self.config.top_k is not None:
            # only the top-k leave here: the full logits (tokens x vocabulary) are freed right away
            values, ids = self._top_k_kinds()
            tops = [teacher_top_k(t, self.config.top_k, self.config.temperature) for t in result.pop("out")]
            result.update({values: [v for v, _ in tops], ids: [i for _, i in tops]})
        result.update({f"layer:{k}": v for k, v in self._taps[1].take().items()})
        if self.cache is not None:
            self.cache.put(batch, result)
        return result

    def _ensure_projections(self, student_layers: dict, teacher: dict, student: nn.Module | None) -> bool:
        """Create missing projections for the hidden pairs whose widths differ; True if any was made."""
        made = False
        if self.config.hidden_weight <= 0:
            return made
        for s_name, t_name in self.layer_map.items():
            if s_name not in student_layers:
                raise ConfigError(f"layer_map.{s_name}", "this student layer did not run in the forward pass")
            s = student_layers[s_name][0]
            t = teacher.get(f"layer:{t_name}", teacher.get(t_name))[0]
            if s.shape == t.shape or _key(s_name) in self.projections:
                continue
            self._check_projectable(s_name, t_name, s, t)
            proj = projection(s.shape[1] if s.dim() == 4 else s.shape[-1], _width(t), conv=s.dim() == 4)
            if student is not None:
                proj.to(next(student.parameters()).device)
            self.projections[_key(s_name)] = proj
            made = True
        return made

    def _check_projectable(self, s_name: str, t_name: str, s: torch.Tensor, t: torch.Tensor) -> None:
        path = f"layer_map.{s_name}"
        same_rest = (s.shape[2:] == t.shape[2:]) if s.dim() == 4 else (s.shape[:-1] == t.shape[:-1])
        if s.dim() != t.dim() or not same_rest:
            raise ConfigError(
                path, f"student {tuple(s.shape)} and teacher {t_name} {tuple(t.shape)} differ beyond width"
            )
        if not self.config.projection:
            raise ConfigError(
                path,
                f"student width {_width(s)} != teacher {t_name} width {_width(t)}; set projection: true",
            )

    def _add_to_optimizer(self, trainer) -> None:
        if trainer.optimizer is None or len(self.projections) == 0:
            return
        known = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
        params = [p for p in self.projections.parameters() if id(p) not in known]
        if params:
            trainer.optimizer.add_param_group({"params": params})

    def _top_k_kinds(self) -> tuple[str, ...]:
        """Cache kinds of the teacher's top-k (named by k and T: entries of another setting miss)."""
        k, temperature = self.config.top_k, self.config.temperature
        return () if k is None else (f"top{k}_T{temperature:g}", f"top{k}_T{temperature:g}_ids")

    def _token_kd(self, s_out, teacher, batch) -> torch.Tensor:
        labels, temperature = _labels(batch), self.config.temperature
        if self.config.top_k is None:
            losses = [token_kd_loss(s, t, labels, temperature) for s, t in zip(s_out, teacher["out"])]
        else:
            values, ids = (teacher[k] for k in self._top_k_kinds())
            losses = [top_k_kd_loss(s, v, i, labels, temperature) for s, v, i in zip(s_out, values, ids)]
        return torch.stack(losses).mean()

    def _terms(self, s_out, student_layers, teacher, batch) -> dict[str, torch.Tensor]:
        cfg = self.config
        terms = {}
        masks = batch_masks(batch)
        if cfg.output_loss == "token_kd":
            terms["output"] = self._token_kd(s_out, teacher, batch)
        elif cfg.output_loss != "none":
            pairs = list(zip(s_out, teacher["out"]))
            if cfg.output_loss == "kd":
                losses = [kd_loss(s, t, cfg.temperature) for s, t in pairs]
            else:
                losses = [match_loss(s, t, cfg.output_loss) for s, t in pairs]
            terms["output"] = torch.stack(losses).mean()
        if cfg.hidden_weight > 0:
            terms["hidden"] = self._hidden_term(student_layers, teacher, masks)
        if cfg.attention_weight > 0:
            losses = [
                attention_loss(s, t, masks[c] if c < len(masks) else None)
                for s_name, t_name in self.attention_map.items()
                for c, (s, t) in enumerate(
                    zip(student_layers[f"attn:{s_name}"], teacher[f"layer:attn:{t_name}"])
                )
            ]
            terms["attention"] = torch.stack(losses).mean()
        return terms

    def _hidden_term(self, student_layers, teacher, masks) -> torch.Tensor:
        losses = []
        for s_name, t_name in self.layer_map.items():
            proj = dict(self.projections).get(_key(s_name))
            for c, (s, t) in enumerate(zip(student_layers[s_name], teacher[f"layer:{t_name}"])):
                if proj is not None:
                    s = proj(s)
                mask = masks[c] if c < len(masks) else None
                losses.append(masked_match_loss(s, t, mask, self.config.hidden_loss))
        return torch.stack(losses).mean()

    def _record(self, terms: dict[str, torch.Tensor], loss: torch.Tensor, n: int) -> None:
        self.terms = {k: float(v.detach()) for k, v in terms.items()}
        self.terms["task"] = float(loss.detach())
        for k, v in self.terms.items():
            self._sums[k] = self._sums.get(k, 0.0) + v * n
        self._samples += n


def _labels(batch: Any) -> torch.Tensor:
    labels = batch.get("labels") if isinstance(batch, dict) else None
    if not isinstance(labels, torch.Tensor) or labels.dim() != 2:
        raise ConfigError(
            "output_loss", "token_kd needs text batches with [batch, tokens] labels (language-model windows)"
        )
    return labels


def _width(t: torch.Tensor) -> int:
    return t.shape[1] if t.dim() == 4 else t.shape[-1]
