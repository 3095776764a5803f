"""Transfer learning (fine-tuning strategies, LoRA) and multi-task learning on one training core.

``finetune`` and ``train_multitask`` train a copy: the model passed in is left
exactly as it was, and the trained model is ``result.model``. ``add_lora_`` /
``merge_lora_`` change the model they are given. Heads, strategies (layer groups,
unfreezing) and task sampling live in ``slimkit.transfer.heads``, ``.strategies``
and ``.multitask``.
"""

from slimkit.transfer.config import FinetuneConfig, HeadConfig, LoraSpec, MultiTaskConfig, TaskSpec
from slimkit.transfer.finetune import FinetuneResult, compare_transfer, finetune
from slimkit.transfer.lora import add_lora_, merge_lora_
from slimkit.transfer.multitask import MultiTaskResult, train_multitask

__all__ = [
    "FinetuneConfig",
    "FinetuneResult",
    "HeadConfig",
    "LoraSpec",
    "MultiTaskConfig",
    "MultiTaskResult",
    "TaskSpec",
    "add_lora_",
    "compare_transfer",
    "finetune",
    "merge_lora_",
    "train_multitask",
]
