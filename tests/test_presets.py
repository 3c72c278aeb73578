"""Presets without weights (issue 18.7): a tiny random model of each preset's architecture and
depth, with the real Qwen2 tokenizer, reads and writes the preset's documented tensors, with its
sign and scale, under its prompt, exactly as the official code's hooks do."""

from __future__ import annotations

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
    assert get_preset("seal-r1-distill-qwen-1.5b").overrides["layer"] == 19  # resid_pre 20
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
    dataclasses = pytest.importorskip("dataclasses")
    common = pytest.importorskip("experiments.common")
    keys = {f.name for f in dataclasses.fields(common.SteeringStudyConfig)}
    for p in PRESETS.values():
        assert set(p.overrides) <= keys, (p.name, set(p.overrides) - keys)


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
