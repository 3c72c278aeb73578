"""Fingerprints of settings: a stable digest, the keys two settings differ in, and labellers.

A run or cache records the settings that decide its content as JSON and their `digest`; a re-run
with other settings is refused (or recomputed) naming `differing_keys`. Labellers are code, so
`labeller_fingerprint` turns one into JSON that changes when its labelling can.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
from dataclasses import fields, is_dataclass
from typing import Any

from lens_steer.thoughts import resolve_labeler


def digest(obj: Any) -> str:
    """sha256 of `obj` as sorted-key JSON."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def differing_keys(old: dict | None, new: dict, prefix: str = "") -> list[str]:
    """Keys (dotted into nested dicts) whose value differs between `old` and `new`, with both
    values when they are short: `["max_tokens (4096 -> 40)", "labeler.fields"]`."""
    if old is None:
        return ["all (the existing artifact recorded no settings; older lens_steer)"]
    out = []
    for key in dict.fromkeys([*new, *old]):
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            out += differing_keys(a, b, f"{prefix}{key}.")
        elif len(json.dumps([a, b], default=str)) < 100:
            out.append(f"{prefix}{key} ({a!r} -> {b!r})")
        else:
            out.append(f"{prefix}{key}")
    return out


def labeller_fingerprint(labeler: Any) -> Any:
    """A JSON value that changes when the labelling can: a registered name plus what it
    resolves to; a `LabelRules` (any dataclass) by its fields (word lists, order); a
    `functools.partial` by its function and arguments; any other callable by module, qualname,
    a sha256 of its source when `inspect` finds it and of its bytecode and constants (of that
    function only, not of what it calls; a callable without either, e.g. a builtin, is known by
    its name alone)."""
    if isinstance(labeler, str):
        return {"name": labeler, "resolves_to": labeller_fingerprint(resolve_labeler(labeler))}
    if is_dataclass(labeler) and not isinstance(labeler, type):
        return {"type": _qualname(type(labeler)),
                "fields": {f.name: getattr(labeler, f.name) for f in fields(labeler)}}
    if isinstance(labeler, functools.partial):
        return {"partial": labeller_fingerprint(labeler.func),
                "args": [repr(a) for a in labeler.args],
                "keywords": {k: repr(v) for k, v in sorted(labeler.keywords.items())}}
    bound = getattr(labeler, "__self__", None)
    target = labeler if inspect.isfunction(labeler) or inspect.ismethod(labeler) \
        else type(labeler)
    try:
        source = hashlib.sha256(inspect.getsource(target).encode()).hexdigest()
    except (OSError, TypeError):
        source = None
    fp = {"callable": _qualname(target), "source_sha256": source}
    code = getattr(inspect.unwrap(labeler) if inspect.isfunction(labeler) else labeler,
                   "__code__", None)
    if code is not None:  # tells apart lambdas that share a source line
        fp["code_sha256"] = _code_digest(code, hashlib.sha256()).hexdigest()
    if bound is not None and not inspect.ismodule(bound):
        fp["self"] = labeller_fingerprint(bound) if is_dataclass(bound) else _qualname(
            type(bound))
    return fp


def _qualname(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


def _code_digest(code: Any, h: Any) -> Any:
    """Bytecode, names and constants, nested code objects included (their repr holds an
    address, which differs between processes)."""
    h.update(code.co_code)
    h.update(repr(code.co_names).encode())
    for const in code.co_consts:
        if inspect.iscode(const):
            _code_digest(const, h)
        else:
            h.update(repr(const).encode())
    return h
