"""Reliability of the thought cache: kills, two writers, damaged files, changed settings, NaNs,
file modes, sites and old caches. Every case checks that nothing is lost or mixed: the folder
ends byte-identical to an uninterrupted run (or is refused, untouched). docs/reliability.md
lists the cases and what they showed."""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import lens_steer
from lens_steer import cache_store
from lens_steer.cache import CacheConfig, CacheError, cache_thoughts, load_cache
from lens_steer.errors import ArtifactError
from lens_steer.fingerprint import labeller_fingerprint
from lens_steer.io import HOLDER_NAME, folder_lock, load_tensors, save_tensors, write_json
from lens_steer.testing import CORPUS, build_tiny_model
from lens_steer.thoughts import LabelRules, label_thought

TRACES = [{"id": f"t{i}", "text": "<think>\n" + CORPUS[i % 4] + CORPUS[(i + 1) % 4] + "</think>",
           "correct": i % 2 == 0} for i in range(8)]
CFG = dict(batch_size=2, shard_size=5, layers=[0, 2], progress=False)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny"), arch="qwen2")


@pytest.fixture(scope="module")
def model(model_dir):
    return lens_steer.load_model(model_dir, backend="transformer_lens", device="cpu")


@pytest.fixture(scope="module")
def reference(model, tmp_path_factory):
    """An uninterrupted run: what every recovered folder must equal, byte for byte."""
    out = tmp_path_factory.mktemp("ref") / "c"
    summary = cache_thoughts(model, TRACES, out, CacheConfig(**CFG))
    assert summary.n_shards >= 4  # enough shards to damage one in the middle
    return out


def snapshot(d: Path) -> dict[str, bytes]:
    """Every shard's bytes (tensors and metadata) and the manifest's content fields."""
    files = {p.name: p.read_bytes() for p in sorted(d.glob("shard-*"))}
    m = json.loads((d / "manifest.json").read_text())
    files["manifest"] = json.dumps({k: m[k] for k in ("fingerprint", "settings", "shards",
                                                      "complete", "sites", "shapes")}).encode()
    return files


def assert_same(d: Path, ref: Path) -> None:
    assert snapshot(d) == snapshot(ref)
    leftovers = [p.name for p in d.iterdir() if p.name.startswith((".trash-", ".shard-",
                                                                    ".manifest"))]
    assert not leftovers
    a, b = load_cache(d, verify=True), load_cache(ref)
    assert a.metadata == b.metadata and torch.equal(a.activations(2), b.activations(2))


SCRIPT = """
import os, signal, sys, time, json
from pathlib import Path
import lens_steer, lens_steer.io as io
from lens_steer.cache import CacheConfig, cache_thoughts
model = lens_steer.load_model(sys.argv[1], backend="transformer_lens", device="cpu")
traces, out, mode = json.loads(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]
real_capture, real_save = model.capture_resid, io.save_file
n = {"capture": 0, "save": 0}
def capture(*a, **k):
    n["capture"] += 1
    if mode == "kill-capture" and n["capture"] == 4:
        os.kill(os.getpid(), signal.SIGKILL)
    if mode == "block":
        while not (out.parent / "go").exists():
            time.sleep(0.05)
    return real_capture(*a, **k)
def save(tensors, path, metadata=None):
    real_save(tensors, path, metadata=metadata)
    n["save"] += 1
    if mode == "kill-save" and n["save"] == 2:  # temp file written, not yet renamed
        os.kill(os.getpid(), signal.SIGKILL)
model.capture_resid, io.save_file = capture, save
cache_thoughts(model, traces, out, CacheConfig(**json.loads(sys.argv[5])))
"""


def run_script(model_dir: Path, out: Path, mode: str, wait: bool = True):
    args = [sys.executable, "-c", textwrap.dedent(SCRIPT), str(model_dir), json.dumps(TRACES),
            str(out), mode, json.dumps(CFG)]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if wait:
        proc.wait(timeout=180)
    return proc


@pytest.mark.parametrize("mode", ["kill-capture", "kill-save"])
def test_sigkill_then_resume(model, model_dir, reference, tmp_path, mode):
    out = tmp_path / "c"
    proc = run_script(model_dir, out, mode)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read()[-2000:]
    manifest = json.loads((out / "manifest.json").read_text())
    n_ref = len(json.loads((reference / "manifest.json").read_text())["shards"])
    assert not manifest["complete"] and 1 <= len(manifest["shards"]) < n_ref
    if mode == "kill-save":
        assert list(out.glob(".shard-*.tmp"))  # the killed write's temp file
    assert (out / HOLDER_NAME).exists()
    with pytest.raises(CacheError, match=r"incomplete \(interrupted\): rerun"):
        load_cache(out)  # the killed writer's holder file is left, but it is not "writing"
    partial = load_cache(out, allow_partial=True)  # what was committed is intact
    ref = load_cache(reference)
    assert partial.metadata == ref.metadata[:len(partial)]
    summary = cache_thoughts(model, TRACES, out, CacheConfig(**CFG))  # lock freed by the kill
    assert summary.resumed and summary.n_thoughts == len(ref)
    assert_same(out, reference)


def test_exception_between_shard_files_then_resume(model, reference, tmp_path, monkeypatch):
    real = cache_store.write_jsonl
    calls = {"n": 0}

    def failing(path, rows):
        calls["n"] += 1
        if calls["n"] == 3:  # shard-00002: tensors written, metadata and manifest not
            raise OSError("disk full")
        return real(path, rows)

    monkeypatch.setattr(cache_store, "write_jsonl", failing)
    with pytest.raises(OSError, match="disk full"):
        cache_thoughts(model, TRACES, tmp_path / "c", CacheConfig(**CFG))
    monkeypatch.setattr(cache_store, "write_jsonl", real)
    assert len(json.loads((tmp_path / "c" / "manifest.json").read_text())["shards"]) == 2
    assert cache_thoughts(model, TRACES, tmp_path / "c", CacheConfig(**CFG)).resumed
    assert_same(tmp_path / "c", reference)


def test_two_writers(model, model_dir, reference, tmp_path):
    out = tmp_path / "c"
    first = run_script(model_dir, out, "block", wait=False)
    try:
        deadline = time.time() + 120
        while not (out / HOLDER_NAME).exists():
            assert first.poll() is None, first.stderr.read()[-2000:]
            assert time.time() < deadline, "the first writer never took the lock"
            time.sleep(0.1)
        holder = f"pid {first.pid} on "
        with pytest.raises(ArtifactError, match=holder):
            cache_thoughts(model, TRACES, out, CacheConfig(**CFG))
        with pytest.raises(ArtifactError, match=holder):  # --overwrite cannot break in either
            cache_thoughts(model, TRACES[:3], out, CacheConfig(**CFG), overwrite=True)
        with pytest.raises(CacheError, match=f"incomplete .*being written by {holder}"):
            load_cache(out)
        (tmp_path / "go").touch()
        assert first.wait(timeout=180) == 0, first.stderr.read()[-2000:]
    finally:
        (tmp_path / "go").touch()
        if first.poll() is None:
            first.kill()
    assert not (out / HOLDER_NAME).exists()
    assert_same(out, reference)


def test_lock_threads_and_reentry(tmp_path):
    import threading

    errors = []
    with folder_lock(tmp_path), folder_lock(tmp_path):  # re-entrant in one thread

        def other():
            try:
                with folder_lock(tmp_path):
                    pass
            except ArtifactError as e:
                errors.append(str(e))

        t = threading.Thread(target=other)
        t.start()
        t.join()
    assert len(errors) == 1 and f"pid {os.getpid()}" in errors[0]
    with folder_lock(tmp_path):  # released after the outer block
        pass


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


DAMAGE = {
    "truncated tensors": ("shard-00002.safetensors", _truncate, "unreadable"),
    "truncated metadata": ("shard-00002.jsonl", _truncate, "not JSON|has \\d+ rows"),
    "metadata row lost": ("shard-00002.jsonl",
                          lambda p: p.write_text("".join(p.read_text().splitlines(True)[:-1])),
                          "has 4 rows, the manifest says 5"),
    "tensors missing": ("shard-00002.safetensors", Path.unlink, "missing"),
    "shards swapped": ("shard-00002.safetensors",  # right shape, wrong content: only sha256
                       lambda p: p.write_bytes((p.parent / "shard-00001.safetensors")
                                               .read_bytes()), None),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damaged_shard_detected_and_repaired(model, reference, tmp_path, case):
    import shutil

    out = tmp_path / "c"
    shutil.copytree(reference, out)
    name, damage, problem = DAMAGE[case]
    damage(out / name)
    if problem is None:
        load_cache(out)  # counts and headers match: only the hashes tell
        problem = "differs from its sha256"
    with pytest.raises(CacheError, match=f"shard shard-00002 is damaged: .*({problem}).*rerun "
                                         "the same cache command"):
        load_cache(out, verify=True)
    with pytest.warns(UserWarning, match="re-writing shards shard-00002"):
        summary = cache_thoughts(model, TRACES, out, CacheConfig(**CFG), verify=True)
    assert summary.resumed and summary.repaired[0] == "shard-00002"
    assert_same(out, reference)


def test_damaged_manifest_and_overwrite(model, reference, tmp_path):
    import shutil

    out = tmp_path / "c"
    shutil.copytree(reference, out)
    (out / "notes.txt").write_text("mine")
    _truncate(out / "manifest.json")
    with pytest.raises(CacheError, match="manifest.json is damaged.*--overwrite"):
        load_cache(out)
    with pytest.raises(CacheError, match="manifest.json is damaged"):
        cache_thoughts(model, TRACES, out, CacheConfig(**CFG))
    summary = cache_thoughts(model, TRACES, out, CacheConfig(**CFG), overwrite=True)
    assert not summary.resumed
    assert_same(out, reference)
    assert (out / "notes.txt").read_text() == "mine"  # only the cache's own files are replaced
    # --overwrite onto a cache of other traces replaces every shard, leaves no trash
    cache_thoughts(model, TRACES[:2], out, CacheConfig(**CFG), overwrite=True)
    assert len(load_cache(out)) < len(load_cache(reference))
    assert not list(out.glob(".trash-*"))


@pytest.mark.filterwarnings("ignore:.*truncated")
def test_changed_settings_are_refused_by_name(model, reference, tmp_path):
    import shutil

    out = tmp_path / "c"
    shutil.copytree(reference, out)
    before = snapshot(out)
    changes = {
        "sites": dict(config=CacheConfig(**{**CFG, "layers": [1]})),
        "max_tokens": dict(config=CacheConfig(**CFG, max_tokens=30)),
        "traces": dict(config=CacheConfig(**CFG), traces=TRACES[:-1]),
        "labeler.": dict(config=CacheConfig(**CFG),
                         labeler=LabelRules(reflection_starts=("hmm",))),
        "dtype": dict(config=CacheConfig(**CFG, dtype="float16")),
    }
    for key, kw in changes.items():
        traces = kw.pop("traces", TRACES)
        with pytest.raises(CacheError, match=f"other settings; differing: .*{key}"):
            cache_thoughts(model, traces, out, **kw)
    assert snapshot(out) == before  # refused: nothing written
    # batch size and progress do not change the content: resumed as is
    assert cache_thoughts(model, TRACES, out, CacheConfig(**{**CFG, "batch_size": 3})).resumed


def test_labeller_fingerprint_distinguishes_configurations(model, tmp_path):
    strict = LabelRules(reflection_starts=("wait", "hmm"))
    fps = [labeller_fingerprint(x) for x in (
        LabelRules(), strict, "seal", label_thought, functools.partial(label_thought, rules=strict),
        lambda text: "execution", lambda text: "reflection")]
    assert len({json.dumps(fp, sort_keys=True, default=str) for fp in fps}) == len(fps)
    assert labeller_fingerprint(LabelRules()) == labeller_fingerprint(LabelRules())
    assert labeller_fingerprint("seal")["resolves_to"] == labeller_fingerprint(label_thought)
    assert labeller_fingerprint(label_thought)["source_sha256"]  # source found and hashed
    assert labeller_fingerprint(len)["source_sha256"] is None  # no source: the name alone
    # a changed word list no longer resumes onto the stale cache; --overwrite relabels
    out = tmp_path / "c"
    cache_thoughts(model, TRACES, out, CacheConfig(**CFG), labeler=LabelRules())
    with pytest.raises(CacheError, match="labeler.fields.reflection_starts"):
        cache_thoughts(model, TRACES, out, CacheConfig(**CFG), labeler=strict)
    everything = LabelRules(reflection_keywords=("",))  # "" is in every text
    cache_thoughts(model, TRACES, out, CacheConfig(**CFG), labeler=everything, overwrite=True)
    assert set(load_cache(out).labels) == {"reflection"}


def test_non_finite_activations_are_refused(model, tmp_path, monkeypatch):
    real = model.capture_resid

    def nan_on_t3(seqs, layers, positions):
        acts = real(seqs, layers, positions)
        row = 0
        for s, pos in zip(seqs, positions, strict=True):
            if s == model.encode(TRACES[3]["text"])[:len(s)]:
                acts[layers[-1]][row] = float("nan")
            row += len(pos)
        return acts

    monkeypatch.setattr(model, "capture_resid", nan_on_t3)
    with pytest.raises(ArtifactError, match=r"non-finite .*blocks.2.hook_resid_post .*'t3'"):
        cache_thoughts(model, TRACES, tmp_path / "c", CacheConfig(**CFG))
    partial = load_cache(tmp_path / "c", allow_partial=True)
    assert "t3" not in partial.groups
    assert all(torch.isfinite(a).all() for a in partial.to_dict().values())

    monkeypatch.setattr(model, "capture_resid",
                        lambda *a: {k: v * 1e6 for k, v in real(*a).items()})
    with pytest.raises(ArtifactError, match="after casting to float16.*--dtype float32"):
        cache_thoughts(model, TRACES, tmp_path / "h", CacheConfig(**CFG, dtype="float16"))


def test_token_ids_outside_the_vocabulary_are_refused_before_work(model, tmp_path):
    from lens_steer.errors import DataError

    ids = model.encode(TRACES[0]["text"])
    for bad in (len(model.tokenizer) + 5, -1):
        with pytest.raises(DataError, match=rf"'x' has token ids outside .*\[{bad}\]"):
            cache_thoughts(model, [{"id": "x", "token_ids": [*ids, bad]}], tmp_path / "c",
                           CacheConfig(**CFG))
    assert not (tmp_path / "c").exists()  # refused before the folder was touched


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_artifacts_honour_umask(model, tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        cache_thoughts(model, TRACES[:2], tmp_path / "c", CacheConfig(**CFG))
    finally:
        os.umask(old)
    files = [p for p in (tmp_path / "c").iterdir() if p.name != ".lock"]
    assert files and {oct(p.stat().st_mode & 0o777) for p in files} == {oct(mode)}


def test_sites(model, reference, tmp_path, monkeypatch):
    # resid_post given as sites is the layers cache under another name
    sites = ["blocks.0.hook_resid_post", "blocks.2.hook_resid_post"]
    cache_thoughts(model, TRACES, tmp_path / "s", CacheConfig(**{**CFG, "layers": None},
                                                              sites=sites))
    a, ref = load_cache(tmp_path / "s"), load_cache(reference)
    assert a.sites == sites and a.layers == [0, 2]
    assert torch.equal(a.activations("blocks.2.hook_resid_post"), ref.activations(2))
    with pytest.raises(ValueError, match="not both"):
        CacheConfig(layers=[1], sites=sites)
    with pytest.raises(ValueError, match="hook_pattern"):
        CacheConfig(sites=["blocks.0.attn.hook_pattern"])
    if not callable(getattr(type(model), "capture", None)):
        # until the backend's capture() lands: a stand-in with per-head z of shape (4, 16)
        def capture(seqs, sites, positions):
            post = model.capture_resid(seqs, [0, 1], positions)
            return {"blocks.1.hook_resid_pre": post[0],
                    "blocks.0.attn.hook_z": post[1].reshape(-1, 4, 16)}
        monkeypatch.setattr(model, "capture", capture, raising=False)
    z_sites = ["blocks.1.hook_resid_pre", "blocks.0.attn.hook_z"]
    cache_thoughts(model, TRACES, tmp_path / "z", CacheConfig(**{**CFG, "layers": None},
                                                              sites=z_sites))
    z = load_cache(tmp_path / "z", verify=True)
    assert z.sites == z_sites and z.layers == [] and z.feature_shape(z_sites[1]) == (4, 16)
    assert z.activations(z_sites[1]).shape == (len(ref), 4, 16)
    assert z.activations(z_sites[1], [5, 0]).shape == (2, 4, 16)
    # resid_pre of block 1 is resid_post of block 0 (the hidden_states[1] convention)
    torch.testing.assert_close(z.activations("blocks.1.hook_resid_pre"), ref.activations(0),
                               atol=1e-5, rtol=1e-5)
    assert set(z.to_dict(by="site")) == set(z_sites)
    with pytest.raises(CacheError, match="differing: sites"):
        cache_thoughts(model, TRACES, tmp_path / "z", CacheConfig(**CFG))


@pytest.mark.filterwarnings("ignore:.*truncated")
def test_format_1_cache_still_loads(model, reference, tmp_path):
    """A cache written before sites (tensor keys `layer_<l>`, no settings) loads and is
    recognised as finished by the same call that wrote it."""
    import shutil

    from lens_steer.cache import _legacy_fingerprint, _prepare
    from lens_steer.thoughts import resolve_labeler

    out = tmp_path / "old"
    shutil.copytree(reference, out)
    m = json.loads((out / "manifest.json").read_text())
    for s in m["shards"]:
        path = out / f"{s['name']}.safetensors"
        t = load_tensors(path)
        save_tensors(path, {f"layer_{k.split('.')[1]}": v for k, v in t.items()})
        del s["sha256"]
    items = _prepare(model, TRACES, CacheConfig(**CFG), resolve_labeler("seal"))
    m["fingerprint"] = _legacy_fingerprint(model.describe(), items, m["sites"],
                                           CacheConfig(**CFG), "seal")
    m["format_version"] = 1
    for key in ("sites", "settings", "shapes"):
        del m[key]
    write_json(out / "manifest.json", m)
    old, ref = load_cache(out, verify=True), load_cache(reference)
    assert old.layers == [0, 2] and old.sites == ref.sites
    assert torch.equal(old.activations(2), ref.activations(2)) and old.metadata == ref.metadata
    assert cache_thoughts(model, TRACES, out, CacheConfig(**CFG)).resumed
    _truncate(out / "shard-00001.jsonl")
    with pytest.raises(CacheError, match="damaged cache of an older lens_steer.*--overwrite"):
        cache_thoughts(model, TRACES, out, CacheConfig(**CFG))
    with pytest.raises(CacheError, match="older lens_steer"):
        cache_thoughts(model, TRACES, out, CacheConfig(**CFG, max_tokens=30))


def test_cli_verify_sites_and_one_line_errors(model_dir, tmp_path, capsys, monkeypatch):
    from experiments import cache_cmd
    from experiments.cli import main

    traces = tmp_path / "traces.jsonl"
    traces.write_text("".join(json.dumps(t) + "\n" for t in TRACES[:4]))
    out = tmp_path / "out"
    base = ["cache", "--model", str(model_dir), "--traces", str(traces), "--out", str(out),
            "--no-progress", "--shard-size", "4"]
    assert main([*base, "--sites", "blocks.1.hook_resid_pre", "blocks.0.hook_mlp_out"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["sites"] == ["blocks.1.hook_resid_pre", "blocks.0.hook_mlp_out"]
    ref = snapshot(out)
    # same row count, other bytes: only --verify notices, and the resume re-writes it
    (out / "shard-00001.safetensors").write_bytes((out / "shard-00000.safetensors").read_bytes())
    sites = ["--sites", "blocks.1.hook_resid_pre", "blocks.0.hook_mlp_out"]
    assert main([*base, *sites]) == 0 and json.loads(capsys.readouterr().out)["repaired"] is None
    with pytest.warns(UserWarning, match="shard-00001"):
        assert main([*base, *sites, "--verify"]) == 0
    assert json.loads(capsys.readouterr().out)["repaired"][0] == "shard-00001"
    assert snapshot(out) == ref
    # user errors: one line, exit 2, naming what differs / the holder
    assert main([*base, "--layers", "1"]) == 2
    err = capsys.readouterr().err  # (transformers' loading bar may precede it)
    assert "Traceback" not in err and "lens-steer: error: " in err.splitlines()[-1]
    assert "differing: sites" in err.splitlines()[-1]
    import threading

    taken, done = threading.Event(), threading.Event()

    def other_writer():  # another thread: the lock is re-entrant only in its holder's thread
        with folder_lock(out, command="lens-steer cache (the other one)"):
            taken.set()
            done.wait(60)

    holder = threading.Thread(target=other_writer)
    holder.start()
    try:
        assert taken.wait(60)
        monkeypatch.setattr(cache_cmd.CacheCommandConfig, "load",
                            lambda self: pytest.fail("loaded the model for a held folder"))
        assert main([*base, *sites]) == 2
    finally:
        done.set()
        holder.join()
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.startswith("lens-steer: error: ") and f"pid {os.getpid()}" in err
    assert "command: lens-steer cache (the other one)" in err


@pytest.mark.slow
def test_random_sigkills_until_done(model, model_dir, tmp_path):
    """SIGKILL at random moments (mid-forward, mid-shard, mid-manifest), resume each time: the
    folder ends identical to one uninterrupted run."""
    import random

    traces = [{"id": f"r{i}", "text": "<think>\n" + CORPUS[i % 4] * (1 + i % 3) + "</think>"}
              for i in range(48)]
    cfg = dict(batch_size=3, shard_size=7, layers=[0, 1, 2], progress=False)
    ref = tmp_path / "ref"
    cache_thoughts(model, traces, ref, CacheConfig(**cfg))
    out, rng, kills = tmp_path / "c", random.Random(0), 0
    script = textwrap.dedent("""
        import json, sys
        import lens_steer
        from lens_steer.cache import CacheConfig, cache_thoughts
        model = lens_steer.load_model(sys.argv[1], backend="transformer_lens", device="cpu")
        cache_thoughts(model, json.loads(sys.argv[2]), sys.argv[3],
                       CacheConfig(**json.loads(sys.argv[4])))
    """)
    def committed() -> int:
        try:
            return len(json.loads((out / "manifest.json").read_text())["shards"])
        except (OSError, ValueError):
            return 0

    for _ in range(40):
        proc = subprocess.Popen([sys.executable, "-c", script, str(model_dir),
                                 json.dumps(traces), str(out), json.dumps(cfg)],
                                stderr=subprocess.DEVNULL)
        target, deadline = committed() + rng.randint(2, 5), time.time() + 120
        while committed() < target and proc.poll() is None:  # kill 2-5 shards further on
            assert time.time() < deadline
            time.sleep(0.002)
        time.sleep(rng.uniform(0.0, 0.05))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait(60)
        if proc.returncode == 0:
            break
    summary = cache_thoughts(model, traces, out, CacheConfig(**cfg))
    assert kills >= 5 and summary.n_thoughts == len(load_cache(ref))
    assert_same(out, ref)
