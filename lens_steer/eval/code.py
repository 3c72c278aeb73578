"""Code generation (LiveCodeBench format) graded by running the program in a sandbox.

A problem holds a statement and public + private tests, each stdin/stdout ("stdin") or a call
of `func_name` on JSON arguments, one per line ("functional", LeetCode style with an optional
`class Solution`). The answer of a generation is the last fenced code block after `</think>`;
it passes when every test passes (pass@1), and with several samples per problem
:func:`pass_at_k` gives the unbiased pass@k of Chen et al. (2021).

The sandbox (:func:`run_tests`) runs the program in a separate process in a throwaway folder:

- kernel-enforced: wall-clock timeout (process group killed), and through `prlimit` (or a
  preexec fallback) RLIMIT_CPU, RLIMIT_AS (memory), RLIMIT_FSIZE (file and output size),
  RLIMIT_NPROC (ignored by the kernel for uid 0); no
  network through a fresh network namespace (`unshare -n`, when the host permits it);
- Python-level (an audit hook installed before the program runs, see `_sandbox_runner.py`):
  no fork / exec / spawn / subprocess / os.system, no sockets, no ctypes, no writes, renames or
  deletions outside the folder. Audit hooks are not a security boundary against hostile native
  code; they stop what model-written Python does by accident or on purpose through the stdlib.
  :func:`sandbox_enforcement` reports which layers are active on this host.

    problems = load_livecodebench("lens_steer/eval/data/code_mini.jsonl")
    res = run_tests(problems[0], "print(sum(map(int, input().split())))")
    records = grade_code(problems, texts, n_tokens)   # the grader run_eval uses for this dataset

(Over 400 lines: loader, extraction, sandbox and grader are one concept, "a code answer's
grade"; the child's side lives in `_sandbox_runner.py`.)
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import resource
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lens_steer.errors import DataError
from lens_steer.eval.datasets import TEMPLATES, Problem
from lens_steer.registry import DATASETS, GRADERS

__all__ = ["SandboxLimits", "ExecResult", "load_livecodebench", "extract_code", "run_tests",
           "grade_code", "pass_at_k", "pass_at_k_summary", "sandbox_enforcement", "MINI_PATH"]

MINI_PATH = Path(__file__).parent / "data" / "code_mini.jsonl"
LCB_HUB = "livecodebench/code_generation_lite"
_RUNNER = Path(__file__).with_name("_sandbox_runner.py")
_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[ \t]*\n(.*?)```", re.DOTALL)


@dataclass(frozen=True)
class SandboxLimits:
    """Limits of one sandboxed run (one program against one problem's tests)."""

    time_limit_s: float = 4.0
    """Wall-clock seconds per test (an alarm in the child; the parent kills at the total)."""
    memory_mb: int = 1024
    """RLIMIT_AS: address space of the child process."""
    max_file_mb: int = 16
    """RLIMIT_FSIZE: largest file the program may write (its captured output included)."""
    max_processes: int = 1
    """RLIMIT_NPROC (the kernel does not apply it to uid 0; the audit hook blocks forks)."""
    network: bool = False
    """False: a fresh network namespace when available, and sockets blocked by the hook."""
    stop_at_first_failure: bool = True
    """Stop after the first failing test (what LiveCodeBench does)."""

    def __post_init__(self) -> None:
        if not (self.time_limit_s > 0 and math.isfinite(self.time_limit_s)):
            raise ValueError(f"time_limit_s must be a finite number > 0, got {self.time_limit_s}")
        if self.memory_mb < 64 or self.max_file_mb < 1 or self.max_processes < 1:
            raise ValueError("memory_mb must be >= 64, max_file_mb and max_processes >= 1")


@dataclass
class ExecResult:
    """Outcome of running one program on one problem's tests."""

    passed: bool
    status: str
    """'passed' | 'failed' (wrong output) | 'timeout' | 'memory' | 'error' | 'killed' |
    'no_code' | 'sandbox_error'."""
    n_passed: int
    n_tests: int
    detail: str = ""
    wall_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ----------------------------------------------------------------------------- data

def _tests_field(value: Any, where: str) -> list[dict[str, Any]]:
    """A test list given as a list, a JSON string, or LiveCodeBench's compressed string
    (base64 of zlib of a pickled JSON string; unpickled with no classes allowed)."""
    if value in (None, ""):
        return []
    if isinstance(value, list):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        pass
    import base64
    import io
    import pickle
    import zlib

    class _NoClasses(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            raise pickle.UnpicklingError(f"{where}: test data may not hold {module}.{name}")

    try:
        raw = _NoClasses(io.BytesIO(zlib.decompress(base64.b64decode(value)))).load()
        return json.loads(raw) if isinstance(raw, (str, bytes)) else list(raw)
    except Exception as e:  # noqa: BLE001 - any decoding failure is a data error
        raise DataError(f"{where}: tests are neither a list, JSON, nor LiveCodeBench's "
                        f"compressed form ({type(e).__name__}: {e})") from e


def _prompt(statement: str, starter: str) -> str:
    if starter.strip():
        how = ("Complete the starter code below; put your whole solution in one ```python "
               f"fenced block.\n```python\n{starter.rstrip()}\n```")
    else:
        how = ("The program reads the input from standard input and writes the answer to "
               "standard output. Put the whole program in one ```python fenced block.")
    return ("Write a correct Python 3 program for the problem below; it must pass hidden "
            f"tests.\n\nProblem:\n{statement.strip()}\n\n{how}")


def problems_from_rows(rows: Sequence[dict[str, Any]], where: str) -> list[Problem]:
    """LiveCodeBench rows (`question_content`, `public_test_cases`, `private_test_cases`,
    `starter_code`, `metadata` with `func_name`, `question_id`, ...) as Problems; tests,
    starter code and the call name go into `meta`, the full instruction into `question`."""
    out = []
    for i, row in enumerate(rows):
        here = f"{where} row {i}"
        statement = row.get("question_content", row.get("question"))
        if statement is None:
            raise DataError(f"{here}: missing 'question_content' (LiveCodeBench format: "
                            "question_content, public_test_cases, private_test_cases, "
                            "starter_code, metadata)")
        public = _tests_field(row.get("public_test_cases"), here)
        private = _tests_field(row.get("private_test_cases"), here)
        tests = public + private
        if not tests:
            raise DataError(f"{here}: no tests (public_test_cases and private_test_cases are "
                            "empty)")
        meta_raw = row.get("metadata") or {}
        meta_d = json.loads(meta_raw) if isinstance(meta_raw, str) else dict(meta_raw)
        kinds = {t.get("testtype", "stdin") for t in tests}
        if len(kinds) != 1 or not kinds <= {"stdin", "functional"}:
            raise DataError(f"{here}: tests must all be 'stdin' or all 'functional', got "
                            f"{sorted(kinds)}")
        mode = kinds.pop()
        if mode == "functional" and not meta_d.get("func_name"):
            raise DataError(f"{here}: functional tests need metadata.func_name")
        starter = str(row.get("starter_code") or "")
        meta = {"mode": mode, "func_name": meta_d.get("func_name"), "starter_code": starter,
                "tests": [{"input": str(t["input"]), "output": str(t["output"])}
                          for t in tests],
                "n_public": len(public), "statement": statement,
                **{k: row[k] for k in ("question_title", "platform", "difficulty",
                                       "contest_date", "reference_solution") if k in row}}
        out.append(Problem(id=str(row.get("question_id") or row.get("id") or f"lcb-{i}"),
                           question=_prompt(statement, starter), answer="", source="livecodebench",
                           meta=meta))
    return out


def load_livecodebench(path: str | os.PathLike | None = None, n: int | None = None,
                       release: str = "release_v5", **_: Any) -> list[Problem]:
    """LiveCodeBench problems from a local JSONL (its hub rows, one per line; `path="mini"`
    for the shipped 8 problems), $LENS_STEER_LIVECODEBENCH_PATH, or the hub
    (``livecodebench/code_generation_lite``, `release`) when online."""
    from lens_steer.eval.datasets import _load_hub_rows, _read_rows

    path = path or os.environ.get("LENS_STEER_LIVECODEBENCH_PATH") or None
    if path is not None:
        p = MINI_PATH if str(path) == "mini" else Path(path).expanduser()
        if not p.is_file():
            raise DataError(f"livecodebench file not found: {p}; pass a JSONL of "
                            f"LiveCodeBench rows (or 'mini' for {MINI_PATH.name})")
        probs = problems_from_rows(_read_rows(p), str(p))
    else:
        hint = ("load_livecodebench(path='lcb.jsonl') or --dataset-path FILE (JSONL of "
                f"{LCB_HUB} rows; 'mini' = the shipped problems)")
        probs = problems_from_rows(_load_hub_rows(LCB_HUB, release, "test", hint), LCB_HUB)
    return probs if n is None else probs[:n]


# ----------------------------------------------------------------------------- extraction

def extract_code(text: str) -> str | None:
    """The last fenced code block after the last `</think>` (the whole text when there is no
    `</think>`); None when there is none. A block still open at the end is not taken."""
    tail = text.rsplit("</think>", 1)[1] if "</think>" in text else text
    blocks = [body for lang, body in _FENCE.findall(tail)
              if lang.lower() in ("", "python", "py", "python3")]
    return blocks[-1] if blocks else None


# ----------------------------------------------------------------------------- sandbox

@functools.lru_cache(maxsize=1)
def _netns_prefix() -> tuple[str, ...]:
    """The command prefix that gives the child an empty network namespace here, or ()."""
    exe = shutil.which("unshare")
    if exe is None:
        return ()
    for prefix in ((exe, "-n", "--"), (exe, "-rn", "--")):
        try:
            if subprocess.run([*prefix, "true"], capture_output=True, timeout=10).returncode == 0:
                return prefix
        except (OSError, subprocess.SubprocessError):
            continue
    return ()


def sandbox_enforcement() -> dict[str, str]:
    """Which protection is enforced how on this host (for reports and docs)."""
    root = os.geteuid() == 0
    return {
        "time": "kernel: wall-clock kill of the process group + RLIMIT_CPU; per-test alarm",
        "memory": "kernel: RLIMIT_AS",
        "file_size": "kernel: RLIMIT_FSIZE (output included)",
        "processes": ("audit hook (uid 0: the kernel ignores RLIMIT_NPROC)" if root
                      else "kernel: RLIMIT_NPROC + audit hook"),
        "network": ("kernel: empty network namespace (unshare) + audit hook" if _netns_prefix()
                    else "audit hook only (unshare not permitted here)"),
        "files": "audit hook: writes, renames, deletions only inside the throwaway folder",
    }


def _rlimits(limits: SandboxLimits, cpu_s: int) -> dict[str, int]:
    mb = 1024 * 1024
    return {"as": limits.memory_mb * mb, "fsize": limits.max_file_mb * mb, "cpu": cpu_s,
            "nproc": limits.max_processes, "core": 0}


def _limits_launch(limits: SandboxLimits, cpu_s: int) -> tuple[list[str], Any]:
    """(command prefix, preexec_fn) that apply the resource limits to the child: util-linux
    `prlimit` when present (no Python code between fork and exec, safe under the grading
    thread pool), else a preexec function."""
    values = _rlimits(limits, cpu_s)
    exe = shutil.which("prlimit")
    if exe:
        return [exe, *(f"--{k}={v}" for k, v in values.items()), "--"], None
    names = {"as": resource.RLIMIT_AS, "fsize": resource.RLIMIT_FSIZE, "cpu": resource.RLIMIT_CPU,
             "nproc": resource.RLIMIT_NPROC, "core": resource.RLIMIT_CORE}

    def apply() -> None:
        for key, val in values.items():
            resource.setrlimit(names[key], (val, val))
    return [], apply


def _same_output(got: str, want: str, functional: bool) -> bool:
    if functional:
        try:
            return _close(json.loads(got), json.loads(want))
        except (json.JSONDecodeError, TypeError):
            return got.strip() == want.strip()
    g = [ln.strip() for ln in got.strip().splitlines()]
    w = [ln.strip() for ln in want.strip().splitlines()]
    if g == w:
        return True
    gt, wt = " ".join(g).split(), " ".join(w).split()
    return len(gt) == len(wt) and all(a == b or _num_close(a, b) for a, b in zip(gt, wt, strict=True))


def _num_close(a: str, b: str) -> bool:
    try:
        return math.isclose(float(a), float(b), rel_tol=1e-6, abs_tol=1e-6)
    except ValueError:
        return False


def _close(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) or isinstance(b, float):
        return (isinstance(a, (int, float)) and isinstance(b, (int, float))
                and math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-6))
    return a == b


def run_tests(problem: Problem, code: str | None, limits: SandboxLimits | None = None
              ) -> ExecResult:
    """Run `code` on every test of `problem` in a sandboxed child process (module docstring)."""
    limits = limits or SandboxLimits()
    tests = problem.meta["tests"]
    if not code or not code.strip():
        return ExecResult(False, "no_code", 0, len(tests), "no fenced code block")
    functional = problem.meta["mode"] == "functional"
    nonce = secrets.token_hex(8)
    total = limits.time_limit_s * len(tests) + 5.0
    t0 = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="lens_steer_sandbox_"))
    logs = Path(tempfile.mkdtemp(prefix="lens_steer_sandbox_log_"))
    try:
        (work / "solution.py").write_text(code, encoding="utf-8")
        (work / "_runner.py").write_text(_RUNNER.read_text(encoding="utf-8"), encoding="utf-8")
        spec = {"nonce": nonce, "code_file": "solution.py", "mode": problem.meta["mode"],
                "func_name": problem.meta.get("func_name"),
                "tests": [{"input": t["input"]} for t in tests],
                "time_limit_s": limits.time_limit_s, "max_output_chars": 1_000_000,
                "stop_at_first_failure": limits.stop_at_first_failure}
        (work / "spec.json").write_text(json.dumps(spec), encoding="utf-8")
        prefix = () if limits.network else _netns_prefix()
        env = {"PATH": "/usr/bin:/bin", "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1",
               "PYTHONHASHSEED": "0", "HOME": str(work), "TMPDIR": str(work)}
        with open(logs / "out", "wb") as out, open(logs / "err", "wb") as err:
            rlimit, preexec = _limits_launch(limits, math.ceil(total) + 1)
            proc = subprocess.Popen([*rlimit, *prefix, sys.executable, "-I", "_runner.py",
                                     "spec.json"], cwd=work, stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=err, env=env, preexec_fn=preexec,
                                    start_new_session=True)
            try:
                rc = proc.wait(timeout=total)
            except subprocess.TimeoutExpired:
                rc = None
            finally:
                _kill_group(proc)
        wall = time.perf_counter() - t0
        lines = (logs / "out").read_bytes()[:64 * 1024 * 1024].decode("utf-8", "replace")
        stderr = (logs / "err").read_bytes()[-2000:].decode("utf-8", "replace")
        return _verdict(lines, nonce, tests, functional, rc, stderr, wall)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(logs, ignore_errors=True)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def _verdict(lines: str, nonce: str, tests: list[dict[str, str]], functional: bool,
             rc: int | None, stderr: str, wall: float) -> ExecResult:
    n = len(tests)
    reports = []
    for line in lines.splitlines():
        if line.startswith(nonce):
            try:
                reports.append(json.loads(line[len(nonce):]))
            except json.JSONDecodeError:
                break
    passed: set[int] = set()  # by test index: a repeated report cannot count twice
    for rep in reports:
        i, n_passed = rep.get("i", -1), len(passed)
        if rep.get("status") != "ok":
            return ExecResult(False, rep.get("status", "error"), n_passed, n,
                              f"test {i}: {rep.get('error', rep.get('status'))}", wall)
        if not (isinstance(i, int) and 0 <= i < n and isinstance(rep.get("output"), str)):
            return ExecResult(False, "error", n_passed, n, "malformed report", wall)
        if not _same_output(rep["output"], tests[i]["output"], functional):
            return ExecResult(False, "failed", n_passed, n,
                              f"test {i}: wrong output {rep['output'][:200]!r}", wall)
        passed.add(i)
    n_passed = len(passed)
    if n_passed == n:
        return ExecResult(True, "passed", n, n, "", wall)
    if rc is None:
        return ExecResult(False, "timeout", n_passed, n, "killed at the total time limit", wall)
    sig = {-signal.SIGXCPU: "timeout", -signal.SIGKILL: "killed", -signal.SIGXFSZ: "file_size",
           -signal.SIGSEGV: "memory"}.get(rc, "error")
    return ExecResult(False, sig, n_passed, n, f"exit {rc}: {stderr.strip()[-300:]}", wall)


# ----------------------------------------------------------------------------- grading

def grade_code(problems: Sequence[Problem], texts: Sequence[str], n_tokens: Sequence[int],
               dataset: str = "livecodebench", *, finish_reasons: Sequence[str] | None = None,
               limits: SandboxLimits | None = None, workers: int | None = None,
               labeler: Any = None, **_: Any) -> list[Any]:
    """Grade generations by running their code (same signature as `score_generations`, so
    `run_eval` uses it for code datasets): one `Record` per problem, `correct` = all tests pass,
    `predicted` = the extracted code, `meta["exec"]` = the sandbox verdict."""
    from lens_steer.eval.metrics import Record, label_trace
    from lens_steer.thoughts import count_by_label

    if not (len(problems) == len(texts) == len(n_tokens)):
        raise ValueError(f"lengths differ: {len(problems)} problems, {len(texts)} texts, "
                         f"{len(n_tokens)} token counts; pass one of each per problem")
    codes = [extract_code(t) for t in texts]
    workers = workers or max(1, min(4, os.cpu_count() or 1))
    with ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(lambda pc: run_tests(pc[0], pc[1], limits),
                                zip(problems, codes, strict=True)))
    out = []
    rows = zip(problems, texts, n_tokens, codes, results, strict=True)
    for i, (p, text, nt, code, res) in enumerate(rows):
        labels = label_trace(text, labeler=labeler)  # None: SEAL's rules
        out.append(Record(id=p.id, question=p.meta.get("statement", p.question), gold="",
                          generated_text=text, predicted=code, correct=res.passed,
                          n_tokens=int(nt), thought_labels=labels,
                          thought_counts=count_by_label(labels),
                          dataset=dataset,
                          finish_reason=None if finish_reasons is None else finish_reasons[i],
                          meta={"exec": res.to_dict()}))
    return out


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from `n` samples of which `c` pass: 1 - C(n-c, k) / C(n, k)."""
    if not 0 <= c <= n or k < 1:
        raise ValueError(f"need 0 <= c <= n and k >= 1, got n={n}, c={c}, k={k}")
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples per problem, got {n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod((n - c - i) / (n - i) for i in range(k))


def pass_at_k_summary(records: Sequence[Any], ks: Sequence[int] = (1,)) -> dict[str, float]:
    """Mean pass@k over problems from records with repeated ids (one per sample)."""
    by_id: dict[str, list[bool]] = {}
    for r in records:
        rid, ok = (r["id"], r["correct"]) if isinstance(r, dict) else (r.id, r.correct)
        by_id.setdefault(str(rid), []).append(bool(ok))
    out: dict[str, float] = {}
    for k in ks:
        vals = [pass_at_k(len(v), sum(v), k) for v in by_id.values() if len(v) >= k]
        if vals:
            out[f"pass@{k}"] = sum(vals) / len(vals)
    return out


def demo(path: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """Grade each shipped problem's reference solution and three broken programs (wrong,
    looping, forking): the grader's behaviour without any model."""
    probs = load_livecodebench(path or MINI_PATH)
    broken = {"wrong": "print(42)", "loops": "while True:\n    pass",
              "forks": "import os\nos.fork()\nprint(1)"}
    rows = []
    for p in probs:
        ref = p.meta.get("reference_solution", "")
        for name, code in {"reference": ref, **broken}.items():
            r = run_tests(p, code, SandboxLimits(time_limit_s=1.0))
            rows.append({"problem": p.id, "program": name, "status": r.status,
                         "passed": f"{r.n_passed}/{r.n_tests}", "wall_s": round(r.wall_s, 2)})
    return rows


TEMPLATES.setdefault("r1_code", "<｜begin▁of▁sentence｜><｜User｜>{problem}<｜Assistant｜><think>\n")
TEMPLATES.setdefault("qwen_code", "<|im_start|>user\n{problem}<|im_end|>\n<|im_start|>assistant\n")
"""Chat templates without the math datasets' \\boxed{} instruction (the problem says how to answer)."""
if "livecodebench" not in DATASETS:  # (`python -m lens_steer.eval.code` imports it twice)
    DATASETS.register("livecodebench", load_livecodebench)
    GRADERS.register("livecodebench", grade_code)


if __name__ == "__main__":
    for row in demo(sys.argv[1] if len(sys.argv) > 1 else None):
        print(row)
    print(sandbox_enforcement())
