"""Steering: SEAL / ASC extraction formulas, position rules, gamma calibration, vector I/O."""

from __future__ import annotations

import json
import math
import statistics

import numpy as np
import pytest
import torch

from lens_steer import GenerationConfig
from lens_steer.steering import (
    AscConfig,
    PenaltyConfig,
    SealConfig,
    SteeringVector,
    asc_direction,
    calibrate_gamma,
    directional_derivatives,
    extract_asc_vector,
    extract_seal_vector,
    kl_bound,
    measure_kl,
    sample_states,
    seal_direction,
    seal_intervention,
    solve_gamma,
    steer,
    trigger_logit_bias,
    trigger_token_ids,
)
from lens_steer.testing import CORPUS
from lens_steer.thoughts import delimiter_token_ids, think_token_ids
from tests.conftest import loaded

# -- extraction formulas on hand-made activations ------------------------------------------------


def test_seal_direction_variants():
    acts = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0], [0.0, 4.0], [5.0, 5.0]])
    labels = ["execution", "execution", "reflection", "reflection", "transition"]
    # exec mean (2, 0); refl mean (0, 3); trans mean (5, 5); refl ∪ trans pooled (5/3, 11/3)
    assert torch.allclose(seal_direction(acts, labels, "reflection"), torch.tensor([2.0, -3.0]))
    assert torch.allclose(seal_direction(acts, labels, "transition"), torch.tensor([-3.0, -5.0]))
    assert torch.allclose(seal_direction(acts, labels, "both"),
                          torch.tensor([2.0 - 5 / 3, -11 / 3]))
    with pytest.raises(ValueError, match="no 'transition' thoughts"):
        seal_direction(acts[:4], labels[:4], "transition")
    with pytest.raises(ValueError, match="one label per activation"):
        seal_direction(acts, labels[:3])
    with pytest.raises(ValueError, match="unknown SEAL variant"):
        SealConfig(variant="hesitation")


def test_asc_direction_is_mean_of_pair_differences():
    concise = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    verbose = torch.tensor([[0.0, 0.0], [1.0, 6.0]])
    assert torch.allclose(asc_direction(concise, verbose), torch.tensor([1.5, 0.0]))
    with pytest.raises(ValueError, match="paired"):
        asc_direction(concise, verbose[:1])


# -- gamma from the KL bound ------------------------------------------------------------------------


@pytest.mark.parametrize(("alpha", "L", "eps"), [(2.0, 3.0, 1e-3), (0.5, 40.0, 1e-2),
                                                 (10.0, 1e-4, 1e-3), (1.0, 1e3, 1e-6)])
def test_solve_gamma_meets_the_bound_exactly(alpha, L, eps):
    from lens_steer.steering.asc import solve_gamma_cubic

    gamma = solve_gamma(alpha, L, eps)
    assert gamma > 0
    assert kl_bound(gamma, alpha, L) == pytest.approx(eps, rel=1e-9)
    # the earlier cubic (the bound's square without its gamma^4 term) overshoots it
    cubic = solve_gamma_cubic(alpha, L, eps)
    assert alpha ** 2 * cubic ** 2 + alpha * L * cubic ** 3 == pytest.approx(4 * eps, rel=1e-9)
    assert cubic >= gamma * (1 - 1e-12)


def test_solve_gamma_limits_and_errors():
    assert solve_gamma(2.0, 0.0, 1e-3) == pytest.approx(2 * math.sqrt(1e-3) / 2.0)
    assert solve_gamma(2.0, 1e-9, 1e-3) == pytest.approx(2 * math.sqrt(1e-3) / 2.0, rel=1e-6)
    with pytest.raises(ValueError, match="alpha"):
        solve_gamma(0.0, 1.0, 1e-3)


def test_directional_derivatives_match_finite_differences(tiny_qwen2_dir):
    model = loaded(tiny_qwen2_dir, "transformer_lens")
    torch.manual_seed(0)
    d = torch.randn(model.d_model)
    d /= d.norm()
    state = model.encode(CORPUS[0])[:24]
    y, dy, d2y = directional_derivatives(model, state, 1, d)
    with torch.no_grad():
        f = {t: model.last_logits_given_delta(state, 1, t * d).double()
             for t in (-0.1, -0.01, 0.0, 0.01, 0.1)}
    assert torch.allclose(y.double(), f[0.0], atol=1e-4)
    assert torch.allclose(dy.double(), (f[0.01] - f[-0.01]) / 0.02, atol=2e-3 * dy.abs().max())
    fd2 = (f[0.1] - 2 * f[0.0] + f[-0.1]) / 0.1 ** 2  # float32 logits: a wider step for f''
    assert torch.allclose(d2y.double(), fd2, atol=0.05 * d2y.abs().max())
    assert dy.norm() > 0.1  # the direction really moves the logits


def test_calibrated_gamma_keeps_kl_within_epsilon(tiny_qwen2_dir):
    model = loaded(tiny_qwen2_dir, "transformer_lens")
    torch.manual_seed(1)
    vec = SteeringVector(layer=1, vector=torch.randn(model.d_model), method="asc")
    texts = [(c[:40], c[40:]) for c in CORPUS]
    states = sample_states(model, texts, 8, seed=0)
    assert len(states) == 8 and len({tuple(s) for s in states}) > 3
    eps = 1e-3
    cal = calibrate_gamma(model, vec, states, epsilon=eps)
    assert cal.alpha == pytest.approx(statistics.median(cal.jv_norms))
    assert cal.L == pytest.approx(float(np.quantile(cal.hv_norms, 0.95)))
    assert kl_bound(cal.gamma, cal.alpha, cal.L) == pytest.approx(eps, rel=1e-9)
    # every calibration state: KL ≤ its own second-order bound, up to third-order error
    for kl, jv, hv in zip(cal.kl_at_calibration, cal.jv_norms, cal.hv_norms, strict=True):
        assert kl <= kl_bound(cal.gamma, jv, hv) * 1.05 + 1e-7
    # states no steeper than the calibration's (alpha, L) stay within epsilon
    for kl, jv, hv in zip(cal.kl_at_calibration, cal.jv_norms, cal.hv_norms, strict=True):
        if jv <= cal.alpha and hv <= cal.L:
            assert kl <= eps * 1.05
    assert statistics.median(cal.kl_at_calibration) <= eps
    # the measured KL is the steered one and second order in gamma: doubling gamma ~ 4x KL
    double = measure_kl(model, vec, 2 * cal.gamma, states)
    for k1, k2 in zip(cal.kl_at_calibration, double, strict=True):
        assert k1 > 0 and 3.5 < k2 / k1 < 4.5


# -- vectors: I/O and refusal ------------------------------------------------------------------------


def test_vector_round_trip(tmp_path):
    vec = SteeringVector(layer=3, vector=torch.arange(8.0), method="seal:reflection",
                         rule="think_delimiter", scale=0.5,
                         provenance={"model": "m", "data": {"n": 2}, "date": "d", "config": {}})
    path = vec.save(tmp_path / "vec")
    assert path.name == "vec.safetensors" and (tmp_path / "vec.json").exists()
    for p in (tmp_path / "vec", tmp_path / "vec.json", path):
        back = SteeringVector.load(p)
        assert torch.equal(back.vector, vec.vector)
        assert (back.layer, back.method, back.rule, back.scale, back.provenance) == \
            (3, "seal:reflection", "think_delimiter", 0.5, vec.provenance)
    (tmp_path / "vec.json").unlink()  # the safetensors header alone is enough
    assert SteeringVector.load(path).provenance == vec.provenance


def test_vector_from_other_d_model_is_refused(tiny_qwen2_dir):
    model = loaded(tiny_qwen2_dir, "transformer_lens")
    vec = SteeringVector(layer=1, vector=torch.ones(model.d_model + 8), method="asc",
                         provenance={"model": "other-model"})
    with pytest.raises(ValueError, match=rf"d_model {model.d_model + 8}.*other-model.*"
                                         rf"d_model {model.d_model}"):
        vec.intervention(model)
    with pytest.raises(ValueError, match="d_model"), vec.apply(model):
        pass
    far = SteeringVector(layer=model.n_layers, vector=torch.ones(model.d_model), method="asc")
    with pytest.raises(ValueError, match="layers 0.."):
        far.intervention(model)


# -- position rules in generation ------------------------------------------------------------------


def _expected_seal_positions(ids, delims, open_id, close_id):
    """Positions p fed to the model whose token is a delimiter inside an open <think>."""
    out, inside = set(), False
    for p, t in enumerate(ids[:-1]):  # the last generated token is never fed back
        if t == open_id:
            inside = True
        elif t == close_id:
            inside = False
        elif inside and t in delims:
            out.add(p)
    return out


@pytest.mark.parametrize("backend", ["transformer_lens", "nnsight"])
def test_seal_rule_steers_exactly_delimiters_inside_think(tiny_qwen2_dir, backend):
    model = loaded(tiny_qwen2_dir, backend)
    delims = delimiter_token_ids(model.tokenizer)
    open_id, close_id = think_token_ids(model.tokenizer)
    vec = SteeringVector(layer=1, vector=torch.randn(model.d_model), method="seal",
                         rule="think_delimiter")
    # promote delimiters and the think marks, so the random model writes them often
    bias = {i: 3.0 for i in delims} | {open_id: 3.0, close_id: 2.5}
    prompts = ["Question: Tom has 3 apples.\n<think>\n", "The cat sat.\n\n",
               "Question: 6 * 7?\n<think>\nWe compute.\n\n"]
    cfg = GenerationConfig(max_new_tokens=40, temperature=1.0, seed=3, logit_bias=bias,
                           stop_at_eos=False, batch_size=2)
    out = model.generate(prompts, cfg, [seal_intervention(model, vec, alpha=1.0)])
    total = skipped = 0
    for b in range(len(prompts)):
        ids = out.prompt_ids[b] + out.generated_ids[b]
        got = {s.position for s in out.steered if s.sequence == b}
        want = _expected_seal_positions(ids, delims, open_id, close_id)
        assert got == want, (b, sorted(got), sorted(want))
        total += len(want)
        skipped += sum(t in delims for t in ids[:-1]) - len(want)
    assert total >= 5 and skipped >= 1  # steered delimiters inside, skipped ones outside
    assert len(out.steered) == len(set(out.steered))  # each position once


def test_context_manager_equals_argument_and_stacks(tiny_qwen2_dir):
    model = loaded(tiny_qwen2_dir, "transformer_lens")
    torch.manual_seed(2)
    a = SteeringVector(layer=0, vector=torch.randn(model.d_model), method="asc", scale=2.0)
    b = SteeringVector(layer=2, vector=torch.randn(model.d_model), method="x", rule="every")
    cfg = GenerationConfig(max_new_tokens=6, stop_at_eos=False)
    prompts = ["Question: Tom has 3 apples", "The cat"]
    direct = model.generate(prompts, cfg, [a.intervention(model), b.intervention(model)])
    with a.apply(model), steer(model, b):
        ctx = model.generate(prompts, cfg)
    assert ctx.generated_ids == direct.generated_ids
    assert set(ctx.steered) == set(direct.steered) and len(ctx.steered) == len(direct.steered)
    assert {s.layer for s in ctx.steered} == {0, 2}
    assert "generate" not in vars(model)  # restored
    plain = model.generate(prompts, cfg)
    assert plain.steered == []


@pytest.mark.parametrize("backend", ["transformer_lens", "nnsight"])
def test_apply_steers_every_forward_nests_and_is_removed(tiny_qwen2_dir, backend):
    """Inside `vec.apply(model)` capture_resid, logits and calibration forwards are steered by
    exactly the vector at exactly the rule's positions and layer; nothing is left after exit,
    even on an exception, and the instance's methods are never replaced."""
    model = loaded(tiny_qwen2_dir, backend)
    seqs = [[5, 6, 7, 8, 9, 10], [3, 4, 5]]
    pos = [list(range(len(s))) for s in seqs]
    layers = list(range(model.n_layers))
    clean, clean_logits = model.capture_resid(seqs, layers, pos), model.logits(seqs)
    v = torch.randn(model.d_model, generator=torch.Generator().manual_seed(7))
    every = SteeringVector(layer=1, vector=v, method="x", rule="every", scale=2.0)
    newest = SteeringVector(layer=0, vector=v, method="x", rule="newest")
    before = dict(vars(model))
    with every.apply(model):
        got = model.capture_resid(seqs, layers, pos)
        assert torch.equal(got[0], clean[0])  # below the site: untouched
        assert torch.allclose(got[1] - clean[1], 2 * v.expand(9, -1), atol=1e-5)  # every row
        assert (got[2] - clean[2]).abs().amax(-1).min() > 1e-3
        logits = model.logits(seqs)
        assert all((a - b).abs().max() > 1e-3 for a, b in zip(logits, clean_logits, strict=True))
        zero = torch.zeros(model.d_model)
        steered_last = model.last_logits_given_delta(seqs[0], 2, zero)
        assert torch.allclose(steered_last, logits[0][-1], atol=1e-4)
        with newest.apply(model):  # nested: adds layer 0 at each sequence's last token only
            inner = model.capture_resid(seqs, layers, pos)
            diff = (inner[0] - clean[0]).abs().amax(-1)
            assert diff.nonzero()[:, 0].tolist() == [5, 8]
            assert torch.allclose(inner[0][[5, 8]] - clean[0][[5, 8]], v.expand(2, -1), atol=1e-5)
        assert torch.equal(model.capture_resid(seqs, layers, pos)[0], got[0])  # inner removed
        assert len(model.active_interventions) == 1
    with pytest.raises(RuntimeError, match="boom"), every.apply(model):
        raise RuntimeError("boom")
    assert model.active_interventions == ()
    after = model.capture_resid(seqs, layers, pos)
    assert all(torch.equal(after[layer], clean[layer]) for layer in layers)
    assert all(torch.equal(a, b) for a, b in zip(model.logits(seqs), clean_logits, strict=True))
    assert set(vars(model)) - set(before) <= {"_iv_stack"}
    assert not any(k in vars(model) for k in ("generate", "logits", "capture", "capture_resid"))


def test_vector_sites_save_and_old_files_load_as_resid_post(tmp_path):
    vec = SteeringVector(vector=torch.ones(4), method="seal", site="blocks.20.hook_resid_pre")
    assert vec.layer == 20
    back = SteeringVector.load(vec.save(tmp_path / "v"))
    assert back.site == "blocks.20.hook_resid_pre" and back.layer == 20
    old = SteeringVector(layer=3, vector=torch.ones(4), method="asc")
    old.save(tmp_path / "old")
    meta = json.loads((tmp_path / "old.json").read_text())
    meta.pop("site")
    meta["format_version"] = 1
    (tmp_path / "old.json").write_text(json.dumps(meta))
    assert SteeringVector.load(tmp_path / "old").site == "blocks.3.hook_resid_post"
    with pytest.raises(ValueError, match="not blocks.1.attn.hook_pattern"):
        SteeringVector(vector=torch.ones(4), method="x", site="blocks.1.attn.hook_pattern")


# -- extraction end to end on a tiny model ---------------------------------------------------------


def test_extract_seal_vector_from_cache(tiny_qwen2_dir, tmp_path):
    from lens_steer.cache import CacheConfig, cache_thoughts, load_cache

    model = loaded(tiny_qwen2_dir, "transformer_lens")
    traces = [{"text": t, "id": i, "correct": i % 2 == 0} for i, t in enumerate(CORPUS)]
    cache_thoughts(model, traces, tmp_path / "c", CacheConfig(layers=[1], progress=False))
    cache = load_cache(tmp_path / "c")
    vec = extract_seal_vector(cache, config=SealConfig(layer=1, variant="both", alpha=0.5),
                              data={"traces": "CORPUS"})
    acts, labels = cache.activations(1), cache.labels
    assert torch.allclose(vec.vector, seal_direction(acts, labels, "both"), atol=1e-6)
    assert (vec.layer, vec.rule, vec.scale, vec.method) == (1, "think_delimiter", 0.5, "seal")
    assert vec.provenance["data"] == {"traces": "CORPUS"} and vec.provenance["date"]
    assert vec.provenance["config"]["variant"] == "both"


def test_extract_asc_vector_matches_manual_capture(tiny_qwen2_dir):
    model = loaded(tiny_qwen2_dir, "transformer_lens")
    pairs = [("Question: Tom has 3 apples.\n<think>\n",
              "Tom starts with 3.\n\nWait, let me check.\n</think>\n7", "3 + 4 = 7\n</think>\n7"),
             ("The cat sat.\n<think>\n", "It slept.\n\nHold on.\n</think>\n1", "1\n</think>\n1")]
    vec = extract_asc_vector(model, pairs, AscConfig(layer=2, trace_end="think_close"))
    rows = []
    for p, v, c in pairs:
        for comp in (c.split("</think>")[0], v.split("</think>")[0]):
            ids = model.encode(p) + model.encode(comp)
            rows.append(model.capture_resid([ids], [2], [[len(ids) - 1]])[2][0])
    raw = ((rows[0] - rows[1]) + (rows[2] - rows[3])) / 2
    assert torch.allclose(vec.vector, raw / raw.norm(), atol=1e-5)
    assert vec.provenance["raw_norm"] == pytest.approx(float(raw.norm()), rel=1e-5)
    assert vec.rule == "newest" and vec.norm == pytest.approx(1.0)


# -- logits-penalty baseline ---------------------------------------------------------------------


def test_trigger_logit_bias(tiny_qwen2_dir):
    model = loaded(tiny_qwen2_dir, "transformer_lens")
    tok = model.tokenizer
    bias = trigger_logit_bias(tok)
    assert set(bias.values()) == {-3.0}
    texts = {i: tok.decode([i]) for i in bias}
    assert all("wait" in t.lower() or "altern" in t.lower() or len(t.strip()) >= 2
               for t in texts.values())
    first = tok("Wait", add_special_tokens=False)["input_ids"][0]
    assert first in bias
    # every token containing the word is there, and no special token
    contains = {i for i in range(len(tok)) if "wait" in tok.decode([i]).lower()}
    assert contains <= set(bias)
    assert not set(bias) & set(tok.all_special_ids)
    only = trigger_token_ids(tok, PenaltyConfig(triggers=("wait",), first_pieces=False))
    assert set(only) == contains
    with pytest.raises(ValueError, match="negative"):
        PenaltyConfig(penalty=3.0)
    # the bias is applied: a huge penalty removes the tokens from greedy output
    cfg = GenerationConfig(max_new_tokens=20, stop_at_eos=False,
                           logit_bias={i: -1e4 for i in bias})
    out = model.generate(["Wait, let me check", "The cat sat on"], cfg)
    assert not set(bias) & {t for g in out.generated_ids for t in g}


# -- the commands end to end (slow) ----------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("command", ["seal", "asc"])
def test_command_writes_run_folder(tiny_qwen2_dir, tmp_path, command):
    import json

    from experiments.cli import main

    out = tmp_path / command
    extra = (["--trace-source", "reference", "--ablation"] if command == "seal"
             else ["--n-calibration", "3", "--n-heldout-states", "3", "--gamma-grid", "1",
                   "--n-val", "3", "--select"])
    assert main([command, "--model", str(tiny_qwen2_dir), "--out", str(out), "--n-train", "12",
                 "--n-eval", "4", "--max-new-tokens", "12", "--speed-prompts", "2",
                 "--layer", "1", *extra]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    for block in ("base", "steered") + (("penalty",) if command == "seal" else ()):
        assert set(metrics[block]) >= {"accuracy", "mean_tokens", "thoughts_per_trace"}
        assert metrics[block]["n"] == 4
    assert json.loads((out / "config.json").read_text())["layer"] == 1
    rows = (out / "records.jsonl").read_text().splitlines()
    conditions = [k for k in metrics if k in ("base", "penalty") or k.startswith("steered")]
    assert len(rows) == 4 * len(conditions) and len(conditions) >= (5 if command == "seal" else 2)
    assert (out / "report.md").exists() and list(out.glob("*.png"))
    vec = SteeringVector.load(out / f"{command}_vector")
    assert vec.layer == 1 and vec.provenance["date"]
    if command == "asc":
        assert metrics["calibration"]["gamma"] > 0 and metrics["kl"]["used_gamma_heldout_states"]
