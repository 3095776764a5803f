"""Built-in models: small, classic and fast to train on two CPU cores.

Each takes ``dropout`` so that the regularisation options of the training
core have something to act on.
"""

from __future__ import annotations

import torch
from torch import nn

from slimkit.errors import ModelError


class LeNet300100(nn.Module):
    """The 784-300-100-10 MLP of LeCun et al. (and of Han et al.'s pruning paper)."""

    def __init__(self, in_features: int = 784, num_classes: int = 10, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_features, 300),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(300, 100),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(100, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class LeNet5(nn.Module):
    """A LeNet-5-style CNN for 1x28x28 images (conv-BN-ReLU-pool twice, then three Linear)."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, dropout: float = 0.0, width: int = 1):
        super().__init__()
        c1, c2 = 6 * width, 16 * width
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, 5, padding=2),
            nn.BatchNorm2d(c1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 5),
            nn.BatchNorm2d(c2),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(c2 * 5 * 5, 120),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(120, 84),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(84, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


#: DigitsCNN's ``activation`` choices (GELU/SiLU variants give activation replacement something to do).
ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}


class DigitsCNN(nn.Module):
    """A small CNN for scikit-learn's 1x8x8 digits."""

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        dropout: float = 0.1,
        width: int = 32,
        activation: str = "relu",
    ):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ModelError(
                f"model.kwargs.activation: must be one of {', '.join(ACTIVATIONS)}, got {activation!r}"
            )
        act = ACTIVATIONS[activation]
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1),
            nn.BatchNorm2d(width),
            act(),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.BatchNorm2d(2 * width),
            act(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(2 * width * 4 * 4, 128),
            act(),
            nn.Dropout(dropout),
            nn.Linear(128, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


BUILTIN_MODELS: dict[str, type[nn.Module]] = {
    "lenet300100": LeNet300100,
    "lenet5": LeNet5,
    "digits_cnn": DigitsCNN,
}
