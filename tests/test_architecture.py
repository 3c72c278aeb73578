"""The recipes of docs/architecture.md, followed: a labeller, a steering method and a backend
are each their own code plus one registration, and then reach the cache, the metrics and the
CLI without touching anything else. Also: every registry has a consumer, and the document names
every module."""

from __future__ import annotations

import ast
import dataclasses
import json
import re
from collections import Counter
from pathlib import Path

import pytest

from lens_steer import registry
from lens_steer.backends.base import GenerationConfig
from lens_steer.registry import BACKENDS, LABELLERS, STEERING_METHODS
from lens_steer.thoughts import split_thoughts
from lens_steer.toy import TOY_MODEL_DIR, generate_problems, heldout_problems
from tests.conftest import loaded

ROOT = Path(__file__).resolve().parents[1]


def _toy():
    if not (TOY_MODEL_DIR / "config.json").exists():
        pytest.skip("the shipped toy model is missing (lens-steer toy train)")
    return loaded(TOY_MODEL_DIR, "transformer_lens")


def by_length(text: str) -> str:
    """A labeller: any `text -> label` callable."""
    return "long" if len(text) > 40 else "short"


@pytest.fixture
def dummy_labeller():
    LABELLERS.register("dummy", by_length)  # the recipe's one registration
    yield "dummy"
    LABELLERS.unregister("dummy")


def _traces(n: int = 6) -> list[dict]:
    return [{"id": f"t{i}", "text": p.prompt + p.verbose_trace}
            for i, p in enumerate(generate_problems(n, seed=11))]


def _expected_counts(traces: list[dict]) -> Counter:
    return Counter(by_length(t) for tr in traces for t in split_thoughts(tr["text"]))


def test_labeller_reaches_the_cache(dummy_labeller, tmp_path):
    from lens_steer.cache import CacheConfig, cache_thoughts, load_cache

    model, traces = _toy(), _traces()
    cache_thoughts(model, traces, tmp_path, CacheConfig(layers=[0], labeler="dummy",
                                                        progress=False))
    counts = Counter(load_cache(tmp_path).labels)
    assert set(counts) == {"long", "short"}
    assert counts == _expected_counts(traces)


def test_labeller_reaches_the_metrics(dummy_labeller):
    from lens_steer.eval.runner import run_eval
    from lens_steer.eval.toy import as_problems

    problems = as_problems(heldout_problems(4, seed=77))
    records, summary = run_eval(_toy(), problems, "toy", template="toy",
                                config=GenerationConfig(max_new_tokens=120),
                                labeler="dummy")
    labels = [lab for r in records for lab in r.thought_labels]
    assert labels and set(labels) <= {"long", "short"}
    per_trace = summary["thoughts_per_trace"]
    assert per_trace["long"] == pytest.approx(labels.count("long") / 4)
    assert per_trace["short"] == pytest.approx(labels.count("short") / 4)
    assert per_trace["execution"] == 0  # SEAL's labels were not used


def test_labeller_reaches_the_cli(dummy_labeller, tmp_path, capsys):
    from experiments.cli import build_parser, main
    from lens_steer.cache import load_cache

    traces = _traces(4)
    path = tmp_path / "traces.jsonl"
    path.write_text("".join(json.dumps(t) + "\n" for t in traces))
    _toy()
    argv = ["cache", "--model", "toy", "--traces", str(path), "--out", str(tmp_path / "c"),
            "--layers", "0", "--no-progress"]
    assert main([*argv, "--labeler", "dummy"]) == 0
    assert Counter(load_cache(tmp_path / "c").labels) == _expected_counts(traces)
    assert main([*argv, "--labeler", "no-such-labeller", "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "no-such-labeller" in err and "dummy" in err  # the choices come from the registry
    assert build_parser() is not None


# -- a steering method -------------------------------------------------------------------------
def _dummy_method():
    from lens_steer.methods import BaseMethod

    class Terse(BaseMethod):
        """A method: caps generation at `cap` tokens (its own code, one registration)."""

        name = "dummy"

        @dataclasses.dataclass
        class Options:
            cap: int = 5

        def gen_config(self, model, config):
            return dataclasses.replace(config, max_new_tokens=self.options.cap)

    return Terse


@pytest.fixture
def dummy_method():
    STEERING_METHODS.register("dummy", _dummy_method())
    yield "dummy"
    STEERING_METHODS.unregister("dummy")


def test_method_reaches_the_metrics(dummy_method):
    from lens_steer.eval.toy import as_problems
    from lens_steer.methods import evaluate_method

    method = STEERING_METHODS.get("dummy")(cap=7)
    problems = as_problems(heldout_problems(3, seed=78))
    records, summary = evaluate_method(method, _toy(), problems, "toy", template="toy",
                                       config=GenerationConfig(max_new_tokens=100))
    assert summary["method"] == {"method": "dummy", "cap": 7}
    assert all(r.n_tokens == 7 for r in records)  # nothing ends before 7 tokens
    assert summary["mean_tokens"] == 7 and summary["accuracy"] == 0


def test_method_reaches_the_cli(dummy_method, tmp_path, capsys):
    from experiments.cli import main

    _toy()
    argv = ["compare", "--model", "toy", "--n-extract", "0", "--n-eval", "2",
            "--max-new-tokens", "30", "--out", str(tmp_path / "cmp")]
    assert main([*argv, "--methods", "base", "dummy", "--method-options", "dummy.cap=4"]) == 0
    cells = {c["method"]: c for c in json.loads((tmp_path / "cmp" / "metrics.json").read_text())
             ["cells"]}
    assert cells["dummy"]["options"] == {"method": "dummy", "cap": 4}
    assert cells["dummy"]["mean_tokens"] == 4 < cells["base"]["mean_tokens"]
    assert main([*argv, "--methods", "no-such-method"]) == 2
    err = capsys.readouterr().err
    assert "no-such-method" in err and "dummy" in err  # the choices come from the registry


# -- a backend ---------------------------------------------------------------------------------
@pytest.fixture
def dummy_backend():
    def tagged(path, device, dtype, **options):
        """A backend factory: here the nnsight backend under another name (a real one would
        construct its own `ModelBackend` subclass the same way)."""
        model = BACKENDS.get("nnsight")(path, device=device, dtype=dtype, **options)
        model.name = "dummy"
        return model

    BACKENDS.register("dummy", tagged)  # the recipe's one registration
    yield "dummy"
    BACKENDS.unregister("dummy")


def test_backend_reaches_load_model_and_the_cli(dummy_backend, tmp_path, capsys):
    from experiments.cli import main
    from lens_steer import load_model
    from lens_steer.cache import load_cache

    _toy()
    model = load_model("toy", backend="dummy", device="cpu")
    assert model.describe()["backend"] == "dummy" and model.n_layers > 0
    path = tmp_path / "traces.jsonl"
    path.write_text("".join(json.dumps(t) + "\n" for t in _traces(2)))
    argv = ["cache", "--model", "toy", "--traces", str(path), "--out", str(tmp_path / "c"),
            "--layers", "0", "--no-progress", "--device", "cpu"]
    assert main([*argv, "--backend", "dummy"]) == 0
    assert load_cache(tmp_path / "c").info["model"]["backend"] == "dummy"
    assert main([*argv, "--backend", "no-such-backend", "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "no-such-backend" in err and "dummy" in err  # the choices come from the registry


# -- registries and the document ---------------------------------------------------------------
def test_lazy_registration_imports_on_first_use(tmp_path, monkeypatch):
    import sys

    (tmp_path / "lazy_labeller_mod.py").write_text(
        "from lens_steer.registry import LABELLERS\n\n"
        "@LABELLERS.register('lazy-dummy')\n"  # the module may register itself as well
        "def shout(text):\n    return 'loud' if '!' in text else 'quiet'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    LABELLERS.register_lazy("lazy-dummy", "lazy_labeller_mod:shout")
    try:
        assert "lazy-dummy" in LABELLERS.names() and "lazy_labeller_mod" not in sys.modules
        from lens_steer.thoughts import resolve_labeler

        label = resolve_labeler("lazy-dummy")  # first use: imports the module
        assert label("Go!") == "loud" and label("go") == "quiet"
        assert LABELLERS.get("lazy-dummy") is sys.modules["lazy_labeller_mod"].shout
    finally:
        LABELLERS.unregister("lazy-dummy")
        sys.modules.pop("lazy_labeller_mod", None)
    with pytest.raises(registry.ConfigError, match="package.module:attr"):
        LABELLERS.register_lazy("x", "no_colon")



def _library_sources() -> dict[str, str]:
    return {str(p.relative_to(ROOT)): p.read_text(encoding="utf-8")
            for folder in ("lens_steer", "experiments", "probes")
            for p in (ROOT / folder).rglob("*.py") if p.name != "registry.py"}


@pytest.mark.parametrize("name", ["BACKENDS", "POSITION_RULES", "LABELLERS", "STEERING_METHODS",
                                  "DATASETS"])
def test_every_registry_is_filled_and_read(name):
    import experiments.cli  # noqa: F401  (imports every registering module)
    import lens_steer.eval  # noqa: F401
    import lens_steer.methods  # noqa: F401

    reg = getattr(registry, name)
    assert len(reg) > 0, f"nothing registers in {name}"
    readers = [path for path, text in _library_sources().items()
               if re.search(rf"\b{name}\.(get|names)\(|\b{name}\.names\b", text)]
    assert readers, f"nothing reads {name} (get/names): its registrations reach no one"


def _modules() -> list[str]:
    return sorted(str(p.relative_to(ROOT)) for folder in ("lens_steer", "probes", "experiments")
                  for p in (ROOT / folder).rglob("*.py") if p.name != "__init__.py")


def test_architecture_doc_names_every_module():
    doc = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    missing = [m for m in _modules() if f"`{m}`" not in doc]
    assert not missing, f"docs/architecture.md has no line for {missing}"
    for recipe in ("Adding a backend", "Adding a steering method", "Adding a labeller"):
        assert recipe in doc


def test_doc_recipe_snippets_parse():
    """The recipes' code blocks are valid Python."""
    doc = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", doc, flags=re.S)
    assert len(blocks) >= 3
    for block in blocks:
        ast.parse(block)
