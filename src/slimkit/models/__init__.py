"""Built-in models and loaders for the user's own (the table of built-ins is ``slimkit.models.builtin``)."""

from slimkit.models.builtin import DigitsCNN, LeNet5, LeNet300100
from slimkit.models.loading import ModelConfig, load_model

__all__ = ["DigitsCNN", "LeNet5", "LeNet300100", "ModelConfig", "load_model"]
