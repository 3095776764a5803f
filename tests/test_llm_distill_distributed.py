"""Token-level distillation of a depth-pruned tiny Llama under ``torchrun --nproc_per_node=2`` (DDP, gloo)
matches one process at the same global batch: the KL is a mean over scored tokens, every window scores
the same number of them, so the ranks' means combine into the one-process mean.

The test launches this very file with torchrun and once as a plain process (tests/torchrun_helpers.py).
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import torch

from tests.torchrun_helpers import two_processes_and_one


def _student_before_training() -> dict:
    from tests.test_llm_distill import _lm

    return _lm(4).state_dict()


def _worker(out: Path) -> None:
    from slimkit.distill import DistillationCallback, DistillConfig
    from slimkit.prune import DepthConfig, prune_
    from slimkit.tasks import lm_loss, text_forward
    from slimkit.train import TrainConfig, Trainer
    from slimkit.train.distributed import current, is_main_process
    from tests.test_llm_distill import _batch, _lm, _windows

    torch.set_num_threads(1)
    teacher = _lm(4).eval()
    windows = torch.utils.data.Subset(_windows(), range(24))  # 3 global batches of 8 (4 per rank)
    student = copy.deepcopy(teacher)
    prune_(student, DepthConfig(blocks=2), calibration=[_batch(windows)], forward=text_forward)
    kd = DistillationCallback(teacher, DistillConfig(output_loss="token_kd", temperature=2.0, alpha=0.5))
    # SGD, not Adam: Adam turns the rounding noise of near-zero gradients into whole steps
    cfg = TrainConfig(epochs=2, batch_size=8, optimizer="sgd", lr=1.0, momentum=0.9, progress=False, seed=3)
    result = Trainer(student, cfg, callbacks=[kd], forward=text_forward, loss_fn=lm_loss).fit(windows)
    env = current(init=False)
    if is_main_process():
        torch.save({k: v.detach().clone() for k, v in student.state_dict().items()}, out / "results.pt")
        info = {"world": env.world_size if env else 1, "history": result.history, "steps": result.steps}
        (out / "result.json").write_text(json.dumps(info))


def test_two_process_token_distillation_matches_one_process(tmp_path):
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available in this build")
    runs = two_processes_and_one(__file__, tmp_path)
    (ddp, w_ddp), (single, w_one) = runs["ddp"], runs["single"]
    assert ddp["world"] == 2 and single["world"] == 1 and ddp["steps"] == single["steps"] == 6
    for a, b in zip(ddp["history"], single["history"]):
        assert a["distill_output"] == pytest.approx(b["distill_output"], rel=1e-4)
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
    assert single["history"][0]["distill_output"] > 1e-3  # the student really differs from the teacher
    for key in w_one:
        assert torch.allclose(w_ddp[key], w_one[key], atol=1e-5), key
    start = w_one["model.embed_tokens.weight"]  # tied: moved by both ends of the model
    untrained = _student_before_training()["model.embed_tokens.weight"]
    assert (start - untrained).abs().max() > 1e-3  # training changed the weights: agreement is not vacuous


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
