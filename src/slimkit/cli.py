"""The ``slimkit`` command: parses arguments and calls the library, nothing more.

Exit codes: 0 done; 1 the work failed (or a bug in slimkit); 2 bad input (a recipe, an override,
a data or model file, an output folder, a run in progress); 3 a search found nothing within its
floor; 130 Ctrl-C; 141 the reader of the output went away (``| head``); 143 SIGTERM. An error is
one short line, ``slimkit: <kind>: <what>``; ``--debug`` adds the traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import threading
import traceback
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

from slimkit.errors import ConfigError, SlimkitError

EXIT_WORK = 1
EXIT_BAD_INPUT = 2
EXIT_FLOOR_NOT_MET = 3
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141
EXIT_TERMINATED = 143
_MAX_MESSAGE = 2000  # characters: an error never floods the terminal


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that every ``finally`` (the run folder's cleanup) runs."""


def shipped_recipe(name: str) -> Path:
    path = Path(str(resources.files("slimkit.shipped_recipes").joinpath(f"{name}.yaml")))
    if not path.is_file():
        raise ConfigError("recipe", f"no shipped recipe named {name!r}")
    return path


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="slimkit", description="Make trained PyTorch models smaller and faster.")
    p.add_argument("--debug", action="store_true", help="print the traceback of any error")
    # --debug is accepted after the command too; SUPPRESS keeps the top-level value when it is not given.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_run_commands(sub, common)
    rep = sub.add_parser(
        "report",
        parents=[common],
        help="print the report of a finished run",
        description="Print a run folder's report table (add --markdown or --json), or rewrite its "
        "report.html from its report.json (--html).",
    )
    rep.add_argument("run_dir")
    fmt = rep.add_mutually_exclusive_group()
    fmt.add_argument("--markdown", action="store_true")
    fmt.add_argument("--json", action="store_true")
    fmt.add_argument("--html", action="store_true", help="(re)write RUN_DIR/report.html from report.json")
    clean = sub.add_parser(
        "cleanup",
        parents=[common],
        help="repair what an interrupted run left behind",
        description="Put back a run folder that an interrupted run was replacing and remove the "
        "temporary folders of interrupted runs. Runs in progress are left alone.",
    )
    clean.add_argument("folder", help="a run's output folder, or the folder holding run folders")
    gen = sub.add_parser(
        "generate",
        parents=[common],
        help="print text from a finished run's language model",
        description="Greedy continuation (KV cache) of PROMPT by the final model of a run folder.",
    )
    gen.add_argument("run_dir")
    gen.add_argument("prompt")
    gen.add_argument("--step", help="the step whose model to use (only the last step's model is saved)")
    gen.add_argument("--max-new-tokens", type=int, default=64, help="tokens to add (default: 64)")
    _add_export_command(sub, common)
    info = sub.add_parser(
        "info",
        parents=[common],
        help="print the CPU's features, library versions and the kernel each path will use",
        description="The processor, thread count, library versions and, per compute path (int8, "
        "int4/int8 weight-only, bf16, ONNX Runtime int8), the kernel chosen on this machine and why.",
    )
    info.add_argument("--json", action="store_true")
    return p


TRUST_HELP = "allow the recipe's model factory to import and run its Python module (trust the recipe)"


def _add_export_command(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    exp = sub.add_parser(
        "export",
        parents=[common],
        help="write a finished run's model as ONNX (or a torch.export .pt2), checked against PyTorch",
        description="Export the final model of a run folder, run the file (ONNX Runtime, or the .pt2 "
        "program) on the export step's example (train samples of the run's data) and compare it with "
        "the PyTorch model; nothing is written when it differs by more than --tolerance.",
    )
    exp.add_argument("run_dir")
    # No argparse choices: an unknown target gets slimkit's own one-line error and exit 2.
    exp.add_argument("--to", default="onnx", help="onnx (ONNX Runtime, default) or pt2 (torch.export)")
    exp.add_argument("--out", help="file to write (must not exist; default: RUN_DIR/export/model.onnx|.pt2)")
    exp.add_argument("--step", help="the step whose model to use (only the last step's model is saved)")
    exp.add_argument("--opset", type=int, default=17, help="ONNX opset, 17 to 20 (default: 17)")
    exp.add_argument(
        "--tolerance", type=float, help="largest relative L2 error vs PyTorch, 0 to 1 (default: 0.1)"
    )
    exp.add_argument("--example-samples", type=int, help="train samples to export and check on (default: 8)")
    exp.add_argument("--threads", type=int, help="ONNX Runtime and latency threads (default: 2)")
    exp.add_argument("--repeats", type=int, default=10, help="latency rounds, 0 to skip (default: 10)")
    exp.add_argument("--trust-code", action="store_true", help=TRUST_HELP)


def _add_run_commands(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    quiet = {"action": "store_true", "help": "no progress bars or log on the console"}
    demo = sub.add_parser(
        "demo",
        parents=[common],
        help="train, compress and measure the built-in digits model (about 1-2 min)",
        description="Run the shipped demo recipe on scikit-learn's digits (no files needed).",
    )
    demo.add_argument("--output", default="runs/demo", help="run folder to write (default: runs/demo)")
    demo.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="recipe overrides, e.g. steps.0.train.epochs=3"
    )
    demo.add_argument("-q", "--quiet", **quiet)
    run = sub.add_parser(
        "run",
        parents=[common],
        help="run a recipe",
        description="Run a YAML recipe and write its run folder.",
    )
    run.add_argument("recipe", help="recipe file (YAML)")
    run.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="overrides, e.g. steps.0.train.lr=0.01 output=runs/x",
    )
    run.add_argument("-q", "--quiet", **quiet)
    run.add_argument("--trust-code", action="store_true", help=TRUST_HELP)
    run.add_argument(
        "--resume",
        action="store_true",
        help="go on with an interrupted run of this recipe: finished steps are reused, the running "
        "step goes on from its last epoch (the recipe must be unchanged)",
    )
    search = sub.add_parser(
        "search",
        parents=[common],
        help="run a recipe whose last step is a search (exit 3 when nothing meets its floor)",
        description="Run a recipe ending with a search step: the fastest (or smallest) model within the "
        "metric floor, the Pareto front and every candidate (candidates.jsonl). After a crash the same "
        "command goes on from the candidates already evaluated.",
    )
    search.add_argument("recipe", help="recipe file (YAML) whose last step is {type: search, ...}")
    search.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides, as for run")
    search.add_argument("-q", "--quiet", **quiet)
    search.add_argument("--trust-code", action="store_true", help=TRUST_HELP)
    search.add_argument("--resume", action="store_true", help="as for run: reuse the steps before the search")
    val = sub.add_parser(
        "validate",
        parents=[common],
        help="check a recipe without running it",
        description="Validate a recipe completely; exit 2 naming the first bad field.",
    )
    val.add_argument("recipe")
    val.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    val.add_argument("--trust-code", action="store_true", help=TRUST_HELP)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line; overrides may come after options (``run r.yaml --quiet output=X``)."""
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        # argparse stops filling ``overrides`` at the first option; what follows comes back here.
        if not hasattr(args, "overrides") or any(item.startswith("-") for item in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with _sigterm_raises():
        try:
            code = _dispatch(args)
            sys.stdout.flush()  # here, so that a closed pipe is seen inside the try, not at exit
            return code
        except BaseException as err:  # every way out gets its exit code and one short line
            return _failed(err, args)


def _failed(err: BaseException, args: argparse.Namespace) -> int:
    if isinstance(err, BrokenPipeError):  # ``slimkit report RUN | head``: the reader has gone
        _silence_stdout()
        return EXIT_BROKEN_PIPE
    if not isinstance(err, Exception | KeyboardInterrupt):
        raise err  # SystemExit and the like keep their meaning
    if args.debug:
        traceback.print_exception(err, file=sys.stderr)
    if isinstance(err, KeyboardInterrupt):
        how = "terminated (SIGTERM)" if isinstance(err, Terminated) else "interrupted"
        wrote = "; no run folder was written" if args.command in ("run", "demo", "search") else ""
        if args.command == "search":
            wrote += f" (slimkit search {args.recipe} goes on from the candidates already evaluated)"
        if args.command == "run":
            wrote += f" (slimkit run {args.recipe} --resume goes on from the last finished epoch)"
        _say(how + wrote)
        return EXIT_TERMINATED if isinstance(err, Terminated) else EXIT_INTERRUPTED
    if isinstance(err, SlimkitError):
        _say(f"{err.kind}: {err}")
        return err.exit_code
    if isinstance(err, MemoryError):
        _say("error: out of memory")
        return EXIT_WORK
    if isinstance(err, OSError):  # a disk that is full, a file that vanished: the work failed
        _say(f"error: {err}")
        return EXIT_WORK
    hint = "" if args.debug else " (run with --debug for the traceback)"
    _say(f"internal error: {type(err).__name__}: {err}{hint}")
    return EXIT_WORK


def _say(message: str) -> None:
    if len(message) > _MAX_MESSAGE:
        message = message[:_MAX_MESSAGE] + f"... ({len(message) - _MAX_MESSAGE} more characters)"
    with contextlib.suppress(OSError):
        print(f"slimkit: {message}", file=sys.stderr, flush=True)


def _silence_stdout() -> None:
    """Point stdout at /dev/null so that the interpreter's final flush does not fail again."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """While the command runs, SIGTERM raises :class:`Terminated` (once), so cleanup code runs."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread (a test may call main elsewhere)
        return

    def terminate(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the cleanup
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "cleanup":
        from slimkit.recipes.output import cleanup

        done = cleanup(args.folder)
        print("\n".join(done) if done else f"{args.folder}: nothing to clean up")
        return 0
    if args.command == "report":
        return _print_report(args)
    if args.command == "info":
        from slimkit.utils.sysinfo import info, info_text

        print(json.dumps(info(), indent=2) if args.json else info_text())
        return 0
    if args.command == "generate":
        from slimkit.recipes.generate import generate_text

        print(generate_text(args.run_dir, args.prompt, args.step, args.max_new_tokens))
        return 0
    if args.command == "export":
        from slimkit.recipes.export_run import export_options, export_run

        flags = {k: getattr(args, k) for k in ("to", "out", "step", "opset", "repeats", "trust_code")}
        settings = {k: getattr(args, k) for k in ("tolerance", "example_samples", "threads")}
        print("\n".join(export_run(args.run_dir, export_options(**flags, **settings)).lines()))
        return 0
    from slimkit.recipes import load_recipe, run_recipe
    from slimkit.report import Report

    if args.command == "demo":
        recipe = load_recipe(shipped_recipe("demo"), [f"output={args.output}", *args.overrides])
    else:
        recipe = load_recipe(args.recipe, args.overrides, trust_code=args.trust_code)
    if args.command == "validate":
        print(f"{args.recipe}: valid ({len(recipe.steps)} steps: {', '.join(s.name for s in recipe.steps)})")
        from slimkit.recipes.checks import code_modules

        for field, module in code_modules(recipe):
            print(f"note: this recipe imports and runs code from {module} ({field})")
        return 0
    if args.command == "search" and (not recipe.steps or recipe.steps[-1].type != "search"):
        raise ConfigError(
            f"steps[{len(recipe.steps) - 1}].type",
            "slimkit search needs a recipe whose last step is a search step",
        )
    out = run_recipe(recipe, progress=not args.quiet, resume=getattr(args, "resume", False))
    print(Report.load(out).to_table())
    print(f"run folder: {out}")
    return _search_exit(out)


def _search_exit(out: Path) -> int:
    """3 when the run's search found nothing within its floor (its best effort is saved, labelled)."""
    from slimkit.recipes.steps.search import missed_floor

    missed = missed_floor(out)
    if missed is None:
        return 0
    for line in missed:
        _say(line)
    return EXIT_FLOOR_NOT_MET


def _print_report(args: argparse.Namespace) -> int:
    from slimkit.report import Report

    report = Report.load(args.run_dir)
    if args.html:  # beside the report.json read, where the PNG files it names are
        folder = Path(args.run_dir) if Path(args.run_dir).is_dir() else Path(args.run_dir).parent
        print(report.save_html(folder))
        return 0
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        print(report.to_markdown() if args.markdown else report.to_table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
