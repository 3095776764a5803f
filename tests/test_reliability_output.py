"""Output safety, signals and exit codes: slimkit never loses a folder, a run or a user's file.

Probes: overwrite onto folders slimkit did not create, unsafe outputs (``.``, ``~``, ``/``), two runs
to one output, kill -9 and SIGTERM at named points of a run (``SLIMKIT_TEST_PAUSE``), the recovery
by the next run and by ``slimkit cleanup``, and the CLI's exit codes and one-line messages.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from slimkit import cli
from slimkit.cli import main
from slimkit.errors import (
    BadInputError,
    ConfigError,
    DataError,
    FloorNotMetError,
    ModelError,
    NonFiniteError,
    WorkError,
)
from slimkit.recipes.output import MARKER, cleanup, output_lock, write_marker

FOREIGN = {"thesis.txt": "four years of work\n", "sub/data.csv": "a,b\n1,2\n"}


def _recipe(tmp_path: Path, output: Path, overwrite: bool = False, name: str = "r.yaml") -> Path:
    recipe = {
        "name": "tiny",
        "model": {"builtin": "digits_cnn", "kwargs": {"width": 4}},
        "data": {"name": "digits"},
        "steps": [{"type": "train", "train": {"epochs": 1, "progress": False}}],
        "measure": {"repeats": 1, "warmup": 0, "latency": False},
        "output": str(output),
        "overwrite": overwrite,
    }
    path = tmp_path / name
    path.write_text(yaml.safe_dump(recipe))
    return path


def _foreign_folder(path: Path) -> Path:
    for rel, text in FOREIGN.items():
        (path / rel).parent.mkdir(parents=True, exist_ok=True)
        (path / rel).write_text(text)
    return path


def _intact(path: Path) -> bool:
    return all((path / rel).read_text() == text for rel, text in FOREIGN.items())


def _leftovers(parent: Path, name: str = "run") -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


def _run_id(folder: Path) -> str:
    return json.loads((folder / MARKER).read_text())["run_id"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """One real run folder, made once; tests copy it (the marker and all)."""
    tmp = tmp_path_factory.mktemp("finished")
    assert main(["run", str(_recipe(tmp, tmp / "run")), "--quiet"]) == 0
    return tmp / "run"


def _copy_run(finished_run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(finished_run, tmp_path / "run"))


# -- folders slimkit did not create ----------------------------------------------------------------
@pytest.mark.parametrize("command", ["validate", "run"])
def test_overwrite_never_deletes_a_folder_slimkit_did_not_create(tmp_path, capsys, command):
    out = _foreign_folder(tmp_path / "run")
    args = [command, str(_recipe(tmp_path, out, overwrite=True))] + (["--quiet"] if command == "run" else [])
    assert main(args) == 2
    err = capsys.readouterr().err
    assert str(out) in err and MARKER in err and "Traceback" not in err
    assert _intact(out) and not _leftovers(tmp_path)


def test_overwrite_refuses_a_file(tmp_path, capsys):
    out = tmp_path / "run"
    out.write_text("not a folder")
    assert main(["run", str(_recipe(tmp_path, out, overwrite=True)), "--quiet"]) == 2
    assert "is not a folder" in capsys.readouterr().err and out.read_text() == "not a folder"


def test_demo_output_onto_a_foreign_folder_is_refused(tmp_path, capsys):
    out = _foreign_folder(tmp_path / "mine")
    assert main(["demo", "--output", str(out), "--quiet"]) == 2  # the demo recipe says overwrite: true
    assert str(out) in capsys.readouterr().err and _intact(out)


@pytest.mark.parametrize("output", [".", "..", "~", "/", "{cwd}", "./"])
def test_outputs_that_cannot_be_a_run_folder_are_refused_at_validation(tmp_path, monkeypatch, capsys, output):
    work = tmp_path / "a" / "work"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    recipe = _recipe(tmp_path, Path(output.format(cwd=work)), overwrite=True)
    started = time.perf_counter()
    assert main(["run", str(recipe), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "output:" in err and "holds other files" in err
    assert time.perf_counter() - started < 5  # refused before any work
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "r.yaml"]


def test_a_run_folder_is_marked_and_replaced_only_whole(finished_run, tmp_path, capsys):
    marker = json.loads((finished_run / MARKER).read_text())
    assert marker["recipe"] == "tiny" and marker["slimkit_version"] and marker["started"]
    run = _copy_run(finished_run, tmp_path)
    (run / "extra.txt").write_text("from the old run")
    assert main(["run", str(_recipe(tmp_path, run, overwrite=True)), "--quiet"]) == 0
    assert _run_id(run) != marker["run_id"] and not (run / "extra.txt").exists()
    assert (run / "model.safetensors").stat().st_size > 0
    umask = os.umask(0o022)
    os.umask(umask)
    for name in ("model.safetensors", "report.json", MARKER):  # not 0600, as safetensors writes
        assert (run / name).stat().st_mode & 0o777 == 0o666 & ~umask, name
    assert _leftovers(tmp_path) == []  # no temp folder, no old run, no lock file


# -- two runs to one output ------------------------------------------------------------------------
def test_a_second_run_to_a_locked_output_fails_at_once(tmp_path, capsys):
    out = tmp_path / "run"
    with output_lock(out):
        started = time.perf_counter()
        assert main(["run", str(_recipe(tmp_path, out)), "--quiet"]) == 2
        assert time.perf_counter() - started < 5
    err = capsys.readouterr().err
    assert f"{out} is being written by another slimkit run (pid {os.getpid()})" in err
    assert not out.exists() and _leftovers(tmp_path) == []


def _slimkit(args: list[str], cwd: Path, stderr: Path, pause: str = "") -> subprocess.Popen:
    env = dict(os.environ, SLIMKIT_TEST_PAUSE=pause, OMP_NUM_THREADS="1")
    with open(stderr, "w") as err:
        return subprocess.Popen(
            [sys.executable, "-m", "slimkit.cli", *args],
            cwd=cwd,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )


def _wait_for(path: Path, text: str, proc: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while text not in path.read_text():
        assert proc.poll() is None, f"exited {proc.returncode} before {text!r}: {path.read_text()[-2000:]}"
        assert time.monotonic() < deadline, f"no {text!r} within {timeout} s"
        time.sleep(0.05)


def test_two_concurrent_runs_to_one_new_folder(tmp_path):
    out = tmp_path / "run"
    recipe = _recipe(tmp_path, out)
    # Both pause 2 s once they hold the lock: whichever gets it first, the other arrives meanwhile
    # (on a very slow machine it may arrive after the first finished: then it finds the folder there).
    procs = [
        _slimkit(["run", str(recipe), "--quiet"], tmp_path, tmp_path / f"err{i}", pause="running:2")
        for i in range(2)
    ]
    codes = [p.wait(timeout=180) for p in procs]
    assert sorted(codes) == [0, 2], codes
    winner, loser = (0, 1) if codes[0] == 0 else (1, 0)
    err = (tmp_path / f"err{loser}").read_text()
    locked = f"{out} is being written by another slimkit run (pid {procs[winner].pid})"
    assert locked in err or f"{out} exists" in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert json.loads((out / MARKER).read_text())["pid"] == procs[winner].pid
    assert (out / "report.json").is_file() and _leftovers(tmp_path) == []


# -- kill -9 and SIGTERM during a run ----------------------------------------------------------------
SLOW = pytest.mark.slow  # each case is one more slimkit process (~5 s of CPU)
STOPS = [
    pytest.param("running", signal.SIGTERM, id="SIGTERM-running"),
    pytest.param("between-renames", signal.SIGTERM, id="SIGTERM-between-renames"),
    pytest.param("between-renames", signal.SIGKILL, id="SIGKILL-between-renames"),
    pytest.param("running", signal.SIGKILL, id="SIGKILL-running", marks=SLOW),
    pytest.param("before-swap", signal.SIGTERM, id="SIGTERM-before-swap", marks=SLOW),
    pytest.param("before-swap", signal.SIGKILL, id="SIGKILL-before-swap", marks=SLOW),
]


def _interrupted(finished_run: Path, tmp_path: Path, point: str, sig: int) -> tuple[Path, str, int]:
    """A run replacing a finished run, stopped by ``sig`` at ``point``: (run folder, old run id, rc)."""
    run = _copy_run(finished_run, tmp_path)
    recipe = _recipe(tmp_path, run, overwrite=True)
    proc = _slimkit(["run", str(recipe), "--quiet"], tmp_path, tmp_path / "err", pause=point)
    _wait_for(tmp_path / "err", f"test pause at {point}", proc)
    proc.send_signal(sig)
    return run, _run_id(finished_run), proc.wait(timeout=60)


@pytest.mark.parametrize(("point", "sig"), STOPS)
def test_a_run_stopped_at_any_point_loses_nothing(finished_run, tmp_path, capsys, point, sig):
    run, old_id, code = _interrupted(finished_run, tmp_path, point, sig)
    err = (tmp_path / "err").read_text()
    if sig == signal.SIGTERM:  # handled like Ctrl-C: the old run is back, nothing is left over
        assert code == 143 and "terminated" in err and "Traceback" not in err, err
        assert _run_id(run) == old_id and (run / "model.safetensors").is_file()
        assert _leftovers(tmp_path) == []
        return
    assert code == -signal.SIGKILL
    left = _leftovers(tmp_path)
    assert any(name.endswith(".tmp") for name in left), left
    if point == "between-renames":  # the old run waits beside its place
        assert not run.exists() and any(name.endswith(".old") for name in left), left
    else:
        assert _run_id(run) == old_id
    capsys.readouterr()
    assert main(["cleanup", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "removed" in out and ".tmp" in out
    assert ("restored" in out) == (point == "between-renames"), out
    assert _run_id(run) == old_id and _leftovers(tmp_path) == []
    assert main(["cleanup", str(run)]) == 0
    assert "nothing to clean up" in capsys.readouterr().out


@SLOW
def test_the_next_run_restores_after_a_kill_between_the_renames(finished_run, tmp_path, capsys):
    run, old_id, _ = _interrupted(finished_run, tmp_path, "between-renames", signal.SIGKILL)
    assert not run.exists()
    assert main(["run", str(tmp_path / "r.yaml"), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert f"restored {run}" in err and "removed" in err
    assert _run_id(run) != old_id and _leftovers(tmp_path) == []


# -- recovery rules, on the states a crash leaves (no process to kill) --------------------------------------
OLD_ID, NEW_ID = "20240101-000001-1-bbbbbb", "20240101-000002-1-aaaaaa"


def _fake_run(path: Path, run_id: str) -> Path:
    path.mkdir()
    write_marker(path, run_id, "fake")
    return path


def _crashed_between_the_renames(finished_run: Path, tmp_path: Path) -> Path:
    """The state kill -9 leaves between the renames: the old run aside, the new one in its temp folder."""
    shutil.copytree(finished_run, tmp_path / f".run.{OLD_ID}.old")
    _fake_run(tmp_path / f".run.{NEW_ID}.tmp", NEW_ID)
    (tmp_path / ".run.lock").write_text("12345\n")  # a dead run's lock file: not held
    return tmp_path / "run"


def test_cleanup_restores_the_old_run_and_removes_the_new_temp_folder(finished_run, tmp_path, capsys):
    run = _crashed_between_the_renames(finished_run, tmp_path)
    assert main(["cleanup", str(run)]) == 0  # the output itself, though it is missing
    out = capsys.readouterr().out.splitlines()
    assert out == [
        f"restored {run} from .run.{OLD_ID}.old (a run was interrupted while replacing it)",
        f"removed {tmp_path / f'.run.{NEW_ID}.tmp'} (left by an interrupted run)",
    ]
    assert _run_id(run) == _run_id(finished_run) and _leftovers(tmp_path) == []


def test_the_next_run_restores_then_replaces(finished_run, tmp_path, capsys):
    run = _crashed_between_the_renames(finished_run, tmp_path)
    assert main(["run", str(_recipe(tmp_path, run, overwrite=False)), "--quiet"]) == 2
    err = capsys.readouterr().err  # overwrite: false: the restored run stays
    assert f"restored {run}" in err and f".run.{NEW_ID}.tmp" in err and f"{run} exists" in err
    assert _run_id(run) == _run_id(finished_run) and _leftovers(tmp_path) == []
    _crashed_between_the_renames(finished_run, tmp_path / "again")
    run = tmp_path / "again" / "run"
    assert main(["run", str(_recipe(tmp_path, run, overwrite=True)), "--quiet"]) == 0
    assert f"restored {run}" in capsys.readouterr().err
    assert _run_id(run) not in (OLD_ID, NEW_ID, _run_id(finished_run)) and _leftovers(run.parent) == []


def test_cleanup_removes_old_runs_already_replaced_and_leaves_live_runs(tmp_path):
    run = _fake_run(tmp_path / "run", NEW_ID)
    _fake_run(tmp_path / f".run.{OLD_ID}.old", OLD_ID)
    other_tmp = _fake_run(tmp_path / ".other.20240101-000003-1-cccccc.tmp", "20240101-000003-1-cccccc")
    with output_lock(tmp_path / "other"):  # a live run to ``other``
        done = cleanup(tmp_path)
    assert f"removed {tmp_path / f'.run.{OLD_ID}.old'} (an earlier run already replaced by run)" in done
    assert any("in progress" in line for line in done) and other_tmp.is_dir()
    assert _run_id(run) == NEW_ID


def test_cleanup_of_a_missing_folder_is_bad_input(tmp_path, capsys):
    assert main(["cleanup", str(tmp_path / "nope")]) == 2
    assert "no such folder" in capsys.readouterr().err


# -- the CLI: exit codes, messages, arguments ------------------------------------------------------------
def _raises(error: BaseException):
    def dispatch(args):
        raise error

    return dispatch


@pytest.mark.parametrize(
    ("error", "code", "words"),
    [
        (ConfigError("steps[0].lr", "must be > 0"), 2, "recipe error: steps[0].lr: must be > 0"),
        (DataError("data.csv: row 3: NaN"), 2, "data error: data.csv: row 3"),
        (ModelError("m.safetensors: truncated"), 2, "model error: m.safetensors"),
        (BadInputError("output: x is locked"), 2, "error: output: x is locked"),
        (WorkError("could not finish"), 1, "error: could not finish"),
        (NonFiniteError("loss is nan", "epoch 1/3, batch 2/9"), 1, "epoch 1/3, batch 2/9: loss is nan"),
        (FloorNotMetError("nothing above 0.9"), 3, "nothing above 0.9"),
        (KeyboardInterrupt(), 130, "interrupted"),
        (cli.Terminated(), 143, "terminated (SIGTERM)"),
        (RuntimeError("boom"), 1, "internal error: RuntimeError: boom (run with --debug for the traceback)"),
        (MemoryError(), 1, "out of memory"),
    ],
)
def test_exit_codes_and_one_line_messages(monkeypatch, capsys, error, code, words):
    monkeypatch.setattr(cli, "_dispatch", _raises(error))
    assert main(["validate", "r.yaml"]) == code
    err = capsys.readouterr().err
    assert words in err and err.startswith("slimkit: ") and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("argv", [["--debug", "validate", "r.yaml"], ["validate", "r.yaml", "--debug"]])
def test_debug_prints_the_traceback(monkeypatch, capsys, argv):
    monkeypatch.setattr(cli, "_dispatch", _raises(ZeroDivisionError("division by zero")))
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "internal error: ZeroDivisionError" in err and "--debug for" not in err


def test_a_huge_message_is_cut(monkeypatch, capsys):
    monkeypatch.setattr(cli, "_dispatch", _raises(ValueError("x" * 10**6)))
    assert main(["validate", "r.yaml"]) == 1
    assert len(capsys.readouterr().err) < 3000


def test_options_may_follow_the_recipe_and_overrides():
    args = cli.parse_args(["run", "r.yaml", "--quiet", "output=X", "--debug", "seed=3"])
    assert args.recipe == "r.yaml" and args.quiet and args.debug
    assert args.overrides == ["output=X", "seed=3"]
    args = cli.parse_args(["run", "r.yaml", "a=1", "--quiet", "b=2"])
    assert args.overrides == ["a=1", "b=2"] and not cli.parse_args(["validate", "r.yaml"]).debug
    for bad in (["run", "r.yaml", "--quiet", "--bogus"], ["report", "RUN", "extra=1"]):
        with pytest.raises(SystemExit) as exit_:
            cli.parse_args(bad)
        assert exit_.value.code == 2


def test_report_into_a_closed_pipe_exits_quietly(finished_run):
    proc = subprocess.Popen(
        [sys.executable, "-m", "slimkit.cli", "report", str(finished_run), "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    proc.stdout.close()  # like ``| head`` that has read what it wanted
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 141, err
    assert err == ""


def test_report_of_a_folder_without_a_run_is_bad_input(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "no report found" in capsys.readouterr().err
