"""The recipe: model, data, ordered steps, measurement settings and output folder.

``load_recipe`` validates the whole file before any work starts, so a typo in
the last step is reported in a second, not after an hour of training. Errors
carry the field's path in the recipe: ``steps[2].train.epochs: must be a
positive integer``. ``check_paths=False`` checks structure and types only
(the data files need not exist: shipped recipes are checked that way anywhere).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from slimkit.config import from_dict, require, to_dict
from slimkit.data.registry import FILE_PATHS, DataConfig, path_problem
from slimkit.errors import ConfigError
from slimkit.models.loading import ModelConfig
from slimkit.recipes.measure import MeasureConfig
from slimkit.recipes.steps import step_type

__all__ = ["MeasureConfig", "Recipe", "Step", "apply_overrides", "load_recipe", "parse_recipe"]


@dataclass(frozen=True)
class Step:
    type: str
    name: str
    config: Any  # the step type's frozen config


@dataclass(frozen=True)
class Recipe:
    model: ModelConfig
    data: DataConfig
    steps: list[Step]
    output: str
    name: str = "run"
    seed: int = 0
    overwrite: bool = False
    measure: MeasureConfig = field(default_factory=MeasureConfig)

    def to_dict(self) -> dict:
        """What the user wrote plus every default, in the shape :func:`parse_recipe` reads back."""
        out = to_dict(self)
        out["steps"] = [
            {"type": s.type, "name": s.name, **step_type(s.type, "type").dump(s.config)} for s in self.steps
        ]
        return out


_TOP = ("name", "seed", "model", "data", "steps", "measure", "output", "overwrite")


def parse_recipe(raw: Any, check_paths: bool = True) -> Recipe:
    """Validate plain recipe data. Relative paths are taken from the current folder, as in any CLI.

    ``check_paths=False`` skips the checks that data files exist (structure and types are still checked).
    """
    require(isinstance(raw, dict), "", "a recipe must be a YAML mapping")
    unknown = [k for k in raw if k not in _TOP]
    require(
        not unknown, str(unknown[0]) if unknown else "", f"unknown key (expected one of: {', '.join(_TOP)})"
    )
    for key in ("model", "data", "steps", "output"):
        require(key in raw, key, "is required")
    model = from_dict(ModelConfig, raw["model"], "model")
    data = from_dict(DataConfig, raw["data"], "data")
    if check_paths:
        data = _checked_data_paths(data)
    steps = _parse_steps(raw["steps"])
    output = raw["output"]
    require(isinstance(output, str) and output.strip() != "", "output", "must be a folder path")
    options = {k: raw[k] for k in ("name", "seed", "overwrite") if k in raw}
    seed, overwrite, name = (
        options.get("seed", 0),
        options.get("overwrite", False),
        options.get("name", "run"),
    )
    require(isinstance(seed, int) and not isinstance(seed, bool), "seed", "must be an integer")
    require(isinstance(overwrite, bool), "overwrite", "must be true or false")
    require(isinstance(name, str), "name", "must be a string")
    measure = from_dict(MeasureConfig, raw.get("measure", {}), "measure")
    recipe = Recipe(model, data, steps, output, name=name, seed=seed, overwrite=overwrite, measure=measure)
    _check_output(recipe)
    return recipe


def _parse_steps(raw: Any) -> list[Step]:
    require(isinstance(raw, list) and len(raw) > 0, "steps", "must be a non-empty list of steps")
    steps, names, kinds = [], set(), []
    for i, entry in enumerate(raw):
        path = f"steps[{i}]"
        require(isinstance(entry, dict), path, "must be a mapping with a 'type'")
        require("type" in entry, f"{path}.type", "is required")
        body = {k: v for k, v in entry.items() if k not in ("type", "name")}
        kind = step_type(entry["type"], f"{path}.type")
        name = entry.get("name", entry["type"])
        if "name" not in entry and name in names:  # a repeated step type gets a numbered default name
            name = f"{name}_{i}"
        require(isinstance(name, str) and name.strip() != "", f"{path}.name", "must be a non-empty string")
        require(name not in names, f"{path}.name", f"{name!r} is used by an earlier step; give each a name")
        names.add(name)
        require(
            not kind.last_only or i == len(raw) - 1, f"{path}.type", f"{entry['type']} must be the last step"
        )
        steps.append(Step(entry["type"], name, kind.parse(body, path)))
        kinds.append(kind)
    for i, kind in enumerate(kinds):
        if kind.check_before is not None:
            kind.check_before(steps[:i], f"steps[{i}]")
    return steps


def _checked_data_paths(data: DataConfig) -> DataConfig:
    found = {}
    for key, is_file in (("path", data.name in FILE_PATHS), ("test_path", True), ("val_path", True)):
        value = getattr(data, key)
        if value:
            full = Path(value).expanduser()
            problem = path_problem(full, is_file)
            require(problem is None, f"data.{key}", problem or "")
            found[key] = str(full)
    return dataclasses.replace(data, **found) if found else data


def _check_output(recipe: Recipe) -> None:
    out = Path(recipe.output)
    if out.exists() and not recipe.overwrite:
        raise ConfigError("output", f"{out} exists; set overwrite: true or choose another folder")
    require(not out.exists() or out.is_dir(), "output", f"{out} exists and is not a folder")


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """``steps.0.train.epochs=3`` / ``steps[0].train.epochs=3`` / ``output=runs/x``; values are parsed as YAML."""
    raw = copy.deepcopy(raw)
    for item in overrides:
        key, sep, value = item.partition("=")
        require(bool(sep) and bool(key), item, "an override must look like key=value")
        parts = key.replace("[", ".").replace("]", "").split(".")
        node = raw
        for depth, part in enumerate(parts[:-1]):
            node = _child(node, part, ".".join(parts[: depth + 1]))
        last = parts[-1]
        if isinstance(node, list):
            node[_index(node, last, key)] = yaml.safe_load(value)
        else:
            node[last] = yaml.safe_load(value)
    return raw


def _child(node: Any, part: str, path: str) -> Any:
    if isinstance(node, list):
        return node[_index(node, part, path)]
    require(isinstance(node, dict) and part in node, path, "no such field to override")
    return node[part]


def _index(node: list, part: str, path: str) -> int:
    require(part.isdigit() and int(part) < len(node), path, f"no such list entry (the list has {len(node)})")
    return int(part)


def load_recipe(path: str | Path, overrides: list[str] | None = None, check_paths: bool = True) -> Recipe:
    """Read, override (``steps.0.train.epochs=3``) and validate a recipe file; see :func:`parse_recipe`."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError("recipe", f"file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError("recipe", f"{path} is not valid YAML ({err})") from None
    return parse_recipe(apply_overrides(raw or {}, overrides or []), check_paths=check_paths)
