"""Code grading: LiveCodeBench rows, code extraction, the sandbox's limits, pass@k."""

from __future__ import annotations

import base64
import json
import pickle
import socket
import threading
import time
import uuid
import zlib
from pathlib import Path

import pytest

from lens_steer.errors import DataError
from lens_steer.eval import code as C
from lens_steer.eval.code import SandboxLimits, extract_code, load_livecodebench, run_tests

FAST = SandboxLimits(time_limit_s=1.0, memory_mb=512)


@pytest.fixture(scope="module")
def mini():
    return {p.id: p for p in load_livecodebench("mini")}


def test_mini_dataset_loads_both_test_kinds(mini):
    assert len(mini) == 8
    modes = {p.meta["mode"] for p in mini.values()}
    assert modes == {"stdin", "functional"}
    two = mini["mini-two-sum"]
    assert two.meta["func_name"] == "twoSum" and two.meta["n_public"] == 1
    assert len(two.meta["tests"]) == 3 and "```python" in two.question


def test_every_reference_solution_passes_and_wrong_code_fails(mini):
    for p in mini.values():
        ok = run_tests(p, p.meta["reference_solution"], FAST)
        assert ok.passed and ok.status == "passed" and ok.n_passed == ok.n_tests, (p.id, ok)
    bad = run_tests(mini["mini-sum-two"], "a, b = map(int, input().split())\nprint(a - b)", FAST)
    assert not bad.passed and bad.status == "failed" and bad.n_passed == 0
    # functional: a wrong return value, and a crash, both fail
    wrong = "class Solution:\n    def maxSubArray(self, nums):\n        return max(nums)\n"
    res = run_tests(mini["mini-max-subarray"], wrong, FAST)
    assert not res.passed and res.status == "failed" and res.n_passed == 0
    crash = run_tests(mini["mini-max-subarray"], "class Solution:\n    pass\n", FAST)
    assert not crash.passed and crash.status == "error" and "AttributeError" in crash.detail


def test_extract_code_takes_the_last_block_after_think():
    text = ("<think>\n```python\nprint('draft')\n```\n</think>\nFirst:\n```python\nprint(1)\n```"
            "\nFinal:\n```py\nprint(2)\n```\n")
    assert extract_code(text).strip() == "print(2)"
    assert extract_code("```python\nx = 1\n```").strip() == "x = 1"  # no </think>: whole text
    assert extract_code("<think>\n```python\nprint(1)\n```\n</think>\nno code") is None
    assert extract_code("</think>```python\nprint(1)") is None  # unterminated fence
    assert extract_code("</think>\n```cpp\nint main(){}\n```") is None  # not Python


def test_compressed_private_tests_and_pickled_classes(tmp_path):
    tests = [{"input": "1 2\n", "output": "3\n", "testtype": "stdin"}]
    packed = base64.b64encode(zlib.compress(pickle.dumps(json.dumps(tests)))).decode()
    row = {"question_id": "x", "question_content": "add", "public_test_cases": "[]",
           "private_test_cases": packed, "starter_code": "", "metadata": "{}"}
    (tmp_path / "a.jsonl").write_text(json.dumps(row) + "\n")
    (p,) = load_livecodebench(tmp_path / "a.jsonl")
    assert p.meta["tests"] == [{"input": "1 2\n", "output": "3\n"}]
    evil = base64.b64encode(zlib.compress(pickle.dumps(Path("/")))).decode()
    (tmp_path / "b.jsonl").write_text(json.dumps({**row, "private_test_cases": evil}) + "\n")
    with pytest.raises(DataError, match="may not hold"):
        load_livecodebench(tmp_path / "b.jsonl")
    with pytest.raises(DataError, match="not found"):
        load_livecodebench(tmp_path / "missing.jsonl")


def test_hub_route_fails_fast_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("LENS_STEER_LIVECODEBENCH_PATH", raising=False)
    t0 = time.perf_counter()
    with pytest.raises(Exception, match="--dataset-path FILE"):
        load_livecodebench()
    assert time.perf_counter() - t0 < 5


# -- the sandbox stops what must not run -----------------------------------------------------
def test_infinite_loop_is_stopped(mini):
    t0 = time.perf_counter()
    res = run_tests(mini["mini-sum-two"], "while True:\n    pass\n", FAST)
    assert not res.passed and res.status == "timeout"
    assert time.perf_counter() - t0 < 4


def test_loop_that_swallows_the_alarm_is_killed_by_the_parent(mini):
    code = "while True:\n    try:\n        while True: pass\n    except BaseException:\n        pass\n"
    t0 = time.perf_counter()
    res = run_tests(mini["mini-sum-two"], code, SandboxLimits(time_limit_s=0.5))
    assert not res.passed and res.status in ("timeout", "killed")
    assert time.perf_counter() - t0 < 0.5 * 3 + 8


@pytest.mark.parametrize("launch", ["prlimit", "preexec"])
def test_unbounded_allocation_is_stopped(mini, monkeypatch, launch):
    if launch == "preexec":  # hosts without util-linux prlimit
        which = C.shutil.which
        monkeypatch.setattr(C.shutil, "which", lambda n: None if n == "prlimit" else which(n))
    code = "x = []\nwhile True:\n    x.append(bytearray(50_000_000))\n"
    res = run_tests(mini["mini-sum-two"], code, SandboxLimits(time_limit_s=5, memory_mb=256))
    assert not res.passed and res.status in ("memory", "killed", "error"), res
    assert res.wall_s < 5


@pytest.mark.parametrize("code", [
    "import os\npid = os.fork()\nprint(7)\n",
    "import subprocess\nsubprocess.run(['true'])\nprint(7)\n",
    "import os\nos.system('true')\nprint(7)\n",
    "import multiprocessing\nprint(7)\n",
    "import ctypes\nprint(7)\n",
])
def test_forks_and_escapes_fail(mini, code):
    res = run_tests(mini["mini-sum-two"], code, FAST)
    assert not res.passed and res.status == "error" and "not allowed" in res.detail, res


def test_writes_outside_the_folder_are_blocked_inside_allowed(mini, tmp_path):
    outside = tmp_path / f"escape-{uuid.uuid4().hex}"
    code = (f"open({str(outside)!r}, 'w').write('x')\n"
            "a, b = map(int, input().split())\nprint(a + b)\n")
    res = run_tests(mini["mini-sum-two"], code, FAST)
    assert not res.passed and "outside the work folder" in res.detail
    assert not outside.exists()
    for attack in (f"import os\nos.remove({str(tmp_path)!r})\n",
                   f"import shutil\nshutil.rmtree({str(tmp_path)!r})\n",
                   f"import os\nos.symlink({str(tmp_path)!r}, 'l')\nopen('l/x', 'w')\n"):
        assert not run_tests(mini["mini-sum-two"], attack, FAST).passed
    assert tmp_path.exists() and list(tmp_path.iterdir()) == []
    scratch = ("open('scratch.txt', 'w').write(input())\n"
               "a, b = map(int, open('scratch.txt').read().split())\nprint(a + b)\n")
    assert run_tests(mini["mini-sum-two"], scratch, FAST).passed


def test_forged_reports_do_not_pass(mini):
    # the program finds the runner's nonce and reports test 0's answer for every test
    code = ("import __main__, json\nspec = __main__.SPEC\n"
            "for i in range(len(spec['tests'])):\n"
            "    __main__.CHANNEL.write(spec['nonce'] + json.dumps("
            "{'i': 0, 'status': 'ok', 'output': '7'}) + '\\n')\n"
            "__main__.CHANNEL.flush()\nimport os\nos._exit(0)\n")
    res = run_tests(mini["mini-sum-two"], code, FAST)
    assert not res.passed and res.n_passed == 1


def test_huge_output_is_capped(mini):
    code = "import sys\nwhile True:\n    sys.__stdout__.write('x' * 1_000_000)\n"
    res = run_tests(mini["mini-sum-two"], code, SandboxLimits(time_limit_s=5, max_file_mb=2))
    assert not res.passed and res.status in ("file_size", "error", "killed"), res
    assert res.wall_s < 5


@pytest.mark.parametrize("layers", ["all", "hook_only"])
def test_no_network(mini, monkeypatch, layers):
    if layers == "hook_only":
        monkeypatch.setattr(C, "_netns_prefix", lambda: ())
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    accepted: list = []
    threading.Thread(target=lambda: accepted.append(server.accept()), daemon=True).start()
    code = ("try:\n    import socket\n"
            f"    socket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
            "    print('connected')\nexcept BaseException:\n    print(7)\n")
    try:
        res = run_tests(mini["mini-sum-two"], code, SandboxLimits(time_limit_s=2))
    finally:
        server.close()
    assert not accepted
    assert res.n_passed >= 1  # printed 7 on "3 4": the connection failed


def test_pass_at_k_unbiased_estimator():
    assert C.pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert C.pass_at_k(10, 3, 2) == pytest.approx(1 - 21 / 45)
    assert C.pass_at_k(5, 0, 3) == 0.0 and C.pass_at_k(5, 3, 3) == 1.0
    with pytest.raises(ValueError):
        C.pass_at_k(2, 1, 3)
    recs = [{"id": "a", "correct": c} for c in (True, False, False, False)] + \
           [{"id": "b", "correct": c} for c in (True, True, True, False)]
    out = C.pass_at_k_summary(recs, ks=(1, 2))
    assert out["pass@1"] == pytest.approx((0.25 + 0.75) / 2)
    assert out["pass@2"] == pytest.approx(((1 - 3 / 6) + 1.0) / 2)


def test_grade_code_records(mini):
    probs = [mini["mini-sum-two"], mini["mini-palindrome"]]
    texts = ["<think>\nadd them\n</think>\n```python\n" + probs[0].meta["reference_solution"]
             + "```", "<think>\nhmm\n</think>\nno code here"]
    recs = C.grade_code(probs, texts, [10, 20])
    assert [r.correct for r in recs] == [True, False]
    assert recs[1].predicted is None and recs[1].meta["exec"]["status"] == "no_code"
    assert recs[0].meta["exec"]["n_tests"] == 3 and recs[0].n_tokens == 10


def test_livecodebench_is_a_registered_dataset():
    import lens_steer.eval  # noqa: F401 - registers the datasets
    from lens_steer.registry import DATASETS

    assert "livecodebench" in DATASETS
    assert len(DATASETS.get("livecodebench")(path="mini", n=3)) == 3
