"""One config mechanism for every `lens-steer` command.

A command's config is one dataclass composed (by inheritance) of shared parts: `ModelOptions`
(model + backend options), `Splits` (extraction / validation / held-out problems),
`Generation`, and the method's own fields. Field docstrings are the `--help` text. From that one
class come the flags (`--n-eval 9`, `--no-tsne`), config files (`--config run/config.json`,
TOML or JSON), `--set key=value` overrides and `--preset NAME` defaults, merged as

    dataclass defaults < --preset < --config file < --set < flags

Unknown keys are errors everywhere. Field metadata adds checks that run before any work:
`minimum` (sizes, naming the flag), `choices` (a tuple or a zero-argument callable, e.g. a
registry's `names`), `aliases` (old flag names), `parse` (a function of the raw flag strings);
every float is checked finite. See /work/API_config.md (and `register_command`).

Why our own ~250 lines rather than tyro / simple_parsing / jsonargparse: they nest composed
parts under prefixed flags (`--model.dtype`) or rename them (`--n_eval`), which would break every
documented command line and saved `config.json`; they own the top-level parser, while
`lens-steer` mounts commands (`toy`, `coconut`) into one argparse tree; and none merges presets,
config files and `--set` with unknown-key errors as one step.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import functools
import inspect
import json
import math
import sys
import textwrap
import tomllib
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lens_steer.errors import ConfigError

META_KEYS = ("command",)
"""Keys a run folder's config.json may hold besides the fields (checked, not fields)."""


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


# -- field checks ------------------------------------------------------------------------------
class ConfigBase:
    """Mixin: validate every field after construction (sizes, choices, finite floats)."""

    def __post_init__(self) -> None:
        parent = getattr(super(), "__post_init__", None)
        if parent is not None:
            parent()
        validate(self)


def validate(cfg: Any) -> None:
    """Raise `ConfigError` naming the flag of the first invalid field."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if value is None:
            continue
        items = value if isinstance(value, list | tuple) else [value]
        for v in items:
            if isinstance(v, float) and not math.isfinite(v):
                raise ConfigError(f"{flag(f.name)} must be a finite number, got {v}")
            if "minimum" in f.metadata and isinstance(v, int | float) and not isinstance(
                    v, bool) and v < f.metadata["minimum"]:
                raise ConfigError(f"{_flag_names(f)} must be >= {f.metadata['minimum']}, "
                                  f"got {v}")
            choices = _choices(f)
            if choices is not None and v not in choices:
                raise ConfigError(f"{flag(f.name)}: unknown value {v!r}; choose one of "
                                  f"{list(choices)}")


def _choices(f: dataclasses.Field) -> Sequence[Any] | None:
    c = f.metadata.get("choices")
    return c() if callable(c) else c


def _flag_names(f: dataclasses.Field) -> str:
    aliases = f.metadata.get("aliases", ())
    return flag(f.name) + (f" ({', '.join(aliases)})" if aliases else "")


def field(default: Any = dataclasses.MISSING, *, minimum: float | None = None,
          choices: Sequence[Any] | Callable[[], Sequence[Any]] | None = None,
          aliases: Sequence[str] = (), parse: Callable[[list[str]], Any] | None = None,
          default_factory: Any = dataclasses.MISSING) -> Any:
    """`dataclasses.field` with the checks of this module in its metadata."""
    meta: dict[str, Any] = {}
    if minimum is not None:
        meta["minimum"] = minimum
    if choices is not None:
        meta["choices"] = choices
    if aliases:
        meta["aliases"] = tuple(aliases)
    if parse is not None:
        meta["parse"] = parse
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    if default is dataclasses.MISSING:  # required: keyword-only, so parts may have defaults
        return dataclasses.field(kw_only=True, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


# -- types -------------------------------------------------------------------------------------
def _field_type(tp: Any) -> tuple[Any, bool, bool]:
    """(element type, is_list, optional) of a field annotation."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        elem, is_list, _ = _field_type(args[0])
        return elem, is_list, True
    if origin in (list, tuple, Sequence) or tp in (list, tuple):
        args = typing.get_args(tp)
        return (args[0] if args else str), True, False
    return tp, False, False


def _parse_bool(s: str) -> bool:
    if str(s).lower() in ("1", "true", "yes", "on"):
        return True
    if str(s).lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true/false, got {s!r}")


def _scalar(elem: Any, v: Any, name: str = "value") -> Any:
    try:
        if elem is bool:
            return v if isinstance(v, bool) else _parse_bool(v)
        if elem is int:
            if isinstance(v, bool) or (isinstance(v, float) and not v.is_integer()):
                raise ValueError
            return int(v)
        if elem is float:
            if isinstance(v, bool):
                raise ValueError
            return float(v)
        if elem is str:
            return str(v)
    except (TypeError, ValueError):
        raise ConfigError(f"{flag(name)}: expected {elem.__name__}, got {v!r}") from None
    return v


def coerce(f: dataclasses.Field, tp: Any, value: Any) -> Any:
    """`value` (a flag's strings, a --set string or a config-file value) as the field's type."""
    elem, is_list, optional = _field_type(tp)
    if value is None or (optional and value in ("None", "none", "null")):
        if not optional and f.default is not None:
            raise ConfigError(f"{flag(f.name)} may not be empty")
        return None
    if "parse" in f.metadata and isinstance(value, str | list):
        raw = value if isinstance(value, list) else _split(value)
        return f.metadata["parse"]([str(v) for v in raw])
    if is_list:
        if isinstance(value, str):
            value = _split(value)
        if not isinstance(value, list | tuple):
            value = [value]
        return [_scalar(elem, v, f.name) for v in value]
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    return _scalar(elem, value, f.name)


def _split(s: str) -> list[Any]:
    """'[1, 2]' (JSON) or '1,2' or '1 2' -> items."""
    s = s.strip()
    if s.startswith("["):
        return json.loads(s)
    return [p for p in s.replace(",", " ").split() if p]


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
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


def _owner(cls: type, name: str) -> type:
    """The class (part) that declares field `name` first."""
    for klass in reversed(cls.__mro__):
        if name in getattr(klass, "__annotations__", {}):
            return klass
    return cls


# -- flags -------------------------------------------------------------------------------------
class _Given(argparse.Action):
    """Store the value and remember that the flag was given (flags beat --config and --set)."""

    def __init__(self, *args: Any, const_value: Any = None, **kwargs: Any) -> None:
        self.const_value = const_value
        super().__init__(*args, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        if self.const_value is not None:
            values = self.const_value
        setattr(namespace, self.dest, values)
        namespace._given = set(getattr(namespace, "_given", ())) | {self.dest}


def add_config_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per field, grouped by part, defaulting to the field's default; plus
    `--config`, `--set KEY=VALUE` and `--preset NAME`."""
    parser.add_argument("--config", type=Path, default=None,
                        help="TOML or JSON config whose keys are these options (a run folder's "
                             "config.json re-runs that run); flags still win")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        dest="set_values", help="override one option, e.g. --set n_eval=50 "
                                                "(lists: --set layers=1,2)")
    parser.add_argument("--preset", default=None,
                        help="named config defaults from lens_steer.presets (under --config "
                             "and flags)")
    parser.set_defaults(_config_cls=cls)
    hints, docs = _hints(cls), field_docs(cls)
    groups: dict[type, Any] = {}
    for f in dataclasses.fields(cls):
        owner = _owner(cls, f.name)
        if owner not in groups:
            title = (owner.__doc__ or owner.__name__).strip().splitlines()[0]
            groups[owner] = parser if owner is cls else parser.add_argument_group(title)
        g = groups[owner]
        elem, is_list, _ = _field_type(hints[f.name])
        required = (f.default is dataclasses.MISSING
                    and f.default_factory is dataclasses.MISSING)
        default = (None if required else f.default if f.default is not dataclasses.MISSING
                   else f.default_factory())
        help_ = (f"{docs.get(f.name, '')} "
                 f"({'required' if required else f'default: {default}'})").replace("%", "%%")
        names = [flag(f.name), *f.metadata.get("aliases", ())]
        if elem is bool and not is_list:
            g.add_argument(*names, dest=f.name, nargs="?", const=True, default=default,
                           type=_parse_bool, metavar="BOOL", action=_Given, help=help_)
            g.add_argument("--no-" + f.name.replace("_", "-"), dest=f.name, nargs=0,
                           action=_Given, const_value=False, help=argparse.SUPPRESS)
            continue
        choices = None if callable(f.metadata.get("choices")) else _choices(f)
        convert = functools.partial(_scalar, elem, name=f.name)
        convert.__name__ = getattr(elem, "__name__", "value")  # argparse's "invalid int value"
        g.add_argument(*names, dest=f.name, default=default, help=help_, action=_Given,
                       nargs="*" if is_list else None,
                       choices=choices if not is_list and "parse" not in f.metadata else None,
                       type=None if "parse" in f.metadata else convert)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A TOML or JSON config file as a dict (a run folder's config.json works)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist: pass a TOML or JSON file, e.g. "
                          "a run folder's config.json")
    try:
        text = path.read_text()
        return tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as err:
        raise ConfigError(f"config file {path} is not valid "
                          f"{'TOML' if path.suffix == '.toml' else 'JSON'}: {err}") from None


def _check_keys(cls: type, values: dict[str, Any], where: str, command: str | None) -> dict:
    known = [f.name for f in dataclasses.fields(cls)]
    out = {}
    for key, value in values.items():
        name = key.replace("-", "_")
        if name in META_KEYS:
            if command and value != command:
                raise ConfigError(f"{where} is a `{value}` config, not `{command}`: run "
                                  f"`lens-steer {value}` or pass another --config")
            continue
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            raise ConfigError(f"unknown config key {key!r} in {where}"
                              + (f" (did you mean {close[0]!r}?)" if close else "")
                              + f"; known keys: {', '.join(known)}")
        out[name] = value
    return out


def preset_values(name: str) -> dict[str, Any]:
    """Config overrides of the preset `name` (lens_steer.presets.get_preset)."""
    from lens_steer.presets import get_preset

    p = get_preset(name)
    for attr in ("overrides", "config"):
        if isinstance(getattr(p, attr, None), dict):
            return dict(getattr(p, attr))
    if dataclasses.is_dataclass(p):
        return dataclasses.asdict(p)
    if callable(getattr(p, "to_dict", None)):
        return dict(p.to_dict())
    return dict(p)


def build_config(cls: type, *, preset: str | None = None, config: str | Path | None = None,
                 sets: Sequence[str] = (), flags: dict[str, Any] | None = None,
                 command: str | None = None) -> Any:
    """defaults < preset < config file < --set < flags, unknown keys refused, then `cls(...)`."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = _hints(cls)
    raw: dict[str, Any] = {}
    if preset:
        raw |= _check_keys(cls, preset_values(preset), f"preset {preset!r}", None)
    if config:
        raw |= _check_keys(cls, read_config_file(config), str(config), command)
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r}: use --set KEY=VALUE")
        raw |= _check_keys(cls, {key.strip(): value.strip()}, "--set", None)
    raw |= dict(flags or {})
    values = {k: coerce(fields[k], hints[k], v) for k, v in raw.items()}
    missing = [flag(n) for n, f in fields.items() if n not in values
               and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"missing required option(s): {', '.join(missing)}")
    try:
        return cls(**values)
    except ConfigError:
        raise
    except (ValueError, TypeError) as err:
        raise ConfigError(str(err)) from None


def resolve_config(cls: type, args: argparse.Namespace) -> Any:
    """The config of a parsed command line (see `add_config_arguments`)."""
    given = getattr(args, "_given", set())
    flags = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if f.name in given}
    return build_config(cls, preset=getattr(args, "preset", None),
                        config=getattr(args, "config", None),
                        sets=getattr(args, "set_values", None) or (), flags=flags,
                        command=getattr(args, "command", None))


def config_dict(cfg: Any) -> dict[str, Any]:
    """The config as JSON-ready data (what `--config` reads back)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def part(cfg: Any, cls: type) -> dict[str, Any]:
    """The fields of part `cls` (e.g. `Splits`) of a composed config, as a dict."""
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls)}


# -- commands ----------------------------------------------------------------------------------
def register_command(sub: argparse._SubParsersAction, name: str, help: str, config_cls: type,
                     runner: Callable[..., Any], *, run_folder: bool = True) -> argparse.ArgumentParser:
    """Add the `name` subcommand with its config's flags.

    `run_folder=True`: adds `--out` (default `runs/<name>`), calls `runner(config, out)` and
    prints where the report is; else calls `runner(config)` (its exit status, or 0).
    """
    doc = sys.modules[runner.__module__].__doc__
    p = sub.add_parser(name, help=help, description=doc,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    if run_folder:
        p.add_argument("--out", type=Path, default=None, help=f"run folder (default: runs/{name})")
    add_config_arguments(p, config_cls)

    def main(args: argparse.Namespace) -> int:
        cfg = resolve_config(config_cls, args)
        if not run_folder:
            return int(runner(cfg) or 0)
        out = Path(runner(cfg, args.out or Path("runs") / name))
        if (out / "report.md").exists():
            print(f"[{name}] report: {out / 'report.md'}")
        return 0

    p.set_defaults(func=main)
    return p
