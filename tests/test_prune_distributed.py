"""Wanda and SparseGPT under ``torchrun --nproc_per_node=2`` prune as one process does on all the batches.

Each process takes its share of the calibration batches (as the prune step does,
``calibration_batches(shard=True)``); the input norms (Wanda) and Hessians (SparseGPT) are summed
across the processes before each block's layers are pruned, so both processes, and one process
alone on every batch, choose the same masks.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from slimkit.errors import DataError
from slimkit.prune import SparseGPTConfig, WandaConfig, prune_
from slimkit.train.distributed import current, is_main_process
from tests.torchrun_helpers import two_processes_and_one

pytest.importorskip("transformers")

CASES = {
    "wanda": lambda: WandaConfig(sparsity=0.5),
    "wanda_2_4": lambda: WandaConfig(n_m="2:4"),
    "sparsegpt": lambda: SparseGPTConfig(sparsity=0.5),
    "sparsegpt_at_once": lambda: SparseGPTConfig(n_m="2:4", sequential=False),
}
BATCHES = 4


def _model():
    from tests.test_prune_calibrated import _model as uneven_llama

    return uneven_llama()


def _prune(make, batches: list) -> dict[str, torch.Tensor]:
    model = _model()
    summary = prune_(model, make(), calibration_data=batches)
    probe = torch.arange(24).reshape(2, 12) % 40
    with torch.no_grad():
        logits = model(input_ids=probe).logits
    return {"logits": logits, **{f"mask:{k}": v for k, v in summary.masks.items()}, **model.state_dict()}


def _worker(out: Path) -> None:
    from tests.test_prune_calibrated import _batches

    torch.set_num_threads(1)
    env = current()  # joins torchrun's group (as the prune step's calibration_batches does)
    everything = _batches(BATCHES)
    share = everything[env.rank :: env.world_size] if env else everything
    results = {name: _prune(make, share) for name, make in CASES.items()}
    if env is None:  # half the batches alone must differ, or the equality proves nothing
        results["wanda_half"] = _prune(CASES["wanda"], everything[::2])
    info = {"world": env.world_size if env else 1, "batches": len(share)}
    if env is not None:
        try:
            prune_(_model(), CASES["sparsegpt"](), calibration_data=share if env.rank == 0 else [])
        except DataError as err:
            info["rank_without_batches"] = str(err)
    if is_main_process(env):
        torch.save(results, out / "results.pt")
        (out / "result.json").write_text(json.dumps(info))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available in this build")
    return two_processes_and_one(__file__, tmp_path_factory.mktemp("prune_dist"))


@pytest.mark.parametrize("case", list(CASES))
def test_two_processes_prune_as_one_process_does(runs, case):
    (ddp_info, ddp), (one_info, one) = runs["ddp"], runs["single"]
    assert (ddp_info["world"], one_info["world"]) == (2, 1)
    assert (ddp_info["batches"], one_info["batches"]) == (BATCHES // 2, BATCHES)
    a, b = ddp[case], one[case]
    masks = [k for k in b if k.startswith("mask:")]
    assert len(masks) == 14  # the 14 Linear layers of the two blocks (the tied lm_head is skipped)
    for key in masks:  # the same weights pruned
        assert torch.equal(a[key], b[key]), key
    # statistics summed in another order differ in their last bits; SparseGPT's updates with them
    for key in b.keys() - set(masks):
        assert torch.allclose(a[key], b[key], rtol=1e-5, atol=1e-6), key


def test_half_the_batches_alone_choose_other_masks(runs):
    one = runs["single"][1]
    full, half = one["wanda"], one["wanda_half"]
    assert any(not torch.equal(full[k], half[k]) for k in full if k.startswith("mask:"))


def test_a_process_without_batches_fails_on_every_process(runs):
    message = runs["ddp"][0]["rank_without_batches"]
    assert message == "calibration: no batches were given to process 1 under torchrun (2 processes)"


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
