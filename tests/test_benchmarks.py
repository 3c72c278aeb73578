"""The GPU benchmark (`python -m benchmarks.run --device cuda`) dry-runs on CPU at `--quick` size."""

from __future__ import annotations

import re
import time

import pytest
import torch

from benchmarks import gpu
from benchmarks.run import main


def test_quick_dry_run_writes_every_table(tmp_path):
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\n<!-- bench:cache -->\nkept\n<!-- /bench:cache -->\n")
    assert main(["--device", "cpu", "--quick", "--doc", str(doc)]) == 0
    text = doc.read_text()
    assert "kept" in text  # other sections stay
    section = text.split("<!-- bench:gpu -->")[1].split("<!-- /bench:gpu -->")[0]
    assert "Device: **CPU" in section
    generation = section.split("### per-thought")[0]
    gen = re.findall(r"^\| tiny \(quick dry run\) \| (\S[^|]*?) \| (\S+) \| (\d+) \| (\d+) \| "
                     r"[\d.]+ \| ([\d.]+) \|", generation, re.M)
    cells = {(runner, steered, int(batch)) for runner, steered, batch, _, _ in gen}
    assert cells == {("HF generate", "—", b) for b in (1, 2)} | {
        (r, s, b) for r in gpu.BACKENDS for s in ("no", "ASC") for b in (1, 2)}
    assert all(int(tokens) == 4 and float(tps) > 0 for *_, tokens, tps in gen)
    for backend in gpu.BACKENDS:  # caching and calibration rows with positive times
        assert re.search(rf"^\| tiny \(quick dry run\) \| {backend} \| 2 \| \d+ \| [1-9]\d* \| "
                         r"[\d.]+ \| [1-9]", section, re.M)
        per_state = re.search(rf"^\| tiny \(quick dry run\) \| {backend} \| 1 \| ([\d.]+) \|$",
                              section, re.M)
        assert per_state and float(per_state[1]) > 0, section


def _row():
    return {"model": "m", "runner": "r", "steered": "no", "batch": 128}


@pytest.mark.parametrize("err, shown", [
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), "OOM"),
    (ValueError("something else"), "error: ValueError")])
def test_a_failed_cell_is_recorded_not_raised(err, shown):
    def run(n: int) -> None:
        raise err

    res, clock = gpu.Results(), gpu.Clock(time.perf_counter() + 60, 2)
    gpu._cell(res, clock, torch.device("cpu"), _row(), run, gpu.make_plan("cpu", quick=True))
    assert res.gen[0]["tok_s"] == shown and clock.units_left == 1
    table = gpu.render(res, gpu.make_plan("cpu", True), torch.device("cpu"), torch.float32, 1.0)
    assert f"| m | r | no | 128 | 0 | nan | {shown} | — |" in table


def test_a_cell_shortens_to_its_share_of_the_budget():
    plan = gpu.Plan(models={}, new_tokens=1000, probe_tokens=2)

    def run(n: int) -> None:
        time.sleep(0.01 * n)  # 10 ms a token

    res, clock = gpu.Results(), gpu.Clock(time.perf_counter() + 0.2, 1)
    gpu._cell(res, clock, torch.device("cpu"), _row(), run, plan)
    assert 2 <= res.gen[0]["tokens"] < 30  # ~0.18 s left / 10 ms, far below 1000
