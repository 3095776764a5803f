"""The ``slimkit`` command: parses arguments and calls the library, nothing more."""

from __future__ import annotations

import argparse
import json
import sys
from importlib import resources
from pathlib import Path

from slimkit.errors import ConfigError, SlimkitError

EXIT_BAD_INPUT = 2


def shipped_recipe(name: str) -> Path:
    path = Path(str(resources.files("slimkit.shipped_recipes").joinpath(f"{name}.yaml")))
    if not path.is_file():
        raise ConfigError("recipe", f"no shipped recipe named {name!r}")
    return path


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="slimkit", description="Make trained PyTorch models smaller and faster.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = sub.add_parser(
        "demo",
        help="train, compress and measure the built-in digits model (about 1-2 min)",
        description="Run the shipped demo recipe on scikit-learn's digits (no files needed).",
    )
    demo.add_argument("--output", default="runs/demo", help="run folder to write (default: runs/demo)")
    demo.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="recipe overrides, e.g. steps.0.train.epochs=3"
    )
    demo.add_argument("-q", "--quiet", action="store_true", help="no progress bars or log on the console")
    run = sub.add_parser(
        "run", help="run a recipe", description="Run a YAML recipe and write its run folder."
    )
    run.add_argument("recipe", help="recipe file (YAML)")
    run.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="overrides, e.g. steps.0.train.lr=0.01 output=runs/x",
    )
    run.add_argument("-q", "--quiet", action="store_true", help="no progress bars or log on the console")
    val = sub.add_parser(
        "validate",
        help="check a recipe without running it",
        description="Validate a recipe completely; exit 2 naming the first bad field.",
    )
    val.add_argument("recipe")
    val.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    rep = sub.add_parser(
        "report",
        help="print the report of a finished run",
        description="Print a run folder's report table (add --markdown or --json).",
    )
    rep.add_argument("run_dir")
    fmt = rep.add_mutually_exclusive_group()
    fmt.add_argument("--markdown", action="store_true")
    fmt.add_argument("--json", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _dispatch(args)
    except ConfigError as err:
        print(f"slimkit: recipe error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except SlimkitError as err:
        print(f"slimkit: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("slimkit: interrupted; no run folder was written", file=sys.stderr)
        return 130


def _dispatch(args: argparse.Namespace) -> int:
    from slimkit.recipes import load_recipe, run_recipe
    from slimkit.report import Report

    if args.command == "report":
        report = Report.load(args.run_dir)
        print(
            json.dumps(report.to_json(), indent=2)
            if args.json
            else report.to_markdown()
            if args.markdown
            else report.to_table()
        )
        return 0
    if args.command == "demo":
        recipe = load_recipe(shipped_recipe("demo"), [f"output={args.output}", *args.overrides])
    else:
        recipe = load_recipe(args.recipe, args.overrides)
    if args.command == "validate":
        print(f"{args.recipe}: valid ({len(recipe.steps)} steps: {', '.join(s.name for s in recipe.steps)})")
        return 0
    out = run_recipe(recipe, progress=not args.quiet)
    print(Report.load(out).to_table())
    print(f"run folder: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
