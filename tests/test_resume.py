"""``slimkit run RECIPE --resume``: an interrupted run goes on and ends with the very same weights.

A digits recipe (train -> structured prune with recovery training -> int8 static) is interrupted
through the runner's test hooks (as Ctrl-C would: exit 130), after its first step or in the middle
of the prune step's training, then resumed; its weights file must equal, byte for byte, that of a
run that was never interrupted. Below the CLI: the callbacks whose state is not in the model's
weights (gradual pruning masks, QAT observers, distillation projections) resume exactly too.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn
from torch.utils.data import TensorDataset

from slimkit.cli import main
from slimkit.recipes.resume import STOP_AFTER_EPOCH, STOP_AFTER_STEP, partial_folder
from slimkit.recipes.steps.saving import StepCheckpoints
from slimkit.train import TrainConfig, Trainer

TRAIN = {"epochs": 2, "lr": 0.01, "batch_size": 64, "progress": False}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One thread for every run here (the reference run included): fast on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _recipe(out: Path, steps: list | None = None) -> dict:
    return {
        "name": "resume",
        "seed": 3,
        "model": {"builtin": "digits_cnn", "kwargs": {"width": 8}},
        "data": {"name": "digits", "val_fraction": 0.1, "test_fraction": 0.5},  # 719 to train on
        "steps": steps or STEPS,
        "measure": {"repeats": 1, "warmup": 0, "batch_size": 32, "threads": 1},
        "output": str(out),
    }


STEPS = [
    {"type": "train", "train": TRAIN},
    {
        "type": "prune",
        "structured": {"ratio": 0.5, "importance": "l1"},
        "train": {**TRAIN, "epochs": 2, "lr": 0.005},
    },
    {"type": "quantize", "int8_static": {}, "calibration_samples": 64},
]


def _run(tmp_path: Path, out: Path, *options: str, steps: list | None = None) -> int:
    path = tmp_path / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(_recipe(out, steps)))
    return main(["run", str(path), "--quiet", *options])


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> bytes:
    """The weights of a run that was never interrupted."""
    tmp = tmp_path_factory.mktemp("straight")
    assert _run(tmp, tmp / "run") == 0
    return (tmp / "run" / "model.safetensors").read_bytes()


def _report_rows(run: Path) -> dict[str, dict]:
    rows = json.loads((run / "report.json").read_text())["rows"]
    return {row["step"]: row for row in rows}


def test_resume_after_the_first_step_reuses_it(tmp_path, monkeypatch, capsys, straight):
    out = tmp_path / "run"
    monkeypatch.setenv(STOP_AFTER_STEP, "train")
    assert _run(tmp_path, out) == 130
    assert "--resume goes on from the last finished epoch" in capsys.readouterr().err
    assert not out.exists()
    meta = json.loads((partial_folder(out) / "partial.json").read_text())
    assert [s["name"] for s in meta["steps"]] == ["train"]
    kept = meta["steps"][0]["figures"]
    monkeypatch.delenv(STOP_AFTER_STEP)

    # A changed recipe is refused, naming what changed, and the state is left as it was.
    assert _run(tmp_path, out, "--resume", "steps.1.train.epochs=3", "seed=4") == 2
    err = capsys.readouterr().err
    assert "--resume: the recipe differs from the one that started the interrupted run" in err
    assert "(changed: steps[1].train.epochs, seed)" in err and "Traceback" not in err
    assert not out.exists() and (partial_folder(out) / "partial.json").is_file()

    assert _run(tmp_path, out, "--resume") == 0
    assert (out / "model.safetensors").read_bytes() == straight
    log = (out / "run.log").read_text()
    assert "step 1/3: train reused" in log and "step 1/3: train (train)" not in log
    # The train row's figures are those measured before the interruption, not measured again.
    row = _report_rows(out)["train"]
    assert row["extra"]["step_time_s"] == kept["step_time_s"]
    assert row["metrics"] == kept["metrics"] and row["size_bytes"] == kept["size_bytes"]
    assert row["latency_ms"] is not None  # latency: measured at the end for every step, as always
    assert not partial_folder(out).exists()  # the run is complete: its resumable state is gone


def test_resume_in_the_middle_of_a_steps_training(tmp_path, monkeypatch, straight):
    out = tmp_path / "run"
    monkeypatch.setenv(STOP_AFTER_EPOCH, "prune:1")
    assert _run(tmp_path, out) == 130
    checkpoint = partial_folder(out) / "steps" / "1" / "checkpoints" / "train-0"
    assert json.loads((checkpoint / "state.json").read_text())["trainer"]["epoch"] == 1
    monkeypatch.delenv(STOP_AFTER_EPOCH)

    assert _run(tmp_path, out, "--resume") == 0
    assert (out / "model.safetensors").read_bytes() == straight
    log = (out / "run.log").read_text()
    assert "step 1/3: train reused" in log
    assert "training resumes from its last checkpoint (train-0)" in log
    assert list(_report_rows(out)) == ["train", "prune", "quantize"]


ONE_EPOCH = {**TRAIN, "epochs": 1}
OTHER_STEPS = [
    {"type": "train", "train": ONE_EPOCH},
    {  # a new model: restored by building the student as the step does, then loading its weights
        "type": "distill",
        "student": {"builtin": "digits_cnn", "kwargs": {"width": 4}},
        "distill": {"temperature": 4, "alpha": 0.9},
        "train": ONE_EPOCH,
    },
    {  # stored sparse: restored with load_sparse
        "type": "prune",
        "gradual": {"final_sparsity": 0.5, "end_step": 8, "frequency": 2},
        "train": ONE_EPOCH,
    },
    {"type": "quantize", "int8_dynamic": {}},
]


def test_resume_rebuilds_a_distilled_student_and_a_sparse_model(tmp_path, monkeypatch):
    assert _run(tmp_path, tmp_path / "straight", steps=OTHER_STEPS) == 0
    out = tmp_path / "run"
    monkeypatch.setenv(STOP_AFTER_STEP, "prune")
    assert _run(tmp_path, out, steps=OTHER_STEPS) == 130
    monkeypatch.delenv(STOP_AFTER_STEP)
    assert _run(tmp_path, out, "--resume", steps=OTHER_STEPS) == 0
    assert "step 3/4: prune reused" in (out / "run.log").read_text()
    straight = tmp_path / "straight" / "model.safetensors"
    assert (out / "model.safetensors").read_bytes() == straight.read_bytes()


def test_resume_after_the_export_step_reopens_its_onnx_file(tmp_path, monkeypatch):
    steps = [{"type": "train", "train": ONE_EPOCH}, {"type": "export"}]
    out = tmp_path / "run"
    monkeypatch.setenv(STOP_AFTER_STEP, "export")
    assert _run(tmp_path, out, steps=steps) == 130
    kept = (partial_folder(out) / "steps" / "1" / "model.onnx").read_bytes()
    monkeypatch.delenv(STOP_AFTER_STEP)
    assert _run(tmp_path, out, "--resume", steps=steps) == 0
    assert (out / "model.onnx").read_bytes() == kept
    row = _report_rows(out)["export"]
    assert row["latency_ms"] > 0 and row["extra"]["runtime"] == "onnxruntime"  # timed in ONNX Runtime


def test_resume_with_nothing_to_resume(tmp_path, capsys):
    out = tmp_path / "never"
    assert _run(tmp_path, out, "--resume") == 2
    err = capsys.readouterr().err
    assert f"--resume: nothing to resume for {out}" in err and "Traceback" not in err
    assert not out.exists() and not partial_folder(out).exists()


def test_a_run_without_resume_starts_over(tmp_path):
    from slimkit.recipes import parse_recipe
    from slimkit.recipes.resume import PartialRun

    recipe = parse_recipe(_recipe(tmp_path / "run"))
    folder = partial_folder(recipe.output)
    (folder / "steps" / "0").mkdir(parents=True)
    (folder / "partial.json").write_text("{}")
    partial = PartialRun(recipe, resume=False)
    assert partial.discarded and not folder.exists() and partial.finished == []


# -- callbacks whose state is not in the model's weights ------------------------------------------------
def _data(n=256):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 12, generator=g)
    return TensorDataset(x, (x[:, 0] + 0.5 * x[:, 1] > 0).long())


def _mlp(width=32, seed=1):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, width), nn.ReLU(), nn.Linear(width, 2))


def _interrupted_then_resumed(tmp_path, make, cfg: TrainConfig) -> tuple[nn.Module, nn.Module]:
    """``make() -> (model, callbacks)``; the model trained straight, and trained with a stop after
    epoch 1 then resumed by a new Trainer (new callbacks, global RNG disturbed)."""
    straight, callbacks = make()
    Trainer(straight, cfg, callbacks=callbacks).fit(_data())
    folder = tmp_path / "ckpt"
    model, callbacks = make()
    stop = StepCheckpoints(tmp_path, stop_after_epoch=1).callback(folder)
    with pytest.raises(KeyboardInterrupt):
        Trainer(model, cfg, callbacks=[*callbacks, stop]).fit(_data())
    model, callbacks = make()
    torch.manual_seed(12345)
    keep = StepCheckpoints(tmp_path).callback(folder)
    Trainer(model, cfg, callbacks=[*callbacks, keep]).fit(_data(), resume_from=folder)
    return straight, model


def _same(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


CFG = TrainConfig(epochs=3, batch_size=32, lr=0.01, progress=False, seed=5)


def test_gradual_pruning_resumes_with_its_masks(tmp_path):
    from slimkit.prune import GradualConfig, prune_

    def make():
        model = _mlp()
        config = GradualConfig(final_sparsity=0.8, end_step=20, frequency=3, include=["0", "2"])
        return model, [prune_(model, config).callback]

    straight, resumed = _interrupted_then_resumed(tmp_path, make, CFG)
    _same(straight, resumed)  # recomputed at the resume step, the masks would prune at another sparsity
    assert float((straight[0].weight == 0).float().mean()) == pytest.approx(0.8, abs=0.01)


def test_qat_resumes_with_its_observers(tmp_path):
    from slimkit.quant import QATCallback, QATConfig, quantize_

    def make():
        model = _mlp()
        config = QATConfig(activation_observer="moving_average", momentum=0.1)
        quantize_(model, config)
        return model, [QATCallback(config)]

    straight, resumed = _interrupted_then_resumed(tmp_path, make, CFG)
    _same(straight, resumed)
    assert torch.equal(straight[0].act_observer.lo, resumed[0].act_observer.lo)


def test_distillation_resumes_with_its_projections(tmp_path):
    from slimkit.distill import DistillationCallback, DistillConfig

    torch.manual_seed(7)
    teacher = _mlp(width=64, seed=7).eval()
    config = DistillConfig(temperature=3.0, alpha=0.7, hidden_weight=0.5, layer_map={"1": "1"})
    callbacks = []

    def make():
        callbacks.append(DistillationCallback(teacher, config))  # 16 -> 64: a learned projection
        return _mlp(width=16), [callbacks[-1]]

    straight, resumed = _interrupted_then_resumed(tmp_path, make, CFG)
    _same(straight, resumed)
    _same(callbacks[0].projections, callbacks[2].projections)


# -- restore hooks of the steps that build a new model (tiny encoder, no training loop of ctx.train) --------
def _tiny_text_context(tmp_path):
    import logging

    from slimkit.recipes import MeasureConfig, RunContext
    from slimkit.tasks import build_task
    from tests.transfer_helpers import tiny_bert, tokenizer, toy_bundle

    tok = tokenizer()
    data = toy_bundle(n=32)
    task = build_task(data, tok, max_length=16)
    log = logging.getLogger("test_resume")
    return RunContext(tiny_bert(tok.vocab_size), data, task, tmp_path, log, MeasureConfig(), tokenizer=tok)


@pytest.mark.parametrize(
    "body",
    [
        {"type": "finetune", "finetune": {"strategy": "lora", "lora": {"merge": False}}},
        {"type": "finetune", "finetune": {"strategy": "linear_probe"}},
        {"type": "multitask", "multitask": {"tasks": [{"name": "own"}, {"name": "other", "data": "TABLE"}]}},
    ],
    ids=["finetune_lora", "finetune_probe", "multitask"],
)
def test_restore_rebuilds_the_model_a_transfer_step_made(tmp_path, body):
    from slimkit.recipes.steps import step_type
    from slimkit.recipes.steps.saving import SavedModel
    from slimkit.utils.io import load_weights, save_weights

    if "lora" in body.get("finetune", {}).get("strategy", ""):
        pytest.importorskip("peft")
    table = tmp_path / "other.csv"
    table.write_text("text,label\n" + "".join(f"word{i % 3} item {i},{i % 3}\n" for i in range(30)))
    body = json.loads(json.dumps(body).replace('"TABLE"', json.dumps({"name": "table", "path": str(table)})))
    kind = step_type(body.pop("type"), "type")
    cfg = kind.parse({**body, "train": {"epochs": 1, "batch_size": 16, "progress": False}}, "steps[0]")
    ctx = _tiny_text_context(tmp_path)
    made = kind.run(ctx, cfg).model
    save_weights(made, tmp_path / "step.safetensors")
    torch.manual_seed(99)  # what the rebuilt model draws at creation is overwritten by the file
    rebuilt = kind.rebuild(ctx, cfg, SavedModel(tmp_path / "step.safetensors", load_weights))
    assert type(rebuilt) is type(made) and rebuilt.training == made.training
    _same(made, rebuilt)
    flags = [(n, p.requires_grad) for n, p in made.named_parameters()]
    assert [
        (n, p.requires_grad) for n, p in rebuilt.named_parameters()
    ] == flags  # later steps train the same


# -- steps whose library trains with its own Trainer (finetune, multitask) resume mid-step too -------------
def _text_run(tmp_path: Path, out: Path, folder: Path, step: dict, *options: str) -> int:
    table = tmp_path / "toy.csv"
    rows = [("good great nice", 1), ("bad awful poor", 0)] * 20
    table.write_text("text,label\n" + "".join(f"{t} item {i},{y}\n" for i, (t, y) in enumerate(rows)))
    step = json.loads(json.dumps(step).replace('"TABLE"', json.dumps(str(table))))
    recipe = {
        "name": "resume_text",
        "seed": 5,
        "model": {"hf": str(folder)},
        "data": {"name": "table", "path": str(table), "columns": {"text": "text", "label": "label"}},
        "steps": [step],
        "measure": {"repeats": 1, "warmup": 0, "batch_size": 8, "max_length": 16, "threads": 1},
        "output": str(out),
    }
    path = tmp_path / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return main(["run", str(path), "--quiet", *options])


TEXT_TRAIN = {"epochs": 3, "lr": 0.003, "batch_size": 8, "progress": False}
TEXT_STEPS = {
    "finetune": {"type": "finetune", "finetune": {"strategy": "full"}, "train": TEXT_TRAIN},
    "multitask": {
        "type": "multitask",
        "multitask": {
            "max_length": 16,
            "tasks": [{"name": "own"}, {"name": "other", "data": {"name": "table", "path": "TABLE"}}],
        },
        "train": TEXT_TRAIN,
    },
}


@pytest.mark.parametrize(
    "kind", ["finetune", pytest.param("multitask", marks=pytest.mark.slow)], ids=["finetune", "multitask"]
)
def test_transfer_steps_resume_in_the_middle_of_their_training(tmp_path, monkeypatch, kind):
    from tests.transfer_helpers import save_tiny_bert

    folder = save_tiny_bert(tmp_path / "tiny_bert")
    step = TEXT_STEPS[kind]
    assert _text_run(tmp_path, tmp_path / "straight", folder, step) == 0
    out = tmp_path / "run"
    monkeypatch.setenv(STOP_AFTER_EPOCH, f"{kind}:1")
    assert _text_run(tmp_path, out, folder, step) == 130
    monkeypatch.delenv(STOP_AFTER_EPOCH)
    assert _text_run(tmp_path, out, folder, step, "--resume") == 0
    assert "training resumes from its last checkpoint" in (out / "run.log").read_text()
    assert (out / "model.safetensors").read_bytes() == (
        tmp_path / "straight" / "model.safetensors"
    ).read_bytes()
