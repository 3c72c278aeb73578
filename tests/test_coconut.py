"""Coconut: continuous-thought forward, curriculum, masks, data generators, loader, inspection."""

from __future__ import annotations

import pytest
import torch

from lens_steer.coconut.curriculum import (
    IGNORE,
    build_prompt,
    build_sequence,
    collate,
    scheduled_stage,
    stage_plan,
    tokenize_example,
)
from lens_steer.coconut.data import (
    bfs_distances,
    bfs_layers,
    generate_prontoqa,
    generate_prosqa,
    load_prosqa,
)
from lens_steer.coconut.model import (
    END_LATENT,
    LATENT,
    SEP,
    START_LATENT,
    add_latent_tokens,
    build_model,
    build_word_tokenizer,
    continuous_forward,
    generate,
    vocab_words,
)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    tok = build_word_tokenizer(vocab_words())
    model = build_model(tok, d_model=32, n_layers=2, n_heads=2, seed=0, tie_embeddings=False)
    with torch.no_grad():                      # larger weights: differences would be visible
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    ids = add_latent_tokens(model, tok)
    model.eval()
    return model, tok, ids


@pytest.fixture(scope="module")
def problems():
    return generate_prosqa(40, seed=3)


def _batch(tok, ids, problems, k, mode="coconut", stage=None):
    toks = [tokenize_example(tok, e) for e in problems]
    seqs = [build_sequence(t, mode, ids, stage=k if stage is None else stage, c=1,
                           max_latent_stage=k, pad_latent_to_max=True) for t in toks]
    return collate(seqs, tok.pad_token_id)


def _count_passes(model):
    calls = []
    h = model.base_model.register_forward_hook(lambda *a: calls.append(1))
    return calls, h


def _manual_loop(model, input_ids, attention_mask, latent_id):
    """Reference: recompute the whole prefix from scratch for every thought (no cache)."""
    emb = model.get_input_embeddings()(input_ids)
    pos = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    lat = (input_ids == latent_id)
    k = int(lat[0].sum())
    first = int(lat[0].nonzero()[0]) if k else 0
    for i in range(k):
        end = first + i
        h = model.base_model(inputs_embeds=emb[:, :end], attention_mask=attention_mask[:, :end],
                             position_ids=pos[:, :end]).last_hidden_state
        emb = emb.clone()
        emb[:, end] = h[:, -1]
    return model(inputs_embeds=emb, attention_mask=attention_mask, position_ids=pos).logits


@pytest.mark.parametrize("k", [0, 1, 3, 5])
def test_k_latents_make_k_plus_1_passes_and_match_recompute(tiny, problems, k):
    model, tok, ids = tiny
    b = _batch(tok, ids, problems[:3], k)
    assert (b["input_ids"] == ids.latent).sum(1).tolist() == [k] * 3
    calls, h = _count_passes(model)
    try:
        with torch.no_grad():
            out = continuous_forward(model, b["input_ids"], b["attention_mask"], ids.latent)
    finally:
        h.remove()
    assert out.n_passes == k + 1 and len(calls) == k + 1
    with torch.no_grad():
        ref = _manual_loop(model, b["input_ids"], b["attention_mask"], ids.latent)
    real = b["attention_mask"].bool()
    assert torch.allclose(out.logits[real], ref[real], atol=1e-4)
    if k:   # the thoughts really are hidden states, not the <|latent|> embedding
        lat_emb = model.get_input_embeddings().weight[ids.latent]
        assert not torch.allclose(out.thoughts[0, 0], lat_emb)


def test_gradients_flow_through_every_thought(tiny, problems):
    model, tok, ids = tiny
    k = 3
    b = _batch(tok, ids, problems[:2], k)
    passes = []
    h = model.base_model.register_forward_hook(lambda m, a, o: passes.append(o.last_hidden_state))
    try:
        out = continuous_forward(model, b["input_ids"], b["attention_mask"], ids.latent,
                                 labels=b["labels"])
    finally:
        h.remove()
    assert len(passes) == k + 1
    # the last position of pass i < k only feeds thought i (its own next-token label is masked)
    grads = torch.autograd.grad(out.loss, passes[:k])
    assert all(g[:, -1].abs().sum() > 0 for g in grads)
    assert out.thoughts.shape == (2, k, 32)


def test_misaligned_batch_is_rejected(tiny):
    model, tok, ids = tiny
    x = torch.tensor([[5, ids.start, ids.latent, ids.end], [ids.start, ids.latent, ids.end, 5]])
    with pytest.raises(ValueError, match="aligned"):
        continuous_forward(model, x, None, ids.latent)


def test_generate_after_latents_matches_recompute(tiny, problems):
    model, tok, ids = tiny
    toks = [tokenize_example(tok, e) for e in problems[:3]]
    prompts = [build_prompt(t, "coconut", ids, 4) for t in toks]
    gen, _ = generate(model, prompts, latent_id=ids.latent, eos_id=tok.eos_token_id,
                      pad_id=tok.pad_token_id, max_new_tokens=4)
    for p, g in zip(prompts, gen, strict=True):              # unpadded, one prompt at a time, no cache
        seq = list(p)
        for _ in range(4):
            x = torch.tensor([seq])
            with torch.no_grad():
                logits = _manual_loop(model, x, torch.ones_like(x), ids.latent)
            nxt = int(logits[0, -1].argmax())
            if nxt == tok.eos_token_id:
                break
            seq.append(nxt)
        assert seq[len(p):] == g


def test_special_tokens_added_with_copied_embeddings(tiny):
    model, tok, ids = tiny
    vocab = tok.get_vocab()
    assert {START_LATENT, LATENT, END_LATENT} <= set(vocab)
    assert len({ids.start, ids.latent, ids.end}) == 3
    assert tok.pad_token_id != tok.eos_token_id
    tok2 = build_word_tokenizer(vocab_words())
    m2 = build_model(tok2, d_model=16, n_layers=1, n_heads=2)
    ids2 = add_latent_tokens(m2, tok2, init_from=SEP)
    w = m2.get_input_embeddings().weight
    src = tok2.convert_tokens_to_ids(SEP)
    for i in (ids2.start, ids2.latent, ids2.end):
        assert torch.equal(w[i], w[src])
    assert w.shape[0] == len(tok2)
    assert tok2.encode(f"Tom {LATENT} wumpus", add_special_tokens=False)[1] == ids2.latent


def test_stage_plan():
    kw = dict(c=2, max_latent_stage=2, pad_latent_to_max=True)
    assert [stage_plan(s, 3, **kw) for s in range(5)] == [(0, 0), (1, 2), (2, 4), (3, 4), (3, 4)]
    kw = dict(c=1, max_latent_stage=4, pad_latent_to_max=False)
    assert [stage_plan(s, 3, **kw) for s in range(6)] == [(0, 0), (1, 1), (2, 2), (3, 3),
                                                          (3, 3), (3, 3)]
    kw = dict(c=1, max_latent_stage=4, pad_latent_to_max=True)
    assert stage_plan(4, 3, **kw) == (3, 4) and stage_plan(9, 3, **kw) == (3, 4)


def test_scheduled_stage_with_a_longer_stage_0():
    assert [scheduled_stage(e, 2) for e in range(6)] == [0, 0, 1, 1, 2, 2]
    assert [scheduled_stage(e, 1, stage0_epochs=3) for e in range(6)] == [0, 0, 0, 1, 2, 3]
    assert [scheduled_stage(e, 2, stage0_epochs=0) for e in range(4)] == [1, 1, 2, 2]


def test_training_follows_the_stage_0_length(tiny, problems):
    from lens_steer.coconut.train import TrainConfig, train

    _, tok, _ = tiny
    m = build_model(tok, d_model=16, n_layers=1, n_heads=2)
    ids = add_latent_tokens(m, tok)
    res = train(m, tok, ids, problems[:4], TrainConfig(
        mode="coconut", epochs=4, epochs_per_stage=1, stage0_epochs=2, max_latent_stage=2,
        batch_size=4), progress=False)
    assert [h["stage"] for h in res.history] == [0, 0, 1, 2]
    with pytest.raises(ValueError, match="stage0_epochs"):
        TrainConfig(stage0_epochs=-1)


def test_curriculum_sequences_and_masks_for_every_stage(tiny, problems):
    _, tok, ids = tiny
    ex = next(e for e in problems if len(e.steps) == 4)
    t = tokenize_example(tok, ex)
    assert t.answer[0] == tok.convert_tokens_to_ids(SEP) and t.answer[-1] == tok.eos_token_id
    K, c = 3, 2
    for stage in range(K + 2):
        s = build_sequence(t, "coconut", ids, stage=stage, c=c, max_latent_stage=K,
                           pad_latent_to_max=True)
        n_lat = min(stage, K) * c
        n_skip = stage if stage <= K else len(t.steps)
        tail = [x for st in t.steps[n_skip:] for x in st] + t.answer
        prefix = t.question + [ids.start] + [ids.latent] * n_lat + [ids.end]
        assert s.input_ids == prefix + tail
        assert s.labels == [IGNORE] * len(prefix) + tail            # question/markers/latents
        assert s.anchor == len(t.question) + 1 and s.n_latents == n_lat
        assert s.input_ids[s.anchor] in (ids.latent, ids.end)
    cot = build_sequence(t, "cot")
    steps = [x for st in t.steps for x in st]
    assert cot.input_ids == t.question + steps + t.answer
    assert cot.labels == [IGNORE] * len(t.question) + steps + t.answer
    nocot = build_sequence(t, "nocot")
    assert nocot.input_ids == t.question + t.answer
    assert nocot.labels == [IGNORE] * len(t.question) + t.answer
    with pytest.raises(ValueError):
        build_sequence(t, "bogus")


def test_collate_aligns_first_latent_and_masks_padding(tiny, problems):
    _, tok, ids = tiny
    toks = [tokenize_example(tok, e) for e in problems[:6]]
    assert len({len(t.question) for t in toks}) > 1
    seqs = [build_sequence(t, "coconut", ids, stage=2, max_latent_stage=3) for t in toks]
    b = collate(seqs, tok.pad_token_id)
    x, y, m = b["input_ids"], b["labels"], b["attention_mask"]
    firsts = {int((r == ids.latent).nonzero()[0]) for r in x}
    assert len(firsts) == 1
    assert (x[m == 0] == tok.pad_token_id).all() and (y[m == 0] == IGNORE).all()
    assert (y[(x == ids.latent) | (x == ids.start) | (x == ids.end)] == IGNORE).all()
    for row, s in enumerate(seqs):
        assert x[row][m[row].bool()].tolist() == s.input_ids


def test_question_labels_and_question_loss(tiny, problems):
    from lens_steer.coconut.train import TrainConfig, train

    model, tok, ids = tiny
    toks = [tokenize_example(tok, e) for e in problems[:4]]
    for mode in ("coconut", "cot", "nocot"):
        seqs = [build_sequence(t, mode, ids, stage=2, max_latent_stage=3) for t in toks]
        b = collate(seqs, tok.pad_token_id)
        q = b["question_labels"]
        for row, t in enumerate(toks):
            lab = q[row][q[row] != IGNORE].tolist()
            assert lab == t.question[1:]                     # first question token excluded
            start = int(b["attention_mask"][row].nonzero()[0])
            assert q[row][start] == IGNORE and q[row][start + 1] == t.question[1]
    m2 = build_model(tok, d_model=16, n_layers=1, n_heads=2)
    ids2 = add_latent_tokens(m2, tok)
    res = train(m2, tok, ids2, problems[:8], TrainConfig(mode="coconut", epochs=2,
                epochs_per_stage=1, max_latent_stage=2, batch_size=4, question_loss_weight=0.5),
                progress=False)
    assert res.optimizer_steps == 4 and all("question_loss" in h for h in res.history)
    with pytest.raises(ValueError):
        TrainConfig(question_loss_weight=-1)


def test_generator_targets_reachable_distractors_not():
    exs = generate_prosqa(200, seed=0)
    hops = set()
    for e in exs:
        n = len(e.idx_to_symbol)
        dist = bfs_distances(e.edges, n, e.root)
        assert dist[e.target] == len(e.steps)
        assert 3 <= len(e.steps) <= 6
        assert dist[e.neg_target] is None
        hops.add(len(e.steps))
        assert e.answer == f"{e.idx_to_symbol[e.root]} is a {e.idx_to_symbol[e.target]}."
        assert e.question.endswith("?")
        assert e.idx_to_symbol[e.neg_target] in e.question.rstrip("?").split()[-3:]
        for st in e.steps:                              # each step states a graph edge
            assert st in e.question
        assert 10 <= n <= 20 and len(set(e.idx_to_symbol)) == n
        assert bfs_layers(e)[len(e.steps)] >= {e.target}
    assert hops == {3, 4, 5, 6}
    # as in ProsQA both options are leaves, and "more parents" is no shortcut
    n_par = lambda e, x: sum(v == x for _, v in e.edges)  # noqa: E731
    assert all(u not in (e.target, e.neg_target) for e in exs for u, _ in e.edges)
    d = [n_par(e, e.target) - n_par(e, e.neg_target) for e in exs]
    assert abs(sum(x > 0 for x in d) - sum(x < 0 for x in d)) <= 1
    assert [e.to_dict() for e in generate_prosqa(5, seed=1)] == \
        [e.to_dict() for e in generate_prosqa(5, seed=1)]


def test_answer_kind_names_the_option_or_not(tiny):
    from lens_steer.coconut.data import compact_text
    from lens_steer.coconut.evaluate import answer_kind, answer_text

    _, tok, _ = tiny
    e = generate_prosqa(1, seed=2)[0]
    names = e.idx_to_symbol
    other = next(i for i in range(2, len(names)) if i not in (e.target, e.neg_target))
    absent = next(c for c in vocab_words() if c.endswith("pus") and c not in names)
    for ex in (e, compact_text(e)):
        def kind(text, ex=ex):
            return answer_kind(ex, answer_text(tok, tok.encode(text, add_special_tokens=False)))
        assert kind(f"### {ex.answer}") == "target"
        assert kind(f"### {names[e.root]} is a {names[e.neg_target]} .") == "neg_target"
        assert kind(f"### {names[e.root]} {names[other]} .") == "other_node"
        assert kind(f"### {names[e.root]} {absent} .") == "not_a_node"
        assert kind(f"{names[e.root]} {names[e.target]} .") == "no_answer"
    assert answer_kind(generate_prontoqa(1)[0], None) is None


def test_prontoqa_five_hops():
    for e in generate_prontoqa(50, seed=0):
        n = len(e.idx_to_symbol)
        dist = bfs_distances(e.edges, n, e.root)
        assert dist[e.target] == len(e.steps) == 6          # fact + 5 rules
        assert e.answer in ("True.", "False.")
        negated_q = " is not " in e.question.split("True or false:")[1]
        chain_neg = e.idx_to_symbol[e.target].startswith("not ")
        assert (e.answer == "True.") == (negated_q == chain_neg)
        assert all(s in e.question for s in e.steps)


def test_loader_reads_shared_sample(tiny, shared_dir):
    exs = load_prosqa(shared_dir / "data/prosqa/prosqa_valid.json")
    assert len(exs) == 300
    for e in exs[:100]:
        n = len(e.idx_to_symbol)
        dist = bfs_distances(e.edges, n, e.root)
        assert dist[e.target] is not None and dist[e.neg_target] is None
        assert e.answer.startswith(e.idx_to_symbol[e.root])
        assert e.steps and all(isinstance(s, str) for s in e.steps)
    _, tok, ids = tiny                      # the word-level tokenizer covers the real names
    t = tokenize_example(tok, exs[0])
    assert tok.unk_token_id not in t.question


def test_inspect_shapes_and_frontier(tiny, problems):
    from lens_steer.coconut.inspect import frontier_mass, latent_activations, latent_node_probs

    model, tok, ids = tiny
    exs = problems[:4]
    rows = latent_node_probs(model, tok, ids, exs, n_latents=3)
    assert len(rows) == 12 and {r["thought"] for r in rows} == {0, 1, 2}
    assert all(abs(sum(r["node_probs"].values())) <= 1 + 1e-5 for r in rows)
    s = frontier_mass(rows)
    for v in s.values():
        total = v["frontier"] + v["other_reachable"] + v["unreachable"] + v["root"]
        assert 0 <= total <= 1 + 1e-5 and v["n"] == 4
    acts, labels, groups = latent_activations(model, tok, ids, exs, n_latents=3, layers=[0, 2])
    assert set(acts) == {0, 2} and acts[0].shape == (12, 32)
    assert labels == [0, 1, 2] * 4 and groups == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    # layer 0 at thought t >= 1 is the continuous thought itself
    out = continuous_forward(model, _batch(tok, ids, exs, 3)["input_ids"], None, ids.latent)
    assert out.thoughts.shape == (4, 3, 32)


def test_config_validation():
    from lens_steer.coconut.experiment import CoconutRunConfig
    from lens_steer.coconut.train import TrainConfig

    with pytest.raises(ValueError):
        TrainConfig(mode="x")
    with pytest.raises(ValueError):
        TrainConfig(epochs=0)
    with pytest.raises(ValueError):
        CoconutRunConfig(methods=("coconut", "bogus"))
    with pytest.raises(ValueError):
        CoconutRunConfig(generator="huge")
    run = CoconutRunConfig(train={"lr": 3e-4, "epochs": 2})     # one TrainConfig, nested
    assert run.train_config("cot").lr == 3e-4 and run.train_config("cot").mode == "cot"
    assert TrainConfig().reset_optimizer == "epoch" and TrainConfig().lr == 1e-4
    assert TrainConfig(mode="coconut", max_latent_stage=6, c=1).eval_latents == 6
    assert TrainConfig(mode="cot").eval_latents == 0


@pytest.mark.slow
def test_cli_run_end_to_end(tmp_path):
    import argparse

    from experiments import coconut_cmd
    from lens_steer.io import read_json

    p = argparse.ArgumentParser()
    coconut_cmd.register(p.add_subparsers())
    sets = ["n_train=48", "train.epochs=3", "train.epochs_per_stage=1", "train.max_latent_stage=2",
            "n_test=12", "n_val=8", "n_inspect=6", "d_model=32", "train.val_size=8",
            "generator=small", "train.eval_max_new_tokens=24"]
    args = p.parse_args(["coconut", "run", "--out", str(tmp_path / "r"),
                         *[x for s in sets for x in ("--set", s)]])
    assert args.func(args) == 0
    m = read_json(tmp_path / "r" / "metrics.json")
    assert set(m["methods"]) == {"coconut", "cot", "nocot"}
    for f in ("config.json", "records.jsonl", "report.md", "frontier_mass.png", "lens.jsonl"):
        assert (tmp_path / "r" / f).exists()
    from lens_steer.coconut.model import load_saved_model

    model, tok, ids = load_saved_model(tmp_path / "r" / "models" / "coconut")
    assert ids.latent == tok.convert_tokens_to_ids(LATENT)


def test_compact_text_keeps_the_problem():
    from lens_steer.coconut.data import compact_text

    e = generate_prosqa(1, seed=5)[0]
    c = compact_text(e)
    names = e.idx_to_symbol
    assert c.answer == f"{names[e.root]} {names[e.target]} ."
    assert c.steps[0].split() == [names[e.root], e.steps[0].split()[-1].rstrip("."), "."]
    assert c.question.endswith(e.question.rsplit(". ", 1)[1])          # final question kept
    assert "Every" not in c.question and len(c.question) < len(e.question)
    assert (c.edges, c.root, c.target) == (e.edges, e.root, e.target)


def _coconut_cli(*extra_sets: str):
    """`lens-steer coconut ACTION ...` on a tiny config: `train` gets the `--set`s, others not."""
    import argparse

    from experiments import coconut_cmd

    p = argparse.ArgumentParser()
    coconut_cmd.register(p.add_subparsers())
    tiny = ["n_train=8", "n_val=0", "n_test=1", "d_model=32", "n_layers=1", "train.batch_size=4",
            "train.epochs=1", "train.stage0_epochs=0", "generator=small", *extra_sets]

    def cli(action, *argv, sets=()):
        given = [*tiny, *sets] if action == "train" else []
        args = p.parse_args(["coconut", action, *argv, *[x for s in given for x in ("--set", s)]])
        return args.func(args)

    return cli


def test_cli_train_init_continues_from_a_saved_model(tmp_path):
    from lens_steer.io import load_tensors, read_json

    run = _coconut_cli("train.max_latent_stage=1")

    def cli(*argv, lr="0.5"):
        return run("train", *argv, sets=[f"train.lr={lr}"])

    def distance(a, b):
        ta, tb = (load_tensors(tmp_path / n / "model.safetensors") for n in (a, b))
        return max((ta[k] - tb[k]).abs().max().item() for k in ta)

    assert cli("--mode", "cot", "--out", str(tmp_path / "cot")) == 0
    # an lr too small to move the weights: what is saved is what training started from
    assert cli("--mode", "coconut", "--init", str(tmp_path / "cot"),
               "--out", str(tmp_path / "from_cot"), lr="1e-12") == 0
    assert cli("--mode", "coconut", "--out", str(tmp_path / "fresh"), lr="1e-12") == 0
    assert distance("from_cot", "cot") < 1e-6
    assert distance("fresh", "cot") > 1e-3
    assert read_json(tmp_path / "from_cot" / "init.json")["init"] == str(tmp_path / "cot")
    with pytest.raises(SystemExit):
        cli("--mode", "coconut", "--init", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x"))


def test_cli_inspect_reads_a_saved_models_thoughts(tmp_path):
    from lens_steer.coconut.data import save_prosqa
    from lens_steer.io import read_json

    cli = _coconut_cli("train.max_latent_stage=2")

    save_prosqa(tmp_path / "d.json", generate_prosqa(6, seed=3, n_concepts=(7, 9), hops=(3, 5)))
    assert cli("train", "--mode", "coconut", "--out", str(tmp_path / "m")) == 0
    assert cli("inspect", "--model", str(tmp_path / "m"), "--data", str(tmp_path / "d.json"),
               "--out", str(tmp_path / "i")) == 0
    info = read_json(tmp_path / "i" / "inspect.json")
    assert info["n_problems"] == 6 and info["n_latents"] == 2
    assert sorted(info["frontier_mass"]) == ["0", "1"]           # one row per thought
    for row in info["frontier_mass"].values():
        mass = row["frontier"] + row["other_reachable"] + row["unreachable"]
        assert 0 <= mass <= 1 + 1e-6
    assert (tmp_path / "i" / "frontier_mass.png").exists()
    assert cli("train", "--mode", "cot", "--out", str(tmp_path / "c")) == 0
    with pytest.raises(SystemExit, match="cot model"):
        cli("inspect", "--model", str(tmp_path / "c"), "--data", str(tmp_path / "d.json"),
            "--out", str(tmp_path / "j"))
