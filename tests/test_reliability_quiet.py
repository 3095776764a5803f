"""Quiet means quiet: ``--quiet`` prints the final table and nothing else; without a terminal, progress is a
line per epoch, not a bar redrawn at every step.

The command-line cases run ``python -m slimkit.cli`` in a fresh interpreter with stderr going to a file,
so that imports happen during the run (torchao's messages come once per process, at import) and
nothing is a terminal, as in a CI log.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from slimkit.train import TrainConfig, Trainer
from slimkit.utils import quiet

EPOCHS = 3


@pytest.fixture(scope="module")
def tiny_bert_folder(tmp_path_factory) -> Path:
    from tests.transfer_helpers import save_tiny_bert

    return save_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


def _recipe(tmp_path: Path, folder: Path) -> Path:
    """A Hugging Face folder (weights loaded through transformers), trained, then int8."""
    rows = [("good great nice", 1), ("bad awful poor", 0)] * 24
    csv = tmp_path / "toy.csv"
    csv.write_text("text,label\n" + "".join(f"{t} {i},{y}\n" for i, (t, y) in enumerate(rows)))
    recipe = {
        "name": "quiet",
        "model": {"hf": str(folder), "hf_task": "classification", "num_labels": 2},
        "data": {"name": "table", "path": str(csv), "columns": {"text": "text", "label": "label"}},
        "steps": [
            {"type": "train", "train": {"epochs": EPOCHS, "batch_size": 2, "lr": 0.001}},
            {"type": "quantize", "int8_dynamic": {}},
        ],
        "measure": {"repeats": 2, "warmup": 0, "batch_size": 8, "max_length": 16},
        "output": str(tmp_path / "run"),
    }
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _run_cli(tmp_path: Path, *args: str) -> tuple[int, str, str]:
    err_file = tmp_path / "stderr.txt"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    for var in ("HF_HUB_DISABLE_PROGRESS_BARS", "TRANSFORMERS_VERBOSITY", "TQDM_DISABLE"):
        env.pop(var, None)  # the defaults a user has
    with err_file.open("w") as err:
        done = subprocess.run(
            [sys.executable, "-m", "slimkit.cli", *args],
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            env=env,
            timeout=600,
            check=False,
        )
    return done.returncode, done.stdout, err_file.read_text()


def test_quiet_run_prints_only_the_final_table(tmp_path, tiny_bert_folder):
    code, out, err = _run_cli(tmp_path, "run", str(_recipe(tmp_path, tiny_bert_folder)), "--quiet")
    assert code == 0, err
    assert err == "", f"--quiet wrote to stderr:\n{err[:2000]}"
    assert "Loading weights" not in out and "%|" not in out and "Failed to load" not in out
    lines = out.strip().splitlines()
    assert lines[-1] == f"run folder: {tmp_path / 'run'}"
    assert not any(line.startswith("epoch ") for line in lines)
    assert any(line.startswith("train") for line in lines) and any("quantize" in line for line in lines)
    assert len(lines) <= 8, out


def test_progress_to_a_file_is_a_line_per_epoch(tmp_path, tiny_bert_folder):
    code, out, err = _run_cli(tmp_path, "run", str(_recipe(tmp_path, tiny_bert_folder)))
    assert code == 0, err
    both = out + err
    assert "%|" not in both and "Loading weights" not in both and "Failed to load" not in both
    epoch_lines = [line for line in both.splitlines() if line.startswith("epoch ")]
    assert [line.split(":")[0] for line in epoch_lines] == [
        f"epoch {i}/{EPOCHS}" for i in range(1, EPOCHS + 1)
    ]
    # Per step a few log lines, transformers' load report (about 10 lines), the table: no line per training
    # step (72 of them; a bar's redraws are \r-separated, which splitlines() counts too).
    assert len(both.splitlines()) <= 40, both


def _tiny_training(progress: bool) -> None:
    torch.manual_seed(0)
    x, y = torch.randn(64, 4), torch.randint(0, 2, (64,))
    data = torch.utils.data.TensorDataset(x, y)
    model = torch.nn.Linear(4, 2)
    Trainer(model, TrainConfig(epochs=EPOCHS, batch_size=4, lr=0.01, progress=progress)).fit(data)


def test_trainer_without_a_terminal_writes_one_line_per_epoch(capsys):
    _tiny_training(progress=True)  # pytest's captured stderr is not a terminal
    captured = capsys.readouterr()
    assert "%|" not in captured.err and "it/s" not in captured.err, captured.err
    lines = captured.out.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == [f"epoch {i}/{EPOCHS}" for i in range(1, EPOCHS + 1)]


def test_trainer_with_progress_off_prints_nothing(capsys):
    _tiny_training(progress=False)
    assert capsys.readouterr() == ("", "")


def test_quiet_libraries_silences_and_restores_transformers():
    pytest.importorskip("transformers")
    import transformers  # noqa: F401  (quiet_libraries only touches libraries already imported)
    from transformers.utils import logging as tlog

    tlog.enable_progress_bar()
    level = tlog.get_verbosity()
    with quiet.quiet_libraries(True):
        assert not tlog.is_progress_bar_enabled() and tlog.get_verbosity() == logging.ERROR
    assert tlog.is_progress_bar_enabled() and tlog.get_verbosity() == level
    with quiet.quiet_libraries(False):  # not quiet, but stderr is not a terminal here: bars only
        assert not tlog.is_progress_bar_enabled() and tlog.get_verbosity() == level
    assert tlog.is_progress_bar_enabled()


def test_torchao_import_keeps_logger_levels_and_happens_once(monkeypatch):
    pytest.importorskip("torchao")
    torchao_logger, pytree_logger = logging.getLogger("torchao"), logging.getLogger("torch.utils._pytree")
    torchao_logger.setLevel(logging.INFO)
    pytree_level = pytree_logger.level
    try:
        quiet.hush_import_noise()
        assert "torchao" in sys.modules
        assert torchao_logger.level == logging.INFO and pytree_logger.level == pytree_level
        imported = []
        monkeypatch.setattr(quiet.importlib, "import_module", imported.append)
        quiet.hush_import_noise()  # already imported: nothing to do
        assert imported == []
        notices = [f for f in pytree_logger.filters if isinstance(f, quiet._DropEnumConstantNotice)]
        assert len(notices) == 1  # one filter however often it is called
        keep = logging.LogRecord("torch.utils._pytree", logging.WARNING, "", 0, "other %s", ("x",), None)
        drop = logging.LogRecord(
            "torch.utils._pytree",
            logging.WARNING,
            "",
            0,
            "%s is an Enum subclass and is now natively supported by torch.compile",
            ("<enum 'X'>",),
            None,
        )
        assert notices[0].filter(keep) and not notices[0].filter(drop)
    finally:
        torchao_logger.setLevel(logging.NOTSET)
