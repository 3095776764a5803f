"""Calibration under ``torchrun --nproc_per_node=2`` (gloo, CPU) builds the layers one process builds.

The test launches this very file with torchrun (two CPU processes, each taking its share of the
calibration batches through ``RunContext.calibration_batches(shard=True)``, as the quantize step
does) and once as a plain process on all the batches. Both write every case's quantized state and
logits; the statistics summed across the processes must give the same int4/int8 codes and the same
logits as one process.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from slimkit.errors import ConfigError, DataError
from slimkit.quant import config_from_dict, quantize_
from slimkit.train.distributed import current, is_main_process
from tests.torchrun_helpers import launch, run_worker, torchrun

pytest.importorskip("transformers")

GPTQ = {"method": "weight_only", "bits": 4, "group_size": 32, "algorithm": "gptq"}
CASES = {
    # block by block, true-sequential stages: Hessians summed per stage
    "gptq": {**GPTQ, "sequential": True},
    # all at once (prepare_ -> calibrate -> convert_): Hessians summed in convert_
    "gptq_at_once": {**GPTQ, "sequential": False},
    # block by block: |x| sums and the row samples (the budget holds all 4 x 2 x 16 rows)
    "awq": {"method": "awq", "group_size": 32, "samples": 512, "grid": 10},
    # a budget of 48 rows: batch 0 whole, then every other row of batch 1, from rank 1's sample
    "awq_budget": {"method": "awq", "group_size": 32, "samples": 48, "grid": 10},
    "smoothquant": {"method": "int8_dynamic", "smoothquant": True},  # per-channel max of |x|
    "int8_static_percentile": {"method": "int8_static", "activation_observer": "percentile"},
}
REFUSED = {
    "activation_observer": {"method": "int8_static", "activation_observer": "moving_average"},
    "method": {"method": "mixed", "low": {"method": "int8_dynamic"}, "max_high_layers": 1},
}
BATCHES, BATCH, SEQ = 4, 2, 16


def _model():
    from tests.llm_helpers import tiny_lm

    model = tiny_lm("llama", seed=0)
    gen = torch.Generator().manual_seed(1)
    # Uneven norm gains give the layers' inputs a few strong channels, as trained LLMs have (AWQ and
    # SmoothQuant then have something to find).
    for module in model.modules():
        if type(module).__name__.endswith("RMSNorm"):
            n = module.weight.numel()
            module.weight.data = torch.linspace(0.2, 4.0, n)[torch.randperm(n, generator=gen)]
    return model


def _context():
    """A RunContext whose train split is BATCHES x BATCH token windows (what the quantize step reads)."""
    from slimkit.recipes.steps.base import RunContext

    gen = torch.Generator().manual_seed(2)
    windows = [torch.randint(0, 40, (SEQ,), generator=gen) for _ in range(BATCHES * BATCH)]

    def loader(data, batch_size):
        for i in range(0, len(data), batch_size):
            yield {"input_ids": torch.stack(data[i : i + batch_size])}

    task = SimpleNamespace(loader=loader)
    return RunContext(None, SimpleNamespace(train=windows), task, Path("."), logging.getLogger("t"), None)


def _quantize(case: dict, batches: list) -> dict[str, torch.Tensor]:
    model = _model()
    quantize_(model, config_from_dict(case), calibration_data=batches)
    probe = torch.arange(24).reshape(2, 12) % 40
    with torch.no_grad():
        logits = model(input_ids=probe).logits
    return {"logits": logits, **{k: v.clone() for k, v in model.state_dict().items()}}


def _unchanged(model) -> bool:
    fresh = _model().state_dict()
    state = model.state_dict()
    return state.keys() == fresh.keys() and all(torch.equal(state[k], fresh[k]) for k in fresh)


def _bad_shares(ctx, env) -> dict[str, str]:
    """Errors every rank raises alike (none waits for another): too few batches, a rank without any."""
    out = {}
    try:
        ctx.calibration_batches(BATCH, batch_size=BATCH, shard=True)  # one batch for two processes
    except ConfigError as err:
        out["too_few"] = str(err)
    share = ctx.calibration_batches(BATCHES * BATCH, batch_size=BATCH, shard=True)
    try:
        quantize_(_model(), config_from_dict(CASES["gptq"]), calibration_data=share if env.rank == 0 else [])
    except DataError as err:
        out["rank_without_batches"] = str(err)
    return out


def _worker(out: Path) -> None:
    torch.set_num_threads(1)
    ctx = _context()
    batches = ctx.calibration_batches(BATCHES * BATCH, batch_size=BATCH, shard=True)
    env = current(init=False)
    results = {name: _quantize(case, batches) for name, case in CASES.items()}
    if env is None:  # one process on half the data: must differ, or the equality proves nothing
        results["gptq_half"] = _quantize(CASES["gptq"], batches[::2])
    refused = {}
    for field, case in REFUSED.items():
        model = _model()
        try:
            quantize_(model, config_from_dict(case), calibration_data=batches)
        except ConfigError as err:
            refused[field] = {"path": err.path, "message": err.message, "untouched": _unchanged(model)}
    errors = _bad_shares(ctx, env) if env else {}
    if is_main_process(env):
        torch.save(results, out / "results.pt")
        info = {"world": env.world_size if env else 1, "batches": len(batches), "refused": refused, **errors}
        (out / "result.json").write_text(json.dumps(info))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available in this build")
    tmp = tmp_path_factory.mktemp("quant_dist")
    run_worker(torchrun(2), __file__, tmp / "ddp")
    run_worker([sys.executable], __file__, tmp / "single")
    return {
        name: (json.loads((tmp / name / "result.json").read_text()), torch.load(tmp / name / "results.pt"))
        for name in ("ddp", "single")
    }


def _codes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if not v.is_floating_point()}


@pytest.mark.parametrize("case", list(CASES))
def test_two_processes_build_the_layers_one_process_builds(runs, case):
    (ddp_info, ddp), (one_info, one) = runs["ddp"], runs["single"]
    assert ddp_info["world"] == 2 and one_info["world"] == 1
    assert (ddp_info["batches"], one_info["batches"]) == (BATCHES // 2, BATCHES)  # each rank: half
    a, b = ddp[case], one[case]
    assert a.keys() == b.keys()
    codes = _codes(b)
    assert len(codes) >= 14  # the 14 Linear layers of the two blocks were quantized
    for key in codes:  # integer codes: identical
        assert torch.equal(a[key], b[key]), key
    # Float statistics summed in another order (float64 Hessians, float32 |x| sums) differ in the
    # last bits only; scales and logits agree far inside 1e-5.
    for key in b.keys() - codes.keys():
        assert torch.allclose(a[key], b[key], rtol=1e-5, atol=1e-7), key
    scale = b["logits"].abs().max()
    assert (a["logits"] - b["logits"]).abs().max() <= 1e-5 * scale


def test_half_the_batches_alone_give_other_codes(runs):
    one = runs["single"][1]
    full, half = _codes(one["gptq"]), _codes(one["gptq_half"])
    assert any(not torch.equal(full[k], half[k]) for k in full)


def test_statistics_that_cannot_be_merged_are_refused_under_torchrun(runs):
    assert runs["single"][0]["refused"] == {}  # one process: both accepted
    refused = runs["ddp"][0]["refused"]
    assert set(refused) == set(REFUSED)
    for field, name in (("activation_observer", "moving_average"), ("method", "mixed")):
        assert refused[field]["path"] == field
        message = refused[field]["message"]
        assert f"{name} cannot be calibrated across processes under torchrun (2 processes)" in message
        assert "run it in one process" in message
        assert refused[field]["untouched"]  # refused before any calibration pass: the model as it was


def test_every_rank_raises_alike_on_too_little_data(runs):
    info = runs["ddp"][0]
    assert info["too_few"].startswith("calibration_samples: 2 samples make 1 batch(es) of 2, fewer than")
    assert "process 1 got no batches" in info["rank_without_batches"]


RECIPE = """
name: gptq_torchrun
seed: 0
model: {{hf: {folder}, hf_task: causal_lm}}
data: {{name: text, path: {text}, seq_len: 32}}
steps:
  - type: quantize
    name: gptq
    weight_only: {{bits: 4, group_size: 32, algorithm: gptq, overrides: {{lm_head: null}}}}
    calibration_samples: 64       # 2 batches of 32 windows: one per process under torchrun
measure: {{latency: false, generation: {{enabled: false}}}}
"""


def test_quantize_step_under_torchrun_writes_what_one_process_writes(tmp_path):
    """The recipe step: each rank takes every other calibration batch, only rank 0 writes the run."""
    from slimkit.utils.io import load_weights_file
    from tests.llm_helpers import save_tiny_lm, text_lines

    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available in this build")
    folder = save_tiny_lm(tmp_path / "tiny-llama", "llama")
    text = tmp_path / "corpus.txt"
    text.write_text(text_lines(600))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE.format(folder=folder, text=text))
    # Both runs in one thread a process: the same arithmetic, so the statistics differ only in the
    # order they were summed in (with other thread counts, matmuls round differently).
    for launcher, out in ((torchrun(2), "ddp"), ([sys.executable], "single")):
        launch([*launcher, "-m", "slimkit.cli", "run", str(recipe), "-q", f"output={tmp_path / out}"])
    # rank 1 ran in a scratch folder of its own: nothing else was written beside the two runs
    assert {p.name for p in tmp_path.iterdir()} == {
        "tiny-llama",
        "corpus.txt",
        "recipe.yaml",
        "ddp",
        "single",
    }
    reports = [json.loads((tmp_path / n / "report.json").read_text()) for n in ("ddp", "single")]
    rows = [{r["step"]: r for r in report["rows"]} for report in reports]
    assert rows[0]["gptq"]["extra"]["quantized_layers"] == rows[1]["gptq"]["extra"]["quantized_layers"] == 14
    ppl = [r["gptq"]["metrics"]["perplexity"] for r in rows]
    assert ppl[0] == pytest.approx(ppl[1], rel=1e-9)
    weights = [load_weights_file(tmp_path / n / "model.safetensors") for n in ("ddp", "single")]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[1])


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
