"""Transfer learning (fine-tuning strategies, LoRA) and multi-task learning on one training core."""

from slimkit.transfer.config import FinetuneConfig, HeadConfig, LoraSpec, MultiTaskConfig, TaskSpec
from slimkit.transfer.finetune import FinetuneResult, compare_transfer, few_shot, finetune
from slimkit.transfer.heads import PooledEncoder, TaskHead, TaskModel, with_head
from slimkit.transfer.lora import add_lora_, merge_lora_
from slimkit.transfer.multitask import (
    MultiTaskModel,
    MultiTaskResult,
    TaskView,
    evaluate_tasks,
    task_probabilities,
    train_multitask,
)
from slimkit.transfer.strategies import (
    GradualUnfreezing,
    discriminative_groups,
    freeze_backbone_,
    layer_groups,
)

__all__ = [
    "FinetuneConfig",
    "FinetuneResult",
    "GradualUnfreezing",
    "HeadConfig",
    "LoraSpec",
    "MultiTaskConfig",
    "MultiTaskModel",
    "MultiTaskResult",
    "PooledEncoder",
    "TaskHead",
    "TaskModel",
    "TaskSpec",
    "TaskView",
    "add_lora_",
    "compare_transfer",
    "discriminative_groups",
    "evaluate_tasks",
    "few_shot",
    "finetune",
    "freeze_backbone_",
    "layer_groups",
    "merge_lora_",
    "task_probabilities",
    "train_multitask",
    "with_head",
]
