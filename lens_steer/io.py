"""Artifact I/O: atomic writes that honour the umask, and one writer per folder.

Every file is written to a temp name in the same folder, then renamed over the target: a crash
mid-write leaves the previous version intact, never a half-written file. Files get the mode a
plain `open()` would give (0666 minus the umask), not `mkstemp`'s 0600.
`atomic_dir(dest)` does the same for a whole folder (a model directory).

`folder_lock(path)` is an advisory lock (`filelock`, i.e. `flock`) on `path/.lock`: a second
writer, in another process or another thread, gets an `ArtifactError` naming the holder (pid,
host, start time, command). The kernel drops the lock when its holder dies, even by SIGKILL, so a
killed run never blocks the next one. `discard(root, names)` deletes entries by renaming them into
a trash folder first, so a reader never sees a half-deleted artifact.

    with folder_lock("runs/x"):                # ArtifactError if another run writes there
        write_json("runs/x/config.json", cfg)
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from lens_steer.errors import ArtifactError

LOCK_NAME = ".lock"
"""Lock file inside a locked folder (empty; `flock` on it is the lock)."""
HOLDER_NAME = ".lock.json"
"""Who holds the lock: pid, host, start time, command (written after the lock is taken)."""
TRASH_PREFIX = ".trash-"


def _umask() -> int:
    try:  # Linux: read it without changing it (os.umask is process-wide and racy)
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside `path`; on success it replaces `path` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        # mkstemp makes 0600 (and some writers re-create the file): give the mode open() would
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def atomic_dir(dest: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temp folder beside `dest`; on success it replaces `dest` in one rename
    (files 0644, folder 0755), on error it is removed and `dest` is left as it was."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    try:
        yield tmp
        tmp.chmod(0o755)
        for f in tmp.iterdir():
            f.chmod(0o644)
        old = dest.with_name(f".{dest.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        if dest.exists():
            os.replace(dest, old)
        os.replace(tmp, dest)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> Path:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, default=_json_default) + "\n")
    return Path(path)


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Rows of a JSONL file; a broken line raises `DataError` naming the file and the line."""
    from lens_steer.errors import DataError  # noqa: PLC0415

    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise DataError(f"{path}, line {n}: not valid JSON ({err.msg}, column "
                                    f"{err.colno}): fix or remove that line") from None
    return rows


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor],
                 metadata: dict[str, str] | None = None) -> Path:
    """Save tensors as safetensors, atomically."""
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp),
                  metadata=metadata)
    return Path(path)


def load_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def _json_default(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


# -- one writer per folder -----------------------------------------------------------------------
_HELD: dict[Path, list] = {}
"""Folders this process locks: path -> [FileLock, owning thread id, depth] (re-entry per thread)."""
_HELD_GUARD = threading.Lock()


def lock_holder(path: str | os.PathLike) -> dict[str, Any] | None:
    """Who last took the lock on folder `path` (None if nobody wrote the holder file)."""
    try:
        return read_json(Path(path) / HOLDER_NAME)
    except (OSError, ValueError):
        return None


def live_holder(path: str | os.PathLike) -> dict[str, Any] | None:
    """The holder of folder `path`'s lock if it may still be running: None when there is no
    holder file, or when it names a process of this host that no longer exists (a killed
    writer leaves its holder file; its lock is already gone). Does not touch the lock."""
    holder = lock_holder(path)
    if holder is None or holder.get("host") != socket.gethostname():
        return holder
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return None
    except (PermissionError, KeyError, TypeError, ValueError):
        pass
    return holder


def describe_holder(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "another writer (holder unknown: it is starting or stopping)"
    return (f"pid {holder.get('pid')} on {holder.get('host')}, started "
            f"{holder.get('started')}, command: {holder.get('command')}")


@contextmanager
def folder_lock(path: str | os.PathLike, *, command: str | None = None, timeout: float = 0
                ) -> Iterator[Path]:
    """Hold the one-writer lock on folder `path` (created if missing) for the `with` block.

    Refuses with `ArtifactError` naming the holder if another process or thread holds it (after
    waiting `timeout` seconds; 0 = refuse at once). Re-entrant in the thread that holds it, so a
    function that locks can call another that locks the same folder. `command` is recorded for
    the refusal message (default: this process's command line).
    """
    from filelock import FileLock, Timeout

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    key = path.resolve()
    me = threading.get_ident()
    with _HELD_GUARD:
        held = _HELD.get(key)
        if held is not None and held[1] == me:
            held[2] += 1
            reentered = True
        else:
            reentered = False
    if reentered:
        try:
            yield path
        finally:
            with _HELD_GUARD:
                _HELD[key][2] -= 1
        return

    lock = FileLock(str(path / LOCK_NAME), timeout=timeout, thread_local=False)
    try:
        lock.acquire()
    except Timeout:
        raise ArtifactError(
            f"{path} is being written by {describe_holder(lock_holder(path))}: wait for it to "
            "finish, stop it, or write to another folder (a lock held by a dead process is "
            "released by the system)") from None
    try:
        write_json(path / HOLDER_NAME, {
            "pid": os.getpid(), "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "command": command or " ".join(sys.argv) or sys.executable,
            "thread": me})
        with _HELD_GUARD:
            _HELD[key] = [lock, me, 1]
        yield path
    finally:
        with _HELD_GUARD:
            _HELD.pop(key, None)
        (path / HOLDER_NAME).unlink(missing_ok=True)
        lock.release()


def ensure_unlocked(path: str | os.PathLike) -> None:
    """Refuse now (`ArtifactError` naming the holder) if another writer holds folder `path`: a
    check before expensive work such as loading a model. The writer still takes `folder_lock`."""
    if Path(path).is_dir():
        with folder_lock(path):
            pass


def holds_lock(path: str | os.PathLike) -> bool:
    """True iff this thread holds `folder_lock(path)`."""
    with _HELD_GUARD:
        held = _HELD.get(Path(path).resolve())
    return held is not None and held[1] == threading.get_ident()


def discard(root: str | os.PathLike, names: Iterable[str | os.PathLike]) -> int:
    """Delete entries of folder `root` atomically: rename each into `root/.trash-*`, then remove
    the trash. Entries are moved in the order given (put the commit file, e.g. a manifest,
    first). Leftover trash of an earlier crash is removed too. Returns how many were moved."""
    root = Path(root)
    trash = root / f"{TRASH_PREFIX}{uuid.uuid4().hex[:12]}"
    moved = 0
    for name in names:
        src = root / name
        if src.exists() or src.is_symlink():
            trash.mkdir(exist_ok=True)
            os.replace(src, trash / f"{moved:06d}-{src.name}")
            moved += 1
    for old in root.glob(f"{TRASH_PREFIX}*"):
        shutil.rmtree(old, ignore_errors=True)
    return moved
