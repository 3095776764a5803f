"""Reading recipe YAML safely: a size limit, no duplicate keys, bounded aliases, YAML 1.2 floats.

PyYAML's ``safe_load`` is safe against code execution but not against the
rest: the last of two equal keys silently wins, ``1e-3`` is a string (YAML
1.1's float rule wants a dot), and a few lines of nested aliases expand into
billions of nodes when the value is walked or printed. Every recipe file and
every ``KEY=VALUE`` override goes through :func:`parse_yaml`, so all share
these rules and fail with a :class:`ConfigError` naming the file (or the
override) and the line.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from slimkit.config import short_repr
from slimkit.errors import ConfigError

MAX_BYTES = 1 << 20  # a recipe is a page of settings; a larger file is a mistake (or an attack)
MAX_NODES = 1_000_000  # values of the document with every alias expanded (1 MiB of YAML holds fewer)
MERGE_TAG = "tag:yaml.org,2002:merge"
# YAML 1.2's exponent floats without a dot (1e-3, 5E+5, 2.e4), which YAML 1.1 reads as strings.
EXP_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$")

_Base = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the C parser where PyYAML has it: 10x faster


class RecipeLoader(_Base):  # type: ignore[misc, valid-type]
    """``yaml.SafeLoader`` that refuses duplicate keys and reads exponent floats."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == MERGE_TAG:  # '<<: *base' keys may be overridden, as YAML intends
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
            except TypeError:  # a list or mapping as a key: unhashable
                raise _error(
                    key_node, f"a mapping key must be a plain value, not a {type(key).__name__}"
                ) from None
            if duplicate:
                raise _error(key_node, f"duplicate key {short_repr(key)} (first on line {seen[key]})")
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


RecipeLoader.add_implicit_resolver("tag:yaml.org,2002:float", EXP_FLOAT, list("-+0123456789."))


class _YamlProblem(Exception):
    def __init__(self, line: int | None, message: str):
        super().__init__(message)
        self.line, self.message = line, message


def _error(node: yaml.Node, message: str) -> _YamlProblem:
    return _YamlProblem(node.start_mark.line + 1, message)


def _expanded_size(root: yaml.Node) -> int:
    """How many nodes the document has with every alias expanded (aliases share node objects)."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:  # iterative post-order: deep nesting must not exhaust Python's recursion limit
        node, children_done = stack.pop()
        key = id(node)
        if key in sizes:
            continue
        children = _children(node)
        if children_done:
            open_nodes.discard(key)
            sizes[key] = min(1 + sum(sizes[id(c)] for c in children), MAX_NODES + 1)
            continue
        if key in open_nodes:
            raise _error(node, "an alias refers to the mapping or list that contains it")
        open_nodes.add(key)
        stack.append((node, True))
        stack.extend((c, False) for c in children if id(c) not in sizes)
    return sizes[id(root)]


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def parse_yaml(text: str, where: str, lines: bool = True) -> Any:
    """The data in ``text``; ``where`` (a file, an override) names it in a :class:`ConfigError`.

    ``lines``: add the line number to ``where`` (``recipe.yaml:12``); off for one-line override values.
    """
    loader = RecipeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node) > MAX_NODES:
            raise _error(node, f"the document expands to more than {MAX_NODES} values (aliases?)")
        return loader.construct_document(node)
    except _YamlProblem as err:
        raise ConfigError(f"{where}:{err.line}" if err.line and lines else where, err.message) from None
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        line = f":{mark.line + 1}" if mark is not None and lines else ""
        what = err.problem or err.context or "invalid YAML"
        raise ConfigError(f"{where}{line}", f"not valid YAML ({what})") from None
    except yaml.YAMLError as err:
        raise ConfigError(where, f"not valid YAML ({short_repr(str(err))})") from None
    except RecursionError:
        raise ConfigError(where, "nested too deeply to be a recipe") from None
    finally:
        loader.dispose()


def read_yaml_file(path: str | Path) -> Any:
    """Parse a recipe file: at most :data:`MAX_BYTES`, UTF-8, see :func:`parse_yaml`."""
    path = Path(path)
    try:
        if not path.exists():
            raise ConfigError("recipe", f"file not found: {path}")
        if path.is_dir():
            raise ConfigError("recipe", f"{path} is a folder, not a recipe file")
        size = path.stat().st_size
        if size > MAX_BYTES:
            raise ConfigError("recipe", f"{path} is {size} bytes; a recipe may be at most {MAX_BYTES}")
        with open(path, "rb") as f:
            raw = f.read(MAX_BYTES + 1)  # the file may grow after stat (a pipe, a log)
    except OSError as err:
        raise ConfigError("recipe", f"cannot read {path} ({err.strerror or err})") from None
    if len(raw) > MAX_BYTES:
        raise ConfigError("recipe", f"{path} is over {MAX_BYTES} bytes; a recipe may be at most that")
    try:
        text = raw.decode("utf-8-sig")  # a byte-order mark is allowed
    except UnicodeDecodeError as err:
        raise ConfigError(
            "recipe", f"{path} is not UTF-8 text (byte 0x{raw[err.start]:02x} at offset {err.start})"
        ) from None
    return parse_yaml(text, str(path))
