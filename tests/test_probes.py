"""Linear probes per layer: planted structure found (and only there), controls at chance,
grouped folds, torch backend == scikit-learn, tiny classes dropped, errors, plots and the CLI."""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pytest
import torch

from probes import (
    ProbeReport,
    ProbeWarning,
    make_folds,
    probe_layers,
    synthetic_thoughts,
    with_model_control,
)

FAST = dict(map_layers=None, progress=False, silhouette_points=300)


@pytest.fixture(scope="module")
def planted():
    """Layer 2 of 4 carries a linear class signal; the others are noise."""
    x, labels, groups = synthetic_thoughts(600, 32, 4, signal_layers=(2,), strength=1.0, seed=0)
    return x, labels, groups, probe_layers(x, labels, groups, **FAST)


def test_planted_structure_found_only_where_planted(planted):
    _, _, _, rep = planted
    assert rep.best_layer == 2 and rep.layer_ids == [0, 1, 2, 3]
    sig = rep.layer(2)
    assert sig["accuracy_mean"] >= 0.95 and sig["balanced_accuracy_mean"] >= 0.95
    assert sig["auroc_mean"] >= 0.99 and sig["macro_f1_mean"] >= 0.95
    assert set(sig["pairs"]) == {"execution_vs_reflection", "execution_vs_transition",
                                 "reflection_vs_transition"}
    assert all(p["balanced_accuracy_mean"] >= 0.95 for p in sig["pairs"].values())
    assert sig["selectivity"] >= 0.5
    for layer in (0, 1, 3):  # no signal: balanced accuracy ~ 1/3, AUROC ~ 0.5
        row = rep.layer(layer)
        assert 0.2 <= row["balanced_accuracy_mean"] <= 0.45, (layer, row["balanced_accuracy_mean"])
        assert 0.35 <= row["auroc_mean"] <= 0.65
    for row in rep.layers:  # shuffled-label control stays at chance everywhere
        assert 0.2 <= row["control_balanced_accuracy_mean"] <= 0.45
        assert 0.35 <= row["control_auroc_mean"] <= 0.65
        # majority baseline: "execution" (60 %) always predicted
        assert abs(row["majority_accuracy_mean"] - 0.6) < 0.08
        assert abs(row["majority_balanced_accuracy_mean"] - 1 / 3) < 1e-9
        cm = np.array(row["confusion_matrix"])
        assert cm.shape == (3, 3) and cm.sum() == 600
    # classifier-free separability and the SEAL vector norm peak at the planted layer too
    fisher = [r["fisher_ratio"] for r in rep.layers]
    assert int(np.argmax(fisher)) == 2 and fisher[2] > 5 * max(fisher[:2] + fisher[3:])
    seal = [r["seal_vector_norm"] for r in rep.layers]
    assert int(np.argmax(seal)) == 2
    assert rep.layer(2)["silhouette"] > rep.layer(0)["silhouette"]


def test_report_json_and_save(planted, tmp_path):
    x, labels, groups, rep = planted
    js = rep.to_json()
    json.dumps(js, allow_nan=False)  # strict JSON
    assert js["best_layer"] == 2 and js["classes"] == ["execution", "reflection", "transition"]
    row = js["layers"][2]
    for key in ("layer", "accuracy_mean", "accuracy_std", "balanced_accuracy_mean",
                "macro_f1_mean", "auroc_mean", "control_accuracy_mean", "majority_accuracy_mean",
                "fisher_ratio", "class_mean_distances", "confusion_matrix"):
        assert key in row
    rep2 = probe_layers(x, labels, groups, layers=[10, 11, 12, 13], map_layers=[12, 13],
                        tsne=True, max_map_points=120, progress=False, silhouette_points=0,
                        n_folds=3, pairs=None)
    assert rep2.best_layer == 12 and set(rep2.maps) == {12, 13}
    assert rep2.maps[12]["pca"].shape == (120, 2) and rep2.maps[12]["tsne"].shape == (120, 2)
    out = rep2.save(tmp_path / "run")
    names = {p.name for p in out.iterdir()}
    assert {"metrics.json", "report.md", "layer_curve.png", "confusion_matrices.png",
            "pca_layer12.png", "tsne_layer12.png", "pca_layer13.png"} <= names
    assert (out / "layer_curve.png").read_bytes()[:4] == b"\x89PNG"
    assert "![layer curve](layer_curve.png)" in (out / "report.md").read_text()
    assert json.loads((out / "metrics.json").read_text())["best_layer"] == 12


def test_folds_are_grouped_and_stratified():
    rng = np.random.default_rng(1)
    y = rng.choice(3, size=500, p=[0.6, 0.3, 0.1])
    groups = np.array([f"t{i // 10}" for i in range(500)])
    folds = make_folds(y, groups, 5, seed=0)
    seen = np.concatenate([te for _, te in folds])
    assert sorted(seen.tolist()) == list(range(500))  # every thought tested exactly once
    for tr, te in folds:
        assert not set(groups[tr]) & set(groups[te])
        assert len(set(tr) | set(te)) == 500
        frac = np.bincount(y[te], minlength=3) / len(te)
        assert np.abs(frac - [0.6, 0.3, 0.1]).max() < 0.1  # stratified


def test_torch_matches_sklearn():
    x, labels, groups = synthetic_thoughts(400, 24, 3, signal_layers=(1, 2), strength=0.35,
                                           seed=3)
    x[2] *= 3.0  # same signal, other scale: standardisation must absorb it
    kw = dict(FAST, silhouette_points=0, separability_stats=False, n_folds=3,
              pairs=[("execution", "reflection")])
    t = probe_layers(x, labels, groups, backend="torch", **kw)
    s = probe_layers(x, labels, groups, backend="sklearn", **kw)
    assert 0.55 < t.layer(1)["accuracy_mean"] < 0.98  # a non-trivial problem
    for rt, rs in zip(t.layers, s.layers, strict=True):
        for key in ("accuracy_mean", "balanced_accuracy_mean", "macro_f1_mean",
                    "control_accuracy_mean"):
            assert abs(rt[key] - rs[key]) <= 0.01, (rt["layer"], key, rt[key], rs[key])
        assert abs(rt["auroc_mean"] - rs["auroc_mean"]) <= 0.01
        for name in rt["pairs"]:
            assert abs(rt["pairs"][name]["accuracy_mean"]
                       - rs["pairs"][name]["accuracy_mean"]) <= 0.01


def test_tiny_class_dropped_with_warning():
    x, labels, groups = synthetic_thoughts(300, 16, 2, signal_layers=(1,), seed=2)
    labels = list(labels)
    for i in (0, 50, 100):
        labels[i] = "backtracking"  # 3 thoughts < 5 folds
    with pytest.warns(ProbeWarning, match="'backtracking' has 3 thoughts"):
        rep = probe_layers(x, labels, groups, pairs="all", **FAST)
    assert rep.dropped_classes == [{"class": "backtracking", "count": 3,
                                    "reason": "fewer than n_folds=5 thoughts"}]
    assert rep.classes == ["execution", "reflection", "transition"]
    assert rep.n_thoughts == 297 and rep.class_counts["backtracking"] == 3
    assert any("backtracking" in w for w in rep.warnings)
    assert set(rep.layer(1)["pairs"]) == {"execution_vs_reflection", "execution_vs_transition",
                                          "reflection_vs_transition"}
    assert any("backtracking" in w and "skipped" in w for w in rep.warnings)


def test_arbitrary_labels_and_explicit_pairs():
    x, labels, groups = synthetic_thoughts(300, 16, 2, signal_layers=(1,), seed=4,
                                           classes=(0, 1, 2), strength=1.0)
    rep = probe_layers({5: x[0], 7: x[1]}, [int(v) for v in labels], groups,
                       pairs=[(0, 2)], **FAST)
    assert rep.classes == ["0", "1", "2"] and rep.best_layer == 7
    assert list(rep.layer(7)["pairs"]) == ["0_vs_2"]
    assert rep.layer(7)["seal_vector_norm"] is None  # not thought-type labels
    # two classes: the main task is the pair, no extra pairs; auto pairs absent for non-SEAL
    two = [v for v in labels]
    keep = [i for i, v in enumerate(two) if v != 2]
    rep2 = probe_layers(x[:, keep], [two[i] for i in keep], [groups[i] for i in keep], **FAST)
    assert rep2.layer(1)["n_classes"] == 2 and "pairs" not in rep2.layer(1)
    assert rep2.layer(1)["accuracy_mean"] > 0.9


def test_model_control_hook(planted):
    x, labels, groups, _ = planted
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(9))
    kw = dict(FAST, layers=[0, 2], pairs=None, n_folds=3, separability_stats=False)
    x, noise = x[[0, 2]], noise[[0, 2]]
    rep = probe_layers(x, labels, groups, control_activations=noise, **kw)
    sig = rep.layer(2)
    assert sig["model_control_balanced_accuracy_mean"] < 0.45
    assert sig["model_control_selectivity"] > 0.5
    # the same via with_model_control on two separately computed reports
    ctrl = probe_layers(noise, labels, groups, **kw)
    base = probe_layers(x, labels, groups, **kw)
    merged = with_model_control(base, ctrl)
    assert merged.layer(2)["model_control_accuracy_mean"] == ctrl.layer(2)["accuracy_mean"]
    assert isinstance(merged, ProbeReport)


def test_errors_name_the_fix():
    x = torch.randn(2, 10, 4)
    with pytest.raises(ValueError, match="empty dataset"):
        probe_layers(torch.zeros(2, 0, 4), [], [], **FAST)
    with pytest.raises(ValueError, match="length mismatch"):
        probe_layers(x, ["a"] * 9, list(range(10)), **FAST)
    with pytest.raises(ValueError, match="single class"):
        probe_layers(x, ["a"] * 10, list(range(10)), **FAST)
    with pytest.raises(ValueError, match="traces"):
        probe_layers(x, ["a", "b"] * 5, [0, 1] * 5, **FAST)
    with pytest.raises(ValueError, match="backend"):
        probe_layers(x, ["a", "b"] * 5, list(range(10)), backend="jax", **FAST)


TRACE_TEMPLATE = ("<think>\nWe compute {a} + {b} = {c}.\n\nWait, let me check {a} + {b} again."
                  "\n\nThen {c} * 2 = {d}.\n\nAlternatively, count up from {b}.\n\nSo the sum is "
                  "{c}.\n\nHold on, is {c} right?\n\nAnother way: {d} / 2 = {c}.\n\n</think>\n"
                  "\\boxed{{{c}}}")


def test_cli_writes_run_folder_from_cache(tiny_qwen2_dir, tmp_path, capsys):
    cache_mod = pytest.importorskip("lens_steer.cache",
                                    reason="lens_steer.cache (the thought cache) not available")
    from conftest import loaded

    from experiments import probe_cmd
    from experiments.cli import COMMAND_MODULES

    assert "experiments.probe_cmd" in COMMAND_MODULES
    model = loaded(tiny_qwen2_dir, "transformer_lens")
    traces = [{"id": f"q{i}", "text": TRACE_TEMPLATE.format(a=i, b=i + 2, c=2 * i + 2,
                                                             d=4 * i + 4)}
              for i in range(8)]
    cache_mod.cache_thoughts(model, traces, tmp_path / "cache",
                             cache_mod.CacheConfig(progress=False))
    cache = cache_mod.load_cache(tmp_path / "cache")
    counts = {c: cache.labels.count(c) for c in set(cache.labels)}
    assert min(counts.values()) >= 3, counts

    parser = argparse.ArgumentParser()
    probe_cmd.register(parser.add_subparsers())
    out = tmp_path / "probe"
    args = parser.parse_args(["probe", "--cache", str(tmp_path / "cache"), "--out", str(out),
                              "--folds", "3", "--no-progress"])
    assert args.func(args) == 0
    assert "[probe] best layer" in capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    assert [r["layer"] for r in metrics["layers"]] == cache.layers
    assert metrics["best_layer"] in cache.layers and metrics["n_thoughts"] == len(cache)
    for row in metrics["layers"]:
        assert 0.0 <= row["accuracy_mean"] <= 1.0 and math.isfinite(row["accuracy_std"])
        assert "control_accuracy_mean" in row and "balanced_accuracy_mean" in row
    assert (out / "layer_curve.png").exists() and (out / f"pca_layer{metrics['best_layer']}.png"
                                                   ).exists()
    assert "![layer curve](layer_curve.png)" in (out / "report.md").read_text()


@pytest.mark.slow
def test_full_size_speed():
    """The benchmark's size, smaller: 2,000 thoughts x 512 x 8 layers within a minute."""
    import time

    x, labels, groups = synthetic_thoughts(2000, 512, 8, signal_layers=(5,), strength=0.2)
    t0 = time.perf_counter()
    rep = probe_layers(x, labels, groups, map_layers=None, progress=False)
    assert time.perf_counter() - t0 < 60
    assert rep.best_layer == 5
