"""The `lens-steer` command line: one config mechanism, the same model options everywhere, the
same held-out problems by default, one-line user errors, checks before the first forward."""

from __future__ import annotations

import json

import pytest

from experiments.cli import build_parser, main
from experiments.config import resolve_config

MODEL_COMMANDS = ["seal", "asc", "cache", "probe-layers", "layer-sweep", "alpha-sweep",
                  "ablation", "transfer", "demo"]
MODEL_FLAGS = ["--backend", "nnsight", "--device", "cpu", "--dtype", "bf16", "--device-map",
               '{"": "cpu"}', "--remote", "local", "--remote-decode", "cache",
               "--prefill-chunk", "64"]


@pytest.fixture(scope="module")
def parser():
    return build_parser()


def _config(parser, argv):
    args = parser.parse_args(argv)
    return resolve_config(args._config_cls, args)


@pytest.mark.parametrize("command", MODEL_COMMANDS)
def test_every_model_command_takes_the_same_model_options(parser, command):
    extra = ["--traces", "t.jsonl", "--out", "o"] if command == "cache" else []
    cfg = _config(parser, [command, *MODEL_FLAGS, *extra])
    assert cfg.backend == "nnsight"
    assert cfg.load_options() == {"device": "cpu", "dtype": "bf16", "device_map": {"": "cpu"},
                                  "remote": "local", "remote_decode": "cache",
                                  "prefill_chunk": 64}


def test_default_heldout_problems_are_the_same_for_every_study(parser):
    """seal, asc, demo and the sweeps evaluate exactly the same problems unless told otherwise."""
    from experiments.common import study_splits

    commands = ["seal", "asc", "demo", "layer-sweep", "alpha-sweep", "ablation"]
    splits = {c: study_splits(_config(parser, [c])) for c in commands}
    ref = [(p.id, p.question) for p in splits["demo"].eval]
    assert len(ref) == 200 and len({q for _, q in ref}) == 200
    for c, s in splits.items():
        assert [(p.id, p.question) for p in s.eval] == ref, c
        assert not {p.question for p in s.extract} & {q for _, q in ref}


def test_precedence_defaults_config_set_flags(parser, tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"command": "seal", "n_eval": 7, "layer": 2,
                                                 "alpha": 0.5}))
    cfg = _config(parser, ["seal", "--config", str(tmp_path / "c.json"), "--set", "alpha=2",
                           "--set", "n_eval=8", "--n-eval", "9", "--set", "triggers=a,b"])
    assert (cfg.n_eval, cfg.layer, cfg.alpha, cfg.triggers) == (9, 2, 2.0, ["a", "b"])
    assert cfg.max_new_tokens == 320  # untouched default


def _error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("lens-steer: error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err  # (loading bars may precede it)
    return lines[0]


def test_unknown_config_keys_are_errors(capsys, tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"n_evl": 3}))
    assert "unknown config key 'n_evl'" in _error(capsys, ["seal", "--config",
                                                           str(tmp_path / "c.json")])
    assert "did you mean 'n_eval'" in _error(capsys, ["asc", "--set", "n_evl=3"])
    (tmp_path / "d.json").write_text(json.dumps({"command": "demo"}))
    assert "is a `demo` config" in _error(capsys, ["seal", "--config", str(tmp_path / "d.json")])


@pytest.mark.parametrize(("argv", "message"), [
    (["seal", "--n-train", "0"], "--n-extract (--n-train) must be >= 1"),
    (["asc", "--n-eval", "0"], "--n-eval must be >= 1"),
    (["alpha-sweep", "--strengths", "1", "nan"], "--strengths must be a finite number"),
    (["seal", "--alpha", "inf"], "--alpha must be a finite number"),
    (["asc", "--gamma-grid", "nan"], "--gamma-grid must be a finite number"),
    (["seal", "--device-map", "{bad"], "--device-map is not valid JSON"),
    (["seal", "--config", "missing.json"], "config file missing.json does not exist"),
    (["cache", "--traces", "t", "--out", "o", "--labeler", "nope"], "--labeler: unknown value"),
])
def test_user_errors_are_one_line_exit_2(capsys, argv, message):
    assert message in _error(capsys, argv)


def test_debug_shows_the_traceback():
    from lens_steer.errors import ConfigError

    with pytest.raises(ConfigError, match="--n-eval must be >= 1"):
        main(["--debug", "seal", "--n-eval", "0"])


def test_checks_run_before_the_first_forward(capsys, tmp_path, monkeypatch):
    """`seal --layer 9` on the 4-layer toy and an unwritable --out fail before any generation."""
    from lens_steer.backends.base import ModelBackend

    def no_forward(*a, **k):
        raise AssertionError("generated before validating")

    monkeypatch.setattr(ModelBackend, "generate", no_forward)
    err = _error(capsys, ["seal", "--layer", "9", "--out", str(tmp_path / "s")])
    assert "--layer 9: this model has layers 0..3" in err
    (tmp_path / "file").write_text("")
    assert "is a file" in _error(capsys, ["probe-layers", "--out", str(tmp_path / "file")])
    assert "is a file" in _error(capsys, ["probe", "--cache", "c", "--out",
                                          str(tmp_path / "file")])
    assert "no model directory at" in _error(capsys, ["asc", "--model", str(tmp_path / "none"),
                                                      "--out", str(tmp_path / "a")])


def test_seal_on_nnsight_with_a_cpu_device_map_and_dtype(tiny_qwen2_dir, tmp_path):
    from experiments.common import study_splits
    from experiments.seal import SealStudyConfig

    out = tmp_path / "seal"
    argv = ["seal", "--model", str(tiny_qwen2_dir), "--backend", "nnsight", "--device-map",
            '{"": "cpu"}', "--dtype", "bf16", "--out", str(out), "--n-extract", "6",
            "--n-eval", "2", "--max-new-tokens", "6", "--speed-prompts", "0", "--layer", "1",
            "--trace-source", "reference"]
    assert main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["model_info"]["backend"] == "nnsight"
    assert metrics["model_info"]["dtype"] == "bfloat16"
    config = json.loads((out / "config.json").read_text())
    assert config["device_map"] == '{"": "cpu"}' and config["command"] == "seal"
    cfg = SealStudyConfig(model=str(tiny_qwen2_dir), n_extract=6, n_eval=2)
    assert metrics["problem_ids"] == [p.id for p in study_splits(cfg).eval]
    assert metrics["base"]["n"] == metrics["steered"]["n"] == 2


def test_broken_traces_file_names_the_line(capsys, tmp_path):
    (tmp_path / "t.jsonl").write_text('{"text": "a"}\n{"text": \n')
    err = _error(capsys, ["cache", "--traces", str(tmp_path / "t.jsonl"), "--out",
                          str(tmp_path / "c")])
    assert "t.jsonl, line 2: not valid JSON" in err


def test_toy_eval_writes_traces_the_cache_reads(tmp_path, capsys):
    from lens_steer.io import read_jsonl

    assert main(["toy", "eval", "--n", "2", "--max-new-tokens", "24", "--out",
                 str(tmp_path / "ev"), "--traces-out", str(tmp_path / "t.jsonl")]) == 0
    traces = read_jsonl(tmp_path / "t.jsonl")
    records = read_jsonl(tmp_path / "ev" / "records.jsonl")
    assert [t["id"] for t in traces] == [r["id"] for r in records]
    assert all(t["text"].endswith(r["generated_text"]) and len(t["text"]) > len(r["generated_text"])
               for t, r in zip(traces, records, strict=True))


def test_preset_supplies_defaults_under_config_and_flags(parser, tmp_path, capsys):
    presets = pytest.importorskip("lens_steer.presets")
    p = presets.get_preset("seal-r1-distill-qwen-7b")
    cfg = _config(parser, ["seal", "--preset", "seal-r1-distill-qwen-7b", "--n-eval", "3"])
    assert (cfg.model, cfg.write_site, cfg.template, cfg.dtype) == (
        p.hub_id, p.write_site, p.overrides["template"], p.overrides["dtype"])
    assert cfg.n_eval == 3 and cfg.dataset == "math500" and cfg.layer is None
    (tmp_path / "c.json").write_text(json.dumps({"write_site": "blocks.5.hook_resid_pre"}))
    assert _config(parser, ["seal", "--preset", "seal-r1-distill-qwen-7b", "--config",
                            str(tmp_path / "c.json")]).write_site == "blocks.5.hook_resid_pre"
    assert "unknown preset 'nope'" in _error(capsys, ["seal", "--preset", "nope"])


def test_traces_without_thoughts_fail_with_the_fix(tiny_qwen2_dir, tmp_path, capsys):
    """A random model writes no thought delimiter: seal stops at the cache, naming the fix."""
    err = _error(capsys, ["seal", "--model", str(tiny_qwen2_dir), "--out", str(tmp_path / "s"),
                          "--n-extract", "2", "--n-eval", "1", "--max-new-tokens", "4",
                          "--layer", "1"])
    assert "hold no thought" in err and "--traces FILE" in err


def _coconut_config(parser, *argv):
    from experiments.coconut_cmd import _config

    return _config(parser.parse_args(["coconut", "run", "--out", "o", *argv]))


def test_coconut_takes_the_shared_config_with_nested_train_options(parser, tmp_path):
    """`coconut run|train`: flags, --config and --set with the same precedence; `train.<f>`
    reaches the nested TrainConfig and keeps the run's own training defaults (val_size 100)."""
    from lens_steer.coconut.experiment import CoconutRunConfig

    default = _coconut_config(parser)
    assert default == CoconutRunConfig() and default.train.val_size == 100
    (tmp_path / "c.json").write_text(json.dumps({"n_train": 5, "train": {"lr": 1e-3,
                                                                         "epochs": 2}}))
    cfg = _coconut_config(parser, "--config", str(tmp_path / "c.json"), "--set", "train.lr=2e-3",
                          "--set", "train.epochs=3", "--train.epochs", "4", "--set",
                          "methods=cot,nocot", "--set", 'time_budget_s={"cot": 5}',
                          "--set", "train.stage0_epochs=null", "--no-train.pad-latent-to-max")
    assert (cfg.n_train, cfg.train.lr, cfg.train.epochs, cfg.train.val_size) == (5, 2e-3, 4, 100)
    assert cfg.methods == ("cot", "nocot") and cfg.time_budget_s == {"cot": 5}
    assert cfg.train.stage0_epochs is None and cfg.train.pad_latent_to_max is False
    assert cfg.train_config("cot").lr == 2e-3
    # a run folder's config.json (what `run` writes: asdict) re-runs that run
    import dataclasses

    (tmp_path / "run.json").write_text(json.dumps(dataclasses.asdict(cfg)))
    assert _coconut_config(parser, "--config", str(tmp_path / "run.json")) == cfg
    train = parser.parse_args(["coconut", "train", "--mode", "cot", "--out", "o",
                               "--train.lr", "5e-4"])
    assert train.mode == "cot" and train.func is not None
    from experiments.coconut_cmd import _config

    assert _config(train).train.lr == 5e-4


@pytest.mark.parametrize(("argv", "message"), [
    (["--set", "train.lrr=1"], "unknown config key 'train.lrr' in --set (did you mean 'train.lr'?)"),
    (["--set", "lr=1"], "unknown config key 'lr' in --set (did you mean 'train.lr'?)"),
    (["--set", "n_trian=3"], "(did you mean 'n_train'?)"),
    (["--set", "train=3"], "train in --set holds options: give train.<option>=VALUE"),
    (["--train.lr", "nan"], "--train.lr must be a finite number"),
    (["--train.epochs", "0"], "train: epochs must be >= 1"),
    (["--set", "time_budget_s=5"], "--time-budget-s: expected a JSON object"),
])
def test_coconut_config_errors_are_one_line(capsys, tmp_path, argv, message):
    assert message in _error(capsys, ["coconut", "run", "--out", str(tmp_path / "r"), *argv])
    assert not (tmp_path / "r").exists()  # refused before any work


def test_coconut_config_file_keys_are_checked(capsys, tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"train": {"epoch": 3}}))
    err = _error(capsys, ["coconut", "train", "--out", str(tmp_path / "m"), "--config",
                          str(tmp_path / "c.json")])
    assert "unknown config key 'train.epoch'" in err and "did you mean 'train.epochs'" in err
    (tmp_path / "s.json").write_text(json.dumps({"command": "seal", "n_train": 3}))
    assert "is a `seal` config, not `coconut`" in _error(
        capsys, ["coconut", "run", "--out", str(tmp_path / "r"), "--config",
                 str(tmp_path / "s.json")])


def _in_thread(fn):
    """fn() in another thread (another writer of this process): its result or its error."""
    import threading

    box: dict = {}

    def target():
        try:
            box["result"] = fn()
        except Exception as err:  # noqa: BLE001 - handed back to the test
            box["error"] = err

    t = threading.Thread(target=target)
    t.start()
    t.join()
    return box.get("error") or box.get("result")


def test_run_folder_is_one_writer(tmp_path):
    """A RunFolder holds its folder's lock: a second writer is refused, naming the holder,
    until the first closes (or fails)."""
    import os

    from experiments.run_folder import RunFolder
    from lens_steer.errors import ArtifactError

    path = tmp_path / "run"
    first = RunFolder(path, {"layer": 1}, command="x")
    err = _in_thread(lambda: RunFolder(path, {"layer": 2}, command="x"))
    assert isinstance(err, ArtifactError), err
    assert f"{path} is being written by pid {os.getpid()}" in str(err)
    assert len(str(err).splitlines()) == 1
    assert json.loads((path / "config.json").read_text())["layer"] == 1  # untouched
    first.close()
    second = _in_thread(lambda: RunFolder(path, {"layer": 2}, command="x").close())
    assert second is None and json.loads((path / "config.json").read_text())["layer"] == 2
    # released when the run fails, and when the object goes away
    with pytest.raises(RuntimeError), RunFolder(path):
        raise RuntimeError("study failed")
    assert _in_thread(lambda: RunFolder(path).close()) is None
    held = RunFolder(path)
    assert isinstance(_in_thread(lambda: RunFolder(path)), ArtifactError)
    del held
    assert _in_thread(lambda: RunFolder(path).close()) is None


def test_a_command_refuses_a_folder_another_writer_holds(tmp_path, capsys, monkeypatch):
    """`lens-steer <study> --out X` while X is being written: one line, before any work."""
    import threading

    from lens_steer.backends.base import ModelBackend
    from lens_steer.io import folder_lock

    def no_forward(*a, **k):
        raise AssertionError("generated while another writer held the folder")

    monkeypatch.setattr(ModelBackend, "generate", no_forward)
    out = tmp_path / "sweep"
    taken, done = threading.Event(), threading.Event()

    def writer():
        with folder_lock(out, command="lens-steer alpha-sweep (the first one)"):
            taken.set()
            done.wait(30)

    t = threading.Thread(target=writer)
    t.start()
    taken.wait(30)
    try:
        err = _error(capsys, ["alpha-sweep", "--out", str(out), "--n-eval", "1"])
    finally:
        done.set()
        t.join()
    assert "is being written by" in err and "lens-steer alpha-sweep (the first one)" in err
