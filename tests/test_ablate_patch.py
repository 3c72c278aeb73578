"""Ablation and patching studies: edits land exactly at the ablated site and positions, patching a
state with itself changes nothing, patching the last residual carries the source's prediction,
the commands write valid run folders and resume."""

from __future__ import annotations

import json

import pytest
import torch

from lens_steer.ablation import Condition, ablation_conditions, ablation_intervention, site_means
from lens_steer.interventions import Intervention
from lens_steer.patching import (
    Openings,
    RowPositions,
    delimiter_states,
    opening_probability,
    patch_curve,
)
from lens_steer.toy import TOY_MODEL_DIR
from tests.conftest import loaded

SEQS = [[5, 9, 14, 3, 22, 7, 11], [8, 2, 30, 17, 4]]
TINY = dict(n_extract=6, n_eval=3, max_new_tokens=48, batch_size=8)


@pytest.fixture(scope="module")
def tiny(tiny_qwen2_dir):
    return loaded(tiny_qwen2_dir, "transformer_lens")


@pytest.fixture(scope="module")
def toy():
    if not (TOY_MODEL_DIR / "config.json").exists():
        pytest.skip("the shipped toy model is missing (lens-steer toy train)")
    return loaded(TOY_MODEL_DIR, "nnsight")


def _all(seqs):
    return [range(len(s)) for s in seqs]


SITES = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_pre", "blocks.1.hook_attn_out",
         "blocks.1.attn.hook_z", "blocks.1.hook_resid_post", "blocks.1.hook_mlp_out"]


@pytest.mark.parametrize("positions", ["every", "generated"])
def test_zero_ablation_edits_only_its_site_and_positions(tiny, positions):
    clean = tiny.capture(SEQS, SITES, _all(SEQS))
    with tiny.intervening([ablation_intervention(Condition(1, "attn"), positions=positions)]):
        got = tiny.capture(SEQS, SITES, _all(SEQS))
    # rows are sequence-major: the last row of each sequence is its newest position
    last = torch.tensor([sum(map(len, SEQS[:b + 1])) - 1 for b in range(len(SEQS))])
    hit = torch.ones(len(got["blocks.1.hook_attn_out"]), dtype=torch.bool)
    if positions == "generated":
        hit[:] = False
        hit[last] = True
    attn = got["blocks.1.hook_attn_out"]
    assert torch.equal(attn[hit], torch.zeros_like(attn[hit]))
    assert torch.equal(attn[~hit], clean["blocks.1.hook_attn_out"][~hit])
    for upstream in ("blocks.0.hook_resid_post", "blocks.1.hook_resid_pre", "blocks.1.attn.hook_z"):
        assert torch.equal(got[upstream], clean[upstream]), upstream
    for downstream in ("blocks.1.hook_resid_post", "blocks.1.hook_mlp_out"):
        diff = (got[downstream] - clean[downstream]).abs().amax(-1)
        assert (diff[hit] > 1e-4).all(), downstream
        if positions == "generated":  # causal: only the ablated (last) positions change
            assert torch.equal(got[downstream][~hit], clean[downstream][~hit])


def test_head_ablation_zeroes_one_head_and_mean_ablation_sets_the_mean(tiny):
    clean = tiny.capture(SEQS, SITES, _all(SEQS))
    with tiny.intervening([ablation_intervention(Condition(1, "head", 1))]):
        z = tiny.capture(SEQS, ["blocks.1.attn.hook_z"], _all(SEQS))["blocks.1.attn.hook_z"]
    assert torch.equal(z[:, 1], torch.zeros_like(z[:, 1]))
    keep = [h for h in range(z.shape[1]) if h != 1]
    assert torch.equal(z[:, keep], clean["blocks.1.attn.hook_z"][:, keep])

    means = site_means(tiny, SEQS, ["blocks.1.hook_mlp_out", "blocks.1.attn.hook_z"],
                       batch_size=1)
    ref = clean["blocks.1.hook_mlp_out"].double().mean(0).float()
    assert torch.allclose(means["blocks.1.hook_mlp_out"], ref, atol=1e-6)
    assert means["blocks.1.attn.hook_z"].shape == z.shape[1:]
    with tiny.intervening([ablation_intervention(Condition(1, "mlp"), "mean", means)]):
        mlp = tiny.capture(SEQS, ["blocks.1.hook_mlp_out"], _all(SEQS))["blocks.1.hook_mlp_out"]
    assert torch.allclose(mlp, ref.expand_as(mlp), atol=1e-6)


def test_conditions_grid():
    conds = ablation_conditions(4, [0, 2], ("attn", "mlp"), n_heads=3)
    assert [c.name for c in conds[:4]] == ["L0-attn", "L0-mlp", "L2-attn", "L2-mlp"]
    assert [c.site for c in conds[4:7]] == ["blocks.0.attn.hook_z"] * 3
    assert len(conds) == 4 + 2 * 3
    from lens_steer.errors import ConfigError

    with pytest.raises(ConfigError, match="layers 0..3"):
        ablation_conditions(4, [4])
    with pytest.raises(ConfigError, match="site_means"):
        ablation_intervention(Condition(0, "mlp"), "mean")


def test_row_positions_patch_with_its_own_state_leaves_logits_unchanged(tiny):
    site, pos = "blocks.1.hook_resid_post", (3, 2)
    clean = tiny.logits(SEQS)
    own = tiny.capture(SEQS, [site], [[p] for p in pos])[site]
    other = own.flip(0)  # each sequence gets the other one's state

    def patched(states):
        src = [states.new_zeros(len(s), states.shape[-1]) for s in SEQS]
        for b, p in enumerate(pos):
            src[b][p] = states[b]
        with tiny.intervening([Intervention.patch(site, src, rule=RowPositions(pos))]):
            return tiny.logits(SEQS)

    same = patched(own)
    for a, b in zip(clean, same, strict=True):
        assert (a - b).abs().max() < 1e-5
    moved = patched(other)
    for b, (a, m) in enumerate(zip(clean, moved, strict=True)):
        p = pos[b]
        assert torch.equal(a[:p], m[:p])  # causal: before the patch nothing moves
        assert (a[p:] - m[p:]).abs().max() > 1e-3


def _toy_traces(toy, n=12):
    from lens_steer.toy.splits import heldout_problems

    return [toy.encode(p.prompt + p.verbose_trace) for p in heldout_problems(n, 11)]


def test_patching_the_last_residual_carries_the_source_prediction(toy):
    traces = _toy_traces(toy)
    states = delimiter_states(toy, traces)
    assert {s.label for s in states} >= {"reflection", "execution"}
    first = sorted({(traces[s.trace][s.position + 1],) for s in states
                    if s.label == "reflection"})  # "Let": shared with transitions, still a gap
    op = Openings("reflection", 1, tuple(first), 1.0)
    last = toy.n_layers - 1
    rows = patch_curve(toy, traces, states, op, [0, last], n_pairs=6)
    top = rows[-1]
    assert top["p_source_clean"] > top["p_target_clean"] + 0.05  # a real gap to move
    assert top["p_patched"] == pytest.approx(top["p_source_clean"], abs=1e-5)
    assert top["effect"] == pytest.approx(1.0, abs=1e-4)
    ctx = [traces[s.trace][:s.position + 1] for s in states[:3]]
    site = f"blocks.{last}.hook_resid_post"
    own = toy.capture(ctx, [site], [[len(c) - 1] for c in ctx])[site]
    assert torch.allclose(opening_probability(toy, ctx, op, patch=(site, own)),
                          opening_probability(toy, ctx, op), atol=1e-6)


def _valid(path, *keys):
    for name in ("config.json", "metrics.json", "report.md"):
        assert (path / name).exists(), name
    metrics = json.loads((path / "metrics.json").read_text())
    assert all(k in metrics for k in keys)
    report = (path / "report.md").read_text()
    for img in [ln.split("(")[1].rstrip(")") for ln in report.splitlines() if ln.startswith("![")]:
        assert (path / img).exists(), img
    return metrics, report


def _no_recompute(monkeypatch):
    import lens_steer.eval.runner as runner
    import lens_steer.patching as patching

    def boom(*a, **k):
        raise AssertionError("finished work was recomputed")

    monkeypatch.setattr(runner, "run_eval", boom)
    monkeypatch.setattr(patching, "opening_probability", boom)


def test_ablate_command_table_and_resume(toy, tmp_path, monkeypatch):
    from experiments.ablate import AblateConfig, run_ablate

    cfg = AblateConfig(model=str(TOY_MODEL_DIR), backend="nnsight", layers=[0, 3],
                       components=["attn", "mlp"], n_problems=3, **TINY)
    out = run_ablate(cfg, tmp_path / "ab", model=toy)
    m, report = _valid(out, "base", "conditions")
    assert [r["condition"] for r in m["conditions"]] == ["L0-attn", "L0-mlp", "L3-attn",
                                                         "L3-mlp"]
    assert all(r["change"].keys() >= {"accuracy_points", "mean_tokens", "reflection_per_trace"}
               for r in m["conditions"])
    assert report.count("\n| L") == 4 and "| base |" in report
    assert len((out / "records.jsonl").read_text().splitlines()) == 5 * 3
    assert (out / "ablation_heatmap.png").stat().st_size > 0
    _no_recompute(monkeypatch)
    run_ablate(cfg, out, model=toy)  # every evaluation is a finished stage


def test_patch_command_curve_and_resume(toy, tmp_path, monkeypatch):
    from experiments.patch import PatchConfig, run_patch

    cfg = PatchConfig(model=str(TOY_MODEL_DIR), backend="nnsight", n_traces=16, n_pairs=4,
                      **{**TINY, "max_new_tokens": 320})
    out = run_patch(cfg, tmp_path / "pa", model=toy)
    m, report = _valid(out, "curves", "openings")
    for rows in m["curves"].values():
        assert [r["layer"] for r in rows] == list(range(toy.n_layers))
    assert (out / "patch_curve.png").exists() and "| 3 | blocks.3.hook_resid_post" in report
    _no_recompute(monkeypatch)
    run_patch(cfg, out, model=toy)


def test_cli_runs_both_commands_on_a_tiny_model(tiny_qwen2_dir, tmp_path, capsys):
    from experiments.cli import main

    common = ["--model", str(tiny_qwen2_dir), "--n-extract", "3", "--n-eval", "2",
              "--max-new-tokens", "8", "--batch-size", "4"]
    assert main(["ablate", *common, "--layers", "1", "--heads", "--n-problems", "2",
                 "--out", str(tmp_path / "a")]) == 0
    m = json.loads((tmp_path / "a" / "metrics.json").read_text())
    heads = loaded(tiny_qwen2_dir, "transformer_lens").n_heads
    assert len(m["conditions"]) == 2 + heads
    # random weights write no thoughts: the patch study refuses with one line, exit 2
    assert main(["patch", *common, "--n-traces", "2", "--out", str(tmp_path / "p")]) == 2
    assert "reflection" in capsys.readouterr().err


def test_evaluation_keys_tell_operations_and_heads_apart():
    from experiments.pipeline import intervention_key

    z = "blocks.1.attn.hook_z"
    keys = [intervention_key(Intervention.zero_ablate(z, head=h)) for h in (0, 1)]
    keys.append(intervention_key(Intervention.scaled(z, 0.0, head=0)))
    assert len({json.dumps(k, sort_keys=True) for k in keys}) == 3
    plain = intervention_key(Intervention(layer=1, vector=torch.ones(4)))
    assert "op" not in plain and "head" not in plain  # keys of existing run folders still match


@pytest.mark.parametrize("command", ["ablate", "patch"])
def test_commands_take_the_shared_model_options_and_splits(command):
    from experiments.cli import build_parser
    from experiments.common import study_splits
    from experiments.config import resolve_config
    from tests.test_cli import MODEL_FLAGS

    parser = build_parser()
    args = parser.parse_args([command, *MODEL_FLAGS])
    cfg = resolve_config(args._config_cls, args)
    assert cfg.load_options()["dtype"] == "bf16" and cfg.backend == "nnsight"
    plain = resolve_config(args._config_cls, parser.parse_args([command]))
    demo = parser.parse_args(["demo"])
    ref = study_splits(resolve_config(demo._config_cls, demo)).eval
    assert [p.question for p in study_splits(plain).eval] == [p.question for p in ref]
