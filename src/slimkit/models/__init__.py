"""Built-in models and loaders for the user's own."""

from slimkit.models.builtin import BUILTIN_MODELS, DigitsCNN, LeNet5, LeNet300100
from slimkit.models.loading import ModelConfig, load_model

__all__ = ["BUILTIN_MODELS", "DigitsCNN", "LeNet5", "LeNet300100", "ModelConfig", "load_model"]
