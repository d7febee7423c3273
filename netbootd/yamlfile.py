"""YAML loading that remembers line numbers, and config errors that cite them.

Why by hand: PyYAML and pydantic each know half of a good error message (the
line, the field). ``load_yaml`` keeps the line of every mapping key;
``ConfigError.from_validation`` joins pydantic's error locations to those lines
so a user reads ``config/nodes.yaml:14: nodes.dc:a6:32:01:36:c2.action: ...``.

Why two loaders: PyYAML's node graph costs ~10 µs a node even with libyaml (its
composer calls back into Python for every node), so a 10,000-node nodes.yaml took
seconds. The fast path takes libyaml's *events* (one C pass) and builds the same
``LineDict``/``LineList`` values from them in one loop, resolving each distinct plain
scalar once. Anything it does not handle the same way (explicit tags, merge keys,
complex keys, duplicate keys, several documents, any syntax error) sends the text
to the reference loader below, so errors and edge cases are exactly its own.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterable, Iterator
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


@contextlib.contextmanager
def paused_gc() -> Iterator[None]:
    """Hold the cyclic garbage collector while a large config is built or checked.

    Why: building a 100,000-node inventory makes millions of containers that all live
    on, and each young collection the allocations trigger rescans the ones promoted so
    far, so load and check grew faster than the fleet (3x the nodes took 5x the time).
    Reference counting still frees everything short-lived; cycles wait until the end.
    """
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


class _Unusual(Exception):
    """The fast path met something only the reference loader handles exactly."""


_STR_TAG = "tag:yaml.org,2002:str"


class _Scalars:
    """Plain scalars resolved and constructed by the reference loader's own rules, once
    per distinct text (a fleet repeats the same few values thousands of times)."""

    def __init__(self) -> None:
        self._helper = _Loader("")
        self._plain: dict[str, Any] = {}

    def plain(self, value: str) -> Any:
        try:
            return self._plain[value]
        except KeyError:
            pass
        tag = self._helper.resolve(yaml.ScalarNode, value, (True, False))
        if tag == "tag:yaml.org,2002:merge":
            raise _Unusual(tag)
        if tag == _STR_TAG:
            out: Any = value
        else:
            node = yaml.ScalarNode(tag, value)
            out = self._helper.yaml_constructors[tag](self._helper, node)
        self._plain[value] = out
        return out


def _fast_load(text: str) -> Any:
    """``text`` as the reference loader would build it, from libyaml's event stream;
    raises ``_Unusual`` (or a YAML error) where the reference loader must decide."""
    scalars = _Scalars()
    ScalarEvent, MappingStartEvent = yaml.ScalarEvent, yaml.MappingStartEvent
    SequenceStartEvent, AliasEvent = yaml.SequenceStartEvent, yaml.AliasEvent
    MappingEndEvent, SequenceEndEvent = yaml.MappingEndEvent, yaml.SequenceEndEvent
    anchors: dict[str, Any] = {}
    # the open collections, innermost last: (container, pending key or _NO_KEY)
    stack: list[list[Any]] = []
    no_key = _NO_KEY
    root: Any = None
    documents = 0
    for ev in yaml.parse(text, Loader=_CFastLoader):
        cls = ev.__class__
        if cls is ScalarEvent:
            if ev.tag is not None and ev.tag != "!":
                raise _Unusual("explicit tag")
            if ev.implicit[0] and not ev.style:
                value = scalars.plain(ev.value)
            else:
                value = ev.value
            line = ev.start_mark.line + 1
        elif cls is MappingStartEvent or cls is SequenceStartEvent:
            if ev.tag is not None and ev.tag != "!":
                raise _Unusual("explicit tag")
            if cls is MappingStartEvent:
                value = LineDict()
            else:
                value = LineList()
            value.line = ev.start_mark.line + 1
            if ev.anchor is not None:
                anchors[ev.anchor] = value
            line = value.line
            if _place(stack, value, line, no_key):
                root = value
            stack.append([value, no_key])
            continue
        elif cls is MappingEndEvent or cls is SequenceEndEvent:
            top = stack.pop()
            if top[1] is not no_key:
                raise _Unusual("unbalanced mapping")
            continue
        elif cls is AliasEvent:
            if ev.anchor not in anchors:
                raise _Unusual("undefined alias")
            value = anchors[ev.anchor]
            line = ev.start_mark.line + 1
        elif cls is yaml.DocumentStartEvent:
            documents += 1
            if documents > 1:
                raise _Unusual("several documents")
            continue
        else:  # stream start/end, document end
            continue
        if cls is ScalarEvent and ev.anchor is not None:
            anchors[ev.anchor] = value
        if _place(stack, value, line, no_key):
            root = value
    return root


class _NoKey:
    pass


_NO_KEY = _NoKey()


def _place(stack: list[list[Any]], value: Any, line: int, no_key: Any) -> bool:
    """Put ``value`` into the innermost open collection; True when it is the document."""
    if not stack:
        return True
    top = stack[-1]
    container = top[0]
    if container.__class__ is LineList:
        container.append(value)
        container.item_lines.append(line)
        return False
    key = top[1]
    if key is no_key:  # a key: must be a scalar (hashable), and new
        if isinstance(value, (LineDict, LineList)) or value in container:
            raise _Unusual("complex or duplicate key")
        top[1] = value
        container.key_lines[value] = line
        return False
    container[key] = value
    top[1] = no_key
    return False


_CFastLoader = getattr(yaml, "CSafeLoader", None)


def parse_yaml_text(text: str) -> Any:
    """``text`` parsed as YAML with line numbers: the fast path when it applies, else
    the reference loader (whose errors propagate as ``yaml.YAMLError``)."""
    if _CFastLoader is not None:
        try:
            return _fast_load(text)
        except (_Unusual, yaml.YAMLError):
            pass
    return yaml.load(text, Loader=_Loader)


def load_yaml(path: Path, text: str | None = None) -> Any:
    """Parse a YAML file (or ``text``, its content as already read, for errors named
    after ``path``); syntax errors become a ``ConfigError`` with the line."""
    if text is None:
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError.single(path, 0, "", f"cannot read: {exc.strerror or exc}") from exc
    try:
        data = parse_yaml_text(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 0
        msg = " ".join(s for s in (exc.context, exc.problem) if s)
        raise ConfigError.single(path, line, "", f"YAML syntax: {msg}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError.single(path, 0, "", f"YAML: {exc}") from exc
    return LineDict() if data is None else data
