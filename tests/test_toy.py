"""The toy reasoner: generator determinism/format, SEAL labels, the shipped model, tiny training."""

from __future__ import annotations

import pytest
import torch

from lens_steer.eval.metrics import extract_prediction
from lens_steer.thoughts import LABELS, label_thought
from lens_steer.toy import TOY_MODEL_DIR
from lens_steer.toy.problems import generate_problems, split_verbose_thoughts

EASY = [  # (prompt, answer): fixed easy problems the shipped model must solve greedily
    ("Sam has 12 apples. He gets 5 more. Then he gives away 3. How many apples does Sam have "
     "now?\n<think>\n", 14),
    ("Mia has 20 coins. She doubles her coins. Next, she finds 4 more. How many coins does Mia "
     "have now?\n<think>\n", 44),
    ("Tom has 31 cards. He loses 2. Then he gets 6 more. How many cards does Tom have now?"
     "\n<think>\n", 35),
    ("Ana has 15 shells. She buys 3 more. After that, she doubles her shells. How many shells "
     "does Ana have now?\n<think>\n", 36),
]


def test_generator_is_deterministic_and_well_formed():
    a, b = generate_problems(50, seed=7), generate_problems(50, seed=7)
    assert [p.text() for p in a] == [p.text() for p in b]
    assert [p.text() for p in a] != [p.text() for p in generate_problems(50, seed=8)]
    for p in a:
        assert 2 <= len(p.steps) <= 6
        assert p.prompt.endswith("\n<think>\n") and p.prompt.startswith(p.question)
        for trace, ans in ((p.verbose_trace, p.verbose_answer), (p.concise_trace, p.answer)):
            assert trace.count("</think>") == 1
            assert trace.endswith(f"</think>\n\n\\boxed{{{ans}}}")
        assert "\n\n" not in p.concise_trace.split("</think>")[0]  # concise: no thoughts
        assert len(p.concise_trace) < len(p.verbose_trace)
        assert len(split_verbose_thoughts(p.verbose_trace)) == len(p.thought_kinds)
        assert all(t.endswith(".") for t in split_verbose_thoughts(p.verbose_trace))
        assert p.answer == p.steps[-1].after and all(0 <= s.after < 100 for s in p.steps)


def test_seal_labels_recover_generator_kinds():
    problems = generate_problems(2000, seed=3)
    pairs = [(label_thought(t), k) for p in problems
             for t, k in zip(split_verbose_thoughts(p.verbose_trace), p.thought_kinds,
                                 strict=True)]
    agree = sum(a == b for a, b in pairs) / len(pairs)
    assert agree >= 0.99
    kinds = {k for _, k in pairs}
    assert kinds == set(LABELS)


def test_failed_traces_reflect_more():
    problems = generate_problems(3000, seed=4)

    def rt(ps):
        return sum(sum(k != "execution" for k in p.thought_kinds) for p in ps) / len(ps)

    ok = [p for p in problems if p.verbose_correct]
    bad = [p for p in problems if not p.verbose_correct]
    assert bad and rt(bad) > rt(ok)
    assert 0.75 < len(ok) / len(problems) < 0.97


def _shipped():
    if not (TOY_MODEL_DIR / "config.json").exists():
        pytest.skip("no shipped toy model yet")
    return TOY_MODEL_DIR


def test_shipped_model_files():
    d = _shipped()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "training_config.json",
                 "eval_metrics.json"):
        assert (d / name).exists(), name
    assert sum(f.stat().st_size for f in d.iterdir()) <= 20 * 2**20


def test_shipped_model_solves_easy_problems_hf():
    """Plain Hugging Face loading and generation (no backend) solve the easy problems."""
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    d = _shipped()
    tok = PreTrainedTokenizerFast.from_pretrained(d, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert any("\n\n" in tok.decode([i]) for i in range(len(tok)))
    enc = tok([p for p, _ in EASY], return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.inference_mode():
        gen = model.generate(**enc, max_new_tokens=200, do_sample=False,
                             pad_token_id=tok.pad_token_id)
    texts = tok.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert [extract_prediction(t) for t in texts] == [str(a) for _, a in EASY], texts


@pytest.mark.parametrize("backend", ["transformer_lens", "nnsight"])
def test_shipped_model_loads_on_backends(backend):
    _shipped()
    import lens_steer
    from lens_steer.backends.base import GenerationConfig

    model = lens_steer.load_model("toy", backend=backend, device="cpu")
    out = model.generate([p for p, _ in EASY[:2]], GenerationConfig(max_new_tokens=200))
    assert [extract_prediction(t) for t in out.texts] == [str(a) for _, a in EASY[:2]], out.texts


def test_tiny_training_lowers_loss(tmp_path):
    from lens_steer.io import read_json
    from lens_steer.toy.train import TrainConfig, train

    cfg = TrainConfig(out_dir=str(tmp_path / "m"), n_problems=200, vocab_size=300, d_model=32,
                      n_layers=1, n_heads=2, n_kv_heads=1, d_mlp=64, steps=25, batch_size=8,
                      lr=1e-2, warmup_steps=2)
    path = train(cfg, progress=False)
    log = read_json(path / "training_log.json")
    curve = log["loss_every_10"]
    assert curve[-1] < curve[0] - 0.5
    assert (path / "model.safetensors").exists() and (path / "training_config.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp leftovers
    from transformers import Qwen2ForCausalLM

    model = Qwen2ForCausalLM.from_pretrained(path)
    assert model.config.pad_token_id is not None and model.config.eos_token_id is not None
    assert torch.isfinite(next(model.parameters())).all()


def test_cli_registers_toy():
    import argparse

    from experiments import cli, toy

    assert "experiments.toy" in cli.COMMAND_MODULES
    parser = argparse.ArgumentParser()
    toy.register(parser.add_subparsers())
    args = parser.parse_args(["toy", "eval", "--n", "3", "--out", "x"])
    assert args.n == 3 and args.model == "toy" and callable(args.func)
    args = parser.parse_args(["toy", "train", "--steps", "7", "--no-bf16"])
    assert args.steps == 7 and args.bf16 is False and args.init_from is None


def test_eval_goes_through_the_one_path(tmp_path):
    """Toy eval = run_eval on a ModelBackend: records and metrics agree, and interventions
    passed to it reach generation."""
    _shipped()
    import lens_steer
    from lens_steer.eval.toy import evaluate
    from lens_steer.interventions import EveryPosition, Intervention
    from lens_steer.io import read_json, read_jsonl

    model = lens_steer.load_model("toy", backend="nnsight", device="cpu")
    evaluate(model, n=8, out_dir=tmp_path, progress=False, max_new_tokens=160)
    m = read_json(tmp_path / "metrics.json")
    rows = read_jsonl(tmp_path / "records.jsonl")
    assert len(rows) == m["n"] == 8
    assert m["accuracy"] == sum(r["correct"] for r in rows) / 8 >= 0.5
    assert m["accuracy"] == sum(r["predicted"] == r["gold"] for r in rows) / 8
    rt = sum(lab in ("reflection", "transition") for r in rows for lab in r["thought_labels"])
    assert m["reflection_transition_per_trace"] == pytest.approx(rt / 8)
    assert m["mean_tokens"] == pytest.approx(sum(r["n_tokens"] for r in rows) / 8)
    assert m["concise_share"] == sum(r["meta"]["style"] == "concise" for r in rows) / 8
    assert sum(m["thought_share"].values()) == pytest.approx(1.0) or rt == 0
    assert set(m["by_correctness"]) == {"correct", "incorrect"}

    noise = torch.randn(model.d_model, generator=torch.Generator().manual_seed(0))
    wreck = Intervention(layer=1, vector=noise * 50, rule=EveryPosition())
    steered = evaluate(model, n=8, progress=False, max_new_tokens=160, interventions=[wreck])
    assert steered["accuracy"] < m["accuracy"]


@pytest.mark.parametrize("lr", [float("nan"), float("inf"), 0.0, -1e-3])
def test_training_configs_refuse_bad_learning_rates(lr):
    from lens_steer.coconut.train import TrainConfig as CoconutTrain
    from lens_steer.errors import ConfigError
    from lens_steer.toy.train import TrainConfig as ToyTrain

    for cls in (ToyTrain, CoconutTrain):
        with pytest.raises(ConfigError, match="lr"):
            cls(lr=lr)
