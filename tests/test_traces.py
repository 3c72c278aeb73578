"""Traces as JSONL (issue 18.3): read/write with file:line errors, selections, no-delimiter error,
and SEAL's first-N balance taken in trace order (not the cache's longest-first order)."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest

from lens_steer.errors import ConfigError, DataError
from lens_steer.steering.seal import _balanced_index
from lens_steer.traces import Trace, check_thoughts, read_traces, select_traces, write_traces

QWEN2 = "/work/shared/data/tokenizers/qwen2"


def _traces(pattern: str) -> list[Trace]:
    return [Trace("Q: ", f"<think>\nA{i}.\n\nB{i}.\n\n</think> {i}", c == "1", f"t{i}")
            for i, c in enumerate(pattern)]


def test_round_trip_and_blank_lines_survive(tmp_path):
    ts = _traces("1010")
    p = write_traces(tmp_path / "t.jsonl", ts)
    back = read_traces(p)
    assert [t.to_dict() for t in back] == [t.to_dict() for t in ts]
    assert "\n\n" in back[0].text and back[1].where.endswith("t.jsonl:2")
    assert "id" not in Trace("p", "r").to_dict()


@pytest.mark.parametrize("line,match", [
    ('{"prompt": "p", "response": ', r"t.jsonl:2: not valid JSON"),
    ('{"prompt": "p"}', r"t.jsonl:2: missing field\(s\) \['response'\]"),
    ('{"prompt": "p", "response": "r", "correct": "yes"}', r"t.jsonl:2: 'correct' must be"),
    ('{"prompt": "p", "response": "r", "answer": 1}', r"t.jsonl:2: unknown field"),
    ('[1, 2]', r"t.jsonl:2: expected a JSON object"),
])
def test_errors_name_file_and_line(tmp_path, line, match):
    p = tmp_path / "t.jsonl"
    p.write_text('{"prompt": "p", "response": "r", "correct": true}\n' + line + "\n")
    with pytest.raises(DataError, match=match):
        read_traces(p)


def test_plain_text_traces_get_a_hint(tmp_path):
    p = tmp_path / "traces.txt"
    p.write_text("<think> one trace per line </think>\n")
    with pytest.raises(DataError, match="one trace per line"):
        read_traces(p)


def test_selections():
    ts = _traces("1101001100")  # correct at 0,1,3,6,7; incorrect at 2,4,5,8,9
    assert [t.id for t in select_traces(ts, "first", 2)] == ["t0", "t1", "t2", "t4"]
    assert select_traces(ts, "all") == ts
    bal = select_traces(ts, "balanced", 3, seed=1)
    assert sum(t.correct for t in bal) == 3 and len(bal) == 6
    assert bal == select_traces(ts, "balanced", 3, seed=1)  # seeded
    with pytest.raises(ConfigError):
        select_traces(ts, "longest")
    with pytest.raises(DataError, match="correct=null"):
        select_traces([Trace("p", "r")], "first", 1)


def test_balance_takes_first_traces_not_longest():
    # cache rows are written longest trace first: trace_index keeps the input order
    rows = []
    for k, (tid, idx, ok) in enumerate([("long-wrong", 3, False), ("long-right", 2, True),
                                        ("first-right", 0, True), ("first-wrong", 1, False)]):
        rows += [{"trace_id": tid, "trace_index": idx, "correct": ok, "order": k}] * 2
    keep = _balanced_index(SimpleNamespace(metadata=rows), 1)
    assert {rows[i]["trace_id"] for i in keep} == {"first-right", "first-wrong"}
    assert len(_balanced_index(SimpleNamespace(metadata=rows))) == 8  # default: min class size


@pytest.mark.skipif(not os.path.isdir(QWEN2), reason="needs ../shared/data/tokenizers/qwen2")
def test_trace_without_delimiter_is_a_clear_error(tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(QWEN2)
    p = tmp_path / "t.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "Q", "response": "A.\n\nB.\n\nC.", "correct": True},
        {"prompt": "Q", "response": "all on one line", "correct": False}]) + "\n")
    ts = read_traces(p)
    with pytest.raises(DataError, match=r"t.jsonl:2: the trace holds no"):
        check_thoughts(ts, tok, think_only=False)
    assert check_thoughts(ts[:1], tok, think_only=False) == [2]
