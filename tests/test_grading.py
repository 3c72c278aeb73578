"""Grading protocols, the misses of issue 18, bounded sympy work (issue 16.5), unfinished traces."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from lens_steer.errors import ConfigError, DataError
from lens_steer.eval import Problem, is_equiv, read_records, score_generations, summarize
from lens_steer.eval.answers import extract_answer, extract_boxed
from lens_steer.eval.datasets import answer_checker
from lens_steer.eval.grading import Grading, grade

MATH500 = Path("/work/shared/data/benchmarks/math500_test.jsonl")


@pytest.mark.parametrize("pred,gold", [
    (r"\text{Ellipse}", r"\text{ellipse}"),
    (r"6\, \text{Trinkets}", "6"),
    ("864", r"864 \mbox{ inches}^2"),
    (r"12 \text{ square feet}", "12"),
    (r"\binom{5}{2}", "10"),
    (r"\dbinom{6}{3}", "20"),
    ("5!", "120"),
    (r"\begin{pmatrix} \dfrac{1}{2} \\ -\dfrac{3}{4} \end{pmatrix}",
     r"\begin{pmatrix} 1/2 \\ -3/4 \end{pmatrix}"),
])
def test_issue_misses_now_match(pred, gold):
    assert is_equiv(pred, gold)


@pytest.mark.parametrize("pred,gold", [
    ("5x", "5"),                     # a number followed by a variable is not a unit
    ("2 and 3", "2"),                # "and" is not a unit
    ("x", "X"),                      # single letters keep their case (variables, choices)
    (r"\text{Parabola}", r"\text{ellipse}"),
    (r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}", r"\begin{pmatrix} 1 & 2 \end{pmatrix}"),
    (r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}", r"\begin{pmatrix} 1 \\ 3 \end{pmatrix}"),
])
def test_no_false_positives(pred, gold):
    assert not is_equiv(pred, gold)


def test_answer_line_is_extracted():
    assert extract_answer("Some work.\n**Answer:** Billy sold 7 DVDs.") == "7"
    assert extract_answer("Final Answer: $\\frac{1}{2}$") == "\\frac{1}{2}"
    assert extract_answer("### Final answer: 12") == "12"


@pytest.mark.parametrize("pred,gold", [
    ("(9999^{9999})^{9999}", "1"),
    ("9^{9^{9}}", "9"),
    ("2^{2^{2^{2^{2^{2}}}}}", "2"),
    ("100000!", "1"),
    (r"\frac{(10^{10^{6}})}{3}", "1"),
    ("(" * 80 + "1" + ")" * 80, "1"),
    ("(x+1)^{100000}", "x"),
    ("10^{10^{10}}-10^{10^{10}}", "0"),
    (r"\binom{10^{7}}{5000000}", "1"),
    (r"\binom{2000000}{1000000}", "1"),
    ("(10^{6})!", "1"),
])
def test_adversarial_answers_are_not_equal_and_fast(pred, gold, caplog):
    is_equiv("1", "1")  # sympy imported outside the timing
    t0 = time.perf_counter()
    assert not is_equiv(pred, gold)
    assert time.perf_counter() - t0 < 1.0


def test_budget_stops_slow_comparisons(caplog):
    slow = "(x+1)^{60}(y+2)^{40}(z+3)^{20}"
    with caplog.at_level("INFO", logger="lens_steer.eval.answers"):
        t0 = time.perf_counter()
        equal = is_equiv(slow, "(x+1)^{60}(y+2)^{40}(z+3)^{20}+1", budget_s=0.05)
        took = time.perf_counter() - t0
    assert not equal and took < 1.0


def test_reason_is_logged(caplog):
    with caplog.at_level("INFO", logger="lens_steer.eval.answers"):
        assert not is_equiv("(9997^{9999})^{9999}", "1")  # not seen before (parses are cached)
    assert "digits" in caplog.text


# ----------------------------------------------------------------------------- protocols

def _math(gold: str) -> list[Problem]:
    return [Problem(id="p", question="q", answer=gold, source="math500")]


def test_official_reads_the_last_box_of_the_whole_output():
    text = "<think>\nI think \\boxed{3}\n</think>\nThe answer is 4."
    pred, ok = grade(text, "3", answer_checker("math500"), "official")
    assert pred == "3" and ok
    pred, ok = grade("<think>x</think> The answer is 4.", "4", answer_checker("math500"),
                     "official")
    assert pred is None and not ok  # no box: wrong, as in the papers' parser
    pred, ok = grade("<think>x</think> The answer is 4.", "4", answer_checker("math500"),
                     "lenient")
    assert ok


def test_several_boxes_read_as_a_set_when_gold_is_a_list():
    text = "<think>\n...\n</think>\nThe roots are $\\boxed{1}$ and $\\boxed{-2}$."
    assert grade(text, "-2, 1", answer_checker("math500"), "lenient")[1]
    assert not grade(text, "-2, 1", answer_checker("math500"), "official")[1]
    assert not grade(text, "1", answer_checker("math500"), "lenient")[1]  # gold not a list
    assert not grade(text, "-2, 1, 3", answer_checker("math500"), "lenient")[1]


def test_unfinished_traces_are_wrong_by_default_and_reported():
    probs = _math("5") * 3
    texts = ["<think>\nso the answer is 5\n\nWait", "<think>\nok\n</think>\n\\boxed{5}",
             "<think>\nok\n</think>\n\\boxed{6}"]
    reasons = ["length", "eos", "eos"]
    recs = score_generations(probs, texts, [10, 5, 5], "math500", finish_reasons=reasons)
    assert [r.correct for r in recs] == [False, True, False]
    assert [r.finished for r in recs] == [False, True, True]
    s = summarize(recs)
    assert s["accuracy"] == pytest.approx(1 / 3)
    assert s["accuracy_finished"] == pytest.approx(1 / 2)
    assert s["n_unfinished"] == 1 and s["unfinished_share"] == pytest.approx(1 / 3)
    assert s["grading"] == {"protocol": "lenient", "unfinished": "wrong"}
    graded = score_generations(probs, texts, [10, 5, 5], "math500", finish_reasons=reasons,
                               grading=Grading("lenient", "graded"))
    assert summarize(graded)["accuracy"] == pytest.approx(2 / 3)  # the mid-reasoning answer
    official = summarize(score_generations(probs, texts, [10, 5, 5], "math500",
                                           finish_reasons=reasons, grading="official"))
    assert official["grading"]["protocol"] == "official"
    assert json.dumps(official)  # metrics.json-ready


def test_unknown_protocol_is_a_config_error():
    with pytest.raises(ConfigError, match="official"):
        Grading("strict")


def test_broken_records_file_names_file_and_line(tmp_path):
    p = tmp_path / "records.jsonl"
    p.write_text('{"id": "a", "question": "q", "gold": "1", "generated_text": "", '
                 '"predicted": null, "correct": false, "n_tokens": 1}\n{broken\n')
    with pytest.raises(DataError, match=r"records.jsonl:2"):
        read_records(p)


@pytest.mark.skipif(not MATH500.exists(), reason="needs ../shared/data/benchmarks/math500")
def test_math500_solutions_grade_equal_to_their_answers():
    rows = [json.loads(line) for line in MATH500.read_text().splitlines() if line.strip()]
    misses = [r["unique_id"] for r in rows if not is_equiv(extract_boxed(r["solution"]),
                                                           r["answer"])]
    assert len(rows) == 500 and misses == []
    # and no false positive against the next problem's answer (where the answers differ)
    fp = [(r["answer"], s["answer"]) for r, s in zip(rows, rows[1:], strict=False)
          if r["answer"].strip() != s["answer"].strip()
          and is_equiv(extract_boxed(r["solution"]), s["answer"])]
    assert len(fp) <= 3, fp


def test_broken_dataset_line_names_file_and_line(tmp_path):
    from lens_steer.eval import load_math500

    p = tmp_path / "m.jsonl"
    p.write_text('{"problem": "1+1", "answer": "2"}\n{"problem": "x", "answer": \n')
    with pytest.raises(DataError, match=r"m.jsonl:2: not valid JSON"):
        load_math500(p)
    p.write_text('[{"problem": "1+1", "answer": "2"},\n {"problem": }]')
    with pytest.raises(DataError, match=r"m.jsonl:2:"):
        load_math500(p)


def test_datasets_are_registered():
    from lens_steer.registry import DATASETS

    assert {"math500", "gsm8k", "toy"} <= set(DATASETS.names())
    assert len(DATASETS.get("toy")(n=3)) == 3


def test_run_eval_writes_the_grading_into_its_summary(tmp_path):
    from types import SimpleNamespace

    from lens_steer.eval import run_eval

    texts = ["<think>\nthe answer is 5\n\nWait", "<think>\nok\n</think>\n\\boxed{5}"]

    class Backend:
        def generate(self, prompts, config=None, interventions=(), progress=False):
            return SimpleNamespace(texts=texts, n_generated=[9, 4],
                                   finish_reasons=["length", "eos"])

    _, summary = run_eval(Backend(), _math("5") * 2, "math500", grading="official",
                          out_dir=tmp_path)
    written = json.loads((tmp_path / "summary.json").read_text())
    for s in (summary, written):
        assert s["grading"] == {"protocol": "official", "unfinished": "wrong"}
        assert s["accuracy"] == 0.5 and s["accuracy_finished"] == 1.0
        assert s["unfinished_share"] == 0.5
