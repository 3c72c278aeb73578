"""Probes on the toy reasoner's own thoughts: the report is written and the best layer is well
above the shuffled-label control (issue 5), for both backends' caches alike."""

from __future__ import annotations

import json

import pytest

from lens_steer.toy import TOY_MODEL_DIR
from tests.conftest import loaded


@pytest.fixture(scope="module")
def toy_cache(tmp_path_factory):
    if not (TOY_MODEL_DIR / "config.json").exists():
        pytest.skip("the shipped toy model is missing (lens-steer toy train)")
    from lens_steer import GenerationConfig
    from lens_steer.cache import CacheConfig, cache_thoughts, load_cache
    from lens_steer.toy.splits import heldout_problems

    model = loaded(TOY_MODEL_DIR, "nnsight")
    problems = heldout_problems(40, seed=4242)
    prompts = [p.prompt for p in problems]
    out = model.generate(prompts, GenerationConfig(max_new_tokens=200, batch_size=40))
    traces = [{"id": str(i), "text": p + t} for i, (p, t) in enumerate(zip(prompts, out.texts,
                                                                             strict=True))]
    path = tmp_path_factory.mktemp("toy-cache")
    cache_thoughts(model, traces, path, CacheConfig(progress=False))
    return load_cache(path)


def test_toy_probe_report_best_layer_beats_control(toy_cache, tmp_path):
    from probes import probe_cache

    counts = toy_cache.label_counts()
    assert min(counts.values()) >= 5, f"too few thoughts of some type: {counts}"
    report = probe_cache(toy_cache, out_dir=tmp_path, n_folds=3, tsne=False, progress=False)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["best_layer"] == report.best_layer
    assert (tmp_path / "layer_curve.png").exists() and (tmp_path / "report.md").exists()
    best = report.layer(report.best_layer)
    assert best["balanced_accuracy_mean"] > best["control_balanced_accuracy_mean"] + 0.2
    assert best["balanced_accuracy_mean"] > 0.6
