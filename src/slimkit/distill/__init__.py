"""Knowledge distillation: soft labels, hidden states, attention maps and embeddings, on the one loop."""

from slimkit.distill.api import distill, no_label_loss, sentence_collate
from slimkit.distill.cache import TeacherCache
from slimkit.distill.callback import DistillationCallback
from slimkit.distill.config import DistillConfig
from slimkit.distill.hooks import default_layer_map, find_layer_list, uniform_layer_map
from slimkit.distill.losses import attention_loss, kd_loss, match_loss, soft_hard_loss
from slimkit.distill.students import (
    MLP,
    builtin_student,
    kept_layer_indices,
    layer_dropped_student,
    pruned_student,
)

__all__ = [
    "MLP",
    "DistillConfig",
    "DistillationCallback",
    "TeacherCache",
    "attention_loss",
    "builtin_student",
    "default_layer_map",
    "distill",
    "find_layer_list",
    "kd_loss",
    "kept_layer_indices",
    "layer_dropped_student",
    "match_loss",
    "no_label_loss",
    "pruned_student",
    "sentence_collate",
    "soft_hard_loss",
    "uniform_layer_map",
]
