"""Every study runs end to end with a tiny config and writes a valid run folder; resume works."""

from __future__ import annotations

import dataclasses
import json

import pytest

from lens_steer.toy import TOY_MODEL_DIR
from tests.conftest import loaded

TINY = dict(n_extract=6, n_eval=3, max_new_tokens=96, batch_size=8)


@pytest.fixture(scope="session")
def toy():
    if not (TOY_MODEL_DIR / "config.json").exists():
        pytest.skip("the shipped toy model is missing (lens-steer toy train)")
    return loaded(TOY_MODEL_DIR, "nnsight")


def _valid_run(path, *keys):
    for name in ("config.json", "metrics.json", "records.jsonl", "report.md"):
        assert (path / name).exists(), name
    metrics = json.loads((path / "metrics.json").read_text())
    for k in keys:
        assert k in metrics, k
    assert list(path.glob("*.png")) or list(path.glob("*/*.png"))
    report = (path / "report.md").read_text()
    for img in [line.split("(")[1].rstrip(")") for line in report.splitlines()
                if line.startswith("![")]:
        assert (path / img).exists(), f"report links a missing image {img}"
    return metrics


def test_layer_sweep_runs_and_resumes(toy, tmp_path, monkeypatch):
    from experiments.layer_sweep import LayerSweepConfig, run_layer_sweep

    cfg = LayerSweepConfig(model=str(TOY_MODEL_DIR), backend="nnsight", layers=[1, 2], **TINY)
    out = run_layer_sweep(cfg, tmp_path / "ls", model=toy)
    m = _valid_run(out, "base", "layers")
    assert [r["layer"] for r in m["layers"]] == [1, 2]

    import lens_steer.eval.runner as runner

    def boom(*a, **k):
        raise AssertionError("finished work was recomputed")

    monkeypatch.setattr(runner, "run_eval", boom)
    run_layer_sweep(cfg, tmp_path / "ls", model=toy)  # everything is done: nothing re-runs

    from experiments.demo import DemoConfig, run_demo
    from lens_steer.errors import ArtifactError

    with pytest.raises(ArtifactError, match="holds a `layer-sweep` run"):
        run_demo(DemoConfig(model=str(TOY_MODEL_DIR), backend="nnsight", **TINY),
                 tmp_path / "ls", model=toy)


def test_alpha_sweep_asc(toy, tmp_path):
    from experiments.alpha_sweep import AlphaSweepConfig, run_alpha_sweep

    cfg = AlphaSweepConfig(model=str(TOY_MODEL_DIR), backend="nnsight", method="asc",
                           strengths=[0.5, 2.0], n_calibration=3, **TINY)
    m = _valid_run(run_alpha_sweep(cfg, tmp_path / "as", model=toy), "strengths")
    assert m["calibrated_gamma"] > 0 and m["gamma_unit"] == m["calibrated_gamma"]
    assert [r["strength"] for r in m["strengths"]] == [0.5, 2.0]
    assert [r["scale"] for r in m["strengths"]] == [0.5 * m["gamma_unit"], 2 * m["gamma_unit"]]

    fixed = dataclasses.replace(cfg, asc_gamma=1.0, strengths=[20.0])
    m = _valid_run(run_alpha_sweep(fixed, tmp_path / "as-fixed", model=toy), "strengths")
    assert m["gamma_unit"] == 1.0 and m["strengths"][0]["scale"] == 20.0
    assert m["gamma_source"].startswith("fixed") and m["calibrated_gamma"] > 0


def test_ablation(toy, tmp_path):
    from experiments.ablation import AblationConfig, run_ablation

    cfg = AblationConfig(model=str(TOY_MODEL_DIR), backend="nnsight", variants=["both"],
                         **TINY)
    m = _valid_run(run_ablation(cfg, tmp_path / "ab", model=toy), "conditions")
    assert {r["placement"] for r in m["conditions"]} == {"delimiter", "every-token"}


def test_transfer(toy, tmp_path):
    from experiments.transfer import TransferConfig, run_transfer

    cfg = TransferConfig(model=str(TOY_MODEL_DIR), backend="nnsight", **TINY)
    m = _valid_run(run_transfer(cfg, tmp_path / "tr", model=toy), "transferred", "in_domain")
    assert m["source"] == "toy:short"


def test_probe_layers(toy, tmp_path):
    from experiments.probe_layers import ProbeLayersConfig, run_probe_layers

    cfg = ProbeLayersConfig(model=str(TOY_MODEL_DIR), backend="nnsight", n_folds=2, tsne=False,
                            **TINY)
    m = _valid_run(run_probe_layers(cfg, tmp_path / "pl", model=toy), "probes")
    assert len(m["probes"]["layers"]) == toy.n_layers


def test_config_file_reproduces_a_run(tmp_path):
    """A run folder's config.json fed back through --config gives the same resolved config."""
    import argparse

    from experiments.config import add_config_arguments, resolve_config
    from experiments.layer_sweep import LayerSweepConfig
    from experiments.run_folder import RunFolder
    from lens_steer.errors import ConfigError

    cfg = LayerSweepConfig(n_eval=7, layers=[0, 3], method="asc")
    RunFolder(tmp_path).write_config(cfg, "layer-sweep")
    p = argparse.ArgumentParser()
    add_config_arguments(p, LayerSweepConfig)
    again = resolve_config(LayerSweepConfig, p.parse_args(["--config", str(tmp_path /
                                                                           "config.json")]))
    assert again == cfg
    override = resolve_config(LayerSweepConfig, p.parse_args(
        ["--config", str(tmp_path / "config.json"), "--n-eval", "9", "--set", "n_extract=5"]))
    assert (override.n_eval, override.n_extract, override.layers) == (9, 5, [0, 3])
    with pytest.raises(ConfigError, match="--method: unknown value 'nope'"):
        LayerSweepConfig(method="nope")


def test_demo_runs_end_to_end_and_resumes(toy, tmp_path, monkeypatch):
    from experiments.demo import DemoConfig, run_demo

    cfg = DemoConfig(model=str(TOY_MODEL_DIR), backend="nnsight", probe_folds=2,
                     n_calibration=3, gamma_grid=[20.0], n_val=3,
                     **{**TINY, "n_extract": 12, "max_new_tokens": 160})
    out = run_demo(cfg, tmp_path / "demo", model=toy)
    m = _valid_run(out, "thoughts", "probes", "seal", "asc")
    assert m["seal"]["base"]["n"] == 3 and 0 <= m["probes"]["best_layer"] < toy.n_layers
    assert set(m["asc"]["validation"]) == {"base", "20"}
    assert m["asc"]["gamma"] > 0 and m["asc"]["steered"]["n"] == 3

    import lens_steer.eval.runner as runner

    def boom(*a, **k):
        raise AssertionError("finished work was recomputed")

    monkeypatch.setattr(runner, "run_eval", boom)
    assert run_demo(cfg, tmp_path / "demo", model=toy) == out


class _Counter:
    """Counts `run_eval` calls (by problem count) and can simulate a kill at call `kill_at`."""

    def __init__(self, monkeypatch, kill_at: int | None = None):
        import lens_steer.eval.runner as runner

        self.calls: list[int] = []
        real = runner.run_eval

        def counted(model, problems, *a, **k):
            self.calls.append(len(problems))
            if kill_at is not None and len(self.calls) == kill_at:
                raise KeyboardInterrupt("simulated kill")
            return real(model, problems, *a, **k)

        monkeypatch.setattr(runner, "run_eval", counted)


def test_alpha_sweep_recomputes_what_changed(toy, tmp_path, monkeypatch, capsys):
    """Another --layer: base reused, steered points recomputed; another --n-eval: all re-run;
    the config and metrics always describe the results beside them."""
    from experiments.alpha_sweep import AlphaSweepConfig, run_alpha_sweep

    out = tmp_path / "as"
    cfg = AlphaSweepConfig(model=str(TOY_MODEL_DIR), backend="nnsight", method="asc",
                           strengths=[2.0], n_calibration=2, layer=3, **TINY)
    run_alpha_sweep(cfg, out, model=toy)
    first = json.loads((out / "metrics.json").read_text())

    count = _Counter(monkeypatch)
    other = dataclasses.replace(cfg, layer=1)
    run_alpha_sweep(other, out, model=toy)
    assert count.calls == [3]  # only the steered point: base is the same evaluation
    m = json.loads((out / "metrics.json").read_text())
    assert m["layer"] == 1 and first["layer"] == 3 and m["base"] == first["base"]
    assert json.loads((out / "config.json").read_text())["layer"] == 1
    assert "settings changed (layer" in capsys.readouterr().out

    count.calls.clear()
    run_alpha_sweep(dataclasses.replace(other, n_eval=2), out, model=toy)
    assert count.calls == [2, 2]
    m = json.loads((out / "metrics.json").read_text())
    assert m["base"]["n"] == 2 and len((out / "records.jsonl").read_text().splitlines()) == 4


def test_seal_resumes_after_a_kill(toy, tmp_path, monkeypatch):
    from experiments.seal import SealStudyConfig, run_seal

    out = tmp_path / "seal"
    cfg = SealStudyConfig(model=str(TOY_MODEL_DIR), backend="nnsight", speed_prompts=0,
                          **TINY)
    with monkeypatch.context() as mp:
        killed = _Counter(mp, kill_at=3)  # extraction, base, then killed while steering
        with pytest.raises(KeyboardInterrupt):
            run_seal(cfg, out, model=toy)
    assert killed.calls == [6, 3, 3] and not (out / "metrics.json").exists()
    count = _Counter(monkeypatch)
    run_seal(cfg, out, model=toy)
    assert count.calls == [3, 3]  # steered and penalty only
    m = _valid_run(out, "base", "steered", "penalty", "changes")
    assert m["base"]["n"] == 3 and m["vector"]["layer"] == 3


def test_asc_study(toy, tmp_path):
    from experiments.asc import AscStudyConfig, run_asc

    cfg = AscStudyConfig(model=str(TOY_MODEL_DIR), backend="nnsight", n_calibration=2,
                         n_heldout_states=2, gamma_grid=[20.0], n_val=3, speed_prompts=0,
                         **TINY)
    m = _valid_run(run_asc(cfg, tmp_path / "asc", model=toy), "base", "steered", "calibration")
    assert m["calibration"]["gamma"] > 0 and set(m["gamma_grid"]) == {"base", "20"}
    assert m["gamma"] in (20.0, m["calibration"]["gamma"]) and m["steered"]["n"] == 3


def test_seal_traces_file_takes_the_first_n_per_class(toy, tmp_path):
    """`--traces` JSONL with a "first" selection keeps the first n correct and n incorrect
    traces in file order (the SEAL paper's 500 + 500), whatever their length."""
    from experiments.seal import SealStudyConfig, run_seal
    from lens_steer.toy.problems import generate_problems

    rows = []
    for i, p in enumerate(generate_problems(8, seed=11)):
        rows.append({"prompt": p.prompt, "response": p.verbose_trace, "correct": i % 2 == 0,
                     "id": f"t{i}"})
    path = tmp_path / "traces.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = SealStudyConfig(model=str(TOY_MODEL_DIR), backend="nnsight", speed_prompts=0,
                          traces=str(path), trace_selection="first", traces_per_class=2, **TINY)
    m = json.loads((run_seal(cfg, tmp_path / "run", model=toy) / "metrics.json").read_text())
    data = m["training_data"]
    assert data["n_traces"] == 4 and data["n_correct"] == 2 and data["selection"] == "first"
