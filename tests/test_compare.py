"""`lens-steer compare`: cells keyed by settings, table numbers, Pareto front, code datasets."""

from __future__ import annotations

import json

import pytest

from experiments import compare as C
from experiments.config import build_config
from lens_steer.errors import ConfigError


def cfg(**flags):
    base = {"n_eval": 6, "n_extract": 4, "max_new_tokens": 200, "threads": 1,
            "methods": ["base", "b16=budget", "deer"],
            "method_options": ["b16.budget=16", "deer.triggers=\\n\\n"]}
    return build_config(C.CompareConfig, flags={**base, **flags})


def test_method_specs_labels_options_and_errors():
    specs = C.method_specs(cfg())
    assert specs["b16"] == ("budget", {"budget": 16})
    assert specs["deer"] == ("deer", {"triggers": ("\n\n",)})
    with pytest.raises(ConfigError, match="unknown method"):
        C.method_specs(cfg(methods=["nope"]))
    with pytest.raises(ConfigError, match="no option"):
        C.method_specs(cfg(method_options=["b16.budgt=3"]))
    with pytest.raises(ConfigError, match="twice"):
        C.method_specs(cfg(methods=["base", "base"]))


def test_pareto_and_tokens_saved_per_point():
    base = {"method": "base", "accuracy": 0.8, "mean_tokens": 100.0}
    cheap = {"method": "cheap", "accuracy": 0.7, "mean_tokens": 40.0}
    worse = {"method": "worse", "accuracy": 0.6, "mean_tokens": 50.0}
    free = {"method": "free", "accuracy": 0.8, "mean_tokens": 90.0}
    cells = [base, cheap, worse, free]
    assert [c["method"] for c in C.pareto(cells)] == ["cheap", "free"]
    assert C.saved_per_point(cheap, base) == "6.0"  # 60 tokens for 10 points
    assert C.saved_per_point(free, base) == "no loss"
    assert C.saved_per_point({"accuracy": 0.9, "mean_tokens": 120.0}, base) == "costs more"
    assert C.saved_per_point(base, base) == "-"


def test_compare_on_toy_resumes_by_settings(tmp_path, monkeypatch):
    out = C.run_compare(cfg(), tmp_path / "run")
    metrics = json.loads((out / "metrics.json").read_text())
    cells = {c["method"]: c for c in metrics["cells"]}
    assert set(cells) == {"base", "b16", "deer"}
    assert cells["b16"]["mean_thinking_tokens"] <= 16
    assert cells["base"]["mean_trial_tokens"] == 0
    assert cells["deer"]["mean_trial_tokens"] > 0  # every probe answer is paid for
    for c in cells.values():
        assert c["mean_tokens"] == pytest.approx(c["mean_thinking_tokens"]
                                                 + c["mean_answer_tokens"]
                                                 + c["mean_trial_tokens"])
        assert c["n"] == 6 and 0 <= c["accuracy"] <= 1
    rows = [json.loads(x) for x in (out / "cells" / "b16__toy.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [r["id"] for r in map(json.loads, (
        out / "cells" / "base__toy.jsonl").read_text().splitlines())]  # same problems
    assert (out / "compare.png").stat().st_size > 0 and "| b16 |" in (out / "report.md"
                                                                        ).read_text()
    calls = []
    real_cell = C._cell
    monkeypatch.setattr(C, "_cell", lambda *a, **k: calls.append(a[3]) or real_cell(*a, **k))
    C.run_compare(cfg(), tmp_path / "run")
    assert calls == []  # same settings: every cell reused
    C.run_compare(cfg(method_options=["b16.budget=8", "deer.triggers=\\n\\n"]),
                  tmp_path / "run")
    assert calls == ["b16"]  # only the cell whose option changed
    again = json.loads((out / "metrics.json").read_text())
    assert {c["method"]: c for c in again["cells"]}["b16"]["mean_thinking_tokens"] <= 8


def test_compare_grades_code_through_the_sandbox(tmp_path):
    c = cfg(datasets=["livecodebench=mini"], methods=["base"], n_extract=0, n_eval=3,
            max_new_tokens=6, samples=2, temperature=1.0)
    out = C.run_compare(c, tmp_path / "code")
    (cell,) = json.loads((out / "metrics.json").read_text())["cells"]
    assert cell["dataset"] == "livecodebench" and cell["n"] == 3
    rows = [json.loads(x) for x in (out / "cells" / "base__livecodebench.jsonl").read_text()
            .splitlines()]
    assert all(r["meta"]["exec"]["status"] == "no_code" for r in rows)  # the toy writes no code
    assert cell["accuracy"] == 0.0 and cell["pass@2"] == 0.0 and len(rows) == 6
    assert sorted({r["sample"] for r in rows}) == [0, 1]
