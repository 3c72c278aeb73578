"""Efficient-reasoning methods on the toy reasoner: each does what it claims, costs are counted."""

from __future__ import annotations

import pytest
import torch

from lens_steer import GenerationConfig, load_model
from lens_steer.errors import ConfigError
from lens_steer.methods import END_THINK, MethodResult, evaluate_method, thinking_split
from lens_steer.registry import STEERING_METHODS

CFG = GenerationConfig(max_new_tokens=320, batch_size=16)


@pytest.fixture(scope="module")
def toy():
    torch.set_num_threads(1)
    return load_model("toy")


@pytest.fixture(scope="module")
def problems():
    from lens_steer.toy.splits import heldout_problems

    return heldout_problems(8, 7)


@pytest.fixture(scope="module")
def base(toy, problems):
    return STEERING_METHODS.get("base")().generate(toy, [p.prompt for p in problems], CFG)


def test_registry_has_every_method_and_rejects_unknown_options():
    assert {"base", "penalty", "seal", "asc", "cod", "deer", "budget"} <= set(
        STEERING_METHODS.names())
    with pytest.raises(ConfigError, match="no option"):
        STEERING_METHODS.get("budget")(budjet=3)
    with pytest.raises(ConfigError, match="cap, extend or both"):
        STEERING_METHODS.get("budget")(mode="sideways")


def test_base_accounting_splits_at_think_close(toy, base):
    assert isinstance(base, MethodResult)
    for ids, text, t in zip(base.generated_ids, base.texts, base.tokens, strict=True):
        assert t.thinking + t.answer == len(ids) and t.trial == 0
        assert END_THINK in text and END_THINK not in toy.decode(ids[:t.thinking])
        assert toy.decode(ids[t.thinking:]).startswith(END_THINK)
    assert base.n_generated == [len(g) for g in base.generated_ids]


def test_budget_cap_stops_thinking_at_exactly_n(toy, problems, base):
    n = 20
    res = STEERING_METHODS.get("budget")(budget=n, mode="cap").generate(
        toy, [p.prompt for p in problems], CFG)
    for t, b in zip(res.tokens, base.tokens, strict=True):
        assert t.thinking == min(n, b.thinking)
    assert any(b.thinking > n for b in base.tokens)
    for ids, t in zip(res.generated_ids, res.tokens, strict=True):
        assert toy.decode(ids[t.thinking:]).lstrip("\n").startswith(END_THINK)
        assert thinking_split(toy, ids).thinking in (t.thinking, t.thinking + 1)  # forced "\n"


def test_budget_extend_replaces_early_ends_with_wait(toy, problems, base):
    res = STEERING_METHODS.get("budget")(budget=150, mode="extend", max_extensions=1).generate(
        toy, [p.prompt for p in problems], CFG)
    for t, b, text, ext in zip(res.tokens, base.tokens, res.texts, res.extensions, strict=True):
        if b.thinking < 150:
            assert ext == 1 and "Wait" in text.split(END_THINK)[0]
            assert t.thinking > b.thinking
        else:
            assert ext == 0
    both = STEERING_METHODS.get("budget")(budget=60, mode="both", max_extensions=4).generate(
        toy, [p.prompt for p in problems], CFG)
    assert all(t.thinking <= 60 for t in both.tokens)
    assert sum(t.thinking == 60 for t in both.tokens) >= 6


def test_deer_counts_every_trial_token(toy, problems, base):
    prompts = [p.prompt for p in problems]
    eager = STEERING_METHODS.get("deer")(triggers=("\n\n",), threshold=1e-6).generate(
        toy, prompts, CFG)
    never = STEERING_METHODS.get("deer")(triggers=("\n\n",), threshold=1.0).generate(
        toy, prompts, CFG)
    trial_len = len(toy.encode("\n</think>\n\n\\boxed{"))
    for res in (eager, never):
        for t, trials, n_gen in zip(res.tokens, res.trials, res.n_generated, strict=True):
            assert n_gen == t.thinking + t.answer + t.trial
            assert t.trial >= trial_len * len(trials)
            assert all(0.0 <= tr["confidence"] <= 1.0 for tr in trials)
    # eager: exits at the first trigger (one trial, shorter thinking whenever there is one)
    assert any(len(tr) == 1 for tr in eager.trials)
    for t, b, trials in zip(eager.tokens, base.tokens, eager.trials, strict=True):
        assert len(trials) <= 1 and (t.thinking < b.thinking if trials else True)
    # never confident: thinks as long as base, paying for a trial at every trigger
    assert sum(len(t) for t in never.trials) > sum(len(t) for t in eager.trials)
    assert [t.thinking for t in never.tokens] == [b.thinking for b in base.tokens]
    capped = STEERING_METHODS.get("deer")(triggers=("\n\n",), threshold=1.0,
                                          max_trials=1).generate(toy, prompts, CFG)
    assert max(len(t) for t in capped.trials) == 1  # then it thinks on without probes
    assert [t.thinking for t in capped.tokens] == [b.thinking for b in base.tokens]


def test_deer_confidence_matches_the_model(toy, problems):
    deer = STEERING_METHODS.get("deer")(triggers=("\n\n",))
    ctx = [toy.encode(problems[0].prompt + "12 + 3 = 15\n</think>\n\n\\boxed{")]
    ans = [toy.encode("15}")]
    (conf,) = deer._confidence(toy, ctx, ans)
    logits = toy.logits([ctx[0] + ans[0]])[0]
    n = len(ctx[0])
    probs = [torch.softmax(logits[n - 1 + j].float(), -1)[a].item() for j, a in enumerate(ans[0])]
    assert conf == pytest.approx(sum(probs) / len(probs), rel=1e-5)


def test_chain_of_draft_prompt_differs(toy, problems):
    cod = STEERING_METHODS.get("cod")()
    p = problems[0].prompt
    assert cod.prompt(p) != p and "five words" in cod.prompt(p)
    assert cod.prompt(p).endswith("<think>\n")  # instruction before the thinking starts
    r1 = "<｜User｜>Q<｜Assistant｜><think>\n"
    assert cod.prompt(r1).index("five words") < cod.prompt(r1).index("<｜Assistant｜>")
    res = cod.generate(toy, [p], GenerationConfig(max_new_tokens=4))
    assert res.prompt_ids[0] == toy.encode(cod.prompt(p))


def test_penalty_biases_trigger_tokens(toy):
    cfg = STEERING_METHODS.get("penalty")(penalty=-5.0).gen_config(toy, CFG)
    wait = toy.encode("Wait")[0]
    assert cfg.logit_bias[wait] == -5.0


def test_evaluate_method_goes_through_run_eval(toy, problems):
    from lens_steer.eval.toy import as_problems

    probs = as_problems(problems, 7)
    method = STEERING_METHODS.get("budget")(budget=20, mode="cap")
    records, summary = evaluate_method(method, toy, probs, "toy", template="toy", config=CFG)
    assert len(records) == len(probs) and summary["method"]["budget"] == 20
    for r in records:
        tk = r.meta["tokens"]
        assert tk["thinking"] <= 20 and r.n_tokens == tk["total"]
    assert summary["mean_thinking_tokens"] <= 20
    assert summary["mean_tokens"] == pytest.approx(summary["mean_total_tokens"])


def test_seal_and_asc_prepare_on_toy(toy, tmp_path):
    from lens_steer.eval.toy import as_problems
    from lens_steer.toy.splits import heldout_problems

    train = heldout_problems(16, 11)
    probs = as_problems(train, 11)
    for p, t in zip(probs, train, strict=True):
        p.meta.update(verbose_trace=t.verbose_trace, concise_trace=t.concise_trace)
    seal = STEERING_METHODS.get("seal")()
    info = seal.prepare(toy, probs, tmp_path / "seal", CFG, template="toy", dataset="toy")
    assert info["layer"] == 3 and info["norm"] > 0 and len(seal.interventions) == 1
    asc = STEERING_METHODS.get("asc")(gamma=5.0)
    info = asc.prepare(toy, probs, tmp_path / "asc", CFG, template="toy")
    assert info["gamma"] == 5.0 and len(asc.interventions) == 1
    out = asc.generate(toy, [train[0].prompt], GenerationConfig(max_new_tokens=8))
    assert out.steered  # the vector was applied
