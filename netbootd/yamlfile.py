"""YAML loading that remembers line numbers, and config errors that cite them.

Why by hand: PyYAML and pydantic each know half of a good error message (the
line, the field). ``load_yaml`` keeps the line of every mapping key;
``ConfigError.from_validation`` joins pydantic's error locations to those lines
so a user reads ``config/nodes.yaml:14: nodes.dc:a6:32:01:36:c2.action: ...``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError


class LineDict(dict):
    """A dict that knows the line (1-based) of itself and of each key."""

    line: int = 0
    key_lines: dict[Any, int]

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.key_lines = {}


class LineList(list):
    line: int = 0
    item_lines: list[int]

    def __init__(self, *a: Any) -> None:
        super().__init__(*a)
        self.item_lines = []


class _Loader(yaml.SafeLoader):
    pass


def _construct_mapping(loader: _Loader, node: yaml.MappingNode) -> LineDict:
    loader.flatten_mapping(node)
    out = LineDict()
    out.line = node.start_mark.line + 1
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in out:
            raise yaml.MarkedYAMLError(
                "while constructing a mapping", node.start_mark,
                f"duplicate key {key!r}", key_node.start_mark)
        out[key] = loader.construct_object(value_node, deep=True)
        out.key_lines[key] = key_node.start_mark.line + 1
    return out


def _construct_sequence(loader: _Loader, node: yaml.SequenceNode) -> LineList:
    out = LineList(loader.construct_object(n, deep=True) for n in node.value)
    out.line = node.start_mark.line + 1
    out.item_lines = [n.start_mark.line + 1 for n in node.value]
    return out


def _construct_str_keep_sexagesimal(loader: _Loader, node: yaml.ScalarNode) -> Any:
    # YAML 1.1 turns 12:34:56 into 45296 (base 60). MACs and times must stay strings.
    if ":" in node.value:
        return node.value
    return loader.construct_yaml_int(node)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _construct_sequence)
_Loader.add_constructor("tag:yaml.org,2002:int", _construct_str_keep_sexagesimal)


@dataclass(frozen=True)
class Problem:
    """One thing wrong in one config file."""

    file: str
    line: int
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.field or '(file)'}: {self.message}"


class ConfigError(Exception):
    """A config file was rejected; ``problems`` name file, line and field each."""

    def __init__(self, problems: Iterable[Problem]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))

    @classmethod
    def single(cls, file: Path | str, line: int, field: str, message: str) -> ConfigError:
        return cls([Problem(str(file), line, field, message)])

    @classmethod
    def from_validation(
        cls, file: Path | str, data: Any, exc: ValidationError, prefix: tuple = ()
    ) -> ConfigError:
        problems = []
        for err in exc.errors(include_url=False):
            loc = tuple(prefix) + tuple(err["loc"])
            line = line_of(data, tuple(err["loc"]))
            field_name = ".".join(str(p) for p in loc)
            problems.append(Problem(str(file), line, field_name, err["msg"]))
        return cls(problems)


def line_of(data: Any, loc: tuple) -> int:
    """Best line for a pydantic error location: the deepest key we can find."""
    line = getattr(data, "line", 1) or 1
    cur = data
    for part in loc:
        if isinstance(cur, LineDict) and part in cur:
            line = cur.key_lines.get(part, line)
            cur = cur[part]
        elif isinstance(cur, LineList) and isinstance(part, int) and 0 <= part < len(cur):
            line = cur.item_lines[part]
            cur = cur[part]
        else:
            break
    return line


def load_yaml(path: Path, text: str | None = None) -> Any:
    """Parse a YAML file (or ``text``, its content as already read, for errors named
    after ``path``); syntax errors become a ``ConfigError`` with the line."""
    if text is None:
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError.single(path, 0, "", f"cannot read: {exc.strerror or exc}") from exc
    try:
        data = yaml.load(text, Loader=_Loader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 0
        msg = " ".join(s for s in (exc.context, exc.problem) if s)
        raise ConfigError.single(path, line, "", f"YAML syntax: {msg}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError.single(path, 0, "", f"YAML: {exc}") from exc
    return LineDict() if data is None else data
