"""Activation-function replacement: found by type and by Hugging Face class, replaced, measured.

The library (``slimkit.activations``) on tiny models, the approximation error of the piecewise-linear
tables against the interpolation bound, and the ``replace_activations`` recipe step through the CLI
(recovery by fine-tuning and by distillation from the original, ``--resume``, bad input).
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from slimkit.activations import (
    HardGELU,
    PiecewiseLinear,
    ReplaceActivationsConfig,
    find_activations,
    plan_replacements,
    replace_activations_,
)
from slimkit.cli import main
from slimkit.errors import ConfigError
from slimkit.models import DigitsCNN
from slimkit.recipes.resume import STOP_AFTER_STEP
from slimkit.utils.io import load_weights, save_weights


def tiny_bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    )
    return BertModel(config).eval()


def tiny_llama():
    from transformers import LlamaForCausalLM

    from tests.llm_helpers import tiny_config

    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_config("llama", vocab_size=128, positions=32)).eval()


def bert_inputs():
    ids = torch.randint(1, 100, (4, 10), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


# -- finding --------------------------------------------------------------------------------------------
def test_hugging_face_activations_are_found_by_class_not_by_path():
    from transformers.activations import GELUActivation, NewGELUActivation

    bert = tiny_bert()
    assert find_activations(bert) == {
        "encoder.layer.0.intermediate.intermediate_act_fn": "gelu",
        "encoder.layer.1.intermediate.intermediate_act_fn": "gelu",
        "pooler.activation": "tanh",
    }
    llama = find_activations(tiny_llama())
    assert set(llama.values()) == {"silu"} and len(llama) == 2  # one per decoder block (ACT2FN["silu"])

    class MyGELU(NewGELUActivation):  # a subclass anywhere in any model is still a GELU
        pass

    odd = nn.ModuleDict(
        {"x": nn.Sequential(nn.Linear(2, 2), MyGELU()), "y": GELUActivation(), "z": nn.ReLU()}
    )
    assert find_activations(odd) == {"x.1": "gelu", "y": "gelu"}


# -- replacing ----------------------------------------------------------------------------------------
def test_relu_replaces_the_gelus_keeps_the_pooler_and_changes_outputs_by_a_measured_amount():
    model, x = tiny_bert(), bert_inputs()
    with torch.no_grad():
        ref = model(**x)
    summary = replace_activations_(model, ReplaceActivationsConfig(to="relu"))
    assert summary.counts == {"gelu": 2} and list(summary.kept.values()) == ["tanh"]
    for name in summary.replaced:
        assert type(model.get_submodule(name)) is nn.ReLU
    assert isinstance(model.pooler.activation, nn.Tanh)
    assert summary.max_error["gelu"] == pytest.approx(0.16997, abs=1e-4)  # |GELU - ReLU| peaks at x ~ -0.75
    with torch.no_grad():
        out = model(**x)
    err = float((out.last_hidden_state - ref.last_hidden_state).norm() / ref.last_hidden_state.norm())
    assert 1e-3 < err < 0.05  # 0.012 measured
    assert "gelu         2 ReLU" in summary.table()


def test_hard_targets_pick_the_matching_hard_function_per_kind():
    model = nn.Sequential(nn.GELU(), nn.SiLU(), nn.Tanh(), nn.Sigmoid())
    hard = copy.deepcopy(model)
    s1 = replace_activations_(hard, ReplaceActivationsConfig(to="hardswish"))
    s2 = replace_activations_(hard, ReplaceActivationsConfig(to="hardsigmoid"))
    assert [type(m) for m in hard] == [HardGELU, nn.Hardswish, nn.Hardtanh, nn.Hardsigmoid]
    assert s1.counts == {"gelu": 1, "silu": 1} and s2.counts == {"tanh": 1, "sigmoid": 1}
    # measured largest |new - old| on [-8, 8]: hard-GELU is 2.5x closer to GELU than ReLU is
    assert s1.max_error["gelu"] == pytest.approx(0.0686, abs=1e-3)
    assert s1.max_error["silu"] == pytest.approx(0.1425, abs=1e-3)
    assert s2.max_error["tanh"] == pytest.approx(0.2384, abs=1e-3)
    assert s2.max_error["sigmoid"] == pytest.approx(0.0692, abs=1e-3)


# max |f''| of each kind (GELU: 2 phi(0); SiLU: 1/2; tanh: 4 / (3 sqrt 3); sigmoid: 1 / (6 sqrt 3))
CURVATURE = {
    "gelu": 2 / math.sqrt(2 * math.pi),
    "silu": 0.5,
    "tanh": 4 / (3 * math.sqrt(3)),
    "sigmoid": 1 / (6 * math.sqrt(3)),
}
FUNCTIONS = {"gelu": nn.GELU(), "silu": nn.SiLU(), "tanh": nn.Tanh(), "sigmoid": nn.Sigmoid()}
ASYMPTOTE_GAP = {  # |f - asymptote| at x = r (where the tails begin)
    "gelu": lambda r: r * 0.5 * math.erfc(r / math.sqrt(2)),
    "silu": lambda r: r / (1 + math.exp(r)),
    "tanh": lambda r: 1 - math.tanh(r),
    "sigmoid": lambda r: 1 / (1 + math.exp(r)),
}


@pytest.mark.parametrize("kind", list(FUNCTIONS))
def test_piecewise_linear_error_is_within_the_interpolation_bound(kind):
    """max error <= h^2/8 max|f''| + the asymptote gap at the range end; doubling segments ~ /3 or better."""
    f = FUNCTIONS[kind]
    x = torch.linspace(-30, 30, 600_001)
    errors = {}
    for k in (8, 16, 32):
        pwl = PiecewiseLinear.fit(f, kind, k)
        r = float(pwl.breaks[-1])
        h = 2 * r / k
        errors[k] = float((pwl(x) - f(x)).abs().max())
        assert errors[k] <= h * h / 8 * CURVATURE[kind] + ASYMPTOTE_GAP[kind](r) + 1e-6, (k, errors[k])
    assert errors[16] < errors[8] / 2.2 and errors[32] < errors[16] / 2.2
    # the GELU figure the docs quote: 16 segments, largest error 0.0108
    if kind == "gelu":
        assert errors[16] == pytest.approx(0.0108, abs=5e-4)


def test_piecewise_linear_has_the_gradient_of_its_segment_and_keeps_the_state_dict():
    pwl = PiecewiseLinear.fit(nn.GELU(), "gelu", 16)
    x = torch.tensor([-20.0, 0.1, 20.0], requires_grad=True)
    pwl(x).sum().backward()
    assert x.grad[0] == 0 and x.grad[2] == 1 and 0.4 < x.grad[1] < 0.7  # GELU'(0.1) = 0.58
    assert pwl.state_dict() == {}  # nothing persistent: the weights file is the model's own
    assert pwl(torch.ones(2, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_gelu_pwl_on_the_encoder_is_close_and_reloads_by_reapplying(tmp_path):
    model, x = tiny_bert(), bert_inputs()
    with torch.no_grad():
        ref = model(**x).last_hidden_state
    config = ReplaceActivationsConfig(to="pwl", pwl_segments=16, from_=["gelu"], exclude=["pooler.*"])
    summary = replace_activations_(model, config)
    assert summary.counts == {"gelu": 2} and summary.max_error["gelu"] < 0.011
    with torch.no_grad():
        out = model(**x).last_hidden_state
    assert 0 < float((out - ref).norm() / ref.norm()) < 0.005  # 0.0019 measured
    save_weights(model, tmp_path / "m.safetensors")
    fresh = tiny_bert()
    replace_activations_(fresh, config)
    load_weights(fresh, tmp_path / "m.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(fresh(**x).last_hidden_state, out)


def test_layer_patterns_choose_where():
    model = tiny_bert()
    config = ReplaceActivationsConfig(to="pwl", layers=["encoder.layer.0.*", "activation"])
    assert set(plan_replacements(model, config)) == {
        "encoder.layer.0.intermediate.intermediate_act_fn",
        "pooler.activation",  # a bare name matches as a suffix
    }
    config = ReplaceActivationsConfig(to="pwl", exclude=["encoder.layer.1.*"])
    assert len(plan_replacements(model, config)) == 2


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda: ReplaceActivationsConfig(to="swish"), "to"),
        (lambda: ReplaceActivationsConfig(from_=["relu"]), "from_[0]"),
        (lambda: ReplaceActivationsConfig(to="relu", from_=["tanh"]), "from_[0]"),
        (lambda: ReplaceActivationsConfig(from_=[]), "from_"),
        (lambda: ReplaceActivationsConfig(from_=["gelu", "gelu"]), "from_"),
        (lambda: ReplaceActivationsConfig(layers=[]), "layers"),
        (lambda: ReplaceActivationsConfig(exclude=[""]), "exclude[0]"),
        (lambda: ReplaceActivationsConfig(to="pwl", pwl_segments=1), "pwl_segments"),
        (lambda: ReplaceActivationsConfig(to="pwl", pwl_segments=True), "pwl_segments"),
    ],
)
def test_bad_configs_name_the_field(make, field):
    with pytest.raises(ConfigError) as err:
        make()
    assert err.value.path == field


@pytest.mark.parametrize(
    ("model", "config", "field"),
    [
        (lambda: DigitsCNN(width=4), ReplaceActivationsConfig(), "from_"),  # ReLU only: nothing to do
        (tiny_bert, ReplaceActivationsConfig(to="relu", layers=["pooler.*"]), "from_"),  # only a tanh there
        (tiny_bert, ReplaceActivationsConfig(layers=["encoder.layer.9.*"]), "layers[0]"),
        (tiny_bert, ReplaceActivationsConfig(exclude=["dense"]), "exclude[0]"),  # not an activation
    ],
)
def test_nothing_to_replace_is_an_error_and_the_model_is_untouched(model, config, field):
    m = model()
    before = {n: type(x) for n, x in m.named_modules()}
    with pytest.raises(ConfigError) as err:
        replace_activations_(m, config)
    assert err.value.path == field
    assert {n: type(x) for n, x in m.named_modules()} == before


# -- the recipe step --------------------------------------------------------------------------------
FAST = {"epochs": 3, "lr": 0.01, "progress": False}
GELU_CNN = {"builtin": "digits_cnn", "kwargs": {"width": 8, "activation": "gelu"}}


def _run(
    tmp_path: Path, steps: list, model: dict | None = None, name: str = "run", *options
) -> tuple[int, Path]:
    out = tmp_path / name
    recipe = {
        "name": "act",
        "seed": 0,
        "model": model or GELU_CNN,
        "data": {"name": "digits"},
        "steps": steps,
        "measure": {"repeats": 2, "warmup": 0, "batch_size": 32, "threads": 1},
        "output": str(out),
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return main(["run", str(path), "--quiet", *options]), out


def _rows(out: Path) -> dict[str, dict]:
    return {r["step"]: r for r in json.loads((out / "report.json").read_text())["rows"]}


@pytest.fixture(scope="module")
def trained_gelu_cnn(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("gelu_cnn")
    code, out = _run(tmp, [{"type": "train", "train": FAST}])
    assert code == 0
    return out / "model.safetensors"


def test_step_with_recovery_fine_tune_keeps_accuracy(tmp_path, trained_gelu_cnn):
    steps = [
        {"type": "evaluate"},
        {"type": "replace_activations", "name": "pwl4", "replace_activations": {"to": "pwl", "pwl_segments": 4, "layers": ["features.*"]}},
        {"type": "replace_activations", "name": "relu", "replace_activations": {"to": "relu", "layers": ["classifier.*"]},
         "train": {"epochs": 2, "lr": 0.003, "progress": False}},
    ]  # fmt: skip
    code, out = _run(tmp_path, steps, {**GELU_CNN, "weights": str(trained_gelu_cnn)})
    assert code == 0
    rows = _rows(out)
    base = rows["evaluate"]["metrics"]["accuracy"]
    assert base > 0.9
    assert rows["pwl4"]["extra"]["replaced"] == {"gelu": 2}
    assert 0.05 < rows["pwl4"]["extra"]["max_abs_error"]["gelu"] < 0.08  # 4 segments: 0.067
    # recovery: within 2 points of the GELU model (convolutions' GELUs PWL-4, the classifier's ReLU)
    assert rows["relu"]["metrics"]["accuracy"] >= base - 0.02
    assert rows["relu"]["extra"]["replaced"] == {"gelu": 1} and rows["relu"]["extra"]["epochs"] == 2


def test_step_then_distill_from_the_original_recovers(tmp_path, trained_gelu_cnn):
    steps = [
        {"type": "evaluate"},
        {"type": "replace_activations", "replace_activations": {"to": "pwl", "pwl_segments": 2}},
        {"type": "distill", "student": "current", "teacher": "initial",
         "distill": {"temperature": 2.0, "alpha": 1.0}, "train": {"epochs": 2, "lr": 0.003, "progress": False}},
    ]  # fmt: skip
    code, out = _run(tmp_path, steps, {**GELU_CNN, "weights": str(trained_gelu_cnn)})
    assert code == 0
    rows = _rows(out)
    base, broken = rows["evaluate"]["metrics"]["accuracy"], rows["replace_activations"]["metrics"]["accuracy"]
    recovered = rows["distill"]["metrics"]["accuracy"]
    assert broken < base - 0.02  # two segments (a ReLU-like kink at the wrong place) cost accuracy...
    assert recovered >= base - 0.02  # ...which distillation from the GELU model gives back


def test_resume_reapplies_the_replacement_before_loading(tmp_path, monkeypatch):
    steps = [
        {"type": "train", "train": {**FAST, "epochs": 1}},
        {"type": "replace_activations", "replace_activations": {"to": "hardswish"}},
        {"type": "train", "name": "after", "train": {**FAST, "epochs": 1}},  # trains through hard-GELU
    ]
    code, straight = _run(tmp_path, steps, name="straight")
    assert code == 0
    monkeypatch.setenv(STOP_AFTER_STEP, "replace_activations")
    assert _run(tmp_path, steps)[0] == 130
    monkeypatch.delenv(STOP_AFTER_STEP)
    code, out = _run(tmp_path, steps, None, "run", "--resume")
    assert code == 0 and "replace_activations reused" in (out / "run.log").read_text()
    # the last step trained through the same functions only if the replacement was re-applied
    assert (out / "model.safetensors").read_bytes() == (straight / "model.safetensors").read_bytes()


@pytest.mark.parametrize(
    ("step", "model", "expected"),
    [
        ({"replace_activations": {"to": "swish"}}, GELU_CNN, "steps[0].replace_activations.to: must be one of"),
        ({"replace_activations": {"to": "relu", "from_": ["tanh"]}}, GELU_CNN,
         "steps[0].replace_activations.from_[0]: tanh cannot become relu"),
        ({"replace_activations": {"layers": ["features.9"]}}, GELU_CNN,
         "steps[0].replace_activations.layers[0]: pattern 'features.9' matches no activation"),
        ({}, {"builtin": "digits_cnn", "kwargs": {"width": 4}}, "steps[0].replace_activations.from_: the model has no"),
        ({}, {"builtin": "digits_cnn", "kwargs": {"activation": "swish"}}, "model.kwargs.activation: must be one of"),
    ],
)  # fmt: skip
def test_bad_input_exits_2_naming_the_field(tmp_path, capsys, step, model, expected):
    code, out = _run(tmp_path, [{"type": "replace_activations", **step}], model)
    assert code == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err, err
    assert not out.exists()


def test_validate_refuses_a_pattern_that_matches_no_activation_without_running(tmp_path, capsys):
    recipe = {
        "name": "act",
        "model": GELU_CNN,
        "data": {"name": "digits"},
        "steps": [{"type": "replace_activations", "replace_activations": {"exclude": ["classifier.9"]}}],
        "output": str(tmp_path / "out"),
    }
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "steps[0].replace_activations.exclude[0]: pattern 'classifier.9' matches no activation" in err, err
