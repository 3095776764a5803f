"""The calibration core's collectors (slimkit.calibration.collectors) and its block driver under torchrun."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from slimkit.calibration.collectors import HessianAccumulator, InputNorm, require_fed
from slimkit.errors import DataError
from tests.torchrun_helpers import run_worker, torchrun


def test_input_norm_is_wandas_column_norm_over_every_row_seen():
    g = torch.Generator().manual_seed(0)
    parts = [torch.randn(3, 5, 8, generator=g), torch.randn(2, 7, 8, generator=g) * 3]
    norm = InputNorm(8)
    for x in parts:
        norm.update(x)
    rows = torch.cat([x.reshape(-1, 8) for x in parts]).double()  # 29 rows
    assert norm.n == 29
    assert torch.allclose(norm.norm().double(), rows.pow(2).sum(0).sqrt(), rtol=1e-6)
    assert torch.allclose(norm.rms().double(), rows.pow(2).mean(0).sqrt(), rtol=1e-6)
    # How the rows were batched does not matter (float64 sums, float32 result).
    whole = InputNorm(8)
    whole.update(rows.float())
    assert torch.equal(whole.norm(), norm.norm())
    with pytest.raises(DataError, match="saw no input during calibration: fresh"):
        require_fed({"fresh": {"norm": InputNorm(8)}, "fed": {"norm": norm}})


BATCHES = 4


def _batches() -> list[dict]:
    g = torch.Generator().manual_seed(3)
    return [{"input_ids": torch.randint(0, 40, (2, 16), generator=g)} for _ in range(BATCHES)]


def _worker(out: Path) -> None:
    from slimkit.calibration.blocks import calibrate_by_block_
    from slimkit.tasks import text_forward
    from slimkit.train.distributed import current, is_main_process
    from tests.llm_helpers import tiny_lm

    torch.set_num_threads(1)
    env = current()
    batches = _batches()[env.rank :: env.world_size] if env else _batches()
    model = tiny_lm("llama", seed=0)
    stats = {}

    def build(name, module, found):
        stats[name] = {"norm": found["norm"].norm(), "n": found["norm"].n, "h": found["h"].hessian()}
        return torch.nn.Linear(module.in_features, module.out_features, bias=False).requires_grad_(False)

    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "layers" in n]
    calibrate_by_block_(
        model, batches, text_forward, layers=names, build=build, true_sequential=True, env=env,
        collectors=lambda n, m: {"norm": InputNorm(m.in_features), "h": HessianAccumulator(m.in_features)},
    )  # fmt: skip
    if is_main_process(env):
        torch.save(stats, out / "stats.pt")


@pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")
def test_two_processes_merge_to_the_statistics_of_one(tmp_path):
    pytest.importorskip("transformers")
    run_worker(torchrun(2), __file__, tmp_path / "ddp")
    run_worker([sys.executable], __file__, tmp_path / "single")
    ddp, one = (torch.load(tmp_path / k / "stats.pt") for k in ("ddp", "single"))
    assert ddp.keys() == one.keys() and len(one) == 14
    for name in one:
        assert ddp[name]["n"] == one[name]["n"] == BATCHES * 2 * 16, name
        assert torch.equal(ddp[name]["norm"], one[name]["norm"]), name
        assert torch.equal(ddp[name]["h"], one[name]["h"]), name


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
