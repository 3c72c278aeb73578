"""The one writer of run folders: config, metrics, per-item records, plots, report, resume marks.

    run = RunFolder("runs/x", config, command="x")   # writes config.json (the resolved config)
    probes = run.cached("probes", {"cache": ..., "folds": 5}, lambda: fit())
    run.save_figure(fig, "layer_curve.png"); run.write_metrics({...}); run.write_report(md)

Every stage is stored with its key: a JSON-able dict of every setting that changes its result.
A stage is reused only when the key matches; otherwise it is recomputed and the differing keys
are named. When the folder's config changes, the summary files written from the old settings
(metrics, report, records) are removed before the new config is written, so a folder never
holds a config that does not match the results beside it.

One writer per folder: a `RunFolder` holds the folder's lock (`lens_steer.io.folder_lock`) from
construction until `close()` (or the end of a `with RunFolder(...) as run:` block, or the object
being collected, or the process ending). A second writer (another process or thread) is refused
at once with an `ArtifactError` naming the holder. In a thread that already holds the lock (a
`lens-steer` command locks `--out` before its runner starts) the RunFolder writes under it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lens_steer.errors import ArtifactError, ConfigError
from lens_steer.fingerprint import differing_keys, digest
from lens_steer.io import (
    atomic_path,
    folder_lock,
    holds_lock,
    read_json,
    write_json,
    write_jsonl,
    write_text,
)

SUMMARY_FILES = ("metrics.json", "report.md", "records.jsonl")
"""Written from every stage at the end of a run; removed (with the plots) when settings change."""


def fingerprint(obj: Any) -> str:
    """A short hash of JSON-able data (tensors by content)."""
    return digest(_jsonable(obj))[:16]


def _jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple | set | frozenset):
        items = [_jsonable(v) for v in obj]
        return sorted(items, key=json.dumps) if isinstance(obj, set | frozenset) else items
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "detach") and hasattr(obj, "cpu"):  # a tensor: its content
        t = obj.detach().cpu().contiguous()
        return {"tensor": hashlib.sha256(t.float().numpy().tobytes()).hexdigest()[:16],
                "shape": list(t.shape)}
    if isinstance(obj, str | int | float | bool) or obj is None:
        return obj
    if callable(obj):  # code: by name (a repr would hold a memory address)
        return f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', type(obj).__name__)}"
    if hasattr(obj, "__dict__"):
        return {"type": type(obj).__qualname__, **_jsonable(
            {k: v for k, v in vars(obj).items() if not k.startswith("_")})}
    return repr(obj)


def check_writable(path: str | Path, flag_name: str = "--out") -> Path:
    """Create folder `path` if needed and check it is writable, before any work."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{flag_name} {path} is a file: pass a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"cannot create {flag_name} {path} ({err.strerror}): pass a "
                          "writable folder") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag_name} {path} is not writable: pass another folder")
    return path


class RunFolder:
    def __init__(self, path: str | Path, config: Any = None, command: str | None = None,
                 log: Callable[[str], None] = print):
        self.path = Path(path)
        self.log = log
        check_writable(self.path)
        self._unlock = self._lock()
        if config is not None:
            try:
                self.write_config(config, command)
            except BaseException:
                self.close()
                raise

    def _lock(self) -> Callable[[], Any] | None:
        """Take the folder's lock (refused if another writer holds it); None if this thread
        holds it already (its taker releases it)."""
        if holds_lock(self.path):
            return None
        lock = folder_lock(self.path)
        lock.__enter__()
        return weakref.finalize(self, lock.__exit__, None, None, None)

    def close(self) -> None:
        """Release the folder's lock (if this RunFolder took it); idempotent."""
        if self._unlock is not None:
            self._unlock()

    def __enter__(self) -> RunFolder:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def write_config(self, config: Any, command: str | None = None) -> Path:
        data = _jsonable(dataclasses.asdict(config) if dataclasses.is_dataclass(config)
                         else dict(config))
        if command:
            data = {"command": command, **data}
        target = self.path / "config.json"
        if target.exists():
            old = read_json(target)
            if command and old.get("command") not in (None, command):
                raise ArtifactError(f"{self.path} holds a `{old['command']}` run; pass another "
                                    f"--out for `{command}`")
            changed = differing_keys(old, data)
            if changed:
                self.log(f"[run] {self.path}: settings changed ({', '.join(changed)}); stages "
                         "whose inputs changed are recomputed")
                for f in [*(self.path / n for n in SUMMARY_FILES), *self.path.glob("*.png")]:
                    f.unlink(missing_ok=True)
        return write_json(target, data)

    def write_metrics(self, metrics: dict) -> Path:
        return write_json(self.path / "metrics.json", metrics)

    def write_records(self, rows, name: str = "records.jsonl") -> Path:
        return write_jsonl(self.path / name, rows)

    def write_report(self, markdown: str) -> Path:
        return write_text(self.path / "report.md", markdown)

    def save_figure(self, fig, name: str) -> Path:
        import matplotlib.pyplot as plt

        target = self.path / name
        with atomic_path(target) as tmp:
            fig.savefig(tmp, format=target.suffix.lstrip(".") or "png", dpi=120,
                        bbox_inches="tight")
        plt.close(fig)
        return target

    # -- resume -------------------------------------------------------------------------------
    def _stage_file(self, stage: str) -> Path:
        return self.path / "stages" / f"{stage}.json"

    def done(self, stage: str, key: Any = None) -> bool:
        """The stage is stored with this key (with key=None: stored at all)."""
        f = self._stage_file(stage)
        if not f.exists():
            return False
        if key is None:
            return True
        stored = read_json(f).get("key")
        if stored == _jsonable(key):
            return True
        changed = differing_keys(stored if isinstance(stored, dict) else {},
                                 _jsonable(key))
        self.log(f"[run] stage {stage}: settings changed ({', '.join(changed)}); recomputing")
        return False

    def mark_done(self, stage: str, result: Any = None, key: Any = None) -> None:
        write_json(self._stage_file(stage), {"key": _jsonable(key), "result": result})

    def result(self, stage: str) -> Any:
        return read_json(self._stage_file(stage))["result"]

    def cached(self, stage: str, key: Any, compute: Callable[[], Any],
               outputs: Sequence[Path] = ()) -> Any:
        """The stored result of `stage` when its key matches and the files `compute` writes
        (`outputs`) are all there, else `compute()` (stored)."""
        if self.done(stage, key) and all(Path(o).exists() for o in outputs):
            return self.result(stage)
        result = compute()
        self.mark_done(stage, result, key)
        return result


def markdown_table(rows: list[dict], columns: list[str] | None = None) -> str:
    """A GitHub markdown table; floats to 3 decimals."""
    if not rows:
        return "_(no rows)_\n"
    columns = columns or list(rows[0])

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3f}"
        if isinstance(v, dict | list):
            return json.dumps(v)
        return str(v)

    head = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
    return head + "".join("| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |\n"
                          for r in rows)
