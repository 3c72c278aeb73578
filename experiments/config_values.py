"""Values of config fields: types, parsing of flag / `--set` / file values, field docstrings.

The half of `experiments.config` that knows nothing about argparse or merging: what type a field
annotation asks for, how a string or a config-file value becomes it (`coerce`), and the field
docstrings that are `--help`'s text. Nested dataclass fields (e.g. `CoconutRunConfig.train`, a
`TrainConfig`) are named with dots: `train.lr`, flag `--train.lr`.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import json
import math
import textwrap
import tomllib
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lens_steer.errors import ConfigError


def flag(name: str) -> str:
    """The flag of field `name` (`n_eval` -> `--n-eval`, `train.lr` -> `--train.lr`)."""
    return "--" + name.replace("_", "-")


def field_type(tp: Any) -> tuple[Any, bool, bool]:
    """(element type, is_list, optional) of a field annotation."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        elem, is_list, _ = field_type(args[0])
        return elem, is_list, True
    if origin in (list, tuple, Sequence) or tp in (list, tuple):
        args = typing.get_args(tp)
        return (args[0] if args else str), True, False
    if origin is dict:
        return dict, False, False
    return tp, False, False


def is_nested(tp: Any) -> bool:
    """The annotation is a dataclass: its fields are options `<field>.<name>`."""
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def parse_bool(s: str) -> bool:
    if str(s).lower() in ("1", "true", "yes", "on"):
        return True
    if str(s).lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true/false, got {s!r}")


def scalar(elem: Any, v: Any, name: str = "value", finite: bool = True) -> Any:
    """`v` (a string or a JSON value) as `elem`; floats must be `finite` (argparse's converter
    leaves that check to `coerce`, whose error is one line)."""
    try:
        if elem is bool:
            return v if isinstance(v, bool) else parse_bool(v)
        if elem is int:
            if isinstance(v, bool) or (isinstance(v, float) and not v.is_integer()):
                raise ValueError
            return int(v)
        if elem is float:
            if isinstance(v, bool):
                raise ValueError
            number = float(v)
        if elem is str:
            return str(v)
        if elem is dict:
            out = json.loads(v) if isinstance(v, str) else v
            if not isinstance(out, dict):
                raise ValueError
            return out
    except (TypeError, ValueError):
        what = "a JSON object" if elem is dict else elem.__name__
        raise ConfigError(f"{flag(name)}: expected {what}, got {v!r}") from None
    if elem is float:
        if finite and not math.isfinite(number):
            raise ConfigError(f"{flag(name)} must be a finite number, got {v}")
        return number
    return v


def coerce(f: dataclasses.Field, tp: Any, value: Any, name: str | None = None) -> Any:
    """`value` (a flag's strings, a --set string or a config-file value) as the field's type;
    `name` is the option's full (dotted) name for messages."""
    name = name or f.name
    elem, is_list, optional = field_type(tp)
    if value is None or (optional and value in ("None", "none", "null")):
        if not optional and f.default is not None:
            raise ConfigError(f"{flag(name)} may not be empty")
        return None
    if "parse" in f.metadata and isinstance(value, str | list):
        raw = value if isinstance(value, list) else split_items(value)
        return f.metadata["parse"]([str(v) for v in raw])
    if is_list:
        if isinstance(value, str):
            value = split_items(value)
        if not isinstance(value, list | tuple):
            value = [value]
        return [scalar(elem, v, name) for v in value]
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    return scalar(elem, value, name)


def split_items(s: str) -> list[Any]:
    """'[1, 2]' (JSON) or '1,2' or '1 2' -> items."""
    s = s.strip()
    if s.startswith("["):
        try:
            return json.loads(s)
        except ValueError as err:
            raise ConfigError(f"{s!r} is not a JSON list ({err}); or write 1,2") from None
    return [p for p in s.replace(",", " ").split() if p]


@functools.cache
def hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Field docstrings (the string literal right after each field), inherited ones too."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body
        for node, nxt in zip(body, body[1:], strict=False):
            if (isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr)
                    and isinstance(getattr(nxt, "value", None), ast.Constant)):
                docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


def field_default(f: dataclasses.Field) -> Any:
    """The field's default value (a fresh one for a factory); MISSING when required."""
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A TOML or JSON config file as a dict (a run folder's config.json works)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist: pass a TOML or JSON file, e.g. "
                          "a run folder's config.json")
    try:
        text = path.read_text()
        data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as err:
        raise ConfigError(f"config file {path} is not valid "
                          f"{'TOML' if path.suffix == '.toml' else 'JSON'}: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} holds a {type(data).__name__}, not an object of "
                          "options")
    return data
