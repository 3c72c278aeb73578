"""The model's position limit is enforced before work, with a clear opt-in to run past it."""

from __future__ import annotations

import pytest

from lens_steer import GenerationConfig, load_model
from lens_steer.errors import ConfigError


@pytest.fixture(scope="module")
def toy():
    return load_model("toy")


def test_capture_past_the_limit_is_refused_then_allowed(toy):
    limit = toy.max_positions
    assert limit == 512
    seq = [5] * (limit + 1)
    with pytest.raises(ConfigError, match="position limit of 512.*extrapolate"):
        toy.capture([seq], ["blocks.0.hook_resid_post"], [[0]])
    toy.extrapolate = True
    try:
        out = toy.capture([seq], ["blocks.0.hook_resid_post"], [[0, limit]])
        assert out["blocks.0.hook_resid_post"].shape == (2, toy.d_model)
    finally:
        toy.extrapolate = False


def test_generation_stops_at_the_limit_and_says_so(toy):
    prompt = [5] * (toy.max_positions - 3)
    res = toy.generate([prompt], GenerationConfig(max_new_tokens=20, stop_at_eos=False))
    assert res.n_generated == [3] and res.finish_reasons == ["position_limit"]
    with pytest.raises(ConfigError, match="position limit"):
        toy.generate([[5] * (toy.max_positions + 1)], GenerationConfig(max_new_tokens=2))
