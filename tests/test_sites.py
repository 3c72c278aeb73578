"""Sites and operations: every site's capture equals the model's own tensor on both backends, every
operation does what it says and gives the same logits and tokens on both backends, with the KV
cache and without, and the papers' sites read what the papers read."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from lens_steer import GenerationConfig, Intervention
from lens_steer.backends.hf_hooks import ENV as FAST_DECODE_ENV
from lens_steer.errors import ConfigError
from lens_steer.interventions import AtPositions, EveryPosition, NewestPosition
from lens_steer.sites import Site, all_sites, parse_site
from tests.conftest import loaded

BACKENDS = ["transformer_lens", "nnsight"]
SEQS = [[5, 6, 7, 8, 9, 10, 11, 12], [3, 4, 5], [20, 21, 22, 23, 24]]
SOURCE = [40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57]
# module paths of the reference hooks, written independently of lens_steer's own table
HF_PATHS = {
    "llama": ("model.layers", "self_attn", "self_attn.o_proj", "mlp", "post_attention_layernorm",
              "model.norm"),
    "gpt2": ("transformer.h", "attn", "attn.c_proj", "mlp", "ln_2", "transformer.ln_f"),
}


def _build(arch: str, out, tokenizer):
    """A 2-block random model of `arch` (weights ~N(0, 0.1) so edits move the logits)."""
    from transformers import GPT2Config, GPT2LMHeadModel, MistralConfig, MistralForCausalLM

    from lens_steer.testing import build_tiny_model

    if arch in ("qwen2", "llama"):
        path = build_tiny_model(out, arch, tokenizer=tokenizer, n_layers=2)
        hf = AutoModelForCausalLM.from_pretrained(path)
        _random_vectors(hf)
        hf.save_pretrained(path)
        return path
    ids = dict(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
               bos_token_id=tokenizer.eos_token_id, vocab_size=len(tokenizer),
               tie_word_embeddings=False)
    torch.manual_seed(0)
    if arch == "gpt2":
        hf = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=128, **ids))
    else:
        hf = MistralForCausalLM(MistralConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, **ids))
    with torch.no_grad():
        for p in hf.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.1)
    _random_vectors(hf)
    tokenizer.save_pretrained(out)
    hf.save_pretrained(out)
    return out


def _random_vectors(hf) -> None:
    """Non-unit norm weights and non-zero biases everywhere: a random init leaves norm weights
    at 1 and biases at 0, which hides any site taken before / after a norm's weight."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if p.dim() == 1:
                if name.endswith("weight"):  # 1-d weights are the norms' gains
                    p.copy_(1 + 0.5 * torch.randn(p.shape, generator=g))
                else:
                    p.copy_(0.1 * torch.randn(p.shape, generator=g))
    assert any(p.dim() == 1 and (p - 1).abs().max() > 0.1 for p in hf.parameters())


_BUILT: dict = {}


def _arch_dir(arch: str, tmp_path_factory, tokenizer_dir):
    """Each architecture's model is built once per session."""
    from transformers import PreTrainedTokenizerFast

    if arch not in _BUILT:
        tok = PreTrainedTokenizerFast.from_pretrained(tokenizer_dir)
        _BUILT[arch] = _build(arch, tmp_path_factory.mktemp(f"sites-{arch}"), tok)
    return arch, _BUILT[arch]


@pytest.fixture(params=["fast", "own"])
def decode_path(request, monkeypatch):
    """Both decode paths: the plain HF modules with torch hooks (the default) and the backend's
    own machinery (bridge / one nnsight trace a step). Returns `check(model)`, which asserts
    that the last generation of `model` ran on that path."""
    monkeypatch.setenv(FAST_DECODE_ENV, "1" if request.param == "fast" else "0")

    def check(model) -> None:
        own = "bridge" if model.name == "transformer_lens" else "nnsight"
        assert model.last_decode_path == ("hf" if request.param == "fast" else own)
    check.path = request.param
    return check


@pytest.fixture(scope="session", params=["qwen2", "llama", "gpt2", "mistral"])
def arch_model(request, tmp_path_factory, tiny_tokenizer_dir):
    return _arch_dir(request.param, tmp_path_factory, tiny_tokenizer_dir)


def hf_sites(path, arch: str, seq: list[int]) -> dict[str, torch.Tensor]:
    """Every site of one unpadded sequence, read from plain HF: hidden_states and torch hooks."""
    hf = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager")
    layers_p, attn_p, o_p, mlp_p, ln2_p, norm_p = HF_PATHS["gpt2" if arch == "gpt2" else "llama"]
    get = hf.get_submodule
    got, handles = {}, []
    n = hf.config.num_hidden_layers
    heads = hf.config.num_attention_heads
    for L in range(n):
        block = f"{layers_p}.{L}"

        def put(name, fn):
            return lambda m, *a: got.__setitem__(name, fn(*a)[0])

        handles += [
            get(f"{block}.{attn_p}").register_forward_hook(put(f"blocks.{L}.hook_attn_out",
                                                              lambda i, o: o[0])),
            get(f"{block}.{mlp_p}").register_forward_hook(put(f"blocks.{L}.hook_mlp_out",
                                                             lambda i, o: o)),
            get(f"{block}.{o_p}").register_forward_pre_hook(
                put(f"blocks.{L}.attn.hook_z", lambda i: i[0].unflatten(-1, (heads, -1)))),
            get(f"{block}.{ln2_p}").register_forward_pre_hook(
                put(f"blocks.{L}.hook_resid_mid", lambda i: i[0])),
            get(block).register_forward_hook(put(f"blocks.{L}.hook_resid_post",
                                                 lambda i, o: o[0] if isinstance(o, tuple) else o)),
        ]
    handles.append(get(norm_p).register_forward_hook(put("ln_final.hook_normalized",
                                                         lambda i, o: o)))
    with torch.no_grad():
        out = hf(torch.tensor([seq]), output_hidden_states=True, output_attentions=True)
    for h in handles:
        h.remove()
    for L in range(n):
        got[f"blocks.{L}.hook_resid_pre"] = out.hidden_states[L][0]
        got[f"blocks.{L}.attn.hook_pattern"] = out.attentions[L][0].transpose(0, 1)  # q, h, k
        if L + 1 < n:  # hidden_states[n] is after the final norm in HF
            assert torch.equal(out.hidden_states[L + 1][0], got[f"blocks.{L}.hook_resid_post"])
    assert torch.equal(out.hidden_states[n][0], got["ln_final.hook_normalized"])
    return got


# -- the vocabulary ---------------------------------------------------------------------------------


def test_site_names_parse_and_refuse_clearly():
    assert parse_site(3) == Site("resid_post", 3)
    assert parse_site("blocks.20.hook_resid_pre") == Site("resid_pre", 20)
    assert parse_site("blocks.2.attn.hook_z").per_head
    assert parse_site("ln_final.hook_normalized").layer is None
    names = all_sites(2)
    assert len(names) == 15 and names[0] == "blocks.0.hook_resid_pre"
    assert names[-1] == "ln_final.hook_normalized"
    assert all(parse_site(n).name == n for n in names)
    with pytest.raises(ConfigError, match="supported sites: blocks.L.hook_resid_pre"):
        parse_site("blocks.1.hook_resid_middle")
    with pytest.raises(ConfigError, match="captured but not edited"):
        Intervention.zero_ablate("blocks.0.attn.hook_pattern")
    with pytest.raises(ConfigError, match="per-head site"):
        Intervention.zero_ablate("blocks.0.hook_mlp_out", head=1)
    for bad in (math.nan, math.inf):
        with pytest.raises(ConfigError, match="finite"):
            Intervention(1, torch.ones(4), scale=bad)
        with pytest.raises(ConfigError, match="NaN/inf"):
            Intervention(1, torch.tensor([1.0, bad]))
        with pytest.raises(ConfigError, match="finite"):
            GenerationConfig(temperature=bad)
        with pytest.raises(ConfigError, match="finite"):
            GenerationConfig(top_p=bad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unknown_sites_layers_and_architectures_are_refused(tiny_qwen2_dir, backend):
    model = loaded(tiny_qwen2_dir, backend)
    with pytest.raises(ConfigError, match="supported sites"):
        model.capture(SEQS, ["blocks.0.hook_nothing"], [[0]] * 3)
    with pytest.raises(ConfigError, match="unknown layer 9"):
        model.capture(SEQS, ["blocks.9.hook_resid_pre"], [[0]] * 3)
    with pytest.raises(ConfigError, match="unknown head 7"):
        model.generate(SEQS, GenerationConfig(max_new_tokens=1),
                       [Intervention.zero_ablate("blocks.0.attn.hook_z", head=7)])
    with pytest.raises(ConfigError, match=r"needs \(16,\)"):
        model.generate(SEQS, GenerationConfig(max_new_tokens=1),
                       [Intervention.mean_ablate("blocks.0.attn.hook_z", torch.ones(64), head=0)])


def test_nnsight_names_the_supported_architectures(tiny_qwen2_dir):
    from lens_steer import load_model

    model = load_model(tiny_qwen2_dir, backend="nnsight")
    model.model_type = "opt"
    with pytest.raises(ConfigError, match=r"no site map for model_type 'opt'.*'gpt2'"):
        model.capture(SEQS, ["blocks.0.hook_resid_pre"], [[0]] * 3)


# -- parity: captures ---------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_site_capture_equals_the_models_own_tensor(arch_model, backend):
    arch, path = arch_model
    model = loaded(path, backend)
    sites = all_sites(model.n_layers)
    got = model.capture(SEQS, sites, [list(range(len(s))) for s in SEQS])
    offset = 0
    for seq in SEQS:
        ref = hf_sites(path, arch, seq)
        for name in sites:
            g = got[name][offset:offset + len(seq)]
            if name.endswith("hook_pattern"):
                assert not g[:, :, len(seq):].any()  # keys beyond the sequence are empty
                g = g[:, :, :len(seq)]
            assert g.shape == ref[name].shape, name
            assert (g - ref[name]).abs().max() < 1e-5, (arch, backend, name)
        offset += len(seq)
    # the logit-lens site is what the unembedding reads (after the final norm's weight)
    final = got["ln_final.hook_normalized"]
    logits = torch.cat(model.logits(SEQS))
    with torch.no_grad():
        assert (model.unembed(final) - logits).abs().max() < 1e-4, (arch, backend)
    old = model.capture_resid(SEQS, [1], [[0, -1], [1], [2, 0]])
    new = model.capture(SEQS, ["blocks.1.hook_resid_post"], [[0, -1], [1], [2, 0]])
    assert torch.equal(old[1], new["blocks.1.hook_resid_post"])


# -- operations ------------------------------------------------------------------------------------


def _ops(model) -> dict[str, Intervention]:
    g = torch.Generator().manual_seed(0)
    v = torch.randn(model.d_model, generator=g) * 2
    source = model.capture([SOURCE], ["blocks.0.hook_resid_post", "blocks.1.attn.hook_z"],
                           [list(range(len(SOURCE)))])
    return {
        "add": Intervention.add("blocks.1.hook_resid_pre", v, EveryPosition()),
        "zero": Intervention.zero_ablate("blocks.0.hook_attn_out"),
        "mean": Intervention.mean_ablate("blocks.1.hook_mlp_out", v),
        "project_out": Intervention.project_out("blocks.1.hook_resid_mid", v),
        "scale": Intervention.scaled("blocks.0.hook_resid_post", 0.25),
        "patch": Intervention.patch("blocks.0.hook_resid_post",
                                    source["blocks.0.hook_resid_post"], AtPositions((1, 2, 9))),
        "head_zero": Intervention.zero_ablate("blocks.1.attn.hook_z", head=1),
        "head_patch": Intervention.patch("blocks.1.attn.hook_z",
                                         source["blocks.1.attn.hook_z"][:, 2], head=2),
        "hook": Intervention.hook("ln_final.hook_normalized", lambda x: x.flip(-1)),
    }


@pytest.mark.parametrize("arch", ["qwen2", "llama", "gpt2"])
def test_every_operation_gives_the_same_logits_and_tokens_on_both_backends(
        arch, tmp_path_factory, tiny_tokenizer_dir, decode_path):
    _, path = _arch_dir(arch, tmp_path_factory, tiny_tokenizer_dir)
    tl, nn = (loaded(path, b) for b in BACKENDS)
    base = tl.logits(SEQS)
    cfg = GenerationConfig(max_new_tokens=5, stop_at_eos=False)
    for name, iv in _ops(tl).items():
        outs = []
        for model in (tl, nn):
            with model.intervening([iv]):
                logits = model.logits(SEQS)
            gen = model.generate(SEQS, cfg, [iv])
            decode_path(model)
            outs.append((logits, gen))
        (la, ga), (lb, gb) = outs
        for a, b in zip(la, lb, strict=True):
            assert (a - b).abs().max() < 1e-4, (arch, name)
        assert any((a - c).abs().max() > 1e-3 for a, c in zip(la, base, strict=True)), name
        assert ga.generated_ids == gb.generated_ids, (arch, name)
        assert ga.steered == gb.steered and ga.steered, name
        assert {(s.site, s.op) for s in ga.steered} == {(iv.site.name, iv.op)}
        # with the KV cache each position is edited once, as a plain forward edits it: the
        # generated tokens are the greedy tokens of the edited forward over the whole text
        for model, gen in ((tl, ga), (nn, gb)):
            full = [p + g for p, g in zip(gen.prompt_ids, gen.generated_ids, strict=True)]
            with model.intervening([iv]):
                replay = model.logits(full)
            for p, g, lg in zip(gen.prompt_ids, gen.generated_ids, replay, strict=True):
                assert lg[len(p) - 1:-1].argmax(-1).tolist() == g, (model.name, name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_operations_do_what_they_say(tiny_qwen2_dir, backend):
    """Read back each edited site (captures see the edit) and compare with the clean run."""
    model = loaded(tiny_qwen2_dir, backend)
    pos = [list(range(len(s))) for s in SEQS]
    sites = ["blocks.1.hook_resid_mid", "blocks.1.hook_mlp_out", "blocks.1.hook_resid_post",
             "blocks.1.attn.hook_z", "blocks.0.hook_resid_post"]
    clean = model.capture(SEQS, sites, pos)
    v = torch.randn(model.d_model, generator=torch.Generator().manual_seed(1))
    u = v / v.norm()

    def under(iv):
        with model.intervening([iv]):
            return model.capture(SEQS, sites, pos)

    got = under(Intervention.project_out("blocks.1.hook_resid_mid", v))
    assert (got["blocks.1.hook_resid_mid"] @ u).abs().max() < 1e-4
    # the edit reached the residual stream itself: resid_post = edited resid_mid + MLP
    assert torch.allclose(got["blocks.1.hook_resid_post"],
                          got["blocks.1.hook_resid_mid"] + got["blocks.1.hook_mlp_out"], atol=1e-5)
    got = under(Intervention.mean_ablate("blocks.1.hook_mlp_out", v, AtPositions((0, 2))))
    lengths = [len(s) for s in SEQS]
    rows = [sum(lengths[:b]) + p for b in range(3) for p in (0, 2) if p < lengths[b]]
    assert torch.allclose(got["blocks.1.hook_mlp_out"][rows], v.expand(len(rows), -1))
    others = [r for r in range(sum(lengths)) if r not in rows]
    assert torch.equal(got["blocks.1.hook_mlp_out"][others], clean["blocks.1.hook_mlp_out"][others])
    got = under(Intervention.scaled("blocks.0.hook_resid_post", 0.5))
    assert torch.allclose(got["blocks.0.hook_resid_post"], 0.5 * clean["blocks.0.hook_resid_post"],
                          atol=1e-6)
    got = under(Intervention.zero_ablate("blocks.1.attn.hook_z", head=3))
    z, z0 = got["blocks.1.attn.hook_z"], clean["blocks.1.attn.hook_z"]
    assert not z[:, 3].any() and torch.equal(z[:, :3], z0[:, :3])
    seen = {}
    got = under(Intervention.hook("blocks.1.hook_mlp_out",
                                  lambda x: seen.setdefault("shape", x.shape) and 2 * x))
    assert seen["shape"][-1] == model.d_model
    assert torch.allclose(got["blocks.1.hook_mlp_out"], 2 * clean["blocks.1.hook_mlp_out"],
                          atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_patching_every_position_reproduces_the_source_run(tiny_qwen2_dir, backend):
    model = loaded(tiny_qwen2_dir, backend)
    target = [9, 8, 7, 6, 5, 4, 3, 2]
    source = SOURCE[:len(target)]
    site = "blocks.1.hook_resid_pre"
    acts = model.capture([source], [site], [list(range(len(source)))])[site]
    with model.intervening([Intervention.patch(site, acts)]):
        patched = model.logits([target])[0]
    assert (patched - model.logits([source])[0]).abs().max() < 1e-4
    # one position only: earlier positions keep the target's logits, later ones change
    with model.intervening([Intervention.patch(site, acts, AtPositions((5,)))]):
        one = model.logits([target])[0]
    clean = model.logits([target])[0]
    assert torch.equal(one[:5], clean[:5]) and (one[5:] - clean[5:]).abs().max() > 1e-3
    with pytest.raises(ConfigError, match="source has 8 positions"):
        model.generate([target], GenerationConfig(max_new_tokens=2),
                       [Intervention.patch(site, acts, NewestPosition())])


# -- the papers' sites -----------------------------------------------------------------------------


def test_paper_sites_read_the_hidden_states_the_papers_used(tmp_path, tiny_tokenizer_dir):
    """SEAL reads and steers HF hidden_states[L] = blocks.L.hook_resid_pre; ASC reads
    hidden_states[L] (resid_pre L) and adds to decoder layer L's output = blocks.L.hook_resid_post.
    Same mapping as the real settings (L = 20 / 55 / 57), on a 4-block Qwen2."""
    from transformers import PreTrainedTokenizerFast

    from lens_steer import load_model
    from lens_steer.steering import SteeringVector
    from lens_steer.testing import build_tiny_model

    tok = PreTrainedTokenizerFast.from_pretrained(tiny_tokenizer_dir)
    path = build_tiny_model(tmp_path, "qwen2", tokenizer=tok, n_layers=4)
    hf = AutoModelForCausalLM.from_pretrained(path)
    seq = SEQS[0]
    with torch.no_grad():
        hs = hf(torch.tensor([seq]), output_hidden_states=True).hidden_states
    L = 2
    v = torch.randn(hf.config.hidden_size, generator=torch.Generator().manual_seed(4))
    for backend in BACKENDS:
        model = load_model(path, backend=backend)
        got = model.capture([seq], [f"blocks.{L}.hook_resid_pre"], [list(range(len(seq)))])
        assert (got[f"blocks.{L}.hook_resid_pre"] - hs[L][0]).abs().max() < 1e-5  # SEAL, ASC read
        # SEAL steers hidden_states[L]: the input of decoder layer L
        seal = SteeringVector(vector=v, method="seal", site=f"blocks.{L}.hook_resid_pre",
                              rule="every")
        handle = hf.model.layers[L].register_forward_pre_hook(lambda m, a: (a[0] + v, *a[1:]))
        with torch.no_grad():
            ref = hf(torch.tensor([seq])).logits[0]
        handle.remove()
        with seal.apply(model):
            assert (model.logits([seq])[0] - ref).abs().max() < 1e-4
        # ASC adds to the output of decoder layer L: resid_post L (= hidden_states[L + 1])
        asc = SteeringVector(layer=L, vector=v, method="asc", rule="every")
        assert asc.site == f"blocks.{L}.hook_resid_post"
        handle = hf.model.layers[L].register_forward_hook(lambda m, a, o: o + v)
        with torch.no_grad():
            ref = hf(torch.tensor([seq])).logits[0]
        handle.remove()
        with asc.apply(model):
            assert (model.logits([seq])[0] - ref).abs().max() < 1e-4


@pytest.mark.parametrize("mode", [dict(remote="local", remote_decode="recompute"),
                                  dict(remote="local", remote_decode="cache"),
                                  dict(prefill_chunk=3)], ids=["recompute", "cache", "chunked"])
def test_operations_survive_every_nnsight_decode_mode(tiny_qwen2_dir, mode, decode_path):
    """The recompute history re-applies every edit (patch values included) over the whole
    prefix; chunked prefill splits them by column; NDIF serialisation ships them."""
    from lens_steer import load_model

    ref = loaded(tiny_qwen2_dir, "nnsight")
    model = load_model(tiny_qwen2_dir, backend="nnsight", **mode)
    ops = _ops(ref)
    ivs = [ops["patch"], ops["head_zero"], ops["project_out"], ops["add"], ops["add"]]
    cfg = GenerationConfig(max_new_tokens=5, stop_at_eos=False)
    a, b = ref.generate(SEQS, cfg, ivs), model.generate(SEQS, cfg, ivs)
    decode_path(ref)
    assert a.generated_ids == b.generated_ids and a.steered == b.steered
    pos = [[0, 2], [1], [-1]]
    with ref.intervening(ivs), model.intervening(ivs):
        ca = ref.capture(SEQS, ["blocks.1.attn.hook_z", "ln_final.hook_normalized"], pos)
        cb = model.capture(SEQS, ["blocks.1.attn.hook_z", "ln_final.hook_normalized"], pos)
    assert all((ca[k] - cb[k]).abs().max() < 1e-5 for k in ca)


# -- the fast decode path (plain HF modules, torch hooks) ------------------------------------------


@pytest.mark.parametrize("arch", ["qwen2", "gpt2"])
def test_transformer_lens_fast_decode_calls_user_hooks_and_falls_back(
        arch, tmp_path_factory, tiny_tokenizer_dir, monkeypatch):
    """Hooks a user attaches to the bridge at served sites run on the fast path with the same
    hook name and tensor (and their edits count); a hook point the HF modules cannot serve
    (attention pattern) keeps the generation on the bridge, with the same tokens."""
    _, path = _arch_dir(arch, tmp_path_factory, tiny_tokenizer_dir)
    model = loaded(path, "transformer_lens")
    v = torch.randn(model.d_model, generator=torch.Generator().manual_seed(3)) * 2
    ivs = [Intervention.add("blocks.1.hook_resid_pre", v, EveryPosition()),
           Intervention.zero_ablate("blocks.0.attn.hook_z", head=1)]
    cfg = GenerationConfig(max_new_tokens=5, stop_at_eos=False)
    seen: dict[str, list] = {}

    def user(key):
        def mlp(x, hook):
            seen[key].append((hook.name, x.clone()))
            return 1.5 * x

        def z(x, hook):
            seen[key].append((hook.name, x.clone()))
            return torch.cat([0.5 * x[:, :, :1], x[:, :, 1:]], dim=2)
        return [("blocks.0.hook_mlp_out", mlp), ("blocks.1.attn.hook_z", z)]

    out, ran = {}, {}
    for key, env in (("fast", "1"), ("bridge", "0")):
        monkeypatch.setenv(FAST_DECODE_ENV, env)
        seen[key] = []
        with model.bridge.hooks(fwd_hooks=user(key)):
            out[key] = model.generate(SEQS, cfg, ivs)
        ran[key] = model.last_decode_path
    assert ran == {"fast": "hf", "bridge": "bridge"}
    assert out["fast"].generated_ids == out["bridge"].generated_ids
    assert out["fast"].steered == out["bridge"].steered
    assert [n for n, _ in seen["fast"]] == [n for n, _ in seen["bridge"]]
    assert len(seen["fast"]) == 2 * cfg.max_new_tokens
    for (_, a), (_, b) in zip(seen["fast"], seen["bridge"], strict=True):
        # the newest position (padding columns hold different junk under eager and SDPA)
        assert a.shape == b.shape and (a[:, -1] - b[:, -1]).abs().max() < 1e-4
    monkeypatch.setenv(FAST_DECODE_ENV, "1")
    plain = model.generate(SEQS, cfg, ivs)
    assert model.last_decode_path == "hf"
    assert plain.generated_ids != out["fast"].generated_ids  # the user's hooks took effect
    with model.bridge.hooks(fwd_hooks=[("blocks.0.attn.hook_pattern", lambda x, hook: None)]):
        kept = model.generate(SEQS, cfg, ivs)
    assert model.last_decode_path == "bridge"
    assert kept.generated_ids == plain.generated_ids and kept.steered == plain.steered
