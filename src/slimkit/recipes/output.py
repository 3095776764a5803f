"""The run folder's life: check, lock, build under a temporary name, swap into place, recover.

Rules, each one a guard against losing someone's data:

- slimkit only ever replaces (deletes) a folder it created itself: every run folder carries a
  marker file, ``slimkit-run.json``; ``overwrite: true`` refuses any other folder, and any file.
- one run at a time per output: a lock file beside it (``.NAME.lock``, ``flock``) is held for the
  whole run; a second run fails at once naming the first one's pid.
- the run is built in ``.NAME.<runid>.tmp`` and swapped in at the end: the old run is renamed to
  ``.NAME.<runid>.old``, the new one to ``NAME`` (a rename that never replaces), then the old one is
  removed. An exception (Ctrl-C, SIGTERM) puts the old run back and removes the temporary folder.
- after a crash (kill -9, power loss) at any point, :func:`recover` (run by the next run to the same
  output, or by ``slimkit cleanup``) puts the old run back when ``NAME`` is missing and removes stale
  temporary folders. Stale means: their output's lock is not held, so no live run owns them.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import os
import re
import secrets
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from slimkit import __version__
from slimkit.errors import BadInputError, ConfigError

MARKER = "slimkit-run.json"
_RUN_ID = r"\d{8}-\d{6}-\d+-[0-9a-f]{6}"
_STALE = re.compile(rf"^\.(?P<name>.+)\.(?P<run_id>{_RUN_ID})\.(?P<kind>tmp|old)$")


# -- checks ------------------------------------------------------------------------------------------
def check_output(output: str | os.PathLike, overwrite: bool, field: str = "output") -> None:
    """Refuse an output that is not a place for a run folder, or that this run may not replace.

    Raises :class:`ConfigError` (exit 2) naming ``field`` and the path.
    """
    out = Path(output).expanduser()
    full = Path(os.path.abspath(out))
    _check_not_a_working_place(out, full, field)
    if out.is_symlink():
        raise ConfigError(field, f"{out} is a symbolic link; give the real folder's path")
    if out.exists():
        if not overwrite:
            raise ConfigError(field, f"{out} exists; set overwrite: true or choose another folder")
        if not out.is_dir():
            raise ConfigError(field, f"{out} exists and is not a folder; slimkit will not replace it")
        if not is_run_folder(out):
            raise ConfigError(
                field,
                f"{out} exists and is not a slimkit run folder (it has no {MARKER}); slimkit only "
                "replaces folders it created: move it away or choose another output",
            )
    _check_writable(full, field)


def _check_not_a_working_place(out: Path, full: Path, field: str) -> None:
    """The current folder, a folder above it, the home folder or ``/`` can never be a run folder."""
    cwd = Path(os.path.realpath(os.getcwd()))
    home = Path(os.path.realpath(Path.home()))
    real = Path(os.path.realpath(full))  # through symbolic links too
    if any(p in (cwd, home, Path(p.anchor)) or p in cwd.parents for p in (full, real)):
        raise ConfigError(
            field,
            f"{str(out)!r} is {full}, which holds other files (the current folder, a folder above it, "
            "the home folder or /); give a new folder for the run, e.g. runs/NAME",
        )


def _check_writable(full: Path, field: str) -> None:
    parent = full.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(field, f"{parent} is not a folder, so {full} cannot be created")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(field, f"{parent} is not writable, so {full} cannot be created")


def is_run_folder(path: Path) -> bool:
    """Whether ``path`` is a folder slimkit created (it holds a readable marker with a run id)."""
    marker = path / MARKER
    try:
        return (
            path.is_dir()
            and not path.is_symlink()
            and "run_id" in json.loads(marker.read_text(encoding="utf-8"))
        )
    except (OSError, ValueError, TypeError):
        return False


# -- the lock ----------------------------------------------------------------------------------------
def lock_path(final: Path) -> Path:
    return final.with_name(f".{final.name}.lock")


@contextlib.contextmanager
def output_lock(final: Path) -> Iterator[None]:
    """Hold ``.NAME.lock`` beside ``final``; another holder means another live run: exit 2 at once."""
    fd = _acquire(lock_path(final), final)
    try:
        yield
    finally:
        # Unlink while still holding the lock: a waiter that opened the old file notices (inode check).
        with contextlib.suppress(OSError):
            os.unlink(lock_path(final))
        os.close(fd)


def _acquire(path: Path, final: Path) -> int:
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise BadInputError(
                f"output: {final} is being written by another slimkit run (pid {_holder(path)}); "
                "wait for it to finish or choose another output"
            ) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:  # else the previous holder removed the file as we opened it: lock the new one
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            return fd
        os.close(fd)


def _holder(path: Path) -> str:
    for _ in range(20):  # the holder writes its pid just after locking
        with contextlib.suppress(OSError):
            text = path.read_text().strip()
            if text:
                return text
        time.sleep(0.01)
    return "unknown"


# -- the run folder ----------------------------------------------------------------------------------
Notify = Callable[[str], None]


def _stderr(message: str) -> None:
    print(f"slimkit: {message}", file=sys.stderr, flush=True)


def new_run_id() -> str:
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{secrets.token_hex(3)}"


@contextlib.contextmanager
def run_folder(
    output: str | os.PathLike, overwrite: bool, recipe_name: str = "run", notify: Notify = _stderr
) -> Iterator[Path]:
    """Yield the empty temporary run folder (marker written); on success it becomes ``output``.

    On any exception (KeyboardInterrupt and SIGTERM included) the temporary folder is removed and
    ``output`` keeps what it held before.
    """
    final = Path(os.path.abspath(Path(output).expanduser()))
    final.parent.mkdir(parents=True, exist_ok=True)
    with output_lock(final):
        for message in recover(final):
            notify(message)
        check_output(final, overwrite)  # again: the folder may have changed since validation
        run_id = new_run_id()
        tmp = final.with_name(f".{final.name}.{run_id}.tmp")
        try:
            tmp.mkdir()
            write_marker(tmp, run_id, recipe_name)
            _pause("running")
            yield tmp
            _pause("before-swap")
            _swap(tmp, final, overwrite, run_id)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def write_marker(folder: Path, run_id: str, recipe_name: str) -> None:
    marker = {
        "run_id": run_id,
        "slimkit_version": __version__,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "recipe": recipe_name,
        "pid": os.getpid(),
    }
    (folder / MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")


def _swap(tmp: Path, final: Path, overwrite: bool, run_id: str) -> None:
    """Move the finished run into place; the lock is held, so only a non-slimkit process can race."""
    if not (final.exists() or final.is_symlink()):
        _rename_or_keep(tmp, final, run_id)
        return
    if not overwrite or not is_run_folder(final):
        kept = _keep_aside(tmp, final, run_id)
        raise BadInputError(
            f"output: {final} appeared during the run and is not to be replaced "
            f"({'overwrite is false' if not overwrite else f'it has no {MARKER}'}); "
            f"this run was kept in {kept}"
        )
    old = final.with_name(f".{final.name}.{run_id}.old")
    try:
        os.rename(final, old)
        _pause("between-renames")
        rename_noreplace(tmp, final)
    except BaseException:
        if old.exists() and not final.exists():
            os.rename(old, final)  # the old run goes back: nothing is lost
        raise
    shutil.rmtree(old, ignore_errors=True)


def _rename_or_keep(tmp: Path, final: Path, run_id: str) -> None:
    try:
        rename_noreplace(tmp, final)
    except FileExistsError:
        kept = _keep_aside(tmp, final, run_id)
        raise BadInputError(
            f"output: {final} appeared during the run; it was left alone and this run was kept in {kept}"
        ) from None


def _keep_aside(tmp: Path, final: Path, run_id: str) -> Path:
    kept = final.with_name(f"{final.name}.{run_id}")
    rename_noreplace(tmp, kept)
    return kept


def rename_noreplace(src: Path, dst: Path) -> None:
    """``rename`` that fails with FileExistsError instead of replacing ``dst`` (atomic on Linux)."""
    if _renameat2(src, dst):
        return
    if dst.exists() or dst.is_symlink():  # elsewhere: check, then rename (the lock keeps slimkit out)
        raise FileExistsError(errno.EEXIST, "exists", str(dst))
    os.rename(src, dst)


def _renameat2(src: Path, dst: Path) -> bool:
    """True when done with Linux's RENAME_NOREPLACE; False when the system lacks it."""
    func = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None) if sys.platform == "linux" else None
    if func is None:
        return False
    at_fdcwd, rename_noreplace_flag = -100, 1
    if func(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), rename_noreplace_flag) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL):  # an old kernel or a file system without the flag
        return False
    raise OSError(code, os.strerror(code), str(dst))


# -- recovery ----------------------------------------------------------------------------------------
def stale_entries(final: Path) -> list[tuple[Path, str]]:
    """``(path, "tmp" | "old")`` for each leftover of an earlier run to ``final``, oldest first."""
    found = []
    with contextlib.suppress(FileNotFoundError):
        for entry in final.parent.iterdir():
            match = _STALE.match(entry.name)
            if match and match["name"] == final.name:
                found.append((match["run_id"], entry, match["kind"]))
    return [(entry, kind) for _, entry, kind in sorted(found)]


def recover(final: Path) -> list[str]:
    """Repair what a crashed run to ``final`` left; the caller holds the output's lock.

    Returns one line per action. When ``final`` is missing, the newest old run is put back; new runs
    that never reached their final rename are removed, as are old runs already replaced.
    """
    done = []
    entries = stale_entries(final)
    olds = [path for path, kind in entries if kind == "old"]
    if olds and not (final.exists() or final.is_symlink()):
        os.rename(olds[-1], final)
        done.append(f"restored {final} from {olds[-1].name} (a run was interrupted while replacing it)")
        olds = olds[:-1]
    for path, kind in entries:
        if kind == "tmp":
            shutil.rmtree(path, ignore_errors=True)
            done.append(f"removed {path} (left by an interrupted run)")
        elif path in olds:
            shutil.rmtree(path, ignore_errors=True)
            done.append(f"removed {path} (an earlier run already replaced by {final.name})")
    return done


def cleanup(folder: str | os.PathLike) -> list[str]:
    """``slimkit cleanup DIR``: recover the output ``DIR`` and every output inside ``DIR``.

    Outputs whose lock is held (a live run) are left alone and reported.
    """
    given = Path(os.path.abspath(Path(folder).expanduser()))
    if not given.is_dir() and not stale_entries(given):
        raise BadInputError(f"cleanup: {folder}: no such folder, and no leftovers of a run to it")
    outputs = _outputs_inside(given)
    if is_run_folder(given) or stale_entries(given):
        outputs.add(given)
    done = []
    for final in sorted(outputs):
        try:
            with output_lock(final):
                done.extend(recover(final))
        except BadInputError:
            if stale_entries(final):
                done.append(f"left {final}'s temporary folders: a run to it is in progress")
    return done


def _outputs_inside(folder: Path) -> set[Path]:
    if not folder.is_dir():
        return set()
    return {folder / m["name"] for e in folder.iterdir() if (m := _STALE.match(e.name))}


# -- a test hook ---------------------------------------------------------------------------------------
def _pause(point: str) -> None:
    """Tests set SLIMKIT_TEST_PAUSE=POINT[:SECONDS] to stop a run here and kill it at a known point."""
    wanted, _, seconds = os.environ.get("SLIMKIT_TEST_PAUSE", "").partition(":")
    if wanted == point:
        _stderr(f"test pause at {point}")
        time.sleep(float(seconds or 60))
