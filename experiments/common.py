"""The config parts every study composes, and the one definition of its problem splits.

    @dataclasses.dataclass
    class MyConfig(StudyConfig):          # = Generation + Splits + ModelOptions
        layer: int | None = None
        \"\"\"Steered layer.\"\"\"

Parts: `ModelOptions` (what `load_model` takes; every command that loads a model has it),
`Splits` (extraction / validation / held-out problems; every study evaluates the same held-out
problems unless told otherwise), `Generation` (decoding). Flags, config files and `--set` come
from `experiments.config`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from experiments.config import ConfigBase, field
from lens_steer.errors import ConfigError
from lens_steer.eval.datasets import Problem, format_prompt, load_dataset

if TYPE_CHECKING:
    from lens_steer.backends.base import ModelBackend


def _backend_names() -> list[str]:
    from lens_steer.registry import BACKENDS

    return BACKENDS.names() or ["nnsight", "transformer_lens"]


@dataclasses.dataclass
class ModelOptions(ConfigBase):
    """model and backend (the same options on every command that loads a model)"""

    model: str = "toy"
    """"toy" (the shipped toy reasoner), a local HF model directory, or a hub id."""
    backend: str = field("transformer_lens", choices=_backend_names)
    """Backend: "transformer_lens" (TransformerBridge) or "nnsight"."""
    device: str | None = None
    """Torch device ("cpu", "cuda:0"); None = cuda when available, else cpu. Ignored with
    device_map."""
    dtype: str | None = field(None, choices=("fp32", "float32", "fp16", "float16", "bf16",
                                             "bfloat16"))
    """Weights dtype: fp32, fp16 or bf16; None = fp32."""
    device_map: str | None = None
    """nnsight: "auto" (spread over the visible GPUs) or a JSON module->device map, e.g.
    '{"": "cpu"}'."""
    remote: str | None = None
    """nnsight: "ndif" (NDIF; a hub id and NDIF_API_KEY), "local" (NDIF serialisation, run
    here) or a host URL (it receives your NDIF key)."""
    remote_decode: str | None = field(None, choices=("recompute", "cache"))
    """Remote generation: re-run the prefix each step, or ship the KV cache."""
    prefill_chunk: int | None = field(None, minimum=1)
    """Feed long prompts / traces through the KV cache in chunks of this many tokens."""
    threads: int | None = field(None, minimum=0)
    """Torch CPU threads; None or 0 = torch's default."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.device_map and self.device_map.lstrip().startswith("{"):
            try:
                json.loads(self.device_map)
            except ValueError as err:
                raise ConfigError(f"--device-map is not valid JSON ({err}): use 'auto' or a "
                                  "map like '{\"\": \"cpu\"}'") from None

    def load_options(self) -> dict[str, Any]:
        """`load_model` keyword arguments (besides source and backend)."""
        opts: dict[str, Any] = {"device": self.device, "dtype": self.dtype}
        if self.device_map:
            dm = self.device_map
            opts["device_map"] = json.loads(dm) if dm.lstrip().startswith("{") else dm
        if self.remote:
            opts["remote"] = True if self.remote == "ndif" else self.remote
        if self.remote_decode is not None:
            opts["remote_decode"] = self.remote_decode
        if self.prefill_chunk is not None:
            opts["prefill_chunk"] = self.prefill_chunk
        return opts

    def load(self):
        """The model behind `ModelBackend` (sets the thread count first)."""
        from lens_steer import load_model

        if self.threads:
            import torch

            torch.set_num_threads(self.threads)
        return load_model(self.model, backend=self.backend, **self.load_options())

    def identity(self) -> dict[str, Any]:
        """The options that change a model's outputs (stage fingerprints); placement
        options (device map, remote, prefill chunking, threads) do not."""
        return {"model": self.model, "backend": self.backend, "dtype": self.dtype or "fp32"}


@dataclasses.dataclass
class Splits(ConfigBase):
    """data splits (extraction / validation / held-out; shared by every study)"""

    dataset: str = "toy"
    """"toy", "toy:short", "toy:long", "math500" or "gsm8k" (local JSONL: --dataset-path)."""
    dataset_path: str | None = None
    """Local JSONL for math500 / gsm8k."""
    template: str = "toy"
    """Prompt template: "toy", "r1", "raw" or a format string with {problem}."""
    n_extract: int = field(300, minimum=1, aliases=("--n-train",))
    """Problems whose traces build the vectors / probes (extraction split)."""
    n_eval: int = field(200, minimum=1)
    """Held-out problems every condition is evaluated on."""
    n_val: int = field(200, minimum=1)
    """Validation problems for choosing a strength (never the held-out ones)."""
    extract_seed: int = field(1, aliases=("--train-seed",))
    """Seed of the extraction split (toy problems are generated from it)."""
    eval_seed: int = 2
    """Seed of the held-out split (disjoint from the extraction split and from the model's
    training questions)."""
    val_seed: int | None = None
    """Seed of the validation split; None = extract_seed + 1 (disjoint from both others)."""


@dataclasses.dataclass
class Generation(ConfigBase):
    """generation"""

    max_new_tokens: int = field(320, minimum=1)
    """Generation budget per trace."""
    batch_size: int = field(64, minimum=1)
    """Sequences per generation batch (lowered to what fits on a GPU)."""
    seed: int = 0
    """Global seed (sampling, probes, state sampling)."""

    def generation_config(self, **overrides: Any):
        from lens_steer import GenerationConfig

        return GenerationConfig(max_new_tokens=self.max_new_tokens, batch_size=self.batch_size,
                                seed=self.seed, **overrides)


@dataclasses.dataclass
class StudyConfig(Generation, Splits, ModelOptions):
    """Fields every study has: model options, splits, generation."""


@dataclasses.dataclass
class SteerLayer(ConfigBase):
    """steering"""

    layer: int | None = field(None, minimum=0)
    """Steered layer (the output of block `layer`, resid_post); None = about 2/3 of the
    depth."""


@dataclasses.dataclass
class SteerSites(ConfigBase):
    """steering sites (TransformerLens hook names; default: resid_post of --layer)"""

    read_site: str | None = None
    """Where the vector's activations are read, e.g. "blocks.20.hook_resid_pre"; None =
    `blocks.{layer}.hook_resid_post`."""
    write_site: str | None = None
    """Where generation adds the vector, e.g. "blocks.20.hook_resid_post"; None =
    `blocks.{layer}.hook_resid_post`. Its block is the steered layer (--layer, when also given,
    must agree)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("read_site", "write_site"):
            value = getattr(self, name)
            if value is not None:
                check_site(value, "--" + name.replace("_", "-"))


def check_site(site: str, flag_name: str, n_layers: int | None = None) -> str:
    """The canonical name of `site` when a steering vector can be read and added there (a
    block's residual / attention / MLP output, not per head), else a one-line `ConfigError`
    naming the flag; with `n_layers`, the block must exist too."""
    from lens_steer.sites import parse_site, validate_site

    try:
        parsed = parse_site(site) if n_layers is None else validate_site(site, n_layers)
    except ConfigError as err:
        raise ConfigError(f"{flag_name} {site}: {str(err).splitlines()[0]}") from None
    if not parsed.editable or parsed.per_head or parsed.layer is None:
        raise ConfigError(f"{flag_name} {site}: a steering vector is read and added at a "
                          "block's resid_pre / resid_mid / resid_post / attn_out / mlp_out site")
    return parsed.name


def steer_sites(model: ModelBackend, cfg: Any, layer: int | None
                ) -> tuple[int | None, str | None, str | None]:
    """(layer, read_site, write_site) of `cfg` (a config with `SteerSites`, or not), checked
    against `model` before any forward. Unset sites stay None (= resid_post of the layer); a
    set `write_site` gives the layer, and a `--layer` that names another block is refused."""
    read, write = getattr(cfg, "read_site", None), getattr(cfg, "write_site", None)
    read = None if read is None else check_site(read, "--read-site", model.n_layers)
    write = None if write is None else check_site(write, "--write-site", model.n_layers)
    if write is not None:
        block = int(write.split(".")[1])
        if layer is not None and layer != block:
            raise ConfigError(f"--layer {layer} disagrees with --write-site {write} (block "
                              f"{block}): give the sites of the layer you want")
        layer = block
    return layer, read, write


@dataclasses.dataclass
class SealOptions(SteerLayer):
    """SEAL"""

    alpha: float = 1.0
    """SEAL strength: H <- H + alpha * S on delimiter steps inside <think>."""
    variant: str = field("both", choices=("both", "reflection", "transition"))
    """Thoughts S steers away from: "both", "reflection" or "transition"."""


@dataclasses.dataclass
class AscOptions(SteerLayer):
    """ASC"""

    epsilon: float = field(1e-3, minimum=0)
    """KL budget of the gamma calibration."""
    n_calibration: int = field(50, minimum=1)
    """Calibration states (prefixes of extraction traces)."""
    asc_gamma: float | None = field(None, aliases=("--gamma",))
    """A fixed gamma instead of the KL-calibrated one (which is still computed and recorded);
    strength sweeps then take multiples of it."""
    gamma_grid: list[float] = field(default_factory=lambda: [20.0, 40.0, 60.0, 80.0],
                                    aliases=("--asc-gamma-grid",))
    """Fixed gammas tried on the validation split (never the held-out one); empty = no grid."""
    val_margin: float = field(1.0, minimum=0)
    """Accuracy points below validation base that a gamma chosen on the grid may lose."""


@dataclasses.dataclass
class SteeringStudyConfig(AscOptions, SealOptions, StudyConfig):
    """Studies that steer with either method (sweeps, ablation, transfer)."""

    method: str = field("seal", choices=("seal", "asc"))
    """"seal" (alpha * S at thought delimiters) or "asc" (gamma * v at every newest
    position)."""


# -- the splits --------------------------------------------------------------------------------
TOY_VARIANTS = {"toy": (0, 99), "toy:short": (0, 3), "toy:long": (5, 99)}
"""Toy datasets by number of reasoning steps (min, max): transfer studies move between them."""


@dataclasses.dataclass
class StudySplits:
    """The problems of a study: extraction, held-out evaluation, and (lazily) validation."""

    extract: list[Problem]
    eval: list[Problem]
    extract_toy: list[Any]
    """The extraction split as ToyProblems (reference traces, ASC pairs); empty off toy."""
    eval_toy: list[Any]
    """The held-out split as ToyProblems; empty off toy."""
    cfg: Any

    def validation(self, n: int | None = None) -> list[Problem]:
        """`n` (default n_val) problems disjoint from the other splits and from the model's
        training questions, seed `val_seed` (default extract_seed + 1)."""
        cfg = self.cfg
        n = cfg.n_val if n is None else n
        if not cfg.dataset.startswith("toy"):
            raise ConfigError("a validation split needs a toy dataset (real datasets: choose "
                              "a fixed strength)")
        from lens_steer.toy.splits import heldout_problems

        seed = cfg.extract_seed + 1 if cfg.val_seed is None else cfg.val_seed
        used = {p.question for p in self.extract + self.eval}
        return as_eval_problems(heldout_problems(n, seed, used | _training_questions(cfg.model)),
                                "val")


def _training_questions(model: str) -> set[str]:
    from lens_steer.backends.loading import resolve_source
    from lens_steer.toy.splits import training_questions

    return training_questions(resolve_source(model))


def toy_splits(model_source: str, n_extract: int, n_eval: int, extract_seed: int,
               eval_seed: int, variant: str = "toy", eval_variant: str | None = None
               ) -> tuple[list[Any], list[Any]]:
    """(extraction, evaluation) ToyProblems, disjoint from each other and from the model's own
    training questions (every stage; see `lens_steer.toy.splits.training_questions`)."""
    from lens_steer.toy.splits import heldout_problems

    exclude = _training_questions(model_source)

    def pick(n: int, seed: int, name: str, excl: set[str]) -> list[Any]:
        if name not in TOY_VARIANTS:
            raise ConfigError(f"unknown toy dataset {name!r}; choose one of "
                              f"{sorted(TOY_VARIANTS)}")
        if name == "toy":
            return heldout_problems(n, seed, excl)
        lo, hi = TOY_VARIANTS[name]
        out: list[Any] = []
        k = 0
        while len(out) < n:
            out += [p for p in heldout_problems(4 * n, seed + 7919 * k, excl)
                    if lo <= len(p.steps) <= hi and p.question not in {q.question for q in out}]
            k += 1
        return out[:n]

    extract = pick(n_extract, extract_seed, variant, exclude)
    evaluate = pick(n_eval, eval_seed, eval_variant or variant,
                    exclude | {p.question for p in extract})
    return extract, evaluate


def as_eval_problems(toy: Sequence[Any], tag: str) -> list[Problem]:
    """ToyProblems as evaluation Problems with ids `{tag}-{i}` (`lens_steer.eval.toy`)."""
    from lens_steer.eval.toy import as_problems

    return as_problems(toy, tag)


def study_splits(cfg: Splits | Any, eval_dataset: str | None = None) -> StudySplits:
    """The splits of `cfg` (a config with `Splits` and `model`). Toy: disjoint seeds; real
    datasets: the first n_extract problems, then the next n_eval."""
    if cfg.dataset.startswith("toy"):
        ex, ev = toy_splits(cfg.model, cfg.n_extract, cfg.n_eval, cfg.extract_seed,
                            cfg.eval_seed, cfg.dataset, eval_dataset)
        return StudySplits(as_eval_problems(ex, "extract"), as_eval_problems(ev, "eval"), ex, ev,
                           cfg)
    problems = load_dataset(cfg.dataset, path=cfg.dataset_path)
    if len(problems) < cfg.n_extract + 1:
        raise ConfigError(f"{cfg.dataset} has {len(problems)} problems; need more than "
                          f"--n-extract {cfg.n_extract}")
    return StudySplits(problems[:cfg.n_extract],
                       problems[cfg.n_extract:cfg.n_extract + cfg.n_eval], [], [], cfg)


def default_layer(n_layers: int) -> int:
    """The steered layer when none is given: about 2/3 of the depth."""
    return max(0, min(n_layers - 1, round(2 * n_layers / 3)))


def check_layers(model: ModelBackend, layers: Sequence[int], flag_name: str = "--layer") -> list[int]:
    """`layers` if the model has them, else a `ConfigError` naming the flag (before any work)."""
    bad = [x for x in layers if not isinstance(x, int) or not 0 <= x < model.n_layers]
    if bad:
        raise ConfigError(f"{flag_name} {bad[0]}: this model has layers 0..{model.n_layers - 1}")
    return list(layers)


def prompts_for(problems: Sequence[Problem], template: str) -> list[str]:
    return [format_prompt(p, template) for p in problems]


def traces_from_records(problems: Sequence[Problem], prompts: Sequence[str],
                        records: Sequence[Any]) -> list[dict]:
    """Cache input from generations: full text (prompt + generation), id, correctness."""
    out = []
    for p, prompt, r in zip(problems, prompts, records, strict=True):
        r = r.to_dict() if hasattr(r, "to_dict") else r
        out.append({"id": str(p.id), "text": prompt + r["generated_text"],
                    "correct": bool(r["correct"])})
    return out


def planned_batch_size(model: ModelBackend, cfg: Generation, prompt_tokens: int = 512) -> int:
    """Print the memory plan and return the largest safe batch <= cfg.batch_size (GPU only;
    fails early with the numbers when not even one sequence fits)."""
    from lens_steer.memory import choose_batch_size

    return choose_batch_size(model, cfg.batch_size,
                             max_tokens=prompt_tokens + cfg.max_new_tokens)
