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

from slimkit.config import from_dict, require, short_key, short_repr, to_dict
from slimkit.data.registry import FILE_PATHS, DataConfig, path_problem
from slimkit.errors import ConfigError
from slimkit.models.loading import ModelConfig
from slimkit.recipes.checks import CONSENT, check_consent, check_deep
from slimkit.recipes.measure import MeasureConfig
from slimkit.recipes.output import check_output
from slimkit.recipes.steps import step_type
from slimkit.recipes.yaml_io import parse_yaml, read_yaml_file

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
    trust_code: bool = False  # the recipe's own consent to import factory code (--trust-code is not stored)

    def to_dict(self) -> dict:
        """What the user wrote plus every default, in the shape :func:`parse_recipe` reads back."""
        out = to_dict(self)
        out["steps"] = [
            {"type": s.type, "name": s.name, **step_type(s.type, "type").dump(s.config)} for s in self.steps
        ]
        return out


_TOP = ("name", "seed", "model", "data", "steps", "measure", "output", "overwrite", "trust_code")


def parse_recipe(raw: Any, check_paths: bool = True, trust_code: bool = False) -> Recipe:
    """Validate plain recipe data. Relative paths are taken from the current folder, as in any CLI.

    ``check_paths=False`` skips what needs the files (data headers, model layer names, monitors against
    the data's task); structure, types and consent are still checked. A model ``factory`` needs consent:
    ``trust_code: true`` in the recipe or ``trust_code=True`` here (the CLI's ``--trust-code``).
    """
    require(isinstance(raw, dict), "", "a recipe must be a YAML mapping")
    unknown = [k for k in raw if k not in _TOP]
    require(
        not unknown,
        short_key(unknown[0]) if unknown else "",
        f"unknown key (expected one of: {', '.join(_TOP)})",
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
    seed, overwrite, name = raw.get("seed", 0), raw.get("overwrite", False), raw.get("name", "run")
    require(isinstance(seed, int) and not isinstance(seed, bool), "seed", "must be an integer")
    require(isinstance(overwrite, bool), "overwrite", "must be true or false")
    require(isinstance(name, str), "name", "must be a string")
    own_consent = raw.get("trust_code", False)
    require(isinstance(own_consent, bool), "trust_code", "must be true or false")
    measure = from_dict(MeasureConfig, raw.get("measure", {}), "measure")
    recipe = Recipe(
        model, data, steps, output, name, seed, overwrite, measure=measure, trust_code=own_consent
    )
    check_consent(recipe, trust_code or own_consent)  # before anything imports the user's module
    if check_paths:
        check_deep(recipe, trust_code or own_consent)
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
    # Only a slimkit run folder may be replaced, and never the current/home folder (recipes.output).
    check_output(recipe.output, recipe.overwrite)


def apply_overrides(raw: Any, overrides: list[str], trust_code: bool = False) -> Any:
    """``steps.0.train.epochs=3`` / ``steps[0].train.epochs=3`` / ``output=runs/x``; values are parsed as YAML.

    An override cannot make a recipe run code: setting a ``factory`` or ``trust_code`` needs
    ``trust_code=True`` (the CLI's ``--trust-code``), whatever the recipe file says.
    """
    raw = copy.deepcopy(raw)
    for item in overrides:
        try:
            _apply(raw, item, trust_code)
        except ConfigError as err:
            raise ConfigError(err.path, f"{err.message} (in the override {short_repr(item)})") from None
    return raw


def _apply(raw: Any, item: str, trust_code: bool) -> None:
    key, sep, text = item.partition("=")
    require(bool(sep) and bool(key), "", "an override must look like key=value")
    parts = key.replace("[", ".").replace("]", "").split(".")
    require(all(parts), key, "a key has a name between each pair of dots")
    value = parse_yaml(text, key, lines=False)
    require(
        trust_code or not _sets_code(parts[-1], value),
        key,
        f"an override cannot add code to run (factory, trust_code); {CONSENT}",
    )
    node = raw
    for depth, part in enumerate(parts[:-1]):
        node = _child(node, part, ".".join(parts[: depth + 1]))
    last = parts[-1]
    where = ".".join(parts[:-1]) or "recipe"
    require(
        isinstance(node, (dict, list)), where, f"is the value {short_repr(node)}: it has no field {last!r}"
    )
    if isinstance(node, list):
        node[_index(node, last, key)] = value
    else:
        node[last] = value


def _sets_code(key: str, value: Any) -> bool:
    """Whether an override names a factory or consent (at its key or anywhere inside its value)."""
    if key in ("factory", "trust_code"):
        return True
    if isinstance(value, dict):
        return any(_sets_code(str(k), v) for k, v in value.items())
    if isinstance(value, list):
        return any(_sets_code("", v) for v in value)
    return False


def _child(node: Any, part: str, path: str) -> Any:
    if isinstance(node, list):
        return node[_index(node, part, path)]
    require(isinstance(node, dict), path, f"cannot go into the value {short_repr(node)}")
    require(part in node, path, "no such field to override")
    return node[part]


def _index(node: list, part: str, path: str) -> int:
    require(part.isdigit() and int(part) < len(node), path, f"no such list entry (the list has {len(node)})")
    return int(part)


def load_recipe(
    path: str | Path, overrides: list[str] | None = None, check_paths: bool = True, trust_code: bool = False
) -> Recipe:
    """Read, override (``steps.0.train.epochs=3``) and validate a recipe file; see :func:`parse_recipe`.

    The file is read by :func:`slimkit.recipes.yaml_io.read_yaml_file` (size limit, no duplicate keys,
    bounded aliases); ``trust_code`` is the command line's consent to import factory code.
    """
    raw = read_yaml_file(path)
    raw = apply_overrides({} if raw is None else raw, overrides or [], trust_code)
    return parse_recipe(raw, check_paths=check_paths, trust_code=trust_code)
