"""Coconut on any HF causal LM and through both backends; official format, data and schedule."""

from __future__ import annotations

import pytest
import torch

from lens_steer.coconut.curriculum import build_prompt, build_sequence, collate, tokenize_example
from lens_steer.coconut.data import (
    OFFICIAL_SIZE,
    ProsQAExample,
    generate_prosqa,
    load_icot_txt,
    load_prosqa,
    load_steps_json,
    size_stats,
)
from lens_steer.coconut.model import (
    INIT_FROM,
    LATENT,
    add_latent_tokens,
    build_model,
    build_word_tokenizer,
    continuous_forward,
    generate,
    load_saved_model,
    prepare_model,
    save_model,
    train_subword_tokenizer,
    vocab_words,
)
from lens_steer.errors import DataError


def _bigger_weights(model):
    with torch.no_grad():                      # differences between paths would be visible
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)


def _batch(tok, ids, exs, k):
    seqs = [build_sequence(tokenize_example(tok, e), "coconut", ids, stage=k, c=1,
                           max_latent_stage=k) for e in exs]
    return collate(seqs, tok.pad_token_id)


def _recompute(model, x, mask, latent_id):
    """Reference: the prefix recomputed from scratch for every thought (no cache)."""
    emb = model.get_input_embeddings()(x)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    lat = x[0] == latent_id
    first = int(lat.nonzero()[0]) if lat.any() else 0
    for i in range(int(lat.sum())):
        h = model.base_model(inputs_embeds=emb[:, :first + i], attention_mask=mask[:, :first + i],
                             position_ids=pos[:, :first + i]).last_hidden_state
        emb = emb.clone()
        emb[:, first + i] = h[:, -1]
    return model(inputs_embeds=emb, attention_mask=mask, position_ids=pos).logits


@pytest.fixture(scope="module")
def problems():
    return generate_prosqa(6, seed=4)


@pytest.mark.parametrize("arch", ["gpt2", "llama", "qwen2"])
def test_every_architecture_runs_the_latent_loop_and_saves(arch, problems, tmp_path):
    tok = build_word_tokenizer(vocab_words())
    model = build_model(tok, arch=arch, d_model=32, n_layers=2, n_heads=2, tie_embeddings=False)
    _bigger_weights(model)
    ids = add_latent_tokens(model, tok)
    model.eval()
    b = _batch(tok, ids, problems[:3], 3)
    with torch.no_grad():
        out = continuous_forward(model, b["input_ids"], b["attention_mask"], ids.latent)
        ref = _recompute(model, b["input_ids"], b["attention_mask"], ids.latent)
    real = b["attention_mask"].bool()
    assert out.n_passes == 4
    assert torch.allclose(out.logits[real], ref[real], atol=1e-4)
    save_model(model, tok, tmp_path / arch)
    m2, tok2, ids2 = load_saved_model(tmp_path / arch)
    assert ids2 == ids and type(m2) is type(model)
    with torch.no_grad():
        out2 = continuous_forward(m2, b["input_ids"], b["attention_mask"], ids2.latent)
    assert torch.allclose(out2.logits, out.logits, atol=1e-5)


def test_a_failed_save_leaves_the_previous_model_whole(tmp_path, monkeypatch):
    tok = build_word_tokenizer(vocab_words())
    model = build_model(tok, arch="qwen2", d_model=32, n_layers=1, n_heads=2)
    add_latent_tokens(model, tok)
    (tmp_path / "m" / "init").mkdir(parents=True)        # a run folder's other contents stay
    save_model(model, tok, tmp_path / "m")
    before = {f.name: f.read_bytes() for f in (tmp_path / "m").iterdir() if f.is_file()}
    _bigger_weights(model)

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(type(tok), "save_pretrained", boom)
    with pytest.raises(OSError, match="disk full"):
        save_model(model, tok, tmp_path / "m")
    after = {f.name: f.read_bytes() for f in (tmp_path / "m").iterdir() if f.is_file()}
    assert after == before                               # the new weights never landed
    assert sorted(f.name for f in (tmp_path / "m").iterdir() if f.is_dir()) == ["init"]
    load_saved_model(tmp_path / "m")


def test_new_tokens_start_from_the_official_init_token():
    tok = build_word_tokenizer(vocab_words())
    model = build_model(tok, d_model=16, n_layers=1, n_heads=2, tie_embeddings=False)
    ids = add_latent_tokens(model, tok)
    src = tok.convert_tokens_to_ids(INIT_FROM)
    for w in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
        for i in (ids.start, ids.latent, ids.end):
            assert torch.equal(w[i], w[src])
        assert not torch.equal(w[ids.latent], w[tok.eos_token_id])


def test_prepare_model_adds_markers_to_a_hf_folder(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    out = prepare_model(tiny_model_dir, tmp_path / "prepared")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model, tok, ids = load_saved_model(out)
    src = tok.encode(INIT_FROM, add_special_tokens=False)[0]          # "<<" in this BPE
    n_old = base.get_input_embeddings().weight.shape[0]
    w = model.get_input_embeddings().weight
    assert w.shape[0] == len(tok) == n_old + 3
    assert torch.equal(w[:n_old], base.get_input_embeddings().weight)
    assert torch.equal(w[ids.latent], w[src])
    assert tok.encode(f"a{LATENT}b", add_special_tokens=False).count(ids.latent) == 1


@pytest.fixture(scope="module")
def saved_coconut(tmp_path_factory):
    """A tiny from-scratch Coconut model saved as a HF folder, plus a batch with 3 latents."""
    tok = build_word_tokenizer(vocab_words())
    model = build_model(tok, d_model=32, n_layers=2, n_heads=2, tie_embeddings=False)
    _bigger_weights(model)
    ids = add_latent_tokens(model, tok)
    model.eval()
    path = save_model(model, tok, tmp_path_factory.mktemp("coconut") / "m")
    return path, model, tok, ids


@pytest.mark.parametrize("backend", ["transformer_lens", "nnsight"])
def test_backends_run_and_hook_the_latent_passes(saved_coconut, problems, backend):
    """Through a backend the latent loop gives the module's logits, and the logit lens on the
    last block's resid_post, captured by the backend's hooks over every pass, equals the logit
    lens the module computes on its own thoughts."""
    from lens_steer import load_model
    from lens_steer.coconut.inspect import latent_node_probs

    path, model, tok, ids = saved_coconut
    lm = load_model(path, backend=backend)
    b = _batch(tok, ids, problems[:3], 3)
    site = f"blocks.{lm.n_layers - 1}.hook_resid_post"
    with torch.no_grad():
        ref = continuous_forward(model, b["input_ids"], b["attention_mask"], ids.latent)
        out = continuous_forward(lm, b["input_ids"], b["attention_mask"], ids.latent,
                                 sites=[site])
    real = b["attention_mask"].bool()
    assert out.n_passes == 4 and out.captured[site].shape[:2] == b["input_ids"].shape
    # the bridge's kernels differ from the module's in float rounding, amplified by thoughts
    assert torch.allclose(out.logits[real], ref.logits[real], atol=1e-3)
    first = int((b["input_ids"][0] == ids.latent).nonzero()[0])
    resid = out.captured[site][:, first - 1:first + 2]          # positions that emit thoughts
    with torch.no_grad():
        lens_hooks = model.lm_head(model.model.norm(resid))
        lens_module = model.get_output_embeddings()(ref.thoughts)
    assert torch.allclose(lens_hooks, lens_module, atol=1e-3)
    rows_b = latent_node_probs(lm, tok, ids, problems[:2], n_latents=3)
    rows_m = latent_node_probs(model, tok, ids, problems[:2], n_latents=3)
    for rb, rm in zip(rows_b, rows_m, strict=True):
        assert rb["node_probs"] == pytest.approx(rm["node_probs"], abs=1e-4)
    prompts = [build_prompt(tokenize_example(tok, e), "coconut", ids, 3) for e in problems[:3]]
    kw = dict(latent_id=ids.latent, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id,
              max_new_tokens=5)
    assert generate(lm, prompts, **kw)[0] == generate(model, prompts, **kw)[0]


def test_official_sequence_format_and_unk_is_an_error(tmp_path, problems):
    ex = problems[0]
    bpe = train_subword_tokenizer([e.question + "\n" + "\n".join(e.steps) + "\n### " + e.answer
                                   for e in generate_prosqa(50, seed=1)], tmp_path / "bpe",
                                  vocab_size=300)
    t = tokenize_example(bpe, ex)
    whole = bpe.encode(ex.question + "\n" + "\n".join(ex.steps) + "\n### " + ex.answer,
                       add_special_tokens=False)
    assert t.question + [x for s in t.steps for x in s] + t.answer == whole + [bpe.eos_token_id]
    odd = ProsQAExample(question="Every zorblax is a wumpus. Is Tom a zorblax or wumpus?",
                        steps=["Tom is a zorblax."], answer="Tom is a zorblax.")
    with pytest.raises(DataError, match="zorblax"):
        tokenize_example(build_word_tokenizer(vocab_words()), odd)
    assert bpe.unk_token_id is None or bpe.unk_token_id not in tokenize_example(bpe, odd).answer


def test_chain_quality_reads_how_a_written_chain_walks_the_graph():
    from lens_steer.coconut.data import compact_text
    from lens_steer.coconut.evaluate import chain_quality

    ex = generate_prosqa(1, seed=3)[0]
    for e in (ex, compact_text(ex)):                    # official sentences and compact text
        full = chain_quality(e, " ".join(e.steps) + " ### " + e.answer)
        assert full == {"n_steps": len(e.steps), "steps_are_edges": 1.0, "valid": True,
                        "gold": True, "end": "target"}
        short = chain_quality(e, " ".join(e.steps[:-1]) + " ### x")
        assert short["valid"] and not short["gold"] and short["end"] == "inner"
        skipped = chain_quality(e, " ".join(e.steps[1:]) + " ### x")  # does not start at root
        assert not skipped["valid"] and skipped["steps_are_edges"] == 1.0
    names = ex.idx_to_symbol
    made_up = chain_quality(ex, f"{names[ex.root]} is a {names[ex.neg_target]}. ###")
    assert made_up["steps_are_edges"] == 0.0 and made_up["end"] == "neg_target"
    assert chain_quality(ex, "### " + ex.answer)["end"] is None


def test_answers_are_compared_as_text():
    from lens_steer.coconut.evaluate import answer_text, same_answer

    tok = build_word_tokenizer(vocab_words())
    gen = tok.encode("Tom is a wumpus . ### Tom is a yimpus .", add_special_tokens=False)
    assert answer_text(tok, gen).replace(" ", "") == "Tomisayimpus."
    assert same_answer(answer_text(tok, gen), "Tom is a yimpus.")
    assert not same_answer(answer_text(tok, gen), "Tom is a wumpus.")
    assert answer_text(tok, tok.encode("Tom is a", add_special_tokens=False)) is None


def test_real_validation_split_is_covered_and_matched_in_size(shared_dir, tmp_path):
    real = load_prosqa(shared_dir / "data/prosqa/prosqa_valid.json")
    tok = build_word_tokenizer(vocab_words())
    for e in real:                              # the word list covers every official name
        tokenize_example(tok, e)
    gen, ref = size_stats(generate_prosqa(300, seed=0, **OFFICIAL_SIZE)), size_stats(real)
    assert abs(gen["nodes"]["mean"] - ref["nodes"]["mean"]) < 1.5
    assert abs(gen["edges"]["mean"] - ref["edges"]["mean"]) < 3
    assert (gen["nodes"]["min"], gen["nodes"]["max"]) == (ref["nodes"]["min"], ref["nodes"]["max"])
    assert set(gen["hops"]) == set(ref["hops"]) == {3, 4, 5, 6}
    assert all(abs(gen["hops"][h] - ref["hops"][h]) < 0.1 for h in ref["hops"])


def test_steps_json_and_icot_loaders(tmp_path):
    (tmp_path / "g.txt").write_text("Tom has 2 apples and buys 3.||<<2+3=5>> <<5*1=5>> ## 5\n")
    g = load_icot_txt(tmp_path / "g.txt")[0]
    assert g.steps == ["<<2+3=5>>", "<<5*1=5>>"] and g.answer == "5" and g.edges == []
    (tmp_path / "p.json").write_text('[{"question": "q?", "steps": ["a.", "b."], "answer": "True"}]')
    assert load_steps_json(tmp_path / "p.json")[0].steps == ["a.", "b."]
    with pytest.raises(DataError, match="lacks"):
        load_prosqa(tmp_path / "p.json")                  # ProsQA needs the graph fields
    with pytest.raises(DataError, match="no data file"):
        load_steps_json(tmp_path / "missing.json")


def test_official_schedule_reset_uniform_prob_and_best_val(problems, monkeypatch):
    from lens_steer.coconut import train as train_mod
    from lens_steer.coconut.train import TrainConfig, train

    tok = build_word_tokenizer(vocab_words())
    model = build_model(tok, d_model=16, n_layers=1, n_heads=2)
    ids = add_latent_tokens(model, tok)
    made = []
    real_opt = train_mod._optimizer
    monkeypatch.setattr(train_mod, "_optimizer", lambda m, c: made.append(1) or real_opt(m, c))
    stages = []
    real_build = train_mod.build_sequence
    monkeypatch.setattr(train_mod, "build_sequence",
                        lambda t, mode, i, **kw: stages.append(kw["stage"]) or
                        real_build(t, mode, i, **kw))
    cfg = TrainConfig(epochs=4, epochs_per_stage=2, max_latent_stage=1, batch_size=6,
                      uniform_prob=1.0, val_size=3, eval_max_new_tokens=4)
    res = train(model, tok, ids, problems, cfg, val_examples=problems, progress=False)
    assert len(made) == 4                                   # a fresh AdamW every epoch
    assert set(stages) > {0, 1} and max(stages) <= max(len(e.steps) for e in problems)
    eligible = [h for h in res.history if h["val_latents"] == cfg.eval_latents]
    assert [h["stage"] for h in res.history] == [0, 0, 1, 1] and len(eligible) == 2
    best = max(eligible, key=lambda h: h["val_accuracy"])
    assert res.selected_epoch == best["epoch"]
    made.clear()
    train(model, tok, ids, problems, TrainConfig(epochs=4, epochs_per_stage=2, batch_size=6,
                                                  reset_optimizer="stage", select="last"),
          progress=False)
    assert len(made) == 2                                   # start + one stage change


def test_default_data_ships_inside_the_package():
    from pathlib import Path

    import lens_steer.coconut
    from lens_steer.coconut.data import PROSQA_SAMPLE

    assert PROSQA_SAMPLE.is_relative_to(Path(lens_steer.coconut.__file__).parent)
    exs = load_prosqa()
    assert len(exs) == 20 and all(e.edges and e.steps for e in exs)


def test_reachability_labels_and_top_node_reading(saved_coconut, problems):
    from lens_steer.coconut.inspect import frontier_mass, latent_activations

    _, model, tok, ids = saved_coconut
    acts, labels, groups = latent_activations(model, tok, ids, problems, n_latents=3, layers=[0, 2],
                                              label="target_reached", thoughts=[2])
    assert acts[2].shape == (len(problems), 32) and groups == list(range(len(problems)))
    assert labels == [int(len(e.steps) <= 3) for e in problems]
    # node 1 at distance 1, node 2 at distance 2, node 3 unreachable; root 0
    row = {"dist": [0, 1, 2, None], "root": 0, "target": 2, "neg_target": 3}
    rows = [{**row, "thought": 0, "node_probs": {1: 0.5, 2: 0.1, 3: 0.2}},
            {**row, "thought": 0, "node_probs": {1: 0.1, 2: 0.1, 3: 0.6}},
            {**row, "thought": 1, "node_probs": {1: 0.1, 2: 0.7, 3: 0.1}}]
    s = frontier_mass(rows)
    assert s[0]["top_is_frontier"] == 0.5 and s[0]["top_is_reachable"] == 0.5
    assert s[1]["top_is_frontier"] == 1.0 and s[0]["frontier"] == pytest.approx(0.3)


def test_saved_tokenizer_reloads_identically(saved_coconut, problems, tmp_path):
    """A word-level tokenizer saved beside a Qwen2 config must not come back as Qwen2's own
    tokenizer class (which re-splits the text)."""
    path, _, tok, _ = saved_coconut
    _, tok2, _ = load_saved_model(path)
    text = problems[0].question + "\n### " + problems[0].answer
    assert tok2.encode(text, add_special_tokens=False) == tok.encode(text, add_special_tokens=False)
    bpe = train_subword_tokenizer([e.question for e in problems], tmp_path / "bpe", vocab_size=300)
    model = build_model(bpe, d_model=16, n_layers=1, n_heads=2)
    add_latent_tokens(model, bpe)
    _, bpe2, _ = load_saved_model(save_model(model, bpe, tmp_path / "m"))
    assert bpe2.encode(text, add_special_tokens=False) == bpe.encode(text, add_special_tokens=False)
