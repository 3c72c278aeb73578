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
every float is checked finite. A field whose type is itself a dataclass (coconut's
`train: TrainConfig`) is a group of options named with dots: `--train.lr 3e-4`,
`--set train.lr=3e-4`, or a `train` table / object in a config file; unset ones keep the
parent's default instance. Value parsing lives in `experiments.config_values`. See
/work/API_config.md (and `register_command`).

Why our own ~400 lines rather than tyro / simple_parsing / jsonargparse: they nest composed
parts under prefixed flags (`--model.dtype`) or rename them (`--n_eval`), which would break every
documented command line and saved `config.json`; they own the top-level parser, while
`lens-steer` mounts commands (`toy`, `coconut`) into one argparse tree; and none merges presets,
config files and `--set` with unknown-key errors as one step.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import json
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from experiments.config_values import (
    coerce,
    field_default,
    field_docs,
    field_type,
    flag,
    hints,
    is_nested,
    parse_bool,
    read_config_file,
    scalar,
)
from lens_steer.errors import ConfigError

__all__ = ["ConfigBase", "add_config_arguments", "build_config", "coerce", "config_dict", "field",
           "field_docs", "flag", "read_config_file", "register_command", "resolve_config",
           "validate"]

META_KEYS = ("command",)
"""Keys a run folder's config.json may hold besides the fields (checked, not fields)."""


# -- field checks ------------------------------------------------------------------------------
class ConfigBase:
    """Mixin: validate every field after construction (sizes, choices, finite floats)."""

    def __post_init__(self) -> None:
        parent = getattr(super(), "__post_init__", None)
        if parent is not None:
            parent()
        validate(self)


def validate(cfg: Any, prefix: str = "") -> None:
    """Raise `ConfigError` naming the flag of the first invalid field (nested ones too)."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if value is None:
            continue
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            validate(value, f"{prefix}{f.name}.")
            continue
        name = prefix + f.name
        items = value if isinstance(value, list | tuple) else [value]
        for v in items:
            if isinstance(v, float) and not math.isfinite(v):
                raise ConfigError(f"{flag(name)} must be a finite number, got {v}")
            if "minimum" in f.metadata and isinstance(v, int | float) and not isinstance(
                    v, bool) and v < f.metadata["minimum"]:
                raise ConfigError(f"{_flag_names(f, prefix)} must be >= {f.metadata['minimum']}, "
                                  f"got {v}")
            choices = _choices(f)
            if choices is not None and v not in choices:
                raise ConfigError(f"{flag(name)}: unknown value {v!r}; choose one of "
                                  f"{list(choices)}")


def _choices(f: dataclasses.Field) -> Sequence[Any] | None:
    c = f.metadata.get("choices")
    return c() if callable(c) else c


def _flag_names(f: dataclasses.Field, prefix: str = "") -> str:
    aliases = f.metadata.get("aliases", ())
    return flag(prefix + f.name) + (f" ({', '.join(aliases)})" if aliases else "")


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
    """One flag per field, grouped by part, defaulting to the field's default (a nested
    dataclass field `train` gets `--train.<name>` flags); plus `--config`, `--set KEY=VALUE`
    and `--preset NAME`."""
    parser.add_argument("--config", type=Path, default=None,
                        help="TOML or JSON config whose keys are these options (a run folder's "
                             "config.json re-runs that run); flags still win")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        dest="set_values", help="override one option, e.g. --set n_eval=50 "
                                                "(lists: --set layers=1,2; nested: train.lr=1e-4)")
    parser.add_argument("--preset", default=None,
                        help="named config defaults from lens_steer.presets (under --config "
                             "and flags)")
    parser.set_defaults(_config_cls=cls)
    _add_flags(parser, cls)


def _owner(cls: type, name: str) -> type:
    """The class (part) that declares field `name` first."""
    for klass in reversed(cls.__mro__):
        if name in getattr(klass, "__annotations__", {}):
            return klass
    return cls


def _add_flags(parser: argparse.ArgumentParser, cls: type, prefix: str = "",
               defaults: Any = None, group: Any = None) -> None:
    """Flags of `cls`'s fields; under `prefix` (e.g. "train.") their defaults are those of
    the parent's default instance `defaults`, all in `group`."""
    types_, docs = hints(cls), field_docs(cls)
    groups: dict[type, Any] = {}
    for f in dataclasses.fields(cls):
        name = prefix + f.name
        default = field_default(f) if defaults is None else getattr(defaults, f.name)
        required = default is dataclasses.MISSING
        if is_nested(types_[f.name]):
            sub = parser.add_argument_group(f"{flag(name)}.<option> ({types_[f.name].__name__})",
                                            docs.get(f.name))
            _add_flags(parser, types_[f.name], name + ".", None if required else default, sub)
            continue
        if group is None:
            owner = _owner(cls, f.name)
            if owner not in groups:
                title = (owner.__doc__ or owner.__name__).strip().splitlines()[0]
                groups[owner] = parser if owner is cls else parser.add_argument_group(title)
        g = group or groups[owner]
        elem, is_list, _ = field_type(types_[f.name])
        help_ = (f"{docs.get(f.name, '')} "
                 f"({'required' if required else f'default: {default}'})").replace("%", "%%")
        default = None if required else default
        names = [flag(name), *(f.metadata.get("aliases", ()) if not prefix else ())]
        if elem is bool and not is_list:
            g.add_argument(*names, dest=name, nargs="?", const=True, default=default,
                           type=parse_bool, metavar="BOOL", action=_Given, help=help_)
            g.add_argument("--no-" + name.replace("_", "-"), dest=name, nargs=0,
                           action=_Given, const_value=False, help=argparse.SUPPRESS)
            continue
        choices = None if callable(f.metadata.get("choices")) else _choices(f)
        convert = functools.partial(scalar, elem, name=name, finite=False)
        convert.__name__ = getattr(elem, "__name__", "value")  # argparse's "invalid int value"
        g.add_argument(*names, dest=name, default=default, help=help_, action=_Given,
                       nargs="*" if is_list else None,
                       metavar="JSON" if elem is dict else f.name.upper() if prefix else None,
                       choices=choices if not is_list and "parse" not in f.metadata else None,
                       type=None if "parse" in f.metadata else convert)


# -- merging -----------------------------------------------------------------------------------
def _check_keys(cls: type, values: dict[str, Any], where: str, command: str | None,
                prefix: str = "") -> dict[str, Any]:
    """`values` with checked, normalised keys; nested options (`train.lr` or a `train` table)
    as nested dicts."""
    types_ = hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    nested = {n: types_[n] for n in known if is_nested(types_[n])}
    out: dict[str, Any] = {}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if not prefix and name in META_KEYS:
            if command and value != command:
                raise ConfigError(f"{where} is a `{value}` config, not `{command}`: run "
                                  f"`lens-steer {value}` or pass another --config")
            continue
        head, dot, rest = name.partition(".")
        if head in nested and (dot or isinstance(value, dict)):
            inner = {rest: value} if dot else value
            out[head] = _merge(out.get(head, _Options()), _Options(_check_keys(
                nested[head], inner, where, None, f"{prefix}{head}.")))
            continue
        if head in nested:
            raise ConfigError(f"{prefix}{head} in {where} holds options: give "
                              f"{prefix}{head}.<option>=VALUE (or a {head} table in a file)")
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1) or [
                f"{n}.{name}" for n, t in nested.items() if name in hints(t)][:1]
            raise ConfigError(f"unknown config key {prefix + str(key)!r} in {where}"
                              + (f" (did you mean {prefix + close[0]!r}?)" if close else "")
                              + "; known keys: " + ", ".join(
                                  prefix + n + (".*" if n in nested else "") for n in known))
        out[name] = value
    return out


class _Options(dict):
    """The raw options of a nested dataclass field (merged key by key, unlike a dict value)."""


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """`a` updated by `b`; nested options merged key by key."""
    out = _Options(a) if isinstance(a, _Options) else dict(a)
    for k, v in b.items():
        old = out.get(k)
        out[k] = _merge(old, v) if isinstance(v, _Options) and isinstance(old, _Options) else v
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
    """defaults < preset < config file < --set < flags, unknown keys refused, then `cls(...)`.
    Keys of nested dataclass fields are dotted (`train.lr`) or, in files, a `train` table."""
    raw: dict[str, Any] = {}
    if preset:
        raw = _merge(raw, _check_keys(cls, preset_values(preset), f"preset {preset!r}", None))
    if config:
        raw = _merge(raw, _check_keys(cls, read_config_file(config), str(config), command))
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r}: use --set KEY=VALUE")
        raw = _merge(raw, _check_keys(cls, {key.strip(): value.strip()}, "--set", None))
    raw = _merge(raw, _check_keys(cls, dict(flags or {}), "flags", None))
    cfg = _construct(cls, raw)
    validate(cfg)
    return cfg


def _construct(cls: type, raw: dict[str, Any], prefix: str = "", base: Any = None) -> Any:
    """`cls` from checked raw values; a nested field starts from the parent's default instance
    (so `train.lr=...` keeps the parent's other training defaults)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    types_ = hints(cls)
    values = {}
    for k, v in raw.items():
        if is_nested(types_[k]):
            default = field_default(fields[k])
            values[k] = _construct(types_[k], v, f"{prefix}{k}.",
                                   None if default is dataclasses.MISSING else default)
        else:
            values[k] = coerce(fields[k], types_[k], v, prefix + k)
    missing = [flag(prefix + n) for n, f in fields.items() if base is None and n not in values
               and field_default(f) is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"missing required option(s): {', '.join(missing)}")
    try:
        return dataclasses.replace(base, **values) if base is not None else cls(**values)
    except ConfigError as err:
        if not prefix:
            raise
        raise ConfigError(f"{prefix.rstrip('.')}: {err}") from None
    except (ValueError, TypeError) as err:
        raise ConfigError(f"{prefix.rstrip('.') + ': ' if prefix else ''}{err}") from None


def resolve_config(cls: type, args: argparse.Namespace) -> Any:
    """The config of a parsed command line (see `add_config_arguments`)."""
    given = getattr(args, "_given", set())
    return build_config(cls, preset=getattr(args, "preset", None),
                        config=getattr(args, "config", None),
                        sets=getattr(args, "set_values", None) or (),
                        flags={k: getattr(args, k) for k in sorted(given)},
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

    `run_folder=True`: adds `--out` (default `runs/<name>`), locks it (`folder_lock`: a second
    writer is refused before any work), calls `runner(config, out)` and prints where the report
    is; else calls `runner(config)` (its exit status, or 0).
    """
    doc = sys.modules[runner.__module__].__doc__
    p = sub.add_parser(name, help=help, description=doc,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    if run_folder:
        p.add_argument("--out", type=Path, default=None, help=f"run folder (default: runs/{name})")
    add_config_arguments(p, config_cls)

    def main(args: argparse.Namespace) -> int:
        from experiments.run_folder import check_writable
        from lens_steer.io import folder_lock

        cfg = resolve_config(config_cls, args)
        if not run_folder:
            return int(runner(cfg) or 0)
        out = check_writable(args.out or Path("runs") / name)
        with folder_lock(out):  # one writer, refused before the model loads; released on exit
            out = Path(runner(cfg, out))
        if (out / "report.md").exists():
            print(f"[{name}] report: {out / 'report.md'}")
        return 0

    p.set_defaults(func=main)
    return p
