"""Knowledge distillation: soft labels, hidden states, attention maps and embeddings, on the one loop.

::

    student = layer_dropped_student(teacher, every=2)        # or any smaller model
    result = distill_(student, teacher, train_set, DistillConfig(temperature=4, alpha=0.9), TrainConfig())

The building blocks (losses, layer maps, the teacher cache, built-in students,
``no_label_loss`` / ``sentence_collate`` for unlabeled text) are imported from
their submodules: ``slimkit.distill.losses``, ``.hooks``, ``.cache``, ``.students``, ``.api``.
"""

from slimkit.distill.api import DistillResult, distill_
from slimkit.distill.callback import DistillationCallback
from slimkit.distill.config import DistillConfig
from slimkit.distill.students import layer_dropped_student

__all__ = [
    "DistillConfig",
    "DistillResult",
    "DistillationCallback",
    "distill_",
    "layer_dropped_student",
]
