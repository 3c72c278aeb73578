"""Child side of the code sandbox (`lens_steer.eval.code`): copied into the throwaway folder and
run as `python -I _runner.py spec.json` under resource limits. Not imported by the library.

It installs an audit hook (no fork/exec/spawn, no sockets, no ctypes, no writes, renames or
deletions outside the folder), then runs the candidate program once per test and reports each
test's raw output on fd 1, one JSON line prefixed by the parent's nonce. It never sees the
expected outputs: the parent compares.
"""

import builtins
import io
import json
import os
import signal
import sys

SPEC = json.load(open(sys.argv[1], encoding="utf-8"))
ROOT = os.path.realpath(os.getcwd())
CHANNEL = sys.stdout
BLOCKED = {"os.system", "os.fork", "os.forkpty", "os.exec", "os.posix_spawn", "os.spawn",
           "os.kill", "os.killpg", "subprocess.Popen", "socket.__new__", "socket.connect",
           "socket.bind", "socket.getaddrinfo", "socket.sendto", "ctypes.dlopen",
           "ctypes.dlsym", "ctypes.cdata", "sqlite3.connect", "os.setuid", "os.chroot",
           "resource.setrlimit", "resource.prlimit", "sys.addaudithook"}
BLOCKED_IMPORTS = {"_posixsubprocess", "_ctypes", "ctypes", "multiprocessing", "_multiprocessing",
                   "_socket", "socket", "_xxsubinterpreters", "pty"}
PATH_EVENTS = {"os.remove", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.truncate",
               "os.utime", "os.symlink", "os.link", "os.rename", "shutil.rmtree",
               "shutil.copyfile", "shutil.copytree", "shutil.move"}
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def _inside(path):
    if isinstance(path, int):
        return True
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    real = os.path.realpath(os.fspath(path))
    return real == ROOT or real.startswith(ROOT + os.sep)


def _hook(event, args):
    if event in BLOCKED or event.startswith("os.exec") or event.startswith("os.spawn"):
        raise PermissionError(f"sandbox: {event} is not allowed")
    if event == "import" and args and str(args[0]).split(".")[0] in BLOCKED_IMPORTS:
        raise ImportError(f"sandbox: importing {args[0]} is not allowed")
    if event == "open":
        path, mode, flags = (list(args) + [None, None, 0])[:3]
        writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or bool(
            (flags or 0) & WRITE_FLAGS)
        if writing and path is not None and not _inside(path):
            raise PermissionError(f"sandbox: writing {path!r} outside the work folder")
    elif event in PATH_EVENTS:
        for p in args[:2] if event in ("os.rename", "os.link", "os.symlink",
                                       "shutil.copyfile", "shutil.copytree",
                                       "shutil.move") else args[:1]:
            if isinstance(p, (str, bytes, os.PathLike)) and not _inside(p):
                raise PermissionError(f"sandbox: {event} on {p!r} outside the work folder")


class _TestTimeout(BaseException):
    pass


def _alarm(signum, frame):
    raise _TestTimeout()


def _emit(obj):
    CHANNEL.write(SPEC["nonce"] + json.dumps(obj) + "\n")
    CHANNEL.flush()


PRELUDE = ("from typing import *\nimport collections, heapq, math, itertools, bisect, functools, "
           "string, re, random\nfrom collections import *\nfrom functools import *\n"
           "from itertools import *\nfrom heapq import *\nfrom bisect import *\n"
           "from math import *\n")


def _run_one(code_obj, test, limit, max_out):
    out = io.StringIO()
    sys.stdin, sys.stdout = io.StringIO(test["input"]), out
    signal.setitimer(signal.ITIMER_REAL, limit)
    try:
        if SPEC["mode"] == "stdin":
            env = {"__name__": "__main__", "__builtins__": builtins}
            try:
                exec(code_obj, env)
            except SystemExit:
                pass
            result = out.getvalue()
        else:
            env = {"__name__": "__solution__", "__builtins__": builtins}
            exec(compile(PRELUDE, "<prelude>", "exec"), env)
            exec(code_obj, env)
            name = SPEC["func_name"]
            fn = getattr(env["Solution"](), name) if "Solution" in env else env[name]
            args = [json.loads(line) for line in test["input"].split("\n") if line.strip()]
            result = json.dumps(fn(*args))
        signal.setitimer(signal.ITIMER_REAL, 0)
        return {"status": "ok", "output": result[:max_out]}
    except _TestTimeout:
        return {"status": "timeout"}
    except MemoryError:
        signal.setitimer(signal.ITIMER_REAL, 0)
        return {"status": "memory"}
    except BaseException as e:  # noqa: BLE001 - the candidate's own error, reported
        signal.setitimer(signal.ITIMER_REAL, 0)
        return {"status": "error", "error": f"{type(e).__name__}: {e}"[:500]}
    finally:
        sys.stdin, sys.stdout = sys.__stdin__, CHANNEL


def main():
    signal.signal(signal.SIGALRM, _alarm)
    source = open(SPEC["code_file"], encoding="utf-8").read()
    sys.addaudithook(_hook)
    try:
        code_obj = compile(source, "solution.py", "exec")
    except SyntaxError as e:
        _emit({"i": -1, "status": "error", "error": f"SyntaxError: {e}"[:500]})
        return
    for i, test in enumerate(SPEC["tests"]):
        res = _run_one(code_obj, test, SPEC["time_limit_s"], SPEC["max_output_chars"])
        _emit({"i": i, **res})
        if res["status"] != "ok" and SPEC["stop_at_first_failure"]:
            return


main()
