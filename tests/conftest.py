"""Shared test fixtures: offline Hugging Face, the shared data folder, quiet torch threads."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(2)

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    """The real data sets: $SLIMKIT_DATA, or ``shared/data`` beside the checkout."""
    return Path(os.environ.get("SLIMKIT_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture
def data_dir() -> Path:
    path = shared_data_dir()
    if not path.is_dir():
        pytest.skip(f"shared data folder not found: {path} (set SLIMKIT_DATA)")
    return path
