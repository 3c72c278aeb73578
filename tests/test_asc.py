"""ASC as the official code has it (ArminAzizi98/ASC): released `.pt` vectors loaded safely,
extraction at `hidden_states[L]`, the subtracting hook at the output of decoder layer L; and the
KL-bound gamma solved exactly."""

from __future__ import annotations

import math
import pickle

import pytest
import torch

from lens_steer.errors import DataError
from lens_steer.generation import GenerationConfig
from lens_steer.steering.asc import (
    extract_official_vector,
    kl_bound,
    load_released_vector,
    official_asc_intervention,
    read_concise_answers,
    save_released_format,
    solve_gamma,
    solve_gamma_cubic,
)
from tests.conftest import loaded


def test_gamma_solves_the_bound_exactly():
    g, cubic = solve_gamma(1.0, 100.0, 0.1), solve_gamma_cubic(1.0, 100.0, 0.1)
    assert g == pytest.approx(0.1029, abs=1e-4) and cubic == pytest.approx(0.1555, abs=1e-3)
    assert kl_bound(g, 1.0, 100.0) == pytest.approx(0.1, rel=1e-9)
    assert kl_bound(cubic, 1.0, 100.0) == pytest.approx(0.465, abs=0.01)  # cubic overshoots
    assert solve_gamma(2.0, 0.0, 0.01) == pytest.approx(2 * math.sqrt(0.01) / 2.0)
    assert solve_gamma(0.931, 1e-12, 1e-3) == pytest.approx(2 * math.sqrt(1e-3) / 0.931)


def test_released_format_loads_checked(tmp_path):
    diffs = torch.randn(5, 64, dtype=torch.float16) * 10
    p = save_released_format(tmp_path / "steering_vectors_x.pt", diffs)
    v = load_released_vector(p, layer=1, gamma=0.27, d_model=64, model_name="x")
    assert torch.equal(v.vector, diffs.float().mean(0))
    assert v.scale == pytest.approx(-0.27) and v.layer == 1
    assert v.provenance["write_site"] == "blocks.1.hook_resid_post"
    assert v.provenance["read_site"] == "blocks.1.hook_resid_pre"
    assert v.provenance["n_pairs"] == 5 and v.provenance["file_dtype"] == "float16"
    with pytest.raises(DataError, match="d_model"):
        load_released_vector(p, 1, 0.27, d_model=32)
    torch.save(torch.arange(6).reshape(2, 3), tmp_path / "int.pt")
    with pytest.raises(DataError, match="floating"):
        load_released_vector(tmp_path / "int.pt", 1, 0.27)
    torch.save({"v": diffs}, tmp_path / "dict.pt")
    with pytest.raises(DataError, match="holds a dict"):
        load_released_vector(tmp_path / "dict.pt", 1, 0.27)


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_pickled_code_is_refused(tmp_path, capsys):
    p = tmp_path / "evil.pt"
    with open(p, "wb") as f:
        pickle.dump(_Evil(), f)
    with pytest.raises(DataError, match="weights_only"):
        load_released_vector(p, 1, 0.27)
    assert "must never run" not in capsys.readouterr().out


def _official_hook(vec: torch.Tensor, gamma: float):
    """generate.py's add_steer, for decoder layers returning a tuple or a tensor."""
    def add_steer(_module, _inputs, output):
        h = output[0] if isinstance(output, tuple) else output
        h[:, -1, :] = h[:, -1, :] - gamma * vec.to(h.dtype)
        return (h, *output[1:]) if isinstance(output, tuple) else h
    return add_steer


@pytest.mark.parametrize("backend", ["transformer_lens", "nnsight"])
def test_released_vector_steers_like_the_official_hook(tmp_path, tiny_qwen2_dir, backend):
    from transformers import AutoModelForCausalLM

    model = loaded(tiny_qwen2_dir, backend)
    hf = AutoModelForCausalLM.from_pretrained(tiny_qwen2_dir, torch_dtype=torch.float32).eval()
    torch.manual_seed(1)
    diffs = torch.randn(4, model.d_model) * 3
    vec = load_released_vector(save_released_format(tmp_path / "v.pt", diffs), layer=1,
                               gamma=0.5, d_model=model.d_model)
    prompt = "12 + 7 ="
    ids = model.encode(prompt)
    cfg = GenerationConfig(max_new_tokens=8, temperature=0.0, stop_at_eos=False)
    ours = model.generate([prompt], cfg, [official_asc_intervention(vec)]).generated_ids[0]
    plain = model.generate([prompt], cfg).generated_ids[0]
    handle = hf.model.layers[1].register_forward_hook(_official_hook(vec.vector, 0.5))
    try:
        with torch.no_grad():
            out = hf.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False,
                              attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                              pad_token_id=hf.config.pad_token_id)
    finally:
        handle.remove()
    assert ours == out[0, len(ids):].tolist()
    assert ours != plain  # the steer matters at this strength, so the check can fail


def test_official_extraction_reads_hidden_states_L(tiny_qwen2_dir):
    from transformers import AutoModelForCausalLM

    model = loaded(tiny_qwen2_dir, "transformer_lens")
    hf = AutoModelForCausalLM.from_pretrained(tiny_qwen2_dir, torch_dtype=torch.float32).eval()
    pairs = [("1+1? ", "long 2 because", "2"), ("3*3? ", "nine since 3", "9")]
    vec = extract_official_vector(model, pairs, layer=2, gamma=0.27)
    ref = []
    for p, verbose, concise in pairs:
        states = []
        for text in (p + concise, p + verbose):
            ids = torch.tensor([model.encode(text)])
            with torch.no_grad():
                states.append(hf(ids, output_hidden_states=True).hidden_states[2][0, -1])
        ref.append(states[0] - states[1])
    torch.testing.assert_close(vec.vector, torch.stack(ref).mean(0), rtol=1e-4, atol=1e-4)
    assert vec.scale == pytest.approx(-0.27)


def test_concise_answers_file(tmp_path):
    p = tmp_path / "short_cots.json"
    p.write_text('[{"problem": "1+1", "answer": "$2$"}]')
    assert read_concise_answers(p) == [("1+1", "$2$")]
    p.write_text('[{"problem": "1+1"}]')
    with pytest.raises(DataError, match="item 1"):
        read_concise_answers(p)
