"""Presets without weights (issue 18.7): a tiny random model of each preset's architecture and
depth, with the real Qwen2 tokenizer, reads and writes the preset's documented tensors, with its
sign and scale, under its prompt, exactly as the official code's hooks do."""

from __future__ import annotations

import json
import os

import pytest
import torch

from lens_steer.errors import ConfigError
from lens_steer.presets import PRESETS, get_preset, preset_names

QWEN2 = "/work/shared/data/tokenizers/qwen2"
R1_SPECIAL = ["<｜begin▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>", "<think>", "</think>"]
TRACE_SO_FAR = "Let me add 2 and 3.\n\n"  # ends on a delimiter: the first step steers (SEAL)


def test_registry_and_modes():
    assert set(preset_names()) == {
        "seal-r1-distill-qwen-1.5b", "seal-r1-distill-qwen-7b", "seal-qwq-32b-preview",
        "asc-r1-distill-qwen-7b", "asc-r1-distill-llama-8b", "asc-qwq-32b"}
    p = get_preset("asc-r1-distill-qwen-7b")
    assert (p.read_site, p.write_site, p.sign, p.strength) == (
        "blocks.20.hook_resid_pre", "blocks.20.hook_resid_post", -1.0, 0.27)
    c = get_preset("asc-r1-distill-qwen-7b:corrected")
    assert c.read_site == c.write_site == "blocks.20.hook_resid_post" and c.sign == 1.0
    assert get_preset("seal-r1-distill-qwen-7b", "corrected").labeller == "seal"
    assert get_preset("seal-qwq-32b-preview").region == "all"
    o = get_preset("seal-r1-distill-qwen-1.5b").overrides  # the sites themselves, not layer - 1
    assert "layer" not in o and (o["read_site"], o["write_site"], o["think_region"]) == (
        "blocks.20.hook_resid_pre", "blocks.20.hook_resid_pre", "think")
    assert get_preset("seal-qwq-32b-preview").overrides["think_region"] == "all"
    assert get_preset("seal-qwq-32b-preview").overrides["labeller"] == "seal-official"
    assert get_preset("seal-qwq-32b-preview:corrected").overrides["labeller"] == "seal"
    o = get_preset("asc-qwq-32b").overrides
    assert (o["read_site"], o["write_site"], o["asc_gamma"], o["asc_vector"]) == (
        "blocks.57.hook_resid_pre", "blocks.57.hook_resid_post", -0.5, "raw")
    for p in PRESETS.values():  # every setting says where it comes from
        missing = {"hub_id", "read_site", "write_site", "vector", "sign", "strength", "template",
                   "bos", "max_new_tokens", "temperature", "dtype", "n_extract", "selection",
                   "grading"} - set(p.sources)
        assert not missing, (p.name, missing)
    with pytest.raises(ConfigError, match="seal-r1-distill-qwen-7b"):
        get_preset("seal-r1-7b")
    with pytest.raises(ConfigError, match="corrected"):
        get_preset("asc-qwq-32b", "clean")


def test_cli_defaults_are_known_config_keys():
    import dataclasses

    from experiments.asc import AscStudyConfig
    from experiments.config import build_config
    from experiments.seal import SealStudyConfig

    for p in PRESETS.values():
        for mode in ("", ":corrected"):
            cls = SealStudyConfig if p.method == "seal" else AscStudyConfig
            keys = {f.name for f in dataclasses.fields(cls)}
            assert set(p.overrides) <= keys, (p.name, set(p.overrides) - keys)
            cfg = build_config(cls, preset=p.name + mode)
            assert cfg.write_site == get_preset(p.name + mode).write_site


def test_seal_prompt_matches_the_official_string():
    p = get_preset("seal-r1-distill-qwen-7b")
    assert p.format_prompt(" What is 2+3? ") == (
        "<｜begin▁of▁sentence｜><｜User｜>Answer the following questions. You should think "
        "step-by-step and put your final answer within \\boxed{}.\nQuestion: What is 2+3?"
        "<｜Assistant｜><think>\n")


# ----------------------------------------------------------------------------- tiny models

@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    if not os.path.isdir(QWEN2):
        pytest.skip("needs ../shared/data/tokenizers/qwen2")
    from transformers import AutoTokenizer

    out = {}
    for kind in ("r1", "qwen"):
        tok = AutoTokenizer.from_pretrained(QWEN2)
        if kind == "r1":  # the R1-distill tokenizers add these as special tokens
            tok.add_special_tokens({"bos_token": R1_SPECIAL[0],
                                    "additional_special_tokens": R1_SPECIAL[1:]})
        out[kind] = tok
    return out


_MODELS: dict = {}


def _tiny(preset, tokenizers, tmp_path_factory):
    from lens_steer import load_model
    from lens_steer.testing import build_tiny_model

    kind = "r1" if preset.template in ("seal-r1", "asc-r1") else "qwen"
    key = (preset.arch, preset.n_layers, kind)
    if key not in _MODELS:
        out = tmp_path_factory.mktemp(f"{preset.arch}-{preset.n_layers}-{kind}")
        build_tiny_model(out, preset.arch, d_model=32, n_layers=preset.n_layers, n_heads=2,
                         n_kv_heads=1, tokenizer=tokenizers[kind])
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()
        _MODELS[key] = (load_model(out, backend="nnsight"), hf, tokenizers[kind])
    return _MODELS[key]


def _official_seal_hook(hf, preset, tok, vector):
    """modeling_qwen2.py: before decoder layer L, hidden[:, -1] += coef·v when the newest token
    is a 'ĊĊ' token and the think flag (set by <think>, cleared by </think>) is on."""
    vocab = tok.get_vocab()
    split = {i for t, i in vocab.items() if "ĊĊ" in t}
    start = tok.encode("<think>", add_special_tokens=False)[0]
    end = tok.encode("</think>", add_special_tokens=False)[0]
    state = {"flag": None}
    coef = preset.sign * preset.strength

    def on_model(_m, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if state["flag"] is None:
            state["flag"] = bool((ids == start).any())
        last = int(ids[0, -1])
        state["flag"] = (state["flag"] or last == start) and last != end
        if preset.region == "all":  # the whole generation counts as thinking (see below)
            state["flag"] = True
        state["steer"] = state["flag"] and last in split

    def on_layer(_m, args, kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        if state["steer"]:
            h = h.clone()
            h[:, -1] += coef * vector
        return ((h, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": h})

    layer = int(preset.write_site.split(".")[1])
    return [hf.model.register_forward_pre_hook(on_model, with_kwargs=True),
            hf.model.layers[layer].register_forward_pre_hook(on_layer, with_kwargs=True)]


def _official_asc_hook(hf, preset, vector):
    """generate.py add_steer on model.layers[L]: output[:, -1] -= gamma·v."""
    def add_steer(_m, _inputs, output):
        h = output[0] if isinstance(output, tuple) else output
        h[:, -1, :] = h[:, -1, :] + preset.sign * preset.strength * vector
        return (h, *output[1:]) if isinstance(output, tuple) else h
    layer = int(preset.write_site.split(".")[1])
    return [hf.model.layers[layer].register_forward_hook(add_steer)]


@pytest.mark.parametrize("name", [
    pytest.param(n, marks=pytest.mark.slow) if PRESETS[n].n_layers > 32 else n
    for n in sorted(PRESETS)])  # the 64-layer (32B) ones take ~10 s each: slow
def test_preset_reads_and_writes_the_documented_tensors(name, tokenizers, tmp_path_factory):
    from lens_steer.generation import GenerationConfig

    preset = get_preset(name)
    model, hf, tok = _tiny(preset, tokenizers, tmp_path_factory)
    prompt = preset.format_prompt("What is 2+3?") + (TRACE_SO_FAR if preset.method == "seal"
                                                    else "")
    ids = model.encode(prompt)
    # the prompt: one BOS for R1 (spelt by the template), none for Qwen; official ids
    bos = tok.bos_token_id
    assert ids.count(bos) == (1 if "R1" in preset.hub_id and bos is not None else 0)
    if preset.template == "seal-r1":
        assert prompt.startswith("<｜begin▁of▁sentence｜><｜User｜>Answer the following")
    # read: the documented site equals HF hidden_states[L] (input of decoder layer L)
    L = int(preset.read_site.split(".")[1])
    got = model.capture([ids], [preset.read_site], [[len(ids) - 1]])[preset.read_site][0]
    with torch.no_grad():
        ref = hf(torch.tensor([ids]), output_hidden_states=True).hidden_states[L][0, -1]
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    # write: sign·strength·v at the documented site and positions == the official hook
    torch.manual_seed(0)
    v = torch.randn(model.d_model) * 4 / max(preset.strength, 1e-3)
    cfg = GenerationConfig(max_new_tokens=6, temperature=0.0, stop_at_eos=False)
    ours = model.generate([prompt], cfg, [preset.intervention(model, v)]).generated_ids[0]
    plain = model.generate([prompt], cfg).generated_ids[0]
    hooks = (_official_seal_hook(hf, preset, tok, v) if preset.method == "seal"
             else _official_asc_hook(hf, preset, v))
    try:
        with torch.no_grad():
            out = hf.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False,
                              attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                              pad_token_id=tok.pad_token_id or 0)
    finally:
        for h in hooks:
            h.remove()
    assert ours == out[0, len(ids):].tolist()
    assert ours != plain  # the edit changes the output, so the comparison can fail


def test_qwq_preview_has_no_think_token(tokenizers):
    """Why seal-qwq-32b-preview counts the whole generation as thinking: the Qwen2 tokenizer
    spells <think> in three pieces, so the official flag (`encode("<think>")[0]`, i.e. "<th")
    would be set only by a "<th" token; the preset steers every delimiter instead."""
    tok = tokenizers["qwen"]
    assert [tok.decode([i]) for i in tok.encode("<think>", add_special_tokens=False)] == [
        "<th", "ink", ">"]
    from lens_steer.thoughts import think_token_ids

    assert think_token_ids(tok) == (None, None)


# ------------------------------------------------------------------ the CLI path (--preset)

TRACE = ("Question: What is 2+3?\n\nFirst add 2 and 3 to get 5.\n\nWait, let me check that "
         "again.\n\nAlternatively, count up from 2.\n\nThen 2, 3, 4, 5.\n\nSo the answer is 5.")


def _recording(model):
    """Wrap `model.generate` to keep every call's interventions and result."""
    calls = []
    inner = model.generate

    def generate(prompts, config, interventions=(), **kw):
        out = inner(prompts, config, interventions, **kw)
        calls.append((list(interventions), out))
        return out

    model.generate = generate
    return calls


def _cli_config(argv):
    from experiments.cli import build_parser
    from experiments.config import resolve_config

    args = build_parser().parse_args(argv)
    return resolve_config(args._config_cls, args)


def test_seal_qwq_preset_from_the_cli_steers_every_delimiter(tokenizers, tmp_path, capsys):
    """`lens-steer seal --preset seal-qwq-32b-preview` on a tokenizer without <think>: the
    preset's think region "all" gets past the delimiter rule, and S is added at every delimiter
    step of the generation (prefill and decode), at the write site."""
    from experiments.cli import main
    from experiments.seal import run_seal
    from lens_steer import load_model
    from lens_steer.testing import build_tiny_model
    from lens_steer.thoughts import delimiter_token_ids

    tok = tokenizers["qwen"]
    d = build_tiny_model(tmp_path / "m", "qwen2", d_model=32, n_layers=2, n_heads=2,
                         n_kv_heads=1, tokenizer=tok)
    traces = tmp_path / "traces.jsonl"
    prompt, response = TRACE.split("\n\n", 1)  # the JSONL trace format (lens_steer.traces)
    traces.write_text("\n".join(json.dumps({"prompt": prompt + "\n\n", "response": response,
                                            "correct": i % 2 == 0, "id": f"t{i}"})
                                for i in range(4)) + "\n")
    site = "blocks.1.hook_resid_pre"  # the preset's site kind, on a 2-block model
    argv = ["seal", "--preset", "seal-qwq-32b-preview", "--model", str(d), "--backend",
            "nnsight", "--dtype", "fp32", "--dataset", "toy", "--template",
            "{problem}\n\n", "--read-site", site, "--write-site", site, "--traces",
            str(traces), "--n-extract", "2", "--n-eval", "2", "--max-new-tokens", "12",
            "--speed-prompts", "0", "--out", str(tmp_path / "run")]
    cfg = _cli_config(argv)
    assert (cfg.think_region, cfg.alpha, cfg.read_site, cfg.write_site) == ("all", 1.0, site, site)
    # the region "think" has no <think> token to follow: one line, before any forward
    err_argv = [*argv[:-1], str(tmp_path / "bad"), "--think-region", "think"]
    assert main(err_argv) == 2
    err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("lens-steer: error")]
    assert len(err) == 1 and "<think>" in err[0]
    model = load_model(d, backend="nnsight")
    calls = _recording(model)
    out = run_seal(cfg, tmp_path / "run", model=model)
    m = json.loads((out / "metrics.json").read_text())
    assert m["vector"]["think_region"] == "all" and m["vector"]["write_site"] == site
    assert m["vector"]["labeller"] == "seal-official"
    assert m["vector"]["read_site"] == site and "every delimiter" in (out / "report.md").read_text()
    # the steered run: S exactly at the delimiter steps of prompt end + generation
    delims = delimiter_token_ids(tok)
    steered = [(ivs, res) for ivs, res in calls if ivs and ivs[0].op == "add"]
    assert steered
    ivs, res = steered[0]
    assert ivs[0].site.name == site and float(ivs[0].scale) == 1.0
    n_steered = 0
    for b, (p, g) in enumerate(zip(res.prompt_ids, res.generated_ids, strict=True)):
        ids = p + g
        want = {i for i in range(len(p) - 1, len(ids) - 1) if ids[i] in delims}
        got = {s.position for s in res.steered if s.sequence == b}
        assert got == want and len(p) - 1 in want  # the prompt ends on a delimiter
        n_steered += len(got)
    assert n_steered == len(res.steered) and all(s.site == site for s in res.steered)
    # the vector reads where it says: the cache holds the resid_pre site
    from lens_steer.steering import SteeringVector

    assert SteeringVector.load(out / "seal_vector").site == site


def test_asc_preset_from_the_cli_reads_resid_pre_and_subtracts_at_resid_post(tokenizers,
                                                                              tmp_path):
    """`lens-steer asc --preset asc-r1-distill-qwen-7b`: v = mean(concise - verbose) of
    hidden_states[20] (= blocks.20.hook_resid_pre), raw; generation adds -0.27·v at
    blocks.20.hook_resid_post on the newest position of every step."""
    from transformers import AutoModelForCausalLM

    from experiments.asc import run_asc
    from lens_steer import load_model
    from lens_steer.testing import build_tiny_model

    d = build_tiny_model(tmp_path / "m", "qwen2", d_model=32, n_layers=21, n_heads=2,
                         n_kv_heads=1, tokenizer=tokenizers["r1"])
    cfg = _cli_config(["asc", "--preset", "asc-r1-distill-qwen-7b", "--model", str(d),
                       "--backend", "nnsight", "--dtype", "fp32", "--dataset", "toy",
                       "--n-extract", "2", "--n-eval", "1", "--n-calibration", "1",
                       "--n-heldout-states", "1", "--max-new-tokens", "4",
                       "--speed-prompts", "0", "--out", str(tmp_path / "run")])
    assert (cfg.read_site, cfg.write_site, cfg.asc_gamma, cfg.asc_vector, cfg.gamma_grid) == (
        "blocks.20.hook_resid_pre", "blocks.20.hook_resid_post", -0.27, "raw", [])
    model = load_model(d, backend="nnsight")
    calls = _recording(model)
    out = run_asc(cfg, tmp_path / "run", model=model)
    m = json.loads((out / "metrics.json").read_text())
    assert (m["vector"]["read_site"], m["vector"]["write_site"], m["gamma"]) == (
        "blocks.20.hook_resid_pre", "blocks.20.hook_resid_post", -0.27)
    from lens_steer.steering import SteeringVector

    vec = SteeringVector.load(out / "asc_vector")
    assert vec.site == "blocks.20.hook_resid_post"
    # the vector: raw mean of concise - verbose at HF hidden_states[20] (resid_pre 20)
    from experiments.common import study_splits

    hf = AutoModelForCausalLM.from_pretrained(d, torch_dtype=torch.float32).eval()
    diffs = []
    for p in study_splits(cfg).extract_toy:
        h = []
        for c in (p.concise_trace, p.verbose_trace):
            ids = model.encode(p.prompt) + model.encode(c)
            with torch.no_grad():
                h.append(hf(torch.tensor([ids]), output_hidden_states=True)
                         .hidden_states[20][0, -1])
        diffs.append(h[0] - h[1])
    torch.testing.assert_close(vec.vector, torch.stack(diffs).mean(0), rtol=1e-4, atol=1e-4)
    # generation: -0.27·v at resid_post 20, newest position of every step
    steered = [(ivs, res) for ivs, res in calls if ivs]
    assert steered
    ivs, res = steered[0]
    iv = ivs[0]
    assert (iv.site.name, float(iv.scale)) == ("blocks.20.hook_resid_post", -0.27)
    torch.testing.assert_close(iv.vector.float().cpu(), vec.vector)
    assert res.steered and {s.site for s in res.steered} == {"blocks.20.hook_resid_post"}
    n_steps = sum(len(g) for g in res.generated_ids)  # prefill + each generated token but last
    assert len(res.steered) == n_steps


def test_sites_are_checked_before_any_forward(tokenizers, tmp_path):
    from experiments.seal import run_seal
    from lens_steer import load_model
    from lens_steer.testing import build_tiny_model

    with pytest.raises(ConfigError, match="--write-site"):
        _cli_config(["seal", "--write-site", "blocks.1.attn.hook_pattern"])
    with pytest.raises(ConfigError, match="--read-site"):
        _cli_config(["seal", "--read-site", "blocks.x.resid"])
    d = build_tiny_model(tmp_path / "m", "qwen2", d_model=32, n_layers=2, n_heads=2,
                         n_kv_heads=1, tokenizer=tokenizers["qwen"])
    model = load_model(d, backend="nnsight")
    calls = _recording(model)
    for argv, match in ((["--write-site", "blocks.5.hook_resid_pre"], "--write-site"),
                        (["--write-site", "blocks.1.hook_resid_pre", "--layer", "0"],
                         "disagrees")):
        cfg = _cli_config(["seal", "--model", str(d), "--dataset", "toy", "--n-extract", "2",
                           "--n-eval", "1", *argv, "--out", str(tmp_path / "r")])
        with pytest.raises(ConfigError, match=match) as err:
            run_seal(cfg, tmp_path / "r", model=model)
        assert "\n" not in str(err.value)
    assert calls == []
