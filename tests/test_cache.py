"""Per-thought activation cache: parity with a full forward pass on both backends, padding
invariance, resume after interruption, truncation and the CLI."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

import lens_steer
from lens_steer import cache_store
from lens_steer.cache import CacheConfig, cache_thoughts, load_cache
from lens_steer.io import load_tensors
from lens_steer.testing import CORPUS, build_tiny_model
from lens_steer.thoughts import segment_thoughts

TRACES = [
    {"id": "q0", "text": CORPUS[0], "correct": True},
    {"id": "q1", "text": "<think>\n" + CORPUS[1] + "</think>\nDone.", "correct": False},
    {"id": "q2", "text": CORPUS[2]},
    {"id": "q3", "text": "No delimiter in this one.", "correct": True},
    {"id": "q4", "text": CORPUS[3] + "Hold on, 42.\n\nWe compute 6 * 7 = 42."},
    {"id": "q5", "text": "<think>\n" + CORPUS[2] + CORPUS[3] + "</think>"},
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny"), arch="qwen2")


@pytest.fixture(scope="module", params=["transformer_lens", "nnsight"])
def model(request, model_dir):
    return lens_steer.load_model(model_dir, backend=request.param, device="cpu")


@pytest.fixture(scope="module")
def hf(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def hf_resid_post(hf, ids: list[int]) -> torch.Tensor:
    """(layer, pos, d) outputs of every decoder block, one unpadded full forward pass."""
    outs = []

    def hook(module, args, output):
        outs.append((output[0] if isinstance(output, tuple) else output)[0])

    handles = [layer.register_forward_hook(hook) for layer in hf.model.layers]
    try:
        with torch.no_grad():
            hf(torch.tensor([ids]))
    finally:
        for h in handles:
            h.remove()
    return torch.stack(outs)


def quiet(**kw) -> CacheConfig:
    return CacheConfig(progress=False, **kw)


def test_parity_with_full_forward(model, hf, tmp_path):
    summary = cache_thoughts(model, TRACES, tmp_path / "c", quiet(batch_size=4, shard_size=5))
    cache = load_cache(tmp_path / "c")
    assert cache.layers == [0, 1, 2] and summary.layers == [0, 1, 2]
    assert len(cache) == summary.n_thoughts > 10
    assert summary.n_no_delimiter == 1 and summary.n_without_thoughts == 1
    assert summary.n_shards == -(-summary.n_thoughts // 5)
    assert set(cache.groups) == {"q0", "q1", "q2", "q4", "q5"}
    checked = 0
    for trace in TRACES:
        ids = model.encode(trace["text"])
        thoughts = segment_thoughts(ids, model.tokenizer)
        rows = [i for i, m in enumerate(cache.metadata) if m["trace_id"] == trace["id"]]
        assert len(rows) == len(thoughts)
        if not thoughts:
            continue
        ref = hf_resid_post(hf, ids)  # (layer, pos, d)
        for layer in cache.layers:
            got = cache.activations(layer)[rows]
            want = ref[layer, [t.position for t in thoughts]]
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
            checked += got.numel()
        for row, t in zip(rows, thoughts, strict=True):
            m = cache.metadata[row]
            assert (m["thought_index"], m["position"], m["label"], m["text"], m["n_tokens"]) \
                == (t.index, t.position, t.label, t.text, t.n_tokens)
            assert m["correct"] == trace.get("correct")
    assert checked > 1000
    # the lazy row selection and to_dict agree with the full per-layer load
    full = cache.to_dict()
    assert set(full) == {0, 1, 2} and full[1].shape == (len(cache), model.d_model)
    idx = [len(cache) - 1, 0, 7, 3]
    assert torch.equal(cache.activations(1, idx), full[1][idx])
    assert cache.info["model"]["backend"] == model.name and cache.info["d_model"] == 64


def test_same_across_batch_sizes_and_inputs(model, tmp_path):
    ref = cache_thoughts(model, TRACES, tmp_path / "b1", quiet(batch_size=1, layers=[0, 2]))
    a = load_cache(tmp_path / "b1")
    ids_traces = [{"token_ids": model.encode(t["text"]), "id": t["id"],
                   "correct": t.get("correct")} for t in TRACES]
    cache_thoughts(model, ids_traces, tmp_path / "b5",
                   quiet(batch_size=5, layers=[0, 2], shard_size=3))
    b = load_cache(tmp_path / "b5")
    drop = ("order",)
    assert [{k: v for k, v in m.items() if k not in drop} for m in a.metadata] == \
        [{k: v for k, v in m.items() if k not in drop} for m in b.metadata]
    for layer in (0, 2):
        torch.testing.assert_close(a.activations(layer), b.activations(layer),
                                   atol=1e-5, rtol=1e-5)
    assert ref.thoughts_by_label == {"execution": 6, "reflection": 7, "transition": 3}


def _files(d):
    return sorted(p.name for p in d.glob("shard-*"))


def test_resume_after_interruption(model, tmp_path, monkeypatch):
    cfg = quiet(batch_size=2, shard_size=3)
    cache_thoughts(model, TRACES, tmp_path / "once", cfg)

    real = model.capture_resid
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # the run dies mid-way; one shard is committed
        return real(*args, **kwargs)

    monkeypatch.setattr(model, "capture_resid", flaky)
    with pytest.raises(KeyboardInterrupt):
        cache_thoughts(model, TRACES, tmp_path / "twice", cfg)
    manifest = json.loads((tmp_path / "twice" / "manifest.json").read_text())
    assert not manifest["complete"] and len(manifest["shards"]) >= 1
    assert manifest["cursor"] != [0, 0]
    with pytest.raises(ValueError, match="incomplete"):
        load_cache(tmp_path / "twice")
    assert len(load_cache(tmp_path / "twice", allow_partial=True)) == \
        3 * len(manifest["shards"])

    # second crash: shard files written, manifest commit fails
    monkeypatch.setattr(model, "capture_resid", real)
    real_write = cache_store.write_json
    writes = {"n": 0}

    def failing_write(path, obj):
        writes["n"] += 1
        if writes["n"] == 2:
            raise OSError("disk full")
        return real_write(path, obj)

    monkeypatch.setattr(cache_store, "write_json", failing_write)
    with pytest.raises(OSError):
        cache_thoughts(model, TRACES, tmp_path / "twice", cfg)
    monkeypatch.setattr(cache_store, "write_json", real_write)

    summary = cache_thoughts(model, TRACES, tmp_path / "twice", cfg)
    assert summary.resumed
    once, twice = tmp_path / "once", tmp_path / "twice"
    assert _files(once) == _files(twice)
    for name in _files(once):
        if name.endswith(".jsonl"):
            assert (once / name).read_text() == (twice / name).read_text()
        else:
            a = load_tensors(once / name)
            b = load_tensors(twice / name)
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # a finished cache is returned as is
    again = cache_thoughts(model, TRACES, tmp_path / "twice", cfg)
    assert again.resumed and again.n_thoughts == summary.n_thoughts


def test_truncation_no_delimiter_and_errors(model, tmp_path):
    long = {"id": "long", "text": CORPUS[1] * 10}
    with pytest.warns(UserWarning, match="truncated"):
        s = cache_thoughts(model, [long, {"text": "plain"}], tmp_path / "t",
                           quiet(max_tokens=40, layers=[1]))
    assert (s.n_truncated, s.n_no_delimiter, s.n_traces) == (1, 1, 2)
    cache = load_cache(tmp_path / "t")
    assert all(m["position"] < 40 for m in cache.metadata) and len(cache) >= 1
    assert cache.groups[0] == "long" and cache.activations(1).shape == (len(cache), 64)
    with pytest.raises(ValueError, match="not in this cache"):
        cache.activations(0)
    differ = r"other settings; differing: traces, n_traces \(2 -> 1\), max_tokens \(40 -> 4096\)"
    with pytest.raises(ValueError, match=differ):
        cache_thoughts(model, [{"text": CORPUS[0]}], tmp_path / "t", quiet(layers=[1]))
    s2 = cache_thoughts(model, [{"text": CORPUS[0]}], tmp_path / "t", quiet(layers=[1]),
                        overwrite=True)
    assert len(load_cache(tmp_path / "t")) == s2.n_thoughts == 3
    with pytest.raises(ValueError, match="unknown layer"):
        cache_thoughts(model, TRACES, tmp_path / "u", quiet(layers=[7]))
    with pytest.raises(ValueError, match="no traces"):
        cache_thoughts(model, [], tmp_path / "e", quiet())
    with pytest.raises(FileNotFoundError, match="no thought cache"):
        load_cache(tmp_path / "missing")


def test_cli(model_dir, tmp_path, capsys):
    from experiments import cache_cmd

    traces = tmp_path / "traces.jsonl"
    traces.write_text("".join(json.dumps(t) + "\n" for t in TRACES[:3]))
    parser = argparse.ArgumentParser()
    cache_cmd.register(parser.add_subparsers())
    args = parser.parse_args(["cache", "--model", str(model_dir), "--traces", str(traces),
                              "--out", str(tmp_path / "out"), "--layers", "0,2",
                              "--no-progress", "--backend", "nnsight"])
    assert args.func(args) == 0
    summary = json.loads(capsys.readouterr().out)
    cache = load_cache(tmp_path / "out")
    assert cache.layers == [0, 2] and summary["n_thoughts"] == len(cache) == 7
    assert cache_cmd.parse_layers(["1-3", "5"]) == [1, 2, 3, 5]
    assert cache_cmd.parse_layers(["all"]) is None


def test_sites_parity_with_hf(model, hf, tmp_path):
    """Cached non-residual sites equal the HF model's own tensors on both backends."""
    sites = ["blocks.1.hook_resid_pre", "blocks.0.hook_mlp_out", "blocks.2.hook_attn_out"]
    cache_thoughts(model, TRACES, tmp_path / "s", quiet(sites=sites, batch_size=3, shard_size=4))
    cache = load_cache(tmp_path / "s")
    assert cache.sites == sites and cache.layers == []
    outs = {}

    def keep(name):
        def hook(module, args, output):
            outs[name] = (output[0] if isinstance(output, tuple) else output)[0]
        return hook

    handles = [hf.model.layers[0].mlp.register_forward_hook(keep("mlp0")),
               hf.model.layers[2].self_attn.register_forward_hook(keep("attn2"))]
    checked = 0
    try:
        for trace in TRACES:
            ids = model.encode(trace["text"])
            pos = [t.position for t in segment_thoughts(ids, model.tokenizer)]
            if not pos:
                continue
            rows = [i for i, m in enumerate(cache.metadata) if m["trace_id"] == trace["id"]]
            with torch.no_grad():
                hidden = hf(torch.tensor([ids]), output_hidden_states=True).hidden_states
            for site, want in ((sites[0], hidden[1][0]), (sites[1], outs["mlp0"]),
                               (sites[2], outs["attn2"])):
                torch.testing.assert_close(cache.activations(site, rows), want[pos],
                                           atol=1e-4, rtol=1e-4)
                checked += len(rows)
    finally:
        for h in handles:
            h.remove()
    assert checked == 3 * len(cache) > 30
