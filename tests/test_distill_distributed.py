"""Distillation under ``torchrun --nproc_per_node=2`` (DDP, gloo) matches one process at the same global batch.

The test launches this very file with torchrun (two CPU processes) and once as a plain process; both
write the student's weights and the training history, which must agree within float tolerance.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from slimkit.distill import DistillationCallback, DistillConfig
from slimkit.train import TrainConfig, Trainer
from slimkit.train.distributed import current, is_main_process
from slimkit.utils.io import load_weights_file, save_weights
from tests.torchrun_helpers import run_worker, torchrun


def _problem():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(249, 12, generator=gen)  # 249 = 7 full batches of 32 + a ragged one of 25 (13 + 12)
    y = (x[:, :3].sum(1) > 0).long() + (x[:, 3] > 1).long()
    torch.manual_seed(1)
    teacher = nn.Sequential(nn.Linear(12, 64), nn.ReLU(), nn.Linear(64, 3)).eval()
    torch.manual_seed(2)
    # No dropout: each rank draws masks for its own slice, so masks (not the maths) would differ.
    student = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 3))
    return TensorDataset(x, y), teacher, student


def _worker(out: Path) -> None:
    torch.set_num_threads(1)
    data, teacher, student = _problem()
    kd = DistillConfig(
        temperature=3.0, alpha=0.7, hidden_weight=0.5, layer_map={"1": "1"}
    )  # 16 -> 64: projected
    cb = DistillationCallback(teacher, kd)
    cfg = TrainConfig(epochs=3, batch_size=32, optimizer="sgd", lr=0.1, momentum=0.9, progress=False, seed=4)
    trainer = Trainer(student, cfg, callbacks=[cb])
    result = trainer.fit(data)
    trainer.save_checkpoint(out / "ckpt")
    env = current(init=False)
    if is_main_process():
        save_weights(student, out / "student.safetensors")
        save_weights(cb.projections, out / "projection.safetensors")
        info = {"world": env.world_size if env else 1, "history": result.history, "steps": result.steps}
        (out / "result.json").write_text(json.dumps(info))


def test_two_process_ddp_matches_single_process(tmp_path):
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available in this build")
    run_worker(torchrun(2), __file__, tmp_path / "ddp")
    run_worker([sys.executable], __file__, tmp_path / "single")
    ddp = json.loads((tmp_path / "ddp" / "result.json").read_text())
    single = json.loads((tmp_path / "single" / "result.json").read_text())
    assert ddp["world"] == 2 and single["world"] == 1
    assert ddp["steps"] == single["steps"] == 3 * 8
    for a, b in zip(ddp["history"], single["history"]):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
        assert a["distill_hidden"] == pytest.approx(b["distill_hidden"], rel=1e-3)
    weights = {}
    for name in ("student", "projection"):
        w_ddp = load_weights_file(tmp_path / "ddp" / f"{name}.safetensors")
        w_one = weights[name] = load_weights_file(tmp_path / "single" / f"{name}.safetensors")
        assert w_ddp.keys() == w_one.keys()
        for key in w_one:
            assert torch.allclose(w_ddp[key], w_one[key], atol=1e-5), (name, key)
    _, _, untrained = _problem()
    moved = max((weights["student"][k] - v).abs().max().item() for k, v in untrained.state_dict().items())
    assert moved > 1e-2  # training really changed the weights, so the agreement is not vacuous
    assert (tmp_path / "ddp" / "ckpt" / "model.safetensors").is_file()


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
