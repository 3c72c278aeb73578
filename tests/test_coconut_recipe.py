"""`lens-steer coconut recipe`: the multi-seed study chain, its k choice, resume and summary."""

from __future__ import annotations

import json

import pytest

from experiments import coconut_recipe
from lens_steer.coconut.data import generate_prosqa, save_prosqa
from lens_steer.errors import ConfigError


def test_choose_k_uses_validation_and_the_token_budget():
    val = {0: {"accuracy": 0.5, "mean_generated_tokens": 4},
           1: {"accuracy": 0.8, "mean_generated_tokens": 12},
           2: {"accuracy": 0.9, "mean_generated_tokens": 20},     # best, but not below CoT
           3: {"accuracy": 0.8, "mean_generated_tokens": 9}}
    c = coconut_recipe.choose_k(val, cot_tokens=15)
    assert c["k"] == 3                          # 0.8 ties with k=1; fewer tokens wins
    assert c["below_cot_tokens"]
    assert coconut_recipe.choose_k(val, cot_tokens=100)["k"] == 2
    none = coconut_recipe.choose_k(val, cot_tokens=3)       # no k is below CoT: said so
    assert none["k"] == 2 and not none["below_cot_tokens"]


@pytest.fixture
def tiny_recipe(tmp_path, monkeypatch):
    base = {"generator": "small", "text_style": "compact", "n_train": 8, "n_val": 4,
            "n_test": 4, "d_model": 32, "n_layers": 1, "n_heads": 2}
    train = {"batch_size": 4, "epochs": 1, "val_size": 4, "eval_max_new_tokens": 16,
             "num_threads": 1}
    folder = tmp_path / "recipes" / "tiny"
    folder.mkdir(parents=True)
    for mode, extra in (("cot_pre", {}), ("cot", {}), ("nocot", {}),
                        ("coconut", {"epochs": 2, "epochs_per_stage": 1, "stage0_epochs": 0,
                                     "max_latent_stage": 2})):
        (folder / f"{mode}.json").write_text(json.dumps({**base, "train": {**train, **extra}}))
    monkeypatch.setattr(coconut_recipe, "RECIPES", tmp_path / "recipes")
    for name, value in (("N_VAL", 4), ("N_TEST", 4), ("N_INSPECT", 4)):
        monkeypatch.setattr(coconut_recipe, name, value)
    real = tmp_path / "real.json"
    save_prosqa(real, generate_prosqa(4, seed=9, n_concepts=(7, 9), hops=(3, 5)))
    return tmp_path, real


def test_recipe_runs_resumes_and_refuses_other_settings(tiny_recipe):
    tmp_path, real = tiny_recipe
    out = tmp_path / "study"
    res = coconut_recipe.run_seed("tiny", 0, out, real, inspect=True)
    sd = out / "s0"
    for mode in ("cot", "coconut", "nocot"):
        assert (sd / mode / "train_result.json").exists()
        for split in ("val", "test", "real"):
            assert res[mode][split]["n"] == 4
    choice = json.loads((sd / "choice.json").read_text())
    assert sorted(choice["val"]) == ["0", "1", "2"]            # every k up to the trained 2
    assert res["coconut_chosen"]["k"] == choice["k"]
    assert json.loads((sd / "nocot" / "init.json").read_text())["init"] == str(sd / "cot")
    assert json.loads((sd / "cot" / "init.json").read_text())["init"] == str(sd / "cot_pre")
    assert (sd / "inspect-real" / "inspect.json").exists()

    stamp = (sd / "cot" / "model.safetensors").stat().st_mtime_ns
    assert coconut_recipe.run_seed("tiny", 0, out, real)["coconut"] == res["coconut"]
    assert (sd / "cot" / "model.safetensors").stat().st_mtime_ns == stamp   # not retrained

    s = coconut_recipe.summarize(out)
    assert s["seeds"] == [0] and s["goal"]["n_seeds"] == 1 and not s["goal"]["met"]
    assert "NOT met" in (out / "summary.md").read_text()

    cfg = tmp_path / "recipes" / "tiny" / "cot.json"
    cfg.write_text(cfg.read_text().replace('"n_train": 8', '"n_train": 12'))
    with pytest.raises(ConfigError, match="other settings"):
        coconut_recipe.run_seed("tiny", 0, out, real)


def test_unknown_recipe_names_the_known_ones():
    with pytest.raises(ConfigError, match="a2"):
        coconut_recipe.recipe_configs("nope")
