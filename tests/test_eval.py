"""Evaluation harness: answer extraction, equivalence, datasets, prompts and run metrics."""

from __future__ import annotations

import json
import sys
import time
import types

import pytest

from lens_steer.eval import (
    TEMPLATES,
    DatasetUnavailableError,
    Problem,
    Record,
    answer_checker,
    extract_answer,
    extract_boxed,
    format_prompt,
    is_equiv,
    load_dataset,
    load_gsm8k,
    load_math500,
    normalize_answer,
    numeric_match,
    read_records,
    score_generations,
    summarize,
    write_records,
)
from lens_steer.eval import datasets as ds_mod

# ----------------------------------------------------------------------------- extraction


@pytest.mark.parametrize("text, expected", [
    (r"so $\boxed{\frac{1}{2}}$.", r"\frac{1}{2}"),
    (r"\boxed{\frac{a}{b^{2}}} done", r"\frac{a}{b^{2}}"),
    (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),
    (r"first \boxed{3} then revised \boxed{4}", "4"),           # last boxed wins
    (r"\boxed{3} then truncated \boxed{\frac{1}{", "3"),        # unclosed last box skipped
    (r"\fbox{9}", "9"),
    (r"put your final answer within \boxed{}.", None),        # an empty box is no answer
    (r"\boxed{8} ... within \boxed{}", "8"),
    (r"$\boxed 5$", "5"),
    ("no box here", None),
    ("", None),
])
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("Natalia sold 48 clips.\n#### 1,234", "1234"),
    ("blah\n#### 72", "72"),
    ("So in total she pays 20. The answer is -7.", "-7"),
    ("The answer is 3.5.", "3.5"),
    (r"**The final answer is $\frac{1}{2}$**", r"\frac{1}{2}"),
    (r"The answer is 2. Wait, no: \boxed{5}", "5"),              # boxed beats "answer is"
    ("#### 8\nThe answer is 9", "8"),                             # #### beats "answer is"
    ("I am not sure what to do.", None),
    (None, None),
])
def test_extract_answer_auto(text, expected):
    assert extract_answer(text) == expected


def test_extract_answer_styles():
    text = r"The answer is 4. \boxed{5} #### 6 and 7"
    assert extract_answer(text, "boxed") == "5"
    assert extract_answer(text, "gsm8k") == "6 and 7"  # the rest of the #### line
    assert extract_answer(text, "answer_is") == "4"
    assert extract_answer("costs $1,250 total", "last_number") == "1250"
    with pytest.raises(ValueError, match="unknown extraction style"):
        extract_answer(text, "nope")


# ----------------------------------------------------------------------------- equivalence

EQUIV_TRUE = [
    (r"\frac12", "0.5"),
    (r"\frac{1}{2}", "1/2"),
    (r"\dfrac{1}{2}", r"\frac{1}{2}"),
    (r"\tfrac{3}{4}", "0.75"),
    (r"5\text{ cm}", "5"),
    ("5 cm", "5"),
    (r"12\text{ inches}", "12"),
    ("-3", "-3.0"),
    ("-7", r"-\frac{14}{2}"),
    ("1,000", "1000"),
    ("1{,}000", "1000"),
    (r"\left(1,2\right)", "(1, 2)"),
    (r"30^\circ", "30"),
    (r"30^{\circ}", "30"),
    (r"50\%", "50"),
    (r"\$5", "5"),
    ("x = 5", "5"),
    (r"y=\frac12", "0.5"),
    (r"x \in [1,2)", "[1, 2)"),
    ("(0.5, 3)", r"(\frac12, 3)"),                  # tuples elementwise
    (r"\left[-1, \frac{3}{2}\right)", "[-1, 1.5)"),  # intervals elementwise
    ("1, -2", "-2, 1"),                             # a bare list of solutions: any order
    (r"\{1, 2\}", r"\{2,1\}"),                    # sets: any order
    (r"\sqrt{3}/2", r"\frac{\sqrt3}{2}"),
    (r"\pi/2", r"\frac{\pi}{2}"),
    ("2x+1", "1+2x"),
    ("x^2+2x+1", "(x+1)^2"),
    (r"\sqrt[3]{8}", "2"),
    ("3-4i", "3 - 4i"),
    (r"\text{(A)}", "A"),
    (r"\text{Evelyn}", "Evelyn"),
    (r"\boxed{7}", "7"),
    ("6.0", "6"),
    ("12.50", "12.5"),
    (".5", "0.5"),
    (r"\infty", r"\infty"),
    (r"\$32,\!348", "32348"),
    (r"4\sqrt{2}", r"\sqrt{32}"),
    (r"0.\overline{3}", r"\frac13"),
    (r"0.1\overline{6}", r"\frac{1}{6}"),
    (r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}", r"\begin{pmatrix}1\\2\end{pmatrix}"),
    ("x^{2}+7x+10", "(x+5)(x+2)"),
]

EQUIV_FALSE = [
    ("2", "3"),
    (r"\frac{1}{3}", "0.33"),
    ("(1,2]", "[1,2]"),          # interval ends differ
    ("(1,2)", "(2,1)"),          # tuples are ordered
    ("(1,2)", "(1,2,3)"),
    ("1, 2", "1"),
    ("-5", "5"),
    ("2m", "2"),                 # "m" is a unit only after a space
    (r"\frac{1}{2}", r"\frac{1}{3}"),
    ("x+1", "x+2"),
    (r"2^{2^{100}}", "3"),       # rejected before evaluation, no hang
    ("__import__('os').getcwd()", "1"),
    ("", "0"),
    (None, "1"),
    (r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}", r"\begin{pmatrix} 2 \\ 1 \end{pmatrix}"),
]


@pytest.mark.parametrize("pred, gold", EQUIV_TRUE)
def test_is_equiv_true(pred, gold):
    assert is_equiv(pred, gold) is True
    assert is_equiv(gold, pred) is True


@pytest.mark.parametrize("pred, gold", EQUIV_FALSE)
def test_is_equiv_false(pred, gold):
    assert is_equiv(pred, gold) is False


def test_numeric_tolerance_is_relative_and_configurable():
    assert is_equiv(r"\frac{1}{3}", "0.3333333333")           # within 1e-6
    assert not is_equiv(r"\frac{1}{3}", "0.3333", numeric_tol=1e-6)
    assert is_equiv(r"\frac{1}{3}", "0.3333", numeric_tol=1e-3)
    assert is_equiv("1000000", "1000000.5", numeric_tol=1e-6)  # relative: 5e-7


def test_normalize_answer_examples():
    assert normalize_answer(r"\left( \dfrac{1}{2}, 3 \right)") == r"(\frac{1}{2},3)"
    assert normalize_answer(r"5\text{ cm}") == "5"
    assert normalize_answer(r"\frac12") == r"\frac{1}{2}"
    assert normalize_answer("1,234,567") == "1234567"
    assert normalize_answer(r"x = 45^\circ") == "45"
    assert normalize_answer(None) == ""


@pytest.mark.parametrize("pred, gold, expected", [
    ("1,234", "1234", True),
    ("$18.00", "18", True),
    (r"\boxed{\$1,000}", "1000", True),
    ("18 apples", "18", True),
    ("-7", "-7", True),
    ("17", "18", False),
    ("18.5", "18", False),
    ("between 3 and 4", "3", False),   # two numbers: ambiguous
    (None, "18", False),
    ("", "18", False),
])
def test_numeric_match(pred, gold, expected):
    assert numeric_match(pred, gold) is expected


def test_answer_checker_by_dataset():
    assert answer_checker("gsm8k") is numeric_match
    assert answer_checker("MATH-500") is is_equiv
    assert answer_checker("toy")("114", "114") and not answer_checker("toy")("116", "114")
    with pytest.raises(ValueError, match="unknown dataset"):
        answer_checker("mmlu")


# ----------------------------------------------------------------------------- datasets

def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


MATH_ROWS = [
    {"problem": "What is $1+1$?", "solution": r"... $\boxed{2}$", "answer": "2",
     "subject": "Prealgebra", "level": 1, "unique_id": "test/prealgebra/1.json"},
    {"problem": r"Simplify $\frac{2}{4}$.", "solution": "...", "answer": r"\frac{1}{2}",
     "subject": "Algebra", "level": 2, "unique_id": "test/algebra/2.json"},
]
GSM_ROWS = [
    {"question": "Tom has 3 apples and buys 4. How many?",
     "answer": "Tom has 3+4=<<3+4=7>>7 apples.\n#### 7"},
    {"question": "A car costs $1,200 and a bike $34. Total?",
     "answer": "1200+34=<<1200+34=1234>>1234\n#### 1,234"},
]


def test_load_math500_local_jsonl(tmp_path):
    path = _write_jsonl(tmp_path / "math500.jsonl", MATH_ROWS)
    probs = load_math500(path)
    assert [p.id for p in probs] == ["test/prealgebra/1.json", "test/algebra/2.json"]
    assert probs[1].question == r"Simplify $\frac{2}{4}$." and probs[1].answer == r"\frac{1}{2}"
    assert probs[0].source == "math500" and probs[0].meta["level"] == 1
    assert probs[0].meta["subject"] == "Prealgebra"
    assert load_dataset("math500", path=path, n=1) == probs[:1]
    # a folder resolves to test.jsonl
    _write_jsonl(tmp_path / "test.jsonl", MATH_ROWS)
    assert len(load_math500(tmp_path)) == 2


def test_load_gsm8k_local_jsonl(tmp_path):
    path = _write_jsonl(tmp_path / "gsm8k_test.jsonl", GSM_ROWS)
    probs = load_gsm8k(path)
    assert [p.answer for p in probs] == ["7", "1234"]
    assert [p.id for p in probs] == ["gsm8k-test-0", "gsm8k-test-1"]
    assert probs[1].meta["solution"].endswith("#### 1,234")
    assert probs[0].source == "gsm8k"
    assert load_dataset("gsm8k", path=path)[1].question.startswith("A car costs")


def test_local_jsonl_errors_name_the_format(tmp_path):
    bad = _write_jsonl(tmp_path / "bad.jsonl", [{"question": "q", "answer": "no marker"}])
    with pytest.raises(ValueError, match="####"):
        load_gsm8k(bad)
    wrong = _write_jsonl(tmp_path / "wrong.jsonl", [{"question": "q", "answer": "1"}])
    with pytest.raises(ValueError, match="'problem'"):
        load_math500(wrong)
    with pytest.raises(FileNotFoundError):
        load_math500(tmp_path / "missing.jsonl")


@pytest.mark.parametrize("loader", [load_math500, load_gsm8k])
def test_offline_hub_load_fails_fast_with_local_route(loader, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("LENS_STEER_MATH500_PATH", raising=False)
    monkeypatch.delenv("LENS_STEER_GSM8K_PATH", raising=False)
    t0 = time.perf_counter()
    with pytest.raises(DatasetUnavailableError) as exc:
        loader()
    assert time.perf_counter() - t0 < 2.0
    msg = str(exc.value)
    assert "local-JSONL" in msg and "path=" in msg and "HF_HUB_OFFLINE" in msg


def test_unreachable_hub_fails_fast(monkeypatch):
    """Not flagged offline, `datasets` importable, but no connection: still fast and clear."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE",
                "LENS_STEER_MATH500_PATH"):
        monkeypatch.delenv(var, raising=False)
    fake = types.ModuleType("datasets")
    fake.load_dataset = lambda *a, **k: pytest.fail("must not be called when unreachable")
    monkeypatch.setitem(sys.modules, "datasets", fake)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: refused at once
    monkeypatch.setattr(ds_mod, "_HUB_CONNECT_TIMEOUT_S", 0.5)
    t0 = time.perf_counter()
    with pytest.raises(DatasetUnavailableError, match="unreachable.*local-JSONL"):
        load_math500()
    assert time.perf_counter() - t0 < 2.0


def test_hub_probe_times_out_quickly():
    t0 = time.perf_counter()
    assert ds_mod._hub_reachable(0.3) in (True, False)
    assert time.perf_counter() - t0 < 1.0


def test_load_toy_and_toy_template():
    pytest.importorskip("lens_steer.toy.problems")
    probs = load_dataset("toy", n=3, seed=0)
    assert len(probs) == 3 and probs == load_dataset("toy", n=3, seed=0)
    p = probs[0]
    assert p.source == "toy" and p.id == "toy-0-0"
    assert format_prompt(p, "toy") == p.meta["prompt"]
    assert p.question in p.meta["prompt"]
    json.dumps([q.to_dict() for q in probs])  # serialisable


def test_format_prompt_templates():
    p = Problem(id="p1", question="What is 2+2?", answer="4", source="math500")
    assert format_prompt(p, "raw") == "What is 2+2?"
    assert format_prompt(p, "r1") == (
        "<｜begin▁of▁sentence｜><｜User｜>What is 2+2?\nPlease reason step by step, and put your "
        "final answer within \\boxed{}.<｜Assistant｜><think>\n")
    assert format_prompt(p, "Q ({id}): {problem}\nA: \\boxed{}") == \
        "Q (p1): What is 2+2?\nA: \\boxed{}"
    assert format_prompt("plain text", "{question}!") == "plain text!"
    assert "qwen" in TEMPLATES
    with pytest.raises(ValueError, match="unknown template"):
        format_prompt(p, "llama")
    with pytest.raises(ValueError, match="toy"):
        format_prompt(p, "toy")


# ----------------------------------------------------------------------------- metrics

def _gsm_problems():
    return [Problem(id=f"g{i}", question=f"q{i}", answer=a, source="gsm8k")
            for i, a in enumerate(["7", "1234", "5"])]


TEXTS = [
    "Let me start.\n\nFirst add 3 and 4.\n\nWait, let me check: 7.\n\nAlternatively count."
    "</think>\n\nSo \\boxed{7}.",
    "Plan.\n\nCompute 1200+34.</think>\n\nThe answer is 1,234.",
    "Plan.\n\nHmm, wait, maybe 6.\n\nSo it is 6.</think>\n\n\\boxed{6}",
]


def test_score_and_summarize():
    recs = score_generations(_gsm_problems(), TEXTS, [10, 20, 60], "gsm8k")
    assert [r.predicted for r in recs] == ["7", "1,234", "6"]  # numeric_match drops commas
    assert [r.correct for r in recs] == [True, True, False]
    from lens_steer.thoughts import label_thought, split_thoughts

    for r, t in zip(recs, TEXTS, strict=True):  # labels are the teammate module's, verbatim
        assert r.thought_labels == [label_thought(x) for x in split_thoughts(t)]
    assert recs[0].thought_labels == ["execution", "reflection", "transition"]
    assert recs[1].thought_labels == ["execution"]
    s = summarize(recs, wall_time_s=4.5)
    assert s["n"] == 3 and s["accuracy"] == pytest.approx(2 / 3) and s["n_correct"] == 2
    assert s["mean_tokens"] == pytest.approx(30.0) and s["median_tokens"] == 20.0
    assert s["total_tokens"] == 90 and s["tokens_per_s"] == pytest.approx(20.0)
    assert s["wall_time_s"] == 4.5 and s["n_no_answer"] == 0
    expect = {k: sum(r.thought_counts[k] for r in recs) / 3
              for k in ("execution", "reflection", "transition")}
    for k, v in expect.items():
        assert s["thoughts_per_trace"][k] == pytest.approx(v)
    assert s["thoughts_per_trace"]["execution"] == pytest.approx(
        (1 + 1 + recs[2].thought_counts["execution"]) / 3)
    bc = s["by_correctness"]
    assert bc["correct"]["n"] == 2 and bc["incorrect"]["n"] == 1
    assert bc["correct"]["mean_tokens"] == 15.0 and bc["incorrect"]["mean_tokens"] == 60.0
    assert bc["correct"]["thoughts_per_trace"]["reflection"] == pytest.approx(0.5)
    assert bc["incorrect"]["thoughts_per_trace"]["reflection"] == pytest.approx(
        recs[2].thought_counts["reflection"])
    json.dumps(s)  # valid JSON, no NaN


def test_score_with_a_custom_labeler():
    """Thought labels come from the labeler passed in, over lens_steer.thoughts' split."""
    recs = score_generations(_gsm_problems()[:1], ["a\n\nWait\n\nb \\boxed{7}"], [3], "gsm8k",
                             labeler=lambda t: "reflection" if t.startswith("W") else "execution")
    assert recs[0].thought_labels == ["reflection", "execution"]
    assert recs[0].thought_counts == {"execution": 1, "reflection": 1, "transition": 0}


def test_summarize_edge_cases():
    s = summarize([])
    assert s["n"] == 0 and s["accuracy"] is None and s["tokens_per_s"] is None
    assert s["by_correctness"]["correct"]["mean_tokens"] is None
    with pytest.raises(ValueError, match="lengths differ"):
        score_generations(_gsm_problems(), TEXTS[:2], [1, 2], "gsm8k")
    recs = score_generations(_gsm_problems()[:1], ["no idea"], [4], "gsm8k")
    assert recs[0].predicted is None and recs[0].correct is False
    assert summarize(recs)["n_no_answer"] == 1


def test_records_jsonl_roundtrip(tmp_path):
    recs = score_generations(_gsm_problems(), TEXTS, [10, 20, 60], "gsm8k",
                             finish_reasons=["eos", "eos", "length"])
    path = write_records(tmp_path / "run" / "records.jsonl", recs)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["correct"] for r in rows] == [True, True, False]
    assert rows[2]["finish_reason"] == "length" and rows[0]["gold"] == "7"
    back = read_records(path)
    assert back == recs and isinstance(back[0], Record)
    assert summarize(rows) == summarize(recs)  # dict rows summarise the same


def test_run_eval_with_fake_backend(tmp_path):
    from lens_steer.eval import run_eval

    class FakeResult:
        def __init__(self, prompts):
            self.texts = [TEXTS[i % 3] for i in range(len(prompts))]
            self.n_generated = [5] * len(prompts)
            self.finish_reasons = ["eos"] * len(prompts)

    class FakeBackend:
        def __init__(self):
            self.prompts = None

        def generate(self, prompts, config=None, interventions=(), progress=False):
            self.prompts = list(prompts)
            return FakeResult(prompts)

    be = FakeBackend()
    recs, summary = run_eval(be, _gsm_problems(), "gsm8k", template="r1", out_dir=tmp_path)
    assert be.prompts[0].startswith("<｜begin▁of▁sentence｜><｜User｜>q0\n")
    assert summary["accuracy"] == pytest.approx(2 / 3) and summary["total_tokens"] == 15
    assert summary["dataset"] == "gsm8k" and summary["template"] == "r1"
    assert (tmp_path / "records.jsonl").is_file()
    assert json.loads((tmp_path / "summary.json").read_text())["n"] == 3
