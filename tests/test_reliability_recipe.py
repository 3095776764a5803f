"""Bad recipes, overrides and factories through the CLI: exit 2, a message naming the thing, no traceback.

Every probe writes its recipe under ``tmp_path`` and calls ``slimkit.cli.main`` in-process. Refusals
must come from validation (nothing trains), name the field / file / line / override, stay short even
for a huge value, and never run code the user did not consent to (a probe that would create a file
asserts that the file does not exist).
"""

from __future__ import annotations

import gzip
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from slimkit.cli import main
from slimkit.recipes import load_recipe
from slimkit.recipes.yaml_io import parse_yaml
from slimkit.train import TrainConfig, Trainer
from slimkit.train.config import VAL_METRICS

PROBE_MODULE = "tests.fixtures.code_probe"
TRAIN = {"epochs": 1, "lr": 0.01, "batch_size": 32, "progress": False}


def _base(tmp: Path) -> dict:
    return {
        "name": "probe",
        "model": {"builtin": "digits_cnn", "kwargs": {"width": 4}},
        "data": {"name": "digits"},
        "steps": [{"type": "train", "train": dict(TRAIN)}],
        "measure": {"repeats": 1, "warmup": 0, "batch_size": 8, "latency": False},
        "output": str(tmp / "run"),
    }


def _write(tmp: Path, raw: dict, name: str = "r.yaml") -> Path:
    path = tmp / name
    path.write_text(yaml.safe_dump(raw, default_flow_style=None))  # flow lists: a 200k list stays < 1 MiB
    return path


def _edited(edit: Callable[[dict, Path], None]) -> Callable[[Path], list[str]]:
    """A probe that writes the base recipe changed by ``edit(raw, tmp)`` and validates it."""

    def build(tmp: Path) -> list[str]:
        raw = _base(tmp)
        edit(raw, tmp)
        return ["validate", str(_write(tmp, raw))]

    return build


def _text(text: str) -> Callable[[Path], list[str]]:
    def build(tmp: Path) -> list[str]:
        (tmp / "r.yaml").write_text(text.replace("OUT", str(tmp / "run")))
        return ["validate", str(tmp / "r.yaml")]

    return build


def _override(*items: str, command: str = "validate") -> Callable[[Path], list[str]]:
    def build(tmp: Path) -> list[str]:
        return [command, str(_write(tmp, _base(tmp))), *items]

    return build


def _cli(capsys, argv: list[str]) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    assert len(captured.err) < 2000, captured.err[:300]
    return code, captured.out, captured.err


def _set_train(**values) -> Callable[[dict, Path], None]:
    return lambda raw, tmp: raw["steps"][0]["train"].update(values)


def _set(key: str, value) -> Callable[[dict, Path], None]:
    return lambda raw, tmp: raw.__setitem__(key, value)


# --- data files for the probes -------------------------------------------------------------------


def _mnist_folder(images: bytes | None, labels: bytes | None) -> Callable[[dict, Path], None]:
    def edit(raw: dict, tmp: Path) -> None:
        folder = tmp / "mnist"
        folder.mkdir()
        for name, content in (("t10k-images-idx3-ubyte.gz", images), ("t10k-labels-idx1-ubyte.gz", labels)):
            if content is not None:
                (folder / name).write_bytes(content)
        raw["data"] = {"name": "mnist", "path": str(folder)}
        raw["model"] = {"builtin": "lenet5"}

    return edit


def _table(name: str, content: bytes) -> Callable[[dict, Path], None]:
    def edit(raw: dict, tmp: Path) -> None:
        (tmp / name).write_bytes(content)
        raw["data"] = {"name": "table", "path": str(tmp / name)}  # refused before the model is looked at

    return edit


def _npz(y: np.ndarray, **data) -> Callable[[dict, Path], None]:
    def edit(raw: dict, tmp: Path) -> None:
        x = np.random.default_rng(0).random((len(y), 1, 8, 8), dtype=np.float32)
        np.savez(tmp / "d.npz", x=x, y=y)
        raw["data"] = {"name": "npz", "path": str(tmp / "d.npz"), **data}
        raw["model"] = {"builtin": "lenet300100", "kwargs": {"num_classes": 1}}

    return edit


def _then(*edits: Callable[[dict, Path], None]) -> Callable[[dict, Path], None]:
    def edit(raw: dict, tmp: Path) -> None:
        for e in edits:
            e(raw, tmp)

    return edit


def _add_step(step: dict) -> Callable[[dict, Path], None]:
    return lambda raw, tmp: raw["steps"].append(step)


ALIAS_BOMB = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{b}: &{b} [{', '.join([f'*{a}'] * 10)}]\n" for a, b in zip("abcdefgh", "bcdefghi")
)
DUPLICATE = """name: probe
model: {builtin: digits_cnn}
data: {name: digits}
steps:
  - type: train
    train:
      lr: 0.01
      epochs: 1
      lr: 0.02
output: OUT
"""
HUGE_LIST = [0] * 200_000

RECIPE_PROBES = [
    # (id, build(tmp) -> argv, pieces the message must hold)
    ("duplicate-key", _text(DUPLICATE), ["r.yaml:9", "duplicate key 'lr'", "first on line 7"]),
    ("duplicate-flow-key", _text("name: a\nname: b\n"), ["r.yaml:2", "duplicate key 'name'"]),
    ("alias-bomb", _text(ALIAS_BOMB), ["r.yaml", "expands to more than"]),
    ("recursive-alias", _text("a: &a [1, *a]\n"), ["r.yaml", "alias refers to"]),
    ("bad-yaml", _text("steps: [1, 2\n"), ["r.yaml:2", "not valid YAML"]),
    ("not-a-mapping", _text("- 1\n- 2\n"), ["a recipe must be a YAML mapping"]),
    ("lr-inf", _edited(_set_train(lr=float("inf"))), ["steps[0].train.lr", "finite", "inf"]),
    ("lr-minus-inf", _edited(_set_train(lr=float("-inf"))), ["steps[0].train.lr", "-inf"]),
    ("lr-nan", _edited(_set_train(lr=float("nan"))), ["steps[0].train.lr", "nan"]),
    ("l1-inf", _edited(_set_train(l1=float("inf"))), ["steps[0].train.l1", "finite"]),
    ("grad-clip-nan", _edited(_set_train(grad_clip=float("nan"))), ["steps[0].train.grad_clip"]),
    ("betas-nan", _edited(_set_train(betas=[0.9, float("nan")])), ["steps[0].train.betas[1]"]),
    (
        "val-fraction-nan",
        _edited(lambda raw, tmp: raw["data"].update(val_fraction=float("nan"))),
        ["data.val_fraction"],
    ),
    ("huge-list-value", _edited(_set_train(lr=HUGE_LIST)), ["steps[0].train.lr", "must be a number"]),
    ("huge-list-betas", _edited(_set_train(betas=HUGE_LIST)), ["steps[0].train.betas"]),
    ("huge-step-type", _edited(lambda raw, tmp: raw["steps"][0].update(type=HUGE_LIST)), ["steps[0].type"]),
    ("monitor-typo", _edited(_set_train(monitor="val_acuracy")), ["steps[0].train.monitor", "val_accuracy"]),
    (
        "monitor-of-another-task",
        _edited(_then(_npz(np.linspace(0, 1, 40, dtype=np.float32)), _set_train(monitor="val_accuracy"))),
        ["steps[0].train.monitor", "val_spearman"],
    ),
    (
        "model-kwargs-typo",
        _edited(lambda raw, tmp: raw["model"].update(kwargs={"widht": 8})),
        ["model.kwargs.widht", "DigitsCNN takes"],
    ),
    ("model-does-not-fit-data", _edited(_set("model", {"builtin": "lenet5"})), ["model.builtin", "lenet5"]),
    ("mnist-empty-folder", _edited(_mnist_folder(None, None)), ["data.path", "t10k-images-idx3-ubyte.gz"]),
    (
        "mnist-not-gzip",
        _edited(_mnist_folder(b"junk", b"junk")),
        ["data.path", "t10k-images-idx3-ubyte.gz", "gzip"],
    ),
    (
        "mnist-bad-magic",
        _edited(_mnist_folder(gzip.compress(bytes(64)), gzip.compress(bytes(64)))),
        ["t10k-images-idx3-ubyte.gz", "not an IDX file"],
    ),
    ("csv-no-text-column", _edited(_table("t.csv", b"sentence,label\na,0\n")), ["t.csv", "no 'text' column"]),
    ("csv-not-utf8", _edited(_table("t.csv", b"text,label\n\xff\xfe,0\n")), ["t.csv", "not valid UTF-8"]),
    ("jsonl-bad-first-row", _edited(_table("t.jsonl", b"{text: 1}\n")), ["t.jsonl:1", "invalid JSON"]),
    (
        "npz-missing-array",
        _edited(_npz(np.zeros(40, np.int64), y_key="labels")),
        ["d.npz", "no array 'labels'"],
    ),
    (
        "prune-pattern-typo",
        _edited(_add_step({"type": "prune", "magnitude": {"sparsity": 0.5, "include": ["nosuch*"]}})),
        ["steps[1].magnitude.include[0]", "nosuch*"],
    ),
    (
        "quant-override-typo",
        _edited(_add_step({"type": "quantize", "int8_dynamic": {"overrides": {"head.*": None}}})),
        ["steps[1].int8_dynamic.overrides.head.*", "matches no"],
    ),
    (
        "override-malformed",
        _override("steps.0.train.lr=[1,"),
        ["steps.0.train.lr", "not valid YAML", "override"],
    ),
    (
        "override-into-a-value",
        _override("steps.0.train.epochs.x=3"),
        ["steps.0.train.epochs", "no field 'x'", "override 'steps.0.train.epochs.x=3'"],
    ),
    ("override-into-a-string", _override("name.x.y=3"), ["name", "override"]),
    ("override-without-value", _override("steps.0.train.lr"), ["key=value"]),
    ("override-empty-part", _override("steps..lr=1"), ["steps..lr", "override"]),
    ("override-duplicate-key", _override("steps.0.train={lr: 1, lr: 2}"), ["duplicate key 'lr'"]),
    (
        "override-huge-list",
        _override(f"steps.0.train.lr={HUGE_LIST}"),
        ["steps[0].train.lr", "must be a number"],
    ),
    ("override-inf", _override("steps.0.train.lr=.inf"), ["steps[0].train.lr", "finite"]),
]


@pytest.mark.parametrize("build, expected", [p[1:] for p in RECIPE_PROBES], ids=[p[0] for p in RECIPE_PROBES])
def test_bad_recipes_and_overrides_exit_2_naming_the_thing(tmp_path, capsys, build, expected):
    argv = build(tmp_path)
    code, _, err = _cli(capsys, argv)
    assert code == 2, err
    for piece in expected:
        assert piece in err, (piece, err)
    assert len(err.strip().splitlines()) <= 4
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda p: p.write_bytes(b"name: \xff\xfeprobe\n"), ["not UTF-8", "0xff", "offset 6"]),
        (lambda p: p.write_text("# " + "x" * (2 << 20) + "\n"), ["at most 1048576"]),
        (lambda p: p.mkdir(), ["is a folder"]),  # unreadable as a file (chmod 000 means nothing to root)
        (lambda p: None, ["file not found"]),
    ],
    ids=["non-utf8", "2-MiB", "folder", "missing"],
)
def test_unreadable_recipe_files_are_named(tmp_path, capsys, make, expected):
    path = tmp_path / "bad.yaml"
    make(path)
    code, _, err = _cli(capsys, ["validate", str(path)])
    assert code == 2 and "bad.yaml" in err, err
    for piece in expected:
        assert piece in err, (piece, err)


def test_an_alias_bomb_is_refused_in_well_under_a_second(tmp_path, capsys):
    (tmp_path / "bomb.yaml").write_text(ALIAS_BOMB)
    start = time.perf_counter()
    code, _, err = _cli(capsys, ["validate", str(tmp_path / "bomb.yaml")])
    assert code == 2 and "expands to more than" in err
    assert time.perf_counter() - start < 2.0


def test_exponent_floats_are_numbers_and_merge_keys_still_work(tmp_path):
    raw = _base(tmp_path)
    text = yaml.safe_dump(raw).replace("lr: 0.01", "lr: 1e-3")
    assert "lr: 1e-3" in text
    (tmp_path / "r.yaml").write_text(text)
    recipe = load_recipe(tmp_path / "r.yaml", ["steps.0.train.weight_decay=5e-5"])
    train = recipe.steps[0].config.train
    assert train.lr == 0.001 and isinstance(train.lr, float) and train.weight_decay == 5e-5
    assert parse_yaml("[1e-3, 5E+5, 2.5e2, -1e0, 1_0e1, 1.0]", "t") == [0.001, 5e5, 250.0, -1.0, 100.0, 1.0]
    assert parse_yaml("[1e, e3, 0x1f, 1.2.3e4]", "t") == ["1e", "e3", 31, "1.2.3e4"]
    merged = parse_yaml("base: &b {lr: 1, epochs: 2}\nstep: {<<: *b, lr: 3}\n", "t")
    assert merged["step"] == {"lr": 3, "epochs": 2}


# --- code only with consent ------------------------------------------------------------------------


@pytest.fixture
def marker(tmp_path, monkeypatch) -> Path:
    """A file that appears if code ran: the probe module's import, or a shell command."""
    path = tmp_path / "code-ran"
    monkeypatch.setenv("SLIMKIT_TEST_IMPORT_MARKER", str(path))
    monkeypatch.delitem(sys.modules, PROBE_MODULE, raising=False)
    return path


def _factory_recipe(tmp: Path, factory: str, kwargs: dict, trust: bool | None = None) -> Path:
    raw = _base(tmp)
    raw["model"] = {"factory": factory, "kwargs": kwargs}
    if trust is not None:
        raw["trust_code"] = trust
    return _write(tmp, raw)


SHELL_FACTORIES = [
    ("os:system", lambda m: {"command": f"touch {m}"}, "standard library"),
    ("subprocess:check_output", lambda m: {"args": ["touch", str(m)]}, "standard library"),
    ("builtins:exec", lambda m: {"source": f"open({str(m)!r}, 'w')"}, "standard library"),
    (f"{PROBE_MODULE}:system", lambda m: {"command": f"touch {m}"}, "defined in posix"),
    (f"{PROBE_MODULE}:check_output", lambda m: {"args": ["touch", str(m)]}, "defined in subprocess"),
    ("torch:load", lambda m: {"f": str(m)}, "torch.serialization"),
]


@pytest.mark.parametrize("trust", [None, "flag", "recipe"])
@pytest.mark.parametrize("command", ["validate", "run"])
@pytest.mark.parametrize(
    "factory, kwargs, why", SHELL_FACTORIES, ids=[f[0].split(".")[-1] for f in SHELL_FACTORIES]
)
def test_a_factory_never_runs_commands_with_or_without_consent(
    tmp_path, capsys, marker, factory, kwargs, why, command, trust
):
    path = _factory_recipe(tmp_path, factory, kwargs(marker), trust=True if trust == "recipe" else None)
    argv = [command, str(path), *(["--trust-code"] if trust == "flag" else [])]
    code, _, err = _cli(capsys, argv + (["--quiet"] if command == "run" else []))
    assert code == 2, err
    assert "model.factory" in err
    # The standard library is refused as it is named; any other module first needs consent.
    assert (why if trust is not None or why == "standard library" else "trust_code: true") in err, err
    assert not marker.exists() or marker.read_text() == "imported"  # a command never ran
    assert not (tmp_path / "run").exists()


def test_a_user_factory_needs_consent_before_its_module_is_imported(tmp_path, capsys, marker):
    path = _factory_recipe(tmp_path, f"{PROBE_MODULE}:make", {"hidden": 8})
    code, _, err = _cli(capsys, ["validate", str(path)])
    assert code == 2
    assert f"model.factory: this recipe imports and runs code from {PROBE_MODULE}" in err
    assert "trust_code: true" in err and "--trust-code" in err
    assert not marker.exists() and PROBE_MODULE not in sys.modules

    code, out, err = _cli(capsys, ["validate", str(path), "--trust-code"])
    assert code == 0, err
    assert f"this recipe imports and runs code from {PROBE_MODULE}" in out
    assert marker.exists()  # with consent, validation imports it to check the kwargs (never calls it)


def test_a_factory_kwarg_typo_is_found_at_validation(tmp_path, capsys, marker):
    path = _factory_recipe(tmp_path, f"{PROBE_MODULE}:make", {"hiden": 8}, trust=True)
    code, _, err = _cli(capsys, ["validate", str(path)])
    assert code == 2 and "model.kwargs.hiden" in err and "make takes hidden" in err, err


@pytest.mark.parametrize(
    "override",
    [
        f"model.factory={PROBE_MODULE}:make",
        f"model={{factory: '{PROBE_MODULE}:make'}}",
        "trust_code=true",
        "steps.0={type: distill, student: current, teacher: {factory: 'os:system'}}",
    ],
    ids=["factory", "model-mapping", "trust-code", "teacher"],
)
@pytest.mark.parametrize("command", ["validate", "run"])
def test_an_override_cannot_add_code_without_the_flag(tmp_path, capsys, marker, override, command):
    path = _write(tmp_path, _base(tmp_path))
    code, _, err = _cli(capsys, [command, str(path), override])
    assert code == 2 and "cannot add code" in err and "override" in err, err
    assert not marker.exists() and PROBE_MODULE not in sys.modules
    assert not (tmp_path / "run").exists()


def test_a_factory_override_with_the_flag_is_allowed(tmp_path, capsys, marker):
    path = _write(tmp_path, _base(tmp_path))
    override = f"model={{factory: '{PROBE_MODULE}:make', kwargs: {{hidden: 4}}}}"
    code, out, err = _cli(capsys, ["validate", str(path), override, "--trust-code"])
    assert code == 0, err
    assert f"imports and runs code from {PROBE_MODULE}" in out


# --- the default monitor follows the task -----------------------------------------------------------


def test_a_regression_data_set_trains_with_a_plain_train_step(tmp_path, capsys):
    raw = _base(tmp_path)
    _npz(np.linspace(0, 1, 60, dtype=np.float32))(raw, tmp_path)
    raw["steps"] = [{"type": "train", "train": {"epochs": 2, "lr": 0.01, "progress": False}}]
    code, out, err = _cli(capsys, ["run", str(_write(tmp_path, raw)), "--quiet"])
    assert code == 0, err
    resolved = yaml.safe_load((tmp_path / "run" / "recipe.resolved.yaml").read_text())
    assert resolved["steps"][0]["train"]["monitor"] is None  # the default is resolved, not written back


@pytest.mark.parametrize(
    "task, monitor",
    [("classification", "val_accuracy"), ("regression", "val_spearman"), ("similarity", "val_spearman")],
)
def test_the_trainer_resolves_the_default_monitor_without_changing_the_config(task, monitor):
    config = TrainConfig(progress=False)
    trainer = Trainer(torch.nn.Linear(2, 1), config, task=task)
    assert trainer.config.monitor == monitor and config.monitor is None
    assert TrainConfig(monitor="val_loss").for_task(task).monitor == "val_loss"


def test_the_metric_table_is_what_evaluation_reports():
    from slimkit.metrics import evaluate

    x, y = torch.randn(16, 3), torch.randint(0, 2, (16,))
    loader = [(x, y)]
    assert set(evaluate(torch.nn.Linear(3, 2), loader, "classification")) == set(
        VAL_METRICS["classification"]
    )
    assert set(evaluate(torch.nn.Linear(3, 1), [(x, y.float())], "regression")) == set(
        VAL_METRICS["regression"]
    )
