"""The user-error family: the CLI prints these as one line (`lens-steer: error: ...`, exit 2).

Raise a `LensSteerError` subclass for anything the user can fix (a bad flag, a missing file, a
folder held by another run); its message names the fix. Bugs stay ordinary exceptions.
"""

from __future__ import annotations


class LensSteerError(Exception):
    """Something the user can fix; the message says how."""


class ConfigError(LensSteerError, ValueError):
    """A setting is invalid, unknown or inconsistent (also a ValueError for older callers)."""


class DataError(LensSteerError, ValueError):
    """An input file or dataset is malformed or empty."""


class ArtifactError(LensSteerError, RuntimeError):
    """A run folder or cache is damaged, locked, or holds other settings."""
